"""Two and three real nodes over loopback QUIC converge."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import trio

from p2psync.crypto.group import GroupSecret
from p2psync.home import Home
from p2psync.node import NodeOptions, StaticPeer, open_node

from .conftest import wait_until

LOOPBACK = ("127.0.0.1", 0)


def keys_of(node) -> set[str]:  # type: ignore[no-untyped-def]
    return {s.key or "" for s in node.store.live() if s.complete}


async def test_two_nodes_sync_both_ways(make_home: Callable[..., Home]) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(60):
        async with open_node(a_home, NodeOptions(listen=LOOPBACK)) as a:
            a_addr = ("127.0.0.1", a.endpoint.local_address[1])
            peer_a = StaticPeer(a.node_id, a_addr)
            async with open_node(b_home, NodeOptions(listen=LOOPBACK, peers=(peer_a,))) as b:
                await a.put_bytes(b"hello from a", key="notes/a")
                await b.put_bytes(os.urandom(64 * 1024 * 1024), key="blobs/b")
                await wait_until(b, lambda: "notes/a" in keys_of(b))
                await wait_until(a, lambda: "blobs/b" in keys_of(a))
                assert await b.get_bytes("notes/a") == b"hello from a"
                assert await a.get_bytes("blobs/b") == await b.get_bytes("blobs/b")
                status = b.status()
                assert [p["path"] for p in status["peers"]] == ["direct"]


async def test_line_of_three_gossips_through_the_middle(make_home: Callable[..., Home]) -> None:
    """A - B - C: A and C never connect; entries and blobs still reach C."""
    secret = GroupSecret.generate(os.urandom)
    homes = [make_home(n, secret) for n in "abc"]
    with trio.fail_after(60):
        async with open_node(homes[1], NodeOptions(listen=LOOPBACK)) as b:
            b_peer = StaticPeer(b.node_id, ("127.0.0.1", b.endpoint.local_address[1]))
            options = NodeOptions(listen=LOOPBACK, peers=(b_peer,))
            async with open_node(homes[0], options) as a, open_node(homes[2], options) as c:
                await wait_until(b, lambda: len(b.active) == 2)
                await a.put_bytes(b"from a to c", key="line/x")
                await a.put_bytes(os.urandom(2 * 1024 * 1024 + 3), key="line/big")
                await wait_until(c, lambda: {"line/x", "line/big"} <= keys_of(c))
                assert await c.get_bytes("line/x") == b"from a to c"
                assert await c.get_bytes("line/big") == await a.get_bytes("line/big")
                assert a.node_id not in c.active  # it really went through B
                await a.delete("line/x")
                await wait_until(c, lambda: "line/x" not in keys_of(c))


async def test_thousand_entries_both_ways_and_duplicate_dials(
    make_home: Callable[..., Home],
) -> None:
    """Both sides dial each other (one connection survives) and 2 x 1,000 entries converge."""
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(120):
        async with open_node(a_home, NodeOptions(listen=LOOPBACK)) as a:
            a_peer = StaticPeer(a.node_id, ("127.0.0.1", a.endpoint.local_address[1]))
            async with open_node(b_home, NodeOptions(listen=LOOPBACK, peers=(a_peer,))) as b:
                b_peer = StaticPeer(b.node_id, ("127.0.0.1", b.endpoint.local_address[1]))
                a.add_peer(b_peer)
                for i in range(1000):
                    await a.put_bytes(b"a%d" % i, key=f"a/{i}")
                    await b.put_bytes(b"b%d" % i, key=f"b/{i}")
                await wait_until(a, lambda: len(keys_of(a)) == 2000)
                await wait_until(b, lambda: len(keys_of(b)) == 2000)
                assert a.store.frontier() == b.store.frontier()
                await wait_until(a, lambda: len(a.links) == 1 and len(b.links) == 1)
                assert a.active[b.node_id].dialed == (a.node_id < b.node_id)


async def test_wrong_group_and_garbage_are_refused_and_the_node_keeps_serving(
    make_home: Callable[..., Home],
) -> None:
    import random

    from p2psync.net.endpoint import EndpointConfig, open_endpoint

    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    stranger_home = make_home("s", GroupSecret.generate(os.urandom))
    with trio.fail_after(60):
        async with open_node(a_home, NodeOptions(listen=LOOPBACK)) as a:
            a_peer = StaticPeer(a.node_id, ("127.0.0.1", a.endpoint.local_address[1]))
            options = NodeOptions(listen=LOOPBACK, peers=(a_peer,))
            async with open_node(stranger_home, options) as stranger:
                await wait_until(
                    stranger,
                    lambda: (
                        a.node_id in stranger.peer_info
                        and "wrong-group" in (stranger.peer_info[a.node_id].last_error or "")
                    ),
                )
                assert a.node_id not in stranger.active and stranger.node_id not in a.active
            # A raw QUIC client that sends garbage on the control stream.
            rng = random.Random(5)
            garbage_identity = make_home("g", None).load_identity()
            config = EndpointConfig(bind_host="127.0.0.1")
            async with open_endpoint(garbage_identity, config) as raw:
                for _ in range(3):
                    conn = await raw.connect(a.node_id, a_peer.address)
                    stream = await conn.open_stream()
                    await stream.send_all(rng.randbytes(rng.randrange(1, 5000)))
                    await stream.send_eof()
                    # The node closes this connection; we only read until it does.
                    with trio.move_on_after(5), contextlib.suppress(trio.BrokenResourceError):
                        while await stream.receive_some(65536):
                            pass
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await conn.aclose()
            # The node still serves its group: a member syncs normally.
            async with open_node(b_home, options) as b:
                await a.put_bytes(b"still here", key="alive")
                await wait_until(b, lambda: "alive" in keys_of(b))
            assert a.counters["protocol_violations"] >= 1
