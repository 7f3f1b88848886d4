"""Processes in hosts, and teardown: nothing of a run survives it, whatever happens."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netsim import netns, runs
from netsim.build import Network, build, new_run_id
from netsim.errors import CommandFailed, WaitTimeout
from netsim.nat import NatKind
from netsim.procs import python_module_argv, wait_until
from netsim.topology import PublicHost, Site, SiteHost, Topology

SMALL = Topology(
    public_hosts=(PublicHost("relay"),),
    sites=(Site("home", NatKind.EASY, hosts=(SiteHost("laptop"),)),),
)
RunNamespaces = Callable[[str], list[str]]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return status != "Z"


def test_wait_until_returns_once_true_and_times_out_otherwise() -> None:
    calls: list[int] = []

    def third_time_lucky() -> bool:
        calls.append(1)
        return len(calls) >= 3

    wait_until(third_time_lucky, timeout=5, what="three calls", interval=0.001)
    assert len(calls) == 3
    with pytest.raises(WaitTimeout, match=r"never: not true after 0\.05 s"):
        wait_until(lambda: False, timeout=0.05, what="never", interval=0.01)


@pytest.fixture(scope="module")
def small_network(
    netsim_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Network]:
    with build(SMALL, output_base=tmp_path_factory.mktemp("netsim-out")) as net:
        yield net


@pytest.mark.netsim
def test_run_executes_inside_the_hosts_namespace(small_network: Network) -> None:
    code = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
    code += f"s.connect(('{small_network.address('relay')}', 9)); print(s.getsockname()[0])"
    completed = small_network.run("laptop", [sys.executable, "-c", code], name="route-check")
    assert completed.stdout.strip() == str(small_network.address("laptop"))
    logged = (small_network.output_dir / "route-check.out.log").read_text()
    assert logged == completed.stdout


@pytest.mark.netsim
def test_spawn_passes_env_and_cwd_and_logs_output(small_network: Network, tmp_path: Path) -> None:
    code = "import os, sys; print(os.environ['NETSIM_TEST'], os.getcwd());"
    code += " print('oops', file=sys.stderr)"
    proc = small_network.spawn(
        "relay",
        [sys.executable, "-c", code],
        name="env-check",
        env={"NETSIM_TEST": "hello"},
        cwd=tmp_path,
    )
    assert proc.wait(10) == 0
    assert proc.stdout_text().split() == ["hello", str(tmp_path)]
    assert proc.stderr_text().strip() == "oops"
    assert proc.stdout_path == small_network.output_dir / "env-check.out.log"


@pytest.mark.netsim
def test_stop_terminates_and_escalates_to_kill(small_network: Network) -> None:
    polite = small_network.spawn("relay", ["sleep", "60"])
    assert polite.stop(grace_s=2) == -signal.SIGTERM
    stubborn_code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('ready', flush=True); time.sleep(60)"
    )
    stubborn = small_network.spawn("relay", [sys.executable, "-c", stubborn_code])
    stubborn.wait_for_output("ready", timeout=10)
    started = time.monotonic()
    assert stubborn.stop(grace_s=0.3) == -signal.SIGKILL
    assert time.monotonic() - started < 5


@pytest.mark.netsim
def test_run_reports_failures_and_timeouts(small_network: Network) -> None:
    failing = [sys.executable, "-c", "import sys; sys.exit('broken on purpose')"]
    with pytest.raises(CommandFailed, match="broken on purpose"):
        small_network.run("laptop", failing)
    assert small_network.run("laptop", failing, check=False).returncode == 1
    started = time.monotonic()
    with pytest.raises(CommandFailed, match=r"killed after 0\.5 s"):
        small_network.run("laptop", ["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 5


@pytest.mark.netsim
def test_teardown_removes_everything_when_the_body_raises(
    run_namespaces: RunNamespaces, netsim_out: Path
) -> None:
    run_id = new_run_id()
    with (
        pytest.raises(RuntimeError, match="scenario broke"),
        build(SMALL, output_base=netsim_out, run_id=run_id) as net,
    ):
        sleeper = net.spawn("laptop", ["sleep", "60"])
        assert len(run_namespaces(run_id)) == len(net.plan.namespaces)
        assert runs.run_is_live(run_id)
        raise RuntimeError("scenario broke")
    assert run_namespaces(run_id) == []
    assert sleeper.returncode is not None
    assert not runs.run_is_live(run_id)
    with pytest.raises(Exception, match="torn down"):
        net.spawn("laptop", ["true"])


_BUILDER = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from netsim.build import build
    from netsim.topology import PublicHost, Topology

    # A shell starting us in the background may have set SIGINT to "ignore".
    signal.signal(signal.SIGINT, signal.default_int_handler)

    with build(Topology(public_hosts=(PublicHost("relay"),)), output_base=Path(sys.argv[2]),
               run_id=sys.argv[1]) as net:
        sleeper = net.spawn("relay", ["sleep", "60"])
        print("built", sleeper.pid, flush=True)
        time.sleep(60)
    """
)


def _start_builder(run_id: str, output: Path) -> tuple[subprocess.Popen[str], int]:
    builder = subprocess.Popen(
        [sys.executable, "-c", _BUILDER, run_id, str(output)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert builder.stdout is not None
    line = builder.stdout.readline()
    assert line.startswith("built"), line
    return builder, int(line.split()[1])


@pytest.mark.netsim
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_teardown_runs_on_sigterm_and_sigint(
    signum: signal.Signals, run_namespaces: RunNamespaces, netsim_out: Path
) -> None:
    run_id = new_run_id()
    builder, sleeper_pid = _start_builder(run_id, netsim_out)
    try:
        assert run_namespaces(run_id)
        builder.send_signal(signum)
        builder.wait(timeout=20)
    finally:
        if builder.poll() is None:
            builder.kill()
            builder.wait()
            netns.delete_namespaces(run_namespaces(run_id))
    assert builder.returncode != 0
    assert run_namespaces(run_id) == []
    assert not _alive(sleeper_pid)


@pytest.mark.netsim
def test_cleanup_removes_what_a_killed_run_left_and_keeps_live_runs(
    run_namespaces: RunNamespaces, netsim_out: Path
) -> None:
    crashed = new_run_id()
    builder, sleeper_pid = _start_builder(crashed, netsim_out)
    builder.kill()  # SIGKILL: no teardown runs
    builder.wait(timeout=10)
    assert run_namespaces(crashed), "SIGKILL should have left the namespaces behind"

    # A hand-made leftover too, with a process inside it.
    leaked = f"p2ps-{new_run_id()}-leak"
    netns.add_namespace(leaked)
    squatter = subprocess.Popen([*netns.exec_prefix(leaked), "sleep", "60"])

    live = new_run_id()
    try:
        with build(SMALL, output_base=netsim_out, run_id=live):
            completed = subprocess.run(
                python_module_argv("netsim", "cleanup"), capture_output=True, text=True, timeout=60
            )
            assert completed.returncode == 0, completed.stderr
            assert run_namespaces(live), "cleanup must not touch a run whose owner is alive"
            assert f"kept p2ps-{live}-" in completed.stdout
        squatter.wait(timeout=10)
    finally:
        # Whatever this test fails on, it leaves nothing of its own behind.
        netns.delete_namespaces([*run_namespaces(crashed), *run_namespaces(leaked.split("-")[1])])
        if squatter.poll() is None:
            squatter.kill()
            squatter.wait()
    assert run_namespaces(crashed) == []
    assert leaked not in netns.list_namespaces()
    assert f"removed {leaked}" in completed.stdout
    assert squatter.returncode == -signal.SIGKILL
    assert not _alive(sleeper_pid)
