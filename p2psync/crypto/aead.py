"""XChaCha20-Poly1305: the one AEAD of p2psync, byte-identical to libsodium.

Theory
------
XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03) is ChaCha20-Poly1305 (RFC 8439)
with a 192-bit nonce, which is long enough to pick at random, or to derive
from the plaintext, without counting messages. The construction:

1. ``subkey = HChaCha20(key, nonce[0:16])`` (draft section 2.2): the ChaCha20
   block function without the final feed-forward addition, keeping words
   0..3 and 12..15 of the state.
2. ``ChaCha20-Poly1305-IETF(subkey, nonce12 = 0x00000000 || nonce[16:24])``
   (RFC 8439 section 2.8) over ``plaintext`` and ``aad``.

Output is exactly libsodium's ``crypto_aead_xchacha20poly1305_ietf_encrypt``,
which other clients use to read our blobs. We compute HChaCha20 from the
``cryptography`` package's ChaCha20 keystream (no hand-rolled rounds) and run
step 2 with its ``ChaCha20Poly1305``, which ran about 4x faster than PyNaCl's
XChaCha20 on our machines for 1 MiB chunks. Small messages (entry metadata)
go straight to libsodium instead, where setting up the two cipher objects
would cost more than the encryption. Tests check both paths, and HChaCha20
on its own, against PyNaCl/libsodium and the draft's test vector.

Rules
-----
- This module is the only place that touches a ChaCha or AEAD primitive;
  everything else calls :func:`xchacha_encrypt` / :func:`xchacha_decrypt`.
- A key of the wrong size is a caller bug (:class:`LocalProtocolError`). On
  decryption, every fault in the untrusted input (short ciphertext, wrong
  nonce size, bad tag) raises :class:`DecryptionFailed`, and nothing of the
  plaintext is returned.
- A (key, nonce) pair must never protect two different (plaintext, aad)
  pairs: doing so leaks the XOR of the plaintexts and the Poly1305 one-time
  key (which enables forgeries). Random nonces (:func:`random_nonce`) make
  that negligible (a collision among 2^48 messages has odds 2^-97); :func:`keyed_nonce`
  makes it impossible by construction, see there.
- Randomness is injected (``random_bytes``).

Format
------
::

    ciphertext = encrypted plaintext (same length) || tag (16 bytes)

The nonce (24 bytes) travels beside the ciphertext, in the caller's frame.
"""

from __future__ import annotations

import struct
from typing import Final

import blake3
import nacl.bindings as sodium
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from p2psync.crypto.identity import RandomBytes
from p2psync.errors import IntegrityError, LocalProtocolError

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 24
TAG_SIZE: Final = 16
HCHACHA_NONCE_SIZE: Final = 16

# The ChaCha20 state is 16 little-endian u32 words (RFC 8439 section 2.3):
# 4 constant words, 8 key words, and 4 words of counter || nonce.
_CHACHA_CONSTANTS: Final = struct.unpack("<4I", b"expand 32-byte k")
_WORDS: Final = struct.Struct("<16I")
_HALF_WORDS: Final = struct.Struct("<4I")
_KEY_WORDS: Final = struct.Struct("<8I")
_MASK32: Final = 0xFFFFFFFF
_ZERO_BLOCK: Final = bytes(64)
_IETF_NONCE_PAD: Final = bytes(4)
# Below this size libsodium's one-call XChaCha20-Poly1305 is faster (no
# per-call cipher objects: ~9 us vs ~18 us at 1 KiB); from here on the
# cryptography path wins (~4x at 1 MiB). Both give the same bytes.
_FAST_PATH_MIN_BYTES: Final = 32 * 1024
# BLAKE3 derive_key context for keyed_nonce(..., aad=...) (see there).
_AAD_NONCE_CONTEXT: Final = "p2psync 2026 keyed nonce with aad v1"

Buffer = bytes | bytearray | memoryview


class DecryptionFailed(IntegrityError):
    """The ciphertext, nonce, key or associated data do not match (or it was tampered)."""


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise LocalProtocolError(f"an XChaCha20-Poly1305 key is {KEY_SIZE} bytes, got {len(key)}")


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha-03 section 2.2): a 32-byte subkey.

    ``cryptography``'s ChaCha20 takes a 16-byte "nonce" that fills state
    words 12..15 (the counter and the nonce of RFC 8439), so it runs the
    block function on exactly HChaCha20's input state. One keystream block is
    ``rounds(state) + state`` word by word; subtracting the known input state
    leaves ``rounds(state)``, of which HChaCha20 keeps words 0..3 and 12..15.
    """
    _check_key(key)
    if len(nonce16) != HCHACHA_NONCE_SIZE:
        raise LocalProtocolError(
            f"an HChaCha20 nonce is {HCHACHA_NONCE_SIZE} bytes, got {len(nonce16)}"
        )
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(_ZERO_BLOCK)
    out = _WORDS.unpack(block)
    c0, c1, c2, c3 = _CHACHA_CONSTANTS
    n0, n1, n2, n3 = _HALF_WORDS.unpack(nonce16)
    return _KEY_WORDS.pack(
        (out[0] - c0) & _MASK32,
        (out[1] - c1) & _MASK32,
        (out[2] - c2) & _MASK32,
        (out[3] - c3) & _MASK32,
        (out[12] - n0) & _MASK32,
        (out[13] - n1) & _MASK32,
        (out[14] - n2) & _MASK32,
        (out[15] - n3) & _MASK32,
    )


def _ietf_cipher(key: bytes, nonce: bytes) -> tuple[ChaCha20Poly1305, bytes]:
    """The RFC 8439 AEAD and 12-byte nonce that XChaCha20-Poly1305 reduces to."""
    subkey = hchacha20(key, nonce[:HCHACHA_NONCE_SIZE])
    return ChaCha20Poly1305(subkey), _IETF_NONCE_PAD + nonce[HCHACHA_NONCE_SIZE:]


def xchacha_encrypt(key: bytes, nonce: bytes, plaintext: Buffer, aad: bytes = b"") -> bytes:
    """Encrypt and authenticate: returns ``ciphertext || tag`` (16 bytes longer).

    Byte-identical to libsodium's ``crypto_aead_xchacha20poly1305_ietf_encrypt``.
    ``aad`` is authenticated but not encrypted, and must be given again to
    decrypt.
    """
    _check_key(key)
    if len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"an XChaCha20 nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
    if len(plaintext) < _FAST_PATH_MIN_BYTES:
        return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
            bytes(plaintext), bytes(aad), bytes(nonce), bytes(key)
        )
    cipher, ietf_nonce = _ietf_cipher(key, nonce)
    return cipher.encrypt(ietf_nonce, plaintext, aad)


def xchacha_decrypt(key: bytes, nonce: bytes, ciphertext: Buffer, aad: bytes = b"") -> bytes:
    """Check the tag and decrypt; :class:`DecryptionFailed` if anything is off."""
    _check_key(key)
    if len(nonce) != NONCE_SIZE:
        raise DecryptionFailed(f"nonce is {len(nonce)} bytes, expected {NONCE_SIZE}")
    if len(ciphertext) < TAG_SIZE:
        raise DecryptionFailed(
            f"ciphertext is {len(ciphertext)} bytes, shorter than the {TAG_SIZE}-byte tag"
        )
    try:
        if len(ciphertext) < _FAST_PATH_MIN_BYTES + TAG_SIZE:
            return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(
                bytes(ciphertext), bytes(aad), bytes(nonce), bytes(key)
            )
        cipher, ietf_nonce = _ietf_cipher(key, nonce)
        return cipher.decrypt(ietf_nonce, ciphertext, aad)
    except (InvalidTag, nacl.exceptions.CryptoError) as exc:
        raise DecryptionFailed(
            "decryption failed: wrong key, or the data was corrupted or tampered with"
        ) from exc


def keyed_nonce(dedupe_key: bytes, plaintext: Buffer, *, aad: bytes = b"") -> bytes:
    """Deterministic nonce: keyed BLAKE3 of ``plaintext`` under ``dedupe_key``, 24 bytes.

    Identical chunks inside a group then encrypt to identical ciphertext, so
    they deduplicate and a retried upload is idempotent.

    Why this is safe (it is the SIV idea, RFC 5297, with a PRF for the IV):
    the nonce is a pseudo-random function of the plaintext under a secret
    key, so a nonce repeats only when the plaintext repeats (or on a 192-bit
    collision, 2^-96 after 2^48 chunks). Encrypting the *same* plaintext
    under the same key and nonce produces the *same* ciphertext: nothing
    leaks beyond "these two chunks are equal", which content addressing
    already reveals. Without the key, an observer cannot compute the nonce of
    a guessed plaintext, so the nonce does not confirm guesses.

    The one rule: the nonce must cover everything that is authenticated. If
    the same chunk were encrypted with two different ``aad`` values under one
    nonce, the two tags would share a Poly1305 one-time key and a holder of
    both could forge. So either keep ``aad`` a function of the chunk alone
    (for example empty), or pass the same ``aad`` here:
    a non-empty ``aad`` is mixed in under a separately derived key, which
    keeps those nonces independent of the aad-free ones.
    """
    if len(dedupe_key) != KEY_SIZE:
        raise LocalProtocolError(f"a dedupe key is {KEY_SIZE} bytes, got {len(dedupe_key)}")
    if not aad:
        return blake3.blake3(plaintext, key=dedupe_key).digest(NONCE_SIZE)
    # A different key (not a prefix on the input) separates the two cases:
    # no plaintext alone can collide with a (aad, plaintext) pair.
    aad_key = blake3.blake3(dedupe_key, derive_key_context=_AAD_NONCE_CONTEXT).digest()
    hasher = blake3.blake3(struct.pack(">Q", len(aad)), key=aad_key)
    hasher.update(aad)
    hasher.update(plaintext)
    return hasher.digest(NONCE_SIZE)


def random_nonce(random_bytes: RandomBytes) -> bytes:
    """A fresh random 24-byte nonce (safe to pick at random: 192 bits)."""
    nonce = random_bytes(NONCE_SIZE)
    if len(nonce) != NONCE_SIZE:
        raise LocalProtocolError(f"random_bytes({NONCE_SIZE}) returned {len(nonce)} bytes")
    return nonce
