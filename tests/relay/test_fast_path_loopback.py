"""The relay's UDP fast path over real loopback sockets: relayd, endpoints, relay clients.

What the router tests (test_relay_routing.py) show in stepped time, here
with real QUIC: relayed datagrams go as UDP when both ends have the fast
path, onto a stream when one has not, never from or to a stranger, and a
NAT rebinding of a node is followed without a reconnect. The spoofing test
forges source addresses with a raw socket (needs CAP_NET_RAW; skipped
without it).
"""

from __future__ import annotations

import dataclasses
import os
import random
import socket as stdlib_socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from p2psync.crypto.identity import Identity
from p2psync.errors import BadFrame
from p2psync.net.endpoint import Endpoint, EndpointConfig, open_endpoint
from p2psync.net.relay_client import RelayClient, RelayClientConfig, open_relay_client
from p2psync.proto.relay import (
    RELAY_ALPN,
    Auth,
    NodeToRelay,
    encode_datagram_from_relay,
    encode_datagram_to_relay,
)
from relayd import relay as relayd_relay
from relayd.relay import RelaydAddresses

from .test_relay_loopback import FAST, metrics, relay_config, running_relay

Address = tuple[str, int]

# No hole punching: the loopback peers would find their direct path and leave the relay.
NODE = EndpointConfig(bind_host="127.0.0.1", alpn=("p2psync/1", RELAY_ALPN), hole_punching=False)
MiB = 1024 * 1024


@asynccontextmanager
async def relayed_node(
    relay: RelaydAddresses,
    config: RelayClientConfig = FAST,
    relay_address: Address | None = None,
) -> AsyncIterator[tuple[Endpoint, RelayClient]]:
    """An endpoint whose relay path is relayd, wired as the node wires it."""
    identity = Identity.generate(os.urandom)
    async with (
        open_endpoint(identity, NODE) as endpoint,
        open_relay_client(
            endpoint,
            identity,
            relay_address or relay.udp,
            relay.node_id,
            config=config,
            rng=random.Random(7),
            deliver=endpoint.receive_relayed_batch,
        ) as client,
    ):
        endpoint.set_relay(
            client.try_send,
            relay_node_id=relay.node_id,
            datagram_size=client.datagram_size,
            fast_path=client.using_fast_path,
        )
        with trio.fail_after(10):
            await client.wait_connected()
        yield endpoint, client


async def transfer(a: Endpoint, b: Endpoint, size: int) -> None:
    """``size`` random bytes from ``a`` to ``b`` on a new QUIC connection over the relay."""
    data = os.urandom(size)
    conn = await a.connect(b.node_id, None)
    accepted = await b.accept()
    stream = await conn.open_stream()
    got = bytearray()
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(data)
            await stream.send_eof()

        nursery.start_soon(send)
        inbound = await accepted.accept_stream()
        while chunk := await inbound.receive_some():
            got += chunk
    assert bytes(got) == data
    assert conn.path == "relay"


async def eventually(condition: object) -> None:
    """Poll ``condition()`` (state of another task); callers bound the wait."""
    assert callable(condition)
    while not condition():  # noqa: ASYNC110 -- no event to wait on for arbitrary state
        await trio.sleep(0.01)


async def metric_reaches(relay: RelaydAddresses, name: str, value: float) -> dict[str, float]:
    """Poll relayd's /metrics until ``name`` is at least ``value``; callers bound the wait."""
    while (samples := await metrics(relay.http))[name] < value:  # noqa: ASYNC110 -- a scrape
        await trio.sleep(0.01)
    return samples


def fast(samples: dict[str, float], name: str) -> float:
    return samples[f"relayd_fast_path_{name}"]


# --- the fast path carries the traffic -----------------------------------------------------


async def test_relayed_quic_rides_the_fast_path() -> None:
    async with (
        running_relay(relay_config()) as relay,
        relayed_node(relay) as (a, a_client),
        relayed_node(relay) as (b, b_client),
    ):
        assert a_client.fast_path and b_client.fast_path
        assert a.relay_address == relay.udp
        with trio.fail_after(60):
            await transfer(a, b, 2 * MiB)
        samples = await metrics(relay.http)
        forwarded = fast(samples, "bytes_forwarded_total")
        # Inner packets sized for one datagram each: all of them, handshake
        # included, went by UDP; none queued on a stream.
        assert forwarded >= 2 * MiB
        assert forwarded == samples["relayd_relayed_bytes_total"]
        assert fast(samples, "datagrams_to_stream_total") == 0
        assert samples["relayd_fast_path_nodes"] == 2
        assert a.stats.relay_fast_bytes_sent == a.stats.relay_bytes_sent >= 2 * MiB
        assert b.stats.relay_fast_bytes_received >= 2 * MiB
        assert a_client.stats.tx_frames == b_client.stats.rx_frames == 0  # streams idle
        packet = a.config.max_datagram_size
        assert samples["relayd_fast_path_datagrams_forwarded_total"] >= 2 * MiB / packet
        for reason in ("unknown-source", "malformed", "rate-limited", "too-large", "not-here"):
            assert samples[f'relayd_fast_path_dropped_total{{reason="{reason}"}}'] == 0


async def test_a_node_without_the_fast_path_gets_its_datagrams_on_the_stream() -> None:
    stream_only = dataclasses.replace(FAST, fast_path=False)
    async with (
        running_relay(relay_config()) as relay,
        relayed_node(relay) as (a, a_client),
        relayed_node(relay, stream_only) as (b, b_client),
    ):
        assert a_client.fast_path and not b_client.fast_path
        assert not b_client.using_fast_path()
        with trio.fail_after(60):
            await transfer(a, b, 1 * MiB)
        samples = await metrics(relay.http)
        assert fast(samples, "datagrams_to_stream_total") > 0  # a -> b: UDP in, stream out
        assert fast(samples, "datagrams_forwarded_total") == 0  # nothing went to b by UDP
        assert a.stats.relay_fast_bytes_sent >= 1 * MiB
        assert b.stats.relay_fast_datagrams_received == 0
        assert b_client.stats.rx_bytes >= 1 * MiB
        # b's packets use the stream both ways, sized for it (relay_client.datagram_size).
        assert b.stats.relay_fast_datagrams_sent == 0 and b_client.stats.tx_frames > 0


async def test_an_older_relay_is_logged_into_without_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = relayd_relay.decode_node_to_relay_untrusted

    def as_an_older_relay(body: bytes, **kwargs: object) -> NodeToRelay:
        message = original(body, **kwargs)  # type: ignore[arg-type]
        if isinstance(message, Auth) and message.flags is not None:
            raise BadFrame("AUTH: expected 5 fields, got 6")  # what relayd did before flags
        return message

    monkeypatch.setattr(relayd_relay, "decode_node_to_relay_untrusted", as_an_older_relay)
    async with (
        running_relay(relay_config()) as relay,
        relayed_node(relay) as (a, a_client),
        relayed_node(relay) as (b, _),
    ):
        assert a_client.stats.failures >= 1  # the first login, with flags, was refused
        assert not a_client.fast_path and not a_client.using_fast_path()
        with trio.fail_after(60):
            await transfer(a, b, 256 * 1024)
        assert a.stats.relay_fast_datagrams_sent == 0
        assert a_client.stats.tx_bytes >= 256 * 1024


# --- strangers and spoofers --------------------------------------------------------------------


async def test_fast_path_datagrams_from_strangers_are_dropped_unanswered() -> None:
    async with (
        running_relay(relay_config()) as relay,
        relayed_node(relay) as (a, _),
        relayed_node(relay) as (b, _),
    ):
        stranger = trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM)
        with stranger:
            await stranger.bind(("127.0.0.2", 0))  # not any node's address
            before = await metrics(relay.http)
            # To the relay, "as" a: it has no session at this address, so no credential.
            await stranger.sendto(encode_datagram_to_relay(b.node_id, b"\x40" * 60), relay.udp)
            # To b, "from the relay": b takes those only from its relay's address.
            received = b.stats.relay_datagrams_received
            await stranger.sendto(
                encode_datagram_from_relay(a.node_id, b"\x40" * 60), b.local_address
            )
            with trio.fail_after(5):
                await eventually(lambda: b.stats.relay_fast_dropped_source == 1)
                unknown = 'relayd_fast_path_dropped_total{reason="unknown-source"}'
                after = await metric_reaches(relay, unknown, before[unknown] + 1)
            assert b.stats.relay_datagrams_received == received  # nothing was fed on
            assert fast(after, "datagrams_forwarded_total") == fast(
                before, "datagrams_forwarded_total"
            )
            # Dropped, not answered: the relay handled it in the read that took it,
            # so an answer would be queued on our socket by now.
            with pytest.raises(BlockingIOError):
                stranger._sock.recv(2048)


def send_spoofed(source: Address, destination: Address, payload: bytes) -> None:
    """One IPv4 UDP datagram with a forged source address (raw socket, IP_HDRINCL)."""
    udp = struct.pack("!HHHH", source[1], destination[1], 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,  # IPv4, 20-byte header
        0,
        20 + len(udp),
        0,  # id (the kernel fills it)
        0,
        64,  # TTL
        stdlib_socket.IPPROTO_UDP,
        0,  # checksum (the kernel fills it)
        stdlib_socket.inet_aton(source[0]),
        stdlib_socket.inet_aton(destination[0]),
    )
    with stdlib_socket.socket(
        stdlib_socket.AF_INET, stdlib_socket.SOCK_RAW, stdlib_socket.IPPROTO_RAW
    ) as raw:
        raw.sendto(ip + udp, (destination[0], 0))


def _can_spoof() -> bool:
    try:
        stdlib_socket.socket(
            stdlib_socket.AF_INET, stdlib_socket.SOCK_RAW, stdlib_socket.IPPROTO_RAW
        ).close()
    except PermissionError:
        return False
    return True


@pytest.mark.skipif(not _can_spoof(), reason="forging source addresses needs CAP_NET_RAW")
async def test_a_spoofed_source_costs_the_victim_budget_and_nothing_else() -> None:
    # A small frame budget, so the charge to the victim shows.
    config = relay_config(frame_burst=64, frames_per_second=1)
    async with (
        running_relay(config) as relay,
        relayed_node(relay) as (a, a_client),
        relayed_node(relay) as (b, _),
    ):
        junk = b"\x40" + os.urandom(60)  # a QUIC short header for no connection of b's
        # Forged as a's: the relay cannot tell, relays it to b as a's, 1:1 ...
        send_spoofed(a.local_address, relay.udp, encode_datagram_to_relay(b.node_id, junk))
        with trio.fail_after(5):
            await eventually(lambda: b.stats.relay_fast_datagrams_received == 1)
        # ... and b's end-to-end QUIC throws it away.
        assert b.stats.dropped_unknown_connection == 1
        samples = await metrics(relay.http)
        assert fast(samples, "datagrams_forwarded_total") == 1
        assert fast(samples, "bytes_forwarded_total") == len(junk)
        # A flood forged as a's spends a's budget: a hears RATE_LIMITED.
        for _ in range(100):
            send_spoofed(a.local_address, relay.udp, encode_datagram_to_relay(b.node_id, junk))
        with trio.fail_after(5):
            await eventually(lambda: a_client.stats.rate_limited >= 1)
        samples = await metrics(relay.http)
        assert fast(samples, "datagrams_forwarded_total") <= 64
        assert fast(samples, 'dropped_total{reason="rate-limited"}') >= 100 - 64
        # Forged as the relay's, to b: taken (the relay's address is the credential)
        # and again dropped by QUIC; nothing reaches any stream.
        dropped = b.stats.dropped_unknown_connection
        send_spoofed(relay.udp, b.local_address, encode_datagram_from_relay(a.node_id, junk))
        with trio.fail_after(5):
            await eventually(lambda: b.stats.dropped_unknown_connection == dropped + 1)
        assert a_client.connected  # the victim is throttled, not cut


# --- NAT rebinding ---------------------------------------------------------------------------


class UserspaceNat:
    """One client's NAT in userspace: the node dials ``inside``; the relay sees ``outside``.

    :meth:`rebind` replaces the outside socket (a new public port, as when a
    NAT's mapping expires and the next packet gets a fresh one); the old one
    is closed, so what the relay still sends there is lost.
    """

    def __init__(self, relay: Address) -> None:
        self.relay = relay
        self.inside = trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM)
        self.client: Address | None = None
        self.outside: trio.socket.SocketType | None = None
        self._outside_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED) -> None:
        await self.inside.bind(("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.rebind()
            task_status.started(self.inside.getsockname())
            while True:
                data, source = await self.inside.recvfrom(65536)
                self.client = source
                assert self.outside is not None
                await self.outside.sendto(data, self.relay)

    async def rebind(self) -> Address:
        old, old_scope = self.outside, self._outside_scope
        outside = trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM)
        await outside.bind(("127.0.0.1", 0))
        self.outside = outside
        assert self._nursery is not None
        self._outside_scope = await self._nursery.start(self._from_relay, outside)
        if old is not None and old_scope is not None:
            old_scope.cancel()
            old.close()
        address: Address = outside.getsockname()
        return address

    async def _from_relay(
        self,
        outside: trio.socket.SocketType,
        task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            while True:
                data, _ = await outside.recvfrom(65536)
                if self.client is not None:
                    await self.inside.sendto(data, self.client)


async def test_a_nat_rebinding_is_followed_without_a_reconnect() -> None:
    async with running_relay(relay_config()) as relay, trio.open_nursery() as nursery:
        nat = UserspaceNat(relay.udp)
        inside = await nursery.start(nat.run)
        async with (
            relayed_node(relay, relay_address=inside) as (a, a_client),
            relayed_node(relay) as (b, _),
        ):
            assert a_client.using_fast_path() and a.relay_address == inside
            first_mapping = nat.outside.getsockname() if nat.outside else None
            assert a_client.our_public_address == first_mapping
            with trio.fail_after(60):
                await transfer(a, b, 512 * 1024)
                before = await metrics(relay.http)
                new_mapping = await nat.rebind()
                # The relay connection's next QUIC packet (a PING within FAST's
                # 0.5 s) comes from the new mapping: the relay follows it ...
                await metric_reaches(relay, "relayd_relay_rebinds_total", 1)
                # ... with its own QUIC replies (here a LOOKUP answer) ...
                found = await a_client.lookup(b.node_id)
                assert found.connected
                # ... and so does the fast path, both ways.
                await transfer(a, b, 512 * 1024)
                await transfer(b, a, 512 * 1024)
            after = await metrics(relay.http)
            assert after["relayd_relay_rebinds_total"] == 1
            moved = fast(after, "bytes_forwarded_total") - fast(before, "bytes_forwarded_total")
            assert moved >= 2 * 512 * 1024
            assert a_client.stats.connects == 1 and a_client.connected  # no reconnect
            assert await observed_by_the_relay(relay, a) == new_mapping
        nursery.cancel_scope.cancel()


async def observed_by_the_relay(relay: RelaydAddresses, a: Endpoint) -> Address | None:
    """What the relay now tells others of ``a``'s address (a LOOKUP from a fresh client)."""
    identity = Identity.generate(os.urandom)
    async with (
        open_endpoint(identity, NODE) as endpoint,
        open_relay_client(
            endpoint, identity, relay.udp, relay.node_id, config=FAST, rng=random.Random(1)
        ) as client,
    ):
        with trio.fail_after(10):
            await client.wait_connected()
            found = await client.lookup(a.node_id)
    return found.observed
