"""Batched entry insertion decides exactly what checking one entry at a time decides.

``Store.insert_entries`` checks signatures of a batch ahead, in worker
threads, and writes rows with ``executemany``. The oracle here is the same
store fed the same raw entries one per call (one transaction each, no
prediction, no threads): reasons, accepted entries, duplicates and the
resulting heads and frontier must match, for any mix of good, duplicate,
forked, gapped, forged, foreign, unreadable and malformed entries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psync import defaults
from p2psync.crypto.group import GroupKeys, GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.proto.entry import Entry, Kind, sign_entry
from p2psync.store import InsertResult, Meta, Store
from p2psync.store.objects import seal_meta

MakeStore = Callable[..., Store]
NOW_MS = time.time_ns() // 1_000_000
BIG = 3 * defaults.STORE_VERIFY_CHUNK  # enough candidates to use the worker threads


def chain(
    identity: Identity,
    keys: GroupKeys,
    count: int,
    *,
    first_seq: int = 1,
    prev: bytes = b"",
    key_prefix: str = "k",
    hlc_base: int = NOW_MS << 16,
) -> list[Entry]:
    """``count`` signed DELETE entries of one feed, starting after ``prev``."""
    entries = []
    for i in range(count):
        seq = first_seq + i
        entry = sign_entry(
            identity,
            group_id=keys.group_id,
            seq=seq,
            prev=prev,
            hlc=hlc_base + seq,
            kind=Kind.DELETE,
            blob=b"",
            size=0,
            meta=seal_meta(keys, Meta(key=f"{key_prefix}{i % 3}"), os.urandom),
        )
        entries.append(entry)
        prev = entry.entry_id
    return entries


def forge(raw: bytes, position: int = -10) -> bytes:
    """Flip a bit of the signature: still canonical, no longer valid."""
    forged = bytearray(raw)
    forged[position] ^= 0x01
    return bytes(forged)


def outcome(result: InsertResult) -> tuple[list[bytes], int, list[str]]:
    return (
        [entry.entry_id for entry in result.accepted],
        result.duplicates,
        [reason for _, reason in result.rejected],
    )


def state(store: Store) -> tuple[object, ...]:
    heads = store._db.execute(
        "SELECT h.key_hash, e.entry_id FROM heads h JOIN entries e ON e.cursor = h.cursor "
        "ORDER BY h.key_hash"
    ).fetchall()
    return (store.frontier(), heads, store.stats()["entries"])


def one_by_one(store: Store, raws: Sequence[bytes]) -> tuple[list[bytes], int, list[str]]:
    accepted: list[bytes] = []
    duplicates = 0
    reasons: list[str] = []
    for raw in raws:
        got = outcome(store.insert_entries([raw], now_ms=NOW_MS))
        accepted += got[0]
        duplicates += got[1]
        reasons += got[2]
    return accepted, duplicates, reasons


@dataclass
class Pool:
    """Raw entries of every kind a peer could send, made once per test run."""

    secret: GroupSecret
    raws: list[bytes]


def make_pool() -> Pool:
    secret = GroupSecret.generate(os.urandom)
    keys = secret.keys()
    alice, bob = Identity.generate(os.urandom), Identity.generate(os.urandom)
    a = chain(alice, keys, 6)
    b = chain(bob, keys, 4, key_prefix="k")  # same keys as alice: heads compete
    # Alice's second history after seq 2: forks of seqs 3 and 4.
    fork = chain(alice, keys, 2, first_seq=3, prev=a[1].entry_id, hlc_base=(NOW_MS << 16) + 99)
    stranger = GroupSecret.generate(os.urandom).keys()
    foreign = chain(Identity.generate(os.urandom), stranger, 1)
    # Signed by bob, meta sealed for another group: bad-meta.
    unreadable = sign_entry(
        bob,
        group_id=keys.group_id,
        seq=5,
        prev=b[3].entry_id,
        hlc=(NOW_MS << 16) + 50,
        kind=Kind.DELETE,
        blob=b"",
        size=0,
        meta=seal_meta(stranger, Meta(key="x"), os.urandom),
    )
    raws = [e.encode() for e in (*a, *b, *fork, *foreign, unreadable)]
    raws += [forge(a[2].encode()), forge(a[2].encode(), -20), forge(b[0].encode())]
    raws += [b"\x93\x01\x02", b"not msgpack"]
    return Pool(secret, raws)


POOL = make_pool()


# chunk 1: every batch of two or more candidates goes through the worker
# threads, so the threaded path meets every mix of faults too.
@pytest.mark.parametrize("chunk", [1, defaults.STORE_VERIFY_CHUNK])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    before=st.lists(st.integers(0, len(POOL.raws) - 1), max_size=6),
    batch=st.lists(st.integers(0, len(POOL.raws) - 1), max_size=30),
)
def test_batch_matches_one_by_one(
    tmp_path_factory: pytest.TempPathFactory, chunk: int, before: list[int], batch: list[int]
) -> None:
    base = tmp_path_factory.mktemp("s")
    batched = Store(base / "batched", Identity.generate(os.urandom), [POOL.secret])
    single = Store(base / "single", Identity.generate(os.urandom), [POOL.secret])
    saved, defaults.STORE_VERIFY_CHUNK = defaults.STORE_VERIFY_CHUNK, chunk
    try:
        for store in (batched, single):
            one_by_one(store, [POOL.raws[i] for i in before])
        raws = [POOL.raws[i] for i in batch]
        assert outcome(batched.insert_entries(raws, now_ms=NOW_MS)) == one_by_one(single, raws)
        assert state(batched) == state(single)
    finally:
        defaults.STORE_VERIFY_CHUNK = saved
        batched.close()
        single.close()


def test_bad_signature_mid_batch_rejects_it_and_its_successors_only(
    make_store: MakeStore, group_secret: GroupSecret
) -> None:
    keys = group_secret.keys()
    alice, bob = Identity.generate(os.urandom), Identity.generate(os.urandom)
    a = [e.encode() for e in chain(alice, keys, BIG)]
    b = [e.encode() for e in chain(bob, keys, BIG)]
    middle = BIG // 2
    a[middle] = forge(a[middle])
    interleaved = [raw for pair in zip(a, b, strict=True) for raw in pair]
    store = make_store("r")
    result = store.insert_entries(interleaved, now_ms=NOW_MS)
    assert store._verify_pool is not None  # the threaded path ran
    reasons = [reason for _, reason in result.rejected]
    assert reasons == ["bad-signature"] + ["seq-gap"] * (BIG - middle - 1)
    assert len(result.accepted) == middle + BIG
    assert result.accepted_raws == [e.encode() for e in result.accepted]
    assert store.frontier() == {alice.node_id: middle, bob.node_id: BIG}
    reference = make_store("ref")
    assert outcome(result) == one_by_one(reference, interleaved)
    assert state(store) == state(reference)


def test_twins_after_a_forged_entry_are_checked_too(
    make_store: MakeStore, group_secret: GroupSecret
) -> None:
    """Two forgeries and then the genuine entry, all for one seq: the
    prediction (first forgery accepted, the rest forks) is wrong; the second
    forgery and the genuine entry are checked inline, as one at a time would:
    the forgery refused, the genuine one accepted."""
    keys = group_secret.keys()
    alice = Identity.generate(os.urandom)
    raws = [e.encode() for e in chain(alice, keys, BIG)]
    spot = BIG - 5
    batch = [*raws[:spot], forge(raws[spot]), forge(raws[spot], -20), *raws[spot:]]
    store = make_store("r")
    result = store.insert_entries(batch, now_ms=NOW_MS)
    assert store._verify_pool is not None  # the threaded path ran
    assert [reason for _, reason in result.rejected] == ["bad-signature", "bad-signature"]
    assert len(result.accepted) == BIG and result.duplicates == 0
    assert store.frontier() == {alice.node_id: BIG}


def test_duplicates_skip_signature_checks_and_large_batches_agree(
    make_store: MakeStore, group_secret: GroupSecret
) -> None:
    keys = group_secret.keys()
    alice, bob = Identity.generate(os.urandom), Identity.generate(os.urandom)
    a = [e.encode() for e in chain(alice, keys, 2 * BIG)]
    b = [e.encode() for e in chain(bob, keys, BIG, hlc_base=(NOW_MS << 16) + 7)]
    store = make_store("r")
    first = store.insert_entries(a[:BIG] + b, now_ms=NOW_MS)
    assert len(first.accepted) == 2 * BIG and not first.rejected
    again = store.insert_entries(a, now_ms=NOW_MS)  # half known, half new
    assert again.duplicates == BIG and len(again.accepted) == BIG and not again.rejected
    reference = make_store("ref")
    one_by_one(reference, a[:BIG] + b)
    one_by_one(reference, a)
    assert state(store) == state(reference)
    # Heads: key k0..k2 each won by the entry with the highest (hlc, author).
    for key in ("k0", "k1", "k2"):
        ours, theirs = store.head(key), reference.head(key)
        assert ours is not None and theirs is not None
        assert ours.entry == theirs.entry
