"""Device identity: NodeId text, parsing errors, signatures, sealed boxes."""

from __future__ import annotations

import os

import nacl.public
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.crypto.identity import (
    NODE_ID_TEXT_LENGTH,
    BadNodeId,
    BadSignature,
    Identity,
    NodeId,
    b32decode_untrusted,
    b32encode,
    open_sealed,
    seal_to,
)
from p2psync.errors import BadFrame, IntegrityError

SEED_A = bytes(range(32))
SEED_B = bytes(range(32, 64))

# Curve25519 in Edwards form (RFC 8032 section 5.1).
P = 2**255 - 19
D = (-121665 * pow(121666, P - 2, P)) % P


def _is_on_curve(y: int) -> bool:
    """True if some x satisfies -x^2 + y^2 = 1 + d x^2 y^2 (Euler's criterion)."""
    x2 = (y * y - 1) * pow(D * y * y + 1, P - 2, P) % P
    return x2 == 0 or pow(x2, (P - 1) // 2, P) == 1


def test_node_id_text_round_trip_known_seed() -> None:
    node_id = Identity.from_seed(SEED_A).node_id
    text = str(node_id)
    assert len(text) == NODE_ID_TEXT_LENGTH
    assert text == text.lower()
    assert NodeId.parse(text) == node_id
    assert NodeId.parse(f"  {text.upper()}\n") == node_id


@given(st.binary(min_size=32, max_size=32))
def test_node_id_text_round_trip_any_seed(seed: bytes) -> None:
    node_id = Identity.from_seed(seed).node_id
    assert NodeId.parse(str(node_id)) == node_id
    assert b32decode_untrusted(b32encode(node_id.raw)) == node_id.raw


@pytest.mark.parametrize("delta", [-1, 1])
def test_parse_rejects_wrong_length(delta: int) -> None:
    text = str(Identity.from_seed(SEED_A).node_id)
    wrong = text[:delta] if delta < 0 else text + "a"
    with pytest.raises(BadNodeId, match="52 base32 characters"):
        NodeId.parse(wrong)


@pytest.mark.parametrize("bad_char", ["1", "0", "8", "9", "=", "é", " "])
def test_parse_rejects_bad_alphabet(bad_char: str) -> None:
    text = str(Identity.from_seed(SEED_A).node_id)
    wrong = text[:10] + bad_char + text[11:]
    with pytest.raises(BadNodeId, match="position 11"):
        NodeId.parse(wrong)


def test_parse_rejects_non_canonical_last_character() -> None:
    text = str(Identity.from_seed(SEED_A).node_id)
    # The last character carries 1 data bit and 4 zero bits; setting a zero
    # bit spells the same bytes differently, which must be refused.
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    last = alphabet.index(text[-1])
    other = alphabet[last | 0b00001]
    assert other != text[-1]
    with pytest.raises(BadNodeId, match="last character"):
        NodeId.parse(text[:-1] + other)


def test_rejects_bytes_that_are_not_a_curve_point() -> None:
    y = next(y for y in range(2, 100) if not _is_on_curve(y))
    raw = y.to_bytes(32, "little")
    with pytest.raises(BadNodeId, match="not a valid Ed25519 public key"):
        NodeId(raw)
    with pytest.raises(BadNodeId, match="not a valid Ed25519 public key"):
        NodeId.parse(b32encode(raw))


def test_rejects_small_order_point_and_wrong_size() -> None:
    # y = 0 is on the curve but has order 4: no honest key looks like that.
    assert _is_on_curve(0)
    with pytest.raises(BadNodeId):
        NodeId(bytes(32))
    with pytest.raises(BadNodeId, match="32 bytes"):
        NodeId(bytes(31))


def test_sign_verify_and_tamper() -> None:
    alice = Identity.from_seed(SEED_A)
    bob = Identity.from_seed(SEED_B)
    message = b"hello, group"
    signature = alice.sign(message)
    assert len(signature) == 64
    alice.node_id.verify(message, signature)

    with pytest.raises(BadSignature):
        alice.node_id.verify(message + b"!", signature)
    with pytest.raises(BadSignature):
        bob.node_id.verify(message, signature)
    for index in (0, 31, 32, 63):
        tampered = bytearray(signature)
        tampered[index] ^= 0x01
        with pytest.raises(BadSignature):
            alice.node_id.verify(message, bytes(tampered))
    with pytest.raises(BadSignature, match="expected 64"):
        alice.node_id.verify(message, signature[:-1])


def test_identity_is_deterministic_and_hides_seed() -> None:
    first = Identity.from_seed(SEED_A)
    assert Identity.from_seed(SEED_A).node_id == first.node_id
    assert first.seed == SEED_A
    assert Identity.generate(lambda n: SEED_A[:n]).node_id == first.node_id
    assert SEED_A.hex() not in repr(first)
    assert "hidden" in repr(first)
    with pytest.raises(BadFrame):
        Identity.from_seed(SEED_A[:31])


def test_seal_open_round_trip_and_failures() -> None:
    alice = Identity.from_seed(SEED_A)
    bob = Identity.from_seed(SEED_B)
    sealed = seal_to(bob.node_id, b"group secret")
    assert open_sealed(bob, sealed) == b"group secret"
    with pytest.raises(IntegrityError):
        open_sealed(alice, sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 0x80
    with pytest.raises(IntegrityError):
        open_sealed(bob, bytes(tampered))
    with pytest.raises(IntegrityError):
        open_sealed(bob, sealed[:10])


def test_x25519_keys_agree_with_nacl_public() -> None:
    alice = Identity.generate(os.urandom)
    bob = Identity.generate(os.urandom)
    alice_private = nacl.public.PrivateKey(alice.x25519_private())
    bob_private = nacl.public.PrivateKey(bob.x25519_private())
    assert alice_private.public_key.encode() == alice.node_id.x25519_public()
    assert bob_private.public_key.encode() == bob.node_id.x25519_public()

    # A box from Alice to Bob, made only from NodeIds and private keys.
    to_bob = nacl.public.Box(alice_private, nacl.public.PublicKey(bob.node_id.x25519_public()))
    from_alice = nacl.public.Box(bob_private, nacl.public.PublicKey(alice.node_id.x25519_public()))
    assert from_alice.decrypt(to_bob.encrypt(b"hi")) == b"hi"

    # Our sealed boxes are libsodium's: PyNaCl's SealedBox opens them.
    assert nacl.public.SealedBox(bob_private).decrypt(seal_to(bob.node_id, b"x")) == b"x"
