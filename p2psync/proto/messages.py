"""Messages of the node <-> node sync protocol, and their framing.

Theory
------
Two nodes of a group talk over one QUIC connection (ALPN ``p2psync/1``).
The dialer opens one bidirectional **control stream** first; it carries the
handshake and everything about entries. Objects (sealed chunks and
manifests) move on **object streams** of their own, one per object, so a
1 MiB chunk never blocks a gossip message and several objects flow in
parallel.

Every message is a msgpack array ``[type, field, ...]`` (never a map), sent
as one **frame**: ``u32 big-endian length || body``. A frame whose length
header exceeds the stream's limit is refused as soon as the header is seen,
before any of the body is buffered (:class:`FrameDecoder`). Each message has
its own limits on counts and sizes, checked when decoding, so no peer can
make us hold more than one frame of its data per stream.

:func:`decode_message_untrusted` raises only :class:`~p2psync.errors.BadFrame`.
Raw entries inside ENTRIES/ANNOUNCE are *not* decoded here: the store
decodes and verifies each one (signature, chain) when it inserts them.

Control stream (``D`` = dialer, ``A`` = acceptor)::

    D -> A  HELLO     [1, version u16, sender bin32, receiver bin32, challenge bin32]
    A -> D  HELLO     [1, version, sender, receiver, challenge]
    A -> D  AUTH      [2, signature bin64, epoch u32, mac bin32]
    D -> A  AUTH      [2, signature, epoch, mac]
    both    FRONTIER  [3, [[author bin32, seq uint], ...], final bool]
    both    ENTRIES   [4, [raw entry bin, ...]]   what the other lacks, per author in order
    both    ANNOUNCE  [5, [raw entry bin, ...]]   gossip push of entries new to the sender
    both    BYE       [6, code uint, reason str]  then the sender closes

The acceptor answers the dialer's HELLO with its own HELLO and AUTH at once
(it then knows both challenges); the dialer sends AUTH after checking the
acceptor's HELLO. ``sender`` is the NodeId of whoever sends the HELLO and
``receiver`` the NodeId it believes it is talking to: the dialer's
``receiver`` is the NodeId it dialed, the acceptor's is the ``sender`` of the
dialer's HELLO. A FRONTIER may be split into parts; only the part with
``final = true`` completes it (and an author absent from a complete frontier
has seq 0).

AUTH proves two things over the **transcript** of the handshake::

    transcript = b"p2psync sync handshake v1\\0" || u8 len(alpn) || alpn || u16be version
                 || dialer NodeId || acceptor NodeId
                 || dialer challenge || acceptor challenge
    auth input = u8 role (1 dialer, 2 acceptor) || transcript
    signature  = Ed25519 by the sender's identity over the auth input
    mac        = membership MAC (keyed BLAKE3, group membership key of ``epoch``)
                 over the auth input

The role byte makes each side's proof its own: without it, a node outside
the group could echo the other side's MAC back (both would cover the same
bytes). Fresh challenges from both sides make an AUTH worthless outside its
own connection.

Object streams, opened by the side that wants the object::

    -> WANT       [7, object id bin32]
    <- OBJECT     [8, object id bin32, sealed bytes bin]   (<= SYNC_MAX_OBJECT_FRAME)
    <- NOT_FOUND  [9, object id bin32]

then both sides finish the stream. The receiver checks the object against
its id (BLAKE3 of the sealed bytes) before it stores it.

Error codes (:class:`ErrorCode`) travel in BYE and in the QUIC
CONNECTION_CLOSE application error code.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from p2psync import defaults
from p2psync.crypto.identity import NODE_ID_SIZE, SIGNATURE_SIZE, BadNodeId, NodeId
from p2psync.errors import BadFrame, LocalProtocolError
from p2psync.proto import framing
from p2psync.proto.codec import as_bytes, as_int, as_list, as_str, pack, unpack_untrusted

PROTOCOL_VERSION: Final = 1
SYNC_ALPN: Final = "p2psync/1"
CHALLENGE_SIZE: Final = 32
MAC_SIZE: Final = 32
OBJECT_ID_SIZE: Final = 32
MAX_EPOCH: Final = 0xFFFFFFFF
MAX_VERSION: Final = 0xFFFF
MAX_ERROR_CODE: Final = 0xFFFF

FRAME_HEADER_SIZE: Final = framing.FRAME_HEADER_SIZE
_TRANSCRIPT_LABEL: Final = b"p2psync sync handshake v1\x00"


class MessageType(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    FRONTIER = 3
    ENTRIES = 4
    ANNOUNCE = 5
    BYE = 6
    WANT = 7
    OBJECT = 8
    NOT_FOUND = 9


class ErrorCode(enum.IntEnum):
    """Why a session ended; sent in BYE and as the QUIC application error code."""

    OK = 0  # normal close
    PROTOCOL_ERROR = 1  # malformed message, or a message not allowed now
    BAD_AUTH = 2  # AUTH signature does not verify for the claimed NodeId
    WRONG_GROUP = 3  # membership MAC does not verify: not in our group/epoch
    WRONG_NODE = 4  # the peer is not the node we meant to reach (or thinks we are another)
    TOO_LARGE = 5  # a frame or message exceeded its limit
    REPLAY = 6  # a challenge seen before (replayed or reflected handshake)
    INTERNAL = 7  # our own failure; not the peer's fault
    BAD_OBJECT = 8  # the peer sent an object that does not match its id or blob
    DUPLICATE_CONNECTION = 9  # another connection to the same peer wins
    UNSUPPORTED_VERSION = 10  # no common protocol version
    TIMEOUT = 11  # the handshake did not finish in time


class Role(enum.IntEnum):
    DIALER = 1
    ACCEPTOR = 2


# --- messages -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    sender: NodeId
    receiver: NodeId
    challenge: bytes


@dataclass(frozen=True, slots=True)
class Auth:
    signature: bytes
    epoch: int
    mac: bytes

    def __repr__(self) -> str:  # proofs are not secrets, but they are noise in logs
        return f"Auth(epoch={self.epoch})"


@dataclass(frozen=True, slots=True)
class Frontier:
    seqs: tuple[tuple[NodeId, int], ...]
    final: bool = True


@dataclass(frozen=True, slots=True)
class Entries:
    raws: tuple[bytes, ...]

    def __repr__(self) -> str:
        return f"Entries({len(self.raws)})"


@dataclass(frozen=True, slots=True)
class Announce:
    raws: tuple[bytes, ...]

    def __repr__(self) -> str:
        return f"Announce({len(self.raws)})"


@dataclass(frozen=True, slots=True)
class Bye:
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Want:
    oid: bytes


@dataclass(frozen=True, slots=True)
class ObjectData:
    oid: bytes
    sealed: bytes

    def __repr__(self) -> str:
        return f"ObjectData({self.oid.hex()[:16]}, {len(self.sealed)} bytes)"


@dataclass(frozen=True, slots=True)
class ObjectNotFound:
    oid: bytes


Message = Hello | Auth | Frontier | Entries | Announce | Bye | Want | ObjectData | ObjectNotFound
ControlMessage = Hello | Auth | Frontier | Entries | Announce | Bye
ObjectStreamMessage = Want | ObjectData | ObjectNotFound


# --- encoding -------------------------------------------------------------------


def encode_message(message: Message) -> bytes:
    """The msgpack body of ``message`` (no length prefix)."""
    fields: list[object]
    match message:
        case Hello(version, sender, receiver, challenge):
            fields = [MessageType.HELLO, version, sender.raw, receiver.raw, challenge]
        case Auth(signature, epoch, mac):
            fields = [MessageType.AUTH, signature, epoch, mac]
        case Frontier(seqs, final):
            fields = [MessageType.FRONTIER, [[a.raw, s] for a, s in seqs], final]
        case Entries(raws):
            fields = [MessageType.ENTRIES, list(raws)]
        case Announce(raws):
            fields = [MessageType.ANNOUNCE, list(raws)]
        case Bye(code, reason):
            fields = [MessageType.BYE, code, reason[: defaults.SYNC_MAX_BYE_REASON]]
        case Want(oid):
            fields = [MessageType.WANT, oid]
        case ObjectData(oid, sealed):
            fields = [MessageType.OBJECT, oid, sealed]
        case ObjectNotFound(oid):
            fields = [MessageType.NOT_FOUND, oid]
    return pack(fields)  # IntEnum packs as a plain int (strict_types=False)


def encode_frame(body: bytes, *, max_frame: int = defaults.SYNC_MAX_CONTROL_FRAME) -> bytes:
    """``u32be len || body``; refuses bodies the peer would refuse."""
    if len(body) > max_frame:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds the limit of {max_frame}")
    return framing.frame(body)


def encode_message_frame(
    message: Message, *, max_frame: int = defaults.SYNC_MAX_CONTROL_FRAME
) -> bytes:
    return encode_frame(encode_message(message), max_frame=max_frame)


# --- decoding -------------------------------------------------------------------


def _node_id(value: object, field: str) -> NodeId:
    try:
        return NodeId(as_bytes(value, field, size=NODE_ID_SIZE))
    except BadNodeId as exc:
        raise BadFrame(f"{field}: {exc}") from exc


def _raws(value: object, field: str) -> tuple[bytes, ...]:
    items = as_list(value, field)
    if len(items) > defaults.SYNC_MAX_ENTRIES_PER_MESSAGE:
        raise BadFrame(
            f"{field}: {len(items)} entries exceeds {defaults.SYNC_MAX_ENTRIES_PER_MESSAGE}"
        )
    raws = tuple(
        as_bytes(item, f"{field}[{i}]", max_size=defaults.MAX_ENTRY_SIZE)
        for i, item in enumerate(items)
    )
    if sum(len(r) for r in raws) > defaults.SYNC_MAX_ENTRIES_BYTES:
        raise BadFrame(f"{field}: more than {defaults.SYNC_MAX_ENTRIES_BYTES} bytes of entries")
    return raws


def _decode_hello(items: list[object]) -> Hello:
    _arity(items, 5, "HELLO")
    return Hello(
        version=as_int(items[1], "hello.version", hi=MAX_VERSION),
        sender=_node_id(items[2], "hello.sender"),
        receiver=_node_id(items[3], "hello.receiver"),
        challenge=as_bytes(items[4], "hello.challenge", size=CHALLENGE_SIZE),
    )


def _decode_auth(items: list[object]) -> Auth:
    _arity(items, 4, "AUTH")
    return Auth(
        signature=as_bytes(items[1], "auth.signature", size=SIGNATURE_SIZE),
        epoch=as_int(items[2], "auth.epoch", lo=1, hi=MAX_EPOCH),
        mac=as_bytes(items[3], "auth.mac", size=MAC_SIZE),
    )


def _decode_frontier(items: list[object]) -> Frontier:
    _arity(items, 3, "FRONTIER")
    pairs = as_list(items[1], "frontier.seqs")
    if len(pairs) > defaults.SYNC_FRONTIER_AUTHORS_PER_MESSAGE:
        raise BadFrame(
            f"frontier: {len(pairs)} authors exceeds "
            f"{defaults.SYNC_FRONTIER_AUTHORS_PER_MESSAGE} per message"
        )
    seqs: list[tuple[NodeId, int]] = []
    seen: set[bytes] = set()
    for i, pair in enumerate(pairs):
        author_raw, seq = as_list(pair, f"frontier.seqs[{i}]", length=2)
        author = _node_id(author_raw, f"frontier.seqs[{i}].author")
        if author.raw in seen:
            raise BadFrame(f"frontier.seqs[{i}]: author listed twice")
        seen.add(author.raw)
        seqs.append((author, as_int(seq, f"frontier.seqs[{i}].seq", hi=2**63 - 1)))
    final = items[2]
    if not isinstance(final, bool):
        raise BadFrame(f"frontier.final: expected a boolean, got {type(final).__name__}")
    return Frontier(tuple(seqs), final)


def _decode_entries(items: list[object]) -> Entries:
    _arity(items, 2, "ENTRIES")
    return Entries(_raws(items[1], "entries"))


def _decode_announce(items: list[object]) -> Announce:
    _arity(items, 2, "ANNOUNCE")
    return Announce(_raws(items[1], "announce"))


def _decode_bye(items: list[object]) -> Bye:
    _arity(items, 3, "BYE")
    return Bye(
        code=as_int(items[1], "bye.code", hi=MAX_ERROR_CODE),
        reason=as_str(items[2], "bye.reason", max_size=defaults.SYNC_MAX_BYE_REASON),
    )


def _decode_want(items: list[object]) -> Want:
    _arity(items, 2, "WANT")
    return Want(as_bytes(items[1], "want.oid", size=OBJECT_ID_SIZE))


def _decode_object(items: list[object]) -> ObjectData:
    _arity(items, 3, "OBJECT")
    return ObjectData(
        oid=as_bytes(items[1], "object.oid", size=OBJECT_ID_SIZE),
        sealed=as_bytes(items[2], "object.sealed", max_size=defaults.SYNC_MAX_OBJECT_FRAME),
    )


def _decode_not_found(items: list[object]) -> ObjectNotFound:
    _arity(items, 2, "NOT_FOUND")
    return ObjectNotFound(as_bytes(items[1], "not_found.oid", size=OBJECT_ID_SIZE))


def _arity(items: list[object], expected: int, name: str) -> None:
    if len(items) != expected:
        raise BadFrame(f"{name}: expected {expected} fields, got {len(items)}")


_DECODERS: Final[dict[MessageType, Callable[[list[object]], Message]]] = {
    MessageType.HELLO: _decode_hello,
    MessageType.AUTH: _decode_auth,
    MessageType.FRONTIER: _decode_frontier,
    MessageType.ENTRIES: _decode_entries,
    MessageType.ANNOUNCE: _decode_announce,
    MessageType.BYE: _decode_bye,
    MessageType.WANT: _decode_want,
    MessageType.OBJECT: _decode_object,
    MessageType.NOT_FOUND: _decode_not_found,
}


def decode_message_untrusted(
    body: bytes | memoryview, *, max_size: int = defaults.SYNC_MAX_CONTROL_FRAME
) -> Message:
    """Decode one frame body from a peer; raise only :class:`BadFrame`."""
    items = as_list(unpack_untrusted(body, max_size=max_size), "message")
    if not items:
        raise BadFrame("message: empty array")
    type_value = as_int(items[0], "message.type", hi=255)
    try:
        message_type = MessageType(type_value)
    except ValueError:
        raise BadFrame(f"message.type: unknown type {type_value}") from None
    return _DECODERS[message_type](items)


# --- framing ----------------------------------------------------------------------


class FrameDecoder(framing.FrameDecoder):
    """The shared framing (:mod:`p2psync.proto.framing`), bounded by default as the
    control stream is; object streams and the join handshake pass their own limit."""

    __slots__ = ()

    def __init__(self, max_frame: int = defaults.SYNC_MAX_CONTROL_FRAME) -> None:
        super().__init__(max_frame)


# --- handshake transcript ---------------------------------------------------------


def handshake_transcript(
    *,
    dialer: NodeId,
    acceptor: NodeId,
    dialer_challenge: bytes,
    acceptor_challenge: bytes,
    version: int = PROTOCOL_VERSION,
    alpn: str = SYNC_ALPN,
) -> bytes:
    """The bytes both sides prove over (see the module docstring)."""
    alpn_bytes = alpn.encode("ascii")
    return b"".join(
        (
            _TRANSCRIPT_LABEL,
            bytes([len(alpn_bytes)]),
            alpn_bytes,
            struct.pack(">H", version),
            dialer.raw,
            acceptor.raw,
            dialer_challenge,
            acceptor_challenge,
        )
    )


def auth_input(role: Role, transcript: bytes) -> bytes:
    """What the side playing ``role`` signs and MACs."""
    return bytes([int(role)]) + transcript
