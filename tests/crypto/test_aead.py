"""XChaCha20-Poly1305: byte-identical to libsodium on both code paths."""

from __future__ import annotations

import os

import blake3
import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync.crypto import aead
from p2psync.crypto.aead import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    DecryptionFailed,
    hchacha20,
    keyed_nonce,
    random_nonce,
    xchacha_decrypt,
    xchacha_encrypt,
)
from p2psync.errors import IntegrityError, LocalProtocolError

KEY = bytes(range(KEY_SIZE))
NONCE = bytes(range(100, 100 + NONCE_SIZE))
THRESHOLD = aead._FAST_PATH_MIN_BYTES
# Sizes that straddle the switch between libsodium and the fast path.
EDGE_SIZES = [0, 1, 63, 64, 65, 1024, THRESHOLD - 1, THRESHOLD, THRESHOLD + 1, 1024 * 1024]


def _bytes(seed: bytes, size: int) -> bytes:
    """Deterministic pseudo-random bytes of any size (cheap for hypothesis)."""
    return blake3.blake3(seed).digest(size)


def _nacl_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


@pytest.fixture(params=["auto", "fast-path-only", "libsodium-only"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the size switch as shipped, and with each path forced."""
    mode: str = request.param
    if mode == "fast-path-only":
        monkeypatch.setattr(aead, "_FAST_PATH_MIN_BYTES", 0)
    elif mode == "libsodium-only":
        monkeypatch.setattr(aead, "_FAST_PATH_MIN_BYTES", 1 << 40)
    return mode


def test_hchacha20_draft_test_vector() -> None:
    # draft-irtf-cfrg-xchacha-03 section 2.2.1.
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expected = bytes.fromhex("82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc")
    assert hchacha20(key, nonce) == expected


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=24, max_size=24), st.binary())
def test_hchacha20_matches_libsodium(key: bytes, nonce: bytes, plaintext: bytes) -> None:
    # PyNaCl does not expose crypto_core_hchacha20, so check it through the
    # definition: XChaCha20-Poly1305(k, n) = ChaCha20-Poly1305-IETF(
    # HChaCha20(k, n[:16]), 0^4 || n[16:]), both sides computed by libsodium.
    subkey = hchacha20(key, nonce[:16])
    ietf = sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
        plaintext, b"", bytes(4) + nonce[16:], subkey
    )
    assert ietf == _nacl_encrypt(key, nonce, plaintext, b"")


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_identical_to_libsodium_at_edge_sizes(path: str, size: int) -> None:
    plaintext = _bytes(b"edge", size)
    aad = b"entry header"
    ciphertext = xchacha_encrypt(KEY, NONCE, plaintext, aad)
    assert len(ciphertext) == size + TAG_SIZE
    assert ciphertext == _nacl_encrypt(KEY, NONCE, plaintext, aad)
    assert xchacha_decrypt(KEY, NONCE, ciphertext, aad) == plaintext


@settings(max_examples=60)
@given(
    key=st.binary(min_size=32, max_size=32),
    nonce=st.binary(min_size=24, max_size=24),
    seed=st.binary(max_size=8),
    size=st.one_of(st.integers(0, 300), st.integers(THRESHOLD - 64, THRESHOLD + 70_000)),
    aad=st.binary(max_size=64),
)
def test_identical_to_libsodium_random(
    key: bytes, nonce: bytes, seed: bytes, size: int, aad: bytes
) -> None:
    plaintext = _bytes(seed, size)
    expected = _nacl_encrypt(key, nonce, plaintext, aad)
    assert xchacha_encrypt(key, nonce, plaintext, aad) == expected
    assert xchacha_decrypt(key, nonce, expected, aad) == plaintext


@pytest.mark.parametrize("size", [100, THRESHOLD + 100])
def test_accepts_bytearray_and_memoryview(size: int) -> None:
    plaintext = _bytes(b"views", size)
    expected = _nacl_encrypt(KEY, NONCE, plaintext, b"")
    assert xchacha_encrypt(KEY, NONCE, bytearray(plaintext)) == expected
    assert xchacha_encrypt(KEY, NONCE, memoryview(plaintext)) == expected
    assert xchacha_decrypt(KEY, NONCE, memoryview(expected)) == plaintext
    assert xchacha_decrypt(KEY, NONCE, bytearray(expected)) == plaintext


def test_tampering_any_byte_fails(path: str) -> None:
    plaintext = b"forty bytes of secret entry metadata...."
    ciphertext = xchacha_encrypt(KEY, NONCE, plaintext, b"aad")
    for index in range(len(ciphertext)):
        for bit in (0x01, 0x80):
            tampered = bytearray(ciphertext)
            tampered[index] ^= bit
            with pytest.raises(DecryptionFailed):
                xchacha_decrypt(KEY, NONCE, bytes(tampered), b"aad")


def test_tampering_a_large_chunk_fails() -> None:
    plaintext = _bytes(b"chunk", 256 * 1024)
    ciphertext = xchacha_encrypt(KEY, NONCE, plaintext)
    for index in (0, 1, len(plaintext) // 2, len(plaintext) - 1, len(ciphertext) - 1):
        tampered = bytearray(ciphertext)
        tampered[index] ^= 0x04
        with pytest.raises(DecryptionFailed):
            xchacha_decrypt(KEY, NONCE, tampered)
    with pytest.raises(DecryptionFailed):
        xchacha_decrypt(KEY, NONCE, ciphertext[:-1])


def test_wrong_key_nonce_or_aad_fails(path: str) -> None:
    ciphertext = xchacha_encrypt(KEY, NONCE, b"payload", b"aad")
    other_key = bytes(reversed(KEY))
    other_nonce = NONCE[:-1] + b"\xff"
    with pytest.raises(DecryptionFailed):
        xchacha_decrypt(other_key, NONCE, ciphertext, b"aad")
    with pytest.raises(DecryptionFailed):
        xchacha_decrypt(KEY, other_nonce, ciphertext, b"aad")
    with pytest.raises(DecryptionFailed):
        xchacha_decrypt(KEY, NONCE, ciphertext, b"aae")
    with pytest.raises(DecryptionFailed):
        xchacha_decrypt(KEY, NONCE, ciphertext)
    # The error is an IntegrityError, as callers catch it.
    with pytest.raises(IntegrityError):
        xchacha_decrypt(KEY, NONCE, ciphertext)


@pytest.mark.parametrize("size", range(TAG_SIZE))
def test_short_input_fails(size: int) -> None:
    with pytest.raises(DecryptionFailed, match="shorter than"):
        xchacha_decrypt(KEY, NONCE, bytes(size))


def test_empty_plaintext_is_just_a_tag() -> None:
    ciphertext = xchacha_encrypt(KEY, NONCE, b"")
    assert len(ciphertext) == TAG_SIZE
    assert xchacha_decrypt(KEY, NONCE, ciphertext) == b""


def test_bad_sizes() -> None:
    with pytest.raises(LocalProtocolError, match="key is 32 bytes"):
        xchacha_encrypt(KEY[:16], NONCE, b"x")
    with pytest.raises(LocalProtocolError, match="nonce is 24 bytes"):
        xchacha_encrypt(KEY, NONCE[:12], b"x")
    with pytest.raises(LocalProtocolError):
        xchacha_decrypt(KEY + b"x", NONCE, bytes(32))
    # The nonce of a decryption comes with the untrusted ciphertext.
    with pytest.raises(DecryptionFailed, match="nonce"):
        xchacha_decrypt(KEY, NONCE[:12], xchacha_encrypt(KEY, NONCE, b"x"))
    with pytest.raises(LocalProtocolError):
        hchacha20(KEY, NONCE)


def test_keyed_nonce_is_keyed_blake3() -> None:
    dedupe_key = bytes(range(1, 33))
    nonce = keyed_nonce(dedupe_key, b"chunk")
    assert len(nonce) == NONCE_SIZE
    assert nonce == blake3.blake3(b"chunk", key=dedupe_key).digest(NONCE_SIZE)
    assert keyed_nonce(dedupe_key, memoryview(b"chunk")) == nonce
    assert keyed_nonce(dedupe_key, b"chunk!") != nonce
    assert keyed_nonce(bytes(32), b"chunk") != nonce


def test_keyed_nonce_gives_identical_ciphertext_for_identical_chunks() -> None:
    dedupe_key = bytes(range(1, 33))
    chunk = _bytes(b"dup", 5000)
    first = xchacha_encrypt(KEY, keyed_nonce(dedupe_key, chunk), chunk)
    second = xchacha_encrypt(KEY, keyed_nonce(dedupe_key, bytes(chunk)), bytes(chunk))
    assert first == second


def test_keyed_nonce_with_aad_is_separated() -> None:
    dedupe_key = bytes(range(1, 33))
    plain = keyed_nonce(dedupe_key, b"chunk")
    with_aad = keyed_nonce(dedupe_key, b"chunk", aad=b"blob-1")
    assert len(with_aad) == NONCE_SIZE
    assert with_aad != plain
    assert keyed_nonce(dedupe_key, b"chunk", aad=b"blob-2") != with_aad
    assert keyed_nonce(dedupe_key, b"chunk", aad=b"blob-1") == with_aad
    # No plaintext can imitate an (aad, plaintext) pair: not by prefixing.
    assert keyed_nonce(dedupe_key, b"blob-1chunk") != with_aad
    # Moving bytes between aad and plaintext changes the nonce.
    assert keyed_nonce(dedupe_key, b"1chunk", aad=b"blob-") != with_aad
    with pytest.raises(LocalProtocolError):
        keyed_nonce(dedupe_key[:16], b"chunk")


def test_random_nonce_uses_injected_randomness() -> None:
    assert random_nonce(lambda n: b"\x07" * n) == b"\x07" * NONCE_SIZE
    assert len(random_nonce(os.urandom)) == NONCE_SIZE
    with pytest.raises(LocalProtocolError):
        random_nonce(lambda n: b"\x07" * (n - 1))
