"""Wire messages, framing and the object-stream codec (p2psync.proto.messages)."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psync import defaults
from p2psync.crypto.identity import Identity
from p2psync.errors import BadFrame, IntegrityError, LocalProtocolError, NotFound
from p2psync.proto.codec import pack
from p2psync.proto.messages import (
    Announce,
    Auth,
    Bye,
    Entries,
    ErrorCode,
    FrameDecoder,
    Frontier,
    Hello,
    ObjectData,
    ObjectNotFound,
    Role,
    Want,
    auth_input,
    decode_message_untrusted,
    encode_frame,
    encode_message,
    encode_message_frame,
    handshake_transcript,
)
from p2psync.store.objects import MAX_SEALED_SIZE
from p2psync.sync.object_stream import (
    WANT_MAX_FRAME,
    answer_want_untrusted,
    decode_object_response_untrusted,
    want_frame,
)

N1 = Identity.from_seed(b"\x01" * 32).node_id
N2 = Identity.from_seed(b"\x02" * 32).node_id

SAMPLES = [
    Hello(1, N1, N2, b"c" * 32),
    Auth(b"s" * 64, 7, b"m" * 32),
    Frontier(((N1, 5), (N2, 0)), final=False),
    Frontier((), final=True),
    Entries((b"raw1", b"raw2")),
    Announce((b"x" * defaults.MAX_ENTRY_SIZE,)),
    Bye(ErrorCode.WRONG_GROUP, "not in our group"),
    Want(b"o" * 32),
    ObjectData(b"o" * 32, b"sealed"),
    ObjectNotFound(b"o" * 32),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert decode_message_untrusted(encode_message(message)) == message


def test_wire_format_is_the_documented_array():
    assert encode_message(Want(b"o" * 32)) == pack([7, b"o" * 32])
    assert encode_message(Frontier(((N1, 3),), True)) == pack([3, [[N1.raw, 3]], True])
    body = pack([6, 0, ""])
    assert encode_message_frame(Bye(0, "")) == struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "value, fragment",
    [
        ([], "empty"),
        ([99], "unknown type"),
        ({"t": 1}, "expected an array"),
        ([1, 1, N1.raw, N2.raw], "expected 5 fields"),
        ([1, 1, N1.raw, N2.raw, b"short"], "challenge"),
        ([1, 1, b"\x00" * 31 + b"\x80", N2.raw, b"c" * 32], "hello.sender"),
        ([2, b"s" * 64, 0, b"m" * 32], "auth.epoch"),
        ([3, [[N1.raw, 1], [N1.raw, 2]], True], "listed twice"),
        ([3, [], 1], "frontier.final"),
        ([3, [[N1.raw, -1]], True], "seq"),
        ([4, [b"x"] * (defaults.SYNC_MAX_ENTRIES_PER_MESSAGE + 1)], "entries"),
        ([4, [b"x" * (defaults.MAX_ENTRY_SIZE + 1)]], "limit"),
        ([4, ["text"]], "expected bytes"),
        ([6, 1, "r" * (defaults.SYNC_MAX_BYE_REASON + 1)], "bye.reason"),
        ([7, b"short"], "want.oid"),
        ([True], "message.type"),
    ],
)
def test_decode_refuses_with_bad_frame(value, fragment):
    with pytest.raises(BadFrame, match=fragment):
        decode_message_untrusted(pack(value))


def test_entries_byte_budget_is_enforced():
    per = defaults.MAX_ENTRY_SIZE
    count = defaults.SYNC_MAX_ENTRIES_BYTES // per + 1
    with pytest.raises(BadFrame, match="bytes of entries"):
        decode_message_untrusted(pack([4, [b"x" * per] * count]))


@given(st.binary(max_size=512))
def test_any_bytes_decode_or_raise_bad_frame(data):
    try:
        decode_message_untrusted(data)
    except BadFrame:
        pass


def test_limits_fit_each_other():
    # One full ENTRIES batch fits a control frame; the biggest object fits an object frame.
    full = Entries(tuple([b"x" * defaults.MAX_ENTRY_SIZE] * 64))
    assert len(encode_message(full)) <= defaults.SYNC_MAX_CONTROL_FRAME
    assert MAX_SEALED_SIZE + 64 <= defaults.SYNC_MAX_OBJECT_FRAME
    assert (
        defaults.SYNC_MAX_ENTRIES_BYTES + 5 * defaults.SYNC_MAX_ENTRIES_PER_MESSAGE + 16
        <= defaults.SYNC_MAX_CONTROL_FRAME
    )


# --- framing -------------------------------------------------------------------------


@given(
    bodies=st.lists(st.binary(max_size=300), max_size=20),
    seed=st.integers(0, 2**32),
)
def test_frame_decoder_round_trips_with_random_splits(bodies, seed):
    stream = b"".join(encode_frame(b) for b in bodies)
    rng = random.Random(seed)
    decoder = FrameDecoder(max_frame=300)
    out = []
    i = 0
    while i < len(stream):
        n = rng.randint(0, 40)
        decoder.feed(stream[i : i + n])
        i += n
        while (frame := decoder.next_frame()) is not None:
            out.append(frame)
    assert out == bodies
    assert decoder.buffered == 0


def test_frame_decoder_byte_at_a_time():
    stream = encode_frame(b"hello") + encode_frame(b"") + encode_frame(b"world")
    decoder = FrameDecoder(16)
    frames = []
    for byte in stream:
        decoder.feed(bytes([byte]))
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert frames == [b"hello", b"", b"world"]


def test_oversized_header_raises_immediately_without_buffering():
    decoder = FrameDecoder(max_frame=1000)
    decoder.feed(b"\x00\x00")  # half a header: nothing to judge yet
    with pytest.raises(BadFrame, match="exceeds"):
        decoder.feed(b"\x03\xe9")  # 1001
    assert decoder.buffered == 0
    with pytest.raises(BadFrame):  # broken for good
        decoder.feed(encode_frame(b"ok"))


def test_oversized_header_after_good_frames_in_one_feed():
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(BadFrame):
        decoder.feed(encode_frame(b"fine") + struct.pack(">I", 2**32 - 1))
    assert decoder.next_frame() == b"fine"  # what came before the bad header is kept


def test_encode_frame_refuses_what_the_peer_would_refuse():
    with pytest.raises(LocalProtocolError):
        encode_frame(b"x" * 11, max_frame=10)


# --- transcript ---------------------------------------------------------------------


def test_transcript_binds_ids_challenges_and_roles():
    base = dict(dialer=N1, acceptor=N2, dialer_challenge=b"a" * 32, acceptor_challenge=b"b" * 32)
    t = handshake_transcript(**base)
    assert handshake_transcript(**{**base, "dialer": N2, "acceptor": N1}) != t
    assert handshake_transcript(**{**base, "acceptor_challenge": b"c" * 32}) != t
    assert handshake_transcript(**base, alpn="other/1") != t
    assert handshake_transcript(**base, version=2) != t
    assert auth_input(Role.DIALER, t) != auth_input(Role.ACCEPTOR, t)


# --- object streams -------------------------------------------------------------------


class FakeSource:
    def __init__(self, objects, corrupt=()):
        self.objects = objects
        self.corrupt = set(corrupt)

    def read_object(self, oid):
        if oid in self.corrupt:
            raise IntegrityError("corrupt")
        try:
            return self.objects[oid]
        except KeyError:
            raise NotFound("no") from None


def _body(frame: bytes, max_frame: int) -> bytes:
    decoder = FrameDecoder(max_frame)
    decoder.feed(frame)
    body = decoder.next_frame()
    assert body is not None
    return body


def test_object_stream_serves_found_missing_and_corrupt():
    have, missing, bad = b"h" * 32, b"m" * 32, b"c" * 32
    source = FakeSource({have: b"sealed bytes", bad: b"x"}, corrupt=[bad])
    for oid, expected in ((have, b"sealed bytes"), (missing, None), (bad, None)):
        request = _body(want_frame(oid), WANT_MAX_FRAME)
        reply = _body(answer_want_untrusted(source, request), defaults.SYNC_MAX_OBJECT_FRAME)
        assert decode_object_response_untrusted(oid, reply) == expected


def test_object_stream_refuses_wrong_answers():
    with pytest.raises(BadFrame):  # answer names another object
        decode_object_response_untrusted(b"a" * 32, encode_message(ObjectData(b"b" * 32, b"x")))
    with pytest.raises(BadFrame):  # not an answer at all
        decode_object_response_untrusted(b"a" * 32, encode_message(Bye(0, "")))
    with pytest.raises(BadFrame):  # a request that is not a WANT
        answer_want_untrusted(FakeSource({}), encode_message(Bye(0, "")))
    with pytest.raises(BadFrame):  # a request larger than any WANT
        answer_want_untrusted(FakeSource({}), b"\x92\x07" + b"\xc4\x40" + b"x" * 64)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_object_stream_any_request_bytes_raise_only_bad_frame(data):
    try:
        answer_want_untrusted(FakeSource({}), data)
    except BadFrame:
        pass


def test_node_ids_are_valid():
    assert N1 != N2 and Identity.generate(os.urandom).node_id != N1
