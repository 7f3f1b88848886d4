"""Group secret and the keys derived from it.

Theory
------
A group (a user's set of devices) shares one 32-byte random **group secret**
per key **epoch**. Every key the group uses is derived from it with one KDF,
BLAKE3 in derive_key mode (a KDF in its own right: the context string picks
an independent PRF, see the BLAKE3 paper section 2.7). Each purpose has its
own hard-coded, globally unique context ``"p2psync 2026 <purpose> v1"``::

    group_id       = BLAKE3-derive("p2psync 2026 group id v1",       secret)
    <purpose>_key  = BLAKE3-derive("p2psync 2026 <purpose> key v1",  secret || u32be(epoch))

for the purposes ``blob`` (chunk encryption), ``meta`` (entry metadata),
``index`` (blinded index keys), ``membership`` (MAC proving membership in a
handshake), ``mdns tag`` (rotating LAN discovery tags), ``dedupe`` (keyed
nonces, see :func:`p2psync.crypto.aead.keyed_nonce`) and ``invite``
(invitation/join codes). All outputs are 32 bytes. One more is derived from
the secret alone (no epoch), like the group id: ``mailbox_seed =
BLAKE3-derive("p2psync 2026 mailbox key v1", secret)``, the seed of the
Ed25519 key pair that proves membership to relayd's mailbox
(:func:`mailbox_key`).

The group id and epochs
~~~~~~~~~~~~~~~~~~~~~~~
The group id is the group's public routing name (relays and peers look
groups up by it), so it must not change when keys rotate. It is therefore
derived from the secret **alone**, without the epoch; every other key mixes
in the epoch. Consequences, which callers must respect:

- Same secret, next epoch: same group id, all-new keys. This renews keys
  (bounds how much data one key protects) but does *not* lock out a device
  that knew the secret: it can derive the new epoch's keys too.
- Locking a device out needs a fresh secret that it never saw. With this
  rule a fresh secret means a new group id (members re-join the new group).
  Keeping the id across such a rotation would need the id carried beside the
  secret; the version byte of the serialised form leaves room for that.

Rules
-----
- Secrets and keys never appear in ``repr`` or logs; only the group id (its
  text form) and the epoch do.
- Randomness is injected (``random_bytes``).
- MACs are compared in constant time (``hmac.compare_digest``); a failed
  check raises :class:`IntegrityError`, never returns ``False``.

Formats
-------
Serialised group secret (37 bytes, e.g. inside the box sealed to a joiner)::

    u8 version = 1 | u32be epoch (>= 1) | 32 bytes secret

Membership MAC: keyed BLAKE3 under ``membership_key`` of the handshake
transcript, 32 bytes. mDNS tag: keyed BLAKE3 under ``mdns_tag_key`` of
``b"mdns-tag" || u64be(window)``, first 16 bytes.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass
from typing import Final

import blake3

from p2psync.crypto.identity import Identity, RandomBytes, b32encode
from p2psync.errors import BadFrame, IntegrityError, LocalProtocolError

GROUP_SECRET_SIZE: Final = 32
GROUP_KEY_SIZE: Final = 32
GROUP_SECRET_VERSION: Final = 1
MAX_EPOCH: Final = 0xFFFFFFFF  # the epoch travels as a u32
MEMBERSHIP_MAC_SIZE: Final = 32
MDNS_TAG_SIZE: Final = 16
MAX_MDNS_WINDOW: Final = 0xFFFFFFFFFFFFFFFF  # the window is hashed as a u64

_SECRET_HEADER: Final = struct.Struct(">BI")
_SERIALISED_SIZE: Final = _SECRET_HEADER.size + GROUP_SECRET_SIZE

# One context per purpose; never reuse or edit one (that would change keys).
_CONTEXT_GROUP_ID: Final = "p2psync 2026 group id v1"
_CONTEXT_BLOB: Final = "p2psync 2026 blob key v1"
_CONTEXT_META: Final = "p2psync 2026 meta key v1"
_CONTEXT_INDEX: Final = "p2psync 2026 index key v1"
_CONTEXT_MEMBERSHIP: Final = "p2psync 2026 membership key v1"
_CONTEXT_MDNS_TAG: Final = "p2psync 2026 mdns tag key v1"
_CONTEXT_DEDUPE: Final = "p2psync 2026 dedupe key v1"
_CONTEXT_INVITE: Final = "p2psync 2026 invite key v1"
_CONTEXT_MAILBOX: Final = "p2psync 2026 mailbox key v1"

_MDNS_TAG_LABEL: Final = b"mdns-tag"


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 1 <= epoch <= MAX_EPOCH:
        raise BadFrame(f"a key epoch is an integer from 1 to {MAX_EPOCH}, got {epoch!r}")


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) != GROUP_SECRET_SIZE:
        size = len(secret) if isinstance(secret, bytes | bytearray | memoryview) else "?"
        raise BadFrame(f"a group secret is {GROUP_SECRET_SIZE} bytes, got {size}")


def _derive(context: str, material: bytes) -> bytes:
    return blake3.blake3(material, derive_key_context=context).digest(GROUP_KEY_SIZE)


def group_id_text(group_id: bytes) -> str:
    """The printed form of a group id: lowercase base32 without padding."""
    return b32encode(group_id)


@dataclass(frozen=True, slots=True)
class GroupSecret:
    """The root secret of one key epoch of a group. ``repr`` hides it."""

    secret: bytes
    epoch: int

    def __post_init__(self) -> None:
        _check_secret(self.secret)
        _check_epoch(self.epoch)

    @classmethod
    def generate(cls, random_bytes: RandomBytes, epoch: int = 1) -> GroupSecret:
        """A fresh random secret: a new group, with its own group id (see module docs)."""
        return cls(random_bytes(GROUP_SECRET_SIZE), epoch)

    def keys(self) -> GroupKeys:
        return GroupKeys.derive(self.secret, self.epoch)

    def to_bytes(self) -> bytes:
        """``u8 version | u32be epoch | secret`` (37 bytes)."""
        return _SECRET_HEADER.pack(GROUP_SECRET_VERSION, self.epoch) + self.secret

    @classmethod
    def from_bytes_untrusted(cls, data: bytes | bytearray | memoryview) -> GroupSecret:
        """Inverse of :meth:`to_bytes`; :class:`BadFrame` says what is wrong."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BadFrame(f"a group secret is bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) != _SERIALISED_SIZE:
            raise BadFrame(
                f"a serialised group secret is {_SERIALISED_SIZE} bytes, got {len(data)}"
            )
        version, epoch = _SECRET_HEADER.unpack_from(data)
        if version != GROUP_SECRET_VERSION:
            raise BadFrame(
                f"group secret format version {version} is not supported "
                f"(expected {GROUP_SECRET_VERSION}); upgrade p2psync"
            )
        return cls(data[_SECRET_HEADER.size :], epoch)

    def __repr__(self) -> str:
        return (
            f"GroupSecret(group={group_id_text(_derive(_CONTEXT_GROUP_ID, self.secret))[:10]}, "
            f"epoch={self.epoch}, secret=<hidden>)"
        )


@dataclass(frozen=True, slots=True)
class GroupKeys:
    """Every key of one epoch of a group, derived by :meth:`derive`. ``repr`` hides them."""

    epoch: int
    group_id: bytes
    blob_key: bytes
    meta_key: bytes
    index_key: bytes
    membership_key: bytes
    mdns_tag_key: bytes
    dedupe_key: bytes
    invite_key: bytes
    mailbox_seed: bytes  # from the secret alone, like group_id: see mailbox_key()

    @classmethod
    def derive(cls, secret: bytes, epoch: int) -> GroupKeys:
        """Derive all keys; the group id from ``secret`` alone, the rest with ``epoch``."""
        _check_secret(secret)
        _check_epoch(epoch)
        material = secret + struct.pack(">I", epoch)
        return cls(
            epoch=epoch,
            group_id=_derive(_CONTEXT_GROUP_ID, secret),
            blob_key=_derive(_CONTEXT_BLOB, material),
            meta_key=_derive(_CONTEXT_META, material),
            index_key=_derive(_CONTEXT_INDEX, material),
            membership_key=_derive(_CONTEXT_MEMBERSHIP, material),
            mdns_tag_key=_derive(_CONTEXT_MDNS_TAG, material),
            dedupe_key=_derive(_CONTEXT_DEDUPE, material),
            invite_key=_derive(_CONTEXT_INVITE, material),
            mailbox_seed=_derive(_CONTEXT_MAILBOX, secret),
        )

    def __repr__(self) -> str:
        return f"GroupKeys(group={group_id_text(self.group_id)}, epoch={self.epoch}, keys=<hidden>)"


def membership_mac(keys: GroupKeys, transcript: bytes) -> bytes:
    """Prove group membership: keyed BLAKE3 of ``transcript`` (32 bytes)."""
    return blake3.blake3(transcript, key=keys.membership_key).digest(MEMBERSHIP_MAC_SIZE)


def verify_membership_mac(keys: GroupKeys, transcript: bytes, mac: bytes) -> None:
    """Raise :class:`IntegrityError` unless ``mac`` proves membership over ``transcript``."""
    expected = membership_mac(keys, transcript)
    # compare_digest is constant-time for equal lengths, and a length
    # mismatch reveals nothing secret.
    if not hmac.compare_digest(expected, bytes(mac)):
        raise IntegrityError(
            "membership proof does not verify: the peer is not in this group "
            "(or holds another key epoch)"
        )


def mailbox_key(keys: GroupKeys) -> Identity:
    """The group's Ed25519 **mailbox key pair** (relayd's store-and-forward mailbox).

    Its public key is the mailbox id relayd files the group's items under;
    a member proves membership to relayd by signing a fresh relay challenge
    with it (:mod:`p2psync.proto.mailbox`), so relayd checks the proof with
    the public key alone and never holds a secret. Derived from the secret
    without the epoch, like the group id: a routing name must survive key
    renewal, and a new epoch of the same secret locks nobody out anyway.
    """
    return Identity.from_seed(keys.mailbox_seed)


def mdns_tag(keys: GroupKeys, window: int) -> bytes:
    """The 16-byte LAN discovery tag of this group for time ``window``.

    Only members can compute or recognise it; it changes every window, so an
    onlooker cannot link announcements across windows.
    """
    if isinstance(window, bool) or not 0 <= window <= MAX_MDNS_WINDOW:
        raise LocalProtocolError(f"an mDNS tag window is a u64, got {window!r}")
    message = _MDNS_TAG_LABEL + struct.pack(">Q", window)
    return blake3.blake3(message, key=keys.mdns_tag_key).digest(MDNS_TAG_SIZE)
