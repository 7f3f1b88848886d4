"""p2psync.proto.relay: round trips, framing at any split, and any bytes -> BadFrame."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync.crypto.identity import Identity, NodeId
from p2psync.errors import BadFrame
from p2psync.net.disco import is_disco
from p2psync.proto.codec import pack
from p2psync.proto.relay import (
    DATAGRAM_FROM_RELAY,
    DATAGRAM_OVERHEAD,
    DATAGRAM_TO_RELAY,
    FLAG_UDP_DATAGRAMS,
    MAX_PUBLISHED_ADDRESSES,
    Auth,
    Challenge,
    DatagramFromRelay,
    DatagramToRelay,
    Error,
    FrameDecoder,
    FrameTooLarge,
    Hello,
    Lookup,
    LookupResult,
    NodeIdCache,
    NodeToRelay,
    NotHere,
    Ping,
    Pong,
    Recv,
    RelayErrorCode,
    RelayToNode,
    Send,
    Welcome,
    auth_input,
    datagram_from_relay_header,
    decode_datagram_from_relay_untrusted,
    decode_datagram_to_relay_untrusted,
    decode_node_to_relay_untrusted,
    decode_relay_to_node_untrusted,
    encode_datagram_from_relay,
    encode_datagram_to_relay,
    encode_frame,
    encode_message,
    is_relay_datagram,
)

A = Identity.generate(os.urandom)
B = Identity.generate(os.urandom)
RELAY = Identity.generate(os.urandom)

NODE_TO_RELAY: list[NodeToRelay] = [
    Hello(),
    Hello(7),
    Auth(A.node_id, b"s" * 64),
    Auth(A.node_id, b"s" * 64, b"token", (("192.168.1.2", 4000), ("fe80::1", 5))),
    Auth(A.node_id, b"s" * 64, None, (), FLAG_UDP_DATAGRAMS),
    Auth(A.node_id, b"s" * 64, None, (), 2**32 - 1),
    Send(B.node_id, b""),
    Send(B.node_id, os.urandom(1400)),
    Lookup(0, B.node_id),
    Lookup(2**32 - 1, B.node_id),
    Ping(0),
    Ping(2**64 - 1),
]
RELAY_TO_NODE: list[RelayToNode] = [
    Challenge(b"n" * 32, None),
    Challenge(b"n" * 32, ("203.0.113.9", 41641)),
    Welcome(("2001:db8::1", 3478), 65536),
    Welcome(None, 1),
    Welcome(None, 1452, 0),
    Welcome(("203.0.113.9", 41641), 65536, FLAG_UDP_DATAGRAMS),
    Recv(A.node_id, os.urandom(1200)),
    NotHere(B.node_id),
    LookupResult(5, B.node_id, False, None, ()),
    LookupResult(6, B.node_id, True, ("198.51.100.7", 1234), (("10.0.0.2", 4000),)),
    Pong(99),
    Error(RelayErrorCode.BAD_AUTH, "signature does not verify"),
    Error(4000, "a code from a newer relay"),
]


@pytest.mark.parametrize("message", NODE_TO_RELAY, ids=repr)
def test_node_to_relay_round_trip(message: NodeToRelay) -> None:
    assert decode_node_to_relay_untrusted(encode_message(message)) == message


@pytest.mark.parametrize("message", RELAY_TO_NODE, ids=repr)
def test_relay_to_node_round_trip(message: RelayToNode) -> None:
    assert decode_relay_to_node_untrusted(encode_message(message)) == message


@pytest.mark.parametrize("message", NODE_TO_RELAY, ids=repr)
def test_relay_refuses_to_decode_node_messages_as_its_own(message: NodeToRelay) -> None:
    with pytest.raises(BadFrame, match="not one a relay sends"):
        decode_relay_to_node_untrusted(encode_message(message))


@pytest.mark.parametrize("message", RELAY_TO_NODE, ids=repr)
def test_node_refuses_relay_messages_from_a_node(message: RelayToNode) -> None:
    with pytest.raises(BadFrame, match="not one a node sends"):
        decode_node_to_relay_untrusted(encode_message(message))


def test_error_codes_know_which_are_fatal() -> None:
    assert not Error(RelayErrorCode.RATE_LIMITED, "").is_fatal
    assert not Error(RelayErrorCode.FRAME_TOO_LARGE, "").is_fatal
    assert Error(RelayErrorCode.SHUTTING_DOWN, "").is_fatal
    unknown = Error(4000, "")
    assert unknown.known_code is None and unknown.is_fatal  # unknown: assume the worst


@pytest.mark.parametrize(
    ("body", "fault"),
    [
        (pack([4, b"x" * 31, b""]), "SEND dst: expected 32 bytes"),
        (pack([4, b"\x00" * 32, b""]), "SEND dst"),  # not an Ed25519 point
        (pack([4, b"x" * 32]), "SEND: expected 3 fields"),
        (pack([2, A.node_id.raw, b"s" * 63, None, []]), "AUTH signature"),
        (pack([2, A.node_id.raw, b"s" * 64, b"t" * 257, []]), "AUTH token"),
        (pack([2, A.node_id.raw, b"s" * 64, None, [["example.org", 1]]]), "numeric IP"),
        (pack([2, A.node_id.raw, b"s" * 64, None, [["10.0.0.1", 0]]]), "port"),
        (
            pack([2, A.node_id.raw, b"s" * 64, None, [["10.0.0.1", 1]] * 17]),
            f"exceeds {MAX_PUBLISHED_ADDRESSES}",
        ),
        (pack([0, 2**16]), "HELLO version"),
        (pack([2, A.node_id.raw, b"s" * 64, None, [], 2**32]), "AUTH flags"),
        (pack([2, A.node_id.raw, b"s" * 64, None, [], 1, 0]), "AUTH: expected 5 to 6 fields"),
        (pack([8, -1]), "PING nonce"),
        (pack([]), "empty array"),
        (pack({"t": 1}), "expected an array"),
        (pack([True, 1]), "type"),
        (b"\xc1", "not valid msgpack"),
    ],
)
def test_node_to_relay_faults_are_named(body: bytes, fault: str) -> None:
    with pytest.raises(BadFrame, match=fault):
        decode_node_to_relay_untrusted(body)


def test_lookup_result_connected_must_be_a_boolean() -> None:
    body = pack([9, 1, B.node_id.raw, 1, None, []])
    with pytest.raises(BadFrame, match="connected: expected a boolean"):
        decode_relay_to_node_untrusted(body)


def test_auth_input_binds_nonce_node_and_relay() -> None:
    nonce = os.urandom(32)
    signed = auth_input(nonce, A.node_id, RELAY.node_id)
    assert signed == b"p2psync-relay auth v1\0" + nonce + A.node_id.raw + RELAY.node_id.raw
    assert auth_input(nonce, A.node_id, B.node_id) != signed  # another relay: another input
    with pytest.raises(BadFrame):
        auth_input(nonce[:31], A.node_id, RELAY.node_id)


def test_auth_input_with_flags_is_its_own_context_and_binds_the_flags() -> None:
    nonce = os.urandom(32)
    v1 = auth_input(nonce, A.node_id, RELAY.node_id)
    flagged = auth_input(nonce, A.node_id, RELAY.node_id, FLAG_UDP_DATAGRAMS)
    assert flagged == (
        b"p2psync-relay auth v2\0"
        + nonce
        + A.node_id.raw
        + RELAY.node_id.raw
        + FLAG_UDP_DATAGRAMS.to_bytes(4, "big")
    )
    no_flags = auth_input(nonce, A.node_id, RELAY.node_id, 0)
    assert len({v1, flagged, no_flags}) == 3  # flags 0 is still a v2 input, not v1
    with pytest.raises(BadFrame):
        auth_input(nonce, A.node_id, RELAY.node_id, 2**32)


def test_welcome_without_flags_grants_nothing() -> None:
    assert not Welcome(None, 1).grants(FLAG_UDP_DATAGRAMS)
    assert not Welcome(None, 1, 0).grants(FLAG_UDP_DATAGRAMS)
    assert Welcome(None, 1, FLAG_UDP_DATAGRAMS | 0x80).grants(FLAG_UDP_DATAGRAMS)
    # An AUTH or WELCOME without the field is what older peers send and decode.
    assert len(encode_message(Welcome(None, 1))) < len(encode_message(Welcome(None, 1, 0)))
    assert decode_node_to_relay_untrusted(pack([2, A.node_id.raw, b"s" * 64, None, []])) == Auth(
        A.node_id, b"s" * 64
    )


# --- UDP fast path datagrams ---------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"\x40", os.urandom(1414), os.urandom(65_000)])
def test_datagrams_round_trip(payload: bytes) -> None:
    to_relay = encode_datagram_to_relay(B.node_id, payload)
    assert len(to_relay) == DATAGRAM_OVERHEAD + len(payload)
    assert decode_datagram_to_relay_untrusted(to_relay) == DatagramToRelay(B.node_id, payload)
    from_relay = encode_datagram_from_relay(A.node_id, payload)
    assert from_relay == datagram_from_relay_header(A.node_id) + payload
    assert decode_datagram_from_relay_untrusted(from_relay, NodeIdCache()) == DatagramFromRelay(
        A.node_id, payload
    )


def test_a_datagram_of_one_direction_is_refused_in_the_other() -> None:
    with pytest.raises(BadFrame, match="not a DATAGRAM_FROM_RELAY header"):
        decode_datagram_from_relay_untrusted(encode_datagram_to_relay(B.node_id, b"x"))
    with pytest.raises(BadFrame, match="not a DATAGRAM_TO_RELAY header"):
        decode_datagram_to_relay_untrusted(encode_datagram_from_relay(A.node_id, b"x"))


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (DATAGRAM_TO_RELAY + B.node_id.raw, "too short"),  # no payload
        (DATAGRAM_TO_RELAY, "too short"),
        (DATAGRAM_TO_RELAY + b"\x00" * 32 + b"x", "node id"),  # not an Ed25519 point
        (b"\x8ep2pr\x03" + B.node_id.raw + b"x", "not a DATAGRAM_TO_RELAY header"),
    ],
)
def test_datagram_faults_are_named(data: bytes, fault: str) -> None:
    with pytest.raises(BadFrame, match=fault):
        decode_datagram_to_relay_untrusted(data)


def test_datagrams_are_told_apart_from_quic_stun_and_disco() -> None:
    # The demultiplexing table in p2psync/net/disco.py.
    for header in (DATAGRAM_TO_RELAY, DATAGRAM_FROM_RELAY):
        first = header[0]
        assert first & 0x40 == 0  # no QUIC v1 long or short header (Fixed Bit)
        assert first & 0xC0 == 0x80  # no STUN (top bits 00)
        assert header[1:5] != b"\x00" * 4  # no Version Negotiation (version 0)
        assert not is_disco(header + A.node_id.raw + b"x")
        assert is_relay_datagram(header + A.node_id.raw + b"x")
    assert not is_relay_datagram(b"\x8dp2pd\x01" + b"x" * 40)  # disco


@settings(max_examples=400)
@given(st.binary(max_size=200))
def test_any_bytes_as_datagrams(data: bytes) -> None:
    for decode in (decode_datagram_to_relay_untrusted, decode_datagram_from_relay_untrusted):
        try:
            decode(data)
        except BadFrame:
            pass


@settings(max_examples=300)
@given(st.binary(max_size=64), st.binary(min_size=1, max_size=1500))
def test_any_bytes_behind_a_valid_header(tail: bytes, payload: bytes) -> None:
    # A right header with arbitrary node id bytes and payload: a datagram or BadFrame.
    for header, decode in (
        (DATAGRAM_TO_RELAY, decode_datagram_to_relay_untrusted),
        (DATAGRAM_FROM_RELAY, decode_datagram_from_relay_untrusted),
    ):
        try:
            message = decode(header + tail + payload)
        except BadFrame:
            continue
        assert len(message.payload) >= 1


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=2000))
def test_datagram_round_trip_any_payload(payload: bytes) -> None:
    decoded = decode_datagram_to_relay_untrusted(encode_datagram_to_relay(A.node_id, payload))
    assert decoded.payload == payload and decoded.dst == A.node_id


def test_node_id_cache_validates_once_and_is_bounded() -> None:
    cache = NodeIdCache(capacity=2)
    ids = [Identity.generate(os.urandom).node_id for _ in range(3)]
    for node_id in ids:
        assert cache.get(node_id.raw) == node_id
    assert len(cache) == 2
    assert cache.get(ids[2].raw) is cache.get(ids[2].raw)
    with pytest.raises(BadFrame):
        cache.get(b"\x00" * 32)


# --- framing -------------------------------------------------------------------------------


def test_decoder_reassembles_frames_at_any_split() -> None:
    rng = random.Random(4)
    messages = NODE_TO_RELAY * 3
    wire = b"".join(encode_frame(m) for m in messages)
    for trial in range(20):
        decoder = FrameDecoder()
        got: list[NodeToRelay] = []
        position = 0
        while position < len(wire):
            step = 1 if trial == 0 else rng.randint(1, 3000)
            decoder.feed(wire[position : position + step])
            position += step
            while (body := decoder.next_frame()) is not None:
                got.append(decode_node_to_relay_untrusted(body))
            assert decoder.buffered <= 4 + decoder.max_frame
        assert got == messages
        assert decoder.buffered == 0


def test_oversize_length_header_fails_before_the_body_and_stays_failed() -> None:
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(encode_frame(Ping(1)))
    with pytest.raises(FrameTooLarge, match="101 bytes exceeds the limit of 100"):
        decoder.feed((101).to_bytes(4, "big"))
    assert decoder.buffered == 0
    assert decoder.next_frame() is not None  # the frame before the bad header survives
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"more")


def test_frame_too_large_is_a_bad_frame() -> None:
    assert issubclass(FrameTooLarge, BadFrame)


# --- any bytes -> BadFrame ----------------------------------------------------------------


@settings(max_examples=400)
@given(st.binary(max_size=2000))
def test_any_bytes_node_to_relay(data: bytes) -> None:
    try:
        decode_node_to_relay_untrusted(data)
    except BadFrame:
        pass


@settings(max_examples=400)
@given(st.binary(max_size=2000))
def test_any_bytes_relay_to_node(data: bytes) -> None:
    try:
        decode_relay_to_node_untrusted(data)
    except BadFrame:
        pass


_valid = st.sampled_from([encode_message(m) for m in NODE_TO_RELAY + RELAY_TO_NODE])


@settings(max_examples=400)
@given(_valid, st.integers(min_value=0, max_value=2000), st.binary(min_size=1, max_size=8))
def test_corrupted_valid_messages_give_bad_frame(body: bytes, where: int, junk: bytes) -> None:
    where %= len(body)
    mutated = body[:where] + junk + body[where + len(junk) :]
    for decode in (decode_node_to_relay_untrusted, decode_relay_to_node_untrusted):
        try:
            decode(mutated)
        except BadFrame:
            pass


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_any_byte_stream_into_the_frame_decoder(chunks: list[bytes]) -> None:
    decoder = FrameDecoder(max_frame=1024)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            while (body := decoder.next_frame()) is not None:
                assert len(body) <= 1024
                try:
                    decode_node_to_relay_untrusted(body, max_frame=1024)
                except BadFrame:
                    pass
            assert decoder.buffered <= 4 + 1024
    except BadFrame:
        pass


def test_node_ids_in_messages_are_checked_points() -> None:
    # A 32-byte value that is not an Ed25519 point is not a NodeId anywhere.
    with pytest.raises(BadFrame):
        decode_relay_to_node_untrusted(pack([5, b"\x00" * 32, b"x"]))
    assert isinstance(decode_relay_to_node_untrusted(pack([5, A.node_id.raw, b"x"])), Recv)
    assert NodeId(A.node_id.raw) == A.node_id
