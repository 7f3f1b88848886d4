"""The relay protocol between a node and relayd (ALPN ``p2psync-relay/1``), sans-IO.

Theory
------
A node keeps one QUIC connection to its **home relay** and opens **one**
bidirectional stream on it; every message of this protocol travels on that
stream as a frame::

    frame = u32 big-endian length || body          (length <= max_frame)
    body  = msgpack array [type, field, ...]       (never a map)

The relay forwards opaque payloads (end-to-end encrypted QUIC packets and
disco messages between nodes) by NodeId; it never looks inside them. It
learns which NodeId sits behind a connection only from a signature over a
fresh challenge, never from what a node claims.

Handshake and traffic (``->`` node to relay, ``<-`` relay to node)::

    -> HELLO          [0, version u16]                          first frame, opens the stream
    <- CHALLENGE      [1, nonce bin32, observed addr|nil]
    -> AUTH           [2, node_id bin32, signature bin64, token bin|nil, [addr, ...](, flags u32)]
    <- WELCOME        [3, observed addr|nil, max_payload uint(, flags u32)]  now authenticated
    <- ERROR          [11, code uint, message str]              (see RelayErrorCode)

    -> SEND           [4, dst bin32, payload bin]               payload <= max_payload
    <- RECV           [5, src bin32, payload bin]               src proven by AUTH
    <- NOT_HERE       [7, dst bin32]                            dst has no connection here
    -> LOOKUP         [6, request_id u32, node_id bin32]
    <- LOOKUP_RESULT  [9, request_id u32, node_id bin32, connected bool,
                          observed addr|nil, [addr, ...]]
    -> PING           [8, nonce u64]
    <- PONG           [10, nonce u64]

    addr = [host str (numeric IPv4/IPv6), port u16]

AUTH's signature is Ed25519 by the node's identity over::

    b"p2psync-relay auth v1\\0" || nonce (32) || node NodeId (32) || relay NodeId (32)
    b"p2psync-relay auth v2\\0" || nonce (32) || node NodeId (32) || relay NodeId (32)
                                 || flags (u32 big-endian)          (an AUTH with flags)

The nonce makes it worthless on any other connection; the relay's NodeId
(proven to the node by the QUIC/TLS certificate, see
:mod:`p2psync.net.tls`) makes it worthless at any other relay, so a
malicious relay cannot replay a node's AUTH to a real one. The v2 input
also covers the capability flags, so what the node asks for is part of
what its key signed (the distinct context keeps a v1 signature from ever
verifying as a v2 one, and back).

Capability flags (AUTH ``flags``: what the node asks for; WELCOME
``flags``: what the relay grants, a subset). Unknown bits are ignored, so
a flag can be added without a new protocol version::

    FLAG_UDP_DATAGRAMS = 0x1    the UDP fast path below

Both fields are optional on the wire: an AUTH without ``flags`` is an
older node's (v1 signature input, no capabilities), and the relay answers
it with a WELCOME without ``flags``, which older nodes can decode. A relay
older than the flags refuses a 6-field AUTH with PROTOCOL_ERROR; the node
then logs in without flags on its next attempt (see
:mod:`p2psync.net.relay_client`).

UDP fast path (``FLAG_UDP_DATAGRAMS``, TURN ChannelData-like)
--------------------------------------------------------------
Once both sides have the flag, relayed datagrams may skip the relay
stream and travel as plain UDP datagrams between the node's socket (the
same socket its relay connection uses, so the same NAT mapping, kept open
by that connection) and the relay's UDP port::

    -> DATAGRAM_TO_RELAY    8e 70 32 70 72 01 | dst NodeId (32) | payload
    <- DATAGRAM_FROM_RELAY  8e 70 32 70 72 02 | src NodeId (32) | payload

The 5-byte prefix is ``0x8e`` "p2pr"; the sixth byte is the direction, so
neither side ever mistakes one direction for the other. ``payload`` (at
least one byte) is exactly what a SEND/RECV payload would be: one inner
QUIC datagram or disco message. Overhead: :data:`DATAGRAM_OVERHEAD` (38)
bytes. Demultiplexing on the shared socket (table in :mod:`p2psync.net.disco`):
the first byte has the top bits ``10`` (so no QUIC v1 long or short header,
whose Fixed Bit 0x40 is set, and no STUN, whose top bits are ``00``), it is
not disco's ``0x8d``, and bytes 1..5 are not the all-zero version of a QUIC
Version Negotiation packet.

There is no authentication in the datagram itself: the relay accepts a
DATAGRAM_TO_RELAY only from the exact UDP address (IP and port) of an
authenticated connection that asked for the flag, and charges it to that
node (see :mod:`relayd.routing`); a node accepts a DATAGRAM_FROM_RELAY only
from its relay's address (see :mod:`p2psync.net.endpoint`). Like a TURN
permission, the source address is the credential; the security argument is
in :mod:`relayd.routing` and docs/security.md.

``token`` is the relay's optional shared access token (a relay may require
it); ``[addr, ...]`` are the local addresses the node chooses to publish in
LOOKUP answers (at most :data:`MAX_PUBLISHED_ADDRESSES`). WELCOME tells the
node the largest payload the relay forwards.

Errors: ERROR codes :attr:`RelayErrorCode.RATE_LIMITED` and
:attr:`RelayErrorCode.FRAME_TOO_LARGE` are notices — the offending frame was
dropped and the connection stays. Every other code ends the connection: the
relay closes it right after the ERROR, with the same code as the QUIC
application error code (RFC 9000 §20.2), so a node that missed the ERROR
frame still learns why.

Rules
-----
- Message types are frozen, slotted dataclasses; :data:`NodeToRelay` and
  :data:`RelayToNode` are the two directions, and each direction's decoder
  refuses the other's types.
- :func:`decode_node_to_relay_untrusted`, :func:`decode_relay_to_node_untrusted`
  and :class:`FrameDecoder` raise only :class:`~p2psync.errors.BadFrame`
  (:class:`FrameTooLarge` for a length header over the limit).
- :func:`decode_datagram_to_relay_untrusted` and
  :func:`decode_datagram_from_relay_untrusted` raise only :class:`BadFrame`.
- NodeId checks cost ~0.1 ms (an Ed25519 point check); a :class:`NodeIdCache`
  keeps validated ids so a busy connection pays it once per peer.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from p2psync.crypto.identity import NODE_ID_SIZE, SIGNATURE_SIZE, NodeId
from p2psync.errors import BadFrame
from p2psync.proto import framing
from p2psync.proto.codec import (
    as_bytes,
    as_int,
    as_list,
    as_str,
    pack,
    unpack_untrusted,
)
from p2psync.proto.framing import FrameTooLarge

RELAY_ALPN: Final = "p2psync-relay/1"
PROTOCOL_VERSION: Final = 1

# Largest payload a relay forwards unless it says otherwise in WELCOME: holds
# any QUIC datagram (<= 1500 bytes on real paths) with room for jumbo paths
# and disco messages, and bounds what one frame makes either side buffer.
DEFAULT_MAX_PAYLOAD: Final = 64 * 1024
# Bytes a SEND/RECV frame adds around its payload (type, NodeId, msgpack
# headers: 1 + 34 + 5 = 40), rounded up; also enough for every control frame.
FRAME_OVERHEAD: Final = 1024
NONCE_SIZE: Final = 32
# Published addresses per node: a few LAN interfaces and IPv6 addresses.
MAX_PUBLISHED_ADDRESSES: Final = 16
# An access token is a shared secret string of reasonable size, not a payload.
MAX_ACCESS_TOKEN: Final = 256
# ERROR message text: enough to say what went wrong and what to do.
MAX_ERROR_MESSAGE: Final = 256
# Longest numeric IPv6 text (with an embedded IPv4 part) is 45 characters.
_MAX_HOST_TEXT: Final = 45
_U32: Final = 2**32 - 1
_U64: Final = 2**64 - 1

AUTH_CONTEXT: Final = b"p2psync-relay auth v1\0"
AUTH_CONTEXT_FLAGS: Final = b"p2psync-relay auth v2\0"

# Capability flags (AUTH asks, WELCOME grants; unknown bits are ignored).
FLAG_UDP_DATAGRAMS: Final = 0x1
KNOWN_FLAGS: Final = FLAG_UDP_DATAGRAMS

# UDP fast path datagrams: a 5-byte prefix, then the direction byte.
DATAGRAM_PREFIX: Final = b"\x8ep2pr"
DATAGRAM_TO_RELAY: Final = DATAGRAM_PREFIX + b"\x01"
DATAGRAM_FROM_RELAY: Final = DATAGRAM_PREFIX + b"\x02"
DATAGRAM_HEADER_SIZE: Final = len(DATAGRAM_TO_RELAY)
# Bytes a fast-path datagram adds around its payload: header and NodeId.
DATAGRAM_OVERHEAD: Final = DATAGRAM_HEADER_SIZE + NODE_ID_SIZE

FRAME_HEADER_SIZE: Final = framing.FRAME_HEADER_SIZE

Address = tuple[str, int]


class RelayErrorCode(enum.IntEnum):
    """ERROR codes; also the QUIC application error code when the relay closes."""

    RATE_LIMITED = 1  # notice: frame dropped by the node's token buckets
    FRAME_TOO_LARGE = 2  # notice for an oversize SEND payload; fatal for a length header
    NOT_AUTHENTICATED = 3  # a frame other than HELLO/AUTH before WELCOME
    BAD_AUTH = 4  # signature did not verify, or a wrong token
    NOT_ALLOWED = 5  # NodeId not on the relay's allow-list
    SERVER_FULL = 6  # connection limit (total or per source IP)
    SHUTTING_DOWN = 7  # the relay is stopping; reconnect later
    REPLACED = 8  # another connection authenticated as the same NodeId
    PROTOCOL_ERROR = 9  # malformed frame or message out of order
    TIMEOUT = 10  # handshake not finished in time, or idle too long
    UNSUPPORTED_VERSION = 11  # HELLO version the relay does not speak
    WRITE_TIMEOUT = 12  # the node did not read its frames in time

    @property
    def is_fatal(self) -> bool:
        """True if the relay closes the connection after sending this code."""
        return self not in (RelayErrorCode.RATE_LIMITED, RelayErrorCode.FRAME_TOO_LARGE)


# --- messages: node -> relay ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Auth:
    """``flags`` None: the field is absent (an older node; v1 signature input)."""

    node_id: NodeId
    signature: bytes
    access_token: bytes | None = None
    published: tuple[Address, ...] = ()
    flags: int | None = None


@dataclass(frozen=True, slots=True)
class Send:
    dst: NodeId
    payload: bytes


@dataclass(frozen=True, slots=True)
class Lookup:
    request_id: int
    node_id: NodeId


@dataclass(frozen=True, slots=True)
class Ping:
    nonce: int


NodeToRelay = Hello | Auth | Send | Lookup | Ping


# --- messages: relay -> node ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes
    observed: Address | None


@dataclass(frozen=True, slots=True)
class Welcome:
    """``flags`` None: the field is absent (the answer to an AUTH without flags)."""

    observed: Address | None
    max_payload: int
    flags: int | None = None

    def grants(self, flag: int) -> bool:
        return self.flags is not None and bool(self.flags & flag)


@dataclass(frozen=True, slots=True)
class Recv:
    src: NodeId
    payload: bytes


@dataclass(frozen=True, slots=True)
class NotHere:
    dst: NodeId


@dataclass(frozen=True, slots=True)
class LookupResult:
    request_id: int
    node_id: NodeId
    connected: bool
    observed: Address | None
    published: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class Pong:
    nonce: int


@dataclass(frozen=True, slots=True)
class Error:
    """``code`` is an int: a newer relay may send codes this node does not know."""

    code: int
    message: str

    @property
    def known_code(self) -> RelayErrorCode | None:
        try:
            return RelayErrorCode(self.code)
        except ValueError:
            return None

    @property
    def is_fatal(self) -> bool:
        known = self.known_code
        return known is None or known.is_fatal


RelayToNode = Challenge | Welcome | Recv | NotHere | LookupResult | Pong | Error

_T_HELLO: Final = 0
_T_CHALLENGE: Final = 1
_T_AUTH: Final = 2
_T_WELCOME: Final = 3
_T_SEND: Final = 4
_T_RECV: Final = 5
_T_LOOKUP: Final = 6
_T_NOT_HERE: Final = 7
_T_PING: Final = 8
_T_LOOKUP_RESULT: Final = 9
_T_PONG: Final = 10
_T_ERROR: Final = 11


# --- auth -------------------------------------------------------------------------


def auth_input(
    nonce: bytes, node_id: NodeId, relay_node_id: NodeId, flags: int | None = None
) -> bytes:
    """The bytes AUTH's signature covers (see the module docstring): v1 without flags."""
    if len(nonce) != NONCE_SIZE:
        raise BadFrame(f"a relay challenge nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
    if flags is None:
        return AUTH_CONTEXT + nonce + node_id.raw + relay_node_id.raw
    if not 0 <= flags <= _U32:
        raise BadFrame(f"relay flags must fit 32 bits, got {flags}")
    return AUTH_CONTEXT_FLAGS + nonce + node_id.raw + relay_node_id.raw + flags.to_bytes(4, "big")


# --- NodeId cache -------------------------------------------------------------------


class NodeIdCache:
    """Validated NodeIds by raw bytes, LRU-bounded: one point check per peer, not per frame."""

    __slots__ = ("_entries", "capacity")

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, NodeId] = OrderedDict()

    def get(self, raw: bytes) -> NodeId:
        """The NodeId for ``raw``; raises :class:`BadFrame` if it is not one."""
        entry = self._entries.get(raw)
        if entry is not None:
            self._entries.move_to_end(raw)
            return entry
        node_id = NodeId(raw)  # BadNodeId is a BadFrame
        self._entries[raw] = node_id
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return node_id

    def __len__(self) -> int:
        return len(self._entries)


# --- encoding -----------------------------------------------------------------------


def _encode_address(address: Address | None) -> list[object] | None:
    return None if address is None else [address[0], address[1]]


def _body(message: NodeToRelay | RelayToNode) -> list[object]:
    if isinstance(message, Send):
        return [_T_SEND, message.dst.raw, message.payload]
    if isinstance(message, Recv):
        return [_T_RECV, message.src.raw, message.payload]
    if isinstance(message, Hello):
        return [_T_HELLO, message.version]
    if isinstance(message, Auth):
        body: list[object] = [
            _T_AUTH,
            message.node_id.raw,
            message.signature,
            message.access_token,
            [_encode_address(a) for a in message.published],
        ]
        if message.flags is not None:
            body.append(message.flags)
        return body
    if isinstance(message, Lookup):
        return [_T_LOOKUP, message.request_id, message.node_id.raw]
    if isinstance(message, Ping):
        return [_T_PING, message.nonce]
    if isinstance(message, Challenge):
        return [_T_CHALLENGE, message.nonce, _encode_address(message.observed)]
    if isinstance(message, Welcome):
        body = [_T_WELCOME, _encode_address(message.observed), message.max_payload]
        if message.flags is not None:
            body.append(message.flags)
        return body
    if isinstance(message, NotHere):
        return [_T_NOT_HERE, message.dst.raw]
    if isinstance(message, LookupResult):
        return [
            _T_LOOKUP_RESULT,
            message.request_id,
            message.node_id.raw,
            message.connected,
            _encode_address(message.observed),
            [_encode_address(a) for a in message.published],
        ]
    if isinstance(message, Pong):
        return [_T_PONG, message.nonce]
    return [_T_ERROR, int(message.code), message.message[:MAX_ERROR_MESSAGE]]


def encode_message(message: NodeToRelay | RelayToNode) -> bytes:
    """The msgpack body of ``message`` (no length header)."""
    return pack(_body(message))


def encode_frame(message: NodeToRelay | RelayToNode) -> bytes:
    """``u32 length || body``: what goes on the relay stream."""
    return framing.frame(encode_message(message))


def max_frame_for(max_payload: int) -> int:
    """The largest frame body a stream with payloads up to ``max_payload`` carries."""
    return max_payload + FRAME_OVERHEAD


# --- decoding -----------------------------------------------------------------------


def _node_id(value: object, field: str, cache: NodeIdCache | None) -> NodeId:
    raw = as_bytes(value, field, size=NODE_ID_SIZE)
    try:
        return cache.get(raw) if cache is not None else NodeId(raw)
    except BadFrame as exc:
        raise BadFrame(f"{field}: {exc}") from exc


def _address(value: object, field: str) -> Address:
    items = as_list(value, field, length=2)
    host = as_str(items[0], f"{field} host", max_size=_MAX_HOST_TEXT)
    port = as_int(items[1], f"{field} port", lo=1, hi=65535)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadFrame(f"{field} host: {host!r} is not a numeric IP address") from None
    return (str(ip), port)


def _optional_address(value: object, field: str) -> Address | None:
    return None if value is None else _address(value, field)


def _addresses(value: object, field: str) -> tuple[Address, ...]:
    items = as_list(value, field)
    if len(items) > MAX_PUBLISHED_ADDRESSES:
        raise BadFrame(f"{field}: {len(items)} addresses exceeds {MAX_PUBLISHED_ADDRESSES}")
    return tuple(_address(item, f"{field}[{i}]") for i, item in enumerate(items))


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadFrame(f"{field}: expected a boolean, got {type(value).__name__}")
    return value


def _fields(body: bytes, max_frame: int) -> tuple[int, list[object]]:
    items = as_list(unpack_untrusted(body, max_size=max_frame), "relay message")
    if not items:
        raise BadFrame("relay message: empty array")
    return as_int(items[0], "relay message type", hi=255), items


def _arity(items: list[object], name: str, count: int, optional: int = 0) -> None:
    if not count <= len(items) <= count + optional:
        expected = f"{count}" if not optional else f"{count} to {count + optional}"
        raise BadFrame(f"{name}: expected {expected} fields, got {len(items)}")


def _optional_flags(items: list[object], index: int, field: str) -> int | None:
    return as_int(items[index], field, hi=_U32) if len(items) > index else None


def decode_node_to_relay_untrusted(
    body: bytes,
    *,
    max_frame: int = max_frame_for(DEFAULT_MAX_PAYLOAD),
    node_ids: NodeIdCache | None = None,
) -> NodeToRelay:
    """Decode a frame body a node sent; raises only :class:`BadFrame`.

    SEND payloads are bounded only by ``max_frame`` here; the relay applies
    its payload limit itself (an oversize payload is a notice, not a
    protocol error).
    """
    kind, items = _fields(body, max_frame)
    if kind == _T_SEND:
        _arity(items, "SEND", 3)
        return Send(_node_id(items[1], "SEND dst", node_ids), as_bytes(items[2], "SEND payload"))
    if kind == _T_HELLO:
        _arity(items, "HELLO", 2)
        return Hello(as_int(items[1], "HELLO version", hi=0xFFFF))
    if kind == _T_AUTH:
        _arity(items, "AUTH", 5, optional=1)
        token = items[3]
        return Auth(
            node_id=_node_id(items[1], "AUTH node_id", node_ids),
            signature=as_bytes(items[2], "AUTH signature", size=SIGNATURE_SIZE),
            access_token=None
            if token is None
            else as_bytes(token, "AUTH token", max_size=MAX_ACCESS_TOKEN),
            published=_addresses(items[4], "AUTH addresses"),
            flags=_optional_flags(items, 5, "AUTH flags"),
        )
    if kind == _T_LOOKUP:
        _arity(items, "LOOKUP", 3)
        return Lookup(
            as_int(items[1], "LOOKUP request_id", hi=_U32),
            _node_id(items[2], "LOOKUP node_id", node_ids),
        )
    if kind == _T_PING:
        _arity(items, "PING", 2)
        return Ping(as_int(items[1], "PING nonce", hi=_U64))
    raise BadFrame(f"relay message type {kind} is not one a node sends")


def decode_relay_to_node_untrusted(
    body: bytes,
    *,
    max_frame: int = max_frame_for(DEFAULT_MAX_PAYLOAD),
    node_ids: NodeIdCache | None = None,
) -> RelayToNode:
    """Decode a frame body the relay sent; raises only :class:`BadFrame`."""
    kind, items = _fields(body, max_frame)
    if kind == _T_RECV:
        _arity(items, "RECV", 3)
        return Recv(_node_id(items[1], "RECV src", node_ids), as_bytes(items[2], "RECV payload"))
    if kind == _T_CHALLENGE:
        _arity(items, "CHALLENGE", 3)
        return Challenge(
            as_bytes(items[1], "CHALLENGE nonce", size=NONCE_SIZE),
            _optional_address(items[2], "CHALLENGE observed"),
        )
    if kind == _T_WELCOME:
        _arity(items, "WELCOME", 3, optional=1)
        return Welcome(
            _optional_address(items[1], "WELCOME observed"),
            as_int(items[2], "WELCOME max_payload", lo=1, hi=_U32),
            _optional_flags(items, 3, "WELCOME flags"),
        )
    if kind == _T_NOT_HERE:
        _arity(items, "NOT_HERE", 2)
        return NotHere(_node_id(items[1], "NOT_HERE dst", node_ids))
    if kind == _T_LOOKUP_RESULT:
        _arity(items, "LOOKUP_RESULT", 6)
        return LookupResult(
            request_id=as_int(items[1], "LOOKUP_RESULT request_id", hi=_U32),
            node_id=_node_id(items[2], "LOOKUP_RESULT node_id", node_ids),
            connected=_bool(items[3], "LOOKUP_RESULT connected"),
            observed=_optional_address(items[4], "LOOKUP_RESULT observed"),
            published=_addresses(items[5], "LOOKUP_RESULT addresses"),
        )
    if kind == _T_PONG:
        _arity(items, "PONG", 2)
        return Pong(as_int(items[1], "PONG nonce", hi=_U64))
    if kind == _T_ERROR:
        _arity(items, "ERROR", 3)
        return Error(
            as_int(items[1], "ERROR code", hi=_U32),
            as_str(items[2], "ERROR message", max_size=MAX_ERROR_MESSAGE),
        )
    raise BadFrame(f"relay message type {kind} is not one a relay sends")


# --- UDP fast path datagrams -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DatagramToRelay:
    """A fast-path datagram a node sent: relay ``payload`` to ``dst``."""

    dst: NodeId
    payload: bytes


@dataclass(frozen=True, slots=True)
class DatagramFromRelay:
    """A fast-path datagram the relay sent: ``payload`` from ``src`` (proven by its AUTH)."""

    src: NodeId
    payload: bytes


def is_relay_datagram(data: bytes) -> bool:
    """True if ``data`` starts like a fast-path datagram (either direction)."""
    return data[:5] == DATAGRAM_PREFIX


def encode_datagram_to_relay(dst: NodeId, payload: bytes) -> bytes:
    """``DATAGRAM_TO_RELAY | dst | payload``: one UDP datagram to the relay."""
    return DATAGRAM_TO_RELAY + dst.raw + payload


def datagram_from_relay_header(src: NodeId) -> bytes:
    """What precedes every payload from ``src``: a relay keeps it per node and appends."""
    return DATAGRAM_FROM_RELAY + src.raw


def encode_datagram_from_relay(src: NodeId, payload: bytes) -> bytes:
    """``DATAGRAM_FROM_RELAY | src | payload``: one UDP datagram to a node."""
    return DATAGRAM_FROM_RELAY + src.raw + payload


def _datagram_fields(
    data: bytes, header: bytes, name: str, node_ids: NodeIdCache | None
) -> tuple[NodeId, bytes]:
    if len(data) <= DATAGRAM_OVERHEAD:
        raise BadFrame(f"{name}: {len(data)} bytes is too short for a header and a payload")
    if data[:DATAGRAM_HEADER_SIZE] != header:
        raise BadFrame(f"{name}: not a {name} header")
    node_id = _node_id(data[DATAGRAM_HEADER_SIZE:DATAGRAM_OVERHEAD], f"{name} node id", node_ids)
    return node_id, data[DATAGRAM_OVERHEAD:]


def decode_datagram_to_relay_untrusted(
    data: bytes, node_ids: NodeIdCache | None = None
) -> DatagramToRelay:
    """Decode a fast-path datagram a node sent; raises only :class:`BadFrame`.

    Says nothing about who sent it: the relay checks the source address.
    """
    dst, payload = _datagram_fields(data, DATAGRAM_TO_RELAY, "DATAGRAM_TO_RELAY", node_ids)
    return DatagramToRelay(dst, payload)


def decode_datagram_from_relay_untrusted(
    data: bytes, node_ids: NodeIdCache | None = None
) -> DatagramFromRelay:
    """Decode a fast-path datagram the relay sent; raises only :class:`BadFrame`.

    Says nothing about who sent it: the node checks the source address.
    """
    src, payload = _datagram_fields(data, DATAGRAM_FROM_RELAY, "DATAGRAM_FROM_RELAY", node_ids)
    return DatagramFromRelay(src, payload)


# --- stream framing -------------------------------------------------------------------


class FrameDecoder(framing.FrameDecoder):
    """The shared framing (:mod:`p2psync.proto.framing`), bounded by default for
    relay frames carrying payloads up to DEFAULT_MAX_PAYLOAD."""

    __slots__ = ()

    def __init__(self, max_frame: int = max_frame_for(DEFAULT_MAX_PAYLOAD)) -> None:
        super().__init__(max_frame)


__all__ = [
    "DATAGRAM_FROM_RELAY",
    "DATAGRAM_OVERHEAD",
    "DATAGRAM_PREFIX",
    "DATAGRAM_TO_RELAY",
    "DEFAULT_MAX_PAYLOAD",
    "FLAG_UDP_DATAGRAMS",
    "FRAME_OVERHEAD",
    "MAX_PUBLISHED_ADDRESSES",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "RELAY_ALPN",
    "Address",
    "Auth",
    "Challenge",
    "DatagramFromRelay",
    "DatagramToRelay",
    "Error",
    "FrameDecoder",
    "FrameTooLarge",
    "Hello",
    "Lookup",
    "LookupResult",
    "NodeIdCache",
    "NodeToRelay",
    "NotHere",
    "Ping",
    "Pong",
    "Recv",
    "RelayErrorCode",
    "RelayToNode",
    "Send",
    "Welcome",
    "auth_input",
    "datagram_from_relay_header",
    "decode_datagram_from_relay_untrusted",
    "decode_datagram_to_relay_untrusted",
    "decode_node_to_relay_untrusted",
    "decode_relay_to_node_untrusted",
    "encode_datagram_from_relay",
    "encode_datagram_to_relay",
    "encode_frame",
    "encode_message",
    "is_relay_datagram",
    "max_frame_for",
]
