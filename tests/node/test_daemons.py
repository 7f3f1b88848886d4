"""Two `p2psync daemon` processes on one machine, driven through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def cli(home: Path, *argv: str, stdin: bytes | None = None) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "p2psync.cli", "--home", str(home), "--json", *argv],
        input=stdin,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout) if done.stdout.strip() else None


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    def __init__(self, home: Path, port: int, peer: str) -> None:
        self.home, self.port, self.peer = home, port, peer
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.home / "daemon.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2psync.cli", "--home", str(self.home), "daemon",
             "--listen", f"127.0.0.1:{self.port}", "--peer", self.peer, "--no-mdns"],
            stdout=log, stderr=log,
        )  # fmt: skip
        wait_for(lambda: (self.home / "control.sock").exists(), 15, "daemon socket")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def keys(home: Path) -> dict[str, str]:
    return {row["key"]: row["status"] for row in cli(home, "ls")}


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    a_home, b_home = tmp_path / "a", tmp_path / "b"
    a_id = cli(a_home, "init", "--name", "a")["node_id"]
    cli(a_home, "group", "create")
    b_id = cli(b_home, "init", "--name", "b")["node_id"]
    shutil.copy(a_home / "group.key", b_home / "group.key")  # pairing is tested elsewhere
    a_port, b_port = free_udp_port(), free_udp_port()
    a = Daemon(a_home, a_port, f"{b_id}@127.0.0.1:{b_port}")
    b = Daemon(b_home, b_port, f"{a_id}@127.0.0.1:{a_port}")
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        for daemon in (a, b):
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


def test_daemons_sync_both_ways_and_show_direct_paths(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    a, b = pair
    wait_for(lambda: [p["path"] for p in cli(a.home, "status")["peers"]] == ["direct"], 15,
             "a direct path")  # fmt: skip
    note = tmp_path / "note.txt"
    note.write_text("from a")
    cli(a.home, "put", str(note))
    took = wait_for(lambda: keys(b.home).get("note.txt") == "ok", 10, "note on b")
    cli(b.home, "put", "-", "--key", "from-b", stdin=b"from b via stdin")
    wait_for(lambda: keys(a.home).get("from-b") == "ok", 10, "stdin put on a")
    out = tmp_path / "copy.txt"
    cli(b.home, "get", "note.txt", "-o", str(out))
    assert out.read_text() == "from a"
    peers = cli(b.home, "status")["peers"]
    assert peers[0]["path"] == "direct" and peers[0]["address"] == f"127.0.0.1:{a.port}"
    assert took < 5, f"sync took {took:.2f}s"
    assert a.stop() == 0 and b.stop() == 0  # clean exit on SIGTERM


def test_killed_receiver_resumes_and_nothing_is_lost(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    a, b = pair
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    cli(a.home, "put", str(big))
    # Kill b (SIGKILL: no clean shutdown) as soon as the transfer is under way.
    wait_for(lambda: "big.bin" in keys(b.home), 15, "big.bin entry on b")
    b.stop(signal.SIGKILL)
    for i in range(20):
        cli(a.home, "put", "-", "--key", f"while-b-was-away/{i}", stdin=b"%d" % i)
    b.start()
    wait_for(
        lambda: keys(b.home).get("big.bin") == "ok" and len(keys(b.home)) == 21, 60, "catch-up"
    )
    copy = tmp_path / "copy.bin"
    cli(b.home, "get", "big.bin", "-o", str(copy))
    assert copy.read_bytes() == big.read_bytes()
