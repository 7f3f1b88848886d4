"""A peer (or path) that stops answering a WANT must not stall a transfer for ever."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import trio

from p2psync import defaults
from p2psync.crypto.group import GroupSecret
from p2psync.home import Home
from p2psync.node import NodeOptions, PeerLink, StaticPeer, open_node

from .conftest import wait_until

LOOPBACK = ("127.0.0.1", 0)


async def test_an_object_reply_that_never_comes_is_asked_for_again(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    """a swallows b's first WANT (reads it, never answers, keeps the stream open): once no
    reply of the link moves for SYNC_OBJECT_STALL_TIMEOUT, b gives it up and asks again."""
    monkeypatch.setattr(defaults, "SYNC_OBJECT_STALL_TIMEOUT", 1.0)
    swallowed: list[Any] = []
    serve = PeerLink._serve_one

    async def swallow_the_first(self: PeerLink, stream: Any) -> None:
        if self.node is a and not swallowed:
            swallowed.append(stream)  # open, unanswered: a silent peer or a dead path
            return
        await serve(self, stream)

    monkeypatch.setattr(PeerLink, "_serve_one", swallow_the_first)
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    value = os.urandom(3 * defaults.CHUNK_SIZE + 5)  # 4 chunks + a manifest
    with trio.fail_after(60):
        async with open_node(a_home, NodeOptions(listen=LOOPBACK)) as a:
            await a.put_bytes(value, key="big")
            peer = StaticPeer(a.node_id, ("127.0.0.1", a.endpoint.local_address[1]))
            async with open_node(b_home, NodeOptions(listen=LOOPBACK, peers=(peer,))) as b:
                await wait_until(
                    b, lambda: any(s.key == "big" and s.complete for s in b.store.live())
                )
                assert await b.get_bytes("big") == value
                assert len(swallowed) == 1
                assert b.counters["objects_stalled"] == 1
