"""Device identity: an Ed25519 key pair, and the NodeId that names it.

Theory
------
Every device has one Ed25519 key pair (RFC 8032) made on ``p2psync init``.
Its public key *is* the device's name: the **NodeId**, printed as lowercase
RFC 4648 base32 without padding (52 characters). Nothing else identifies a
device; there are no accounts.

The same key pair also serves as an X25519 key pair for boxes (disco
messages, the group secret sealed to a joining device), by the standard
birational map (libsodium's ``crypto_sign_ed25519_pk_to_curve25519``). One
key, one name, whatever the purpose.

Rules
-----
- The 32-byte seed is the only secret; ``repr`` never shows it.
- Parsing a NodeId from text or bytes checks length, alphabet and that the
  bytes are a valid Ed25519 point, and says which check failed.
- Signatures are detached, 64 bytes; verification raises
  :class:`BadSignature` rather than returning a flag that can be ignored.
- Randomness is injected (``random_bytes``) so callers and tests decide.
"""

from __future__ import annotations

import base64
import binascii
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import nacl.bindings as sodium
import nacl.exceptions

from p2psync.errors import BadFrame, IntegrityError

RandomBytes = Callable[[int], bytes]

NODE_ID_SIZE: Final = 32
SEED_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
NODE_ID_TEXT_LENGTH: Final = 52  # ceil(256 / 5)
_B32_ALPHABET: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")


class BadNodeId(BadFrame):
    """Text or bytes that do not name a device."""


class BadSignature(IntegrityError):
    """A signature did not verify under the claimed NodeId."""


def b32encode(raw: bytes) -> str:
    """Lowercase RFC 4648 base32 without padding."""
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def b32decode_untrusted(text: str) -> bytes:
    """Inverse of :func:`b32encode`; raises :class:`BadFrame` naming the fault."""
    lowered = text.strip().lower()
    for position, char in enumerate(lowered):
        if char not in _B32_ALPHABET:
            raise BadFrame(f"character {char!r} at position {position + 1} is not base32")
    padded = lowered.upper() + "=" * (-len(lowered) % 8)
    try:
        return base64.b32decode(padded)
    except binascii.Error as exc:
        raise BadFrame(f"not valid base32 ({len(lowered)} characters)") from exc


@functools.lru_cache(maxsize=4096)
def _is_valid_point(raw: bytes) -> bool:
    # A group has few authors whose ids arrive on every entry; the point
    # check costs ~65 us, so remember the answer (bounded).
    return bool(sodium.crypto_core_ed25519_is_valid_point(raw))


@dataclass(frozen=True, slots=True, order=True)
class NodeId:
    """A device's public name: its Ed25519 public key."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != NODE_ID_SIZE:
            raise BadNodeId(f"a NodeId is {NODE_ID_SIZE} bytes, got {len(self.raw)}")
        if not _is_valid_point(self.raw):
            raise BadNodeId("these bytes are not a valid Ed25519 public key")

    @classmethod
    def parse(cls, text: str) -> NodeId:
        """Parse the printed form; the error says what is wrong with ``text``."""
        stripped = text.strip()
        if len(stripped) != NODE_ID_TEXT_LENGTH:
            raise BadNodeId(
                f"a NodeId is {NODE_ID_TEXT_LENGTH} base32 characters, got {len(stripped)}"
            )
        try:
            raw = b32decode_untrusted(stripped)
        except BadFrame as exc:
            raise BadNodeId(f"not a NodeId: {exc}") from exc
        if b32encode(raw) != stripped.lower():
            # 256 bits leave 4 spare bits in the last character; only one
            # spelling per NodeId is accepted so that text compares equal.
            raise BadNodeId("not a NodeId: the last character is not a valid ending")
        return cls(raw)

    def __str__(self) -> str:
        return b32encode(self.raw)

    def __repr__(self) -> str:
        return f"NodeId({self.short()})"

    def short(self) -> str:
        """First 10 characters: enough to tell devices apart in logs."""
        return str(self)[:10]

    def verify(self, message: bytes, signature: bytes) -> None:
        """Raise :class:`BadSignature` unless ``signature`` signs ``message``."""
        if len(signature) != SIGNATURE_SIZE:
            raise BadSignature(f"signature is {len(signature)} bytes, expected {SIGNATURE_SIZE}")
        try:
            sodium.crypto_sign_open(signature + message, self.raw)
        except nacl.exceptions.BadSignatureError as exc:
            raise BadSignature(f"signature does not verify for {self.short()}") from exc

    def x25519_public(self) -> bytes:
        """This device's X25519 public key, for boxes sealed to it."""
        return bytes(sodium.crypto_sign_ed25519_pk_to_curve25519(self.raw))


class Identity:
    """A device's private key. Create with :meth:`generate` or :meth:`from_seed`."""

    __slots__ = ("_secret", "node_id")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_SIZE:
            raise BadFrame(f"an identity seed is {SEED_SIZE} bytes, got {len(seed)}")
        public, secret = sodium.crypto_sign_seed_keypair(seed)
        self._secret: bytes = secret
        self.node_id = NodeId(bytes(public))

    @classmethod
    def generate(cls, random_bytes: RandomBytes) -> Identity:
        return cls(random_bytes(SEED_SIZE))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(seed)

    @property
    def seed(self) -> bytes:
        """The 32-byte secret seed. Store it owner-only; never log it."""
        return self._secret[:SEED_SIZE]

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes)."""
        signed: bytes = sodium.crypto_sign(message, self._secret)
        return signed[:SIGNATURE_SIZE]

    def x25519_private(self) -> bytes:
        return bytes(sodium.crypto_sign_ed25519_sk_to_curve25519(self._secret))

    def __repr__(self) -> str:
        return f"Identity({self.node_id.short()}, seed=<hidden>)"


def seal_to(recipient: NodeId, plaintext: bytes) -> bytes:
    """Anonymous sealed box (libsodium ``crypto_box_seal``) to ``recipient``.

    Used once per join to hand the group secret to the new device. The
    ephemeral key comes from libsodium's own CSPRNG inside the call.
    """
    sealed: bytes = sodium.crypto_box_seal(plaintext, recipient.x25519_public())
    return sealed


def open_sealed(identity: Identity, sealed: bytes) -> bytes:
    """Open a box made by :func:`seal_to`; :class:`IntegrityError` if it fails."""
    public = identity.node_id.x25519_public()
    try:
        opened: bytes = sodium.crypto_box_seal_open(sealed, public, identity.x25519_private())
    except (nacl.exceptions.CryptoError, nacl.exceptions.TypeError, ValueError) as exc:
        raise IntegrityError("sealed box did not open: not for us, or tampered") from exc
    return opened
