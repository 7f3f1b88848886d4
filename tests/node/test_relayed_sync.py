"""Two nodes that cannot reach each other directly sync through a real relayd."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from p2psync.crypto.group import GroupSecret
from p2psync.home import Home
from p2psync.node import Node, NodeOptions, StaticPeer, open_node
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


def block_direct_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's path table never learns a direct address: only the relay remains."""
    from p2psync.net.endpoint import Endpoint

    monkeypatch.setattr(Endpoint, "add_candidate", lambda self, node_id, address: None)


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
