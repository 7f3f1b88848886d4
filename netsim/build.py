"""Build a topology for the length of a ``with`` block, and always tear it down.

::

    topology = Topology(
        public_hosts=(PublicHost("relay"),),
        sites=(Site("home", NatKind.EASY, hosts=(SiteHost("laptop"),)),),
    )
    with build(topology) as net:
        relay = net.spawn("relay", python_module_argv("relayd", "--port", "3478"))
        relay.wait_for_output("listening", timeout=5)
        result = net.run("laptop", python_module_argv("p2psync", "netcheck"))

Teardown guarantees: whether the body returns, raises, or the process gets
SIGINT/SIGTERM (turned into KeyboardInterrupt/SystemExit while the block
runs), every process started through the network is stopped (SIGTERM, then
SIGKILL), every namespace whose name starts with the run's prefix is deleted
(killing stray processes inside), and the owner record is removed. Signals
arriving during teardown are held back until it is done. A run killed with
SIGKILL leaves namespaces behind without a live owner: ``python -m netsim
cleanup`` removes them.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from ipaddress import IPv4Address
from pathlib import Path
from types import FrameType

from netsim import netns, runs
from netsim.errors import NetsimError
from netsim.procs import DEFAULT_RUN_TIMEOUT_S, Proc, ProcessSupervisor, python_module_argv
from netsim.topology import HostPlan, NetworkPlan, SitePlan, Topology, plan_network

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_BASE = Path(tempfile.gettempdir()) / "netsim-out"
"""Logs of run R go to ``<base>/<R>/``; outside the work tree so runs leave it clean."""


LINK_EMULATOR_START_S = 10.0
"""A Python process binding two packet sockets; slow only on a loaded machine."""


class Network:
    """A built topology: where each host lives, and processes inside hosts."""

    def __init__(self, plan: NetworkPlan, output_dir: Path) -> None:
        self.plan = plan
        self.output_dir = output_dir
        self._supervisor = ProcessSupervisor(output_dir)
        self._closed = False

    @property
    def run_id(self) -> str:
        return self.plan.run_id

    def host(self, name: str) -> HostPlan:
        return self.plan.host(name)

    def site(self, name: str) -> SitePlan:
        return self.plan.site(name)

    def address(self, host_name: str) -> IPv4Address:
        """The host's own address (private behind a translating NAT)."""
        return self.plan.host(host_name).address

    def public_address(self, host_name: str) -> IPv4Address:
        """The address the internet sees for the host."""
        return self.plan.host(host_name).public_address

    def namespace(self, host_name: str) -> str:
        return self.plan.host(host_name).namespace

    def spawn(
        self,
        host_name: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Proc:
        """Start ``argv`` in the host's namespace; logs go to ``<output_dir>/<name>.*.log``.

        ``name`` defaults to ``<host>-<argv[0] basename>``; it is made unique.
        The process is stopped at teardown if it is still running.
        """
        self._check_open()
        return self._supervisor.spawn(
            self.namespace(host_name),
            argv,
            name=name or f"{host_name}-{Path(argv[0]).name}",
            env=env,
            cwd=cwd,
        )

    def run(
        self,
        host_name: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        timeout: float = DEFAULT_RUN_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        input_text: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the host's namespace to completion (killed after ``timeout``).

        Raises CommandFailed with the stderr on a non-zero exit when ``check``.
        """
        self._check_open()
        return self._supervisor.run(
            self.namespace(host_name),
            argv,
            name=name or f"{host_name}-{Path(argv[0]).name}",
            timeout=timeout,
            env=env,
            cwd=cwd,
            input_text=input_text,
            check=check,
        )

    @property
    def procs(self) -> tuple[Proc, ...]:
        return self._supervisor.procs

    def start_link_emulators(self) -> None:
        """One :mod:`netsim.linkem` per conditioned link; returns when all forward."""
        emulators = [
            self._supervisor.spawn(
                emulator.namespace,
                python_module_argv(
                    "netsim.linkem",
                    "--a",
                    emulator.interface_a,
                    "--b",
                    emulator.interface_b,
                    *emulator.conditions.linkem_arguments(),
                    "--seed",
                    str(index),
                ),
                name=f"link-{emulator.label}",
            )
            for index, emulator in enumerate(self.plan.link_emulators)
        ]
        for emulator_proc in emulators:
            emulator_proc.wait_for_output("ready", timeout=LINK_EMULATOR_START_S)

    def close(self) -> list[str]:
        """Stop processes, delete the run's namespaces; return what could not be removed."""
        if self._closed:
            return []
        self._closed = True
        try:
            self._supervisor.stop_all()
        finally:
            ours = [
                name
                for name in netns.list_namespaces()
                if name.startswith(self.plan.namespace_prefix)
            ]
            failures = netns.delete_namespaces(ours)
            if not failures:
                runs.remove_owner_record(self.run_id)
        return failures

    def _check_open(self) -> None:
        if self._closed:
            raise NetsimError(f"network {self.run_id} is already torn down")


def new_run_id() -> str:
    return secrets.token_hex(3)


@contextlib.contextmanager
def build(
    topology: Topology,
    *,
    output_base: Path | None = None,
    run_id: str | None = None,
) -> Iterator[Network]:
    """Create ``topology`` in fresh namespaces; tear everything down on exit."""
    run_id = run_id or new_run_id()
    plan = plan_network(topology, run_id)
    output_dir = (output_base or DEFAULT_OUTPUT_BASE) / run_id
    output_dir.mkdir(parents=True, exist_ok=True)
    network = Network(plan, output_dir)
    with _sigterm_raises_system_exit():
        failures: list[str] = []
        try:
            runs.write_owner_record(run_id)
            log.info("building run %s (logs in %s)", run_id, output_dir)
            netns.apply_plan(plan)
            network.start_link_emulators()
            yield network
        finally:
            with _signals_held():
                failures = network.close()
            if failures:
                log.error("teardown of run %s left: %s", run_id, "; ".join(failures))
        if failures:
            raise NetsimError(
                f"teardown of run {run_id} failed: {'; '.join(failures)};"
                " run `python -m netsim cleanup`"
            )


@contextlib.contextmanager
def _sigterm_raises_system_exit() -> Iterator[None]:
    """While building and running, SIGTERM unwinds the stack like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back during teardown, deliver them afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {
        signum: signal.signal(signum, remember) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for held, handler in previous.items():
            signal.signal(held, handler)
        for signum in received:
            signal.raise_signal(signum)
