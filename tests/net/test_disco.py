"""Disco codec and sealing, sans-IO: seal/open, tamper, replay, wrong key, junk."""

from __future__ import annotations

import random

import nacl.bindings as sodium
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.crypto.identity import Identity
from p2psync.errors import LocalProtocolError
from p2psync.net.disco import (
    HEADER_SIZE,
    MAGIC,
    MAX_CANDIDATES,
    MAX_DISCO_SIZE,
    BadDisco,
    CallMeMaybe,
    Candidate,
    CandidateKind,
    Disco,
    Ping,
    Pong,
    decode_address_untrusted,
    encode_address,
    is_disco,
)
from p2psync.net.netcheck import NatKind


def seeded_random(seed: int) -> random.Random:
    return random.Random(seed)


def make(seed: int) -> tuple[Identity, Disco]:
    rng = seeded_random(seed)
    identity = Identity.from_seed(rng.randbytes(32))
    return identity, Disco(identity, rng.randbytes)


def test_ping_round_trip() -> None:
    alice, alice_disco = make(1)
    bob, bob_disco = make(2)
    tx_id = alice_disco.new_tx_id()
    wire = alice_disco.seal_ping(bob.node_id, tx_id)
    assert wire.startswith(MAGIC)
    assert is_disco(wire)
    message = bob_disco.open_untrusted(wire)
    assert message == Ping(sender=alice.node_id, tx_id=tx_id)
    assert bob_disco.counters.opened == 1


@pytest.mark.parametrize("observed", [("192.0.2.7", 41641), ("2001:db8::1", 1), ("::1", 65535)])
def test_pong_round_trip_carries_observed_address(observed: tuple[str, int]) -> None:
    alice, alice_disco = make(1)
    assert alice_disco.our_node_id == alice.node_id
    bob, bob_disco = make(2)
    wire = bob_disco.seal_pong(alice.node_id, b"t" * 12, observed)
    message = alice_disco.open_untrusted(wire)
    assert message == Pong(sender=bob.node_id, tx_id=b"t" * 12, observed=observed)


def test_every_tampered_byte_is_rejected() -> None:
    _, alice_disco = make(1)
    bob, bob_disco = make(2)
    wire = alice_disco.seal_ping(bob.node_id, b"x" * 12)
    for index in range(len(MAGIC), len(wire)):
        tampered = bytearray(wire)
        tampered[index] ^= 0x01
        with pytest.raises(BadDisco):
            bob_disco.open_untrusted(bytes(tampered))
    assert bob_disco.counters.opened == 0
    assert bob_disco.counters.bad_box + bob_disco.counters.malformed == len(wire) - len(MAGIC)
    # The untampered original still opens: failures did not poison any state.
    assert isinstance(bob_disco.open_untrusted(wire), Ping)


def test_replay_is_dropped_and_counted() -> None:
    _, alice_disco = make(1)
    bob, bob_disco = make(2)
    wire = alice_disco.seal_ping(bob.node_id, b"r" * 12)
    bob_disco.open_untrusted(wire)
    with pytest.raises(BadDisco, match="replayed"):
        bob_disco.open_untrusted(wire)
    assert bob_disco.counters.replayed == 1


def test_replay_window_is_bounded() -> None:
    alice, _ = make(1)
    bob, _ = make(2)
    rng = seeded_random(3)
    alice_disco = Disco(alice, rng.randbytes)
    bob_disco = Disco(bob, rng.randbytes, replay_window=4)
    first = alice_disco.seal_ping(bob.node_id, b"a" * 12)
    bob_disco.open_untrusted(first)
    for _ in range(4):
        bob_disco.open_untrusted(alice_disco.seal_ping(bob.node_id, b"b" * 12))
    # Evicted from the window of 4: accepted again (the table stays bounded).
    assert isinstance(bob_disco.open_untrusted(first), Ping)
    assert len(bob_disco._seen_nonces) == 4


def test_box_for_someone_else_does_not_open() -> None:
    _, alice_disco = make(1)
    bob, _ = make(2)
    _, carol_disco = make(3)
    wire = alice_disco.seal_ping(bob.node_id, b"w" * 12)
    with pytest.raises(BadDisco, match="did not open"):
        carol_disco.open_untrusted(wire)
    assert carol_disco.counters.bad_box == 1


def test_forged_sender_does_not_open() -> None:
    _, alice_disco = make(1)
    bob, bob_disco = make(2)
    mallory, _ = make(4)
    wire = alice_disco.seal_ping(bob.node_id, b"f" * 12)
    forged = MAGIC + mallory.node_id.raw + wire[len(MAGIC) + 32 :]
    with pytest.raises(BadDisco):
        bob_disco.open_untrusted(forged)
    assert bob_disco.counters.bad_box == 1


def test_unknown_type_is_dropped_and_counted() -> None:
    alice, _ = make(1)
    bob, bob_disco = make(2)
    nonce = b"n" * 24
    boxed = sodium.crypto_box(
        bytes([0x7F]) + b"u" * 12, nonce, bob.node_id.x25519_public(), alice.x25519_private()
    )
    wire = MAGIC + alice.node_id.raw + nonce + boxed
    with pytest.raises(BadDisco, match="unknown disco message type"):
        bob_disco.open_untrusted(wire)
    assert bob_disco.counters.unknown_type == 1


def test_message_from_ourselves_is_dropped() -> None:
    alice, alice_disco = make(1)
    wire = alice_disco.seal_ping(alice.node_id, b"s" * 12)
    with pytest.raises(BadDisco, match="ourselves"):
        alice_disco.open_untrusted(wire)
    assert alice_disco.counters.from_self == 1


def test_demultiplexing_rule() -> None:
    # Disco's first byte has the QUIC Fixed Bit (0x40) clear and is not STUN (00xxxxxx).
    assert MAGIC[0] & 0x40 == 0
    assert MAGIC[0] & 0xC0 == 0x80
    # Not a QUIC Version Negotiation packet: bytes 1..5 would be version 0.
    assert MAGIC[1:5] != b"\x00\x00\x00\x00"
    assert not is_disco(b"\xc3" + b"\x00" * 40)  # QUIC long header
    assert not is_disco(b"\x41" + b"\x00" * 40)  # QUIC short header
    assert not is_disco(b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 12)  # STUN


def test_address_codec_round_trip_and_rejects_junk() -> None:
    for address in [("10.0.0.1", 0), ("fe80::1", 443)]:
        assert decode_address_untrusted(encode_address(address)) == address
    for junk in [b"", b"\x05\x01\x02", b"\x04\x01\x02\x03", b"\x06" + b"\x00" * 17]:
        with pytest.raises(BadDisco):
            decode_address_untrusted(junk)


@given(st.binary(max_size=200))
def test_any_bytes_raise_only_bad_disco(data: bytes) -> None:
    _, disco = make(5)
    for candidate in (data, MAGIC + data):
        try:
            disco.open_untrusted(candidate)
        except BadDisco:
            pass


def test_header_size_is_what_the_docstring_says() -> None:
    assert HEADER_SIZE == 6 + 32 + 24


# -- CALL_ME_MAYBE -------------------------------------------------------------------------


def boxed(sender: Identity, to: Identity, plaintext: bytes, nonce: bytes = b"c" * 24) -> bytes:
    box = sodium.crypto_box(plaintext, nonce, to.node_id.x25519_public(), sender.x25519_private())
    return MAGIC + sender.node_id.raw + nonce + box


@pytest.mark.parametrize("nat", list(NatKind))
def test_call_me_maybe_round_trip_carries_candidates_and_nat_kind(nat: NatKind) -> None:
    alice, alice_disco = make(1)
    bob, bob_disco = make(2)
    candidates = (
        Candidate(("10.0.0.2", 47300), CandidateKind.LOCAL),
        Candidate(("fd00::2", 47300), CandidateKind.LOCAL),
        Candidate(("203.0.113.7", 51234), CandidateKind.REFLEXIVE),
    )
    wire = alice_disco.seal_call_me_maybe(bob.node_id, nat, candidates)
    message = bob_disco.open_untrusted(wire)
    assert isinstance(message, CallMeMaybe)
    assert (message.sender, message.nat, message.candidates) == (alice.node_id, nat, candidates)
    assert len(message.tx_id) == 12


def test_call_me_maybe_with_no_or_the_most_candidates() -> None:
    _, alice_disco = make(1)
    bob, bob_disco = make(2)
    empty = bob_disco.open_untrusted(alice_disco.seal_call_me_maybe(bob.node_id, NatKind.HARD, ()))
    assert isinstance(empty, CallMeMaybe) and empty.candidates == ()
    most = [Candidate((f"2001:db8::{i + 1}", 1000 + i), CandidateKind.LOCAL) for i in range(16)]
    wire = alice_disco.seal_call_me_maybe(bob.node_id, NatKind.EASY, most)
    assert len(wire) == MAX_DISCO_SIZE  # the largest message there is
    full = bob_disco.open_untrusted(wire)
    assert isinstance(full, CallMeMaybe) and list(full.candidates) == most
    with pytest.raises(LocalProtocolError, match="at most 16"):
        alice_disco.seal_call_me_maybe(bob.node_id, NatKind.EASY, [*most, most[0]])


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", "without NAT kind"),
        (b"\x02", "without NAT kind"),
        (bytes([2, MAX_CANDIDATES + 1]), "candidates"),
        (bytes([2, 1]), "truncated"),
        (bytes([2, 1, 9, 4, 10, 0, 0, 1, 0, 80]), "unknown candidate kind"),
        (bytes([2, 1, 1, 5, 10, 0, 0, 1, 0, 80]), "unknown address family"),
        (bytes([2, 1, 1, 4, 10, 0, 0, 1, 0]), "truncated"),
        (bytes([2, 1, 1, 4, 10, 0, 0, 1, 0, 80, 0]), "stray bytes"),
        (bytes([2, 2, 1, 4, 10, 0, 0, 1, 0, 80]), "truncated"),
    ],
)
def test_malformed_call_me_maybe_is_dropped_and_counted(body: bytes, error: str) -> None:
    alice, _ = make(1)
    bob, bob_disco = make(2)
    with pytest.raises(BadDisco, match=error):
        bob_disco.open_untrusted(boxed(alice, bob, bytes([0x03]) + b"t" * 12 + body))
    assert bob_disco.counters.malformed == 1
    assert bob_disco.counters.opened == 0


def test_unknown_nat_code_reads_as_unknown() -> None:
    alice, _ = make(1)
    bob, bob_disco = make(2)
    message = bob_disco.open_untrusted(boxed(alice, bob, bytes([0x03]) + b"t" * 12 + b"\x63\x00"))
    assert isinstance(message, CallMeMaybe) and message.nat is NatKind.UNKNOWN


@given(st.binary(max_size=400))
def test_any_call_me_maybe_body_raises_only_bad_disco(body: bytes) -> None:
    alice, _ = make(1)
    bob, bob_disco = make(2)
    try:
        message = bob_disco.open_untrusted(boxed(alice, bob, bytes([0x03]) + b"t" * 12 + body))
    except BadDisco:
        return
    assert isinstance(message, CallMeMaybe)
    assert len(message.candidates) <= MAX_CANDIDATES
