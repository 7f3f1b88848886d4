"""The local store: blobs, entries, sync primitives, tamper and crash safety."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync import defaults
from p2psync.crypto.group import GroupSecret
from p2psync.errors import BadFrame, IntegrityError, NotFound, NotWanted
from p2psync.proto.entry import Kind
from p2psync.store import BlobPending, Meta, Store
from p2psync.store.files import CorruptObject
from p2psync.store.objects import (
    ObjectKind,
    decode_manifest_untrusted,
    decode_meta_untrusted,
    object_id,
    open_sealed_object,
    seal,
)

MakeStore = Callable[..., Store]
CHUNK = defaults.CHUNK_SIZE


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def put(store: Store, key: str, data: bytes) -> bytes:
    blob_id, size = store.put_blob(io.BytesIO(data))
    store.append(Kind.PUT, Meta(key=key), now_ms=now_ms(), blob=blob_id, size=size)
    return blob_id


def replicate(source: Store, target: Store) -> None:
    """What a sync session does, by hand: entries, then every missing object."""
    for author, _ in source.frontier().items():
        have = target.frontier().get(author, 0)
        target.insert_entries(source.entries_after(author, have, 10_000), now_ms=now_ms())
    for blob_id in target.wanted_blobs():
        while missing := target.missing_objects(blob_id):
            for oid in missing:
                target.add_object(oid, source.read_object(oid))


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + CHUNK // 2])
def test_put_get_round_trip(make_store: MakeStore, size: int) -> None:
    store = make_store()
    data = os.urandom(size)
    blob_id = put(store, "k", data)
    assert b"".join(store.iter_blob(blob_id)) == data
    head = store.head("k")
    assert head is not None and head.complete and head.entry.size == size


def test_identical_content_is_stored_once(make_store: MakeStore) -> None:
    store = make_store()
    data = os.urandom(2 * CHUNK + 10)
    first = put(store, "a", data)
    objects = store.stats()["objects"]
    second = put(store, "b", data)
    assert first == second
    assert store.stats()["objects"] == objects


def test_disk_holds_no_plaintext(make_store: MakeStore) -> None:
    store = make_store()
    secret_words = b"the treasure is under the third oak"
    put(store, "diary/secret-plan.txt", secret_words * 100)
    for path in store.root.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert secret_words not in content, path
            assert b"secret-plan" not in content, path


def test_corrupted_chunk_is_reported_and_never_returned(make_store: MakeStore) -> None:
    store = make_store()
    data = os.urandom(3 * CHUNK)
    blob_id = put(store, "k", data)
    chunk_ids = store.missing_objects(blob_id) or [
        bytes(r[0])
        for r in store._db.execute("SELECT chunk_id FROM blob_chunks ORDER BY idx").fetchall()
    ]
    victim = chunk_ids[1]
    path = store.files.path(victim)
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0xFF
    path.write_bytes(bytes(raw))
    received = []
    with pytest.raises(CorruptObject, match=r"chunk 2 of 3") as info:
        for piece in store.iter_blob(blob_id):
            received.append(piece)
    assert info.value.object_id == victim
    assert b"".join(received) == data[:CHUNK]  # only verified chunks came out
    assert not path.exists()  # quarantined
    assert store.missing_objects(blob_id) == [victim]  # sync will fetch it again
    with pytest.raises(BlobPending):
        next(store.iter_blob(blob_id))


def test_flipped_byte_in_stored_entry_is_rejected_on_receive(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    put(a, "k", b"hello")
    raw = bytearray(a.entries_after(a.identity.node_id, 0, 1)[0])
    raw[-10] ^= 0x01
    result = b.insert_entries([bytes(raw)], now_ms=now_ms())
    assert result.accepted == []
    assert [reason for _, reason in result.rejected] == ["bad-signature"]


def test_entries_from_another_group_are_rejected(make_store: MakeStore) -> None:
    a = make_store("a")
    stranger = make_store("s", secret=GroupSecret.generate(os.urandom))
    put(stranger, "k", b"x")
    raws = stranger.entries_after(stranger.identity.node_id, 0, 10)
    result = a.insert_entries(raws, now_ms=now_ms())
    assert [reason for _, reason in result.rejected] == ["wrong-group"]


def test_gap_and_fork_are_rejected_duplicates_are_not(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    for i in range(3):
        put(a, f"k{i}", b"v%d" % i)
    raws = a.entries_after(a.identity.node_id, 0, 10)
    gap = b.insert_entries([raws[1]], now_ms=now_ms())
    assert [reason for _, reason in gap.rejected] == ["seq-gap"]
    ok = b.insert_entries(raws, now_ms=now_ms())
    assert len(ok.accepted) == 3
    again = b.insert_entries(raws, now_ms=now_ms())
    assert again.duplicates == 3 and not again.accepted and not again.rejected
    # A different entry claiming a's seq 3: a fork, refused.
    forger_view = make_store("a2")
    forger_view.identity = a.identity  # same author key, diverging history
    for i in range(3):
        put(forger_view, f"other{i}", b"w")
    fork = b.insert_entries(forger_view.entries_after(a.identity.node_id, 2, 1), now_ms=now_ms())
    assert [reason for _, reason in fork.rejected] == ["fork"]


def test_replication_marks_pending_until_complete(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    data = os.urandom(2 * CHUNK + 7)
    blob_id = put(a, "photo", data)
    b.insert_entries(a.entries_after(a.identity.node_id, 0, 10), now_ms=now_ms())
    head = b.head("photo")
    assert head is not None and not head.complete
    assert b.wanted_blobs() == [blob_id]
    assert b.missing_objects(blob_id) == [blob_id]  # the manifest comes first
    with pytest.raises(BlobPending, match="still syncing"):
        next(b.iter_blob(blob_id))
    b.add_object(blob_id, a.read_object(blob_id))
    missing = b.missing_objects(blob_id)
    assert len(missing) == 3
    b.add_object(missing[0], a.read_object(missing[0]))
    assert b.blob_progress(blob_id) == (1, 3)  # chunks present, chunks needed
    replicate(a, b)
    assert b"".join(b.iter_blob(blob_id)) == data
    assert b.wanted_blobs() == []


def test_objects_are_verified_before_storing(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    blob_id = put(a, "k", os.urandom(100))
    b.insert_entries(a.entries_after(a.identity.node_id, 0, 10), now_ms=now_ms())
    good = a.read_object(blob_id)
    with pytest.raises(IntegrityError, match="does not match its hash"):
        b.add_object(blob_id, good[:-1] + bytes([good[-1] ^ 1]))
    # Well-formed and correctly named, but nobody asked for it:
    stray = seal(b.keys, ObjectKind.CHUNK, b"unrequested")
    with pytest.raises(NotWanted, match="part of no value"):
        b.add_object(object_id(stray), stray)
    assert b.add_object(blob_id, good) is True
    assert b.add_object(blob_id, good) is False


def test_last_writer_wins_and_tombstones_hide(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    put(a, "k", b"from a")
    replicate(a, b)
    put(b, "k", b"from b")  # b saw a's write: its HLC sorts after
    replicate(b, a)
    for store in (a, b):
        head = store.head("k")
        assert head is not None and head.entry.author == b.identity.node_id
        assert b"".join(store.iter_blob(head.entry.blob)) == b"from b"
    a.append(Kind.DELETE, Meta(key="k"), now_ms=now_ms())
    replicate(a, b)
    assert b.live() == []
    head = b.head("k")
    assert head is not None and head.entry.kind is Kind.DELETE


def test_pull_returns_arrival_order_without_gaps(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    for i in range(25):
        put(a, f"k{i}", b"%d" % i)
    put(b, "mine", b"m")
    replicate(a, b)
    seen, cursor = [], 0
    while True:
        page, cursor = b.pull(after=cursor, limit=7)
        if not page:
            break
        seen.extend(page)
    assert [s.cursor for s in seen] == sorted({s.cursor for s in seen})
    assert [s.key for s in seen] == ["mine"] + [f"k{i}" for i in range(25)]


def test_frontier_and_entries_after(make_store: MakeStore) -> None:
    a = make_store("a")
    for i in range(5):
        put(a, f"k{i}", b"x")
    assert a.frontier() == {a.identity.node_id: 5}
    assert len(a.entries_after(a.identity.node_id, 3, 10)) == 2


def test_gc_removes_only_unreferenced_objects(make_store: MakeStore) -> None:
    store = make_store()
    shared = os.urandom(CHUNK)
    put(store, "keep", shared + os.urandom(10))
    before = store.stats()["objects"]
    # A put whose entry never committed (a crash in between): its objects, no value.
    store.put_blob(io.BytesIO(shared + os.urandom(CHUNK)))
    assert store.stats()["objects"] == before + 2
    result = store.gc()
    assert result.objects_removed == 2  # that manifest and its own last chunk
    assert store.stats()["objects"] == before
    head = store.head("keep")
    assert head is not None
    assert len(b"".join(store.iter_blob(head.entry.blob))) == CHUNK + 10


def test_leftover_temp_file_is_ignored_and_cleaned(
    make_store: MakeStore, group_secret: GroupSecret
) -> None:
    store = make_store("a")
    put(store, "k", b"data")
    leftover = store.files.tmp_dir / "deadbeef.partial"
    leftover.write_bytes(b"half a chunk")
    young = store.files.tmp_dir / "cafe.partial"
    young.write_bytes(b"a live writer's file")
    old = time.time() - defaults.STALE_TEMP_SECONDS - 10
    os.utime(leftover, (old, old))
    store.close()
    reopened = Store(store.root, store.identity, [group_secret])
    assert not leftover.exists()
    assert young.exists()  # could belong to a live writer
    head = reopened.head("k")
    assert head is not None
    assert b"".join(reopened.iter_blob(head.entry.blob)) == b"data"
    reopened.close()


def test_object_files_without_an_entry_are_collected(make_store: MakeStore) -> None:
    store = make_store()
    blob_id, _ = store.put_blob(io.BytesIO(os.urandom(2 * CHUNK)))  # crash before append
    chunk_ids = [bytes(r[0]) for r in store._db.execute("SELECT chunk_id FROM blob_chunks")]
    assert store.has_object(blob_id) and all(store.files.exists(c) for c in chunk_ids)
    result = store.gc()
    assert result.objects_removed == 3
    assert not store.has_object(blob_id)
    assert not any(store.files.exists(c) for c in chunk_ids)


def test_small_objects_live_in_the_database_and_are_verified(make_store: MakeStore) -> None:
    store = make_store()
    blob_id = put(store, "note", b"a small note")
    assert not store.files.exists(blob_id)  # no file, no fsync per small value
    assert b"".join(store.iter_blob(blob_id)) == b"a small note"
    (sealed,) = store._db.execute(
        "SELECT data FROM objects WHERE object_id = ?", (blob_id,)
    ).fetchone()
    flipped = bytearray(sealed)
    flipped[20] ^= 0xFF
    store._db.execute("UPDATE objects SET data = ? WHERE object_id = ?", (bytes(flipped), blob_id))
    with pytest.raises(CorruptObject, match="in the database"):
        next(store.iter_blob(blob_id))
    assert store.missing_objects(blob_id) == [blob_id]


def test_unknown_key_and_blob(make_store: MakeStore) -> None:
    store = make_store()
    assert store.head("nope") is None
    with pytest.raises(NotFound):
        next(store.iter_blob(b"\x00" * 32))


def test_sealed_objects_open_only_as_their_kind(make_store: MakeStore) -> None:
    store = make_store()
    sealed = seal(store.keys, ObjectKind.CHUNK, b"abc")
    assert open_sealed_object(store.keyring, sealed, ObjectKind.CHUNK) == b"abc"
    with pytest.raises(BadFrame, match="expected a manifest"):
        open_sealed_object(store.keyring, sealed, ObjectKind.MANIFEST)
    tampered = bytearray(sealed)
    tampered[1] = int(ObjectKind.MANIFEST)  # the header is authenticated
    with pytest.raises(IntegrityError):
        open_sealed_object(store.keyring, bytes(tampered), ObjectKind.MANIFEST)


@settings(max_examples=200)
@given(st.binary(max_size=4096))
def test_manifest_and_meta_decoders_fail_cleanly(data: bytes) -> None:
    for decode in (decode_manifest_untrusted, decode_meta_untrusted):
        try:
            decode(data)
        except BadFrame:
            pass


@pytest.mark.slow
def test_one_gib_round_trip_with_bounded_memory(tmp_path: Path) -> None:
    """1 GiB in and out through the store in a child process; its peak RSS is bounded."""
    script = r"""
import hashlib, os, random, sys
from pathlib import Path
from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.store import Store

class Source:
    # 1 GiB of seeded pseudo-random bytes, generated as read, never held whole.
    def __init__(self, total):
        self.left, self.rng, self.digest = total, random.Random(7), hashlib.sha256()
    def read(self, size=-1):
        out = self.rng.randbytes(min(size, self.left))
        self.left -= len(out)
        self.digest.update(out)
        return out

store = Store(Path(sys.argv[1]), Identity.generate(os.urandom),
              [GroupSecret.generate(os.urandom)])
source = Source(1 << 30)
blob_id, size = store.put_blob(source)
back = hashlib.sha256()
for chunk in store.iter_blob(blob_id):
    back.update(chunk)
assert size == 1 << 30
assert back.digest() == source.digest.digest(), "round trip differs"
# VmHWM is this process's own peak; ru_maxrss would include the parent's
# peak, which Linux carries across exec.
status = Path("/proc/self/status").read_text()
print(int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) // 1024)
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    peak_mib = int(done.stdout.strip())
    assert peak_mib < 150, f"peak RSS {peak_mib} MiB for a 1 GiB round trip"


def test_values_a_peer_deletes_or_overwrites_are_freed_on_arrival(make_store: MakeStore) -> None:
    a, b = make_store("a"), make_store("b")
    shared = os.urandom(CHUNK)
    doomed = put(a, "doomed", shared + b"one")  # 2 chunks + manifest
    kept = put(a, "kept", shared + b"two")  # shares the first chunk
    old = put(a, "overwritten", os.urandom(CHUNK + 1))
    replicate(a, b)
    assert b.has_object(doomed) and b.has_object(old)
    a.append(Kind.DELETE, Meta(key="doomed"), now_ms=now_ms())
    put(a, "overwritten", b"new")
    before = b.objects_released
    replicate(a, b)  # the tombstone and the new value arrive: the old values go at once
    assert not b.has_object(doomed) and not b.has_object(old)
    assert b.objects_released - before == 2 + 3  # doomed's manifest + own chunk; old's 3
    assert b"".join(b.iter_blob(kept)) == shared + b"two"  # the shared chunk stayed
    assert b.gc().objects_removed == 0  # nothing left over for a full collection


def test_an_object_of_a_value_deleted_while_it_travelled_is_not_wanted(
    make_store: MakeStore,
) -> None:
    a, b = make_store("a"), make_store("b")
    blob_id = put(a, "k", os.urandom(2 * CHUNK))
    b.insert_entries(a.entries_after(a.identity.node_id, 0, 10), now_ms=now_ms())
    manifest = a.read_object(blob_id)
    b.add_object(blob_id, manifest)  # b now wants the two chunks...
    (first, second) = b.missing_objects(blob_id)
    b.add_object(first, a.read_object(first))
    on_its_way = a.read_object(second)
    a.append(Kind.DELETE, Meta(key="k"), now_ms=now_ms())
    assert not a.has_object(second)  # the author freed it too
    b.insert_entries(a.entries_after(a.identity.node_id, 1, 10), now_ms=now_ms())
    assert b.wanted_blobs() == []  # ...and no longer once the tombstone is in
    with pytest.raises(NotWanted):
        b.add_object(second, on_its_way)  # the fetch that was on its way
    assert not b.has_object(first)
