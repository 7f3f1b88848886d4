"""Relay paths under QUIC: the path table (sans-IO, stepped clock) and two
real endpoints joined by an in-process fake relay (bounded queues)."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio

from p2psync.crypto.identity import Identity, NodeId
from p2psync.net.endpoint import (
    ConnectFailed,
    Connection,
    Endpoint,
    EndpointConfig,
    open_endpoint,
)
from p2psync.net.paths import RELAY, PathTable, is_virtual
from p2psync.net.tls import PeerIdentityMismatch

A = ("192.0.2.1", 1000)
B = ("198.51.100.2", 2000)
TX = b"t" * 12

# Short disco waits: a dial to a dead address falls back to the relay quickly. No
# hole punching: only the addresses a test gives are used (tests/net/test_punching.py
# covers CALL_ME_MAYBE).
CONFIG = EndpointConfig(
    bind_host="127.0.0.1", disco_pong_wait=0.2, disco_ping_interval=0.05, hole_punching=False
)


def node(seed: int) -> NodeId:
    return Identity.from_seed(random.Random(seed).randbytes(32)).node_id


def identity() -> Identity:
    return Identity.generate(os.urandom)


# -- path table (sans-IO) ------------------------------------------------------------


def test_route_without_relay_is_the_optimistic_direct_choice() -> None:
    peer = node(1)
    table = PathTable()
    assert table.route(peer, 0.0) is None
    table.add_candidate(peer, A, 0.0)
    assert table.route(peer, 1.0) == A  # unproven, but nothing better to try
    assert table.poll(1.0) == []  # nothing depends on validation: no probing


def test_route_with_relay_prefers_only_validated_direct_paths() -> None:
    peer = node(1)
    table = PathTable(validity=10.0)
    table.set_relay(True)
    assert table.route(peer, 0.0) is RELAY  # even a peer the table never saw
    table.add_candidate(peer, A, 0.0)
    table.ping_received(peer, B, 0.0)  # heard from, still not proven our way
    assert table.route(peer, 0.5) is RELAY
    table.ping_sent(peer, A, TX, 1.0)
    assert table.route(peer, 1.1) is RELAY  # probing is not validated
    table.pong_received(peer, TX, A, 1.2)
    assert table.route(peer, 1.3) == A
    assert table.validated_address(peer, 1.3) == A
    # No pong for longer than `validity`: back to the relay, without forgetting A.
    assert table.route(peer, 11.1) == A
    assert table.route(peer, 11.3) is RELAY
    # The direct-only view is unchanged: heard from last (A's pong came after B's ping).
    assert table.send_address(peer, 11.3) == A
    table.set_relay(False)
    assert table.route(peer, 11.3) == A


def test_the_relay_server_is_never_routed_through_itself() -> None:
    relay_server, peer = node(1), node(2)
    table = PathTable(validity=10.0)
    table.set_relay(True, relay_server)
    table.add_candidate(relay_server, A, 0.0)
    assert table.route(relay_server, 0.0) == A
    assert table.route(peer, 0.0) is RELAY
    table.ping_sent(relay_server, A, TX, 0.0)
    table.pong_received(relay_server, TX, A, 0.1)
    assert table.route(relay_server, 20.0) == A  # expired: still direct, optimistically


def test_relay_pseudo_addresses_never_become_direct_paths() -> None:
    peer = node(1)
    table = PathTable()
    pseudo = table.virtual_address(peer)
    table.ping_received(peer, pseudo, 1.0)
    table.ping_sent(peer, pseudo, TX, 1.0)
    assert table.pong_received(peer, TX, pseudo, 1.1) is None
    assert table.paths(peer, 2.0) == []
    assert table.node_for_source(pseudo, 2.0) is None
    assert table.relay_heard(peer) == 1.0
    table.relay_received(peer, 3.0)
    assert table.relay_heard(peer) == 3.0
    assert table.relay_heard(node(2)) is None


# Keep-alive, heartbeat and hole punching plans: tests/net/test_paths.py.


# -- a fake relay between real endpoints --------------------------------------------


class FakeRelay:
    """Per attached endpoint, a bounded queue of outgoing datagrams and a forwarder.

    ``impersonate = (fake, real)``: a lying relay that passes the node
    ``real`` off as ``fake`` (datagrams for ``fake`` go to ``real``, and
    ``real``'s come out as from ``fake``). ``delay``: per-datagram forwarding time (a
    slow relay, so a small queue overflows).
    """

    def __init__(self, nursery: trio.Nursery, queue: int = 256, delay: float = 0.0) -> None:
        self._nursery = nursery
        self._queue = queue
        self._delay = delay
        self._endpoints: dict[NodeId, Endpoint] = {}
        self.impersonate: tuple[NodeId, NodeId] | None = None
        self.forwarded = 0
        self.captured: list[tuple[NodeId, NodeId, bytes]] = []  # (src, dst, payload)

    def attach(self, endpoint: Endpoint) -> None:
        send, receive = trio.open_memory_channel[tuple[NodeId, bytes]](self._queue)
        src = endpoint.node_id

        def hand_over(dst: NodeId, payload: bytes) -> bool:
            try:
                send.send_nowait((dst, payload))
            except trio.WouldBlock:
                return False
            return True

        async def forward() -> None:
            async for dst, payload in receive:
                if self._delay:
                    await trio.sleep(self._delay)
                claimed = src
                if self.impersonate is not None:
                    fake, real = self.impersonate
                    dst = real if dst == fake else dst
                    claimed = fake if src == real else src
                target = self._endpoints.get(dst)
                self.captured.append((src, dst, payload))
                del self.captured[:-64]
                if target is not None:
                    self.forwarded += 1
                    target.receive_relayed(claimed, payload)

        self._endpoints[src] = endpoint
        endpoint.set_relay(hand_over)
        self._nursery.start_soon(forward)


@asynccontextmanager
async def relayed_pair(
    config: EndpointConfig = CONFIG, *, queue: int = 256, delay: float = 0.0
) -> AsyncIterator[tuple[Endpoint, Endpoint, FakeRelay]]:
    try:
        async with (
            open_endpoint(identity(), config) as a,
            open_endpoint(identity(), config) as b,
            trio.open_nursery() as nursery,
        ):
            relay = FakeRelay(nursery, queue=queue, delay=delay)
            relay.attach(a)
            relay.attach(b)
            yield a, b, relay
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # show the test's own failure, not a group
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


@contextmanager
def dead_address() -> Iterator[tuple[str, int]]:
    """A bound UDP port nobody answers on: a direct path that cannot work."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:
        quiet.bind(("127.0.0.1", 0))
        yield quiet.getsockname()


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` for up to 5 s (driver-side state has no event to wait on)."""
    for _ in range(500):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("condition not met within 5 s")


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some():
        chunks.append(data)
    return b"".join(chunks)


async def send_and_finish(stream: trio.abc.HalfCloseableStream, payload: bytes) -> None:
    view = memoryview(payload)
    for offset in range(0, len(payload), 100_000):
        await stream.send_all(view[offset : offset + 100_000])
    await stream.send_eof()


async def transfer(sender: Connection, receiver: Connection, payload: bytes) -> None:
    """``payload`` over a new stream from ``sender``; assert it arrives intact."""
    stream = await sender.open_stream()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_and_finish, stream, payload)
        incoming = await receiver.accept_stream()
        assert await read_all(incoming) == payload
    await stream.aclose()
    await incoming.aclose()


async def test_dial_without_address_goes_over_the_relay_only() -> None:
    payload = random.Random(1).randbytes(4 * 1024 * 1024)
    async with relayed_pair() as (a, b, _relay):
        with trio.fail_after(30):
            dialer = await a.connect(b.node_id, None)
            acceptor = await b.accept()
            assert dialer.their_node_id == b.node_id  # certificate checked over the relay
            assert acceptor.their_node_id == a.node_id  # the relay's routing hint
            assert is_virtual(dialer._quic._network_paths[0].addr)
            assert is_virtual(acceptor._quic._network_paths[0].addr)
            await transfer(dialer, acceptor, payload)
            await transfer(acceptor, dialer, payload[: 1024 * 1024])
        assert dialer.path == acceptor.path == "relay"
        assert dialer.remote_address is None and acceptor.remote_address is None
        # Not one UDP datagram between them: everything took the relay.
        assert a.stats.datagrams_sent == b.stats.datagrams_sent == 0
        assert a.stats.datagrams_received == b.stats.datagrams_received == 0
        assert a.stats.relay_bytes_sent > len(payload)
        # All taken were delivered, bar a last ACK or two still in the fake relay.
        assert 0 <= a.stats.relay_bytes_sent - b.stats.relay_bytes_received < 200
        assert b.stats.relay_bytes_sent > 1024 * 1024
        assert 0 <= b.stats.relay_datagrams_sent - a.stats.relay_datagrams_received <= 2
        assert a.stats.relay_dropped == b.stats.relay_dropped == 0


async def test_dead_direct_address_falls_back_to_the_relay() -> None:
    async with relayed_pair() as (a, b, _relay):
        with dead_address() as nowhere, trio.fail_after(10):
            before = trio.current_time()
            dialer = await a.connect(b.node_id, nowhere)
            acceptor = await b.accept()
            # Pinged the dead address for disco_pong_wait first.
            assert trio.current_time() - before >= CONFIG.disco_pong_wait
            await transfer(dialer, acceptor, b"over the relay")
            await transfer(acceptor, dialer, b"and back")
        assert dialer.path == acceptor.path == "relay"
        assert a.stats.datagrams_sent >= 1  # the pings to the dead address
        assert b.stats.datagrams_received == 0
        assert a.stats.relay_datagrams_sent > 0 and b.stats.relay_datagrams_sent > 0


async def test_working_direct_path_beats_the_relay() -> None:
    payload = random.Random(2).randbytes(1024 * 1024)
    async with relayed_pair() as (a, b, relay):
        with trio.fail_after(10):
            dialer = await a.connect(b.node_id, b.local_address)
            acceptor = await b.accept()
            await transfer(dialer, acceptor, payload)
            await transfer(acceptor, dialer, payload)
        assert dialer.path == acceptor.path == "direct"
        assert dialer.remote_address == b.local_address
        assert acceptor.remote_address == a.local_address
        # The acceptor pinged back, so both sides had a validated path before
        # the first QUIC packet: nothing went over the relay, not even the handshake.
        assert a.stats.relay_datagrams_sent == b.stats.relay_datagrams_sent == 0
        assert relay.forwarded == 0
        assert a.stats.datagrams_sent > len(payload) // 1500


async def test_full_relay_queue_drops_are_counted_and_quic_recovers() -> None:
    payload = random.Random(3).randbytes(512 * 1024)
    async with relayed_pair(queue=4, delay=0.0002) as (a, b, relay):
        with trio.fail_after(60):
            dialer = await a.connect(b.node_id, None)
            acceptor = await b.accept()
            await transfer(dialer, acceptor, payload)
            await transfer(acceptor, dialer, payload[:100_000])
        assert a.stats.relay_dropped > 0
        assert dialer.path == "relay"
        # Whatever was taken was forwarded (bar the last few still queued).
        taken = a.stats.relay_datagrams_sent + b.stats.relay_datagrams_sent
        assert 0 <= taken - relay.forwarded <= 8


async def test_relay_to_direct_upgrade_mid_transfer_without_quic_noticing() -> None:
    first = random.Random(4).randbytes(1024 * 1024)
    second = random.Random(5).randbytes(1024 * 1024)
    async with relayed_pair() as (a, b, _relay):
        with trio.fail_after(20):
            dialer = await a.connect(b.node_id, None)
            acceptor = await b.accept()
            stream = await dialer.open_stream()
            await stream.send_all(first)
            incoming = await acceptor.accept_stream()
            assert dialer.path == "relay"
            # Learn B's address (as from mDNS or a relay lookup): one ping, one
            # pong, and A's datagrams move; B's ping back moves B's too.
            a.add_candidate(b.node_id, b.local_address)
            await eventually(
                lambda: a.paths.validated_address(b.node_id, trio.current_time()) is not None
            )
            relayed = a.stats.relay_datagrams_sent
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_and_finish, stream, second)
                assert await read_all(incoming) == first + second
        assert dialer.path == acceptor.path == "direct"
        assert acceptor.remote_address == a.local_address
        assert a.stats.relay_datagrams_sent <= relayed + 2
        assert a.stats.datagrams_sent > len(second) // 1500
        # Same QUIC connection throughout, still under the virtual address.
        assert dialer._quic._network_paths[0].addr == a.paths.virtual_address(b.node_id)
        assert len(dialer._quic._network_paths) == 1


async def test_a_lying_relay_cannot_impersonate_a_peer() -> None:
    async with relayed_pair() as (a, b, relay):
        impostor = identity().node_id
        relay.impersonate = (impostor, b.node_id)
        with trio.fail_after(10), pytest.raises(PeerIdentityMismatch) as caught:
            await a.connect(impostor, None)
        assert caught.value.expected == impostor


async def test_relayed_packets_for_another_peers_connection_are_dropped() -> None:
    async with relayed_pair() as (a, b, relay):
        with trio.fail_after(10):
            dialer = await a.connect(b.node_id, None)
            await b.accept()
            await dialer.open_stream()
        quic_from_a = [p for src, _, p in relay.captured if src == a.node_id and p[0] & 0x40]
        assert quic_from_a
        dropped = b.stats.dropped_unknown_connection
        b.receive_relayed(identity().node_id, quic_from_a[-1])
        assert b.stats.dropped_unknown_connection == dropped + 1


async def test_disco_over_the_relay_is_answered_there_and_teaches_no_direct_path() -> None:
    async with relayed_pair() as (a, b, _relay):
        pongs_before = a.disco.counters.opened
        b.receive_relayed(a.node_id, a.disco.seal_ping(b.node_id, TX))
        await eventually(lambda: a.disco.counters.opened > pongs_before)
        assert b.stats.relay_datagrams_sent == 1  # the PONG went back over the relay
        assert b.paths.paths(a.node_id, trio.current_time()) == []
        assert a.observed_address is None  # a relayed PONG says nothing about our address
        # A disco message whose sealed sender is not the relay's src is dropped.
        malformed = b.stats.dropped_malformed
        b.receive_relayed(identity().node_id, a.disco.seal_ping(b.node_id, TX))
        assert b.stats.dropped_malformed == malformed + 1
        assert b.stats.relay_datagrams_sent == 1


async def test_without_relay_there_is_no_relay_path() -> None:
    async with open_endpoint(identity(), CONFIG) as a:
        with pytest.raises(ConnectFailed, match="no relay"):
            await a.connect(identity().node_id, None)
    async with relayed_pair() as (a, b, _relay):
        with trio.fail_after(10):
            dialer = await a.connect(b.node_id, None)
            await b.accept()
        a.set_relay(None)  # the relay went away; no direct address known
        stream = await dialer.open_stream()
        await stream.send_all(b"into the void")
        await eventually(lambda: a.stats.dropped_no_path > 0)
        assert a.stats.relay_dropped == 0


async def test_relay_hook_failures_count_as_drops() -> None:
    async with open_endpoint(identity(), CONFIG) as a:

        def broken(dst: NodeId, payload: bytes) -> bool:
            raise RuntimeError("relay not connected")

        a.set_relay(broken)
        with trio.move_on_after(0.3):
            await a.connect(identity().node_id, None)
        assert a.stats.relay_dropped >= 1
        assert a.stats.relay_datagrams_sent == 0
