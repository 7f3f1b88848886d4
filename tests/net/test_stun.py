"""STUN codec and responder: RFC 5769 vectors, round trips, hostile bytes."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync.errors import BadFrame, LocalProtocolError
from p2psync.net.stun import (
    BINDING,
    MAGIC_COOKIE,
    MAX_RESPONSE_GROWTH,
    Attr,
    BadStunMessage,
    StunAttribute,
    StunClass,
    StunErrorResponse,
    StunMessage,
    answer_binding,
    binding_error,
    binding_request,
    binding_success,
    decode_address_untrusted,
    decode_stun_untrusted,
    encode_stun,
    is_stun,
    parse_binding_response,
)

# --- RFC 5769 test vectors --------------------------------------------------

PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# §2.1 Sample Request (note the padding of USERNAME is spaces, not zeros).
RFC5769_REQUEST = bytes.fromhex(
    "00010058 2112a442 b7e7a701 bc34d686 fa87dfae"
    "80220010 5354554e 20746573 7420636c 69656e74"
    "00240004 6e0001ff"
    "80290008 932ff9b1 51263b36"
    "00060009 6576746a 3a683676 59202020"
    "00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2"
    "80280004 e57a3bcf".replace(" ", "")
)

# §2.2 Sample IPv4 Response: 192.0.2.1 port 32853.
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c 2112a442 b7e7a701 bc34d686 fa87dfae"
    "8022000b 74657374 20766563 746f7220"
    "00200008 0001a147 e112a643"
    "00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7"
    "80280004 c07d4c96".replace(" ", "")
)

# §2.3 Sample IPv6 Response: 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "01010048 2112a442 b7e7a701 bc34d686 fa87dfae"
    "8022000b 74657374 20766563 746f7220"
    "00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9"
    "00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41"
    "80280004 c8fb0b4c".replace(" ", "")
)


def _message_integrity_ok(data: bytes, key: bytes) -> bool:
    """RFC 8489 §14.5: HMAC-SHA1 over the message up to MESSAGE-INTEGRITY,
    with the length field counting up to and including MESSAGE-INTEGRITY."""
    offset = 20
    while offset < len(data):
        attr_type, attr_len = struct.unpack_from("!HH", data, offset)
        if attr_type == Attr.MESSAGE_INTEGRITY:
            length = offset + 24 - 20
            covered = data[:2] + struct.pack("!H", length) + data[4:offset]
            mac = hmac.new(key, covered, hashlib.sha1).digest()
            return hmac.compare_digest(mac, data[offset + 4 : offset + 24])
        offset += 4 + (attr_len + 3) // 4 * 4
    return False


def test_rfc5769_sample_request_decodes() -> None:
    msg = decode_stun_untrusted(RFC5769_REQUEST)
    assert msg.method == BINDING
    assert msg.message_class is StunClass.REQUEST
    assert msg.transaction_id == TXID
    assert not msg.classic
    assert msg.fingerprint  # CRC verified inside the decoder
    assert msg.first(Attr.SOFTWARE) == b"STUN test client"
    assert msg.first(Attr.USERNAME) == b"evtj:h6vY"  # padding (spaces) dropped
    assert msg.first(Attr.PRIORITY) == bytes.fromhex("6e0001ff")
    assert msg.first(Attr.ICE_CONTROLLED) == bytes.fromhex("932ff9b151263b36")
    assert [a.type for a in msg.attributes] == [
        Attr.SOFTWARE,
        Attr.PRIORITY,
        Attr.ICE_CONTROLLED,
        Attr.USERNAME,
        Attr.MESSAGE_INTEGRITY,
    ]
    # The vector itself is right (and our offsets with it).
    assert _message_integrity_ok(RFC5769_REQUEST, PASSWORD)


@pytest.mark.parametrize(
    ("vector", "expected"),
    [
        (RFC5769_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (RFC5769_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_responses_decode(vector: bytes, expected: tuple[str, int]) -> None:
    msg = decode_stun_untrusted(vector)
    assert msg.message_class is StunClass.SUCCESS
    assert msg.fingerprint
    assert msg.first(Attr.SOFTWARE) == b"test vector"
    assert parse_binding_response(vector, TXID) == expected
    assert _message_integrity_ok(vector, PASSWORD)


@pytest.mark.parametrize("vector", [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE])
def test_rfc5769_corrupt_fingerprint_rejected(vector: bytes) -> None:
    for index in (0 + 1, 30, len(vector) - 1):
        damaged = bytearray(vector)
        damaged[index] ^= 0x01
        with pytest.raises(BadStunMessage):
            decode_stun_untrusted(bytes(damaged))


def test_rfc5769_request_is_answered_despite_integrity() -> None:
    # No authentication on a public Binding server: MESSAGE-INTEGRITY is
    # recognised and ignored; PRIORITY (ICE) too. FINGERPRINT is echoed.
    reply = answer_binding(RFC5769_REQUEST, ("192.0.2.1", 32853))
    assert reply is not None
    msg = decode_stun_untrusted(reply)
    assert msg.fingerprint
    assert msg.transaction_id == TXID
    assert parse_binding_response(reply, TXID) == ("192.0.2.1", 32853)
    # Our XOR-MAPPED-ADDRESS value equals the RFC's.
    assert msg.first(Attr.XOR_MAPPED_ADDRESS) == bytes.fromhex("0001a147e112a643")


def test_attributes_after_message_integrity_are_ignored() -> None:
    mi = StunAttribute(Attr.MESSAGE_INTEGRITY, bytes(20))
    junk = StunAttribute(0x7777, b"x")
    raw = encode_stun(StunMessage(BINDING, StunClass.REQUEST, TXID, (mi, junk), fingerprint=True))
    assert decode_stun_untrusted(raw).attributes == (mi,)
    # ...so an unknown comprehension-required one there earns no 420.
    reply = answer_binding(raw, ("10.0.0.1", 1))
    assert reply is not None
    assert decode_stun_untrusted(reply).message_class is StunClass.SUCCESS


# --- encoding and the client side -------------------------------------------


def test_binding_request_bytes() -> None:
    raw = binding_request(TXID, fingerprint=False)
    assert raw == bytes.fromhex("0001 0000 2112a442".replace(" ", "")) + TXID
    with_fp = binding_request(TXID)
    assert len(with_fp) == 28
    assert decode_stun_untrusted(with_fp).fingerprint
    assert is_stun(raw) and is_stun(with_fp)


def test_binding_request_rejects_bad_txid() -> None:
    with pytest.raises(LocalProtocolError):
        binding_request(b"short")


@pytest.mark.parametrize(
    "address",
    [("203.0.113.7", 54321), ("2001:db8::1", 1), ("0.0.0.0", 0), ("::", 65535)],
)
def test_success_roundtrip(address: tuple[str, int]) -> None:
    raw = binding_success(TXID, address)
    assert parse_binding_response(raw, TXID) == address
    msg = decode_stun_untrusted(raw)
    plain = msg.first(Attr.MAPPED_ADDRESS)
    assert plain is not None
    assert decode_address_untrusted(plain, None) == address


def test_ipv4_mapped_and_zone_sources_are_normalised() -> None:
    assert parse_binding_response(binding_success(TXID, ("::ffff:198.51.100.2", 9)), TXID) == (
        "198.51.100.2",
        9,
    )
    assert parse_binding_response(binding_success(TXID, ("fe80::1%eth0", 9)), TXID) == (
        "fe80::1",
        9,
    )


def test_parse_response_checks_transaction_and_kind() -> None:
    raw = binding_success(TXID, ("192.0.2.1", 1))
    with pytest.raises(BadStunMessage):
        parse_binding_response(raw, bytes(12))
    with pytest.raises(BadStunMessage):
        parse_binding_response(binding_request(TXID), TXID)
    with pytest.raises(StunErrorResponse) as caught:
        parse_binding_response(binding_error(TXID, 420, unknown=(0x0002,)), TXID)
    assert caught.value.code == 420
    assert caught.value.reason == "Unknown Attribute"
    assert isinstance(caught.value, BadFrame)
    no_address = encode_stun(StunMessage(BINDING, StunClass.SUCCESS, TXID))
    with pytest.raises(BadStunMessage):
        parse_binding_response(no_address, TXID)


def test_mapped_address_fallback() -> None:
    only_plain = encode_stun(
        StunMessage(
            BINDING,
            StunClass.SUCCESS,
            TXID,
            (StunAttribute(Attr.MAPPED_ADDRESS, bytes.fromhex("00011234c0000201")),),
        )
    )
    assert parse_binding_response(only_plain, TXID) == ("192.0.2.1", 0x1234)


# --- the responder ------------------------------------------------------------


def _request(*attrs: StunAttribute, fingerprint: bool = False, method: int = BINDING) -> bytes:
    return encode_stun(StunMessage(method, StunClass.REQUEST, TXID, attrs, fingerprint))


def test_answer_plain_request() -> None:
    reply = answer_binding(_request(), ("192.0.2.9", 4000))
    assert reply is not None
    msg = decode_stun_untrusted(reply)
    assert (msg.method, msg.message_class) == (BINDING, StunClass.SUCCESS)
    assert not msg.fingerprint
    assert [a.type for a in msg.attributes] == [Attr.XOR_MAPPED_ADDRESS, Attr.MAPPED_ADDRESS]
    assert msg.first(Attr.SOFTWARE) is None


def test_unknown_comprehension_required_gets_420() -> None:
    raw = _request(
        StunAttribute(Attr.RESPONSE_ADDRESS, bytes(8)),
        StunAttribute(0x7F00, b""),
        StunAttribute(0x7F00, b"again"),
        StunAttribute(0xC000, b"optional is fine"),
        fingerprint=True,
    )
    reply = answer_binding(raw, ("192.0.2.9", 4000))
    assert reply is not None
    msg = decode_stun_untrusted(reply)
    assert msg.message_class is StunClass.ERROR
    assert msg.fingerprint
    assert msg.first(Attr.UNKNOWN_ATTRIBUTES) == bytes.fromhex("00027f00")
    with pytest.raises(StunErrorResponse) as caught:
        parse_binding_response(reply, TXID)
    assert caught.value.code == 420


def test_change_request() -> None:
    no_change = _request(StunAttribute(Attr.CHANGE_REQUEST, bytes(4)))
    reply = answer_binding(no_change, ("192.0.2.9", 4000))
    assert reply is not None
    assert parse_binding_response(reply, TXID) == ("192.0.2.9", 4000)
    change_port = _request(StunAttribute(Attr.CHANGE_REQUEST, bytes.fromhex("00000002")))
    reply = answer_binding(change_port, ("192.0.2.9", 4000))
    assert reply is not None
    assert decode_stun_untrusted(reply).first(Attr.UNKNOWN_ATTRIBUTES) == b"\x00\x03"


@pytest.mark.parametrize(
    "attr",
    [
        StunAttribute(Attr.CHANGE_REQUEST, bytes(3)),
        StunAttribute(Attr.MESSAGE_INTEGRITY, bytes(19)),
        StunAttribute(Attr.PRIORITY, bytes(8)),
        StunAttribute(Attr.USERNAME, bytes(600)),
        StunAttribute(Attr.MESSAGE_INTEGRITY_SHA256, bytes(12)),
    ],
)
def test_malformed_known_attribute_gets_400(attr: StunAttribute) -> None:
    reply = answer_binding(_request(attr), ("192.0.2.9", 4000))
    assert reply is not None
    with pytest.raises(StunErrorResponse) as caught:
        parse_binding_response(reply, TXID)
    assert caught.value.code == 400


def test_unknown_method_gets_400_with_its_method() -> None:
    reply = answer_binding(_request(method=0x003), ("192.0.2.9", 4000))  # TURN Allocate
    assert reply is not None
    msg = decode_stun_untrusted(reply)
    assert (msg.method, msg.message_class) == (0x003, StunClass.ERROR)


def test_not_requests_are_dropped() -> None:
    source = ("192.0.2.9", 4000)
    assert answer_binding(binding_success(TXID, source), source) is None
    indication = encode_stun(StunMessage(BINDING, StunClass.INDICATION, TXID))
    assert answer_binding(indication, source) is None
    assert answer_binding(b"", source) is None
    assert answer_binding(b"\xc0" + bytes(1199), source) is None  # QUIC long header
    assert answer_binding(_request()[:-1], source) is None
    bad_fp = bytearray(_request(fingerprint=True))
    bad_fp[-1] ^= 1
    assert answer_binding(bytes(bad_fp), source) is None


# --- classic RFC 3489 clients -------------------------------------------------

CLASSIC_TXID = bytes(range(16))


def _classic(*attrs: StunAttribute) -> bytes:
    return encode_stun(StunMessage(BINDING, StunClass.REQUEST, CLASSIC_TXID, attrs))


def test_classic_request_gets_mapped_address_only() -> None:
    raw = _classic()
    assert raw[4:8] != MAGIC_COOKIE.to_bytes(4, "big")
    assert is_stun(raw)
    reply = answer_binding(raw, ("198.51.100.4", 3478))
    assert reply is not None
    assert reply[4:20] == CLASSIC_TXID
    msg = decode_stun_untrusted(reply)
    assert msg.classic
    assert [a.type for a in msg.attributes] == [Attr.MAPPED_ADDRESS]
    assert decode_address_untrusted(msg.attributes[0].value, None) == ("198.51.100.4", 3478)


def test_classic_change_request_is_silent() -> None:
    source = ("198.51.100.4", 3478)
    assert answer_binding(_classic(StunAttribute(Attr.CHANGE_REQUEST, bytes(4))), source)
    change = StunAttribute(Attr.CHANGE_REQUEST, bytes.fromhex("00000006"))
    assert answer_binding(_classic(change), source) is None
    redirect = StunAttribute(Attr.RESPONSE_ADDRESS, bytes.fromhex("00011234c0000201"))
    assert answer_binding(_classic(redirect), source) is None


def test_is_stun_without_cookie_only_for_binding_requests() -> None:
    response = encode_stun(StunMessage(BINDING, StunClass.SUCCESS, CLASSIC_TXID))
    assert not is_stun(response)
    assert answer_binding(response, ("198.51.100.4", 1)) is None


def test_classic_cannot_carry_fingerprint() -> None:
    with pytest.raises(LocalProtocolError):
        encode_stun(StunMessage(BINDING, StunClass.REQUEST, CLASSIC_TXID, (), fingerprint=True))


# --- properties ---------------------------------------------------------------

_special = {Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT}
attributes = st.builds(
    StunAttribute,
    type=st.integers(0, 0xFFFF).filter(lambda t: t not in _special),
    value=st.binary(max_size=40),
)
modern_messages = st.builds(
    StunMessage,
    method=st.integers(0, 0xFFF),
    message_class=st.sampled_from(StunClass),
    transaction_id=st.binary(min_size=12, max_size=12),
    attributes=st.lists(attributes, max_size=10).map(tuple),
    fingerprint=st.booleans(),
)
# Classic RFC 3489: 128-bit id in place of cookie + id, no FINGERPRINT.
classic_messages = st.builds(
    StunMessage,
    method=st.integers(0, 0xFFF),
    message_class=st.sampled_from(StunClass),
    transaction_id=st.binary(min_size=16, max_size=16).filter(
        lambda tid: tid[:4] != MAGIC_COOKIE.to_bytes(4, "big")
    ),
    attributes=st.lists(attributes, max_size=10).map(tuple),
)
messages = st.one_of(modern_messages, classic_messages)
sources = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), st.integers(0, 65535)),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 65535)),
)


@given(messages)
def test_roundtrip(message: StunMessage) -> None:
    raw = encode_stun(message)
    assert decode_stun_untrusted(raw) == message
    classic_request = message.method == BINDING and message.message_class is StunClass.REQUEST
    assert is_stun(raw) == (not message.classic or classic_request)


@given(st.binary(max_size=200))
@settings(max_examples=2000)
def test_any_bytes_decode_cleanly(data: bytes) -> None:
    with contextlib.suppress(BadStunMessage):
        decode_stun_untrusted(data)
    answer_binding(data, ("192.0.2.1", 1))
    is_stun(data)


@given(messages, st.integers(0, 19), st.binary(min_size=1, max_size=4))
def test_mutated_messages_decode_cleanly(message: StunMessage, where: int, junk: bytes) -> None:
    raw = bytearray(encode_stun(message))
    pos = where % len(raw)
    raw[pos : pos + len(junk)] = junk
    with contextlib.suppress(BadStunMessage):
        decode_stun_untrusted(bytes(raw))
    answer_binding(bytes(raw), ("192.0.2.1", 1))


@given(messages, sources)
def test_reply_never_amplifies(message: StunMessage, source: tuple[str, int]) -> None:
    request = encode_stun(message)
    reply = answer_binding(request, source)
    if reply is not None:
        assert len(reply) <= len(request) + MAX_RESPONSE_GROWTH


@given(st.binary(min_size=12, max_size=12), sources, st.booleans())
def test_reply_to_any_source_parses(txid: bytes, source: tuple[str, int], fp: bool) -> None:
    request = binding_request(txid, fingerprint=fp)
    reply = answer_binding(request, source)
    assert reply is not None
    assert len(reply) <= len(request) + MAX_RESPONSE_GROWTH
    host = ipaddress.ip_address(source[0])
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    assert parse_binding_response(reply, txid) == (str(host), source[1])


def test_worst_case_growth_is_exactly_the_addresses() -> None:
    request = binding_request(TXID, fingerprint=False)
    reply = answer_binding(request, ("2001:db8::1", 1))
    assert reply is not None
    assert len(reply) - len(request) == MAX_RESPONSE_GROWTH


def test_too_many_attributes_rejected() -> None:
    raw = _request(*(StunAttribute(0x8001, b"") for _ in range(65)))
    with pytest.raises(BadStunMessage):
        decode_stun_untrusted(raw)


def test_source_must_be_numeric() -> None:
    with pytest.raises(LocalProtocolError):
        answer_binding(_request(), ("localhost", 1))


@given(
    st.binary(max_size=300).map(lambda b: b[: len(b) // 4 * 4]),
    st.sampled_from([0x0001, 0x0011, 0x0101, 0x0003]),
    st.booleans(),
)
def test_well_framed_random_attributes_are_handled(body: bytes, kind: int, cookie: bool) -> None:
    # Valid header, random attribute area: reaches the TLV and request checks.
    middle = MAGIC_COOKIE.to_bytes(4, "big") if cookie else b"\x12\x34\x56\x78"
    raw = struct.pack("!HH", kind, len(body)) + middle + TXID + body
    with contextlib.suppress(BadStunMessage):
        decode_stun_untrusted(raw)
    reply = answer_binding(raw, ("2001:db8::7", 7))
    if reply is not None:
        assert len(reply) <= len(raw) + MAX_RESPONSE_GROWTH
        assert decode_stun_untrusted(reply).transaction_id in (TXID, middle + TXID)
