"""Processes inside network namespaces: start, wait for, stop, log.

Scenarios run relayd, p2psync daemons, CLI commands and probes as real
processes in the namespace of a host. Normally reached through
:class:`netsim.build.Network` (``net.spawn(host, argv)``, ``net.run(host,
argv)``); this module is the machinery underneath:

- :meth:`ProcessSupervisor.spawn` starts a long-running process with
  ``ip netns exec``, stdin closed, stdout and stderr written to
  ``<output dir>/<name>.out.log`` and ``<name>.err.log``. It runs in its own
  session (process group), so stopping it also stops its children.
- :meth:`ProcessSupervisor.run` runs a command to completion with a timeout
  and returns a ``CompletedProcess`` (output captured and also logged).
- :meth:`Proc.stop` sends SIGTERM to the process group, then SIGKILL after
  a grace period; :meth:`ProcessSupervisor.stop_all` does that for every
  process still running (teardown calls it before deleting namespaces,
  which also kills any stray process left inside).
- :func:`wait_until` polls a predicate until a deadline.

Every spawned Python gets ``PYTHONUNBUFFERED=1`` so its log files fill as
it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from netsim import netns
from netsim.errors import CommandFailed, WaitTimeout

DEFAULT_STOP_GRACE_S = 3.0
"""SIGTERM first; a daemon that has not exited after this gets SIGKILL."""
DEFAULT_RUN_TIMEOUT_S = 30.0
"""A CLI command in a scenario that takes longer than this is stuck."""
POLL_INTERVAL_S = 0.05


def python_module_argv(module: str, *arguments: str) -> list[str]:
    """argv that runs ``python -m module arguments`` with this interpreter (venv)."""
    return [sys.executable, "-m", module, *arguments]


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = POLL_INTERVAL_S,
) -> None:
    """Poll ``predicate`` until it returns True; raise WaitTimeout after ``timeout`` s.

    ``what`` names the awaited condition for the error message.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{what}: not true after {timeout:g} s")
        time.sleep(interval)


class Proc:
    """One process started in a namespace by :meth:`ProcessSupervisor.spawn`."""

    def __init__(
        self,
        *,
        name: str,
        namespace: str,
        argv: Sequence[str],
        stdout_path: Path,
        stderr_path: Path,
        popen: subprocess.Popen[bytes],
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.argv = tuple(argv)
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self._popen = popen

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} in {self.namespace} rc={self.returncode}>"

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """None while running, else the exit status (negative: killed by signal)."""
        return self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen.poll() is None

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; raise WaitTimeout if it does not."""
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.name} still running after {timeout:g} s") from None

    def wait_for_output(self, text: str, *, timeout: float) -> None:
        """Wait until ``text`` appears in stdout; fail early if the process exits."""

        def appeared() -> bool:
            if text in self.stdout_text():
                return True
            if not self.running:
                raise CommandFailed(
                    list(self.argv),
                    self.returncode if self.returncode is not None else -1,
                    f"exited before printing {text!r}; stderr: {self.stderr_text()[-2000:]}",
                )
            return False

        wait_until(appeared, timeout=timeout, what=f"{self.name} printing {text!r}")

    def stop(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> int:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; return the exit status.

        A process that already exited by itself is left alone (its children,
        if any, die with the namespace at teardown).
        """
        if not self.running:
            return self._popen.wait()
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=grace_s)
        # Children that outlived their parent are in the group too.
        self._signal_group(signal.SIGKILL)
        return self._popen.wait()

    def _signal_group(self, signum: int) -> None:
        # The process leads its own session, so its pgid is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signum)


class ProcessSupervisor:
    """Starts processes in namespaces, names their logs, stops them all at the end."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = output_dir
        self._procs: list[Proc] = []
        self._used_names: set[str] = set()

    @property
    def procs(self) -> tuple[Proc, ...]:
        return tuple(self._procs)

    def spawn(
        self,
        namespace: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> Proc:
        """Start ``argv`` in ``namespace``; it runs until it exits or is stopped."""
        unique_name = self._unique_name(name or Path(argv[0]).name)
        stdout_path = self.output_dir / f"{unique_name}.out.log"
        stderr_path = self.output_dir / f"{unique_name}.err.log"
        with stdout_path.open("wb") as stdout_file, stderr_path.open("wb") as stderr_file:
            popen = subprocess.Popen(
                [*netns.exec_prefix(namespace), *argv],
                stdin=subprocess.DEVNULL,
                stdout=stdout_file,
                stderr=stderr_file,
                env=_environment(env),
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(
            name=unique_name,
            namespace=namespace,
            argv=argv,
            stdout_path=stdout_path,
            stderr_path=stderr_path,
            popen=popen,
        )
        self._procs.append(proc)
        return proc

    def run(
        self,
        namespace: str,
        argv: Sequence[str],
        *,
        name: str | None = None,
        timeout: float = DEFAULT_RUN_TIMEOUT_S,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        input_text: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``namespace`` to completion; output captured and logged.

        Raises CommandFailed (with stderr) on a non-zero exit when ``check``,
        and when the command outlives ``timeout`` (it is killed first).
        """
        unique_name = self._unique_name(name or Path(argv[0]).name)
        full_argv = [*netns.exec_prefix(namespace), *argv]
        popen = subprocess.Popen(
            full_argv,
            stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(env),
            cwd=cwd,
            start_new_session=True,
            text=True,
        )
        try:
            stdout, stderr = popen.communicate(input_text, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            self._write_logs(unique_name, stdout, stderr)
            raise CommandFailed(
                list(argv), -1, f"killed after {timeout:g} s; stderr: {stderr[-2000:]}"
            ) from None
        self._write_logs(unique_name, stdout, stderr)
        if check and popen.returncode != 0:
            raise CommandFailed(list(argv), popen.returncode, stderr)
        return subprocess.CompletedProcess(list(argv), popen.returncode, stdout, stderr)

    def stop_all(self, grace_s: float = DEFAULT_STOP_GRACE_S) -> None:
        """Stop every process still running: SIGTERM to all first, then SIGKILL."""
        running = [proc for proc in self._procs if proc.running]
        for proc in running:
            proc._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in running:
            with contextlib.suppress(WaitTimeout):
                proc.wait(max(0.0, deadline - time.monotonic()))
            # Whatever is left of the group (or the process itself) gets SIGKILL.
            proc._signal_group(signal.SIGKILL)
            proc.wait(DEFAULT_STOP_GRACE_S)

    def _unique_name(self, wanted: str) -> str:
        base = "".join(c if c.isalnum() or c in "-_." else "_" for c in wanted) or "proc"
        name, counter = base, 1
        while name in self._used_names:
            counter += 1
            name = f"{base}-{counter}"
        self._used_names.add(name)
        return name

    def _write_logs(self, name: str, stdout: str, stderr: str) -> None:
        (self.output_dir / f"{name}.out.log").write_text(stdout)
        (self.output_dir / f"{name}.err.log").write_text(stderr)


def _environment(overrides: Mapping[str, str] | None) -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONUNBUFFERED"] = "1"
    if overrides:
        environment.update(overrides)
    return environment
