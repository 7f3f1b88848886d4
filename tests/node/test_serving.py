"""Object serving writes a bounded number of replies at once (SYNC_SERVE_STREAMS).

aioquic visits every stream with unsent data for every packet it builds, so
a node answers a peer's WANTs a few at a time: a reply hands its turn on
once fewer than SYNC_SERVE_HANDOFF of its bytes are still unsent
(``Stream.wait_unsent_below``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from p2psync import defaults
from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.home import Home
from p2psync.net import endpoint as endpoint_module
from p2psync.net.endpoint import ConnectionLost, EndpointConfig, open_endpoint
from p2psync.node import NodeOptions, StaticPeer, open_node

from .conftest import wait_until

LOOPBACK = ("127.0.0.1", 0)
MiB = 1024 * 1024


async def test_replies_are_written_a_few_at_a_time(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    writing = 0
    peak = 0
    send_all = endpoint_module.Stream.send_all
    wait_unsent_below = endpoint_module.Stream.wait_unsent_below

    async def counting_send_all(self: Any, data: Any) -> None:
        nonlocal writing, peak
        if len(data) >= defaults.SYNC_SERVE_HANDOFF:  # an object reply
            writing += 1
            peak = max(peak, writing)
        await send_all(self, data)

    async def counting_wait(self: Any, limit: int) -> None:
        nonlocal writing
        try:
            await wait_unsent_below(self, limit)
        finally:
            writing -= 1

    monkeypatch.setattr(endpoint_module.Stream, "send_all", counting_send_all)
    monkeypatch.setattr(endpoint_module.Stream, "wait_unsent_below", counting_wait)
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    data = os.urandom(12 * MiB + 5)
    with trio.fail_after(120):
        async with open_node(a_home, NodeOptions(listen=LOOPBACK)) as a:
            await a.put_bytes(data, key="big")
            peer_a = StaticPeer(a.node_id, ("127.0.0.1", a.endpoint.local_address[1]))
            async with open_node(b_home, NodeOptions(listen=LOOPBACK, peers=(peer_a,))) as b:

                def complete() -> bool:
                    head = b.store.head("big")
                    return head is not None and head.complete

                await wait_until(b, complete)
                assert await b.get_bytes("big") == data
    assert defaults.SYNC_OBJECT_WINDOW > defaults.SYNC_SERVE_STREAMS  # B asked for more
    assert 1 <= peak <= defaults.SYNC_SERVE_STREAMS
    assert writing == 0


async def test_wait_unsent_below_returns_when_sent_and_raises_when_lost() -> None:
    config = EndpointConfig(bind_host="127.0.0.1")
    async with (
        open_endpoint(Identity.generate(os.urandom), config) as a,
        open_endpoint(Identity.generate(os.urandom), config) as b,
    ):
        with trio.fail_after(30):
            conn = await a.connect(b.node_id, b.local_address)
            their_conn = await b.accept()
            stream = await conn.open_stream()
            await stream.send_all(os.urandom(MiB))
            await stream.send_eof()
            their_stream = await their_conn.accept_stream()
            received = 0

            async def read_all() -> None:
                nonlocal received
                while data := await their_stream.receive_some():
                    received += len(data)

            await stream.wait_unsent_below(1)  # all of it in packets (the peer's window fits it)
            assert stream._unsent() == 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
            assert received == MiB

            # More than the peer's stream window: it never reads, so some of
            # it stays unsent whatever the timing.
            second = await conn.open_stream()

            async def send_too_much() -> None:
                with contextlib.suppress(ConnectionLost):
                    await second.send_all(os.urandom(config.stream_receive_window + MiB))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_too_much)
                await trio.testing.wait_all_tasks_blocked()  # its first MiB is queued
                await their_conn.aclose()  # the peer goes away mid-transfer
                with pytest.raises(ConnectionLost):
                    await second.wait_unsent_below(1)
