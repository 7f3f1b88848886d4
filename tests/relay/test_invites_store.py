"""relayd's invite store (pure, ``now`` stepped by hand) and the invites wire format."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.crypto.identity import Identity, NodeId
from p2psync.errors import BadFrame, ConfigError
from p2psync.proto import invites as wire
from p2psync.proto.invites import InviteFailure
from relayd.config import RelaydInvites, config_from_mapping
from relayd.invites import LIMIT_CREATE, LIMIT_FAILED_LOOKUP, InviteStore

OWNER = Identity.from_seed(b"\x01" * 32).node_id
OTHER = Identity.from_seed(b"\x02" * 32).node_id
PROOF = b"\x07" * 32
VERIFIER = blake3.blake3(PROOF).digest()
LIMITS = RelaydInvites()


def _create(
    store: InviteStore,
    now: float,
    lookup_id: bytes = b"L" * 16,
    *,
    ip: str = "198.51.100.1",
    owner: NodeId = OWNER,
    lifetime: int = 600,
) -> wire.Reply:
    request = wire.Create(lookup_id, VERIFIER, b"sealed ticket", lifetime)
    return store.create(owner, ip, request, now).reply


def _fetch(
    store: InviteStore,
    now: float,
    lookup_id: bytes = b"L" * 16,
    proof: bytes = PROOF,
    ip: str = "203.0.113.9",
) -> wire.Reply:
    return store.fetch(ip, wire.Fetch(lookup_id, proof), now).reply


def _code(reply: wire.Reply) -> InviteFailure | None:
    return InviteFailure(reply.code) if isinstance(reply, wire.Failed) else None


def test_single_use_the_first_correct_proof_takes_it() -> None:
    store = InviteStore(LIMITS)
    assert _create(store, 0.0) == wire.Created(600)
    assert len(store) == 1 and store.open_from("198.51.100.1") == 1
    assert _fetch(store, 1.0) == wire.TicketFound(b"sealed ticket")
    assert len(store) == 0 and store.open_from("198.51.100.1") == 0
    second = _fetch(store, 2.0)
    assert _code(second) is InviteFailure.USED
    assert isinstance(second, wire.Failed) and "already used" in second.message
    # The id stays taken while its tombstone lives: a replayed CREATE cannot revive it.
    assert _code(_create(store, 3.0)) is InviteFailure.EXISTS


def test_expiry_is_capped_and_reported() -> None:
    store = InviteStore(dataclasses.replace(LIMITS, max_lifetime_s=600))
    assert _create(store, 0.0, lifetime=86_400) == wire.Created(600)  # capped
    assert _create(store, 0.0, b"M" * 16, lifetime=30) == wire.Created(30)
    assert _code(_fetch(store, 30.0, b"M" * 16)) is InviteFailure.EXPIRED
    assert _fetch(store, 599.0) == wire.TicketFound(b"sealed ticket")
    _create(store, 1000.0, b"N" * 16)
    assert _code(_fetch(store, 1600.0, b"N" * 16)) is InviteFailure.EXPIRED
    assert len(store) == 0
    # Tombstones go after another lifetime: then it is just unknown.
    assert _code(_fetch(store, 2300.0, b"N" * 16)) is InviteFailure.NOT_FOUND


def test_only_the_creator_revokes() -> None:
    store = InviteStore(LIMITS)
    _create(store, 0.0)
    refused = store.revoke(OTHER, wire.Revoke(b"L" * 16), 1.0)
    assert _code(refused.reply) is InviteFailure.NOT_FOUND  # says nothing to others
    assert len(store) == 1
    assert store.revoke(OWNER, wire.Revoke(b"L" * 16), 2.0).reply == wire.Revoked()
    assert _code(_fetch(store, 3.0)) is InviteFailure.REVOKED
    # The owner revoking again learns why it is gone (here: revoked).
    assert _code(store.revoke(OWNER, wire.Revoke(b"L" * 16), 4.0).reply) is InviteFailure.REVOKED


def test_wrong_proofs_count_down_then_burn() -> None:
    store = InviteStore(LIMITS)
    _create(store, 0.0)
    first = _fetch(store, 1.0, proof=b"\x00" * 32)
    assert isinstance(first, wire.Failed) and first.code == InviteFailure.WRONG_CODE
    assert first.tries_left == 2
    second = _fetch(store, 2.0, proof=b"\x01" * 32)
    assert isinstance(second, wire.Failed) and second.tries_left == 1
    assert _code(_fetch(store, 3.0, proof=b"\x02" * 32)) is InviteFailure.BURNED
    assert len(store) == 0
    assert _code(_fetch(store, 4.0, ip="192.0.2.77")) is InviteFailure.BURNED  # even right now


def test_brute_force_of_lookup_ids_is_held_to_the_failed_lookup_limit() -> None:
    """One address guessing lookup ids (and proofs) for a code's whole 10-minute life
    gets at most burst + rate * 600 answers that can be wrong; every other request
    is refused as rate-limited without looking anything up."""
    limits = LIMITS
    store = InviteStore(limits)
    rng = random.Random(7)
    for index in range(200):  # a busy relay: 200 open invites from many inviters
        request = wire.Create(rng.randbytes(16), VERIFIER, b"x", 600)
        assert isinstance(store.create(OWNER, f"10.0.{index // 200}.{index % 200}", request, 0.0)
                          .reply, wire.Created)  # fmt: skip
    attacker = "203.0.113.66"
    answered = refused = found = 0
    now = 0.0
    while now < 600.0:
        outcome = store.fetch(attacker, wire.Fetch(rng.randbytes(16), rng.randbytes(32)), now)
        if outcome.limit is not None:
            assert outcome.limit == LIMIT_FAILED_LOOKUP
            assert isinstance(outcome.reply, wire.Failed) and outcome.reply.retry_after
            refused += 1
        else:
            answered += 1
            found += isinstance(outcome.reply, wire.TicketFound)
        now += 0.05  # 20 guesses a second
    bound = limits.failed_lookup_per_ip_burst + limits.failed_lookup_per_ip_rate * 600.0
    assert answered <= bound, (answered, bound)
    assert answered >= limits.failed_lookup_per_ip_burst  # the limit, not a bug, stops it
    assert refused >= 11_000 and found == 0
    # An honest joiner elsewhere is unaffected, and still gets its ticket.
    _create(store, now, b"H" * 16)
    assert _fetch(store, now, b"H" * 16, ip="192.0.2.5") == wire.TicketFound(b"sealed ticket")


def test_creation_is_rate_limited_and_bounded_per_ip_and_in_total() -> None:
    limits = dataclasses.replace(LIMITS, max_per_ip=3, max_stored=5)
    store = InviteStore(limits)
    ip = "198.51.100.20"
    for n in range(3):
        assert isinstance(_create(store, 0.0, bytes([n]) * 16, ip=ip), wire.Created)
    full = store.create(OWNER, ip, wire.Create(b"\x09" * 16, VERIFIER, b"x", 600), 0.0)
    assert _code(full.reply) is InviteFailure.FULL and "3 open invites" in full.reply.message  # type: ignore[union-attr]
    for n in range(2):
        assert isinstance(
            _create(store, 0.0, bytes([10 + n]) * 16, ip=f"192.0.2.{n}"), wire.Created
        )
    assert _code(_create(store, 0.0, b"\x20" * 16, ip="192.0.2.99")) is InviteFailure.FULL
    # The creation bucket: burst, then rate.
    spammer = "203.0.113.200"
    bucket_store = InviteStore(dataclasses.replace(LIMITS, max_per_ip=1000, max_stored=1000))
    results = [
        bucket_store.create(OWNER, spammer, wire.Create(os.urandom(16), VERIFIER, b"x", 60), 0.0)
        for _ in range(limits.create_per_ip_burst + 5)
    ]
    limited = [r for r in results if r.limit == LIMIT_CREATE]
    assert len(limited) == 5
    later = bucket_store.create(
        OWNER,
        spammer,
        wire.Create(os.urandom(16), VERIFIER, b"x", 60),
        1 / limits.create_per_ip_rate,
    )
    assert isinstance(later.reply, wire.Created)


def test_ipv6_sources_are_limited_by_their_prefix_and_ipv4_per_address() -> None:
    """A guesser with a /64 gets no more failed lookups than one with a single
    address, whichever addresses it picks; other /64s and IPv4 hosts are apart."""
    store = InviteStore(LIMITS)
    burst = LIMITS.failed_lookup_per_ip_burst

    def guess(ip: str) -> str | None:
        return store.fetch(ip, wire.Fetch(os.urandom(16), PROOF), 0.0).limit

    host = int(ipaddress.IPv6Address("2001:db8:1:2::"))
    picks = [str(ipaddress.IPv6Address(host + n * 0x1_0000_0001)) for n in range(burst + 3)]
    attempts = [guess(ip) for ip in picks]
    assert attempts == [None] * burst + [LIMIT_FAILED_LOOKUP] * 3  # one /64: one budget
    assert guess("2001:db8:1:3::1") is None  # the neighbouring /64 is another source
    assert [guess("198.51.100.7") for _ in range(burst + 1)][-2:] == [None, LIMIT_FAILED_LOOKUP]
    assert guess("::ffff:198.51.100.7") == LIMIT_FAILED_LOOKUP  # mapped: the same IPv4
    assert guess("198.51.100.8") is None  # IPv4: each address its own
    # Open invites per creating address count the prefix too.
    limits = dataclasses.replace(LIMITS, max_per_ip=2)
    creating = InviteStore(limits)
    assert isinstance(_create(creating, 0.0, b"a" * 16, ip="2001:db8:5:6::1"), wire.Created)
    assert isinstance(_create(creating, 0.0, b"b" * 16, ip="2001:db8:5:6::2"), wire.Created)
    assert _code(_create(creating, 0.0, b"c" * 16, ip="2001:db8:5:6:a::3")) is InviteFailure.FULL
    assert creating.open_from("2001:db8:5:6::99") == 2


def test_the_ipv6_prefix_is_configurable() -> None:
    config = config_from_mapping({"invites": {"ipv6_prefix": 48}})
    assert config.invites.ipv6_prefix == 48 and LIMITS.ipv6_prefix == 64
    store = InviteStore(config.invites)
    burst = LIMITS.failed_lookup_per_ip_burst
    for n in range(burst):  # a different /64 each time, all in one /48
        assert (
            store.fetch(f"2001:db8:7:{n}::1", wire.Fetch(os.urandom(16), PROOF), 0.0).limit is None
        )
    refused = store.fetch("2001:db8:7:ff::1", wire.Fetch(os.urandom(16), PROOF), 0.0)
    assert refused.limit == LIMIT_FAILED_LOOKUP
    for bad in (0, 129, True, "64"):
        with pytest.raises(ConfigError, match="ipv6_prefix"):
            config_from_mapping({"invites": {"ipv6_prefix": bad}})


def test_tombstones_are_bounded() -> None:
    store = InviteStore(dataclasses.replace(LIMITS, max_stored=4, max_per_ip=100))
    for n in range(20):
        lookup_id = n.to_bytes(16, "big")
        _create(store, float(n), lookup_id, ip=f"10.1.0.{n}")
        assert _fetch(store, float(n), lookup_id, ip=f"10.2.0.{n}") == wire.TicketFound(
            b"sealed ticket"
        )
    assert len(store._tombstones) == 4


# --- wire ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        wire.Create(b"L" * 16, b"V" * 32, b"s" * wire.MAX_SEALED_SIZE, 600),
        wire.Fetch(b"L" * 16, b"P" * 32),
        wire.Revoke(b"L" * 16),
    ],
)
def test_requests_round_trip(message: wire.Request) -> None:
    body = wire.encode_request(message)
    assert len(body) <= wire.MAX_FRAME
    assert wire.decode_request_untrusted(body) == message


@pytest.mark.parametrize(
    "message",
    [
        wire.Created(600),
        wire.TicketFound(b"sealed"),
        wire.Revoked(),
        wire.Failed(int(InviteFailure.WRONG_CODE), "wrong", tries_left=2),
        wire.Failed(int(InviteFailure.RATE_LIMITED), "slow down", retry_after=60),
    ],
)
def test_replies_round_trip(message: wire.Reply) -> None:
    assert wire.decode_reply_untrusted(wire.encode_reply(message)) == message


def test_requests_that_break_the_rules_are_bad_frames() -> None:
    from p2psync.proto.codec import pack

    for body in (
        pack([1, b"short", b"V" * 32, b"s", 600]),
        pack([1, b"L" * 16, b"V" * 32, b"s" * (wire.MAX_SEALED_SIZE + 1), 600]),
        pack([1, b"L" * 16, b"V" * 32, b"s", 0]),
        pack([2, b"L" * 16]),
        pack([99]),
        pack([]),
        b"\xff" * (wire.MAX_FRAME + 1),
    ):
        with pytest.raises(BadFrame):
            wire.decode_request_untrusted(body)


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    for decode in (wire.decode_request_untrusted, wire.decode_reply_untrusted):
        try:
            decode(data)
        except BadFrame:
            pass
