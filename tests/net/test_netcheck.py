"""Netcheck: the probe plan sans-IO against simulated NATs, then the shells against relayd."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from p2psync.crypto.identity import Identity
from p2psync.net.endpoint import EndpointConfig, open_endpoint
from p2psync.net.netcheck import NatKind, NetcheckProbe
from p2psync.net.netcheck_shell import netcheck_on_endpoint, netcheck_on_new_socket
from p2psync.net.stun import answer_binding, binding_success
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses, serve

SERVER = ("203.0.113.1", 3478)
ALT = 3479
LOCAL = ("10.0.0.2", 40000)

# What the relay sees of us per destination port: the NAT's mapping.
Mapping = Callable[[tuple[str, int]], tuple[str, int]]


def easy(destination: tuple[str, int]) -> tuple[str, int]:
    return ("198.51.100.7", 50000)


def hard(destination: tuple[str, int]) -> tuple[str, int]:
    return ("198.51.100.7", 50000 + destination[1] % 100)


def no_nat(destination: tuple[str, int]) -> tuple[str, int]:
    return LOCAL


def run(
    mapping: Mapping | None,
    *,
    alt_port: int | None = ALT,
    answer_alt: bool = True,
    hairpin: bool = False,
    loss: float = 0.0,
    seed: int = 1,
) -> tuple[NetcheckProbe, float, int]:
    """Step the probe with a 50 ms RTT network; return it, when it finished, datagrams sent."""
    rng = random.Random(seed)
    now = 0.0
    probe = NetcheckProbe(
        SERVER,
        alt_port,
        local=LOCAL,
        local_ips=[LOCAL[0]],
        random_bytes=rng.randbytes,
        now=now,
    )
    inbox: list[tuple[float, bytes, tuple[str, int]]] = []
    sent = 0
    while not probe.done(now):
        for data, destination in probe.datagrams_to_send(now):
            sent += 1
            if mapping is None or rng.random() < loss:
                continue
            if destination == SERVER or (destination == (SERVER[0], ALT) and answer_alt):
                reply = answer_binding(data, mapping(destination))
                assert reply is not None
                inbox.append((now + 0.05, reply, destination))
            elif hairpin and destination == mapping(SERVER):
                inbox.append((now + 0.001, data, mapping(destination)))
        deadline = probe.next_deadline(now)
        assert deadline is not None and deadline >= now
        due = [m for m in inbox if m[0] <= deadline]
        if due:
            first = min(due)
            inbox.remove(first)
            now = first[0]
            probe.receive(first[1], first[2], now)
        else:
            now = deadline
    return probe, now, sent


def test_easy_nat_with_hairpinning() -> None:
    probe, took, _ = run(easy, hairpin=True)
    report = probe.report()
    assert report.nat is NatKind.EASY
    assert report.public == (("198.51.100.7", 50000),)
    assert report.rtt_ms == 50.0
    assert report.hairpin is True
    assert report.answered == ("main", "alt")
    assert took < 0.2  # no waiting for timeouts on a healthy network
    assert report.to_json()["nat"] == "easy"


def test_hard_nat_without_hairpinning() -> None:
    probe, took, _ = run(hard)
    report = probe.report()
    assert report.nat is NatKind.HARD
    assert report.public == (("198.51.100.7", 50078), ("198.51.100.7", 50079))
    assert report.hairpin is False
    assert took < 2.1  # three hairpin attempts, 0.5 s apart, the last given 1 s more
    assert "hard NAT" in report.explain()


def test_no_nat_sends_no_hairpin_probe() -> None:
    probe, _, sent = run(no_nat)
    report = probe.report()
    assert report.nat is NatKind.NONE and report.hairpin is None
    assert sent == 2


def test_udp_blocked_after_the_timeout() -> None:
    probe, took, sent = run(None)
    report = probe.report()
    assert report.nat is NatKind.UDP_BLOCKED
    assert report.public == () and report.rtt_ms is None and report.hairpin is None
    assert took == 3.0
    assert sent == 6  # three attempts to each port
    assert "UDP seems blocked" in report.explain()


@pytest.mark.parametrize(("alt_port", "answer_alt"), [(None, True), (ALT, False)])
def test_one_port_only_is_unknown(alt_port: int | None, answer_alt: bool) -> None:
    probe, took, _ = run(easy, alt_port=alt_port, answer_alt=answer_alt)
    report = probe.report()
    assert report.nat is NatKind.UNKNOWN
    assert report.answered == ("main",)
    assert took < 2.1  # the silent port (and hairpin) given up before the 3 s timeout
    assert "--stun-alt-port" in report.explain()


def test_lost_requests_are_resent_and_rtt_is_of_the_answered_one() -> None:
    results = [run(easy, loss=0.4, seed=seed)[0].report() for seed in range(30)]
    assert all(r.nat in (NatKind.EASY, NatKind.UNKNOWN, NatKind.UDP_BLOCKED) for r in results)
    assert sum(r.nat is NatKind.EASY for r in results) >= 20
    assert all(r.rtt_ms == 50.0 for r in results if r.rtt_ms is not None)


def test_junk_and_foreign_answers_are_ignored() -> None:
    rng = random.Random(3)
    probe = NetcheckProbe(
        SERVER, ALT, local=LOCAL, local_ips=[LOCAL[0]], random_bytes=rng.randbytes, now=0.0
    )
    probe.datagrams_to_send(0.0)
    assert probe.receive(b"\x00" * 20, SERVER, 0.1) is False
    assert probe.receive(b"junk", SERVER, 0.1) is False
    other = binding_success(b"x" * 12, ("192.0.2.66", 1))  # another transaction
    assert probe.receive(other, SERVER, 0.1) is False
    assert probe.report().nat is NatKind.UDP_BLOCKED


# -- the shells, against a real relayd on loopback ---------------------------------------


@asynccontextmanager
async def running_relay(alt: bool = True) -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(
        listen=HostPort("127.0.0.1", 0),
        http=HostPort("127.0.0.1", 0),
        stun_alt_port=0 if alt else None,
    )
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


async def test_netcheck_from_the_node_socket_and_a_new_socket() -> None:
    async with running_relay() as relay:
        assert relay.stun_alt is not None
        server = (relay.udp.host, relay.udp.port)
        identity = Identity.generate(random.Random(4).randbytes)
        with trio.fail_after(15):
            async with open_endpoint(identity, EndpointConfig(bind_host="127.0.0.1")) as ep:
                report = await netcheck_on_endpoint(ep, server, relay.stun_alt.port)
                assert report.nat is NatKind.NONE  # loopback: the relay sees our own address
                assert report.public == (ep.local_address,)
                assert report.answered == ("main", "alt")
                assert report.rtt_ms is not None and report.rtt_ms < 1000
            fresh = await netcheck_on_new_socket(server, relay.stun_alt.port)
            assert fresh.answered == ("main", "alt")
            assert fresh.nat in (NatKind.NONE, NatKind.EASY)  # 0.0.0.0 bound: seen as 127.0.0.1


async def test_netcheck_without_an_alternate_port_and_against_silence() -> None:
    async with running_relay(alt=False) as relay:
        server = (relay.udp.host, relay.udp.port)
        with trio.fail_after(15):
            report = await netcheck_on_new_socket(server, server[1] + 1)
        assert report.answered == ("main",)
        assert report.nat is NatKind.UNKNOWN or report.nat is NatKind.NONE
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as quiet:
        await quiet.bind(("127.0.0.1", 0))
        with trio.fail_after(15):
            report = await netcheck_on_new_socket(quiet.getsockname(), None)
        assert report.nat is NatKind.UDP_BLOCKED
