"""Gossip over in-memory sessions, and the duplicate-connection rule."""

from __future__ import annotations

import os
import random

import pytest

from p2psync.crypto.identity import Identity
from p2psync.errors import LocalProtocolError
from p2psync.proto.messages import ErrorCode
from p2psync.sync.gossip import Gossip, entry_id_of
from p2psync.sync.rules import keep_connection
from p2psync.sync.session import SyncConfig


def test_line_topology_entry_reaches_the_far_end(make_node, kit, network):
    """A - B - C, A and C not connected: an entry put on A reaches C through B."""
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    ab = network.connect(a, b)
    bc = network.connect(b, c)
    assert b.gossip.peers == {a.node_id, c.node_id}
    raw = a.put("hello", b"from a")
    assert a.gossip.local_entries([raw]) == [b.node_id]
    network.pump()  # no timers: gossip alone carries it
    assert kit.contents(c.store) == {"hello": b"from a"}
    assert bc.acceptor.stats.entries_accepted == 1
    # B forwarded to C only, not back to A; C has nobody else to tell.
    assert ab.acceptor.stats.entries_announced == 0
    assert bc.dialer.stats.entries_announced == 1
    assert bc.acceptor.stats.entries_announced == 0


def test_line_topology_both_directions_and_objects(make_node, kit, network):
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    network.connect(a, b)
    network.connect(b, c)
    a.gossip.local_entries([a.put(f"a{i}", bytes([i]) * 1000) for i in range(5)])
    c.gossip.local_entries([c.put(f"c{i}", bytes([i]) * 2000) for i in range(5)])
    network.pump()
    network.advance(SyncConfig().unavailable_retry)  # in case entries outran objects
    assert kit.contents(a.store) == kit.contents(b.store) == kit.contents(c.store)
    assert len(kit.contents(a.store)) == 10


def test_objects_follow_entries_that_outran_them(make_node, kit, network):
    """C hears of A's entry from B before B has its object: C asks B again later."""
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    ab = network.connect(a, b)
    bc = network.connect(b, c)
    ab.hold_objects = True  # B's fetch from A stalls
    a.gossip.local_entries([a.put("k", b"v" * 100)])
    network.pump()
    assert bc.acceptor.stats.objects_unavailable == 1  # B said NOT_FOUND
    assert c.store.wanted_blobs() != []
    ab.hold_objects = False
    network.pump()
    assert kit.contents(b.store) == {"k": b"v" * 100}
    assert c.store.wanted_blobs() != []  # C waits for its retry time
    network.advance(SyncConfig().unavailable_retry)
    assert kit.contents(c.store) == {"k": b"v" * 100}


def test_one_fetch_per_object_when_two_peers_offer_it(make_node, kit, network):
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    data = random.Random(7).randbytes(5_000_000)  # manifest + 5 distinct chunks
    a.put("big", data)
    network.connect(a, b)  # b fetches everything
    ca = network.connect(c, a, pump=False)
    cb = network.connect(c, b, pump=False)
    network.pump()
    assert kit.contents(c.store) == {"big": data}
    fetched = ca.wanted["a"] + cb.wanted["a"]
    assert len(fetched) == len(set(fetched)) == 6
    assert len(c.claims) == 0


def test_simultaneous_dials_keep_the_lower_node_ids_connection(make_node, network):
    a, b = make_node("a"), make_node("b")
    ab = network.connect(a, b, pump=False)
    ba = network.connect(b, a, pump=False)
    network.pump()
    low = min(a.node_id, b.node_id)
    winner, loser = (ab, ba) if low == a.node_id else (ba, ab)
    assert winner.dialer.established and winner.acceptor.established
    assert loser.closed_codes() == (ErrorCode.DUPLICATE_CONNECTION,) * 2
    assert a.sessions[b.node_id] in (winner.dialer, winner.acceptor)
    assert b.sessions[a.node_id] in (winner.dialer, winner.acceptor)
    raw = a.put("k", b"v")
    a.gossip.local_entries([raw])
    network.pump()
    assert b.store.head("k") is not None


def test_ring_does_not_loop(make_node, kit, network):
    """A triangle: every entry is announced a bounded number of times."""
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    links = [network.connect(a, b), network.connect(b, c), network.connect(c, a)]
    a.gossip.local_entries([a.put("k", b"v")])
    network.pump()
    assert kit.contents(c.store) == kit.contents(b.store) == {"k": b"v"}
    announced = sum(
        s.stats.entries_announced for link in links for s in (link.dialer, link.acceptor)
    )
    assert announced <= 4  # a -> b, a -> c, then at most one forward each


class Recorder:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def announce(self, raws):
        self.got.extend(raws)


def node_id():
    return Identity.generate(os.urandom).node_id


def test_gossip_excludes_the_sender_and_dedupes():
    gossip = Gossip()
    p, q, r = node_id(), node_id(), node_id()
    peers = {p: Recorder(), q: Recorder(), r: Recorder()}
    for n, rec in peers.items():
        gossip.add_peer(n, rec)
    assert sorted(gossip.entries_received(p, [b"e1"])) == sorted([q, r])
    assert peers[p].got == [] and peers[q].got == [b"e1"] == peers[r].got
    assert gossip.entries_received(q, [b"e1"]) == []  # seen: dropped
    assert gossip.local_entries([b"e1", b"e2"]) == [p, q, r]
    assert peers[p].got == [b"e2"]
    gossip.remove_peer(q)
    gossip.local_entries([b"e3"])
    assert peers[q].got == [b"e1", b"e2"]
    with pytest.raises(LocalProtocolError):
        gossip.add_peer(p, Recorder())


def test_gossip_seen_cache_is_bounded():
    gossip = Gossip(seen_cache_size=2)
    peer = Recorder()
    gossip.add_peer(node_id(), peer)
    gossip.local_entries([b"1", b"2", b"3"])  # "1" falls out of the cache
    gossip.local_entries([b"1", b"3"])
    assert peer.got == [b"1", b"2", b"3", b"1"]
    assert len(gossip._seen) == 2
    assert entry_id_of(b"1") in gossip._seen


def test_keep_connection_lower_node_ids_outgoing_wins():
    low, high = sorted([node_id(), node_id()])
    # The connection low dialed: both sides keep it.
    assert keep_connection(low, high, ours_is_outgoing=True) is True
    assert keep_connection(high, low, ours_is_outgoing=False) is True
    # The connection high dialed: both sides drop it.
    assert keep_connection(high, low, ours_is_outgoing=True) is False
    assert keep_connection(low, high, ours_is_outgoing=False) is False
    with pytest.raises(LocalProtocolError):
        keep_connection(low, low, ours_is_outgoing=True)
