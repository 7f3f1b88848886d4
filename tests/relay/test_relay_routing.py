"""relayd.routing.Router driven by hand, with stepped time: no sockets, no clock."""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field

import pytest

from p2psync.crypto.identity import Identity, NodeId
from p2psync.errors import LocalProtocolError
from p2psync.proto.relay import (
    FLAG_UDP_DATAGRAMS,
    Auth,
    Challenge,
    Error,
    Hello,
    Lookup,
    LookupResult,
    NotHere,
    Ping,
    Pong,
    Recv,
    RelayErrorCode,
    RelayToNode,
    Send,
    Welcome,
    auth_input,
    encode_datagram_from_relay,
    encode_datagram_to_relay,
)
from relayd.routing import (
    AccessPolicy,
    AuthFailure,
    DatagramDrop,
    DropReason,
    Router,
    RoutingLimits,
)

RELAY = Identity.generate(os.urandom)
LIMITS = RoutingLimits(
    frames_per_second=10,
    frame_burst=20,
    bytes_per_second=10_000,
    byte_burst=20_000,
    max_payload=1500,
    queue_per_destination=4,
    control_queue=4,
    notice_interval=1.0,
)


_COUNTER = itertools.count()


def counting_random(n: int) -> bytes:
    """Distinct, predictable "random" bytes: the router never reads real entropy."""
    return next(_COUNTER).to_bytes(n, "big")


@dataclass
class Node:
    """A fake node: its identity and the connection handle it holds at the relay."""

    identity: Identity
    handle: str
    observed: tuple[str, int] = ("203.0.113.1", 40000)
    inbox: list[RelayToNode] = field(default_factory=list)

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id


class Harness:
    def __init__(self, limits: RoutingLimits = LIMITS, policy: AccessPolicy | None = None):
        self.router: Router[str] = Router(RELAY.node_id, limits, counting_random, policy)
        self.now = 0.0
        self.closed: dict[str, RelayErrorCode] = {}

    def drain(self, node: Node) -> list[RelayToNode]:
        """Everything the writer would send to ``node`` now (recording a close)."""
        out: list[RelayToNode] = []
        while True:
            messages, code = self.router.take(node.handle)
            out += messages
            if code is not None:
                self.closed[node.handle] = code
            if not messages:
                break
        node.inbox += out
        return out

    def connect(
        self,
        node: Node,
        *,
        token: bytes | None = None,
        bad_signature: bool = False,
        flags: int | None = None,
        signed_flags: int | str | None = "same",
    ) -> list[RelayToNode]:
        router = self.router
        router.open(node.handle, node.observed, self.now)
        assert router.receive(node.handle, Hello(), self.now) == [node.handle]
        (challenge,) = self.drain(node)
        assert isinstance(challenge, Challenge)
        assert challenge.observed == node.observed
        signed_with = flags if signed_flags == "same" else signed_flags
        assert not isinstance(signed_with, str)
        signed = auth_input(challenge.nonce, node.node_id, RELAY.node_id, signed_with)
        signature = node.identity.sign(signed)
        if bad_signature:
            signature = bytes([signature[0] ^ 1]) + signature[1:]
        router.receive(
            node.handle,
            Auth(node.node_id, signature, token, (("192.168.1.5", 4000),), flags),
            self.now,
        )
        return self.drain(node)

    def send(self, src: Node, dst: Node, payload: bytes = b"p") -> list[str]:
        return self.router.receive(src.handle, Send(dst.node_id, payload), self.now)


def make_node(handle: str) -> Node:
    return Node(Identity.generate(os.urandom), handle)


def test_auth_then_frames_flow_both_ways() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    (welcome,) = h.connect(a)
    assert welcome == Welcome(a.observed, LIMITS.max_payload)
    h.connect(b)
    assert h.router.nodes == 2 and h.router.connections == 2
    assert h.send(a, b, b"hello b") == ["b"]
    assert h.send(b, a, b"hello a") == ["a"]
    assert h.drain(b) == [Recv(a.node_id, b"hello b")]
    assert h.drain(a) == [Recv(b.node_id, b"hello a")]
    counters = h.router.counters
    assert (counters.frames_relayed, counters.bytes_relayed) == (2, 14)
    assert counters.auths_ok == 2


def test_each_challenge_is_fresh() -> None:
    h = Harness()
    nonces = set()
    for i in range(3):
        node = make_node(f"n{i}")
        h.router.open(node.handle, None, 0.0)
        h.router.receive(node.handle, Hello(), 0.0)
        (challenge,) = h.drain(node)
        assert isinstance(challenge, Challenge)
        nonces.add(challenge.nonce)
    assert len(nonces) == 3


def test_frame_to_an_absent_node_gets_not_here() -> None:
    h = Harness()
    a, ghost = make_node("a"), make_node("ghost")
    h.connect(a)
    assert h.send(a, ghost) == ["a"]
    assert h.drain(a) == [NotHere(ghost.node_id)]
    assert h.router.counters.drops[DropReason.NOT_HERE] == 1


def test_bad_signature_is_refused_and_closed() -> None:
    h = Harness()
    a = make_node("a")
    (error,) = h.connect(a, bad_signature=True)
    assert isinstance(error, Error) and error.code == RelayErrorCode.BAD_AUTH
    assert h.closed == {"a": RelayErrorCode.BAD_AUTH}
    assert h.router.nodes == 0 and h.router.node_of("a") is None
    assert h.router.counters.auths_failed[AuthFailure.BAD_SIGNATURE] == 1
    # Anything after the refusal is ignored; nothing more is queued.
    assert h.router.receive("a", Ping(1), h.now) == []
    assert h.drain(a) == []


def test_an_auth_for_another_relay_or_another_challenge_fails() -> None:
    h = Harness()
    a = make_node("a")
    h.router.open("a", None, 0.0)
    h.router.receive("a", Hello(), 0.0)
    (challenge,) = h.drain(a)
    assert isinstance(challenge, Challenge)
    other_relay = Identity.generate(os.urandom).node_id
    signature = a.identity.sign(auth_input(challenge.nonce, a.node_id, other_relay))
    h.router.receive("a", Auth(a.node_id, signature), 0.0)
    (error,) = h.drain(a)
    assert isinstance(error, Error) and error.code == RelayErrorCode.BAD_AUTH


def test_someone_elses_node_id_cannot_be_claimed() -> None:
    h = Harness()
    victim, thief = make_node("victim"), make_node("thief")
    h.connect(victim)
    h.router.open("thief", None, 0.0)
    h.router.receive("thief", Hello(), 0.0)
    (challenge,) = h.drain(thief)
    assert isinstance(challenge, Challenge)
    signature = thief.identity.sign(auth_input(challenge.nonce, victim.node_id, RELAY.node_id))
    h.router.receive("thief", Auth(victim.node_id, signature), 0.0)
    assert h.drain(thief)[0] == Error(
        RelayErrorCode.BAD_AUTH, "signature does not verify for this challenge"
    )
    assert h.router.handle_of(victim.node_id) == "victim"  # still routed to the real one


def test_frames_before_auth_are_refused() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    h.connect(b)
    h.router.open("a", None, 0.0)
    h.router.receive("a", Send(b.node_id, b"sneaky"), 0.0)
    (error,) = h.drain(a)
    assert isinstance(error, Error) and error.code == RelayErrorCode.NOT_AUTHENTICATED
    assert h.closed["a"] == RelayErrorCode.NOT_AUTHENTICATED
    assert h.drain(b) == []


@pytest.mark.parametrize(
    ("first", "second", "code"),
    [
        (Hello(), Hello(), RelayErrorCode.PROTOCOL_ERROR),
        (Hello(2), None, RelayErrorCode.UNSUPPORTED_VERSION),
    ],
)
def test_handshake_out_of_order(first: Hello, second: Hello | None, code: RelayErrorCode) -> None:
    h = Harness()
    a = make_node("a")
    h.router.open("a", None, 0.0)
    h.router.receive("a", first, 0.0)
    if second is not None:
        h.router.receive("a", second, 0.0)
    last = h.drain(a)[-1]
    assert isinstance(last, Error) and last.code == code
    assert h.closed["a"] == code


def test_hello_after_welcome_is_a_protocol_error() -> None:
    h = Harness()
    a = make_node("a")
    h.connect(a)
    h.router.receive("a", Hello(), 0.0)
    (error,) = h.drain(a)
    assert isinstance(error, Error) and error.code == RelayErrorCode.PROTOCOL_ERROR
    assert h.router.nodes == 0
    assert h.router.counters.protocol_errors == 1


def test_access_token_and_allow_list() -> None:
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    h = Harness(policy=AccessPolicy(allowed=frozenset({a.node_id, b.node_id}), access_token=b"s3"))
    assert isinstance(h.connect(a, token=b"s3")[0], Welcome)
    (wrong,) = h.connect(b, token=b"nope")
    assert isinstance(wrong, Error) and wrong.code == RelayErrorCode.BAD_AUTH
    (outsider,) = h.connect(c, token=b"s3")
    assert isinstance(outsider, Error) and outsider.code == RelayErrorCode.NOT_ALLOWED
    failed = h.router.counters.auths_failed
    assert failed[AuthFailure.BAD_TOKEN] == 1 and failed[AuthFailure.NOT_ALLOWED] == 1
    assert h.router.nodes == 1


def test_second_connection_replaces_the_first() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    a2 = Node(a.identity, "a2")
    h.connect(a)
    h.connect(b)
    h.send(b, a, b"for the old connection")
    welcome = h.connect(a2)  # same identity, new handle
    assert isinstance(welcome[-1], Welcome)
    old = h.drain(a)
    assert old == [Error(RelayErrorCode.REPLACED, "another connection authenticated as this node")]
    assert h.closed["a"] == RelayErrorCode.REPLACED
    assert h.router.counters.replaced == 1
    assert h.router.counters.drops[DropReason.DISCONNECTED] == 1  # the frame queued for it
    h.send(b, a2, b"new")
    assert h.drain(a2) == [Recv(b.node_id, b"new")]
    # The old connection going away later does not unregister the new one.
    h.router.close("a", h.now)
    assert h.router.handle_of(a.node_id) == "a2"
    assert h.router.nodes == 2


def test_queue_drops_oldest_when_full() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    h.connect(a)
    h.connect(b)
    for i in range(7):
        h.send(a, b, bytes([i]))
    assert h.router.queued("b") == LIMITS.queue_per_destination
    assert [m.payload for m in h.drain(b) if isinstance(m, Recv)] == [b"\3", b"\4", b"\5", b"\6"]
    assert h.router.counters.drops[DropReason.QUEUE_FULL] == 3


def test_filling_tells_the_reader_when_a_queue_is_half_full() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    h.connect(a)
    h.connect(b)
    half = LIMITS.queue_per_destination // 2
    for i in range(half - 1):
        assert not h.router.filling(h.send(a, b, bytes([i])))
    woken = h.send(a, b, b"x")
    assert h.router.filling(woken)  # now the reader lets b's writer drain first
    assert not h.router.filling(["a", "nobody"])  # other queues, unknown handles
    h.drain(b)
    assert not h.router.filling(h.send(a, b, b"y"))
    assert h.router.counters.drops[DropReason.QUEUE_FULL] == 0


def test_take_bounds_a_batch_by_payload_bytes() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    h.connect(a)
    h.connect(b)
    for size in (600, 600, 600):
        h.send(a, b, bytes(size))
    h.router.receive("b", Ping(1), h.now)
    messages, code = h.router.take("b", 64, max_bytes=1000)
    assert code is None
    # Control goes regardless; frames stop once the budget is reached (one over it, not none).
    assert [type(m) for m in messages] == [Pong, Recv, Recv]
    messages, _ = h.router.take("b", 64, max_bytes=100)
    assert [len(m.payload) for m in messages if isinstance(m, Recv)] == [600]  # at least one
    assert h.router.queued("b") == 0
    assert h.router.counters.frames_relayed == 3


def test_control_replies_go_first() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    h.connect(a)
    h.connect(b)
    h.send(a, b, b"data")
    h.router.receive("b", Ping(7), h.now)
    assert h.drain(b) == [Pong(7), Recv(a.node_id, b"data")]


def test_flooding_node_is_throttled_while_a_polite_one_passes() -> None:
    h = Harness()
    flood, polite, sink = make_node("flood"), make_node("polite"), make_node("sink")
    for node in (flood, polite, sink):
        h.connect(node)
    delivered = {"flood": 0, "polite": 0}
    notices = 0
    # Ten seconds: the flooder sends 1000 frames/s, the polite node 5/s.
    for step in range(10_000):
        h.now = step / 1000
        h.send(flood, sink)
        if step % 200 == 0:
            h.send(polite, sink)
        for message in h.drain(sink):
            assert isinstance(message, Recv)
            delivered["flood" if message.src == flood.node_id else "polite"] += 1
        notices += sum(
            isinstance(m, Error) and m.code == RelayErrorCode.RATE_LIMITED for m in h.drain(flood)
        )
    # Burst 20 + 10/s over ~10 s; the polite node lost nothing.
    assert 110 <= delivered["flood"] <= 121
    assert delivered["polite"] == 50
    assert h.router.counters.drops[DropReason.RATE_LIMITED] == 10_000 - delivered["flood"]
    assert 9 <= notices <= 11  # one notice per second, not one per dropped frame
    assert h.router.node_of("flood") == flood.node_id  # throttled, not cut


def test_byte_bucket_limits_large_frames() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    h.connect(a)
    h.connect(b)
    passed = 0
    for _ in range(20):
        h.send(a, b, b"x" * 1500)
        passed += len(h.drain(b))
    assert passed == 20_000 // 1500  # byte_burst, at a standstill
    h.now += 1.0
    h.send(a, b, b"x" * 1500)
    assert len(h.drain(b)) == 1  # refilled at 10 kB/s


def test_oversize_payload_is_dropped_with_a_notice() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    h.connect(a)
    h.connect(b)
    h.send(a, b, b"x" * 1501)
    (notice,) = h.drain(a)
    assert isinstance(notice, Error) and notice.code == RelayErrorCode.FRAME_TOO_LARGE
    assert not notice.is_fatal and "a" not in h.closed
    assert h.drain(b) == []
    assert h.router.counters.drops[DropReason.FRAME_TOO_LARGE] == 1


def test_lookup_answers_what_the_relay_knows() -> None:
    h = Harness()
    a, b, ghost = make_node("a"), make_node("b"), make_node("ghost")
    b.observed = ("198.51.100.2", 5555)
    h.connect(a)
    h.connect(b)
    h.router.receive("a", Lookup(1, b.node_id), h.now)
    h.router.receive("a", Lookup(2, ghost.node_id), h.now)
    assert h.drain(a) == [
        LookupResult(1, b.node_id, True, ("198.51.100.2", 5555), (("192.168.1.5", 4000),)),
        LookupResult(2, ghost.node_id, False, None, ()),
    ]
    assert (h.router.counters.lookups, h.router.counters.lookups_found) == (2, 1)


def test_control_queue_is_bounded() -> None:
    h = Harness()
    a, ghost = make_node("a"), make_node("ghost")
    h.connect(a)
    for i in range(10):
        h.router.receive("a", Ping(i), h.now)
    assert h.drain(a) == [Pong(i) for i in range(6, 10)]
    assert h.router.counters.drops[DropReason.CONTROL_QUEUE_FULL] == 6
    assert ghost.inbox == []


def test_fail_and_shutdown_close_with_their_codes() -> None:
    h = Harness()
    a, b, c = make_node("a"), make_node("b"), make_node("c")
    h.connect(a)
    h.connect(b)
    h.router.open("c", None, 0.0)  # still handshaking
    h.send(a, b, b"pending")
    assert h.router.fail("a", RelayErrorCode.TIMEOUT, "idle for too long") == ["a"]
    assert h.drain(a) == [Error(RelayErrorCode.TIMEOUT, "idle for too long")]
    assert sorted(h.router.shutdown()) == ["b", "c"]
    assert h.drain(b) == [Error(RelayErrorCode.SHUTTING_DOWN, "relay is shutting down")]
    h.drain(c)
    assert h.closed == {
        "a": RelayErrorCode.TIMEOUT,
        "b": RelayErrorCode.SHUTTING_DOWN,
        "c": RelayErrorCode.SHUTTING_DOWN,
    }
    assert h.router.nodes == 0
    assert h.router.counters.drops[DropReason.DISCONNECTED] == 1  # "pending" never went out
    for handle in "abc":
        h.router.close(handle, h.now)
    assert h.router.connections == 0


def test_write_timeout_discards_the_queue() -> None:
    h = Harness()
    a, b = make_node("a"), make_node("b")
    h.connect(a)
    h.connect(b)
    for _ in range(3):
        h.send(a, b)
    h.router.write_timed_out("b")
    h.router.close("b", h.now)
    assert h.router.counters.drops[DropReason.WRITE_TIMEOUT] == 3
    h.send(a, b)
    assert h.drain(a) == [NotHere(b.node_id)]


def test_handles_are_checked() -> None:
    h = Harness()
    h.router.open("a", None, 0.0)
    with pytest.raises(LocalProtocolError):
        h.router.open("a", None, 0.0)
    with pytest.raises(LocalProtocolError):
        h.router.receive("nobody", Hello(), 0.0)
    assert h.router.take("nobody") == ([], None)
    h.router.close("nobody", 0.0)  # closing twice or unknown is harmless


# --- the UDP fast path ------------------------------------------------------------------------

_ADDRESSES = itertools.count(1)


def fast_node(handle: str) -> Node:
    """A node with an address of its own (the fast path keys on it)."""
    return Node(Identity.generate(os.urandom), handle, ("198.51.100.1", 40000 + next(_ADDRESSES)))


class FastHarness(Harness):
    def connect_fast(self, node: Node) -> Welcome:
        (welcome,) = self.connect(node, flags=FLAG_UDP_DATAGRAMS)
        assert isinstance(welcome, Welcome)
        return welcome

    def datagram(
        self, src: Node, dst: Node, payload: bytes = b"p", source: tuple[str, int] | None = None
    ) -> tuple[list[tuple[bytes, tuple[str, int]]], list[str]]:
        data = encode_datagram_to_relay(dst.node_id, payload)
        return self.router.receive_datagrams([(data, source or src.observed)], self.now)


def test_fast_path_is_granted_to_nodes_that_ask_and_forwards_udp_to_udp() -> None:
    h = FastHarness()
    a, b = fast_node("a"), fast_node("b")
    welcome = h.connect_fast(a)
    assert welcome == Welcome(a.observed, LIMITS.max_payload, FLAG_UDP_DATAGRAMS)
    h.connect_fast(b)
    assert h.router.fast_path_nodes == 2
    assert h.router.fast_path_address("b") == b.observed
    out, woken = h.datagram(a, b, b"quic packet")
    # One datagram out per datagram in, to b's address, naming a as the source.
    assert out == [(encode_datagram_from_relay(a.node_id, b"quic packet"), b.observed)]
    assert woken == []  # nothing went through a stream
    assert h.drain(b) == []
    counters = h.router.counters
    assert (counters.datagrams_forwarded, counters.datagram_bytes_forwarded) == (1, 11)
    assert (counters.frames_relayed, counters.bytes_relayed) == (1, 11)


def test_no_flags_no_fast_path_and_a_welcome_older_nodes_can_read() -> None:
    h = FastHarness()
    a, b = fast_node("a"), fast_node("b")
    (welcome,) = h.connect(a)
    assert welcome == Welcome(a.observed, LIMITS.max_payload)  # flags absent, not 0
    (welcome,) = h.connect(b, flags=0)
    assert welcome == Welcome(b.observed, LIMITS.max_payload, 0)
    assert h.router.fast_path_nodes == 0
    out, woken = h.datagram(a, b)
    assert (out, woken) == ([], [])
    assert h.router.counters.datagram_drops[DatagramDrop.UNKNOWN_SOURCE] == 1


def test_a_relay_without_the_fast_path_grants_nothing() -> None:
    h = FastHarness(dataclasses.replace(LIMITS, fast_path=False))
    a = fast_node("a")
    assert h.connect_fast(a).flags == 0
    assert h.router.fast_path_address("a") is None


def test_the_flags_are_signed() -> None:
    h = FastHarness()
    a = fast_node("a")
    # AUTH asking for the fast path, signed as if it had no flags (v1 input): refused.
    (error,) = h.connect(a, flags=FLAG_UDP_DATAGRAMS, signed_flags=None)
    assert isinstance(error, Error) and error.code == RelayErrorCode.BAD_AUTH
    assert h.router.fast_path_nodes == 0


def test_unknown_sources_are_dropped_and_never_answered() -> None:
    h = FastHarness()
    a, b = fast_node("a"), fast_node("b")
    h.connect_fast(a)
    h.connect_fast(b)
    stranger = ("192.0.2.66", a.observed[1])  # a's port, another IP
    same_ip = (a.observed[0], a.observed[1] + 1000)  # a's IP, another port
    for source in (stranger, same_ip):
        assert h.datagram(a, b, source=source) == ([], [])
    assert h.router.counters.datagram_drops[DatagramDrop.UNKNOWN_SOURCE] == 2
    assert h.drain(a) == [] and h.drain(b) == []  # no notice, no NOT_HERE: no oracle
    # Not even a handshaking connection's address is a credential.
    c = fast_node("c")
    h.router.open("c", c.observed, h.now)
    assert h.datagram(c, b) == ([], [])
    assert h.router.counters.datagram_drops[DatagramDrop.UNKNOWN_SOURCE] == 3


def test_malformed_datagrams_from_a_known_source_are_counted() -> None:
    h = FastHarness()
    a = fast_node("a")
    h.connect_fast(a)
    batch = [(b"\x8ep2pr\x01" + b"\x00" * 32 + b"x", a.observed), (b"\x8ep2pr\x01", a.observed)]
    assert h.router.receive_datagrams(batch, h.now) == ([], [])
    assert h.router.counters.datagram_drops[DatagramDrop.MALFORMED] == 2


def test_a_destination_without_the_fast_path_gets_a_stream_frame() -> None:
    h = FastHarness()
    a, b = fast_node("a"), fast_node("b")
    h.connect_fast(a)
    h.connect(b)  # an older node: stream only
    out, woken = h.datagram(a, b, b"to the stream")
    assert out == [] and woken == ["b"]
    assert h.drain(b) == [Recv(a.node_id, b"to the stream")]
    counters = h.router.counters
    assert counters.datagrams_to_stream == 1 and counters.datagrams_forwarded == 0
    assert counters.frames_relayed == 1  # counted once, when taken


def test_an_absent_destination_gets_one_not_here_per_interval() -> None:
    h = FastHarness()
    a, ghost, other = fast_node("a"), fast_node("ghost"), fast_node("other")
    h.connect_fast(a)
    for _ in range(5):
        assert h.datagram(a, ghost)[0] == []
    h.datagram(a, other)
    assert h.drain(a) == [NotHere(ghost.node_id), NotHere(other.node_id)]
    assert h.router.counters.datagram_drops[DatagramDrop.NOT_HERE] == 6
    h.now += LIMITS.notice_interval
    h.datagram(a, ghost)
    assert h.drain(a) == [NotHere(ghost.node_id)]


def test_fast_path_datagrams_are_charged_to_the_sender_like_sends() -> None:
    h = FastHarness()
    a, b = fast_node("a"), fast_node("b")
    h.connect_fast(a)
    h.connect_fast(b)
    batch = [(encode_datagram_to_relay(b.node_id, b"x" * 100), a.observed)] * 50
    out, woken = h.router.receive_datagrams(batch, h.now)
    assert len(out) == LIMITS.frame_burst  # 20 at a standstill, then dropped
    assert woken == ["a"]  # one RATE_LIMITED notice, not 30
    (notice,) = h.drain(a)
    assert isinstance(notice, Error) and notice.code == RelayErrorCode.RATE_LIMITED
    assert h.router.counters.datagram_drops[DatagramDrop.RATE_LIMITED] == 30
    # Stream SENDs share the same buckets.
    h.send(a, b, b"via stream")
    assert h.drain(b) == []
    h.now += 1.0  # 10 frames/s refill
    out, _ = h.router.receive_datagrams(batch, h.now)
    assert len(out) == 10
    # Bytes too: 1500-byte payloads drain the 20 kB byte burst of a fresh node.
    c = fast_node("c")
    h.connect_fast(c)
    big = [(encode_datagram_to_relay(b.node_id, b"x" * 1500), c.observed)] * 15
    out, _ = h.router.receive_datagrams(big, h.now)
    assert len(out) == 20_000 // 1500


def test_oversize_fast_path_payloads_are_dropped() -> None:
    h = FastHarness()
    a, b = fast_node("a"), fast_node("b")
    h.connect_fast(a)
    h.connect_fast(b)
    assert h.datagram(a, b, b"x" * (LIMITS.max_payload + 1)) == ([], [])
    assert h.router.counters.datagram_drops[DatagramDrop.TOO_LARGE] == 1


def test_rebinding_moves_the_address_both_ways() -> None:
    h = FastHarness()
    a, b = fast_node("a"), fast_node("b")
    h.connect_fast(a)
    h.connect_fast(b)
    old_a, new_a = a.observed, ("198.51.100.1", 50001)
    h.now += 5.0
    h.router.rebind("a", new_a, h.now)
    assert h.router.counters.rebinds == 1
    assert h.router.fast_path_address("a") == new_a
    assert h.datagram(a, b, source=old_a) == ([], [])  # the old mapping is no credential
    out, _ = h.datagram(a, b, source=new_a)
    assert [address for _, address in out] == [b.observed]
    # b now sends to a's new address; and lookups report it.
    out, _ = h.datagram(b, a)
    assert [address for _, address in out] == [new_a]
    h.router.receive("b", Lookup(1, a.node_id), h.now)
    (result,) = h.drain(b)
    assert isinstance(result, LookupResult) and result.observed == new_a
    h.router.rebind("a", new_a, h.now)  # no change, no count
    assert h.router.counters.rebinds == 1


def test_the_newest_claim_on_an_address_wins() -> None:
    # A NAT gave a dead connection's mapping to another host (or one socket hosts two ids).
    h = FastHarness()
    old, new, b = fast_node("old"), fast_node("new"), fast_node("b")
    new.observed = old.observed
    h.connect_fast(old)
    h.connect_fast(b)
    h.connect_fast(new)
    assert h.router.fast_path_address("old") is None
    assert h.router.fast_path_address("new") == new.observed
    out, _ = h.datagram(new, b)
    assert out == [(encode_datagram_from_relay(new.node_id, b"p"), b.observed)]  # as new's
    # Nothing goes by UDP to a connection that lost its address: its stream instead.
    out, woken = h.datagram(b, old)
    assert out == [] and woken == ["old"]
    # The dead one closing does not take the address from the live one.
    h.router.close("old", h.now)
    assert h.router.fast_path_address("new") == new.observed


def test_closing_or_replacing_a_connection_releases_its_address() -> None:
    h = FastHarness()
    a, b = fast_node("a"), fast_node("b")
    h.connect_fast(a)
    h.connect_fast(b)
    h.router.close("b", h.now)
    assert h.router.fast_path_nodes == 1
    assert h.datagram(b, a) == ([], [])
    assert h.router.counters.datagram_drops[DatagramDrop.UNKNOWN_SOURCE] == 1
    a2 = Node(a.identity, "a2", ("198.51.100.1", 60000))  # a reconnects from elsewhere
    h.connect_fast(a2)
    assert h.router.fast_path_address("a") is None
    assert h.router.fast_path_address("a2") == a2.observed
    assert h.datagram(a, a2, source=a.observed) == ([], [])
