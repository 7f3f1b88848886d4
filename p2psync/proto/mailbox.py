"""relayd's group mailbox: store-and-forward of ciphertext for devices never online together.

Theory
------
A phone and a laptop of one group may never be awake at the same time. The
**mailbox** lets relayd hold what one device wrote until the other comes
for it: signed entries (:mod:`p2psync.proto.entry`) and the sealed objects
(chunks, manifests: :mod:`p2psync.store.objects`) they reference. relayd
stores ciphertext only, for a bounded time and size, and hands it out in
the order it accepted it.

**Which mailbox.** Each group has one Ed25519 *mailbox key pair* derived
from its secret (:func:`p2psync.crypto.group.mailbox_key`); its public key
is the **mailbox id**. A member proves it belongs by signing relayd's fresh
challenge, bound to both NodeIds and to the group id it claims::

    proof = Ed25519-sign(mailbox key, b"p2psync mailbox join v2\\0" ||
                         relay NodeId || node NodeId || nonce || mailbox id || group id)

relayd verifies it with the public key alone: it learns the group's public
routing id, never a secret, and cannot forge a proof for another relay or
node (both ids are signed) or replay an old one (fresh 32-byte nonce per
stream). The membership MAC of the sync handshake cannot serve here: a MAC
can only be checked by someone holding its key.

**The group id is part of the mailbox's name.** relayd files items under
the *address* ``BLAKE3-derive("p2psync 2026 mailbox address v1", mailbox id
|| group id)`` (:func:`mailbox_address`) and accepts there only entries of
that group id. relayd cannot check that a group id belongs to a mailbox key
(both derive from the secret it never sees), and it need not: a holder of
the secret who claims another group id gets *another* mailbox, and the
members' own is untouched. (Pinning the group id of a mailbox on first use
let any such holder lock every member out by pushing first.)

**What relayd checks before it stores anything** (a relay must never store
garbage it will later serve): an entry decodes canonically and carries its
author's valid signature; a sealed object hashes to its name (BLAKE3 of
the ciphertext, and the pusher names the hash it expects, so damage in
transit is caught), has a well-formed header, and fits the entry whose blob it
belongs to (a one-chunk blob's size, at most as many chunks as the blob's
size needs). Both checks need no key.

**Cursors.** relayd numbers a mailbox's items 1, 2, 3, ... in the order it
commits them (no gaps, no reuse, never from clocks). A node pulls
``after`` the last cursor it has and remembers it; the mailbox's random
``log_id`` (in JOINED) changes only if relayd lost or dropped the whole
mailbox, and tells the node to start over from 0. Re-pushing an item
relayd holds returns its existing cursor (idempotent).

Wire format (frames of :mod:`p2psync.proto.framing` on a service stream
named ``"mailbox"`` version 2, see :mod:`p2psync.proto.services`; bodies are
canonical msgpack arrays; ``->`` node to relay, ``<-`` relay to node)::

    <- CHALLENGE  [0, nonce bin32]                      first, right after ACCEPT
    -> JOIN       [1, mailbox bin32, group_id bin32, proof bin64, notify bool]
    <- JOINED     [2, log_id bin16, head u64, used u64, quota u64, ttl_s u64, max_item u32]
    -> PUSH_ENTRY [3, entry bin]                        a signed entry, as encoded
    -> PUSH_CHUNK [4, blob bin32, object_id bin32, object bin]   a sealed object of that blob
    <- PUSHED     [5, cursor u64, new bool, used u64]
    -> PULL       [6, after u64, limit u16]
    <- ITEMS      [7, [item, ...], has_more bool, head u64]
                  item = [cursor, 1, entry bin]
                       | [cursor, 2, object_id bin32, size u32, blob bin32]
    -> FETCH      [8, object_id bin32]
    <- OBJECT     [9, object_id bin32, object bin]
    -> ACK        [10, cursor u64]                      "I hold everything up to here"
    <- ACKED      [11, cursor u64]
    <- NOTIFY     [12, head u64]                        unsolicited: new items arrived
    <- ERROR      [13, code u16, message str]

The node sends JOIN once, then any number of requests; relayd answers each
request in order (so a node may pipeline) with exactly one reply (the
listed one, or ERROR). NOTIFY may come between replies on a stream that
asked for it (``notify`` in JOIN), never for the node's own pushes. An
ERROR whose code is fatal (:attr:`MailboxErrorCode.fatal`) ends the stream;
any other refuses that one request only. Every frame is at most
:data:`MAX_FRAME` bytes; an ITEMS reply at most :data:`MAX_PULL_BYTES` of
items.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

import blake3

from p2psync import defaults
from p2psync.crypto.identity import BadNodeId, Identity, NodeId
from p2psync.errors import BadFrame
from p2psync.proto.codec import as_bytes, as_int, as_list, as_str, pack, unpack_untrusted
from p2psync.store.objects import MAX_SEALED_SIZE

SERVICE: Final = "mailbox"
VERSION: Final = 2  # 2: JOIN names (and its proof signs) the group id

NONCE_SIZE: Final = 32
MAILBOX_ID_SIZE: Final = 32
GROUP_ID_SIZE: Final = 32
PROOF_SIZE: Final = 64
LOG_ID_SIZE: Final = 16
HASH_SIZE: Final = 32

# The largest item: any sealed object (a full manifest of MAX_BLOB_CHUNKS
# is the biggest, ~2.9 MiB); entries are far smaller (MAX_ENTRY_SIZE).
MAX_ITEM_SIZE: Final = MAX_SEALED_SIZE
# One ITEMS reply carries at most this many bytes of items (entries inline,
# objects as 50-byte headers): a pull is a few round trips, not one huge frame.
MAX_PULL_BYTES: Final = 1024 * 1024
# At most this many items per PULL (object headers are small, so the byte
# cap alone would allow ~20k).
MAX_PULL_LIMIT: Final = 1024
# Array framing of the largest message around its payload.
_FRAME_SLACK: Final = 256
MAX_FRAME: Final = max(MAX_ITEM_SIZE, MAX_PULL_BYTES) + _FRAME_SLACK
MAX_ERROR_MESSAGE: Final = 200
# An item header in ITEMS: cursor, kind, id, size, blob, array framing.
ITEM_HEADER_BYTES: Final = 96

_JOIN_CONTEXT: Final = b"p2psync mailbox join v2\x00"
_ADDRESS_CONTEXT: Final = "p2psync 2026 mailbox address v1"

_CHALLENGE: Final = 0
_JOIN: Final = 1
_JOINED: Final = 2
_PUSH_ENTRY: Final = 3
_PUSH_CHUNK: Final = 4
_PUSHED: Final = 5
_PULL: Final = 6
_ITEMS: Final = 7
_FETCH: Final = 8
_OBJECT: Final = 9
_ACK: Final = 10
_ACKED: Final = 11
_NOTIFY: Final = 12
_ERROR: Final = 13

ITEM_ENTRY: Final = 1
ITEM_OBJECT: Final = 2

_U64: Final = 2**64 - 1
_U32: Final = 2**32 - 1


class MailboxErrorCode(enum.IntEnum):
    """Why relayd refused a request (ERROR's code)."""

    BAD_PROOF = 1
    """JOIN's proof does not verify: not a member (fatal)."""
    TOO_MANY_DEVICES = 2
    """The mailbox already serves its maximum number of devices (fatal)."""
    PROTOCOL = 3
    """A malformed frame or a request before JOIN (fatal)."""
    TOO_LARGE = 4
    """The item exceeds the relay's maximum item size."""
    QUOTA_EXCEEDED = 5
    """The group's storage quota is used up: try again after items expire."""
    STORAGE_FULL = 6
    """The relay as a whole is out of storage."""
    BAD_ENTRY = 7
    """The entry is malformed, badly signed, of another group, or forks a feed."""
    BAD_OBJECT = 8
    """The object is malformed or does not fit its blob."""
    UNKNOWN_BLOB = 9
    """No entry in the mailbox names that blob: push the entry first."""
    NOT_FOUND = 10
    """FETCH: the mailbox holds no such object (never pushed, or expired)."""
    UNAVAILABLE = 11
    """relayd cannot serve the mailbox now (storage error, shutting down) (fatal)."""
    TRY_AGAIN = 12
    """relayd could not serve this request just now (say, a file it could not read): it
    kept the item; ask again later."""

    @property
    def fatal(self) -> bool:
        return self in _FATAL

    @property
    def label(self) -> str:
        """The code's stable text form (``quota-exceeded``), for logs and metrics."""
        return self.name.lower().replace("_", "-")


_FATAL: Final = frozenset(
    {
        MailboxErrorCode.BAD_PROOF,
        MailboxErrorCode.TOO_MANY_DEVICES,
        MailboxErrorCode.PROTOCOL,
        MailboxErrorCode.UNAVAILABLE,
    }
)


# --- messages ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge:
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Join:
    mailbox: bytes
    group_id: bytes
    proof: bytes
    notify: bool


@dataclass(frozen=True, slots=True)
class Joined:
    log_id: bytes
    head: int
    used: int
    quota: int
    ttl_s: int
    max_item: int


@dataclass(frozen=True, slots=True)
class PushEntry:
    raw: bytes


@dataclass(frozen=True, slots=True)
class PushChunk:
    blob: bytes
    object_id: bytes  # relayd refuses the object unless BLAKE3(data) is this
    data: bytes


@dataclass(frozen=True, slots=True)
class Pushed:
    cursor: int
    new: bool
    used: int


@dataclass(frozen=True, slots=True)
class Pull:
    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class EntryItem:
    cursor: int
    raw: bytes


@dataclass(frozen=True, slots=True)
class ObjectItem:
    cursor: int
    object_id: bytes
    size: int
    blob: bytes


Item = EntryItem | ObjectItem


@dataclass(frozen=True, slots=True)
class Items:
    items: tuple[Item, ...]
    has_more: bool
    head: int


@dataclass(frozen=True, slots=True)
class Fetch:
    object_id: bytes


@dataclass(frozen=True, slots=True)
class ObjectData:
    object_id: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    cursor: int


@dataclass(frozen=True, slots=True)
class Acked:
    cursor: int


@dataclass(frozen=True, slots=True)
class Notify:
    head: int


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str

    @property
    def known_code(self) -> MailboxErrorCode | None:
        try:
            return MailboxErrorCode(self.code)
        except ValueError:
            return None

    @property
    def fatal(self) -> bool:
        known = self.known_code
        return known is None or known.fatal  # an unknown code: assume the worst

    @property
    def label(self) -> str:
        known = self.known_code
        return known.label if known is not None else f"code-{self.code}"


NodeToRelay = Join | PushEntry | PushChunk | Pull | Fetch | Ack
RelayToNode = Challenge | Joined | Pushed | Items | ObjectData | Acked | Notify | Error


# --- the membership proof ------------------------------------------------------------------


def join_transcript(
    relay: NodeId, node: NodeId, nonce: bytes, mailbox: bytes, group_id: bytes
) -> bytes:
    """What a JOIN proof signs: context, both NodeIds, the nonce, mailbox id, group id."""
    return _JOIN_CONTEXT + relay.raw + node.raw + nonce + mailbox + group_id


def sign_join(
    key: Identity, group_id: bytes, relay: NodeId, node: NodeId, nonce: bytes, *, notify: bool
) -> Join:
    """A JOIN for ``key``'s mailbox of group ``group_id``, proving membership to ``relay``."""
    mailbox = key.node_id.raw
    proof = key.sign(join_transcript(relay, node, nonce, mailbox, group_id))
    return Join(mailbox, group_id, proof, notify)


def verify_join(join: Join, relay: NodeId, node: NodeId, nonce: bytes) -> None:
    """Raise :class:`~p2psync.errors.IntegrityError` (or BadFrame) unless the proof holds."""
    try:
        mailbox_key = NodeId(join.mailbox)
    except BadNodeId as exc:
        raise BadFrame(f"mailbox id is not an Ed25519 public key: {exc}") from None
    transcript = join_transcript(relay, node, nonce, join.mailbox, join.group_id)
    mailbox_key.verify(transcript, join.proof)


def mailbox_address(mailbox: bytes, group_id: bytes) -> bytes:
    """Where relayd files a mailbox's items: its id and its group id, hashed together."""
    return blake3.blake3(mailbox + group_id, derive_key_context=_ADDRESS_CONTEXT).digest()


# --- encoding ------------------------------------------------------------------------------


def encode(message: NodeToRelay | RelayToNode) -> bytes:
    """The frame body of ``message`` (callers keep within the limits)."""
    match message:
        case Challenge(nonce):
            return pack([_CHALLENGE, nonce])
        case Join(mailbox, group_id, proof, notify):
            return pack([_JOIN, mailbox, group_id, proof, notify])
        case Joined(log_id, head, used, quota, ttl_s, max_item):
            return pack([_JOINED, log_id, head, used, quota, ttl_s, max_item])
        case PushEntry(raw):
            return pack([_PUSH_ENTRY, raw])
        case PushChunk(blob, object_id, data):
            return pack([_PUSH_CHUNK, blob, object_id, data])
        case Pushed(cursor, new, used):
            return pack([_PUSHED, cursor, new, used])
        case Pull(after, limit):
            return pack([_PULL, after, limit])
        case Items(items, has_more, head):
            return pack([_ITEMS, [_encode_item(item) for item in items], has_more, head])
        case Fetch(object_id):
            return pack([_FETCH, object_id])
        case ObjectData(object_id, data):
            return pack([_OBJECT, object_id, data])
        case Ack(cursor):
            return pack([_ACK, cursor])
        case Acked(cursor):
            return pack([_ACKED, cursor])
        case Notify(head):
            return pack([_NOTIFY, head])
        case Error(code, text):
            return pack([_ERROR, code, text[:MAX_ERROR_MESSAGE]])
    raise TypeError(f"not a mailbox message: {message!r}")


def _encode_item(item: Item) -> list[object]:
    if isinstance(item, EntryItem):
        return [item.cursor, ITEM_ENTRY, item.raw]
    return [item.cursor, ITEM_OBJECT, item.object_id, item.size, item.blob]


def item_wire_size(item: Item) -> int:
    """An upper bound of ``item``'s bytes inside ITEMS (for the reply's byte cap)."""
    if isinstance(item, EntryItem):
        return len(item.raw) + ITEM_HEADER_BYTES
    return ITEM_HEADER_BYTES


# --- decoding ------------------------------------------------------------------------------


def _message(body: bytes) -> tuple[int, list[object]]:
    items = as_list(unpack_untrusted(body, max_size=MAX_FRAME), "mailbox frame")
    if not items:
        raise BadFrame("mailbox frame is an empty array")
    return as_int(items[0], "mailbox frame type", hi=0xFF), items


def _fields(items: list[object], count: int, name: str) -> list[object]:
    if len(items) != count + 1:
        raise BadFrame(f"{name}: expected {count} fields, got {len(items) - 1}")
    return items[1:]


def _bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise BadFrame(f"{field}: expected a boolean, got {type(value).__name__}")
    return value


def decode_node_to_relay_untrusted(body: bytes) -> NodeToRelay:
    """Parse a node's frame; :class:`~p2psync.errors.BadFrame` for anything else."""
    kind, items = _message(body)
    if kind == _JOIN:
        mailbox, group_id, proof, notify = _fields(items, 4, "JOIN")
        return Join(
            as_bytes(mailbox, "JOIN.mailbox", size=MAILBOX_ID_SIZE),
            as_bytes(group_id, "JOIN.group_id", size=GROUP_ID_SIZE),
            as_bytes(proof, "JOIN.proof", size=PROOF_SIZE),
            _bool(notify, "JOIN.notify"),
        )
    if kind == _PUSH_ENTRY:
        (raw,) = _fields(items, 1, "PUSH_ENTRY")
        return PushEntry(as_bytes(raw, "PUSH_ENTRY.entry", max_size=defaults.MAX_ENTRY_SIZE))
    if kind == _PUSH_CHUNK:
        blob, object_id, data = _fields(items, 3, "PUSH_CHUNK")
        return PushChunk(
            as_bytes(blob, "PUSH_CHUNK.blob", size=HASH_SIZE),
            as_bytes(object_id, "PUSH_CHUNK.object_id", size=HASH_SIZE),
            as_bytes(data, "PUSH_CHUNK.object", max_size=MAX_ITEM_SIZE),
        )
    if kind == _PULL:
        after, limit = _fields(items, 2, "PULL")
        return Pull(
            as_int(after, "PULL.after", hi=_U64), as_int(limit, "PULL.limit", lo=1, hi=0xFFFF)
        )
    if kind == _FETCH:
        (object_id,) = _fields(items, 1, "FETCH")
        return Fetch(as_bytes(object_id, "FETCH.object_id", size=HASH_SIZE))
    if kind == _ACK:
        (cursor,) = _fields(items, 1, "ACK")
        return Ack(as_int(cursor, "ACK.cursor", hi=_U64))
    raise BadFrame(f"mailbox frame type {kind} is not a node's request")


def decode_relay_to_node_untrusted(body: bytes) -> RelayToNode:
    """Parse relayd's frame; :class:`~p2psync.errors.BadFrame` for anything else."""
    kind, items = _message(body)
    if kind == _CHALLENGE:
        (nonce,) = _fields(items, 1, "CHALLENGE")
        return Challenge(as_bytes(nonce, "CHALLENGE.nonce", size=NONCE_SIZE))
    if kind == _JOINED:
        log_id, head, used, quota, ttl_s, max_item = _fields(items, 6, "JOINED")
        return Joined(
            as_bytes(log_id, "JOINED.log_id", size=LOG_ID_SIZE),
            as_int(head, "JOINED.head", hi=_U64),
            as_int(used, "JOINED.used", hi=_U64),
            as_int(quota, "JOINED.quota", hi=_U64),
            as_int(ttl_s, "JOINED.ttl_s", hi=_U64),
            as_int(max_item, "JOINED.max_item", hi=_U32),
        )
    if kind == _PUSHED:
        cursor, new, used = _fields(items, 3, "PUSHED")
        return Pushed(
            as_int(cursor, "PUSHED.cursor", lo=1, hi=_U64),
            _bool(new, "PUSHED.new"),
            as_int(used, "PUSHED.used", hi=_U64),
        )
    if kind == _ITEMS:
        listed, has_more, head = _fields(items, 3, "ITEMS")
        return Items(
            tuple(_decode_item(item) for item in as_list(listed, "ITEMS.items")),
            _bool(has_more, "ITEMS.has_more"),
            as_int(head, "ITEMS.head", hi=_U64),
        )
    if kind == _OBJECT:
        object_id, data = _fields(items, 2, "OBJECT")
        return ObjectData(
            as_bytes(object_id, "OBJECT.object_id", size=HASH_SIZE),
            as_bytes(data, "OBJECT.object", max_size=MAX_ITEM_SIZE),
        )
    if kind == _ACKED:
        (cursor,) = _fields(items, 1, "ACKED")
        return Acked(as_int(cursor, "ACKED.cursor", hi=_U64))
    if kind == _NOTIFY:
        (head,) = _fields(items, 1, "NOTIFY")
        return Notify(as_int(head, "NOTIFY.head", hi=_U64))
    if kind == _ERROR:
        code, text = _fields(items, 2, "ERROR")
        message = as_str(text, "ERROR.message", max_size=MAX_FRAME)
        return Error(as_int(code, "ERROR.code", hi=0xFFFF), message[:MAX_ERROR_MESSAGE])
    raise BadFrame(f"mailbox frame type {kind} is not a relay's reply")


def _decode_item(value: object) -> Item:
    fields = as_list(value, "ITEMS item")
    if len(fields) < 2:
        raise BadFrame("ITEMS item: too short")
    cursor = as_int(fields[0], "item.cursor", lo=1, hi=_U64)
    kind = as_int(fields[1], "item.kind", hi=0xFF)
    if kind == ITEM_ENTRY and len(fields) == 3:
        return EntryItem(
            cursor, as_bytes(fields[2], "item.entry", max_size=defaults.MAX_ENTRY_SIZE)
        )
    if kind == ITEM_OBJECT and len(fields) == 5:
        return ObjectItem(
            cursor,
            as_bytes(fields[2], "item.object_id", size=HASH_SIZE),
            as_int(fields[3], "item.size", hi=MAX_ITEM_SIZE),
            as_bytes(fields[4], "item.blob", size=HASH_SIZE),
        )
    raise BadFrame(f"ITEMS item of kind {kind} with {len(fields)} fields")


__all__ = [
    "MAX_FRAME",
    "SERVICE",
    "VERSION",
    "Ack",
    "Acked",
    "Challenge",
    "EntryItem",
    "Error",
    "Fetch",
    "Item",
    "Items",
    "Join",
    "Joined",
    "MailboxErrorCode",
    "NodeToRelay",
    "Notify",
    "ObjectData",
    "ObjectItem",
    "Pull",
    "PushChunk",
    "PushEntry",
    "Pushed",
    "RelayToNode",
    "decode_node_to_relay_untrusted",
    "decode_relay_to_node_untrusted",
    "encode",
    "item_wire_size",
    "join_transcript",
    "mailbox_address",
    "sign_join",
    "verify_join",
]
