"""Signed entries: what a group replicates, and the hybrid logical clock.

Theory
------
Each device appends to its own **feed**: a chain of entries with ``seq``
1, 2, 3, … where each entry names the id of the one before it (``prev``).
The author signs every entry, so a feed cannot be forged, reordered or
forked by anyone else, relays included. A receiver accepts entry ``n`` of an
author only when it holds entry ``n - 1`` and ``prev`` is that entry's id
(the *frontier* ``{author: highest contiguous seq}`` is therefore all a node
needs to say what it has).

Entry kinds: ``PUT`` (a key now names a blob), ``DELETE`` (a tombstone that
hides the key's older values), ``MEMBER`` (a device joined the group).
Which value of a key wins is decided by ``(hlc, author)``, highest first:
a last-writer-wins register per key, with a hybrid logical clock so that an
entry written after seeing another always sorts after it, even across
devices with skewed wall clocks.

The app's key, type and name live in ``meta``, sealed with the group's meta
key (see :mod:`p2psync.store.objects`), so relays see only ciphertext.

Wire format (canonical msgpack array, fields in this order)::

    [ version=1,
      group_id   bin 32,   the group's public routing id
      author     bin 32,   NodeId of the signer
      seq        uint,     1-based position in the author's feed
      prev       bin 0|32, id of entry seq-1 (empty for seq 1)
      hlc        uint,     hybrid logical clock: (unix_ms << 16) | counter
      kind       uint,     1 PUT, 2 DELETE, 3 MEMBER
      blob       bin 0|32, blob id (PUT only)
      size       uint,     plaintext size of the blob (PUT only, else 0)
      meta       bin,      sealed metadata (<= MAX_ENTRY_SIZE)
      sig        bin 64 ]  Ed25519 over  b"p2psync entry v1\\0" || pack(fields 0..9)

    entry id = BLAKE3(encoded entry)

Decoding demands the canonical encoding (re-encoding yields the same bytes),
so an entry has exactly one id.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from p2psync import defaults
from p2psync.crypto.identity import BadNodeId, Identity, NodeId
from p2psync.errors import BadFrame, IntegrityError
from p2psync.proto.codec import (
    as_bytes,
    as_int,
    as_list,
    pack,
    unpack_canonical_untrusted,
)

ENTRY_VERSION = 1
ENTRY_ID_SIZE = 32
BLOB_ID_SIZE = 32
_SIGNING_CONTEXT = b"p2psync entry v1\x00"
_HLC_COUNTER_BITS = 16
_HLC_COUNTER_MASK = (1 << _HLC_COUNTER_BITS) - 1


class Kind(enum.IntEnum):
    PUT = 1
    DELETE = 2
    MEMBER = 3


class EntryRejected(IntegrityError):
    """A decoded entry failed verification; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Entry:
    """One signed entry. Build new ones with :func:`sign_entry`."""

    group_id: bytes
    author: NodeId
    seq: int
    prev: bytes
    hlc: int
    kind: Kind
    blob: bytes
    size: int
    meta: bytes
    sig: bytes

    def _fields(self) -> list[object]:
        return [
            ENTRY_VERSION,
            self.group_id,
            self.author.raw,
            self.seq,
            self.prev,
            self.hlc,
            int(self.kind),
            self.blob,
            self.size,
            self.meta,
        ]

    def signed_bytes(self) -> bytes:
        return _SIGNING_CONTEXT + pack(self._fields())

    def encode(self) -> bytes:
        return pack([*self._fields(), self.sig])

    @property
    def entry_id(self) -> bytes:
        return blake3.blake3(self.encode()).digest()

    def __repr__(self) -> str:
        return f"Entry({self.author.short()}#{self.seq} {self.kind.name} hlc={self.hlc})"


def sign_entry(
    identity: Identity,
    *,
    group_id: bytes,
    seq: int,
    prev: bytes,
    hlc: int,
    kind: Kind,
    blob: bytes,
    size: int,
    meta: bytes,
) -> Entry:
    """Make and sign the next entry of ``identity``'s feed."""
    unsigned = Entry(group_id, identity.node_id, seq, prev, hlc, kind, blob, size, meta, b"")
    signed = Entry(
        group_id, identity.node_id, seq, prev, hlc, kind, blob, size, meta,
        identity.sign(unsigned.signed_bytes()),
    )  # fmt: skip
    check_entry_shape(signed)
    return signed


def decode_entry_untrusted(data: bytes) -> Entry:
    """Decode one entry from untrusted bytes; :class:`BadFrame` on any fault.

    Checks encoding and shape only; :func:`verify_entry` checks signature and
    chain, which need context.
    """
    value = unpack_canonical_untrusted(data, max_size=defaults.MAX_ENTRY_SIZE)
    items = as_list(value, "entry", length=11)
    as_int(items[0], "entry.version", lo=ENTRY_VERSION, hi=ENTRY_VERSION)
    try:
        author = NodeId(as_bytes(items[2], "entry.author", size=32))
    except BadNodeId as exc:
        raise BadFrame(f"entry.author: {exc}") from exc
    kind_value = as_int(items[6], "entry.kind", lo=1, hi=max(Kind))
    entry = Entry(
        group_id=as_bytes(items[1], "entry.group_id", size=32),
        author=author,
        seq=as_int(items[3], "entry.seq", lo=1, hi=2**63 - 1),
        prev=as_bytes(items[4], "entry.prev", max_size=ENTRY_ID_SIZE),
        hlc=as_int(items[5], "entry.hlc"),
        kind=Kind(kind_value),
        blob=as_bytes(items[7], "entry.blob", max_size=BLOB_ID_SIZE),
        size=as_int(items[8], "entry.size"),
        meta=as_bytes(items[9], "entry.meta", max_size=defaults.MAX_ENTRY_SIZE),
        sig=as_bytes(items[10], "entry.sig", size=64),
    )
    check_entry_shape(entry)
    return entry


def check_entry_shape(entry: Entry) -> None:
    """Field rules that need no context; :class:`BadFrame` names the rule."""
    if entry.seq == 1 and entry.prev:
        raise BadFrame("entry.prev must be empty for seq 1")
    if entry.seq > 1 and len(entry.prev) != ENTRY_ID_SIZE:
        raise BadFrame(f"entry.prev must be {ENTRY_ID_SIZE} bytes for seq > 1")
    if entry.kind is Kind.PUT:
        if len(entry.blob) != BLOB_ID_SIZE:
            raise BadFrame("a PUT entry names a 32-byte blob id")
        if entry.size > defaults.MAX_BLOB_CHUNKS * defaults.CHUNK_SIZE:
            raise BadFrame(f"entry.size {entry.size} exceeds the largest blob")
    elif entry.blob or entry.size:
        raise BadFrame(f"a {entry.kind.name} entry carries no blob")


@dataclass(frozen=True, slots=True)
class FeedTip:
    """The last entry of an author's feed that a device holds."""

    seq: int
    entry_id: bytes


def verify_entry(
    entry: Entry,
    *,
    group_id: bytes,
    previous: FeedTip | None,
    now_ms: int,
) -> None:
    """Check ``entry`` may extend its author's feed whose tip is ``previous``.

    Raises :class:`EntryRejected` with one of the reasons ``wrong-group``,
    ``seq-gap``, ``prev-mismatch``, ``clock-skew``, ``bad-signature`` (checked
    in this order: :func:`check_entry_context`, then :func:`check_entry_signature`).
    """
    check_entry_context(entry, group_id=group_id, previous=previous, now_ms=now_ms)
    check_entry_signature(entry)


def check_entry_context(
    entry: Entry,
    *,
    group_id: bytes,
    previous: FeedTip | None,
    now_ms: int,
) -> None:
    """The checks of :func:`verify_entry` that need context but no signature.

    Cheap (no cryptography), so a receiver runs them first and verifies the
    signatures of a whole batch afterwards, off its main thread.
    """
    if entry.group_id != group_id:
        raise EntryRejected("wrong-group", "entry belongs to another group")
    expected_seq = 1 if previous is None else previous.seq + 1
    if entry.seq != expected_seq:
        raise EntryRejected(
            "seq-gap", f"{entry.author.short()} seq {entry.seq}, expected {expected_seq}"
        )
    if previous is not None and entry.prev != previous.entry_id:
        raise EntryRejected(
            "prev-mismatch", f"{entry.author.short()}#{entry.seq} does not follow its prev"
        )
    physical_ms = entry.hlc >> _HLC_COUNTER_BITS
    if physical_ms > now_ms + defaults.MAX_CLOCK_SKEW_MS:
        raise EntryRejected("clock-skew", f"entry stamped {physical_ms - now_ms} ms ahead")


def check_entry_signature(entry: Entry, raw: bytes | None = None) -> None:
    """Raise ``EntryRejected("bad-signature")`` unless the author signed ``entry``.

    ``raw``: the entry's canonical encoding, if at hand (saves re-encoding).
    """
    signed = entry.signed_bytes() if raw is None else signed_bytes_of_encoding(entry, raw)
    try:
        entry.author.verify(signed, entry.sig)
    except IntegrityError as exc:
        raise EntryRejected("bad-signature", str(exc)) from exc


def signatures_valid(batch: Sequence[tuple[Entry, bytes | None]]) -> list[bool]:
    """Whether each ``(entry, raw or None)`` carries its author's valid signature.

    Pure and thread-safe: the store runs chunks of a received batch in
    worker threads (libsodium releases the GIL while it verifies).
    """
    valid = []
    for entry, raw in batch:
        try:
            check_entry_signature(entry, raw)
        except EntryRejected:
            valid.append(False)
        else:
            valid.append(True)
    return valid


# Canonical msgpack of the 11-item entry array: fixarray header 0x9b, the
# ten signed fields, then the signature as bin8 of 64 bytes (0xc4 0x40).
# The signed message packs the same ten fields under fixarray header 0x9a.
_ENTRY_ARRAY_HEADER = 0x9B
_SIGNED_ARRAY_HEADER = b"\x9a"
_SIG_HEADER = b"\xc4\x40"
_SIG_TRAILER = len(_SIG_HEADER) + 64


def signed_bytes_of_encoding(entry: Entry, raw: bytes) -> bytes:
    """``entry.signed_bytes()`` cut from its canonical encoding ``raw``, without packing.

    ``raw`` must be what ``entry`` was decoded from (decoding demands the
    canonical form); anything else falls back to packing the fields again.
    """
    if (
        len(raw) > _SIG_TRAILER
        and raw[0] == _ENTRY_ARRAY_HEADER
        and raw[-_SIG_TRAILER : -_SIG_TRAILER + len(_SIG_HEADER)] == _SIG_HEADER
        and raw[-64:] == entry.sig
    ):
        return _SIGNING_CONTEXT + _SIGNED_ARRAY_HEADER + raw[1:-_SIG_TRAILER]
    return entry.signed_bytes()


class HybridClock:
    """Hybrid logical clock (Kulkarni et al. 2014), packed as one integer.

    ``tick(now_ms)`` stamps a local event; ``observe(remote)`` folds in a
    stamp seen on a received entry so later local stamps sort after it.
    The counter makes stamps unique per device even within one millisecond.
    """

    __slots__ = ("_last",)

    def __init__(self, last: int = 0) -> None:
        self._last = last

    @property
    def last(self) -> int:
        return self._last

    def tick(self, now_ms: int) -> int:
        wall = now_ms << _HLC_COUNTER_BITS
        if wall > self._last:
            self._last = wall
        else:
            self._last += 1
        return self._last

    def observe(self, remote: int) -> None:
        if remote > self._last:
            self._last = remote


def hlc_to_ms(hlc: int) -> int:
    return hlc >> _HLC_COUNTER_BITS


def hlc_counter(hlc: int) -> int:
    return hlc & _HLC_COUNTER_MASK
