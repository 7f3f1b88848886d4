"""All of p2psync's cryptography, behind one small typed API.

Nothing outside this package touches a primitive; no primitive is hand-rolled
(libsodium via PyNaCl, OpenSSL via ``cryptography``, BLAKE3, Argon2's
reference implementation). Randomness is always injected as
``random_bytes: Callable[[int], bytes]``; nothing here reads ``os.urandom``.

Keys and what they are for
--------------------------
========================  ====================================================
Device identity           Ed25519 key pair (:class:`Identity`); its public key
                          is the :class:`NodeId` (52 lowercase base32 chars).
                          Signs handshakes and entries; as X25519 it receives
                          sealed boxes (:func:`seal_to` / :func:`open_sealed`),
                          e.g. the group secret for a joining device.
Group secret              32 random bytes per key epoch (:class:`GroupSecret`);
                          serialised as ``u8 1 | u32be epoch | secret``.
Group keys                :class:`GroupKeys`, all from the group secret with
                          BLAKE3 derive_key and one context per purpose:
  ``group_id``            public routing id, from the secret alone (stable
                          across epochs of the same secret).
  ``blob_key``            XChaCha20-Poly1305 key of blob chunks.
  ``meta_key``            XChaCha20-Poly1305 key of entry metadata.
  ``index_key``           blinds index keys.
  ``membership_key``      :func:`membership_mac` over the handshake transcript.
  ``mdns_tag_key``        :func:`mdns_tag`, rotating LAN discovery tags.
  ``dedupe_key``          :func:`keyed_nonce`: deterministic chunk nonces.
  ``invite_key``          invitation and join codes.
Passphrase keys           Argon2id with stored :class:`KdfParams`
                          (:func:`new_params`, :func:`derive_key`).
========================  ====================================================

Formats
-------
- AEAD (:func:`xchacha_encrypt`): libsodium's XChaCha20-Poly1305-IETF,
  ``ciphertext || 16-byte tag``, 24-byte nonce carried by the caller.
- Codes (:func:`encode_code`): ``prefix || base32(payload || 40-bit checksum)``;
  short codes (:func:`format_short_code`): ``XXXX-XXXX-XXXX-XXXX``, 80 bits
  in Crockford base32, checked by the MAC or AEAD they unlock.

Errors: parsers raise :class:`BadFrame` subclasses (:class:`BadNodeId`,
:class:`BadCode`); failed checks raise :class:`IntegrityError` subclasses
(:class:`BadSignature`, :class:`DecryptionFailed`).
"""

from __future__ import annotations

from p2psync.crypto.aead import (
    DecryptionFailed,
    keyed_nonce,
    random_nonce,
    xchacha_decrypt,
    xchacha_encrypt,
)
from p2psync.crypto.codes import (
    BadCode,
    decode_code_untrusted,
    encode_code,
    format_short_code,
    parse_short_code_untrusted,
)
from p2psync.crypto.group import (
    GroupKeys,
    GroupSecret,
    group_id_text,
    mdns_tag,
    membership_mac,
    verify_membership_mac,
)
from p2psync.crypto.identity import (
    BadNodeId,
    BadSignature,
    Identity,
    NodeId,
    RandomBytes,
    open_sealed,
    seal_to,
)
from p2psync.crypto.passphrase import KdfParams, derive_key, new_params

__all__ = [
    "BadCode",
    "BadNodeId",
    "BadSignature",
    "DecryptionFailed",
    "GroupKeys",
    "GroupSecret",
    "Identity",
    "KdfParams",
    "NodeId",
    "RandomBytes",
    "decode_code_untrusted",
    "derive_key",
    "encode_code",
    "format_short_code",
    "group_id_text",
    "keyed_nonce",
    "mdns_tag",
    "membership_mac",
    "new_params",
    "open_sealed",
    "parse_short_code_untrusted",
    "random_nonce",
    "seal_to",
    "verify_membership_mac",
    "xchacha_decrypt",
    "xchacha_encrypt",
]
