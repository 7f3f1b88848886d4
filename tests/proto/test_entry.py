"""Signed entries: encoding, verification with precise reasons, the HLC."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.crypto.identity import Identity
from p2psync.errors import BadFrame
from p2psync.proto.codec import pack, unpack_canonical_untrusted, unpack_untrusted
from p2psync.proto.entry import (
    Entry,
    EntryRejected,
    FeedTip,
    HybridClock,
    Kind,
    check_entry_signature,
    decode_entry_untrusted,
    hlc_counter,
    hlc_to_ms,
    sign_entry,
    signatures_valid,
    signed_bytes_of_encoding,
    verify_entry,
)

GROUP = bytes(range(32))
NOW_MS = 1_790_000_000_000
AUTHOR = Identity.from_seed(b"\x07" * 32)


def make(seq: int = 1, prev: bytes = b"", kind: Kind = Kind.PUT, **over: object) -> Entry:
    fields: dict[str, object] = dict(
        group_id=GROUP,
        seq=seq,
        prev=prev,
        hlc=NOW_MS << 16,
        kind=kind,
        blob=b"\x01" * 32 if kind is Kind.PUT else b"",
        size=5 if kind is Kind.PUT else 0,
        meta=b"sealed-meta",
    )
    fields.update(over)
    return sign_entry(AUTHOR, **fields)  # type: ignore[arg-type]


def test_round_trip_and_id_is_stable() -> None:
    entry = make()
    decoded = decode_entry_untrusted(entry.encode())
    assert decoded == entry
    assert decoded.entry_id == entry.entry_id
    verify_entry(decoded, group_id=GROUP, previous=None, now_ms=NOW_MS)


def test_chain_of_three_verifies() -> None:
    first = make()
    second = make(seq=2, prev=first.entry_id, kind=Kind.DELETE)
    tip = FeedTip(first.seq, first.entry_id)
    verify_entry(second, group_id=GROUP, previous=tip, now_ms=NOW_MS)


@pytest.mark.parametrize(
    ("entry_factory", "previous", "reason"),
    [
        (lambda: make(group_id=b"\x09" * 32), None, "wrong-group"),
        (lambda: make(seq=3, prev=b"\x02" * 32), FeedTip(1, b"\x02" * 32), "seq-gap"),
        (lambda: make(seq=2, prev=b"\x02" * 32), FeedTip(1, b"\x03" * 32), "prev-mismatch"),
        (lambda: make(hlc=(NOW_MS + 2 * 86_400_000) << 16), None, "clock-skew"),
        (lambda: make(seq=2, prev=b"\x02" * 32), None, "seq-gap"),
    ],
)
def test_rejections_name_their_reason(entry_factory, previous, reason) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(EntryRejected) as info:
        verify_entry(entry_factory(), group_id=GROUP, previous=previous, now_ms=NOW_MS)
    assert info.value.reason == reason


def test_flipped_signature_byte_is_rejected() -> None:
    entry = make()
    raw = bytearray(entry.encode())
    raw[-1] ^= 0x01  # last byte of the signature
    tampered = decode_entry_untrusted(bytes(raw))
    with pytest.raises(EntryRejected) as info:
        verify_entry(tampered, group_id=GROUP, previous=None, now_ms=NOW_MS)
    assert info.value.reason == "bad-signature"


def test_every_single_byte_flip_is_detected() -> None:
    entry = make()
    raw = entry.encode()
    for position in range(len(raw)):
        tampered = bytearray(raw)
        tampered[position] ^= 0x40
        try:
            decoded = decode_entry_untrusted(bytes(tampered))
            verify_entry(decoded, group_id=GROUP, previous=None, now_ms=NOW_MS)
        except (BadFrame, EntryRejected):
            continue
        pytest.fail(f"flipping byte {position} went undetected")


@given(
    seq=st.integers(min_value=1, max_value=2**63 - 1),
    hlc=st.integers(min_value=0, max_value=2**64 - 1),
    meta=st.binary(max_size=300),
    kind=st.sampled_from(list(Kind)),
)
def test_signed_bytes_cut_from_the_encoding_equal_the_packed_ones(
    seq: int, hlc: int, meta: bytes, kind: Kind
) -> None:
    entry = make(seq=seq, prev=b"" if seq == 1 else b"\x05" * 32, hlc=hlc, meta=meta, kind=kind)
    raw = entry.encode()
    assert signed_bytes_of_encoding(decode_entry_untrusted(raw), raw) == entry.signed_bytes()
    check_entry_signature(entry, raw)
    # Bytes that are not the entry's encoding fall back to packing its fields.
    assert signed_bytes_of_encoding(entry, b"\x9b" + raw[1:-1]) == entry.signed_bytes()


def test_signature_checks_of_a_batch_name_the_forged_ones() -> None:
    entries = [make(seq=1, hlc=i) for i in range(4)]
    raws: list[bytes | None] = [entry.encode() for entry in entries]
    forged = bytearray(entries[2].encode())
    forged[-3] ^= 0x10
    entries[2] = decode_entry_untrusted(bytes(forged))
    raws[2] = bytes(forged)
    raws[3] = None  # no encoding at hand: packed again
    assert signatures_valid(list(zip(entries, raws, strict=True))) == [True, True, False, True]
    with pytest.raises(EntryRejected) as info:
        check_entry_signature(entries[2], raws[2])
    assert info.value.reason == "bad-signature"


def test_non_canonical_encoding_is_refused() -> None:
    entry = make()
    fields = unpack_untrusted(entry.encode(), max_size=10_000)
    assert isinstance(fields, list)
    # seq=1 re-encoded as a uint64 instead of a fixint: same value, other bytes.
    body = bytearray(entry.encode())
    canonical_seq = pack(1)
    index = body.index(pack(AUTHOR.node_id.raw)) + len(pack(AUTHOR.node_id.raw))
    assert body[index : index + 1] == canonical_seq
    body[index : index + 1] = b"\xcf" + (1).to_bytes(8, "big")
    with pytest.raises(BadFrame, match="canonical"):
        decode_entry_untrusted(bytes(body))


def test_shape_rules() -> None:
    with pytest.raises(BadFrame):
        make(seq=1, prev=b"\x01" * 32)
    with pytest.raises(BadFrame):
        make(seq=2, prev=b"")
    with pytest.raises(BadFrame):
        make(kind=Kind.DELETE, blob=b"\x01" * 32)
    with pytest.raises(BadFrame):
        make(kind=Kind.PUT, blob=b"short")


@given(st.binary(max_size=2048))
def test_any_bytes_decode_cleanly_or_fail_with_badframe(data: bytes) -> None:
    try:
        decode_entry_untrusted(data)
    except BadFrame:
        pass


@given(st.lists(st.integers(min_value=0, max_value=2**40), min_size=1, max_size=50))
def test_hlc_is_strictly_monotonic_whatever_the_wall_clock(walls: list[int]) -> None:
    clock = HybridClock()
    stamps = [clock.tick(wall) for wall in walls]
    assert stamps == sorted(stamps)
    assert len(set(stamps)) == len(stamps)


def test_hlc_orders_after_observed_remote_stamps() -> None:
    clock = HybridClock()
    remote = clock_far = (NOW_MS + 5000) << 16
    clock.observe(remote)
    stamp = clock.tick(NOW_MS)  # our wall clock is behind the remote's
    assert stamp > clock_far
    assert hlc_to_ms(stamp) == NOW_MS + 5000
    assert hlc_counter(stamp) == 1


@given(st.binary(max_size=512))
def test_codec_any_bytes(data: bytes) -> None:
    try:
        value = unpack_canonical_untrusted(data, max_size=1024)
    except BadFrame:
        return
    assert pack(value) == data


def test_codec_refuses_oversized_input_before_decoding() -> None:
    with pytest.raises(BadFrame, match="exceeds"):
        unpack_untrusted(b"\x00" * 2000, max_size=1000)


def test_identity_seed_not_in_repr() -> None:
    identity = Identity.generate(os.urandom)
    assert identity.seed.hex() not in repr(identity)
