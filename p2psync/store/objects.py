"""Sealed objects: the encrypted, content-addressed unit of storage and transfer.

Theory
------
A blob's plaintext is cut into 1 MiB chunks. Each chunk is sealed with
XChaCha20-Poly1305 under the group's blob key and named by the BLAKE3 hash
of the sealed bytes (its **object id**). A blob of one chunk is named by
that chunk's id; a larger blob is named by the id of a sealed **manifest**
listing its chunk ids. Because the object id hashes ciphertext, anyone —
a peer, a relay — can check an object against its name without any key,
and nobody without the key learns anything but sizes.

The nonce of a chunk or manifest is a keyed BLAKE3 hash (dedupe key) of the
object header and the plaintext: identical content seals to identical bytes
inside a group, so a re-put, a retry or the same file on two devices is
stored and sent once. The header is hashed in so a chunk and a manifest
with equal plaintext never share a nonce under different associated data.
Metadata objects (``meta`` in entries) use random nonces: they are small
and need no dedupe.

Byte format of a sealed object::

    version  u8   = 1
    kind     u8   1 chunk, 2 manifest, 3 meta
    epoch    u32  big-endian key epoch whose keys sealed it
    nonce    24 bytes
    box      XChaCha20-Poly1305(key, nonce, plaintext, aad = header || group_id)

    header = the first 6 bytes; key = blob_key (chunk, manifest) or meta_key

Manifest plaintext: msgpack ``[total_size, [[chunk_id bin32, plain_size], ...]]``.
Meta plaintext: msgpack ``[key str, content_type str|nil, name str|nil, app map]``.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import blake3

from p2psync import defaults
from p2psync.crypto.aead import (
    NONCE_SIZE,
    TAG_SIZE,
    keyed_nonce,
    xchacha_decrypt,
    xchacha_encrypt,
)
from p2psync.crypto.group import GroupKeys
from p2psync.crypto.identity import RandomBytes
from p2psync.errors import BadFrame, IntegrityError
from p2psync.proto.codec import (
    as_bytes,
    as_int,
    as_list,
    as_optional_str,
    as_str,
    pack,
    unpack_untrusted,
)

OBJECT_VERSION = 1
OBJECT_ID_SIZE = 32
_HEADER = struct.Struct(">BBI")
HEADER_SIZE = _HEADER.size
OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE
MAX_OBJECT_SIZE = defaults.CHUNK_SIZE + OVERHEAD
# A manifest entry costs at most 34 (id) + 9 (size) msgpack bytes.
MAX_MANIFEST_PLAINTEXT = 16 + defaults.MAX_BLOB_CHUNKS * 45
MAX_SEALED_SIZE = max(MAX_OBJECT_SIZE, MAX_MANIFEST_PLAINTEXT + OVERHEAD)

Keyring = Mapping[int, GroupKeys]


class ObjectKind(enum.IntEnum):
    CHUNK = 1
    MANIFEST = 2
    META = 3


class KeyEpochUnknown(IntegrityError):
    """The object was sealed under a key epoch this device does not hold."""


def object_id(sealed: bytes | memoryview) -> bytes:
    """The content address of a sealed object."""
    return blake3.blake3(sealed).digest()


def read_header_untrusted(sealed: bytes | memoryview) -> tuple[ObjectKind, int]:
    """Kind and key epoch of a sealed object; :class:`BadFrame` if malformed."""
    if len(sealed) < OVERHEAD:
        raise BadFrame(f"sealed object of {len(sealed)} bytes is shorter than its overhead")
    if len(sealed) > MAX_SEALED_SIZE:
        raise BadFrame(f"sealed object of {len(sealed)} bytes exceeds the limit")
    version, kind, epoch = _HEADER.unpack_from(sealed)
    if version != OBJECT_VERSION:
        raise BadFrame(f"sealed object version {version} is not supported")
    try:
        return ObjectKind(kind), epoch
    except ValueError:
        raise BadFrame(f"sealed object kind {kind} is unknown") from None


def _key_for(keys: GroupKeys, kind: ObjectKind) -> bytes:
    return keys.meta_key if kind is ObjectKind.META else keys.blob_key


def seal(
    keys: GroupKeys, kind: ObjectKind, plaintext: bytes | memoryview, nonce: bytes | None = None
) -> bytes:
    """Seal ``plaintext``; with no ``nonce``, derive it from the content (dedupe)."""
    header = _HEADER.pack(OBJECT_VERSION, int(kind), keys.epoch)
    aad = header + keys.group_id
    if nonce is None:
        nonce = keyed_nonce(keys.dedupe_key, plaintext, aad=aad)
    box = xchacha_encrypt(_key_for(keys, kind), nonce, plaintext, aad)
    return header + nonce + box


def open_sealed_object(keyring: Keyring, sealed: bytes | memoryview, expect: ObjectKind) -> bytes:
    """Decrypt a sealed object of kind ``expect``; raises on any fault.

    :class:`BadFrame` for a malformed header, :class:`KeyEpochUnknown` for
    an epoch we do not hold, :class:`IntegrityError` if it does not open.
    """
    kind, epoch = read_header_untrusted(sealed)
    if kind is not expect:
        raise BadFrame(f"expected a {expect.name.lower()} object, found a {kind.name.lower()}")
    keys = keyring.get(epoch)
    if keys is None:
        raise KeyEpochUnknown(f"object sealed under key epoch {epoch}, which this device lacks")
    view = memoryview(sealed)
    header = bytes(view[:HEADER_SIZE])
    nonce = bytes(view[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE])
    return xchacha_decrypt(
        _key_for(keys, kind), nonce, view[HEADER_SIZE + NONCE_SIZE :], header + keys.group_id
    )


# --- manifests -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkRef:
    chunk_id: bytes
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    total_size: int
    chunks: tuple[ChunkRef, ...]

    def encode(self) -> bytes:
        return pack([self.total_size, [[c.chunk_id, c.size] for c in self.chunks]])


def decode_manifest_untrusted(data: bytes) -> Manifest:
    value = unpack_untrusted(data, max_size=MAX_MANIFEST_PLAINTEXT)
    items = as_list(value, "manifest", length=2)
    total = as_int(items[0], "manifest.total_size")
    refs = as_list(items[1], "manifest.chunks")
    if not 2 <= len(refs) <= defaults.MAX_BLOB_CHUNKS:
        raise BadFrame(f"manifest lists {len(refs)} chunks, outside 2..{defaults.MAX_BLOB_CHUNKS}")
    chunks = []
    for index, ref in enumerate(refs):
        pair = as_list(ref, f"manifest.chunks[{index}]", length=2)
        chunks.append(
            ChunkRef(
                as_bytes(pair[0], f"manifest.chunks[{index}].id", size=OBJECT_ID_SIZE),
                as_int(pair[1], f"manifest.chunks[{index}].size", hi=defaults.CHUNK_SIZE),
            )
        )
    if sum(c.size for c in chunks) != total:
        raise BadFrame("manifest chunk sizes do not add up to its total size")
    return Manifest(total, tuple(chunks))


# --- metadata ---------------------------------------------------------------

AppValue = str | int | bytes | bool | None
_MAX_CONTENT_TYPE = 256
_MAX_NAME = 1024


@dataclass(frozen=True, slots=True)
class Meta:
    """What the app says about an entry. Sealed before it leaves this module."""

    key: str
    content_type: str | None = None
    name: str | None = None
    app: Mapping[str, AppValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The same bounds the receiving side enforces, so we never sign
        # something our peers will refuse.
        for name, value, limit in (
            ("key", self.key, defaults.MAX_KEY_LENGTH),
            ("content type", self.content_type, _MAX_CONTENT_TYPE),
            ("name", self.name, _MAX_NAME),
        ):
            if value is not None and len(value) > limit:
                raise BadFrame(f"the {name} is {len(value)} characters; the limit is {limit}")

    def encode(self) -> bytes:
        data = pack([self.key, self.content_type, self.name, dict(self.app)])
        if len(data) > defaults.MAX_META_PLAINTEXT:
            raise BadFrame(
                f"metadata is {len(data)} bytes; the limit is {defaults.MAX_META_PLAINTEXT}"
            )
        return data


def decode_meta_untrusted(data: bytes) -> Meta:
    value = unpack_untrusted(data, max_size=defaults.MAX_META_PLAINTEXT)
    items = as_list(value, "meta", length=4)
    app_value = items[3]
    if not isinstance(app_value, dict):
        raise BadFrame("meta.app: expected a map")
    app: dict[str, AppValue] = {}
    for name, item in app_value.items():
        if not isinstance(name, str):
            raise BadFrame("meta.app: keys must be strings")
        if not isinstance(item, str | int | bytes | bool) and item is not None:
            raise BadFrame(f"meta.app[{name!r}]: unsupported value type {type(item).__name__}")
        app[name] = item
    return Meta(
        key=as_str(items[0], "meta.key", max_size=defaults.MAX_KEY_LENGTH),
        content_type=as_optional_str(items[1], "meta.content_type", max_size=_MAX_CONTENT_TYPE),
        name=as_optional_str(items[2], "meta.name", max_size=_MAX_NAME),
        app=app,
    )


def seal_meta(keys: GroupKeys, meta: Meta, random_bytes: RandomBytes) -> bytes:
    return seal(keys, ObjectKind.META, meta.encode(), nonce=random_bytes(NONCE_SIZE))


def open_meta(keyring: Keyring, sealed: bytes) -> Meta:
    return decode_meta_untrusted(open_sealed_object(keyring, sealed, ObjectKind.META))


def key_hash(keys: GroupKeys, key: str) -> bytes:
    """Local index name of an app key: keyed, so the database holds no plaintext keys.

    The store always hashes with the keys of its current epoch; a future key
    rotation re-indexes (the index is local and rebuilt from the entries).
    """
    return blake3.blake3(key.encode("utf-8"), key=keys.index_key).digest()


__all__ = [
    "MAX_OBJECT_SIZE",
    "OBJECT_ID_SIZE",
    "ChunkRef",
    "KeyEpochUnknown",
    "Keyring",
    "Manifest",
    "Meta",
    "ObjectKind",
    "decode_manifest_untrusted",
    "decode_meta_untrusted",
    "key_hash",
    "object_id",
    "open_meta",
    "open_sealed_object",
    "read_header_untrusted",
    "seal",
    "seal_meta",
]
