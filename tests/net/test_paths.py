"""Path table, sans-IO, with a stepped clock."""

from __future__ import annotations

import random

from p2psync.crypto.identity import Identity, NodeId
from p2psync.net.paths import PathState, PathTable, is_virtual, virtual_address

A = ("192.0.2.1", 1000)
B = ("198.51.100.2", 2000)


def node(seed: int) -> NodeId:
    return Identity.from_seed(random.Random(seed).randbytes(32)).node_id


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
    table.ping_sent(peer, A, b"t" * 12, 1.0)
    assert table.paths(peer, 1.0)[0].state is PathState.PROBING
    path = table.pong_received(peer, b"t" * 12, A, 1.25)
    assert path is not None
    assert path.state is PathState.VALIDATED
    assert path.rtt == 0.25
    assert table.send_address(peer, 1.5) == A
    # The same pong again (tx id spent) validates nothing.
    assert table.pong_received(peer, b"t" * 12, A, 1.3) is None


def test_pong_from_another_address_or_unknown_tx_does_not_validate() -> None:
    peer = node(1)
    table = PathTable()
    table.ping_sent(peer, A, b"t" * 12, 0.0)
    assert table.pong_received(peer, b"t" * 12, B, 0.1) is None
    assert table.pong_received(peer, b"u" * 12, A, 0.1) is None
    assert table.pong_received(node(2), b"t" * 12, A, 0.1) is None
    assert table.paths(peer, 0.1)[0].state is PathState.PROBING


def test_validation_expires() -> None:
    peer = node(1)
    table = PathTable(validity=10.0)
    table.ping_sent(peer, A, b"t" * 12, 0.0)
    table.pong_received(peer, b"t" * 12, A, 0.1)
    assert table.paths(peer, 10.0)[0].state is PathState.VALIDATED
    assert table.paths(peer, 10.2)[0].state is PathState.UNKNOWN


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


def test_forget() -> None:
    peer = node(1)
    table = PathTable()
    table.ping_received(peer, A, 0.0)
    table.forget(peer)
    assert table.paths(peer, 0.0) == []
    assert table.node_for_source(A, 0.0) is None
