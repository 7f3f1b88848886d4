"""What the benchmarks share: deadlines, child processes' plumbing, reports.

Benchmarks run each side in its own process (``python -m netsim.bench
_child ...``) so CPU and RSS are per side; these helpers are the common
parts of ``netsim.bench`` and ``netsim.bench_relay``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

MiB = 1024 * 1024


class BenchFailed(Exception):
    pass


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise BenchFailed(f"the benchmark exceeded --timeout {self.seconds:.0f}s")
        return left


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent goes (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before we asked
        os._exit(1)


def emit(**fields: Any) -> None:
    """A child's reply: one JSON line on stdout."""
    print(json.dumps(fields), flush=True)


def on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: children, work dir


def log_tail(path: Path, lines: int = 20) -> str:
    """The end of a child's stderr log, for error messages."""
    with contextlib.suppress(OSError):
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        if tail:
            return "; its stderr ends:\n  " + "\n  ".join(tail)
    return ""


def make_homes(workdir: Path, names: tuple[str, ...] = ("a", "b")) -> list[Path]:
    """Device homes in one group (the group secret copied, not paired)."""
    from p2psync.crypto.group import GroupSecret
    from p2psync.home import Home

    secret = GroupSecret.generate(os.urandom)
    paths = []
    for name in names:
        home = Home(workdir / name)
        home.init(os.urandom, name=name)
        home.save_secret(secret)
        paths.append(home.path)
    return paths


def random_file(path: Path, size_mib: int) -> str:
    """Write ``size_mib`` MiB of random bytes; return their SHA-256."""
    sha = hashlib.sha256()
    with path.open("wb") as handle:
        for _ in range(size_mib):
            block = os.urandom(MiB)
            sha.update(block)
            handle.write(block)
    return sha.hexdigest()


def print_report(report: dict[str, Any]) -> None:
    width = max(len(k) for k in report)
    for key, value in report.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            print(f"{key}:")
            for item in value:
                print(f"  {json.dumps(item)}")
        else:
            print(f"{key:<{width}}  {value}")
