"""SyncSession pairs over real stores, stepping ``now`` by hand."""

from __future__ import annotations

import os
import random
import time

import pytest

from p2psync import defaults
from p2psync.crypto.group import GroupSecret
from p2psync.errors import LocalProtocolError
from p2psync.proto.entry import Kind
from p2psync.proto.messages import (
    Entries,
    ErrorCode,
    FrameDecoder,
    Frontier,
    Hello,
    Role,
    decode_message_untrusted,
    encode_frame,
    encode_message_frame,
)
from p2psync.store import Meta
from p2psync.sync.events import (
    EntriesReceived,
    ObjectStored,
    ObjectWanted,
    PeerVerified,
    ProtocolViolation,
    SessionClosed,
)
from p2psync.sync.session import SessionState, SyncConfig, SyncSession


def kinds(events):
    return [type(e) for e in events]


# --- handshake -------------------------------------------------------------------


def test_handshake_verifies_both_sides(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b)
    assert link.dialer.established and link.acceptor.established
    assert PeerVerified(b.node_id, 1) in link.events["a"]
    assert PeerVerified(a.node_id, 1) in link.events["b"]
    assert link.dialer.their_node == b.node_id
    assert link.acceptor.their_node == a.node_id
    assert a.gossip.peers == {b.node_id} and b.gossip.peers == {a.node_id}


def test_dialer_reaching_another_node_closes_with_wrong_node(make_node, network):
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    link = network.connect(a, b, expected=c.node_id)  # a wants c but reaches b
    # b sees a HELLO addressed to c: refuses before sending any proof.
    assert link.acceptor.close_code == ErrorCode.WRONG_NODE
    assert link.dialer.close_code == ErrorCode.WRONG_NODE
    assert SessionClosed(ErrorCode.WRONG_NODE, link.dialer.close_reason, True) in link.events["a"]
    assert not any(isinstance(e, PeerVerified) for e in link.events["a"] + link.events["b"])


def test_impostor_acceptor_is_rejected_by_the_dialer(make_node, network):
    """b answers claiming to be c (whom a dialed): a refuses with WRONG_NODE."""
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    link = network.connect(a, b, expected=c.node_id, start=False)
    link.dialer.start(network.now)
    hello = link.dialer.data_to_send()
    # The impostor b plays an acceptor that believes it is c's address: it
    # answers a HELLO naming b itself as sender.
    link.acceptor.start(network.now)
    forged = FrameDecoder()
    forged.feed(hello)
    body = forged.next_frame()
    assert body is not None
    msg = decode_message_untrusted(body)
    assert isinstance(msg, Hello)
    link.acceptor.receive_control(
        encode_message_frame(Hello(msg.version, msg.sender, b.node_id, msg.challenge)),
        network.now,
    )
    link.dialer.receive_control(link.acceptor.data_to_send(), network.now)
    assert link.dialer.close_code == ErrorCode.WRONG_NODE
    assert "reached" in link.dialer.close_reason
    violation = next(
        e for e in iter(link.dialer.next_event, None) if isinstance(e, ProtocolViolation)
    )
    assert violation.code == ErrorCode.WRONG_NODE


def test_wrong_group_is_rejected_with_wrong_group(make_node, network):
    a = make_node("a")
    b = make_node("b", GroupSecret.generate(os.urandom))
    link = network.connect(a, b)
    assert link.closed_codes() == (ErrorCode.WRONG_GROUP, ErrorCode.WRONG_GROUP)
    assert not a.gossip.peers and not b.gossip.peers


def test_bad_signature_is_rejected_with_bad_auth(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b, pump=False)

    def flip_signature(data: bytes) -> bytes:
        out = b""
        decoder = FrameDecoder()
        decoder.feed(data)
        while (body := decoder.next_frame()) is not None:
            if body[1] == 2:  # AUTH: [2, sig, ...]; flip a byte inside the signature
                body = body[:10] + bytes([body[10] ^ 1]) + body[11:]
            out += encode_frame(body)
        return out

    link.tamper["a"] = flip_signature
    network.pump()
    assert link.acceptor.close_code == ErrorCode.BAD_AUTH
    assert link.dialer.close_code == ErrorCode.BAD_AUTH  # told by BYE


def test_replayed_handshake_is_rejected_with_replay(make_node, network):
    """An eavesdropper replays the dialer's HELLO and AUTH to the same acceptor."""
    a, b = make_node("a"), make_node("b")
    recorded: list[bytes] = []
    link = network.connect(a, b, pump=False)
    link.tamper["a"] = lambda data: recorded.append(data) or data
    network.pump()
    assert link.acceptor.established
    replay = b"".join(recorded[:2])  # HELLO, then AUTH (+ FRONTIER)

    # Same acceptor node (its challenge cache): the HELLO's challenge is known.
    fresh = network._session(b, Role.ACCEPTOR, None, None)
    fresh.start(network.now)
    fresh.receive_control(replay, network.now)
    assert fresh.close_code == ErrorCode.REPLAY
    assert not any(isinstance(e, PeerVerified) for e in iter(fresh.next_event, None))

    # Even without the cache (a restarted node), the AUTH covers the acceptor's
    # fresh challenge, so the old signature does not verify.
    b.replay = type(b.replay)()
    restarted = network._session(b, Role.ACCEPTOR, None, None)
    restarted.start(network.now)
    restarted.receive_control(replay, network.now)
    assert restarted.close_code == ErrorCode.BAD_AUTH


def test_reflected_challenge_is_rejected(make_node, network):
    """A peer that echoes our challenge back as its own is refused."""
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b, start=False)
    link.dialer.start(network.now)
    hello_frame = link.dialer.data_to_send()
    decoder = FrameDecoder()
    decoder.feed(hello_frame)
    body = decoder.next_frame()
    assert body is not None
    hello = decode_message_untrusted(body)
    assert isinstance(hello, Hello)
    echoed = Hello(hello.version, b.node_id, a.node_id, hello.challenge)
    link.dialer.receive_control(encode_message_frame(echoed), network.now)
    assert link.dialer.close_code == ErrorCode.REPLAY


def test_handshake_timeout(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b, start=False)
    link.dialer.start(network.now)
    deadline = link.dialer.get_timer()
    assert deadline == network.now + defaults.SYNC_HANDSHAKE_TIMEOUT
    link.dialer.handle_timer(deadline - 0.001)
    assert not link.dialer.closed
    link.dialer.handle_timer(deadline)
    assert link.dialer.close_code == ErrorCode.TIMEOUT
    assert link.dialer.get_timer() is None


def test_api_misuse_raises_local_protocol_error(make_node, network):
    a, b = make_node("a"), make_node("b")
    session = network._session(a, Role.DIALER, b.node_id, None)
    with pytest.raises(LocalProtocolError):
        session.receive_control(b"x", 0.0)
    session.start(0.0)
    with pytest.raises(LocalProtocolError):
        session.start(0.0)
    with pytest.raises(LocalProtocolError):
        session.object_received(b"\0" * 32, b"", 0.0)  # never wanted
    with pytest.raises(LocalProtocolError):
        network._session(a, Role.DIALER, None, None)  # a dialer must know whom it dials


def test_messages_out_of_order_close_with_protocol_error(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b, start=False)
    link.acceptor.start(network.now)
    link.acceptor.receive_control(
        encode_frame(b"\x92\x04\x90"), network.now
    )  # ENTRIES [] before HELLO
    assert link.acceptor.close_code == ErrorCode.PROTOCOL_ERROR
    bye = link.acceptor.data_to_send()
    assert bye  # the BYE tells the peer why
    assert link.acceptor.state is SessionState.CLOSED


def test_oversized_frame_closes_with_too_large(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b)
    header = (defaults.SYNC_MAX_CONTROL_FRAME + 1).to_bytes(4, "big")
    link.acceptor.receive_control(header, network.now)
    assert link.acceptor.close_code == ErrorCode.TOO_LARGE


def test_peer_bye_closes_without_reply(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b)
    link.dialer.close(ErrorCode.DUPLICATE_CONNECTION, "duplicate")
    network.pump()
    assert link.acceptor.close_code == ErrorCode.DUPLICATE_CONNECTION
    closed = [e for e in link.events["b"] if isinstance(e, SessionClosed)]
    assert closed == [SessionClosed(ErrorCode.DUPLICATE_CONNECTION, "duplicate", True)]
    assert link.acceptor.data_to_send() == b""


# --- entries --------------------------------------------------------------------------


@pytest.mark.slow
def test_converge_on_1000_entries_both_ways(make_node, kit):
    network = kit.Network()
    a, b = make_node("a"), make_node("b")
    raws_a = [
        a.store.append(Kind.DELETE, Meta(f"a{i}"), now_ms=kit.WALL_MS).entry.encode()
        for i in range(1000)
    ]
    raws_b = [
        b.store.append(Kind.DELETE, Meta(f"b{i}"), now_ms=kit.WALL_MS).entry.encode()
        for i in range(1000)
    ]
    started = time.perf_counter()
    link = network.connect(a, b)
    elapsed = time.perf_counter() - started
    assert a.store.frontier() == b.store.frontier()
    assert a.store.frontier() == {a.node_id: 1000, b.node_id: 1000}
    assert a.store.entries_after(b.node_id, 0, 2000) == raws_b
    assert b.store.entries_after(a.node_id, 0, 2000) == raws_a
    assert link.dialer.stats.entries_sent == 1000
    assert link.acceptor.stats.entries_accepted == 1000
    assert not link.dialer.closed and not link.acceptor.closed
    print(f"2000 entries through a sans-IO pair in {elapsed:.2f}s = {2000 / elapsed:.0f}/s")


def test_entries_and_small_blobs_converge(make_node, kit, network):
    a, b = make_node("a"), make_node("b")
    a.put_many(20, "a")
    b.put_many(15, "b")
    network.connect(a, b)
    assert kit.contents(a.store) == kit.contents(b.store)
    assert len(kit.contents(a.store)) == 35


def test_catch_up_streams_in_bounded_batches(make_node, kit):
    """A small send buffer: data_to_send() yields the catch-up piecewise, in order."""
    config = SyncConfig(send_buffer=1, max_entries_per_message=7)
    network = kit.Network(config=config)
    a, b = make_node("a"), make_node("b")
    raws = [
        a.store.append(Kind.DELETE, Meta(f"k{i}"), now_ms=kit.WALL_MS).entry.encode()
        for i in range(50)
    ]
    link = network.connect(a, b)
    assert b.store.entries_after(a.node_id, 0, 100) == raws
    received = [e for e in link.events["b"] if isinstance(e, EntriesReceived)]
    assert [len(e.accepted) for e in received] == [7] * 7 + [1]


def test_entries_messages_read_together_are_stored_as_one_batch(make_node, kit):
    """Eight ENTRIES messages arriving in one read: one insert, one event, same result."""
    network = kit.Network(config=SyncConfig(max_entries_per_message=7))
    a, b = make_node("a"), make_node("b")
    raws = [
        a.store.append(Kind.DELETE, Meta(f"k{i}"), now_ms=kit.WALL_MS).entry.encode()
        for i in range(50)
    ]
    link = network.connect(a, b)
    assert b.store.entries_after(a.node_id, 0, 100) == raws
    received = [e for e in link.events["b"] if isinstance(e, EntriesReceived)]
    assert [e.accepted for e in received] == [tuple(raws)]
    assert link.acceptor.stats.entries_accepted == 50


def test_entries_before_a_malformed_message_are_stored_then_the_session_closes(
    make_node, kit, network
):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b)
    raws = [
        a.store.append(Kind.DELETE, Meta(f"k{i}"), now_ms=kit.WALL_MS).entry.encode()
        for i in range(3)
    ]
    data = (
        encode_message_frame(Entries(tuple(raws[:2])))
        + encode_message_frame(Entries(tuple(raws[2:])))
        + encode_frame(b"\xc1")  # not msgpack
        + encode_message_frame(Entries(tuple(raws)))  # after the fault: never looked at
    )
    link.acceptor.receive_control(data, network.now)
    assert b.store.entries_after(a.node_id, 0, 10) == raws
    assert link.acceptor.close_code == ErrorCode.PROTOCOL_ERROR
    events = list(iter(link.acceptor.next_event, None))
    assert kinds(events)[-3:] == [EntriesReceived, ProtocolViolation, SessionClosed]
    assert link.acceptor.stats.entries_duplicate == 0


def test_duplicated_entries_messages_are_harmless(make_node, kit, network):
    a, b = make_node("a"), make_node("b")
    a.put_many(30)
    link = network.connect(a, b, pump=False)

    def duplicate_entries(data: bytes) -> bytes:
        out = b""
        decoder = FrameDecoder()
        decoder.feed(data)
        while (body := decoder.next_frame()) is not None:
            out += encode_frame(body)
            if isinstance(decode_message_untrusted(body), Entries):
                out += encode_frame(body)
        return out

    link.tamper["a"] = duplicate_entries
    network.pump()
    assert kit.contents(b.store) == kit.contents(a.store)
    assert link.acceptor.stats.entries_duplicate == 30
    assert link.acceptor.stats.entries_accepted == 30
    assert not link.acceptor.closed


def test_byte_at_a_time_delivery(make_node, kit, network):
    a, b = make_node("a"), make_node("b")
    a.put_many(5, "a")
    b.put_many(5, "b")
    network.connect(a, b, split=kit.byte_splitter)
    assert kit.contents(a.store) == kit.contents(b.store)
    assert len(kit.contents(b.store)) == 10


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_split_delivery(make_node, kit, network, seed):
    a, b = make_node("a"), make_node("b")
    a.put_many(40, "a")
    b.put_many(40, "b")
    link = network.connect(a, b, split=kit.random_splitter(random.Random(seed)))
    assert kit.contents(a.store) == kit.contents(b.store)
    assert len(kit.contents(a.store)) == 80
    assert not link.dialer.closed


def test_announce_pushes_new_entries(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b)
    raw = a.put("late", b"news")
    assert a.gossip.local_entries([raw]) == [b.node_id]
    network.pump()
    assert b.store.head("late") is not None
    assert link.acceptor.stats.entries_accepted == 1
    assert b"".join(b.store.iter_blob(b.store.head("late").entry.blob)) == b"news"


def test_gap_in_announces_is_repaired_by_frontier(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b)
    first = a.store.append(Kind.DELETE, Meta("x"), now_ms=1).entry.encode()
    second = a.store.append(Kind.DELETE, Meta("y"), now_ms=1).entry.encode()
    del first  # lost: only the second is announced
    link.dialer.announce([second])
    network.pump()
    assert b.store.frontier().get(a.node_id, 0) == 0  # seq 2 without seq 1: rejected
    assert link.acceptor.get_timer() <= network.now + defaults.SYNC_REPAIR_MIN_INTERVAL
    network.advance(defaults.SYNC_REPAIR_MIN_INTERVAL)
    assert b.store.frontier()[a.node_id] == 2


def test_anti_entropy_repairs_what_gossip_missed(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b)
    a.put_many(3, "quiet")  # not announced
    network.advance(defaults.SYNC_ANTI_ENTROPY_INTERVAL / 2)
    assert b.store.frontier() == {}
    network.advance(defaults.SYNC_ANTI_ENTROPY_INTERVAL / 2)
    assert b.store.frontier() == {a.node_id: 3}
    assert link.dialer.stats.frontiers_sent == 2


def test_invalid_entries_close_with_protocol_error(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b)
    raw = a.store.append(Kind.DELETE, Meta("x"), now_ms=1).entry.encode()
    forged = raw[:-1] + bytes([raw[-1] ^ 1])  # break the signature
    link.dialer.announce([forged])
    network.pump()
    assert link.acceptor.close_code == ErrorCode.PROTOCOL_ERROR
    assert b.store.frontier() == {}


# --- objects -----------------------------------------------------------------------------


def test_multi_chunk_blob_transfers_object_by_object(make_node, network):
    a, b = make_node("a"), make_node("b")
    data = random.Random(5).randbytes(5 * defaults.CHUNK_SIZE + 12345)
    a.put("big", data)
    link = network.connect(a, b)
    wanted = link.wanted["b"]
    assert len(wanted) == 7  # manifest, then 6 chunks
    assert len(set(wanted)) == 7
    head = b.store.head("big")
    assert wanted[0] == head.entry.blob  # the root first: it names the chunks
    assert b"".join(b.store.iter_blob(head.entry.blob)) == data
    assert link.acceptor.stats.objects_stored == 7
    assert b.store.wanted_blobs() == []


def test_object_window_bounds_objects_in_flight(make_node, kit):
    network = kit.Network(config=SyncConfig(object_window=3))
    a, b = make_node("a"), make_node("b")
    for i in range(10):
        a.put(f"k{i}", bytes([i]) * 100)
    link = network.connect(a, b, pump=False)
    peak = 0
    original = network._serve_one

    def serve(link_):
        nonlocal peak
        peak = max(peak, len(link.acceptor.objects_in_flight))
        original(link_)

    network._serve_one = serve
    network.pump()
    assert peak == 3
    assert len(kit.contents(b.store)) == 10


@pytest.mark.parametrize("how", ["connection-lost", "process-restart"])
def test_resume_fetches_only_missing_objects(make_node, network, how):
    a, b = make_node("a"), make_node("b")
    data = random.Random(6).randbytes(5 * defaults.CHUNK_SIZE)
    a.put("big", data)
    first = network.connect(a, b, pump=False)
    network.pump(max_objects=3)  # manifest + 2 chunks arrive, then the transfer dies
    stored = [e.oid for e in first.events["b"] if isinstance(e, ObjectStored)]
    assert len(stored) == 3
    assert len(first.acceptor.objects_in_flight) > 0  # mid-transfer
    network.disconnect(first)
    assert first.acceptor.closed  # the shell called connection_lost()
    if how == "connection-lost":
        assert len(b.claims) == 0  # the session released what it was fetching
    else:  # a new process: nothing survives but the store
        b = type(b)(b.name, b.store)

    second = network.connect(a, b)
    again = second.wanted["b"]
    assert set(again).isdisjoint(stored)
    assert len(again) == 3  # the three chunks still missing
    blob = b.store.head("big").entry.blob
    assert b"".join(b.store.iter_blob(blob)) == data


def test_bad_object_closes_peer_and_object_stays_missing(make_node, network):
    a, b = make_node("a"), make_node("b")
    a.put("k", b"hello")
    link = network.connect(a, b, pump=False)
    network.pump(max_objects=0)
    assert link.pending
    _, oid = link.pending.pop(0)
    link.acceptor.object_received(oid, b"garbage", network.now)
    assert link.acceptor.close_code == ErrorCode.BAD_OBJECT
    assert link.acceptor.stats.bad_objects == 1
    assert b.store.wanted_blobs() == [oid]  # fetched again from another peer later
    events = list(iter(link.acceptor.next_event, None))
    assert ProtocolViolation in kinds(events) and SessionClosed in kinds(events)


def test_not_found_is_asked_again_after_a_delay(make_node, network):
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    a.put("k", b"only on a")
    network.connect(a, b, pump=False)
    network.pump(max_objects=0)  # b has the entry, not the object
    ab = network.links[0]
    ab.pending.clear()
    network.disconnect(ab)
    link = network.connect(c, b)  # c has nothing: NOT_FOUND
    assert link.acceptor.stats.objects_unavailable == 1
    assert len(link.wanted["b"]) == 1
    network.pump()
    assert len(link.wanted["b"]) == 1  # not asked again at once
    retry = SyncConfig().unavailable_retry
    assert link.acceptor.get_timer() == network.now + retry
    network.advance(retry / 2)
    assert len(link.wanted["b"]) == 1
    network.advance(retry / 2)
    assert len(link.wanted["b"]) == 2  # asked again after the retry delay
    network.advance(defaults.SYNC_ANTI_ENTROPY_INTERVAL)
    assert len(link.wanted["b"]) > 2


def test_objects_arriving_after_close_are_ignored(make_node, network):
    a, b = make_node("a"), make_node("b")
    a.put("k", b"v")
    link = network.connect(a, b, pump=False)
    network.pump(max_objects=0)
    _, oid = link.pending.pop(0)
    link.acceptor.close()
    link.acceptor.object_received(oid, b"late", network.now)  # no raise
    link.acceptor.object_failed(oid, network.now)
    assert link.acceptor.close_code == ErrorCode.OK


def test_session_without_group_is_refused(tmp_path):
    from p2psync.crypto.identity import Identity
    from p2psync.store import Store

    store = Store(tmp_path, Identity.generate(os.urandom), [])
    with pytest.raises(LocalProtocolError):
        SyncSession(
            identity=store.identity,
            keyring=store.keyring,
            store=store,
            role=Role.ACCEPTOR,
            random_bytes=os.urandom,
            wall_clock_ms=lambda: 0,
        )
    store.close()


def test_wanted_events_are_object_wanted(make_node, network):
    a, b = make_node("a"), make_node("b")
    a.put("k", b"x")
    link = network.connect(a, b)
    assert [e for e in link.events["b"] if isinstance(e, ObjectWanted)] == [
        ObjectWanted(b.store.head("k").entry.blob)
    ]


def test_malformed_object_answer_closes_with_bad_object(make_node, network):
    a, b = make_node("a"), make_node("b")
    a.put("k", b"v")
    link = network.connect(a, b, pump=False)
    network.pump(max_objects=0)
    _, oid = link.pending.pop(0)
    link.acceptor.object_failed(oid, network.now, peer_fault="answer names another object")
    assert link.acceptor.close_code == ErrorCode.BAD_OBJECT
    assert link.acceptor.stats.bad_objects == 1


def test_frontier_in_parts_with_many_authors(make_node, kit):
    network = kit.Network(config=SyncConfig(frontier_authors_per_message=1))
    a, b, c, d = (make_node(n) for n in "abcd")
    for node in (b, c, d):  # a learns three authors
        node.put_many(2, node.name)
        network.connect(node, a)
    assert len(a.store.frontier()) == 4 - 1  # a itself has written nothing
    e = make_node("e")
    link = network.connect(a, e, pump=False)
    frontiers: list[Frontier] = []

    def record(data: bytes) -> bytes:
        decoder = FrameDecoder()
        decoder.feed(data)
        for body in iter(decoder.next_frame, None):
            message = decode_message_untrusted(body)
            if isinstance(message, Frontier):
                frontiers.append(message)
        return data

    link.tamper["a"] = record
    network.pump()
    assert e.store.frontier() == a.store.frontier()
    assert link.dialer.stats.frontiers_sent == 1  # one frontier, sent in 3 parts
    assert [len(f.seqs) for f in frontiers] == [1, 1, 1]
    assert [f.final for f in frontiers] == [False, False, True]


def test_frontier_over_the_author_limit_closes_with_too_large(make_node, kit):
    network = kit.Network(config=SyncConfig(max_frontier_authors=2))
    a, b = make_node("a"), make_node("b")
    for name in "xyz":
        other = make_node(name)
        other.put_many(1, name)
        network.connect(other, a)
    link = network.connect(a, b)
    assert link.acceptor.close_code == ErrorCode.TOO_LARGE


def test_unsupported_version_is_refused(make_node, network):
    a, b = make_node("a"), make_node("b")
    link = network.connect(a, b, start=False)
    link.acceptor.start(network.now)
    link.acceptor.receive_control(
        encode_message_frame(Hello(2, a.node_id, b.node_id, b"c" * 32)), network.now
    )
    assert link.acceptor.close_code == ErrorCode.UNSUPPORTED_VERSION


def test_connection_lost_releases_everything(make_node, network):
    a, b = make_node("a"), make_node("b")
    a.put("k", b"v")
    link = network.connect(a, b, pump=False)
    network.pump(max_objects=0)
    assert len(b.claims) == 1
    link.acceptor.connection_lost(ErrorCode.INTERNAL, "idle timeout")
    assert len(b.claims) == 0
    assert link.acceptor.get_timer() is None
    events = list(iter(link.acceptor.next_event, None))
    assert events[-1] == SessionClosed(ErrorCode.INTERNAL, "idle timeout", True)
    assert link.acceptor.data_to_send() == b""  # no BYE on a dead connection


def test_objects_a_closed_session_was_fetching_pass_to_another_at_once(make_node, network, kit):
    """b links to a and to c, which both hold a's blob; the session that claimed it dies
    (a duplicate link closed, a peer gone) before the object came. The shell tells b's
    other session (wants_changed), which fetches it then, not at its next timer."""
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    a.put("k", b"shared value")
    to_c = network.connect(c, a)  # c syncs a's entry and blob first
    network.disconnect(to_c)
    from_a = network.connect(a, b, pump=False)
    from_a.hold_objects = True  # b claims the blob over this link; it never arrives
    network.pump()
    assert len(b.claims) == 1 and len(from_a.wanted["b"]) == 1
    from_c = network.connect(c, b)  # c has it too; b's session with c sees nothing new
    assert from_c.wanted["b"] == [] and from_c.acceptor.get_timer() is not None
    network.disconnect(from_a)
    assert len(b.claims) == 0
    from_c.acceptor.wants_changed(network.now)  # what PeerLink does when a link ends
    network.pump()
    assert from_c.wanted["b"] == from_a.wanted["b"]
    assert kit.contents(b.store) == {"k": b"shared value"}


def test_a_peer_repeating_frontier_gets_one_plan_per_interval_and_nothing_is_lost(
    make_node, network
):
    a, b = make_node("a"), make_node("b")
    a.put_many(50, "a")
    link = network.connect(a, b)
    assert len(b.store.frontier()) == 1  # b caught up
    session = link.session("a")
    sent = session.stats.entries_sent
    # b "forgets" everything, ten times in a row: FRONTIER {a: 0} per message.
    claim = encode_message_frame(Frontier(((a.node_id, 0),), final=True))
    for _ in range(10):
        session.receive_control(claim, network.now)
        network.pump()  # a's shell sends what each plan produces before the next arrives
    first = session.stats.entries_sent - sent
    assert first <= 50  # at most one re-send of the lot (none if the last plan is recent)
    assert session.stats.frontiers_deferred >= 9
    network.advance(defaults.SYNC_FRONTIER_MIN_INTERVAL)  # the newest waiting one is planned
    assert session.stats.entries_sent - sent == first + 50  # once more, not nine times
    assert session.close_code is None
    assert len(b.store.frontier()) == 1
