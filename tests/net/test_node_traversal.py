"""Two real nodes and a real relayd on loopback: direct paths end to end, status, doctor.

b knows only a's NodeId; it learns a's addresses from relayd (LOOKUP) and a
learns b's from b's pings or CALL_ME_MAYBE. The background netcheck runs
against relayd's two STUN ports. (mDNS is off by default in NodeOptions.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from p2psync.crypto.group import GroupSecret
from p2psync.doctor import diagnose, find_peer, format_doctor
from p2psync.home import Home
from p2psync.node import Node, NodeOptions, StaticPeer, open_node
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses, serve

LOOPBACK = ("127.0.0.1", 0)


@asynccontextmanager
async def running_relay() -> AsyncIterator[RelaydAddresses]:
    # The second STUN port must be the main port + 1 (the daemon's default guess).
    for _ in range(20):
        with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as probe:
            await probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = RelaydConfig(
            listen=HostPort("127.0.0.1", port),
            http=HostPort("127.0.0.1", 0),
            stun_alt_port=port + 1,
        )
        try:
            async with trio.open_nursery() as nursery:
                addresses: RelaydAddresses = await nursery.start(partial(serve, config))
                yield addresses
                nursery.cancel_scope.cancel()
            return
        except OSError:  # port + 1 was taken: try another pair
            continue
    raise AssertionError("no free pair of UDP ports")


def make_home(root: Path, name: str, secret: GroupSecret) -> Home:
    home = Home(root / name)
    home.init(os.urandom, name=name)
    home.save_secret(secret)
    return home


async def eventually(check: object) -> None:
    """Poll ``check`` (the caller bounds the time): status has no event to wait on."""
    assert callable(check)
    while not check():  # noqa: ASYNC110 -- polling status on purpose
        await trio.sleep(0.05)


def cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2psync.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def peer_row(node: Node) -> dict[str, object]:
    (row,) = node.status()["peers"]
    return row


async def test_nodes_go_direct_through_call_me_maybe_and_explain_it(tmp_path: Path) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home(tmp_path, "a", secret), make_home(tmp_path, "b", secret)
    with trio.fail_after(90):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            a_options = NodeOptions(listen=LOOPBACK, relay=relay_text, control=True)
            async with open_node(a_home, a_options) as a:
                b_options = NodeOptions(
                    listen=LOOPBACK, relay=relay_text, peers=(StaticPeer(a.node_id, None),)
                )
                async with open_node(b_home, b_options) as b:
                    await eventually(lambda: b.active and peer_row(b)["path"] == "direct")
                    await b.put_bytes(os.urandom(300_000), key="over/direct")
                    await eventually(lambda: a.netcheck is not None and b.netcheck is not None)
                    state = b.status()
                    row = find_peer(state, str(a.node_id)[:10])
                    assert row["path_since"] is not None
                    traversal = row["traversal"]
                    assert isinstance(traversal, dict)
                    assert traversal["first_direct_at"] is not None
                    assert traversal["relay_bytes_after_direct"] < 5000
                    assert any(c["state"] == "validated" for c in traversal["candidates"])
                    nat = state["nat"]
                    assert nat["netcheck"]["answered"] == ["main", "alt"]
                    assert nat["netcheck"]["nat"] == "none"  # loopback: no translation
                    assert a.status()["nat"]["nat"] == "none"
                    report = diagnose(state, row)
                    assert report["verdict"].startswith("direct since ")
                    text = format_doctor(report)
                    assert "validated" in text and f"their NAT {report['their_nat']}" in text
                    # The same through the CLI and a's control socket.
                    doctor = await trio.to_thread.run_sync(
                        cli, "--home", str(a_home.path), "doctor", str(b.node_id)[:8], "--json"
                    )
                    assert doctor.returncode == 0, doctor.stderr
                    seen = json.loads(doctor.stdout)
                    assert seen["path"] == "direct" and seen["verdict"].startswith("direct since")
                    human = await trio.to_thread.run_sync(
                        cli, "--home", str(a_home.path), "doctor", str(b.node_id)
                    )
                    assert "candidates tried:" in human.stdout and "validated" in human.stdout
                    unknown = await trio.to_thread.run_sync(
                        cli, "--home", str(a_home.path), "doctor", "zzzz"
                    )
                    assert unknown.returncode == 1 and "knows no peer" in unknown.stderr


async def test_netcheck_command(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running_relay() as relay:
            where = f"{relay.udp.host}:{relay.udp.port}"
            done = await trio.to_thread.run_sync(cli, "netcheck", "--relay", where, "--json")
            assert done.returncode == 0, done.stderr
            report = json.loads(done.stdout)
            assert report["answered"] == ["main", "alt"]
            assert report["nat"] in ("none", "easy")  # a wildcard socket, seen from loopback
            human = await trio.to_thread.run_sync(cli, "netcheck", "--relay", where)
            assert "NAT " in human.stdout and "=>" in human.stdout
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as quiet:
        await quiet.bind(("127.0.0.1", 0))
        port = quiet.getsockname()[1]
        silent = await trio.to_thread.run_sync(
            cli, "netcheck", "--relay", f"127.0.0.1:{port}", "--alt-port", str(port)
        )
    assert silent.returncode == 1
    assert "UDP seems blocked" in silent.stdout
    home = tmp_path / "nohome"
    no_relay = await trio.to_thread.run_sync(cli, "--home", str(home), "netcheck")
    assert no_relay.returncode == 1 and "--relay" in no_relay.stderr
