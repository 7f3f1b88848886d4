"""relayd's QUIC relay and the node's RelayClient over real loopback sockets."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import socket as stdlib_socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from p2psync.crypto.identity import Identity, NodeId
from p2psync.errors import ConfigError
from p2psync.net.endpoint import ConnectionLost, Endpoint, EndpointConfig, Stream, open_endpoint
from p2psync.net.relay_client import (
    Deliver,
    RelayClient,
    RelayClientConfig,
    RelayUnavailable,
    open_relay_client,
    parse_relay_address,
)
from p2psync.net.stun import binding_request, parse_binding_response
from p2psync.proto.relay import (
    RELAY_ALPN,
    Auth,
    Challenge,
    Error,
    FrameDecoder,
    Hello,
    RelayErrorCode,
    RelayToNode,
    Send,
    Welcome,
    auth_input,
    decode_relay_to_node_untrusted,
    encode_frame,
)
from relayd.config import HostPort, RelaydConfig, override_limits
from relayd.relay import IDENTITY_FILE, RelaydAddresses, load_or_create_identity, serve
from relayd.routing import AccessPolicy

LOOPBACK = HostPort("127.0.0.1", 0)
NODE_ENDPOINT = EndpointConfig(bind_host="127.0.0.1", alpn=("p2psync/1", RELAY_ALPN))
FAST = RelayClientConfig(backoff_initial=0.05, backoff_max=0.2, ping_interval=0.5)


def relay_config(listen: HostPort = LOOPBACK, **limits: object) -> RelaydConfig:
    config = RelaydConfig(listen=listen, http=LOOPBACK)
    return override_limits(config, **limits) if limits else config


@asynccontextmanager
async def running_relay(
    config: RelaydConfig,
    identity: Identity | None = None,
    policy: AccessPolicy | None = None,
) -> AsyncIterator[RelaydAddresses]:
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(
            partial(serve, config, identity=identity, policy=policy)
        )
        yield addresses
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def relay_node(
    relay: RelaydAddresses,
    identity: Identity | None = None,
    config: RelayClientConfig = FAST,
    published: tuple[tuple[str, int], ...] = (),
    deliver: Deliver | None = None,
) -> AsyncIterator[tuple[Endpoint, RelayClient]]:
    identity = identity or Identity.generate(os.urandom)
    async with (
        open_endpoint(identity, NODE_ENDPOINT) as endpoint,
        open_relay_client(
            endpoint,
            identity,
            relay.udp,
            relay.node_id,
            published,
            config=config,
            rng=random.Random(1),
            deliver=deliver,
        ) as client,
    ):
        with trio.fail_after(5):
            await client.wait_connected()
        yield endpoint, client


async def http_get(server: HostPort, path: str) -> bytes:
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\n\r\n".encode())
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    return bytes(data).partition(b"\r\n\r\n")[2]


async def metrics(server: HostPort) -> dict[str, float]:
    samples = {}
    for line in (await http_get(server, "/metrics")).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (state of another task) until true; callers bound the wait."""
    while not condition():  # noqa: ASYNC110 -- no event to wait on for arbitrary state
        await trio.sleep(0.01)


async def read_message(stream: Stream, decoder: FrameDecoder) -> RelayToNode:
    while (body := decoder.next_frame()) is None:
        data = await stream.receive_some()
        assert data, "relay closed the stream"
        decoder.feed(data)
    return decode_relay_to_node_untrusted(body)


# --- relaying -------------------------------------------------------------------------------


async def test_two_nodes_exchange_payloads_through_the_relay() -> None:
    async with (
        running_relay(relay_config()) as relay,
        relay_node(relay, published=(("192.168.7.7", 4000),)) as (a_endpoint, a),
        relay_node(relay) as (b_endpoint, b),
    ):
        assert a.our_public_address == a_endpoint.local_address  # loopback: no NAT
        assert a.rtt is not None and a.rtt < 1.0
        with trio.fail_after(5):
            await a.send(b_endpoint.node_id, b"A to B")
            assert await b.received.receive() == (a_endpoint.node_id, b"A to B")
            await b.send(a_endpoint.node_id, b"B to A")
            assert await a.received.receive() == (b_endpoint.node_id, b"B to A")
            big = os.urandom(60_000)  # larger than one QUIC packet: the stream carries it
            await a.send(b_endpoint.node_id, big)
            assert await b.received.receive() == (a_endpoint.node_id, big)
            found = await b.lookup(a_endpoint.node_id)
        assert found.connected
        assert found.observed == a_endpoint.local_address
        assert found.published == (("192.168.7.7", 4000),)
        health = json.loads(await http_get(relay.http, "/health"))
        assert (health["connections"], health["nodes"]) == (2, 2)
        assert health["relay_node_id"] == str(relay.node_id)
        samples = await metrics(relay.http)
        assert samples["relayd_relayed_frames_total"] == 3
        assert samples["relayd_relayed_bytes_total"] == 12 + 60_000
        assert samples['relayd_auths_total{result="ok"}'] == 2
        assert samples['relayd_lookups_total{result="found"}'] == 1
        assert samples["relayd_connections"] == 2


async def test_republished_addresses_reach_lookups_without_waiting_for_a_break() -> None:
    """A node whose interfaces changed logs in again at once; LOOKUPs answer the new ones."""
    async with (
        running_relay(relay_config()) as relay,
        relay_node(relay, published=(("192.168.7.7", 4000),)) as (a_endpoint, a),
        relay_node(relay) as (_, b),
    ):
        with trio.fail_after(10):
            assert not a.republish([("192.168.7.7", 4000)])  # unchanged: nothing happens
            assert a.stats.connects == 1
            assert a.republish([("10.1.2.3", 4000), ("192.168.8.8", 4000)])
            await eventually(lambda: a.stats.connects == 2 and a.connected)
            found = await b.lookup(a_endpoint.node_id)
        assert found.connected
        assert found.published == (("10.1.2.3", 4000), ("192.168.8.8", 4000))
        assert a.stats.failures == 0 and a.stats.republishes == 1


@pytest.mark.parametrize("deliver", [False, True], ids=["channel", "deliver"])
async def test_a_burst_of_frames_in_one_read_is_not_dropped_for_a_reading_node(
    deliver: bool,
) -> None:
    """One read of a sender's stream can complete many more frames than a queue holds.

    The relay's reader lets the destination's writer drain its queue (32
    frames by default) as it fills, so a destination that reads loses
    nothing; drop-oldest is only for destinations that do not keep up. The
    receiving client hands over what each read completed: to ``received``
    one by one, or to ``deliver`` as one batch per read.
    """
    count, size = 400, 1000  # 400 KB in one write: far more than 32 frames per read
    sink_config = dataclasses.replace(FAST, receive_queue=count)
    batches: list[list[tuple[NodeId, bytes]]] = []
    got_all = trio.Event()

    def take(batch: list[tuple[NodeId, bytes]]) -> None:
        batches.append(batch)
        if sum(len(b) for b in batches) >= count:
            got_all.set()

    async with (
        running_relay(relay_config()) as relay,
        relay_node(relay, config=sink_config, deliver=take if deliver else None) as (
            b_endpoint,
            b,
        ),
    ):
        sender = Identity.generate(os.urandom)
        async with open_endpoint(sender, NODE_ENDPOINT) as endpoint:
            with trio.fail_after(20):
                conn = await endpoint.connect(relay.node_id, relay.udp)
                stream = await conn.open_stream()
                decoder = FrameDecoder()
                await stream.send_all(encode_frame(Hello()))
                challenge = await read_message(stream, decoder)
                assert isinstance(challenge, Challenge)
                signature = sender.sign(auth_input(challenge.nonce, sender.node_id, relay.node_id))
                await stream.send_all(encode_frame(Auth(sender.node_id, signature)))
                assert isinstance(await read_message(stream, decoder), Welcome)
                payloads = [i.to_bytes(4, "big") * (size // 4) for i in range(count)]
                burst = b"".join(encode_frame(Send(b_endpoint.node_id, p)) for p in payloads)
                await stream.send_all(burst)
                if deliver:
                    await got_all.wait()
                    received = [item for batch in batches for item in batch]
                else:
                    received = [await b.received.receive() for _ in range(count)]
        assert received == [(sender.node_id, p) for p in payloads]
        if deliver:
            assert len(batches) < count // 4  # many frames per read, handed over at once
        samples = await metrics(relay.http)
        assert samples['relayd_relay_drops_total{reason="queue-full"}'] == 0
        assert samples["relayd_relayed_frames_total"] == count
        assert b.stats.rx_dropped == 0


async def test_frame_to_an_absent_node_gets_not_here() -> None:
    ghost = Identity.generate(os.urandom).node_id
    async with running_relay(relay_config()) as relay, relay_node(relay) as (_, a):
        with trio.fail_after(5):
            await a.send(ghost, b"anyone?")
            assert await a.not_here.receive() == ghost
            result = await a.lookup(ghost)
        assert not result.connected and result.observed is None
        assert (await metrics(relay.http))['relayd_relay_drops_total{reason="not-here"}'] == 1


async def test_wrong_signature_is_rejected_while_others_keep_working() -> None:
    async with (
        running_relay(relay_config()) as relay,
        relay_node(relay) as (a_endpoint, a),
        relay_node(relay) as (b_endpoint, b),
    ):
        liar = Identity.generate(os.urandom)
        async with open_endpoint(liar, NODE_ENDPOINT) as endpoint:
            with trio.fail_after(5):
                conn = await endpoint.connect(relay.node_id, relay.udp)
                stream = await conn.open_stream()
                decoder = FrameDecoder()
                await stream.send_all(encode_frame(Hello()))
                challenge = await read_message(stream, decoder)
                assert isinstance(challenge, Challenge)
                # Signed for another relay: a replay from elsewhere must not work here.
                elsewhere = Identity.generate(os.urandom).node_id
                signature = liar.sign(auth_input(challenge.nonce, liar.node_id, elsewhere))
                await stream.send_all(encode_frame(Auth(liar.node_id, signature)))
                error = await read_message(stream, decoder)
                assert isinstance(error, Error) and error.code == RelayErrorCode.BAD_AUTH
                with pytest.raises(ConnectionLost) as lost:
                    while await stream.receive_some():
                        pass
                    await stream.send_all(b"still there?")
                    await conn.accept_stream()
            assert lost.value.code == RelayErrorCode.BAD_AUTH
        with trio.fail_after(5):
            await a.send(b_endpoint.node_id, b"unaffected")
            assert await b.received.receive() == (a_endpoint.node_id, b"unaffected")
        samples = await metrics(relay.http)
        assert samples['relayd_auths_total{result="bad-signature"}'] == 1
        assert samples['relayd_relay_closes_total{code="bad-auth"}'] == 1


async def test_client_refused_by_access_token_reports_why() -> None:
    policy = AccessPolicy(access_token=b"letmein")
    async with running_relay(relay_config(), policy=policy) as relay:
        identity = Identity.generate(os.urandom)
        async with (
            open_endpoint(identity, NODE_ENDPOINT) as endpoint,
            open_relay_client(endpoint, identity, relay.udp, relay.node_id, config=FAST) as client,
        ):
            with trio.fail_after(5):
                await eventually(lambda: client.last_error is not None)
            error = client.last_error
            assert error is not None and error.code == RelayErrorCode.BAD_AUTH
            assert not client.connected
            with pytest.raises(RelayUnavailable):
                await client.send(identity.node_id, b"x")
        good = RelayClientConfig(backoff_initial=0.05, access_token=b"letmein")
        async with relay_node(relay, config=good) as (_, allowed):
            assert allowed.connected


async def test_flooding_node_is_throttled_while_a_polite_one_passes() -> None:
    config = relay_config(frames_per_second=50, frame_burst=50)
    async with (
        running_relay(config) as relay,
        relay_node(relay) as (_, flooder),
        relay_node(relay) as (polite_endpoint, polite),
        relay_node(relay) as (sink_endpoint, sink),
    ):
        got = {"flood": 0, "polite": 0}
        sink_id = sink_endpoint.node_id

        async def flood() -> None:
            while True:
                flooder.try_send(sink_id, b"f" * 1000)
                await trio.lowlevel.checkpoint()

        async def be_polite() -> None:
            for _ in range(10):
                await polite.send(sink_id, b"hello")
                await trio.sleep(0.1)

        async def count() -> None:
            async for src, _payload in sink.received:
                got["polite" if src == polite_endpoint.node_id else "flood"] += 1

        flood_frames = 600  # well beyond what 50/s lets through in the seconds this takes
        with trio.fail_after(30):
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                nursery.start_soon(count)
                await be_polite()
                while flooder.stats.tx_frames < flood_frames:  # noqa: ASYNC110 -- a count
                    await trio.sleep(0.05)
                await trio.sleep(0.3)
                nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - started
        assert got["polite"] == 10  # every polite frame passed
        # A burst of 50, then 50/s: the flood was cut to the limit (however slow the machine).
        assert 50 <= got["flood"] <= 50 + 50 * (elapsed + 0.5)
        assert flooder.stats.tx_frames >= flood_frames > got["flood"]
        assert flooder.stats.rate_limited >= 1  # told, at most once a second
        assert flooder.connected  # throttled, not disconnected
        samples = await metrics(relay.http)
        assert samples['relayd_relay_drops_total{reason="rate-limited"}'] > 0


async def start_relay(
    nursery: trio.Nursery, config: RelaydConfig
) -> tuple[RelaydAddresses, Callable[[], Awaitable[None]]]:
    """Run a relay in ``nursery`` that can be stopped on its own: (addresses, stop)."""
    scope = trio.CancelScope()
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[RelaydAddresses]) -> None:
        try:
            with scope:
                await serve(config, task_status=task_status)
        finally:
            done.set()

    addresses: RelaydAddresses = await nursery.start(run)

    async def stop() -> None:
        scope.cancel()
        await done.wait()

    return addresses, stop


async def test_shutdown_tells_clients_and_they_reconnect_after_restart(tmp_path: Path) -> None:
    config = RelaydConfig(listen=LOOPBACK, http=LOOPBACK, data_dir=str(tmp_path))
    async with trio.open_nursery() as nursery:
        relay, stop = await start_relay(nursery, config)
        async with relay_node(relay) as (_, a), relay_node(relay) as (b_endpoint, b):
            with trio.fail_after(15):
                await stop()
                await eventually(lambda: not a.connected and not b.connected)
                # Told by an ERROR frame, not left to time out.
                assert a.last_error is not None
                assert a.last_error.code == RelayErrorCode.SHUTTING_DOWN
                # Same port, same --data: the same relay NodeId comes back.
                again = dataclasses.replace(config, listen=relay.udp)
                restarted, stop_again = await start_relay(nursery, again)
                assert restarted.node_id == relay.node_id
                await a.wait_connected()
                await b.wait_connected()
                await a.send(b_endpoint.node_id, b"after the restart")
                assert (await b.received.receive())[1] == b"after the restart"
            assert a.stats.connects == 2 and b.stats.connects == 2
        await stop_again()


# --- limits ---------------------------------------------------------------------------------


async def test_handshake_timeout_closes_a_silent_connection() -> None:
    async with running_relay(relay_config(handshake_timeout_s=0.3)) as relay:
        identity = Identity.generate(os.urandom)
        async with open_endpoint(identity, NODE_ENDPOINT) as endpoint:
            with trio.fail_after(5):
                conn = await endpoint.connect(relay.node_id, relay.udp)
                stream = await conn.open_stream()
                await stream.send_all(encode_frame(Hello()))  # ...and then nothing
                decoder = FrameDecoder()
                assert isinstance(await read_message(stream, decoder), Challenge)
                error = await read_message(stream, decoder)
        assert isinstance(error, Error) and error.code == RelayErrorCode.TIMEOUT
        assert (await metrics(relay.http))['relayd_relay_closes_total{code="timeout"}'] == 1


async def test_oversize_frame_header_is_refused() -> None:
    async with running_relay(relay_config(max_frame_size=2048)) as relay:
        identity = Identity.generate(os.urandom)
        async with open_endpoint(identity, NODE_ENDPOINT) as endpoint:
            with trio.fail_after(5):
                conn = await endpoint.connect(relay.node_id, relay.udp)
                stream = await conn.open_stream()
                await stream.send_all((10**6).to_bytes(4, "big"))
                error = await read_message(stream, FrameDecoder())
        assert isinstance(error, Error) and error.code == RelayErrorCode.FRAME_TOO_LARGE
        assert (await metrics(relay.http))["relayd_relay_protocol_errors_total"] == 1


async def test_connections_per_ip_are_limited_with_an_explicit_error() -> None:
    async with (
        running_relay(relay_config(max_connections_per_ip=1)) as relay,
        relay_node(relay) as (_, first),
    ):
        identity = Identity.generate(os.urandom)
        async with open_endpoint(identity, NODE_ENDPOINT) as endpoint:
            with trio.fail_after(5), pytest.raises(ConnectionLost) as refused:
                conn = await endpoint.connect(relay.node_id, relay.udp)
                await conn.accept_stream()
        assert refused.value.code == RelayErrorCode.SERVER_FULL
        assert first.connected
        samples = await metrics(relay.http)
        refusals = "relayd_relay_connections_refused_total"
        assert samples[f'{refusals}{{reason="too-many-connections-from-ip"}}'] == 1


# --- one UDP port: STUN next to QUIC --------------------------------------------------------


@pytest.mark.parametrize("classic", [False, True], ids=["rfc8489", "rfc3489-classic"])
async def test_stun_is_answered_on_the_relay_port(classic: bool) -> None:
    async with running_relay(relay_config()) as relay:
        with trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            txid = b"0123456789ab"
            request = bytearray(binding_request(txid, fingerprint=False))
            if classic:
                request[4:8] = b"RFC3"  # RFC 3489: a 16-byte transaction id, no magic cookie
            await sock.sendto(bytes(request), relay.udp)
            with trio.fail_after(5):
                reply, _ = await sock.recvfrom(2048)
            assert reply[8:20] == txid and reply[:2] == b"\x01\x01"  # Binding success
            if not classic:
                assert parse_binding_response(reply, txid) == sock.getsockname()
        samples = await metrics(relay.http)
        assert samples['relayd_stun_responses_total{port="main",kind="success"}'] == 1


# --- identity -------------------------------------------------------------------------------


def test_relay_identity_is_created_once_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "relayd"
    first, created = load_or_create_identity(str(data))
    assert created
    key = data / IDENTITY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again, created_again = load_or_create_identity(str(data))
    assert not created_again and again.node_id == first.node_id
    key.write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="is damaged"):
        load_or_create_identity(str(data))
    ephemeral, created = load_or_create_identity(None)
    assert created and ephemeral.node_id != first.node_id


def test_relay_address_parsing() -> None:
    node_id = Identity.generate(os.urandom).node_id
    assert parse_relay_address(f"{node_id}@203.0.113.5:3478") == (node_id, ("203.0.113.5", 3478))
    assert parse_relay_address("[2001:db8::1]:3478") == (None, ("2001:db8::1", 3478))
    assert parse_relay_address("relay.example.org:443") == (None, ("relay.example.org", 443))
    for bad in ("nohost", "host:0", "host:http", "bogus@1.2.3.4:1"):
        with pytest.raises(ConfigError):
            parse_relay_address(bad)


async def test_logs_never_carry_payload_bytes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    marker = b"SECRET-PAYLOAD-MARKER"
    config = relay_config(frames_per_second=5, frame_burst=5, max_frame_size=4096)
    async with (
        running_relay(config) as relay,
        relay_node(relay) as (_, a),
        relay_node(relay) as (b_endpoint, b),
    ):
        ghost = Identity.generate(os.urandom).node_id
        with trio.fail_after(5):
            for _ in range(20):  # relayed, rate-limited, not-here: every path that logs
                a.try_send(b_endpoint.node_id, marker)
                a.try_send(ghost, marker)
            await b.received.receive()
            async with open_endpoint(Identity.generate(os.urandom), NODE_ENDPOINT) as endpoint:
                conn = await endpoint.connect(relay.node_id, relay.udp)
                stream = await conn.open_stream()
                await stream.send_all(encode_frame(Hello()) + b"\0\0\0\x20" + marker + b"x" * 11)
                error = await read_message(stream, FrameDecoder())
                assert isinstance(error, (Challenge, Error))
        await trio.sleep(0.2)
    assert caplog.records, "expected some log lines to check"
    for record in caplog.records:
        assert marker.decode() not in record.getMessage()
        assert marker.hex() not in record.getMessage()
