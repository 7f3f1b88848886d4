"""Two nodes that cannot reach each other directly sync through a real relayd."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.errors import ConfigError
from p2psync.home import Home, parse_config_untrusted
from p2psync.node import Node, NodeOptions, StaticPeer, open_node
from p2psync.proto.relay import RelayErrorCode
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses, serve

from .conftest import wait_until

LOOPBACK = ("127.0.0.1", 0)


@asynccontextmanager
async def running_relay() -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(listen=HostPort("127.0.0.1", 0), http=HostPort("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


async def relay_metrics(relay: RelaydAddresses) -> dict[str, float]:
    """relayd's /metrics samples, by series name with labels."""
    stream = await trio.open_tcp_stream(relay.http.host, relay.http.port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    body = bytes(data).partition(b"\r\n\r\n")[2].decode()
    samples = (line.rsplit(" ", 1) for line in body.splitlines())
    return {name: float(value) for name, value in samples if not name.startswith("#")}


def block_direct_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """No path table ever learns a direct address (no hole punching): only the relay remains."""
    from p2psync.net import endpoint

    relay_only = partial(endpoint.EndpointConfig, hole_punching=False)
    monkeypatch.setattr("p2psync.node.EndpointConfig", relay_only)


def complete_keys(node: Node) -> set[str]:
    return {s.key or "" for s in node.store.live() if s.complete}


async def test_sync_through_relayd_only(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(120):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            a_options = NodeOptions(listen=LOOPBACK, relay=relay_text)
            async with open_node(a_home, a_options) as a:
                # b knows only a's NodeId: no address at all.
                b_options = NodeOptions(
                    listen=LOOPBACK, relay=relay_text, peers=(StaticPeer(a.node_id, None),)
                )
                async with open_node(b_home, b_options) as b:
                    big = os.urandom(16 * 1024 * 1024)
                    await a.put_bytes(big, key="via-relay/big")
                    await b.put_bytes(b"hello from b", key="via-relay/note")
                    await wait_until(a, lambda: "via-relay/note" in complete_keys(a))
                    await wait_until(b, lambda: "via-relay/big" in complete_keys(b))
                    assert await b.get_bytes("via-relay/big") == big
                    status = b.status()
                    assert [p["path"] for p in status["peers"]] == ["relay"]
                    assert status["relay"]["connected"] is True
                    assert status["relay"]["relayed_bytes_received"] > len(big)
                    assert a.endpoint.stats.datagrams_sent > 0
                    # The UDP fast path carried the blob, not the relay stream.
                    assert status["relay"]["fast_path"] is True
                    assert status["relay"]["fast_path_bytes_received"] > len(big)
                    samples = await relay_metrics(relay)
                    forwarded = samples["relayd_fast_path_bytes_forwarded_total"]
                    assert forwarded > len(big)
                    assert forwarded >= 0.95 * samples["relayd_relayed_bytes_total"]
                    assert samples["relayd_fast_path_nodes"] == 2


# --- the relay's access token: config key, daemon flag, status ----------------------------

_RELAYD_READY = re.compile(
    r"relayd ready: udp=(?P<host>[\d.]+):(?P<port>\d+) .*? relay=(?P<id>\S+)"
)


def _cli(home: Path, *argv: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "p2psync.cli", "--home", str(home), "--json", *argv],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout) if done.stdout.strip() else None


def _wait_for(what: str, check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


@contextmanager
def _processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start processes (stderr to a log file); all are stopped when the block ends."""
    started: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            started.append(subprocess.Popen(argv, stdout=out, stderr=out))
        return started[-1]

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _relay_status(home: Path) -> dict[str, Any] | None:
    try:
        status: dict[str, Any] = _cli(home, "status")
    except AssertionError:  # the daemon's socket is not up yet
        return None
    return status.get("relay")


def test_daemon_presents_the_relay_token_from_config_or_flag(tmp_path: Path) -> None:
    secret_file = _private_file(tmp_path / "relayd.token", "s3cret-shared-token\n")
    homes = {name: tmp_path / name for name in ("a", "b")}
    for home in homes.values():
        _cli(home, "init")
        _cli(home, "group", "create")
    # a: the token file named in config.toml (relative to the home directory).
    _private_file(homes["a"] / "relay.token", "s3cret-shared-token")
    with (homes["a"] / "config.toml").open("a") as config:
        config.write('relay_token_file = "relay.token"\n')
    with _processes() as start:
        relayd_log = tmp_path / "relayd.log"
        start([sys.executable, "-m", "relayd", "--listen", "127.0.0.1:0", "--http",
               "127.0.0.1:0", "--access-token-file", str(secret_file)], relayd_log)  # fmt: skip
        ready = _wait_for("relayd ready", lambda: _RELAYD_READY.search(relayd_log.read_text()))
        relay = f"{ready['id']}@{ready['host']}:{ready['port']}"

        def daemon(name: str, *flags: str) -> subprocess.Popen[bytes]:
            return start([sys.executable, "-m", "p2psync.cli", "--home", str(homes[name]),
                          "daemon", "--listen", "127.0.0.1:0", "--relay", relay, "--no-mdns",
                          *flags], homes[name] / "daemon.log")  # fmt: skip

        daemon("a")
        status = _wait_for(
            "a on the relay", lambda: (s := _relay_status(homes["a"])) and s["connected"] and s
        )
        assert status["last_error"] is None
        # b has no token: refused, and status says why (the relay's ERROR code).
        b = daemon("b")
        status = _wait_for(
            "b refused", lambda: (s := _relay_status(homes["b"])) and s["last_error"] and s
        )
        assert status["connected"] is False
        assert status["last_error_code"] == RelayErrorCode.BAD_AUTH
        assert status["last_error"].startswith("BAD_AUTH: ")
        b.terminate()
        assert b.wait(15) == 0
        # With the flag (a file outside the home), b gets in.
        daemon("b", "--relay-token-file", str(secret_file))
        _wait_for("b on the relay", lambda: (s := _relay_status(homes["b"])) and s["connected"])
        assert "s3cret" not in (homes["b"] / "daemon.log").read_text()
        assert "s3cret" not in relayd_log.read_text()


def test_relay_token_file_config_key(tmp_path: Path) -> None:
    home = Home(tmp_path / "h")
    home.init(os.urandom, name="h")
    assert home.relay_token() is None
    home.config_file.write_text('name = "h"\nrelay_token_file = "tok"\n')
    with pytest.raises(ConfigError, match=r"relay_token_file: .*tok: cannot read"):
        home.relay_token()
    _private_file(home.path / "tok", "  token with spaces inside \n")
    assert home.relay_token() == b"token with spaces inside"
    home.add_peer(f"{Identity.generate(os.urandom).node_id}@127.0.0.1:1")  # rewrites config
    assert home.load_config().relay_token_file == "tok"
    flag_file = _private_file(tmp_path / "flag.token", "from-the-flag")
    assert home.relay_token(flag_file) == b"from-the-flag"  # the flag wins over config
    for bad, why in (("\n", "empty"), ("a\nb", "printable"), ("x" * 300, "at most 256")):
        _private_file(flag_file, bad)
        with pytest.raises(ConfigError, match=why):
            home.relay_token(flag_file)
    with pytest.raises(ConfigError, match="relay_token_file"):
        parse_config_untrusted("relay_token_file = 5\n", "config.toml")
