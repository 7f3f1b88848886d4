"""The endpoint's relay path under load: batched delivery and relay-sized packets.

Two real endpoints on loopback joined by an in-process relay that hands
every datagram queued for a node to ``Endpoint.receive_relayed_batch`` in
one call, as the relay client does with everything one stream read
completed (tests/net/test_relay_paths.py covers routing and disco).
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from p2psync.crypto.identity import Identity, NodeId
from p2psync.net.endpoint import (
    MAX_RELAYED_DATAGRAM_SIZE,
    Connection,
    Endpoint,
    EndpointConfig,
    open_endpoint,
)

# No hole punching: the loopback peers would find their direct path and leave the relay.
CONFIG = EndpointConfig(
    bind_host="127.0.0.1", disco_pong_wait=0.2, disco_ping_interval=0.05, hole_punching=False
)
PATH_SIZE = CONFIG.max_datagram_size


class BatchingRelay:
    """Queues datagrams per destination; delivers each queue in one batch."""

    def __init__(self) -> None:
        self.endpoints: dict[NodeId, Endpoint] = {}
        self.queues: dict[NodeId, deque[tuple[NodeId, bytes]]] = {}
        self.sizes: list[tuple[NodeId, int, bool]] = []  # (src, size, long header)
        self.batches: dict[NodeId, int] = {}  # batches delivered to each node
        self._wake = trio.Event()

    def attach(self, endpoint: Endpoint, datagram_size: Callable[[], int] | None) -> None:
        src = endpoint.node_id
        self.endpoints[src] = endpoint
        self.queues[src] = deque()
        self.batches[src] = 0

        def send(dst: NodeId, payload: bytes) -> bool:
            if dst not in self.queues:
                return False
            self.sizes.append((src, len(payload), bool(payload[0] & 0x80)))
            self.queues[dst].append((src, payload))
            self._wake.set()
            return True

        endpoint.set_relay(send, datagram_size=datagram_size)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(0.001)  # let a burst gather, as a stream read would
            for dst, queue in self.queues.items():
                if queue:
                    batch = list(queue)
                    queue.clear()
                    self.batches[dst] += 1
                    self.endpoints[dst].receive_relayed_batch(batch)

    def largest(self, src: NodeId, *, long_header: bool) -> int:
        return max(size for s, size, long in self.sizes if s == src and long == long_header)


@asynccontextmanager
async def relayed_pair(
    datagram_size: Callable[[], int] | None, config: EndpointConfig = CONFIG
) -> AsyncIterator[tuple[Endpoint, Endpoint, BatchingRelay]]:
    relay = BatchingRelay()
    async with (
        open_endpoint(Identity.generate(os.urandom), config) as a,
        open_endpoint(Identity.generate(os.urandom), config) as b,
        trio.open_nursery() as nursery,
    ):
        relay.attach(a, datagram_size)
        relay.attach(b, datagram_size)
        nursery.start_soon(relay.run)
        yield a, b, relay
        nursery.cancel_scope.cancel()


async def transfer(sender: Connection, receiver: Connection, payload: bytes) -> None:
    stream = await sender.open_stream()
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        incoming = await receiver.accept_stream()
        chunks = []
        while data := await incoming.receive_some():
            chunks.append(data)
        assert b"".join(chunks) == payload
    await stream.aclose()
    await incoming.aclose()


async def connected(a: Endpoint, b: Endpoint) -> tuple[Connection, Connection]:
    dialer = await a.connect(b.node_id, None)
    return dialer, await b.accept()


async def test_relayed_connections_send_relay_sized_packets_after_the_handshake() -> None:
    payload = random.Random(1).randbytes(2 * 1024 * 1024)
    async with relayed_pair(lambda: 8000) as (a, b, relay):
        with trio.fail_after(30):
            dialer, acceptor = await connected(a, b)
            await transfer(dialer, acceptor, payload)
        assert dialer.path == acceptor.path == "relay"
        # Handshake packets keep the path size (Initial padding, amplification limit) ...
        assert relay.largest(a.node_id, long_header=True) <= PATH_SIZE
        assert relay.largest(b.node_id, long_header=True) <= PATH_SIZE
        # ... then data rides in packets up to what the relay path takes.
        assert PATH_SIZE < relay.largest(a.node_id, long_header=False) <= 8000
        assert a.stats.relay_datagrams_sent < len(payload) // PATH_SIZE


async def test_relayed_packets_stay_within_what_aioquic_can_frame() -> None:
    # A relay allowing 64 KiB still gets packets of at most 16 KiB: aioquic
    # encodes STREAM frame lengths in 2 bytes, larger packets corrupt them.
    payload = random.Random(2).randbytes(2 * 1024 * 1024)
    async with relayed_pair(lambda: 64 * 1024) as (a, b, relay):
        with trio.fail_after(30):
            dialer, acceptor = await connected(a, b)
            await transfer(dialer, acceptor, payload)
            await transfer(acceptor, dialer, payload[:300_000])
        largest = relay.largest(a.node_id, long_header=False)
        assert PATH_SIZE < largest <= MAX_RELAYED_DATAGRAM_SIZE


async def test_without_a_relay_size_packets_keep_the_path_size() -> None:
    payload = random.Random(3).randbytes(512 * 1024)
    async with relayed_pair(None) as (a, b, relay):
        with trio.fail_after(30):
            dialer, acceptor = await connected(a, b)
            await transfer(dialer, acceptor, payload)
        assert relay.largest(a.node_id, long_header=False) <= PATH_SIZE


async def test_a_batch_is_fed_whole_before_the_receiver_answers() -> None:
    # The receiver transmits once per delivered batch (an ACK, maybe window
    # updates in the same flush), not once per datagram.
    payload = random.Random(4).randbytes(2 * 1024 * 1024)
    async with relayed_pair(None) as (a, b, relay):
        with trio.fail_after(30):
            dialer, acceptor = await connected(a, b)
            batches_before = relay.batches[b.node_id]
            sent_before = b.stats.relay_datagrams_sent
            await transfer(dialer, acceptor, payload)
        batches = relay.batches[b.node_id] - batches_before
        answers = b.stats.relay_datagrams_sent - sent_before
        received = b.stats.relay_datagrams_received
        assert received > len(payload) // PATH_SIZE
        assert batches < received / 4  # the fake relay did deliver in batches
        assert answers <= 2 * batches + 4


async def test_a_move_to_a_direct_path_brings_path_sized_packets_back() -> None:
    # With hole punching the loopback peers find their direct path while a
    # transfer runs over the relay; what goes direct must fit the path again.
    punching = dataclasses.replace(CONFIG, hole_punching=True)
    direct_sizes: list[int] = []
    payload = random.Random(5).randbytes(4 * 1024 * 1024)
    async with relayed_pair(lambda: MAX_RELAYED_DATAGRAM_SIZE, punching) as (a, b, _relay):
        send_run = a._send_run

        def spy(run: list[bytes], address: tuple[str, int], segment: int) -> None:
            direct_sizes.extend(len(datagram) for datagram in run)
            send_run(run, address, segment)

        setattr(a, "_send_run", spy)  # noqa: B010 -- instance override, to watch the socket
        with trio.fail_after(60):
            dialer, acceptor = await connected(a, b)
            await transfer(dialer, acceptor, payload)
            while dialer.path != "direct":  # noqa: ASYNC110 -- driver state, no event
                await trio.sleep(0.05)
            await transfer(dialer, acceptor, payload)
        assert dialer.path == "direct"
        assert len(direct_sizes) > len(payload) // PATH_SIZE  # the second transfer went direct
        assert max(direct_sizes) <= PATH_SIZE
