"""Sans-IO STUN codec and Binding responder (RFC 8489, RFC 5389, RFC 3489).

What it is for
--------------
relayd answers standard STUN Binding requests on its UDP port so a node
learns its *reflexive* address (the address its NAT mapped it to); two
relays or two ports tell an easy NAT from a hard one (``p2psync netcheck``).
The node side uses :func:`binding_request` / :func:`parse_binding_response`.
Nothing here touches a socket, a clock or entropy: transaction ids are
injected by the caller.

Wire format (RFC 8489 §5, all integers big-endian)::

    u16 type      top two bits 00; method M0..M11 interleaved with class C0,C1
    u16 length    bytes of attributes after this 20-byte header, multiple of 4
    u32 cookie    0x2112A442 (absent in classic RFC 3489: part of a 128-bit id)
    96  txid      transaction id, chosen by the client, echoed by the server
    attributes    u16 type | u16 length | value | zero padding to 4 bytes

    -> Binding request   0x0001  [FINGERPRINT]
    <- Binding success   0x0101  XOR-MAPPED-ADDRESS, MAPPED-ADDRESS [FINGERPRINT]
    <- Binding error     0x0111  ERROR-CODE [UNKNOWN-ATTRIBUTES] [FINGERPRINT]

    XOR-MAPPED-ADDRESS (§14.2): u8 0 | u8 family (1=IPv4, 2=IPv6)
        | u16 port ^ 0x2112 | address ^ (cookie [|| txid for IPv6])
    MAPPED-ADDRESS (§14.1):     the same without the XOR.
    FINGERPRINT (§14.7): CRC-32 of the message before it (with the length
        field already counting it) xor 0x5354554E; always the last attribute.

Rules this module keeps
-----------------------
- :func:`decode_stun_untrusted` raises only :class:`BadStunMessage`, for any
  input. It checks framing (header, lengths, padding that fits), a
  FINGERPRINT if one is present, and a cap on attribute count; it does *not*
  interpret attribute values (so it never fails on an attribute it does not
  know). Attributes after MESSAGE-INTEGRITY other than
  MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are ignored (§9).
- :func:`answer_binding` is the whole server: bytes and the source address
  in, response bytes or ``None`` (drop) out. Per §6.3, framing errors are
  dropped silently (with QUIC on the same port they may not be STUN at
  all); a parsable request with an unknown comprehension-required attribute
  (type < 0x8000) gets 420 with UNKNOWN-ATTRIBUTES (§6.3.1); a parsable but
  malformed request (bad length of a known attribute, unknown method) gets
  400. Indications and responses are never answered.
- No amplification: responses carry no SOFTWARE and no ALTERNATE-SERVER; a
  response is never longer than its request plus the two address attributes
  (:data:`MAX_RESPONSE_GROWTH` = 48 bytes for IPv6). FINGERPRINT is added
  only when the request carried one (then both grow by the same 8 bytes).
- Authentication (§9) is not used: the Binding usage on a public server
  needs none (RFC 8489 §9: "a STUN server on the public Internet supporting
  ICE would have no authentication"). USERNAME, MESSAGE-INTEGRITY(-SHA256),
  REALM, NONCE, USERHASH and ICE's PRIORITY / USE-CANDIDATE are recognised,
  length-checked and ignored rather than answered with 420.
- CHANGE-REQUEST (RFC 5780): relayd cannot answer from another IP, and
  its alternate port is a separate, independent socket. A request with zero
  flags is answered normally; one asking for a change gets 420 naming
  CHANGE-REQUEST (RFC 5780's answer for servers without an alternate
  address). Classic clients get silence instead: in RFC 3489's algorithm a
  reply to "change IP/port" from the same address would be misread as "no
  NAT".
- Classic RFC 3489 clients (no magic cookie): a Binding request whose length
  is consistent is answered with MAPPED-ADDRESS only (they know no XOR
  address and no FINGERPRINT); everything else without the cookie is not
  treated as STUN. RFC 3489's SOURCE-ADDRESS and CHANGED-ADDRESS are not
  sent (RFC 8489's backwards-compatibility rules need only MAPPED-ADDRESS).
- Demultiplexing with QUIC (RFC 9443 / RFC 7983): QUIC packets always have
  the fixed bit 0x40 set (we do not negotiate grease_quic_bit, RFC 9287), so
  a first byte with the top two bits ``00`` is never QUIC.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
import zlib
from dataclasses import dataclass

from p2psync.errors import BadFrame, LocalProtocolError

__all__ = [
    "BINDING",
    "MAGIC_COOKIE",
    "MAX_RESPONSE_GROWTH",
    "Attr",
    "BadStunMessage",
    "StunAttribute",
    "StunClass",
    "StunErrorResponse",
    "StunMessage",
    "answer_binding",
    "binding_error",
    "binding_request",
    "binding_success",
    "decode_address_untrusted",
    "decode_stun_untrusted",
    "encode_stun",
    "is_stun",
    "parse_binding_response",
]

MAGIC_COOKIE = 0x2112A442
_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")
# RFC 8489 §14.7: CRC-32 xor this constant ("STUN" in ASCII).
_FINGERPRINT_XOR = 0x5354554E
HEADER_SIZE = 20
TXID_SIZE = 12
CLASSIC_TXID_SIZE = 16
BINDING = 0x001
# Real Binding messages carry fewer than 15 attributes; a cap keeps the
# decode cost of a hostile 64 KiB datagram (up to 16k empty attributes) flat.
MAX_ATTRIBUTES = 64
# USERNAME: RFC 5389 §15.3 allows up to 513 bytes (RFC 8489 §14.3 tightened it
# to 508); we accept the older, larger bound since we never use the value.
MAX_USERNAME = 513
# The response may exceed the request by at most the two address attributes
# (XOR-MAPPED-ADDRESS and MAPPED-ADDRESS, 4 + 20 bytes each for IPv6).
MAX_RESPONSE_GROWTH = 2 * (4 + 20)

_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02


class Attr(enum.IntEnum):
    """Attribute types we name (RFC 8489 §18.3 registry, RFC 5780, RFC 8445)."""

    MAPPED_ADDRESS = 0x0001
    RESPONSE_ADDRESS = 0x0002  # RFC 3489, reflection vector: never honoured
    CHANGE_REQUEST = 0x0003  # RFC 5780
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024  # RFC 8445 (ICE)
    USE_CANDIDATE = 0x0025  # RFC 8445 (ICE)
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


# Comprehension-required attributes a Binding request may carry that we
# understand well enough to ignore safely (see the module docstring). Any
# other type below 0x8000 earns a 420.
_UNDERSTOOD_IN_REQUEST = frozenset(
    {
        Attr.MAPPED_ADDRESS,
        Attr.CHANGE_REQUEST,
        Attr.USERNAME,
        Attr.MESSAGE_INTEGRITY,
        Attr.REALM,
        Attr.NONCE,
        Attr.MESSAGE_INTEGRITY_SHA256,
        Attr.PASSWORD_ALGORITHM,
        Attr.USERHASH,
        Attr.XOR_MAPPED_ADDRESS,
        Attr.PRIORITY,
        Attr.USE_CANDIDATE,
    }
)

# Reason phrases are kept short on purpose (amplification); §14.8 lets us.
_REASONS = {400: "Bad Request", 420: "Unknown Attribute"}


class StunClass(enum.IntEnum):
    """The two class bits C1 C0 of the message type (RFC 8489 §5)."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class BadStunMessage(BadFrame):
    """Bytes that are not a well-formed STUN message (or not the one we want)."""


class StunErrorResponse(BadStunMessage):
    """The server answered our request with an error response."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"STUN server answered error {code} {reason!r}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StunAttribute:
    """One TLV; ``value`` is unpadded."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class StunMessage:
    """A decoded message.

    ``transaction_id`` is 12 bytes for RFC 5389/8489 messages and 16 bytes for
    classic RFC 3489 messages (no magic cookie: the cookie field is part of
    their 128-bit id). ``fingerprint`` says the message ends (or, encoded,
    will end) with a valid FINGERPRINT, which is not listed in ``attributes``.
    """

    method: int
    message_class: StunClass
    transaction_id: bytes
    attributes: tuple[StunAttribute, ...] = ()
    fingerprint: bool = False

    @property
    def classic(self) -> bool:
        """True for an RFC 3489 message without the magic cookie."""
        return len(self.transaction_id) == CLASSIC_TXID_SIZE

    def first(self, attr_type: int) -> bytes | None:
        """Value of the first attribute of this type, or ``None``."""
        for attr in self.attributes:
            if attr.type == attr_type:
                return attr.value
        return None


# --- message type bits (RFC 8489 §5, figure 3) ------------------------------


def _pack_type(method: int, message_class: StunClass) -> int:
    c = int(message_class)
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
    )


def _unpack_type(message_type: int) -> tuple[int, StunClass]:
    method = (
        (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    )
    c = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, StunClass(c)


_BINDING_REQUEST_TYPE = _pack_type(BINDING, StunClass.REQUEST)


def _fingerprint(data: bytes) -> int:
    return (zlib.crc32(data) & 0xFFFFFFFF) ^ _FINGERPRINT_XOR


# --- cheap demultiplexing check ----------------------------------------------


def is_stun(data: bytes) -> bool:
    """Cheap check that ``data`` looks like a STUN message worth decoding.

    True when the top two bits are 00, the length field is a multiple of 4
    and equals the bytes that follow the header, and either the magic cookie
    is present or it is a classic RFC 3489 Binding request.
    """
    if len(data) < HEADER_SIZE or data[0] & 0xC0:
        return False
    message_type, length = struct.unpack_from("!HH", data, 0)
    if length % 4 or HEADER_SIZE + length != len(data):
        return False
    return data[4:8] == _COOKIE_BYTES or message_type == _BINDING_REQUEST_TYPE


# --- decoding ---------------------------------------------------------------


def decode_stun_untrusted(data: bytes) -> StunMessage:
    """Decode one STUN message from untrusted bytes.

    Raises only :class:`BadStunMessage`. Checks framing and FINGERPRINT, not
    attribute semantics (see the module docstring).
    """
    if len(data) < HEADER_SIZE:
        raise BadStunMessage(f"STUN message too short ({len(data)} bytes)")
    message_type, length = struct.unpack_from("!HH", data, 0)
    if message_type & 0xC000:
        raise BadStunMessage("top two bits of a STUN message must be zero")
    if length % 4:
        raise BadStunMessage(f"STUN length {length} is not a multiple of 4")
    if HEADER_SIZE + length != len(data):
        raise BadStunMessage(
            f"STUN length field says {length} bytes, datagram has {len(data) - HEADER_SIZE}"
        )
    method, message_class = _unpack_type(message_type)
    modern = data[4:8] == _COOKIE_BYTES
    transaction_id = bytes(data[8:HEADER_SIZE]) if modern else bytes(data[4:HEADER_SIZE])

    attributes: list[StunAttribute] = []
    fingerprint = False
    # §9: after MESSAGE-INTEGRITY only MI-SHA256 and FINGERPRINT count; after
    # MI-SHA256 (without MI) only FINGERPRINT counts.
    after_integrity: frozenset[int] | None = None
    offset = HEADER_SIZE
    count = 0
    while offset < len(data):
        count += 1
        if count > MAX_ATTRIBUTES:
            raise BadStunMessage(f"more than {MAX_ATTRIBUTES} STUN attributes")
        if fingerprint:
            raise BadStunMessage("STUN attribute after FINGERPRINT")
        if offset + 4 > len(data):
            raise BadStunMessage("truncated STUN attribute header")
        attr_type, attr_len = struct.unpack_from("!HH", data, offset)
        start = offset + 4
        end = start + attr_len
        padded_end = start + (attr_len + 3) // 4 * 4
        if padded_end > len(data):
            raise BadStunMessage(f"STUN attribute 0x{attr_type:04x} overruns the message")
        value = bytes(data[start:end])
        if modern and attr_type == Attr.FINGERPRINT:
            if attr_len != 4:
                raise BadStunMessage("FINGERPRINT must be 4 bytes")
            if padded_end != len(data):
                raise BadStunMessage("FINGERPRINT must be the last attribute")
            (received,) = struct.unpack("!I", value)
            if received != _fingerprint(bytes(data[:offset])):
                raise BadStunMessage("FINGERPRINT mismatch")
            fingerprint = True
        elif after_integrity is None or attr_type in after_integrity:
            attributes.append(StunAttribute(attr_type, value))
            if modern and attr_type == Attr.MESSAGE_INTEGRITY:
                after_integrity = frozenset({Attr.MESSAGE_INTEGRITY_SHA256})
            elif modern and attr_type == Attr.MESSAGE_INTEGRITY_SHA256:
                after_integrity = frozenset()
        offset = padded_end
    return StunMessage(method, message_class, transaction_id, tuple(attributes), fingerprint)


def decode_address_untrusted(value: bytes, transaction_id: bytes | None) -> tuple[str, int]:
    """Decode a (XOR-)MAPPED-ADDRESS value (RFC 8489 §14.1, §14.2).

    Pass the 12-byte ``transaction_id`` for XOR-MAPPED-ADDRESS, ``None`` for
    plain MAPPED-ADDRESS. Raises only :class:`BadStunMessage`.
    """
    if len(value) < 4:
        raise BadStunMessage("address attribute shorter than 4 bytes")
    family = value[1]
    (port,) = struct.unpack_from("!H", value, 2)
    raw = value[4:]
    if (family, len(raw)) not in ((_FAMILY_IPV4, 4), (_FAMILY_IPV6, 16)):
        raise BadStunMessage(f"address attribute: family {family} with {len(raw)} address bytes")
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = _xor(raw, _COOKIE_BYTES + transaction_id)
    host = str(ipaddress.IPv4Address(raw) if len(raw) == 4 else ipaddress.IPv6Address(raw))
    return host, port


def _xor(data: bytes, key: bytes) -> bytes:
    n = len(data)
    return (int.from_bytes(data, "big") ^ int.from_bytes(key[:n], "big")).to_bytes(n, "big")


# --- encoding ---------------------------------------------------------------


def encode_stun(message: StunMessage) -> bytes:
    """Encode ``message``; appends FINGERPRINT when ``message.fingerprint``.

    Raises :class:`LocalProtocolError` for what cannot be encoded (bad
    transaction id size, method out of range, oversized attributes).
    """
    tid = message.transaction_id
    if len(tid) not in (TXID_SIZE, CLASSIC_TXID_SIZE):
        raise LocalProtocolError("STUN transaction id must be 12 (or classic 16) bytes")
    if not 0 <= message.method <= 0xFFF:
        raise LocalProtocolError(f"STUN method {message.method} out of range")
    if message.classic and message.fingerprint:
        raise LocalProtocolError("classic RFC 3489 messages carry no FINGERPRINT")
    parts: list[bytes] = []
    for attr in message.attributes:
        if not 0 <= attr.type <= 0xFFFF or len(attr.value) > 0xFFFF:
            raise LocalProtocolError(f"STUN attribute 0x{attr.type:04x} cannot be encoded")
        pad = -len(attr.value) % 4
        parts.append(struct.pack("!HH", attr.type, len(attr.value)) + attr.value + bytes(pad))
    body = b"".join(parts)
    length = len(body) + (8 if message.fingerprint else 0)
    if length > 0xFFFF:
        raise LocalProtocolError("STUN message longer than 65535 bytes")
    header = struct.pack("!HH", _pack_type(message.method, message.message_class), length)
    header += tid if message.classic else _COOKIE_BYTES + tid
    out = header + body
    if message.fingerprint:
        out += struct.pack("!HHI", Attr.FINGERPRINT, 4, _fingerprint(out))
    return out


_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address_value(ip: _IPAddress, port: int, transaction_id: bytes | None) -> bytes:
    raw = ip.packed
    family = _FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6
    if transaction_id is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = _xor(raw, _COOKIE_BYTES + transaction_id)
    return struct.pack("!BBH", 0, family, port) + raw


def _normalise_source(host: str) -> _IPAddress:
    """Numeric host as the client sees it: no IPv6 zone, IPv4-mapped -> IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise LocalProtocolError(f"{host!r} is not a numeric IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def binding_request(transaction_id: bytes, *, fingerprint: bool = True) -> bytes:
    """-> Binding request with the caller's random 12-byte transaction id.

    FINGERPRINT is on by default: RFC 8489 §7 recommends it when STUN shares
    a port with another protocol, as it does with QUIC here.
    """
    if len(transaction_id) != TXID_SIZE:
        raise LocalProtocolError("STUN transaction id must be 12 bytes")
    return encode_stun(
        StunMessage(BINDING, StunClass.REQUEST, transaction_id, (), fingerprint=fingerprint)
    )


def binding_success(
    transaction_id: bytes, address: tuple[str, int], *, fingerprint: bool = False
) -> bytes:
    """<- Binding success carrying the reflexive ``address`` (numeric host).

    RFC 5389+ (12-byte id): XOR-MAPPED-ADDRESS then MAPPED-ADDRESS (the
    latter for old clients; a mismatch between the two reveals an ALG).
    Classic (16-byte id): MAPPED-ADDRESS only.
    """
    ip, port = _normalise_source(address[0]), address[1]
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port} out of range")
    attrs: tuple[StunAttribute, ...]
    if len(transaction_id) == CLASSIC_TXID_SIZE:
        attrs = (StunAttribute(Attr.MAPPED_ADDRESS, _address_value(ip, port, None)),)
    else:
        attrs = (
            StunAttribute(Attr.XOR_MAPPED_ADDRESS, _address_value(ip, port, transaction_id)),
            StunAttribute(Attr.MAPPED_ADDRESS, _address_value(ip, port, None)),
        )
    return encode_stun(
        StunMessage(BINDING, StunClass.SUCCESS, transaction_id, attrs, fingerprint=fingerprint)
    )


def binding_error(
    transaction_id: bytes,
    code: int,
    *,
    unknown: tuple[int, ...] = (),
    fingerprint: bool = False,
    method: int = BINDING,
) -> bytes:
    """<- Error response with ERROR-CODE (§14.8) and UNKNOWN-ATTRIBUTES (§14.13)."""
    if not 300 <= code <= 699:
        raise LocalProtocolError(f"STUN error code {code} out of range")
    reason = _REASONS.get(code, "").encode()
    value = struct.pack("!HBB", 0, code // 100, code % 100) + reason
    attrs = [StunAttribute(Attr.ERROR_CODE, value)]
    if unknown:
        attrs.append(
            StunAttribute(Attr.UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", t) for t in unknown))
        )
    return encode_stun(
        StunMessage(method, StunClass.ERROR, transaction_id, tuple(attrs), fingerprint=fingerprint)
    )


# --- the responder ------------------------------------------------------------

# Value lengths of the fixed-size attributes a request may carry (RFC 8489 §14, RFC 8445 §16.1).
_FIXED_LENGTHS: dict[int, int] = {
    Attr.CHANGE_REQUEST: 4,
    Attr.MESSAGE_INTEGRITY: 20,
    Attr.PRIORITY: 4,
    Attr.USE_CANDIDATE: 0,
    Attr.USERHASH: 32,
}


def _length_ok(attr: StunAttribute) -> bool:
    size = len(attr.value)
    if attr.type == Attr.USERNAME:
        return size <= MAX_USERNAME
    if attr.type == Attr.MESSAGE_INTEGRITY_SHA256:
        return 16 <= size <= 32 and size % 4 == 0  # §14.6
    want = _FIXED_LENGTHS.get(attr.type)
    return want is None or size == want


def _request_problem(message: StunMessage) -> tuple[int, tuple[int, ...]] | None:
    """(error code, unknown attributes) for a parsable request we refuse."""
    unknown: list[int] = []
    malformed = False
    for attr in message.attributes:
        if attr.type >= 0x8000:
            continue  # comprehension-optional: ignore what we don't know (§14)
        if attr.type not in _UNDERSTOOD_IN_REQUEST:
            if attr.type not in unknown:
                unknown.append(attr.type)
            continue
        if not _length_ok(attr):
            malformed = True
        elif attr.type == Attr.CHANGE_REQUEST and attr.value[3] & 0x06:
            # RFC 5780: we cannot send from another IP or port.
            unknown.append(Attr.CHANGE_REQUEST)
    if unknown:
        return 420, tuple(unknown)
    if malformed:
        return 400, ()
    return None


def answer_binding(data: bytes, source: tuple[str, int]) -> bytes | None:
    """The whole STUN server: a datagram from ``source`` -> reply bytes or ``None``.

    ``source`` is the datagram's numeric source address as the socket
    reported it (an IPv6 zone or IPv4-mapped form is normalised; a host
    name raises :class:`LocalProtocolError`). ``None``
    means drop: not STUN, broken framing, not a request, or a classic
    request we cannot answer truthfully.
    """
    if not is_stun(data):
        return None
    try:
        request = decode_stun_untrusted(data)
    except BadStunMessage:
        return None
    if request.message_class is not StunClass.REQUEST:
        return None
    tid = request.transaction_id
    if request.classic:
        # is_stun only lets classic Binding requests through. Any
        # comprehension-required attribute we do not honour (RESPONSE-ADDRESS,
        # a CHANGE-REQUEST asking for a change, ...) means silence: see the
        # module docstring.
        if _request_problem(request) is not None:
            return None
        return binding_success(tid, source)
    fp = request.fingerprint
    if request.method != BINDING:
        return binding_error(tid, 400, fingerprint=fp, method=request.method)
    problem = _request_problem(request)
    if problem is not None:
        code, unknown = problem
        return binding_error(tid, code, unknown=unknown, fingerprint=fp)
    return binding_success(tid, source, fingerprint=fp)


# --- the client side --------------------------------------------------------


def parse_binding_response(data: bytes, expected_txid: bytes) -> tuple[str, int]:
    """<- our reflexive address from a Binding success for ``expected_txid``.

    Prefers XOR-MAPPED-ADDRESS, falls back to MAPPED-ADDRESS (RFC 8489
    §14.1). Raises :class:`StunErrorResponse` for an error response and
    :class:`BadStunMessage` for anything else that is not our answer.
    """
    message = decode_stun_untrusted(data)
    if message.classic or message.transaction_id != expected_txid:
        raise BadStunMessage("STUN response for another transaction")
    if message.method != BINDING:
        raise BadStunMessage(f"STUN response of method {message.method}, wanted Binding")
    if message.message_class is StunClass.ERROR:
        value = message.first(Attr.ERROR_CODE)
        if value is None or len(value) < 4:
            raise StunErrorResponse(0, "")
        code = (value[2] & 0x07) * 100 + value[3]
        return_reason = value[4:].decode("utf-8", "replace")[:128]
        raise StunErrorResponse(code, return_reason)
    if message.message_class is not StunClass.SUCCESS:
        raise BadStunMessage("STUN message is not a response")
    xor_value = message.first(Attr.XOR_MAPPED_ADDRESS)
    if xor_value is not None:
        return decode_address_untrusted(xor_value, message.transaction_id)
    plain = message.first(Attr.MAPPED_ADDRESS)
    if plain is not None:
        return decode_address_untrusted(plain, None)
    raise BadStunMessage("STUN Binding success without a mapped address")
