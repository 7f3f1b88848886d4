"""Hole punching on real endpoints over loopback, joined by the in-process fake relay.

No addresses are given to ``connect``: the peers learn each other's only from
CALL_ME_MAYBE over the relay. Network faults are drop rules on the endpoints'
socket send path (``_send_run``) and receive path, as a firewall would drop.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import trio

from p2psync.net.endpoint import Endpoint
from p2psync.net.netcheck import NatKind
from p2psync.net.paths import RELAY, Address, Origin

from .test_relay_paths import CONFIG, eventually, read_all, relayed_pair, send_and_finish, transfer

PUNCHING = dataclasses.replace(CONFIG, hole_punching=True)


def drop_sends(endpoint: Endpoint, dropped: Callable[[Address], bool]) -> list[int]:
    """Drop the endpoint's direct datagrams to addresses ``dropped`` says; count them."""
    original = endpoint._send_run
    count = [0]

    def send_run(run: list[bytes], address: Address, segment: int) -> None:
        if dropped(address):
            count[0] += len(run)
            return
        original(run, address, segment)

    endpoint._send_run = send_run  # type: ignore[method-assign]
    return count


def direct(a: Endpoint, b: Endpoint) -> bool:
    now = trio.current_time()
    return (
        a.paths.validated_address(b.node_id, now) is not None
        and b.paths.validated_address(a.node_id, now) is not None
    )


async def test_call_me_maybe_alone_upgrades_a_relayed_connection() -> None:
    payload = random.Random(1).randbytes(1024 * 1024)
    async with relayed_pair(PUNCHING) as (a, b, relay):
        with trio.fail_after(20):
            dialer = await a.connect(b.node_id, None)  # no address: the relay only
            acceptor = await b.accept()
            await eventually(lambda: direct(a, b))
            assert a.traversal.stats.cmm_sent >= 1 and b.traversal.stats.cmm_received >= 1
            assert b.traversal.stats.cmm_sent >= 1 and a.traversal.stats.cmm_received >= 1
            # Each learnt the other's address from its CALL_ME_MAYBE (or its ping).
            now = trio.current_time()
            assert a.paths.route(b.node_id, now) == b.local_address
            assert b.paths.route(a.node_id, now) == a.local_address
            relayed = a.stats.relay_bytes_sent + b.stats.relay_bytes_sent
            await transfer(dialer, acceptor, payload)
            await transfer(acceptor, dialer, payload)
        assert dialer.path == acceptor.path == "direct"
        # Bytes relayed after the direct path exists: only disco stragglers, if any.
        assert a.stats.relay_bytes_sent + b.stats.relay_bytes_sent - relayed < 2000
        report = a.paths.report(b.node_id, trio.current_time())
        assert report is not None and report.route == "direct"  # loopback: no LAN
        assert report.first_relay_at is not None and report.first_direct_at is not None
        assert report.first_direct_at - report.first_relay_at < 2.0
        assert relay.forwarded > 0


async def test_a_direct_path_broken_mid_transfer_falls_back_to_the_relay() -> None:
    payload = random.Random(2).randbytes(6 * 1024 * 1024)
    async with relayed_pair(PUNCHING) as (a, b, _relay):
        with trio.fail_after(90):
            dialer = await a.connect(b.node_id, None)
            acceptor = await b.accept()
            await eventually(lambda: direct(a, b))
            broken = False
            dropped_a = drop_sends(a, lambda address: broken and address == b.local_address)
            dropped_b = drop_sends(b, lambda address: broken and address == a.local_address)
            stream = await dialer.open_stream()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_and_finish, stream, payload)
                incoming = await acceptor.accept_stream()
                first = await incoming.receive_some(256 * 1024)
                broken = True  # the network drops the direct path from now on
                started = trio.current_time()
                rest = await read_all(incoming)
                took = trio.current_time() - started
            assert first + rest == payload  # nothing lost, same QUIC connection
            assert dropped_a[0] > 0 and dropped_b[0] > 0
            now = trio.current_time()
            assert a.paths.route(b.node_id, now) is RELAY
            assert b.paths.route(a.node_id, now) is RELAY
            report = a.paths.report(b.node_id, now)
            assert report is not None and report.last_failure is not None
            assert took < 60.0
        assert dialer.path == acceptor.path == "relay"
        assert a.stats.relay_bytes_sent > 1024 * 1024


async def test_the_hard_nat_port_fan_carries_the_direct_path() -> None:
    # a is "behind a hard NAT", b is not. The main sockets cannot reach each
    # other (drop rules), b can only send to one of a's fan ports and only hear
    # from it: the path must go through that port's forwarder.
    async with relayed_pair(PUNCHING) as (a, b, _relay):
        a.traversal.set_nat(NatKind.HARD)
        a.traversal.set_public_addresses([a.local_address])
        b.traversal.set_nat(NatKind.EASY)
        b.traversal.set_public_addresses([b.local_address])
        chosen: list[Address] = []
        a_main, b_main = a.local_address, b.local_address
        drop_sends(a, lambda address: address == b_main)
        drop_sends(b, lambda address: address != (chosen[0] if chosen else None))
        received = b._datagram_received

        def b_receives(data: bytes, source: Address, now: float) -> None:
            if source == a_main or (chosen and source != chosen[0]):
                return  # b's filter: only the chosen port gets in
            received(data, source, now)

        b._datagram_received = b_receives  # type: ignore[method-assign]
        # The spray is replaced by the one probe that hits (the odds are in test_paths).
        b.paths._spray_probes = 0

        with trio.fail_after(30):
            dialer = await a.connect(b.node_id, None)
            acceptor = await b.accept()
            await eventually(lambda: len(a.traversal.fan_ports(b.node_id)) > 100)
            chosen.append(a.traversal.fan_ports(b.node_id)[17])
            b.traversal._ping(a.node_id, chosen[0])  # the spray probe that hits
            await eventually(lambda: direct(a, b))
            now = trio.current_time()
            forwarder = a.paths.route(b.node_id, now)
            assert b.paths.route(a.node_id, now) == chosen[0]
            assert isinstance(forwarder, tuple) and forwarder[0] == "127.0.0.1"
            path = next(p for p in a.paths.paths(b.node_id, now) if p.address == forwarder)
            assert path.origin is Origin.PORT_FAN and path.remote == b.local_address
            await eventually(lambda: len(a.traversal.fan_ports(b.node_id)) == 1)
            payload = random.Random(3).randbytes(512 * 1024)
            await transfer(dialer, acceptor, payload)
            await transfer(acceptor, dialer, payload)
        assert dialer.path == acceptor.path == "direct"
        assert a.traversal.stats.fan_forwarded > 2 * len(payload) // 1500
        report = a.paths.report(b.node_id, trio.current_time())
        assert report is not None and report.address == b.local_address
