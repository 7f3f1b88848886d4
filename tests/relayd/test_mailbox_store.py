"""relayd's mailbox store and session: cursors, idempotence, limits, lifetime, membership.

These drive :class:`relayd.mailbox.MailboxStore` and
:class:`relayd.mailbox_service.MailboxSession` directly on a real SQLite
database in a temporary directory, with ``now`` stepped by hand; entries and
objects are real (signed by real identities, sealed with real group keys).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from p2psync import defaults as node_defaults
from p2psync.crypto.group import GroupKeys, GroupSecret, mailbox_key
from p2psync.crypto.identity import Identity, NodeId
from p2psync.errors import ConfigError
from p2psync.proto import mailbox as wire
from p2psync.proto.entry import Kind, sign_entry
from p2psync.proto.mailbox import MailboxErrorCode
from p2psync.store.objects import (
    MAX_OBJECT_SIZE,
    ChunkRef,
    Manifest,
    Meta,
    ObjectKind,
    object_id,
    seal,
    seal_meta,
)
from relayd import defaults as relayd_defaults
from relayd.config import MailboxConfig, config_from_mapping
from relayd.mailbox import (
    DB_FILE,
    RUNNING_MARK,
    SCHEMA_VERSION,
    FetchResult,
    MailboxRefused,
    MailboxStore,
)
from relayd.mailbox_service import MailboxSession, SessionState

NOW = 1_900_000_000.0
DAY = 86400
CHUNK = node_defaults.CHUNK_SIZE


class Feed:
    """One device's feed of real signed entries in ``keys``'s group."""

    def __init__(self, keys: GroupKeys, identity: Identity | None = None) -> None:
        self.keys = keys
        self.identity = identity or Identity.generate(os.urandom)
        self.seq = 0
        self.prev = b""

    @property
    def node(self) -> bytes:
        return self.identity.node_id.raw

    def entry(self, *, kind: Kind = Kind.DELETE, blob: bytes = b"", size: int = 0) -> bytes:
        self.seq += 1
        entry = sign_entry(
            self.identity,
            group_id=self.keys.group_id,
            seq=self.seq,
            prev=self.prev,
            hlc=int(NOW * 1000) << 16 | self.seq,
            kind=kind,
            blob=blob,
            size=size,
            meta=seal_meta(self.keys, Meta(key=f"k{self.seq}"), os.urandom),
        )
        raw = entry.encode()
        self.prev = entry.entry_id
        return raw

    def put(self, plaintext: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
        """(entry, blob id, [(object id, sealed)] root first) for ``plaintext``."""
        pieces = [plaintext[i : i + CHUNK] for i in range(0, max(len(plaintext), 1), CHUNK)]
        chunks = [seal(self.keys, ObjectKind.CHUNK, piece) for piece in pieces]
        objects = [(object_id(c), c) for c in chunks]
        if len(chunks) == 1:
            blob = objects[0][0]
        else:
            manifest = Manifest(
                len(plaintext),
                tuple(ChunkRef(oid, len(p)) for (oid, _), p in zip(objects, pieces, strict=True)),
            )
            sealed = seal(self.keys, ObjectKind.MANIFEST, manifest.encode())
            blob = object_id(sealed)
            objects.insert(0, (blob, sealed))
        return self.entry(kind=Kind.PUT, blob=blob, size=len(plaintext)), blob, objects


@pytest.fixture
def keys() -> GroupKeys:
    return GroupSecret.generate(os.urandom).keys()


@pytest.fixture
def mailbox(keys: GroupKeys) -> bytes:
    """The address relayd files the group's mailbox under (as a session JOINs it)."""
    return wire.mailbox_address(mailbox_key(keys).node_id.raw, keys.group_id)


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., MailboxStore]]:
    opened: list[MailboxStore] = []

    def make(**config: object) -> MailboxStore:
        base = MailboxConfig(min_free_bytes=0, retention_s=7 * DAY)
        store = MailboxStore.open(tmp_path / "mailbox", replace(base, **config))  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def refused(code: MailboxErrorCode, call: Callable[[], object]) -> MailboxRefused:
    with pytest.raises(MailboxRefused) as info:
        call()
    assert info.value.code is code, info.value
    return info.value


# --- cursors -------------------------------------------------------------------------------


def test_cursors_under_concurrent_pushes_have_no_gaps_and_no_duplicates(
    tmp_path: Path, keys: GroupKeys, mailbox: bytes
) -> None:
    """Four writers, each with its own connection (as separate processes would be)."""
    config = MailboxConfig(min_free_bytes=0)
    directory = tmp_path / "mailbox"
    with MailboxStore.open(directory, config) as first:
        first.join(mailbox, b"\x01" * 32, NOW)
    writers, per_writer = 4, 60
    feeds = [Feed(keys) for _ in range(writers)]
    raws = [[feed.entry() for _ in range(per_writer)] for feed in feeds]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def push_all(index: int) -> None:
        try:
            with MailboxStore.open(directory, config) as store:
                got = []
                for raw in raws[index]:
                    got.append(store.push_entry(mailbox, feeds[index].node, raw, NOW).cursor)
                results[index] = got
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=push_all, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    every = sorted(c for got in results.values() for c in got)
    assert every == list(range(1, writers * per_writer + 1))  # no gap, no duplicate
    for got in results.values():
        assert got == sorted(got)  # each writer's order is kept
    with MailboxStore.open(directory, config) as store:
        assert store.cursors(mailbox) == every
        assert store.head(mailbox) == writers * per_writer
        pulled = store.pull(mailbox, 0, 1000, NOW)
        assert [item.cursor for item in pulled.items] == every
        assert not pulled.has_more


def test_repush_returns_the_existing_cursor(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes
) -> None:
    store = open_store()
    feed = Feed(keys)
    store.join(mailbox, feed.node, NOW)
    raw, blob, objects = feed.put(b"small file")
    first = store.push_entry(mailbox, feed.node, raw, NOW)
    (oid, sealed) = objects[0]
    chunk = store.push_object(mailbox, feed.node, blob, oid, sealed, NOW)
    assert (first.cursor, first.new, chunk.cursor, chunk.new) == (1, True, 2, True)
    again = store.push_entry(mailbox, feed.node, raw, NOW + 10)
    chunk_again = store.push_object(mailbox, feed.node, blob, oid, sealed, NOW + 10)
    assert (again.cursor, again.new) == (1, False)
    assert (chunk_again.cursor, chunk_again.new) == (2, False)
    assert store.head(mailbox) == 2
    assert store.mailbox_stats(mailbox)[1] == 2
    # A refused push uses no cursor: the next accepted one follows directly.
    bad = bytearray(feed.entry())
    bad[-1] ^= 1
    refused(
        MailboxErrorCode.BAD_ENTRY, lambda: store.push_entry(mailbox, feed.node, bytes(bad), NOW)
    )
    feed.seq -= 1
    assert store.push_entry(mailbox, feed.node, feed.entry(), NOW).cursor == 3


def test_pull_pages_by_limit_and_bytes(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes
) -> None:
    store = open_store()
    feed = Feed(keys)
    store.join(mailbox, feed.node, NOW)
    raw, blob, objects = feed.put(os.urandom(CHUNK + 10))
    store.push_entry(mailbox, feed.node, raw, NOW)
    for oid, sealed in objects:
        store.push_object(mailbox, feed.node, blob, oid, sealed, NOW)
    for _ in range(10):
        store.push_entry(mailbox, feed.node, feed.entry(), NOW)
    page = store.pull(mailbox, 0, 3, NOW)
    assert [i.cursor for i in page.items] == [1, 2, 3] and page.has_more and page.head == 14
    assert isinstance(page.items[0], wire.EntryItem) and page.items[0].raw == raw
    header = page.items[1]
    assert isinstance(header, wire.ObjectItem)
    assert (header.object_id, header.size, header.blob) == (blob, len(objects[0][1]), blob)
    rest = store.pull(mailbox, 3, 1000, NOW)
    assert [i.cursor for i in rest.items] == list(range(4, 15)) and not rest.has_more
    # Objects travel by FETCH, hash-checked.
    for oid, sealed in objects:
        assert store.fetch(mailbox, oid, NOW).data == sealed
    assert store.fetch(mailbox, b"\x00" * 32, NOW).data is None


# --- verification ------------------------------------------------------------------------------


def test_tampered_entries_are_rejected(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes
) -> None:
    store = open_store()
    feed = Feed(keys)
    store.join(mailbox, feed.node, NOW, group_id=keys.group_id)
    raw = feed.entry()
    for position in (40, len(raw) // 2, len(raw) - 1):  # author, meta, signature
        bad = bytearray(raw)
        bad[position] ^= 0x04
        error = refused(
            MailboxErrorCode.BAD_ENTRY,
            lambda b=bytes(bad): store.push_entry(mailbox, feed.node, b, NOW),  # type: ignore[misc]
        )
        assert "bad-signature" in str(error) or "malformed" in str(error)
    refused(MailboxErrorCode.BAD_ENTRY, lambda: store.push_entry(mailbox, feed.node, b"\x93", NOW))
    # Another group's entry has no place in a mailbox bound to this group.
    store.push_entry(mailbox, feed.node, raw, NOW)
    other = Feed(GroupSecret.generate(os.urandom).keys())
    error = refused(
        MailboxErrorCode.BAD_ENTRY,
        lambda: store.push_entry(mailbox, other.node, other.entry(), NOW),
    )
    assert "wrong-group" in str(error)
    # A fork: a different entry at a seq the mailbox holds.
    feed.seq, feed.prev = 0, b""
    error = refused(
        MailboxErrorCode.BAD_ENTRY, lambda: store.push_entry(mailbox, feed.node, feed.entry(), NOW)
    )
    assert "fork" in str(error)
    # Stamped an hour ahead of the relay's clock.
    ahead = Feed(keys)
    early = NOW - 2 * DAY
    error = refused(
        MailboxErrorCode.BAD_ENTRY,
        lambda: store.push_entry(mailbox, ahead.node, ahead.entry(), early),
    )
    assert "clock-skew" in str(error)
    assert store.head(mailbox) == 1


def test_tampered_and_unfitting_objects_are_rejected(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes
) -> None:
    store = open_store()
    feed = Feed(keys)
    store.join(mailbox, feed.node, NOW)
    raw, blob, objects = feed.put(os.urandom(2 * CHUNK + 5))
    (root, manifest), *chunks = objects
    # No entry names the blob yet.
    refused(
        MailboxErrorCode.UNKNOWN_BLOB,
        lambda: store.push_object(mailbox, feed.node, blob, root, manifest, NOW),
    )
    store.push_entry(mailbox, feed.node, raw, NOW)
    oid, sealed = chunks[0]
    tampered = bytearray(sealed)
    tampered[100] ^= 1
    error = refused(
        MailboxErrorCode.BAD_OBJECT,
        lambda: store.push_object(mailbox, feed.node, blob, oid, bytes(tampered), NOW),
    )
    assert "does not match its hash" in str(error)
    # Honest name of the tampered bytes, but a bad header (a meta object).
    meta = seal_meta(keys, Meta(key="x"), os.urandom)
    refused(
        MailboxErrorCode.BAD_OBJECT,
        lambda: store.push_object(mailbox, feed.node, blob, object_id(meta), meta, NOW),
    )
    truncated = sealed[:20]
    refused(
        MailboxErrorCode.BAD_OBJECT,
        lambda: store.push_object(mailbox, feed.node, blob, object_id(truncated), truncated, NOW),
    )
    for oid, data in objects:
        assert store.push_object(mailbox, feed.node, blob, oid, data, NOW).new
    # Three chunks is all a blob of 2 MiB + 5 bytes can have.
    extra = seal(keys, ObjectKind.CHUNK, b"more than the blob holds")
    error = refused(
        MailboxErrorCode.BAD_OBJECT,
        lambda: store.push_object(mailbox, feed.node, blob, object_id(extra), extra, NOW),
    )
    assert "every chunk" in str(error)
    # A one-chunk blob's root must be exactly its size; it has no further objects.
    raw1, blob1, [(oid1, sealed1)] = feed.put(b"tiny")
    store.push_entry(mailbox, feed.node, raw1, NOW)
    refused(
        MailboxErrorCode.BAD_OBJECT,
        lambda: store.push_object(mailbox, feed.node, blob1, object_id(extra), extra, NOW),
    )
    assert store.push_object(mailbox, feed.node, blob1, oid1, sealed1, NOW).new


# --- limits --------------------------------------------------------------------------------


def test_group_quota_refuses_then_evicts_delivered_items(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes
) -> None:
    store = open_store(group_quota_bytes=8 * 1024)
    writer, reader = Feed(keys), Feed(keys)
    store.join(mailbox, writer.node, NOW)
    store.join(mailbox, reader.node, NOW)
    cursors = []
    with pytest.raises(MailboxRefused) as full:
        for _ in range(100):
            cursors.append(store.push_entry(mailbox, writer.node, writer.entry(), NOW).cursor)
    assert full.value.code is MailboxErrorCode.QUOTA_EXCEEDED
    assert "quota" in full.value.code.label and len(cursors) >= 5
    used = store.mailbox_stats(mailbox)[2]
    assert used <= 8 * 1024
    # The reader acknowledges the first half: those may now make room.
    half = cursors[len(cursors) // 2]
    assert store.ack(mailbox, reader.node, half, NOW) == half
    writer.seq -= 1  # the refused entry was never stored: sign it again
    pushed = store.push_entry(mailbox, writer.node, writer.entry(), NOW)
    assert pushed.new and pushed.cursor == cursors[-1] + 1 and pushed.evicted.quota >= 1
    assert min(store.cursors(mailbox)) > 1  # delivered items went first
    assert store.cursors(mailbox)[-1] == pushed.cursor


def test_item_size_total_quota_and_free_disk(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes, tmp_path: Path
) -> None:
    store = open_store(max_item_bytes=4096, total_quota_bytes=10**9)
    feed = Feed(keys)
    store.join(mailbox, feed.node, NOW)
    raw, blob, [(oid, sealed)] = feed.put(os.urandom(5000))
    store.push_entry(mailbox, feed.node, raw, NOW)
    refused(
        MailboxErrorCode.TOO_LARGE,
        lambda: store.push_object(mailbox, feed.node, blob, oid, sealed, NOW),
    )
    store.close()
    small_total = MailboxStore.open(
        tmp_path / "mailbox", MailboxConfig(min_free_bytes=0, total_quota_bytes=600)
    )
    try:
        refused(
            MailboxErrorCode.STORAGE_FULL,
            lambda: small_total.push_entry(mailbox, feed.node, feed.entry(), NOW),
        )
    finally:
        small_total.close()
    feed.seq -= 1
    disk_full = MailboxStore.open(
        tmp_path / "mailbox", MailboxConfig(min_free_bytes=1 << 30), free=lambda _: 1 << 29
    )
    try:
        error = refused(
            MailboxErrorCode.STORAGE_FULL,
            lambda: disk_full.push_entry(mailbox, feed.node, feed.entry(), NOW),
        )
        assert "disk" in str(error)
    finally:
        disk_full.close()


def test_config_refuses_mailbox_sizes_that_do_not_fit_together() -> None:
    def load(**mailbox: object) -> MailboxConfig:
        return config_from_mapping({"mailbox": mailbox}, "relayd.toml").mailbox

    assert load() == MailboxConfig()
    assert load(max_item_bytes=MAX_OBJECT_SIZE).max_item_bytes == MAX_OBJECT_SIZE
    with pytest.raises(ConfigError, match=r"max_item_bytes = 4096 is less than one sealed"):
        load(max_item_bytes=4096)
    with pytest.raises(ConfigError, match=r"group_quota_bytes = 1000 cannot hold one item"):
        load(group_quota_bytes=1000)
    with pytest.raises(ConfigError, match=r"relayd.toml: mailbox.group_quota_bytes = \d+ exceeds"):
        load(total_quota_bytes=1 << 30)  # the default group quota is 2 GiB
    assert load(group_quota_bytes=1 << 30, total_quota_bytes=1 << 30).total_quota_bytes == 1 << 30


def test_devices_per_group(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes
) -> None:
    store = open_store(max_devices_per_group=2, retention_s=DAY)
    a, b, c = (Identity.generate(os.urandom).node_id.raw for _ in range(3))
    store.join(mailbox, a, NOW)
    store.join(mailbox, b, NOW)
    store.join(mailbox, a, NOW + 5)  # a device already registered comes back freely
    refused(MailboxErrorCode.TOO_MANY_DEVICES, lambda: store.join(mailbox, c, NOW))
    # Registrations lapse after the retention period unseen.
    store.join(mailbox, a, NOW + DAY)
    assert store.join(mailbox, c, NOW + DAY + 10).head == 0


# --- lifetime ------------------------------------------------------------------------------


def test_ttl_hides_expired_items_and_cleanup_removes_them(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes, tmp_path: Path
) -> None:
    store = open_store(retention_s=100)
    feed = Feed(keys)
    store.join(mailbox, feed.node, NOW)
    raw, blob, objects = feed.put(os.urandom(CHUNK + 1))
    store.push_entry(mailbox, feed.node, raw, NOW)
    for oid, sealed in objects:
        store.push_object(mailbox, feed.node, blob, oid, sealed, NOW)
    files = list((tmp_path / "mailbox" / "objects").rglob("*"))
    assert any(p.is_file() and p.stat().st_size > CHUNK for p in files)  # a full chunk: a file
    assert len(store.pull(mailbox, 0, 100, NOW + 99).items) == 4  # entry, manifest, 2 chunks
    assert store.pull(mailbox, 0, 100, NOW + 100).items == ()  # expired: never served
    assert store.fetch(mailbox, objects[1][0], NOW + 100).data is None
    log_id = store.join(mailbox, feed.node, NOW + 50).log_id  # the device stays registered
    result = store.cleanup(NOW + 100)
    assert result.expired == 4 and result.bytes_freed > CHUNK
    assert store.totals.items == 0 and store.totals.bytes == 0
    assert not [p for p in (tmp_path / "mailbox" / "objects").rglob("*") if p.is_file()]
    # Space comes back: free pages go to the filesystem, the WAL is truncated.
    db = sqlite3.connect(tmp_path / "mailbox" / DB_FILE)
    assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    db.close()
    assert (tmp_path / "mailbox" / (DB_FILE + "-wal")).stat().st_size == 0
    # The log goes on: cursors are never reused after items are gone.
    assert store.push_entry(mailbox, feed.node, feed.entry(), NOW + 101).cursor == 5
    # A mailbox nobody used for the whole retention period is forgotten; its
    # next JOIN starts a new log (new log_id: nodes start over from cursor 0).
    assert store.cleanup(NOW + 400).mailboxes == 1
    info = store.join(mailbox, feed.node, NOW + 401)
    assert info.log_id != log_id and info.head == 0


def test_cleanup_drops_orphans_delivered_items_and_stray_files(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes, tmp_path: Path
) -> None:
    store = open_store(drop_delivered=True)
    writer, reader = Feed(keys), Feed(keys)
    store.join(mailbox, writer.node, NOW)
    store.join(mailbox, reader.node, NOW)
    raw, blob, objects = writer.put(os.urandom(CHUNK + 1))
    entry_cursor = store.push_entry(mailbox, writer.node, raw, NOW).cursor
    for oid, sealed in objects:
        store.push_object(mailbox, writer.node, blob, oid, sealed, NOW)
    stray = tmp_path / "mailbox" / "objects" / mailbox.hex() / ("ab" * 32)
    stray.write_bytes(b"left by a crash between rename and commit")
    # The reader has the entry but not (yet) the objects: it does not have the
    # file, so nothing is delivered and nothing goes.
    store.ack(mailbox, reader.node, entry_cursor, NOW)
    result = store.cleanup(NOW + 1)
    assert (result.delivered, result.orphans, result.stray_files) == (0, 0, 1)
    assert store.cursors(mailbox) == [1, 2, 3, 4]
    for oid, sealed in objects:
        assert store.fetch(mailbox, oid, NOW + 1).data == sealed
    # Once it ACKed the objects too, the entry and its objects are delivered.
    store.ack(mailbox, reader.node, store.head(mailbox), NOW + 2)
    result = store.cleanup(NOW + 3)
    assert (result.delivered, result.orphans, result.stray_files) == (4, 0, 0)
    assert store.cursors(mailbox) == []
    assert not [p for p in (tmp_path / "mailbox" / "objects").rglob("*") if p.is_file()]
    # Objects no entry names any more are orphans (their entry expired first).
    raw, blob, objects = writer.put(os.urandom(100))
    store.push_entry(mailbox, writer.node, raw, NOW + 3)
    store.push_object(mailbox, writer.node, blob, *objects[0], NOW + 3)
    db = sqlite3.connect(tmp_path / "mailbox" / DB_FILE)
    with db:  # only the entry expires
        db.execute("UPDATE items SET expires = ? WHERE kind = 1", (int(NOW),))
    db.close()
    result = store.cleanup(NOW + 4)
    assert (result.expired, result.orphans) == (1, 1)
    assert store.cursors(mailbox) == [] and store.totals.items == 0


def test_repushing_an_expired_file_object_keeps_its_file(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes, tmp_path: Path
) -> None:
    """An expired copy not cleaned up yet is replaced under the same path: the new file stays."""
    store = open_store(retention_s=100)
    a, b = Feed(keys), Feed(keys)
    store.join(mailbox, a.node, NOW)
    store.join(mailbox, b.node, NOW)
    raw, blob, [(oid, sealed)] = a.put(os.urandom(CHUNK))  # one full chunk: a file
    store.push_entry(mailbox, a.node, raw, NOW)
    store.push_object(mailbox, a.node, blob, oid, sealed, NOW)
    path = tmp_path / "mailbox" / "objects" / mailbox.hex() / oid.hex()
    assert path.is_file()
    # 150 s later (expired, no cleanup yet) device b puts the same file.
    later = NOW + 150
    assert store.push_entry(
        mailbox, b.node, b.entry(kind=Kind.PUT, blob=blob, size=CHUNK), later
    ).new
    pushed = store.push_object(mailbox, b.node, blob, oid, sealed, later)
    assert pushed.new and pushed.evicted.expired == 1
    assert path.is_file()
    assert store.fetch(mailbox, oid, later) == FetchResult(sealed)
    # And it survives the next cleanup, which removes only a's expired entry.
    result = store.cleanup(later + 1)
    assert result.expired == 1 and result.stray_files == 0
    assert store.fetch(mailbox, oid, later + 1) == FetchResult(sealed)


def test_entry_acked_before_its_chunks_is_not_evicted_under_quota(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes
) -> None:
    """B ACKs a PUT entry before A pushed its chunks: A's push must still complete."""
    store = open_store(group_quota_bytes=3 * CHUNK)
    a, b = Feed(keys), Feed(keys)
    store.join(mailbox, a.node, NOW)
    store.join(mailbox, b.node, NOW)
    # An earlier small file, which b got whole: delivered, it may make room.
    raw0, blob0, objects0 = a.put(os.urandom(CHUNK))
    store.push_entry(mailbox, a.node, raw0, NOW)
    for oid, sealed in objects0:
        store.push_object(mailbox, a.node, blob0, oid, sealed, NOW)
    raw, blob, objects = a.put(os.urandom(3 * CHUNK))  # manifest + 3 chunks
    cursor = store.push_entry(mailbox, a.node, raw, NOW).cursor
    store.ack(mailbox, b.node, cursor, NOW)  # b pulled the entry; no chunk is there yet
    pushed = [
        store.push_object(mailbox, a.node, blob, oid, sealed, NOW) for oid, sealed in objects[:3]
    ]
    assert all(p.new for p in pushed)
    assert pushed[-1].evicted.quota == 2  # the earlier file (entry and chunk) made room
    # The last chunk does not fit: nothing of the blob being pushed may go.
    refused(
        MailboxErrorCode.QUOTA_EXCEEDED,
        lambda: store.push_object(mailbox, a.node, blob, *objects[3], NOW),
    )
    assert store.cursors(mailbox) == [3, 4, 5, 6]
    for oid, sealed in objects[:3]:
        assert store.fetch(mailbox, oid, NOW).data == sealed


def test_cleanup_returns_free_pages_to_the_filesystem(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes, tmp_path: Path
) -> None:
    """Many inline items expire: the database file shrinks, the freelist empties."""
    store = open_store(retention_s=100)
    feed = Feed(keys)
    store.join(mailbox, feed.node, NOW)
    for _ in range(200):
        raw, blob, [(oid, sealed)] = feed.put(os.urandom(60_000))  # inline (< 64 KiB)
        store.push_entry(mailbox, feed.node, raw, NOW)
        store.push_object(mailbox, feed.node, blob, oid, sealed, NOW)
    database = tmp_path / "mailbox" / DB_FILE
    store.cleanup(NOW)  # checkpoints the WAL into the file: it now holds the items
    full = database.stat().st_size
    assert full > 200 * 60_000
    run = store.start_cleanup(NOW + 200)
    while run.step():
        pass
    assert run.result().expired == 400
    assert run.steps < 20  # incremental_vacuum(N) frees N pages per step, not one
    db = sqlite3.connect(database)
    assert db.execute("PRAGMA freelist_count").fetchone()[0] == 0
    db.close()
    assert database.stat().st_size < full // 20


def test_cleanup_goes_in_bounded_steps(
    open_store: Callable[..., MailboxStore],
    keys: GroupKeys,
    mailbox: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step deletes at most a batch; pushes between steps are served and kept."""
    monkeypatch.setattr(relayd_defaults, "MAILBOX_CLEANUP_BATCH", 10)
    store = open_store(retention_s=100)
    feed = Feed(keys)
    store.join(mailbox, feed.node, NOW)
    for _ in range(35):
        store.push_entry(mailbox, feed.node, feed.entry(), NOW)
    run = store.start_cleanup(NOW + 100)
    assert run.step() and run.expired == 10
    # Between steps the store serves pushes as usual.
    late = store.push_entry(mailbox, feed.node, feed.entry(), NOW + 100)
    assert late.new and late.cursor == 36
    assert run.step() and run.expired == 20
    while run.step():
        pass
    assert not run.step()  # done stays done
    result = run.result()
    assert result.expired == 35 and run.steps > 4
    assert store.cursors(mailbox) == [36]
    assert store.mailbox_stats(mailbox) == (36, 1, store.totals.bytes)
    assert store.totals.items == 1


def test_fetch_drops_damaged_objects_and_keeps_unreadable_ones(
    open_store: Callable[..., MailboxStore],
    keys: GroupKeys,
    mailbox: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = open_store()
    feed = Feed(keys)
    member = feed.identity
    store.join(mailbox, feed.node, NOW)
    raw, blob, objects = feed.put(os.urandom(3 * CHUNK))
    store.push_entry(mailbox, feed.node, raw, NOW)
    for oid, sealed in objects:
        store.push_object(mailbox, feed.node, blob, oid, sealed, NOW)
    (_, _), (first, _), (second, _), (third, sealed3) = objects
    files = tmp_path / "mailbox" / "objects" / mailbox.hex()
    # A transient failure (out of file descriptors): a clear refusal, the item stays.
    real_read = Path.read_bytes

    def no_fds(path: Path) -> bytes:
        if path.parent == files:
            raise OSError(errno.EMFILE, "Too many open files")
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", no_fds)
    error = refused(MailboxErrorCode.TRY_AGAIN, lambda: store.fetch(mailbox, third, NOW))
    assert "EMFILE" in str(error)
    assert not MailboxErrorCode.TRY_AGAIN.fatal
    # Through the session: a non-fatal ERROR; the stream goes on.
    session = session_for(store, member)
    key = mailbox_key(keys)
    join = wire.sign_join(
        key, keys.group_id, RELAY.node_id, member.node_id, b"n" * 32, notify=False
    )
    session.handle(wire.encode(join), NOW)
    assert session.mailbox == mailbox
    outcome = session.handle(wire.encode(wire.Fetch(third)), NOW)
    answer = reply(outcome.replies)
    assert isinstance(answer, wire.Error) and answer.code == MailboxErrorCode.TRY_AGAIN
    assert not outcome.close and outcome.result == "try-again" and outcome.damaged == 0
    monkeypatch.setattr(Path, "read_bytes", real_read)
    assert store.fetch(mailbox, third, NOW) == FetchResult(sealed3)
    # A file gone, or bytes that do not match the name: dropped, reported damaged.
    (files / first.hex()).unlink()
    assert store.fetch(mailbox, first, NOW) == FetchResult(None, damaged=True)
    (files / second.hex()).write_bytes(b"rotten")
    outcome = session.handle(wire.encode(wire.Fetch(second)), NOW)
    assert outcome.result == "not-found" and outcome.damaged == 1
    assert store.cursors(mailbox) == [1, 2, 5]
    assert store.fetch(mailbox, second, NOW) == FetchResult(None)  # gone, not damaged again


def test_items_survive_reopening_and_schema_is_versioned(
    open_store: Callable[..., MailboxStore], keys: GroupKeys, mailbox: bytes, tmp_path: Path
) -> None:
    store = open_store()
    feed = Feed(keys)
    log_id = store.join(mailbox, feed.node, NOW).log_id
    store.push_entry(mailbox, feed.node, feed.entry(), NOW)
    store.close()
    again = open_store()
    info = again.join(mailbox, feed.node, NOW)
    assert (info.log_id, info.head) == (log_id, 1)
    again.close()
    db = sqlite3.connect(tmp_path / "mailbox" / DB_FILE)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ConfigError, match="newer than this relayd"):
        MailboxStore.open(tmp_path / "mailbox", MailboxConfig())


def test_a_store_left_open_across_a_reboot_gives_every_log_a_new_log_id(
    keys: GroupKeys, mailbox: bytes, tmp_path: Path
) -> None:
    """synchronous=NORMAL may lose the last commits to a power loss, never to a killed
    process: only a store the machine went down under (or one an operator marked,
    after restoring a backup) renews its log ids, so nodes start over."""
    directory = tmp_path / "mailbox"
    config = MailboxConfig(min_free_bytes=0)
    feed = Feed(keys)

    def opened(boot: str) -> MailboxStore:
        return MailboxStore.open(directory, config, boot_id=lambda: boot)

    store = opened("boot-1")
    assert (directory / RUNNING_MARK).read_text().strip() == "boot-1"
    first = store.join(mailbox, feed.node, NOW).log_id
    store.push_entry(mailbox, feed.node, feed.entry(), NOW)
    store._db.close()  # killed: no close(), the mark stays

    again = opened("boot-1")  # the same boot: a killed process lost nothing
    assert again.renewed_log_ids == 0
    assert again.join(mailbox, feed.node, NOW).log_id == first
    again._db.close()

    rebooted = opened("boot-2")  # the machine went down under it
    assert rebooted.renewed_log_ids == 1
    info = rebooted.join(mailbox, feed.node, NOW)
    assert info.log_id != first and info.head == 1  # items kept, cursors not to be trusted
    renewed = info.log_id
    rebooted.close()
    assert not (directory / RUNNING_MARK).exists()

    clean = opened("boot-3")  # closed cleanly before: nothing to renew
    assert clean.renewed_log_ids == 0
    assert clean.join(mailbox, feed.node, NOW).log_id == renewed
    clean.close()

    (directory / RUNNING_MARK).write_text("restored\n")  # an operator after a restore
    restored = opened("boot-3")
    assert restored.renewed_log_ids == 1
    assert restored.join(mailbox, feed.node, NOW).log_id != renewed
    restored.close()


# --- the session: membership -----------------------------------------------------------------


RELAY = Identity.generate(os.urandom)


def session_for(store: MailboxStore, node: Identity, nonce: bytes = b"n" * 32) -> MailboxSession:
    return MailboxSession(store, RELAY.node_id, node.node_id, nonce)


def reply(outcome_replies: list[bytes]) -> wire.RelayToNode:
    (body,) = outcome_replies
    return wire.decode_relay_to_node_untrusted(body)


def test_membership_proof_is_required_and_bound(
    open_store: Callable[..., MailboxStore], keys: GroupKeys
) -> None:
    store = open_store()
    member = Identity.generate(os.urandom)
    key = mailbox_key(keys)
    nonce = os.urandom(32)
    challenge = wire.decode_relay_to_node_untrusted(session_for(store, member, nonce).challenge())
    assert challenge == wire.Challenge(nonce)

    def join(session: MailboxSession, join: wire.Join) -> wire.RelayToNode:
        outcome = session.handle(wire.encode(join), NOW)
        return reply(outcome.replies)

    # Requests before JOIN are refused, fatally.
    early = session_for(store, member, nonce)
    outcome = early.handle(wire.encode(wire.Pull(0, 10)), NOW)
    assert outcome.close and reply(outcome.replies) == wire.Error(
        int(MailboxErrorCode.PROTOCOL), "JOIN first"
    )
    # A key that is not the mailbox's, a proof for another relay, another node,
    # another nonce or another group id: all refused.
    group = keys.group_id

    def sign(key: Identity, relay: NodeId, node: NodeId, nonce: bytes) -> wire.Join:
        return wire.sign_join(key, group, relay, node, nonce, notify=False)

    outsider = mailbox_key(GroupSecret.generate(os.urandom).keys())
    forged = replace(sign(outsider, RELAY.node_id, member.node_id, nonce), mailbox=key.node_id.raw)
    other_relay = sign(key, Identity.generate(os.urandom).node_id, member.node_id, nonce)
    other_node = sign(key, RELAY.node_id, Identity.generate(os.urandom).node_id, nonce)
    old_nonce = sign(key, RELAY.node_id, member.node_id, os.urandom(32))
    other_group = replace(sign(key, RELAY.node_id, member.node_id, nonce), group_id=b"g" * 32)
    for attempt in (forged, other_relay, other_node, old_nonce, other_group):
        session = session_for(store, member, nonce)
        answer = join(session, attempt)
        assert isinstance(answer, wire.Error) and answer.code == MailboxErrorCode.BAD_PROOF
        assert session.state is SessionState.CLOSED
    assert store.totals.groups == 0  # nothing was created for them
    # The real proof works; the mailbox is filed under the public key and the
    # group id (no secret on the relay).
    session = session_for(store, member, nonce)
    answer = join(session, sign(key, RELAY.node_id, member.node_id, nonce))
    assert isinstance(answer, wire.Joined) and answer.head == 0 and len(answer.log_id) == 16
    assert session.mailbox == wire.mailbox_address(key.node_id.raw, keys.group_id)
    feed = Feed(keys, member)
    outcome = session.handle(wire.encode(wire.PushEntry(feed.entry())), NOW)
    assert reply(outcome.replies) == wire.Pushed(1, True, outcome_used(store, session.mailbox))
    assert outcome.new_head == 1
    # Non-fatal refusals keep the stream; malformed frames end it.
    outcome = session.handle(wire.encode(wire.Fetch(b"\x00" * 32)), NOW)
    assert not outcome.close and reply(outcome.replies).code == MailboxErrorCode.NOT_FOUND  # type: ignore[union-attr]
    outcome = session.handle(b"\xc1garbage", NOW)
    assert outcome.close and reply(outcome.replies).code == MailboxErrorCode.PROTOCOL  # type: ignore[union-attr]


def outcome_used(store: MailboxStore, mailbox: bytes) -> int:
    return store.mailbox_stats(mailbox)[2]


def test_a_bogus_group_id_cannot_lock_the_members_out(
    open_store: Callable[..., MailboxStore], keys: GroupKeys
) -> None:
    """A holder of the secret JOINs claiming another group id and pushes first: it gets a
    mailbox of its own; the members' mailbox is untouched and takes only their group's."""
    store = open_store()
    key = mailbox_key(keys)
    rogue, member = Identity.generate(os.urandom), Identity.generate(os.urandom)
    bogus = b"\xee" * 32
    rogue_session = session_for(store, rogue)
    joined = rogue_session.handle(
        wire.encode(wire.sign_join(key, bogus, RELAY.node_id, rogue.node_id, b"n" * 32,
                                   notify=False)), NOW,
    )  # fmt: skip
    assert isinstance(reply(joined.replies), wire.Joined)
    bogus_entry = sign_entry(
        rogue, group_id=bogus, seq=1, prev=b"", hlc=int(NOW * 1000) << 16, kind=Kind.DELETE,
        blob=b"", size=0, meta=seal_meta(keys, Meta(key="x"), os.urandom),
    ).encode()  # fmt: skip
    pushed = rogue_session.handle(wire.encode(wire.PushEntry(bogus_entry)), NOW)
    assert isinstance(reply(pushed.replies), wire.Pushed)
    # The members' mailbox: another address, bound to the real group id.
    session = session_for(store, member)
    join = wire.sign_join(key, keys.group_id, RELAY.node_id, member.node_id, b"n" * 32,
                          notify=False)  # fmt: skip
    answer = reply(session.handle(wire.encode(join), NOW).replies)
    assert isinstance(answer, wire.Joined) and answer.head == 0
    assert session.mailbox != rogue_session.mailbox
    feed = Feed(keys, member)
    assert isinstance(reply(session.handle(wire.encode(wire.PushEntry(feed.entry())), NOW).replies),
                      wire.Pushed)  # fmt: skip
    refusal = reply(session.handle(wire.encode(wire.PushEntry(bogus_entry)), NOW).replies)
    assert isinstance(refusal, wire.Error) and refusal.code == MailboxErrorCode.BAD_ENTRY
    assert "wrong-group" in refusal.message
    assert store.cursors(session.mailbox) == [1]


def test_mailbox_key_is_stable_across_epochs_and_distinct_per_group() -> None:
    secret = GroupSecret.generate(os.urandom)
    first = mailbox_key(secret.keys()).node_id
    renewed = mailbox_key(GroupSecret(secret.secret, secret.epoch + 1).keys()).node_id
    other = mailbox_key(GroupSecret.generate(os.urandom).keys()).node_id
    assert first == renewed != other
    assert isinstance(first, NodeId)
    assert first.raw != secret.keys().group_id  # not the group id either


def test_wire_round_trips_and_garbage_is_a_clean_error() -> None:
    messages: list[wire.NodeToRelay | wire.RelayToNode] = [
        wire.Challenge(b"c" * 32),
        wire.Join(b"m" * 32, b"g" * 32, b"p" * 64, True),
        wire.Joined(b"l" * 16, 5, 100, 1000, 60, 4096),
        wire.PushEntry(b"e" * 100),
        wire.PushChunk(b"b" * 32, b"o" * 32, b"d" * 1000),
        wire.Pushed(3, False, 77),
        wire.Pull(0, 100),
        wire.Items((wire.EntryItem(1, b"e"), wire.ObjectItem(2, b"o" * 32, 9, b"b" * 32)), True, 9),
        wire.Fetch(b"o" * 32),
        wire.ObjectData(b"o" * 32, b"x" * 10),
        wire.Ack(4),
        wire.Acked(4),
        wire.Notify(9),
        wire.Error(5, "quota"),
    ]
    for message in messages:
        body = wire.encode(message)
        decoded: object
        try:
            decoded = wire.decode_node_to_relay_untrusted(body)
        except Exception:
            decoded = wire.decode_relay_to_node_untrusted(body)
        assert decoded == message
    from p2psync.errors import BadFrame

    for junk in (b"", b"\x90", b"\x91\x63", b"\x92\x06\xa1x", os.urandom(64)):
        for decode in (wire.decode_node_to_relay_untrusted, wire.decode_relay_to_node_untrusted):
            try:
                decode(junk)
            except BadFrame:
                pass
