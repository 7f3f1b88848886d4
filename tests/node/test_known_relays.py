"""A relay named by HOST:PORT alone: identified, pinned on first use, then held to its pin."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.errors import ConfigError
from p2psync.home import Home
from p2psync.known_relays import FILE_NAME, KnownRelays
from p2psync.net.endpoint import ConnectFailed, EndpointConfig, open_endpoint
from p2psync.net.tls import PeerIdentityMismatch
from p2psync.node import NodeOptions, StaticPeer, open_node

from .conftest import wait_until
from .test_relayed_sync import LOOPBACK, block_direct_paths, complete_keys, running_relay

ENDPOINT = EndpointConfig(bind_host="127.0.0.1")


async def test_identify_names_whoever_answers_and_refuses_ourselves() -> None:
    us, them = Identity.generate(os.urandom), Identity.generate(os.urandom)
    async with open_endpoint(us, ENDPOINT) as a, open_endpoint(them, ENDPOINT) as b:
        with trio.fail_after(10):
            assert await a.identify(b.local_address) == them.node_id
            with pytest.raises(PeerIdentityMismatch, match="our own NodeId"):
                await a.identify(a.local_address)
        assert all(not c._usable() for c in a._connections if c.is_dialer)  # closed at once
        # b is unharmed: a normal dial right after works.
        with trio.fail_after(10):
            conn = await a.connect(them.node_id, b.local_address)
            assert conn.their_node_id == them.node_id


async def test_identify_of_nobody_fails() -> None:
    config = EndpointConfig(bind_host="127.0.0.1", idle_timeout=0.5)
    quiet = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await quiet.bind(("127.0.0.1", 0))
    try:
        async with open_endpoint(Identity.generate(os.urandom), config) as a:
            with trio.fail_after(10), pytest.raises(ConnectFailed):
                await a.identify(quiet.getsockname())
    finally:
        quiet.close()


async def test_a_relay_by_host_port_is_pinned_on_first_use_and_carries_sync(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(120):
        async with running_relay() as relay:
            relay_text = f"{relay.udp.host}:{relay.udp.port}"  # no NodeId
            async with open_node(a_home, NodeOptions(listen=LOOPBACK, relay=relay_text)) as a:
                b_options = NodeOptions(
                    listen=LOOPBACK, relay=relay_text, peers=(StaticPeer(a.node_id, None),)
                )
                async with open_node(b_home, b_options) as b:
                    await a.put_bytes(b"through a relay we only named", key="pinned/note")
                    await wait_until(b, lambda: "pinned/note" in complete_keys(b))
                    status = b.status()
                    assert status["relay"]["relay"] == f"{relay.node_id}@{relay_text}"
                    assert status["relay"]["connected"] is True
                    # Tickets name the relay with its NodeId, never bare.
                    assert a.create_invite().relay == f"{relay.node_id}@{relay_text}"
    for home in (a_home, b_home):
        pinned = json.loads((home.path / FILE_NAME).read_text())
        assert pinned["relays"][relay_text]["node_id"] == str(relay.node_id)
        assert (home.path / FILE_NAME).stat().st_mode & 0o777 == 0o600


async def test_another_key_at_a_pinned_relay_address_is_refused_and_said(
    make_home: Callable[..., Home],
) -> None:
    home = make_home("a", GroupSecret.generate(os.urandom))
    with trio.fail_after(60):
        async with running_relay() as relay:
            address = (relay.udp.host, relay.udp.port)
            impostor_pin = Identity.generate(os.urandom).node_id
            KnownRelays(home.path).pin(address, impostor_pin, 0.0)
            options = NodeOptions(listen=LOOPBACK, relay=f"{address[0]}:{address[1]}")
            async with open_node(home, options) as node:
                await wait_until(
                    node, lambda: (node.status()["relay"] or {}).get("last_failure") is not None
                )
                status = node.status()["relay"]
                assert status["connected"] is False
                assert status["relay"].startswith(str(impostor_pin))
                assert "PeerIdentityMismatch" in status["last_failure"]


def test_a_damaged_pin_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    known = KnownRelays(tmp_path)
    known.path.write_text('{"version": 1, "relays": {"h:1": {"node_id": "not a node id"}}}')
    with pytest.raises(ConfigError, match=r"known_relays\.json is damaged"):
        known.get(("h", 1))
