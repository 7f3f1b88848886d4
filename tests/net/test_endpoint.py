"""Two real endpoints on loopback in one trio process."""

from __future__ import annotations

import hashlib
import os
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from p2psync import errors
from p2psync.crypto.identity import Identity
from p2psync.net.endpoint import (
    ConnectFailed,
    Connection,
    ConnectionLost,
    Endpoint,
    EndpointConfig,
    ResourceClosed,
    StreamReset,
    open_endpoint,
)
from p2psync.net.paths import PathTable, is_virtual
from p2psync.net.tls import PeerIdentityMismatch

LOOPBACK = EndpointConfig(bind_host="127.0.0.1")


def identity() -> Identity:
    return Identity.generate(os.urandom)


@asynccontextmanager
async def endpoint_pair(
    config: EndpointConfig = LOOPBACK,
) -> AsyncIterator[tuple[Endpoint, Endpoint]]:
    async with open_endpoint(identity(), config) as a, open_endpoint(identity(), config) as b:
        yield a, b


@asynccontextmanager
async def connected(
    config: EndpointConfig = LOOPBACK,
) -> AsyncIterator[tuple[Connection, Connection]]:
    async with endpoint_pair(config) as (a, b):
        with trio.fail_after(5):
            dialer = await a.connect(b.node_id, b.local_address)
            acceptor = await b.accept()
        yield dialer, acceptor


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some():
        chunks.append(data)
    return b"".join(chunks)


async def test_connect_verifies_node_and_disco_maps_the_dialer() -> None:
    async with endpoint_pair() as (a, b):
        with trio.fail_after(5):
            dialer = await a.connect(b.node_id, b.local_address)
            acceptor = await b.accept()
        assert dialer.is_dialer and not acceptor.is_dialer
        assert dialer.their_node_id == b.node_id  # from the certificate
        assert acceptor.their_node_id == a.node_id  # from the disco PING mapping
        # QUIC on both sides only ever saw virtual addresses.
        assert is_virtual(dialer._quic._network_paths[0].addr)
        assert is_virtual(acceptor._quic._network_paths[0].addr)
        assert a.observed_address == a.local_address  # reflexive address from the PONG
        assert a.disco.counters.opened == 1 and b.disco.counters.opened >= 1


async def test_wrong_node_id_fails_and_acceptor_keeps_serving() -> None:
    async with endpoint_pair() as (a, b):
        impostor = identity()
        with trio.fail_after(5), pytest.raises(PeerIdentityMismatch) as caught:
            await a.connect(impostor.node_id, b.local_address)
        assert caught.value.expected == impostor.node_id
        assert isinstance(caught.value, errors.IntegrityError)
        # The acceptor is unharmed: a correct dial right after works.
        with trio.fail_after(5):
            dialer = await a.connect(b.node_id, b.local_address)
            acceptor = await b.accept()
            stream = await dialer.open_stream()
            await stream.send_all(b"still here")
            await stream.send_eof()
            incoming = await acceptor.accept_stream()
            assert await read_all(incoming) == b"still here"


async def test_connect_to_nobody_fails_within_idle_timeout() -> None:
    config = EndpointConfig(
        bind_host="127.0.0.1", idle_timeout=0.5, disco_pong_wait=0.2, disco_ping_interval=0.05
    )
    quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    quiet.bind(("127.0.0.1", 0))
    try:
        async with open_endpoint(identity(), config) as a:
            with trio.fail_after(5), pytest.raises(ConnectFailed):
                await a.connect(identity().node_id, quiet.getsockname())
            assert not a._connections
    finally:
        quiet.close()


async def test_bidirectional_streams() -> None:
    async with connected() as (dialer, acceptor):
        with trio.fail_after(5):
            ours = await dialer.open_stream()
            await ours.send_all(b"ping?")
            theirs = await acceptor.accept_stream()
            assert await theirs.receive_some() == b"ping?"
            await theirs.send_all(b"pong!")
            await theirs.send_eof()
            assert await read_all(ours) == b"pong!"
            await ours.send_eof()
            assert await theirs.receive_some() == b""
            # The acceptor can open streams too.
            back = await acceptor.open_stream()
            await back.send_all(b"from acceptor")
            await back.send_eof()
            incoming = await dialer.accept_stream()
            assert await read_all(incoming) == b"from acceptor"


@pytest.mark.slow
async def test_16_mib_over_one_stream_is_byte_identical() -> None:
    payload = random.Random(7).randbytes(16 * 1024 * 1024)
    async with connected() as (dialer, acceptor):
        with trio.fail_after(60):
            stream = await dialer.open_stream()
            received: list[bytes] = []

            async def receive() -> None:
                incoming = await acceptor.accept_stream()
                received.append(await read_all(incoming))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                view = memoryview(payload)
                for offset in range(0, len(payload), 100_000):  # odd chunk size on purpose
                    await stream.send_all(view[offset : offset + 100_000])
                await stream.send_eof()
        assert hashlib.sha256(received[0]).digest() == hashlib.sha256(payload).digest()
        assert dialer.stats.bytes_sent > len(payload)
        assert dialer.stats.rtt is not None


async def test_parallel_streams() -> None:
    count = 8
    payloads = [random.Random(i).randbytes(200_000 + i) for i in range(count)]
    async with connected() as (dialer, acceptor):
        results: dict[bytes, bytes] = {}

        async def echo_server() -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    stream = await acceptor.accept_stream()
                    nursery.start_soon(echo, stream)

        async def echo(stream: trio.abc.HalfCloseableStream) -> None:
            data = await read_all(stream)
            await stream.send_all(hashlib.sha256(data).digest())
            await stream.send_eof()

        async def client(payload: bytes) -> None:
            stream = await dialer.open_stream()
            await stream.send_all(payload)
            await stream.send_eof()
            results[payload] = await read_all(stream)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo_server)
                for payload in payloads:
                    nursery.start_soon(client, payload)
        assert results == {p: hashlib.sha256(p).digest() for p in payloads}


async def test_peer_closing_breaks_pending_and_future_operations() -> None:
    async with connected() as (dialer, acceptor):
        stream = await dialer.open_stream()
        await stream.send_all(b"hello")
        incoming = await acceptor.accept_stream()
        assert await incoming.receive_some() == b"hello"
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:

                async def pending_receive() -> None:
                    with pytest.raises(ConnectionLost) as caught:
                        await stream.receive_some()
                    assert caught.value.code == 42
                    assert caught.value.reason == "bye"

                nursery.start_soon(pending_receive)
                await trio.sleep(0.05)
                await acceptor.aclose(42, "bye")
        # Later operations fail too, with both flavours of "broken".
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"more")
        with pytest.raises(errors.BrokenResourceError):
            await dialer.open_stream()
        with pytest.raises(ConnectionLost):
            await dialer.accept_stream()
        # The side that closed gets "closed", not "broken".
        with pytest.raises(ResourceClosed):
            await incoming.send_all(b"x")
        with pytest.raises(trio.ClosedResourceError):
            await acceptor.open_stream()


async def test_stream_reset_by_peer() -> None:
    async with connected() as (dialer, acceptor):
        with trio.fail_after(5):
            stream = await dialer.open_stream()
            await stream.send_all(b"abc")
            incoming = await acceptor.accept_stream()
            await incoming.receive_some()
            await incoming.aclose()  # stops reading: peer sees STOP_SENDING
            with pytest.raises(StreamReset):
                while True:
                    await stream.send_all(b"x" * 10_000)
                    await trio.sleep(0.01)


async def test_backpressure_receiver_that_does_not_read() -> None:
    window = 256 * 1024
    config = EndpointConfig(
        bind_host="127.0.0.1",
        stream_receive_window=window,
        connection_receive_window=4 * window,
        stream_send_buffer=128 * 1024,
    )
    async with connected(config) as (dialer, acceptor):
        stream = await dialer.open_stream()
        sent = 0
        with trio.move_on_after(2) as scope:
            while True:
                await stream.send_all(b"z" * 16384)
                sent += 16384
        assert scope.cancelled_caught, "send_all never blocked"
        incoming = await acceptor.accept_stream()
        buffered = incoming._rx_buffered
        # The receiver holds at most one window; the sender at most its buffer.
        assert buffered <= window
        assert stream._unacked() <= 128 * 1024 + 16384
        assert sent <= window + 128 * 1024 + 16384
        assert sent >= window  # it did fill the window before stalling
        # Reading resumes the flow: everything arrives, in order.
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def finish() -> None:
                    await stream.send_all(b"end")
                    await stream.send_eof()

                nursery.start_soon(finish)
                data = await read_all(incoming)
        assert len(data) == sent + 3
        assert data.endswith(b"end")


async def test_garbage_datagrams_do_not_crash_the_endpoint() -> None:
    rng = random.Random(1234)
    async with connected() as (dialer, acceptor):
        target = acceptor._endpoint.local_address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
            for index in range(2000):
                size = rng.choice([0, 1, 5, 20, 100, 1200, 1400])
                data = bytearray(rng.randbytes(size))
                if data and index % 4 == 1:
                    data[0] |= 0xC0  # looks like a QUIC long header
                elif data and index % 4 == 2:
                    data[0] = (data[0] & 0x3F) | 0x40  # short header
                elif index % 4 == 3:
                    data = bytearray(b"\x8dp2pd\x01" + bytes(data))  # disco magic
                junk.sendto(bytes(data), target)
        with trio.fail_after(5):
            stream = await dialer.open_stream()
            await stream.send_all(b"survived")
            await stream.send_eof()
            incoming = await acceptor.accept_stream()
            assert await read_all(incoming) == b"survived"
        stats = acceptor._endpoint.stats
        assert stats.dropped_malformed + stats.dropped_unknown_connection > 500


async def test_unmapped_dialer_is_accepted_with_unknown_node_id() -> None:
    # The acceptor forgets disco mappings at once (negative TTL), as if the
    # PING had been lost: the dialer still connects, the acceptor just does
    # not know who it is and talks to the real address.
    config = EndpointConfig(bind_host="127.0.0.1", disco_ping_attempts=1, disco_pong_wait=0.1)
    async with endpoint_pair(config) as (a, b):
        b.paths = PathTable(source_mapping_ttl=-1.0)
        with trio.fail_after(5):
            dialer = await a.connect(b.node_id, b.local_address)
            acceptor = await b.accept()
        assert dialer.their_node_id == b.node_id
        assert acceptor.their_node_id is None
        assert acceptor._quic._network_paths[0].addr == a.local_address
        stream = await acceptor.open_stream()
        await stream.send_all(b"hi")
        await stream.send_eof()
        with trio.fail_after(5):
            assert await read_all(await dialer.accept_stream()) == b"hi"


async def send_and_finish(stream: trio.abc.HalfCloseableStream, payload: bytes) -> None:
    await stream.send_all(payload)
    await stream.send_eof()


async def test_closed_endpoint_refuses_work() -> None:
    async with open_endpoint(identity(), LOOPBACK) as a:
        pass
    with pytest.raises(ResourceClosed):
        await a.connect(identity().node_id, ("127.0.0.1", 9))


async def test_gso_gro_and_plain_fallback_all_work() -> None:
    for offload in (True, False):
        config = EndpointConfig(bind_host="127.0.0.1", use_gso=offload, use_gro=offload)
        async with connected(config) as (dialer, acceptor):
            if not offload:
                assert not dialer._endpoint.stats.gso
                assert not acceptor._endpoint.stats.gro
            payload = random.Random(3).randbytes(2_000_000)
            with trio.fail_after(20):
                stream = await dialer.open_stream()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_and_finish, stream, payload)
                    assert await read_all(await acceptor.accept_stream()) == payload
            endpoint_stats = dialer._endpoint.stats
            if endpoint_stats.gso:
                assert endpoint_stats.send_calls < endpoint_stats.datagrams_sent
            receiver_stats = acceptor._endpoint.stats
            if receiver_stats.gro and endpoint_stats.gso:
                # The kernel hands over GSO batches whole: fewer reads than datagrams.
                assert receiver_stats.recv_calls < receiver_stats.datagrams_received / 2
            if not offload:
                assert receiver_stats.recv_calls == receiver_stats.datagrams_received


async def test_partial_reads_with_max_bytes() -> None:
    payload = random.Random(11).randbytes(300_000)
    async with connected() as (dialer, acceptor):
        with trio.fail_after(10):
            stream = await dialer.open_stream()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_and_finish, stream, payload)
                incoming = await acceptor.accept_stream()
                pieces = []
                while piece := await incoming.receive_some(1000):
                    assert len(piece) <= 1000
                    pieces.append(piece)
        assert b"".join(pieces) == payload
        with pytest.raises(ValueError):
            await incoming.receive_some(0)


async def test_incoming_streams_are_bounded_by_max_streams() -> None:
    config = EndpointConfig(bind_host="127.0.0.1", max_incoming_streams=2)
    async with connected(config) as (dialer, acceptor):
        streams = [await dialer.open_stream() for _ in range(3)]
        for index, stream in enumerate(streams):
            await stream.send_all(b"%d" % index)
            await stream.send_eof()
        with trio.fail_after(5):
            first = await acceptor.accept_stream()
            second = await acceptor.accept_stream()
        # The peer may not open a third stream while two are live (MAX_STREAMS).
        with trio.move_on_after(0.3) as scope:
            await acceptor.accept_stream()
        assert scope.cancelled_caught
        with trio.fail_after(5):
            assert await read_all(first) == b"0"
            await first.send_eof()
            assert await read_all(streams[0]) == b""
            third = await acceptor.accept_stream()  # credit came back as stream 0 finished
            assert await read_all(third) == b"2"
            assert await read_all(second) == b"1"


async def test_connection_limit() -> None:
    config = EndpointConfig(bind_host="127.0.0.1", max_connections=1)
    async with endpoint_pair(config) as (a, b), open_endpoint(identity(), config) as c:
        with trio.fail_after(5):
            await a.connect(b.node_id, b.local_address)
            await b.accept()
        with pytest.raises(errors.LocalProtocolError):
            await a.connect(c.node_id, c.local_address)
        # b is full too: c's Initial is ignored, so c's dial times out.
        with trio.move_on_after(1.5) as scope:
            await c.connect(b.node_id, b.local_address)
        assert scope.cancelled_caught
        assert b.stats.refused_connections >= 1
        # The cancelled dial sent its CONNECTION_CLOSE and is gone after the
        # closing period (RFC 9000 §10.2).
        for _ in range(100):
            if not c._connections:
                break
            await trio.sleep(0.05)
        assert not c._connections


async def test_stun_datagrams_reach_the_handler_and_raw_send_works() -> None:
    seen: list[tuple[bytes, tuple[str, int]]] = []
    arrived = trio.Event()

    def handler(data: bytes, source: tuple[str, int]) -> None:
        seen.append((data, source))
        arrived.set()

    async with endpoint_pair() as (a, b):
        b.set_stun_handler(handler)
        binding = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"T" * 12
        a.send_datagram(binding, b.local_address)
        a.send_datagram(b"\x00\x01\x00\x00nocookie" + b"x" * 12, b.local_address)
        with trio.fail_after(5):
            await arrived.wait()
        await trio.sleep(0.05)  # the cookie-less one had its chance to (wrongly) arrive
        assert seen == [(binding, a.local_address)]
        assert b.stats.stun_received == 1


def test_certificate_carries_the_node_id() -> None:
    from p2psync.net.tls import (
        certificate_node_id,
        check_peer_certificate,
        node_certificate,
    )

    me, other = identity(), identity()
    certificate, _ = node_certificate(me)
    assert certificate_node_id(certificate) == me.node_id
    assert node_certificate(me)[0] == certificate  # deterministic: no clock, no entropy
    assert check_peer_certificate(me.node_id, certificate) == me.node_id
    with pytest.raises(PeerIdentityMismatch):
        check_peer_certificate(other.node_id, certificate)


async def test_a_failing_connection_does_not_take_the_endpoint_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(data: bytes, addr: object, now: float) -> None:
        raise RuntimeError("simulated aioquic bug")

    async with endpoint_pair() as (a, b):
        with trio.fail_after(5):
            dialer = await a.connect(b.node_id, b.local_address)
            acceptor = await b.accept()
        setattr(acceptor._quic, "receive_datagram", explode)  # noqa: B010
        stream = await dialer.open_stream()
        await stream.send_all(b"boom")
        with trio.fail_after(5), pytest.raises(ConnectionLost, match="internal error"):
            await acceptor.accept_stream()
        assert "QUIC state machine failed" in caplog.text
        # Another peer still gets through.
        with trio.fail_after(5):
            async with open_endpoint(identity(), LOOPBACK) as c:
                await c.connect(b.node_id, b.local_address)
                assert (await b.accept()).their_node_id == c.node_id


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_loopback() -> None:
    async with connected(EndpointConfig(bind_host="::1")) as (dialer, acceptor):
        assert acceptor.their_node_id is not None
        assert dialer._endpoint.observed_address == dialer._endpoint.local_address
        with trio.fail_after(5):
            stream = await dialer.open_stream()
            await stream.send_all(b"v6")
            await stream.send_eof()
            assert await read_all(await acceptor.accept_stream()) == b"v6"


async def test_runs_under_an_autojumping_mock_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # QUIC time is trio time: the virtual clock drives aioquic's timers too.
    async with connected() as (dialer, acceptor):
        payload = random.Random(5).randbytes(1_000_000)
        with trio.fail_after(60):
            stream = await dialer.open_stream()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_and_finish, stream, payload)
                assert await read_all(await acceptor.accept_stream()) == payload
