"""Path table, sans-IO, with a stepped clock: unit rules, then whole punching
plans between two tables in a seeded simulated network with NATs (natsim)."""

from __future__ import annotations

import ipaddress
import random
import statistics

import pytest

from p2psync.crypto.identity import Identity, NodeId
from p2psync.net.disco import Candidate, CandidateKind
from p2psync.net.netcheck import NatKind
from p2psync.net.paths import (
    RELAY,
    ClosePortFan,
    OpenPortFan,
    Origin,
    PathState,
    PathTable,
    SendCallMeMaybe,
    SendPing,
    SprayPings,
    is_virtual,
    virtual_address,
)

from .natsim import SimNode, both_direct, pair

A = ("192.0.2.1", 1000)
B = ("198.51.100.2", 2000)
TX = b"t" * 12


def node(seed: int) -> NodeId:
    return Identity.from_seed(random.Random(seed).randbytes(32)).node_id


def validate(table: PathTable, peer: NodeId, address: tuple[str, int], now: float) -> None:
    tx = random.Random(now).randbytes(12)
    table.ping_sent(peer, address, tx, now)
    assert table.pong_received(peer, tx, address, now + 0.01) is not None


# -- unit rules --------------------------------------------------------------------------


def test_virtual_addresses_are_stable_distinct_and_marked() -> None:
    one, two = node(1), node(2)
    assert virtual_address(one) == virtual_address(one)
    assert virtual_address(one) != virtual_address(two)
    assert is_virtual(virtual_address(one))
    assert not is_virtual(A)
    table = PathTable()
    assert table.node_for_virtual(table.virtual_address(one)) == one
    assert table.node_for_virtual(A) is None


def test_ping_pong_validates_and_measures_rtt() -> None:
    peer = node(1)
    table = PathTable()
    assert table.send_address(peer, 0.0) is None
    table.add_candidate(peer, A, 0.0)
    assert [p.state for p in table.paths(peer, 0.0)] == [PathState.UNKNOWN]
    table.ping_sent(peer, A, TX, 1.0)
    assert table.paths(peer, 1.0)[0].state is PathState.PROBING
    path = table.pong_received(peer, TX, A, 1.25)
    assert path is not None
    assert path.state is PathState.VALIDATED
    assert path.rtt == 0.25
    assert table.send_address(peer, 1.5) == A
    # The same pong again (tx id spent) validates nothing.
    assert table.pong_received(peer, TX, A, 1.3) is None


def test_pong_from_another_address_or_unknown_tx_does_not_validate() -> None:
    peer = node(1)
    table = PathTable()
    table.ping_sent(peer, A, TX, 0.0)
    assert table.pong_received(peer, TX, B, 0.1) is None
    assert table.pong_received(peer, b"u" * 12, A, 0.1) is None
    assert table.pong_received(node(2), TX, A, 0.1) is None
    assert table.paths(peer, 0.1)[0].state is PathState.PROBING


def test_validation_lapses_without_pongs_as_a_backstop() -> None:
    peer = node(1)
    table = PathTable(validity=10.0)
    validate(table, peer, A, 0.0)
    assert table.paths(peer, 10.0)[0].state is PathState.VALIDATED
    path = table.paths(peer, 10.2)[0]
    assert path.state is PathState.FAILED
    assert path.failure == "no pong for 10 s"


def test_missed_heartbeat_pongs_fail_the_path_and_record_why() -> None:
    peer = node(1)
    table = PathTable(heartbeat_interval=2.0, missed_pongs=3)
    table.set_relay(True)
    validate(table, peer, A, 0.0)
    assert table.route(peer, 0.1) == A
    for n, at in enumerate((2.0, 4.0, 6.0)):
        table.ping_sent(peer, A, bytes([n]) * 12, at)
    assert table.route(peer, 7.9) == A  # the third ping still has time to be answered
    assert table.route(peer, 8.0) is RELAY
    report = table.report(peer, 8.0)
    assert report is not None and report.route == "relay"
    assert (
        report.last_failure
        == f"direct path {A[0]}:{A[1]} stopped answering (3 pings without a pong)"
    )
    # One late pong (to the last ping) revives it.
    assert table.pong_received(peer, bytes([2]) * 12, A, 8.5) is not None
    assert table.route(peer, 8.6) == A


def test_send_address_prefers_validated_low_rtt_then_recently_heard() -> None:
    peer = node(1)
    table = PathTable()
    table.ping_sent(peer, A, b"a" * 12, 0.0)
    table.ping_sent(peer, B, b"b" * 12, 0.0)
    table.pong_received(peer, b"a" * 12, A, 0.3)
    table.pong_received(peer, b"b" * 12, B, 0.1)
    assert table.send_address(peer, 0.5) == B  # lower RTT
    other = node(2)
    table.add_candidate(other, A, 0.0)
    table.add_candidate(other, B, 1.0)
    assert table.send_address(other, 2.0) == B  # newest candidate
    table.ping_received(other, A, 3.0)
    assert table.send_address(other, 4.0) == A  # heard from


def test_lan_paths_win_whatever_the_rtt_and_the_choice_does_not_flap() -> None:
    peer = node(1)
    lan = ("10.0.0.7", 47300)
    table = PathTable()
    table.set_our_networks([ipaddress.ip_network("10.0.0.0/24")])
    table.ping_sent(peer, A, b"a" * 12, 0.0)
    table.pong_received(peer, b"a" * 12, A, 0.010)
    table.ping_sent(peer, lan, b"l" * 12, 0.0)
    table.pong_received(peer, b"l" * 12, lan, 0.050)
    assert table.route(peer, 0.1) == lan
    report = table.report(peer, 0.1)
    assert report is not None and report.route == "lan"
    # Between two public paths the current one stays unless another is 30 % faster.
    other = node(2)
    table.ping_sent(other, A, b"c" * 12, 0.0)
    table.pong_received(other, b"c" * 12, A, 0.100)
    assert table.route(other, 0.2) == A
    table.ping_sent(other, B, b"d" * 12, 1.0)
    table.pong_received(other, b"d" * 12, B, 1.080)  # 20 % faster: keep A
    assert table.route(other, 1.1) == A
    table.ping_sent(other, B, b"e" * 12, 2.0)
    table.pong_received(other, b"e" * 12, B, 2.050)  # 50 % faster: switch
    assert table.route(other, 2.1) == B


def test_ping_back_only_with_a_relay_and_only_on_unvalidated_paths_rate_limited() -> None:
    peer = node(1)
    table = PathTable(ping_back_interval=0.2)
    assert table.ping_received(peer, A, 0.0) is False  # no relay: nothing waits for it
    table.set_relay(True)
    assert table.ping_received(peer, A, 0.0) is True
    table.ping_sent(peer, A, TX, 0.0)
    assert table.ping_received(peer, A, 0.1) is False  # just pinged it
    assert table.ping_received(peer, A, 0.3) is True
    table.pong_received(peer, TX, A, 0.3)
    assert table.ping_received(peer, A, 0.4) is False  # validated: no need
    assert table.ping_received(peer, table.virtual_address(peer), 0.5) is False
    relay_server = node(9)
    table.set_relay(True, relay_server)
    assert table.ping_received(relay_server, B, 0.6) is False


def test_source_mapping_from_pings_with_ttl() -> None:
    peer = node(1)
    table = PathTable(source_mapping_ttl=5.0)
    assert table.node_for_source(A, 0.0) is None
    table.ping_received(peer, A, 1.0)
    assert table.node_for_source(A, 5.9) == peer
    assert table.node_for_source(A, 6.1) is None
    assert table.node_for_source(A, 6.2) is None


def test_tables_are_bounded() -> None:
    table = PathTable(max_peers=3, max_addresses_per_peer=2)
    peers = [node(i) for i in range(5)]
    for index, peer in enumerate(peers):
        table.ping_received(peer, ("192.0.2.9", 1000 + index), float(index))
    assert table.paths(peers[0], 5.0) == []
    assert table.node_for_source(("192.0.2.9", 1000), 5.0) is None
    assert table.node_for_source(("192.0.2.9", 1004), 5.0) == peers[4]
    for port in range(10):
        table.add_candidate(peers[4], ("192.0.2.8", port), 6.0)
    assert [p.address[1] for p in table.paths(peers[4], 6.0)] == [8, 9]
    # A validated path is the last to be evicted.
    validate(table, peers[3], A, 7.0)
    for port in range(10):
        table.add_candidate(peers[3], ("192.0.2.8", port), 8.0)
    assert A in [p.address for p in table.paths(peers[3], 8.0)]


def test_forget() -> None:
    peer = node(1)
    table = PathTable()
    table.ping_received(peer, A, 0.0)
    table.forget(peer)
    assert table.paths(peer, 0.0) == []
    assert table.node_for_source(A, 0.0) is None


def test_nothing_is_planned_without_relay_for_the_relay_server_or_without_punching() -> None:
    peer, relay_server = node(1), node(2)
    table = PathTable()
    table.add_candidate(peer, A, 0.0)
    table.traffic(peer, 0.0)
    assert table.poll(0.0) == []  # no relay
    table.set_relay(True, relay_server)
    table.add_candidate(relay_server, B, 0.0)
    table.traffic(relay_server, 0.0)
    assert all(action.node_id != relay_server for action in table.poll(0.1))
    off = PathTable(hole_punching=False)
    off.set_relay(True)
    off.add_candidate(peer, A, 0.0)
    off.traffic(peer, 0.0)
    off.call_me_maybe_received(peer, NatKind.EASY, [Candidate(B, CandidateKind.LOCAL)], 0.0)
    # Without hole punching: no CALL_ME_MAYBE either way, only the given address is tried.
    assert off.poll(0.0) == [SendPing(peer, A)]
    assert [p.address for p in off.paths(peer, 0.0)] == [A]


def test_an_attempt_sends_call_me_maybe_and_pings_every_candidate_then_backs_off() -> None:
    peer = node(1)
    ours = (
        Candidate(("10.0.0.2", 47300), CandidateKind.LOCAL),
        Candidate(A, CandidateKind.REFLEXIVE),
    )
    table = PathTable(punch_window=5.0, probe_interval=0.5, punch_retry_min=10.0)
    table.set_relay(True)
    table.set_our_candidates(ours, 0.0)
    table.set_our_nat(NatKind.EASY, 0.0)
    table.add_candidate(peer, B, 0.0, Origin.LOOKUP, reflexive=True)
    assert table.poll(0.0) == []  # not talking to the peer: nothing to do
    assert table.traffic(peer, 0.0) is True
    actions = table.poll(0.0)
    assert actions == [SendCallMeMaybe(peer, NatKind.EASY, ours), SendPing(peer, B)]
    table.ping_sent(peer, B, b"1" * 12, 0.0)
    assert table.next_deadline() == 0.5
    assert table.poll(0.4) == []
    assert table.poll(0.5) == [SendPing(peer, B)]  # the next probe round, no second CMM
    for step in range(1, 10):
        now = 0.5 * step
        for action in table.poll(now):
            assert isinstance(action, SendPing)
            table.ping_sent(peer, action.address, bytes([step]) * 12, now)
        table.traffic(peer, now)
    assert table.poll(5.0) == []  # the window is over: failed, backing off
    report = table.report(peer, 5.0)
    assert report is not None
    assert report.last_failure == "no pong from 1 candidate(s) within the window"
    assert report.next_attempt_in == 10.0
    assert [c.state for c in report.candidates] == ["failed"]
    table.traffic(peer, 14.0)
    assert table.poll(14.0) == []
    table.traffic(peer, 15.0)
    assert table.poll(15.0)[0] == SendCallMeMaybe(peer, NatKind.EASY, ours)


def test_a_call_me_maybe_starts_punching_at_once_whatever_the_backoff() -> None:
    peer = node(1)
    table = PathTable()
    table.set_relay(True)
    table.traffic(peer, 0.0)
    table.poll(0.0)  # first attempt (no candidates)
    table.poll(5.0)  # ... failed; backing off
    report = table.report(peer, 5.0)
    assert report is not None and report.next_attempt_in is not None
    assert "no candidate address" in (report.last_failure or "")
    theirs = [Candidate(A, CandidateKind.LOCAL), Candidate(B, CandidateKind.REFLEXIVE)]
    table.call_me_maybe_received(peer, NatKind.EASY, theirs, 6.0)
    actions = table.poll(6.0)
    assert isinstance(actions[0], SendCallMeMaybe)
    assert set(actions[1:]) == {SendPing(peer, A), SendPing(peer, B)}
    report = table.report(peer, 6.0)
    assert report is not None and report.their_nat is NatKind.EASY and report.punching


def test_a_new_candidate_is_probed_once_even_during_backoff() -> None:
    peer = node(1)
    table = PathTable()
    table.set_relay(True)
    table.traffic(peer, 0.0)
    table.poll(0.0)
    table.traffic(peer, 5.0)
    table.poll(5.0)  # failed, backing off
    table.add_candidate(peer, A, 6.0, Origin.MDNS)
    table.traffic(peer, 6.0)
    assert table.poll(6.0) == [SendPing(peer, A)]
    table.ping_sent(peer, A, TX, 6.0)
    assert table.poll(6.5) == []


def test_hairpin_candidates_are_skipped_while_a_lan_path_may_work() -> None:
    peer = node(1)
    table = PathTable()
    table.set_relay(True)
    table.set_our_networks([ipaddress.ip_network("10.0.0.0/24")])
    table.set_our_candidates([Candidate(("203.0.113.5", 50000), CandidateKind.REFLEXIVE)], 0.0)
    their_lan, their_public = ("10.0.0.9", 47300), ("203.0.113.5", 50001)
    table.add_candidate(peer, their_lan, 0.0, Origin.LOOKUP)
    table.add_candidate(peer, their_public, 0.0, Origin.LOOKUP, reflexive=True)
    table.traffic(peer, 0.0)
    pinged = {a.address for a in table.poll(0.0) if isinstance(a, SendPing)}
    assert pinged == {their_lan}
    for path in table.paths(peer, 0.0):
        path.state = PathState.FAILED  # the LAN address did not answer: try the hairpin
    table.traffic(peer, 5.0)
    pinged = {a.address for a in table.poll(5.0) if isinstance(a, SendPing)}
    assert their_public in pinged


def test_spray_pongs_validate_only_ports_of_the_sprayed_ip() -> None:
    peer = node(1)
    table = PathTable(spray_probes=32, spray_batch=16, spray_rate=160.0)
    table.set_relay(True)
    table.set_our_nat(NatKind.EASY, 0.0)
    table.call_me_maybe_received(
        peer, NatKind.HARD, [Candidate(("203.0.113.9", 4444), CandidateKind.REFLEXIVE)], 0.0
    )
    table.traffic(peer, 0.0)
    sprays = [a for a in table.poll(0.0) if isinstance(a, SprayPings)]
    assert len(sprays) == 1 and len(sprays[0].addresses) == 16
    assert {address[0] for address in sprays[0].addresses} == {"203.0.113.9"}
    assert all(1024 <= port <= 65535 for _, port in sprays[0].addresses)
    table.spray_sent(peer, sprays[0].addresses, TX, 0.0)
    assert table.next_deadline() == pytest.approx(0.1)
    assert table.pong_received(peer, TX, ("192.0.2.99", 5555), 0.05) is None  # another IP
    assert table.pong_received(peer, b"x" * 12, ("203.0.113.9", 5555), 0.05) is None  # not ours
    path = table.pong_received(peer, TX, ("203.0.113.9", 5555), 0.06)
    assert path is not None and path.origin is Origin.SPRAY
    assert table.route(peer, 0.07) == ("203.0.113.9", 5555)
    assert not any(isinstance(a, SprayPings) for a in table.poll(0.2))  # found: stopped


def test_the_hard_side_opens_a_port_fan_and_keeps_only_the_port_that_works() -> None:
    peer = node(1)
    table = PathTable(hard_nat_ports=8, hard_nat_window=15.0)
    table.set_relay(True)
    table.set_our_nat(NatKind.HARD, 0.0)
    their_public = ("203.0.113.9", 60000)
    table.call_me_maybe_received(
        peer, NatKind.EASY, [Candidate(their_public, CandidateKind.REFLEXIVE)], 0.0
    )
    table.traffic(peer, 0.0)
    fans = [a for a in table.poll(0.0) if isinstance(a, OpenPortFan)]
    assert fans == [OpenPortFan(peer, (their_public,), 8, 15.0)]
    forwarder = ("127.0.0.1", 40001)
    table.port_fan_hit(peer, forwarder, their_public, 1.0)
    assert table.ping_received(peer, forwarder, 1.0) is True  # the peer's spray probe: ping back
    table.ping_sent(peer, forwarder, TX, 1.0)
    table.pong_received(peer, TX, forwarder, 1.05)
    assert table.route(peer, 1.1) == forwarder
    assert ClosePortFan(peer, forwarder) in table.poll(1.1)
    report = table.report(peer, 1.1)
    assert report is not None and report.route == "direct" and report.address == their_public
    # The path breaks later: the last port stays for the rest of the search, then closes.
    for n in range(3):
        table.ping_sent(peer, forwarder, bytes([n]) * 12, 2.0 + 2 * n)
    assert table.route(peer, 9.0) is RELAY
    assert not any(isinstance(a, ClosePortFan) for a in table.poll(9.0))
    assert ClosePortFan(peer, None) in table.poll(15.0)


def test_a_new_public_address_ends_the_backoff() -> None:
    peer = node(1)
    table = PathTable()
    table.set_relay(True)
    table.traffic(peer, 0.0)
    table.poll(0.0)
    table.poll(5.0)  # failed, backing off for 10 s
    table.traffic(peer, 6.0)
    assert table.poll(6.0) == []
    table.set_our_candidates([Candidate(A, CandidateKind.REFLEXIVE)], 7.0)
    assert isinstance(table.poll(7.0)[0], SendCallMeMaybe)


# -- whole plans in a simulated network ------------------------------------------------


def run_pair(
    seed: int, kind_a: str, kind_b: str, *, until: float = 60.0, **options: object
) -> tuple[float | None, SimNode, SimNode]:
    """a looks b up (as a dialer does), both talk every 20 ms; seconds until both direct."""
    net, a, b = pair(seed, kind_a, kind_b, **options)  # type: ignore[arg-type]
    a.lookup(b)
    a.talk(b, 0.02, until)
    b.talk(a, 0.02, until)
    stop = net.run_until(until, stop=lambda: both_direct(a, b))
    return (stop if both_direct(a, b) else None), a, b


@pytest.mark.parametrize("kinds", [("easy", "easy"), ("none", "easy"), ("easy", "none")])
def test_easy_nats_go_direct_within_a_few_round_trips(kinds: tuple[str, str]) -> None:
    # 25 ms each way (50 ms RTT): issue 6 asks for <= 1 s from the first relayed packet.
    times = []
    for seed in range(10):
        took, a, b = run_pair(seed, *kinds, latency=0.025)
        assert took is not None, (seed, a.table.report(b.node_id, a.net.now))
        times.append(took)
        assert a.cmm_sent == b.cmm_sent == 1
        assert a.spray_probes == b.spray_probes == 0
    assert max(times) < 0.3  # about two round trips


def test_easy_easy_under_loss_still_goes_direct() -> None:
    # 10 % loss on every datagram and relay frame: probes repeat for the window, and
    # failed attempts are retried; every seed gets there within a minute.
    times = []
    for seed in range(20):
        took, _, _ = run_pair(seed, "easy", "easy", loss=0.10, latency=0.05, until=60.0)
        assert took is not None, seed
        times.append(took)
    assert statistics.median(times) < 1.0


@pytest.mark.parametrize("kinds", [("easy", "hard"), ("hard", "easy"), ("none", "hard")])
def test_one_hard_nat_is_beaten_by_the_birthday_search(kinds: tuple[str, str]) -> None:
    times = []
    for seed in range(20):
        took, a, b = run_pair(seed, *kinds)
        assert took is not None and took <= 20.0, seed
        times.append(took)
        sprayer, fan = (a, b) if kinds[1] == "hard" else (b, a)
        assert 0 < sprayer.spray_probes <= 2048
        assert len(fan.fans) <= 1  # only the forwarder that carries the path is left
    assert statistics.median(times) < 5.0


def test_hard_on_both_sides_stays_relayed_and_says_why() -> None:
    took, a, b = run_pair(7, "hard", "hard", until=120.0)
    assert took is None
    assert a.table.route(b.node_id, a.net.now) is RELAY
    report = a.table.report(b.node_id, a.net.now)
    assert report is not None and report.their_nat is NatKind.HARD
    assert report.last_failure is not None and "both sides behind hard NAT" in report.last_failure
    first = b.table.report(a.node_id, a.net.now)
    assert first is not None and first.last_failure_at is not None
    assert a.spray_probes == b.spray_probes == 0 and not a.fans and not b.fans
    assert a.cmm_sent <= 4  # backoff: attempts at 0, 15, 40, 85 s
    assert a.direct_datagrams == b.direct_datagrams == 0


def test_no_search_before_our_netcheck_and_hard_hard_is_called_at_once() -> None:
    peer = node(1)
    table = PathTable(punch_window=5.0)
    table.set_relay(True)
    their_public = Candidate(("203.0.113.9", 4444), CandidateKind.REFLEXIVE)
    table.call_me_maybe_received(peer, NatKind.HARD, [their_public], 0.0)
    table.traffic(peer, 0.0)
    actions = table.poll(0.0)  # punching, but no spray: we may be behind a hard NAT too
    assert not any(isinstance(a, SprayPings | OpenPortFan) for a in actions)
    pings = [a for a in actions if isinstance(a, SendPing)]
    assert pings
    for ping in pings:
        table.ping_sent(peer, ping.address, TX, 0.0)
    table.set_our_nat(NatKind.HARD, 1.0)  # netcheck: hard. Both hard: no direct path
    actions = table.poll(1.0)
    assert actions == [SendCallMeMaybe(peer, NatKind.HARD, ())]  # the peer learns why too
    report = table.report(peer, 1.0)
    assert report is not None and not report.punching and report.last_failure_at == 1.0
    assert report.last_failure is not None and "both sides behind hard NAT" in report.last_failure
    assert table.poll(2.0) == []  # backing off, nothing sent


def test_a_lan_candidate_keeps_a_hard_hard_attempt_going() -> None:
    peer = node(1)
    table = PathTable(punch_window=5.0)
    table.set_relay(True)
    table.set_our_networks([ipaddress.ip_network("10.0.0.0/24")])
    table.set_our_nat(NatKind.HARD, 0.0)
    lan = Candidate(("10.0.0.7", 47300), CandidateKind.LOCAL)
    table.call_me_maybe_received(peer, NatKind.HARD, [lan], 0.0)
    table.traffic(peer, 0.0)
    assert SendPing(peer, lan.address) in table.poll(0.0)
    report = table.report(peer, 0.0)
    assert report is not None and report.punching and report.last_failure is None


def test_a_failed_search_gives_up_within_20_s_and_stays_relayed() -> None:
    net, a, b = pair(3, "easy", "hard")
    net.blocked.add(frozenset({"198.51.100.1", "198.51.100.2"}))  # no UDP between the sites
    a.lookup(b)
    a.talk(b, 0.02, 60.0)
    b.talk(a, 0.02, 60.0)
    net.run_until(20.0)
    assert a.table.route(b.node_id, 20.0) is RELAY
    report = a.table.report(b.node_id, 20.0)
    assert report is not None and not report.punching
    assert report.last_failure == (
        "peer behind hard NAT, probe budget exhausted (2048 probes to its ports, none answered)"
    )
    assert a.spray_probes == 2048
    assert not b.fans  # the hard side closed its ports
    fan_report = b.table.report(a.node_id, 20.0)
    assert fan_report is not None and "we are behind hard NAT" in (fan_report.last_failure or "")
    spent = a.spray_probes
    net.run_until(60.0)
    assert a.spray_probes == spent  # no second search for PATHS_HARD_NAT_RETRY


def test_same_lan_takes_the_lan_path_and_never_hairpins() -> None:
    net, a, b = pair(5, "easy", "easy", same_site=True, hairpin=True)
    a.lookup(b)  # knows b's LAN address and b's public (hairpin) address
    a.talk(b, 0.02, 10.0)
    b.talk(a, 0.02, 10.0)
    sent_to_public: list[tuple[str, int]] = []
    original = net.send

    def watch(sender: SimNode, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        if dst[0] == "198.51.100.1":
            sent_to_public.append(dst)
        original(sender, src, dst, data)

    net.send = watch  # type: ignore[method-assign]
    net.run_until(10.0)
    assert a.table.route(b.node_id, 10.0) == b.address
    assert b.table.route(a.node_id, 10.0) == a.address
    report = a.table.report(b.node_id, 10.0)
    assert report is not None and report.route == "lan"
    assert sent_to_public == []


def test_a_broken_direct_path_falls_back_within_seconds_and_recovers() -> None:
    net, a, b = pair(11, "easy", "easy")
    a.lookup(b)
    a.talk(b, 0.02, 200.0)
    b.talk(a, 0.02, 200.0)
    net.run_until(5.0)
    assert both_direct(a, b)
    direct_before = a.direct_datagrams
    net.blocked.add(frozenset({"198.51.100.1", "198.51.100.2"}))
    broke = net.now
    fell_back = net.run_until(60.0, stop=lambda: a.table.route(b.node_id, net.now) is RELAY)
    assert fell_back - broke <= 8.5  # 3 heartbeats of 2 s unanswered, the last for 2 s
    report = a.table.report(b.node_id, fell_back)
    assert report is not None and "stopped answering" in (report.last_failure or "")
    assert a.direct_datagrams > direct_before  # QUIC kept going (lost) until then ...
    relayed = a.relayed_datagrams
    net.run_until(fell_back + 5.0)
    assert a.relayed_datagrams > relayed + 100  # ... and on the relay after: no gap
    net.blocked.clear()  # the network heals: a later attempt (backoff) goes direct again
    healed = net.now
    back = net.run_until(200.0, stop=lambda: both_direct(a, b))
    assert both_direct(a, b) and back - healed <= 60.0


def test_a_rebound_nat_recovers_the_direct_path() -> None:
    net, a, b = pair(13, "easy", "easy")
    a.lookup(b)
    a.talk(b, 0.02, 300.0)
    b.talk(a, 0.02, 300.0)
    net.run_until(5.0)
    assert both_direct(a, b)
    a.nat.rebind()  # a's public port changes
    net.run_until(20.0)
    # The daemon's netcheck (re-run after the path broke) learns the new address;
    # the new CALL_ME_MAYBE carries it and b punches to it.
    a.set_netcheck(NatKind.EASY, a.public_address())
    recovered = net.run_until(120.0, stop=lambda: both_direct(a, b))
    assert both_direct(a, b) and recovered < 40.0


@pytest.mark.parametrize(("keepalive", "survives"), [(25.0, True), (35.0, False)])
def test_keepalives_hold_a_30s_nat_mapping_for_a_quiet_peer(
    keepalive: float, survives: bool
) -> None:
    # One datagram every 40 s (quieter than the busy window, not idle): only the
    # keep-alive refreshes the NATs' 30 s mappings between them.
    net, a, b = pair(17, "easy", "easy", keepalive_interval=keepalive)
    a.lookup(b)
    a.talk(b, 0.02, 3.0)
    b.talk(a, 0.02, 3.0)
    net.run_until(3.0)
    assert both_direct(a, b)
    for start in range(40, 400, 40):
        net.at(float(start), lambda: a.talk(b, 100.0, 0.0))
        net.at(float(start), lambda: b.talk(a, 100.0, 0.0))
    failures = 0
    for second in range(4, 400):
        net.run_until(float(second))
        report = a.table.report(b.node_id, net.now)
        assert report is not None
        failures += report.route != "direct"
    assert (failures == 0) is survives


def test_sprays_at_once_are_capped_whoever_asks() -> None:
    # A CALL_ME_MAYBE can come from any NodeId: hostile ones claiming a hard NAT at
    # a victim's IP get at most max_sprays searches running at once.
    table = PathTable(max_sprays=2)
    table.set_relay(True)
    table.set_our_nat(NatKind.EASY, 0.0)
    victim = [Candidate(("192.0.2.200", 4444), CandidateKind.REFLEXIVE)]
    for seed in range(5):
        table.call_me_maybe_received(node(seed), NatKind.HARD, victim, 0.0)
        table.traffic(node(seed), 0.0)
    sprayed = {a.node_id for a in table.poll(0.0) if isinstance(a, SprayPings)}
    assert len(sprayed) == 2


def test_the_address_the_peer_pings_from_wins_over_a_stale_faster_one() -> None:
    # The peer restarted (or its NAT rebound): its old address still looks validated,
    # and has the lower RTT, but its pings now come from the new one.
    peer = node(1)
    old, new = ("192.0.2.1", 1000), ("192.0.2.1", 2000)
    table = PathTable()
    table.set_relay(True)
    table.ping_received(peer, old, 0.0)
    table.ping_sent(peer, old, b"o" * 12, 0.0)
    table.pong_received(peer, b"o" * 12, old, 0.005)
    assert table.route(peer, 0.1) == old
    assert table.ping_received(peer, new, 1.0) is True  # ping back to validate it
    table.ping_sent(peer, new, b"n" * 12, 1.0)
    table.pong_received(peer, b"n" * 12, new, 1.050)  # 10x the RTT, and alive
    assert table.route(peer, 1.1) == new
    report = table.report(peer, 1.1)
    assert report is not None and report.since == 1.050
