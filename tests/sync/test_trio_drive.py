"""The session driven the way a trio shell must drive it (memory streams, not QUIC).

This is the usage pattern of the module docstring, executed: one task per
connection reads the control stream, feeds the session, flushes
``data_to_send()``, handles events, and honours ``get_timer()``. Object
streams are memory stream pairs served by ``answer_want_untrusted``.
"""

from __future__ import annotations

import os
import random

import trio
import trio.testing

from p2psync import defaults
from p2psync.proto.messages import FrameDecoder, Role
from p2psync.sync.events import EntriesReceived, ObjectWanted, SessionClosed
from p2psync.sync.object_stream import (
    WANT_MAX_FRAME,
    answer_want_untrusted,
    decode_object_response_untrusted,
    want_frame,
)
from p2psync.sync.session import SyncSession

WALL_MS = 1_800_000_000_000


async def read_frame(stream: trio.abc.ReceiveStream, max_frame: int) -> bytes | None:
    decoder = FrameDecoder(max_frame)
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(65536)
        if not data:
            return None
        decoder.feed(data)
    return frame


async def serve_object_stream(stream: trio.abc.Stream, store) -> None:
    """Serving side of one object stream: read WANT, answer, finish."""
    async with stream:
        request = await read_frame(stream, WANT_MAX_FRAME)
        if request is not None:
            await stream.send_all(answer_want_untrusted(store, request))


class ShellConnection:
    """One connection's task: read, feed, flush, handle events, re-arm the timer."""

    def __init__(self, session, control, peer_store, nursery, log) -> None:
        self.session = session
        self.control = control
        self.peer_store = peer_store
        self.nursery = nursery
        self.log = log
        self.send_lock = trio.Lock()

    async def flush(self) -> None:
        async with self.send_lock:
            while out := self.session.data_to_send():
                await self.control.send_all(out)

    async def after_input(self) -> None:
        """After every input or API call: flush bytes, then act on events."""
        await self.flush()
        while (event := self.session.next_event()) is not None:
            self.log.append(event)
            if isinstance(event, ObjectWanted):
                self.nursery.start_soon(self.fetch, event.oid)
            elif isinstance(event, SessionClosed):
                await self.flush()
                await self.control.aclose()

    async def fetch(self, oid: bytes) -> None:
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(serve_object_stream, theirs, self.peer_store)
        async with ours:
            await ours.send_all(want_frame(oid))
            body = await read_frame(ours, defaults.SYNC_MAX_OBJECT_FRAME)
        sealed = None if body is None else decode_object_response_untrusted(oid, body)
        if sealed is None:
            self.session.object_failed(oid, trio.current_time())
        else:
            self.session.object_received(oid, sealed, trio.current_time())
        await self.after_input()

    async def run(self) -> None:
        session = self.session
        session.start(trio.current_time())
        await self.after_input()
        while not session.closed:
            deadline = session.get_timer()
            with trio.move_on_at(deadline if deadline is not None else float("inf")):
                try:
                    data = await self.control.receive_some(65536)
                except trio.ClosedResourceError:
                    return
                if not data:
                    session.connection_lost(0, "stream ended")
                    await self.after_input()
                    return
                session.receive_control(data, trio.current_time())
                await self.after_input()
                continue
            session.handle_timer(trio.current_time())
            await self.after_input()


async def wait_until(predicate) -> None:
    """Poll ``predicate``; callers bound it with ``trio.fail_after``."""
    for _ in range(10_000_000):
        if predicate():
            return
        await trio.sleep(0.01)


async def test_trio_shell_pattern_syncs_and_runs_anti_entropy(make_node, kit, autojump_clock):
    a, b = make_node("a"), make_node("b")
    data = random.Random(3).randbytes(3 * defaults.CHUNK_SIZE)
    a.put("big", data)
    a.put_many(50, "a")
    b.put_many(50, "b")

    def session(node, role, expected=None):
        return SyncSession(
            identity=node.store.identity,
            keyring=node.store.keyring,
            store=node.store,
            role=role,
            random_bytes=os.urandom,
            wall_clock_ms=lambda: WALL_MS,
            expected_their_node=expected,
        )

    dialer = session(a, Role.DIALER, b.node_id)
    acceptor = session(b, Role.ACCEPTOR)
    log_a: list[object] = []
    log_b: list[object] = []
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        shell_a = ShellConnection(dialer, left, b.store, nursery, log_a)
        shell_b = ShellConnection(acceptor, right, a.store, nursery, log_b)
        nursery.start_soon(shell_a.run)
        nursery.start_soon(shell_b.run)
        with trio.fail_after(30):
            await wait_until(lambda: not b.store.wanted_blobs() and len(b.store.live()) == 101)
        assert kit.contents(b.store)["big"] == data
        assert kit.contents(a.store) == kit.contents(b.store)
        # A write nobody announces is repaired by the next anti-entropy round.
        before = trio.current_time()
        a.put("quiet", b"q")
        with trio.fail_after(defaults.SYNC_ANTI_ENTROPY_INTERVAL + 5):
            await wait_until(
                lambda: b.store.head("quiet") is not None and not b.store.wanted_blobs()
            )
        assert trio.current_time() - before >= 1  # it took a timer, not gossip
        dialer.close()  # an API call: the shell flushes after it like after any input
        await shell_a.after_input()
        with trio.fail_after(5):
            await wait_until(lambda: acceptor.closed)
        assert acceptor.close_code == 0
    assert sum(isinstance(e, EntriesReceived) for e in log_b) >= 1
    assert any(isinstance(e, SessionClosed) and e.by_peer for e in log_b)
