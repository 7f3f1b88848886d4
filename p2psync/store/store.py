"""The local store: feeds of signed entries, sealed objects, and their index.

Theory
------
Everything a device knows lives here, and every write lands here first
(local first): a ``put`` is complete when its objects are fsynced and its
entry is committed, whether or not any peer is reachable.

- **Objects** (sealed chunks and manifests, see :mod:`p2psync.store.objects`)
  are files named by their hash (:mod:`p2psync.store.files`).
- **SQLite** (WAL mode) indexes entries, objects and blobs:

  ``entries``      every accepted entry; ``cursor`` is the local arrival
                   order (AUTOINCREMENT: never reused), ``raw`` the exact
                   signed bytes for forwarding to peers
  ``heads``        the winning entry per key (highest ``(hlc, author)``);
                   a DELETE head is a tombstone hiding older values
  ``objects``      which objects are present on disk
  ``blobs``        per blob: size, chunk count once known, complete or not
  ``blob_chunks``  a multi-chunk blob's chunk list, from its manifest

- Entries whose blob is not complete are **pending**: listed, not readable.
  :meth:`Store.missing_objects` tells sync what to fetch; every fetched
  object is verified by hash before it is stored (:meth:`Store.add_object`).
- Only the blobs of *live* heads are fetched and kept. A value that stops
  being live - deleted or overwritten, here or by a peer's entry - has its
  objects freed in the same call that stored the new head, right after its
  commit (:meth:`Store.release_blob`: work proportional to that blob, chunks
  another live value shares are kept), as Syncthing does without versioning.
  An object still on its way for such a value is refused with
  :class:`~p2psync.errors.NotWanted` (nobody's fault). :meth:`Store.gc`
  sweeps what is left (files of crashed writes, pre-existing garbage).
- **Readers pin what they read.** :meth:`Store.iter_blob` of a multi-chunk
  blob records a row in ``blob_readers`` (in the database, so a CLI ``get``
  pins against a daemon's overwrite too) before its first chunk and deletes
  it when the iterator ends or is closed. :meth:`Store.release_blob` leaves a
  pinned blob - and any chunk a pinned blob shares - alone; the reader that
  unpins last frees it. So a reader sees the value it started with, whole,
  even if the key is overwritten or deleted mid-read. A pin whose process
  died is stale and is dropped when met (the pid is recorded).

Concurrency: one writer at a time per home (``BEGIN IMMEDIATE``); the CLI
and a daemon may both open the store, SQLite's busy timeout serialises them.
The store does blocking I/O; trio shells call it via ``trio.to_thread``.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import blake3

from p2psync import defaults
from p2psync.crypto.group import GroupKeys, GroupSecret
from p2psync.crypto.identity import Identity, NodeId, RandomBytes
from p2psync.errors import (
    BadFrame,
    ConfigError,
    IntegrityError,
    LocalProtocolError,
    NotFound,
    NotWanted,
)
from p2psync.proto.entry import (
    Entry,
    EntryRejected,
    FeedTip,
    HybridClock,
    Kind,
    check_entry_context,
    decode_entry_untrusted,
    sign_entry,
    signatures_valid,
)
from p2psync.store.files import CorruptObject, ObjectFiles
from p2psync.store.objects import (
    OVERHEAD,
    ChunkRef,
    Keyring,
    Manifest,
    Meta,
    ObjectKind,
    decode_manifest_untrusted,
    key_hash,
    object_id,
    open_meta,
    open_sealed_object,
    read_header_untrusted,
    seal,
    seal_meta,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v ANY) STRICT;
CREATE TABLE IF NOT EXISTS entries (
    cursor    INTEGER PRIMARY KEY AUTOINCREMENT,
    entry_id  BLOB NOT NULL UNIQUE,
    author    BLOB NOT NULL,
    seq       INTEGER NOT NULL,
    hlc       INTEGER NOT NULL,
    kind      INTEGER NOT NULL,
    blob      BLOB,
    size      INTEGER NOT NULL,
    key_hash  BLOB,
    raw       BLOB NOT NULL,
    UNIQUE (author, seq)
) STRICT;
CREATE TABLE IF NOT EXISTS heads (
    key_hash  BLOB PRIMARY KEY,
    cursor    INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS objects (
    object_id BLOB PRIMARY KEY,
    kind      INTEGER NOT NULL,
    size      INTEGER NOT NULL,
    data      BLOB             -- the sealed bytes of a small object, else NULL (a file)
) STRICT;
CREATE TABLE IF NOT EXISTS blobs (
    blob_id     BLOB PRIMARY KEY,
    size        INTEGER NOT NULL,
    chunk_count INTEGER,
    complete    INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS blob_chunks (
    blob_id   BLOB NOT NULL,
    idx       INTEGER NOT NULL,
    chunk_id  BLOB NOT NULL,
    size      INTEGER NOT NULL,
    PRIMARY KEY (blob_id, idx)
) STRICT;
CREATE INDEX IF NOT EXISTS blob_chunks_by_chunk ON blob_chunks (chunk_id);
CREATE INDEX IF NOT EXISTS entries_by_hlc ON entries (hlc);
-- Added after schema 1 shipped (additive): which entries name a blob, so a
-- delete frees its value's objects without scanning the store.
CREATE INDEX IF NOT EXISTS entries_by_blob ON entries (blob);
-- Added after schema 1 shipped: IF NOT EXISTS makes it an additive migration.
CREATE TABLE IF NOT EXISTS mailbox_state (
    relay       BLOB NOT NULL,     -- the relay's NodeId
    mailbox     BLOB NOT NULL,     -- the group's mailbox id there
    log_id      BLOB NOT NULL,     -- the relay's log the cursors belong to
    pull_cursor INTEGER NOT NULL,  -- relay cursor of the last item pulled and stored
    push_cursor INTEGER NOT NULL,  -- local cursor of our last entry the relay acknowledged
    PRIMARY KEY (relay, mailbox)
) STRICT;
-- Added after schema 1 shipped (additive): when each peer was last connected,
-- for `p2psync devices` without a daemon (written at most once a minute).
CREATE TABLE IF NOT EXISTS peer_seen (
    node_id BLOB PRIMARY KEY,   -- the peer's NodeId
    seen_ms INTEGER NOT NULL    -- unix ms it was last seen connected
) STRICT;
-- Added after schema 1 shipped (additive): blobs being read right now, which
-- release_blob and gc keep until the reader is done (any process of this home).
CREATE TABLE IF NOT EXISTS blob_readers (
    reader  INTEGER PRIMARY KEY AUTOINCREMENT,
    blob_id BLOB NOT NULL,
    pid     INTEGER NOT NULL    -- the reading process: its pin is stale once it died
) STRICT;
CREATE INDEX IF NOT EXISTS blob_readers_by_blob ON blob_readers (blob_id);
"""


class BlobPending(NotFound):
    """The entry exists but its blob has not fully arrived yet."""


@dataclass(frozen=True, slots=True)
class StoredEntry:
    """An entry as this device holds it, with what only the group can read."""

    cursor: int
    entry: Entry
    meta: Meta | None  # None for entries whose meta we cannot open
    complete: bool  # blob fully present (always True for non-PUT)

    @property
    def key(self) -> str | None:
        return None if self.meta is None else self.meta.key


@dataclass(frozen=True, slots=True)
class InsertResult:
    accepted: list[Entry]
    accepted_raws: list[bytes]  # the received bytes of ``accepted``, same order
    duplicates: int
    rejected: list[tuple[bytes, str]]  # (raw prefix for logs, reason)


@dataclass(frozen=True, slots=True)
class GcResult:
    objects_removed: int
    bytes_removed: int


class Store:
    """One device's store under ``root``. Open with :meth:`open`; close it."""

    def __init__(
        self,
        root: Path,
        identity: Identity,
        secrets: Iterable[GroupSecret],
        *,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self.root = root
        self.identity = identity
        self._random_bytes = random_bytes
        self.keyring: dict[int, GroupKeys] = {s.epoch: s.keys() for s in secrets}
        self.files = ObjectFiles(root / "objects")
        self.files.clean_temp()
        self._db = sqlite3.connect(
            root / "store.sqlite", isolation_level=None, check_same_thread=False
        )
        self._db.execute(f"PRAGMA busy_timeout = {defaults.SQLITE_BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL: a commit survives a crash of any process and never
        # corrupts; after a power loss the last few commits may roll back
        # (SQLite's documented trade-off). Objects are fsynced before their
        # commit, so a rolled-back put leaves only files that gc() collects.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._write():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            row = self._db.execute("SELECT v FROM meta WHERE k = 'schema'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise ConfigError(
                    f"store schema {row[0]} is not supported by this version ({SCHEMA_VERSION})"
                )
        self._clock = HybridClock(self._max_hlc())
        self._verify_pool: ThreadPoolExecutor | None = None  # made on first big batch
        self._superseded: list[bytes] = []  # blobs the write in progress made not live
        self.objects_released = 0  # objects freed because their value stopped being live
        self._our_pins: set[int] = set()  # blob_readers rows of iterators still open
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        if self._verify_pool is not None:
            self._verify_pool.shutdown(wait=False, cancel_futures=True)
            self._verify_pool = None
        if self._our_pins:  # iterators left open: their pins must not outlive us
            with self._write() as db:
                db.executemany(
                    "DELETE FROM blob_readers WHERE reader = ?", [(r,) for r in self._our_pins]
                )
            self._our_pins.clear()
        self._closed = True
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- keys ---------------------------------------------------------------

    @property
    def has_group(self) -> bool:
        return bool(self.keyring)

    @property
    def keys(self) -> GroupKeys:
        """Keys of the newest epoch; what new data is sealed with."""
        if not self.keyring:
            raise ConfigError(
                "this device is in no group yet: run `p2psync group create` or `p2psync join CODE`"
            )
        return self.keyring[max(self.keyring)]

    def add_secret(self, secret: GroupSecret) -> None:
        if self.keyring and secret.keys().group_id != self.keys.group_id:
            raise ConfigError("this device already belongs to another group")
        self.keyring[secret.epoch] = secret.keys()

    # --- transactions ---------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            self._superseded.clear()  # nothing was superseded after all
            raise
        self._db.execute("COMMIT")

    def _max_hlc(self) -> int:
        row = self._db.execute("SELECT COALESCE(MAX(hlc), 0) FROM entries").fetchone()
        return int(row[0])

    # --- objects --------------------------------------------------------------

    def has_object(self, oid: bytes) -> bool:
        row = self._db.execute("SELECT 1 FROM objects WHERE object_id = ?", (oid,)).fetchone()
        return row is not None

    def read_object(self, oid: bytes) -> bytes:
        """The sealed bytes of a stored object, hash-verified."""
        row = self._db.execute("SELECT data FROM objects WHERE object_id = ?", (oid,)).fetchone()
        try:
            if row is None or row[0] is None:
                return self.files.read_verified(oid)
            data = bytes(row[0])
            if object_id(data) != oid:
                raise CorruptObject(oid, "its hash no longer matches its name (in the database)")
            return data
        except CorruptObject:
            self._forget_object(oid)
            raise

    def _object_row(
        self, oid: bytes, sealed: bytes, kind: ObjectKind
    ) -> tuple[bytes, int, int, bytes | None]:
        """Write a large object's file (fsynced); return its ``objects`` row.

        Objects up to SMALL_OBJECT_MAX live in the row itself: a small value
        then costs one SQLite commit instead of a file, an fsync and a rename.
        """
        if len(sealed) <= defaults.SMALL_OBJECT_MAX:
            return (oid, int(kind), len(sealed), sealed)
        if not self.files.exists(oid):
            self.files.write(oid, sealed, sync_dir=False)
        return (oid, int(kind), len(sealed), None)

    def _store_object(self, oid: bytes, sealed: bytes, kind: ObjectKind) -> None:
        if not self.has_object(oid):
            row = self._object_row(oid, sealed, kind)
            if row[3] is None:
                self.files.sync_dirs({oid})
            self._db.execute("INSERT OR IGNORE INTO objects VALUES (?, ?, ?, ?)", row)

    def _forget_object(self, oid: bytes) -> None:
        """An object went bad on disk: mark it missing so sync fetches it again."""
        with self._write() as db:
            db.execute("DELETE FROM objects WHERE object_id = ?", (oid,))
            db.execute(
                "UPDATE blobs SET complete = 0 WHERE blob_id = ? OR blob_id IN "
                "(SELECT blob_id FROM blob_chunks WHERE chunk_id = ?)",
                (oid, oid),
            )

    def add_object(self, oid: bytes, sealed: bytes) -> bool:
        """Store an object received from a peer; verify it first.

        Returns True if it was new. Raises :class:`IntegrityError` if the bytes
        do not hash to ``oid``, :class:`BadFrame` if it is malformed or does
        not fit the blob that references it, :class:`NotWanted` if no blob
        references it (any more: its value was deleted or overwritten).
        """
        if object_id(sealed) != oid:
            raise IntegrityError(f"object {oid.hex()[:16]} does not match its hash")
        kind, _ = read_header_untrusted(sealed)
        if kind is ObjectKind.META:
            raise BadFrame("meta objects travel inside entries, not as objects")
        with self._write() as db:
            if self.has_object(oid):
                return False
            blob = db.execute("SELECT size FROM blobs WHERE blob_id = ?", (oid,)).fetchone()
            if blob is not None:
                self._check_blob_root(oid, sealed, kind, int(blob[0]))
            elif not self._is_referenced_chunk(oid):
                raise NotWanted(f"object {oid.hex()[:16]} is part of no value we keep")
            elif kind is ObjectKind.MANIFEST or not self._is_wanted_chunk(oid, len(sealed)):
                raise BadFrame(f"object {oid.hex()[:16]} does not fit the blob that names it")
            self._store_object(oid, sealed, kind)
            self._refresh_completeness(oid)
        return True

    def _check_blob_root(self, oid: bytes, sealed: bytes, kind: ObjectKind, size: int) -> None:
        """The object named by an entry's blob id: one chunk, or a manifest."""
        if kind is ObjectKind.CHUNK:
            if size > defaults.CHUNK_SIZE or len(sealed) - OVERHEAD != size:
                raise BadFrame("chunk size does not match the entry's blob size")
            self._db.execute(
                "UPDATE blobs SET chunk_count = 1 WHERE blob_id = ? AND chunk_count IS NULL",
                (oid,),
            )
            return
        manifest = decode_manifest_untrusted(
            open_sealed_object(self.keyring, sealed, ObjectKind.MANIFEST)
        )
        if manifest.total_size != size:
            raise BadFrame("manifest total does not match the entry's blob size")
        self._record_manifest(oid, manifest)

    def _record_manifest(self, blob_id: bytes, manifest: Manifest) -> None:
        self._db.executemany(
            "INSERT OR IGNORE INTO blob_chunks VALUES (?, ?, ?, ?)",
            [(blob_id, i, c.chunk_id, c.size) for i, c in enumerate(manifest.chunks)],
        )
        self._db.execute(
            "UPDATE blobs SET chunk_count = ? WHERE blob_id = ?", (len(manifest.chunks), blob_id)
        )

    def _is_referenced_chunk(self, oid: bytes) -> bool:
        row = self._db.execute("SELECT 1 FROM blob_chunks WHERE chunk_id = ? LIMIT 1", (oid,))
        return row.fetchone() is not None

    def _is_wanted_chunk(self, oid: bytes, sealed_size: int) -> bool:
        row = self._db.execute(
            "SELECT size FROM blob_chunks WHERE chunk_id = ? LIMIT 1", (oid,)
        ).fetchone()
        return row is not None and int(row[0]) + OVERHEAD == sealed_size

    def _refresh_completeness(self, oid: bytes) -> None:
        self._db.execute(
            """
            UPDATE blobs SET complete = 1
            WHERE (blob_id = ? OR blob_id IN (SELECT blob_id FROM blob_chunks WHERE chunk_id = ?))
              AND chunk_count IS NOT NULL
              AND blob_id IN (SELECT object_id FROM objects)
              AND (chunk_count = 1 AND NOT EXISTS
                      (SELECT 1 FROM blob_chunks bc WHERE bc.blob_id = blobs.blob_id)
                   OR chunk_count = (SELECT COUNT(*) FROM blob_chunks bc
                                     JOIN objects o ON o.object_id = bc.chunk_id
                                     WHERE bc.blob_id = blobs.blob_id))
            """,
            (oid, oid),
        )

    def missing_objects(self, blob_id: bytes) -> list[bytes]:
        """Object ids still needed to complete ``blob_id`` (root first)."""
        row = self._db.execute(
            "SELECT chunk_count, complete FROM blobs WHERE blob_id = ?", (blob_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no entry names blob {blob_id.hex()[:16]}")
        if row[1]:
            return []
        if not self.has_object(blob_id):
            return [blob_id]
        missing = self._db.execute(
            "SELECT chunk_id FROM blob_chunks WHERE blob_id = ? AND chunk_id NOT IN "
            "(SELECT object_id FROM objects) ORDER BY idx",
            (blob_id,),
        ).fetchall()
        return [bytes(r[0]) for r in missing]

    def wanted_blobs(self) -> list[bytes]:
        """Blobs of live heads that are not complete: what sync should fetch."""
        rows = self._db.execute(
            "SELECT e.blob FROM heads h JOIN entries e ON e.cursor = h.cursor "
            "JOIN blobs b ON b.blob_id = e.blob WHERE e.kind = ? AND b.complete = 0",
            (int(Kind.PUT),),
        ).fetchall()
        return [bytes(r[0]) for r in rows]

    def blob_progress(self, blob_id: bytes) -> tuple[int, int]:
        """(chunks present, chunks needed) for a blob; (0, 0) if unknown.

        Until the manifest of a multi-chunk blob arrives the count is (0, 1).
        """
        row = self._db.execute(
            "SELECT chunk_count, complete FROM blobs WHERE blob_id = ?", (blob_id,)
        ).fetchone()
        if row is None:
            return (0, 0)
        if row[1]:
            count = int(row[0] or 1)
            return (count, count)
        total = int(row[0]) if row[0] is not None else 1
        return (total - len(self.missing_objects(blob_id)), total)

    # --- blobs ----------------------------------------------------------------

    def put_blob(
        self, reader: Readable, *, progress: Callable[[int], None] | None = None
    ) -> tuple[bytes, int]:
        """Seal and store a stream; return ``(blob_id, size)``.

        Holds one chunk of plaintext and one of ciphertext in memory at a time.
        """
        keys = self.keys
        refs: list[ChunkRef] = []
        rows: list[tuple[bytes, int, int, bytes | None]] = []  # one small chunk at most
        total = 0
        while True:
            plaintext = _read_chunk(reader)
            filled = len(plaintext)
            if filled == 0 and refs:
                break
            if len(refs) >= defaults.MAX_BLOB_CHUNKS:
                raise LocalProtocolError(
                    f"file is larger than the largest blob "
                    f"({defaults.MAX_BLOB_CHUNKS * defaults.CHUNK_SIZE} bytes)"
                )
            sealed = seal(keys, ObjectKind.CHUNK, plaintext)
            oid = object_id(sealed)
            rows.append(self._object_row(oid, sealed, ObjectKind.CHUNK))
            refs.append(ChunkRef(oid, filled))
            total += filled
            if progress is not None:
                progress(total)
            if filled < defaults.CHUNK_SIZE:
                break
        # Files are fsynced one by one; their directories once each, then one
        # transaction records them all (a crash before it leaves stray files
        # that gc() removes).
        self.files.sync_dirs({row[0] for row in rows if row[3] is None})
        with self._write() as db:
            db.executemany("INSERT OR IGNORE INTO objects VALUES (?, ?, ?, ?)", rows)
            manifest = Manifest(total, tuple(refs)) if len(refs) > 1 else None
            if manifest is None:
                blob_id = refs[0].chunk_id
            else:
                sealed_manifest = seal(keys, ObjectKind.MANIFEST, manifest.encode())
                blob_id = object_id(sealed_manifest)
                self._store_object(blob_id, sealed_manifest, ObjectKind.MANIFEST)
            db.execute(
                "INSERT INTO blobs VALUES (?, ?, ?, 1) ON CONFLICT (blob_id) "
                "DO UPDATE SET complete = 1, chunk_count = excluded.chunk_count",
                (blob_id, total, len(refs)),
            )
            if manifest is not None:
                self._record_manifest(blob_id, manifest)
        return blob_id, total

    def blob_size(self, blob_id: bytes) -> int | None:
        """Plaintext size of a blob some entry named (complete or not); None if unknown."""
        row = self._db.execute("SELECT size FROM blobs WHERE blob_id = ?", (blob_id,)).fetchone()
        return None if row is None else int(row[0])

    def iter_blob(self, blob_id: bytes) -> Generator[bytes, None, None]:
        """Yield the plaintext of a complete blob chunk by chunk, verifying each.

        A multi-chunk blob is pinned from the first chunk until the iterator
        is exhausted or closed (see the module doc): close an iterator you
        abandon (``.close()``), from the thread that uses the store.
        """
        row = self._db.execute(
            "SELECT size, complete, chunk_count FROM blobs WHERE blob_id = ?", (blob_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"blob {blob_id.hex()[:16]} is not known here")
        if not row[1]:
            done, needed = self.blob_progress(blob_id)
            raise BlobPending(
                f"blob {blob_id.hex()[:16]} is still syncing ({done} of {needed} parts here)"
            )
        size = int(row[0])
        if row[2] is not None and int(row[2]) > 1:
            reader = self._pin(blob_id)
            try:
                yield from self._iter_complete_blob(blob_id, size)
            finally:
                self._unpin(reader, blob_id)
        else:  # one chunk: read in one go below, nothing to pin
            yield from self._iter_complete_blob(blob_id, size)

    def _pin(self, blob_id: bytes) -> int:
        """Record a reader of ``blob_id`` (still complete: checked in the same transaction)."""
        with self._write() as db:
            row = db.execute("SELECT complete FROM blobs WHERE blob_id = ?", (blob_id,)).fetchone()
            if row is None or not row[0]:  # freed or gone bad since the caller looked
                raise NotFound(f"blob {blob_id.hex()[:16]} is no longer here (changed meanwhile)")
            reader = db.execute(
                "INSERT INTO blob_readers (blob_id, pid) VALUES (?, ?)", (blob_id, os.getpid())
            ).lastrowid
        assert reader is not None  # sqlite always sets it after INSERT
        self._our_pins.add(reader)
        return reader

    def _unpin(self, reader: int, blob_id: bytes) -> None:
        """Drop a reader's pin; the last reader of a value no longer live frees it."""
        if reader not in self._our_pins or self._closed:
            return  # close() already dropped it
        self._our_pins.discard(reader)
        with self._write() as db:
            db.execute("DELETE FROM blob_readers WHERE reader = ?", (reader,))
            free = not self._is_live_blob(db, blob_id) and not self._is_pinned(db, blob_id)
        if free:
            self.objects_released += self.release_blob(blob_id).objects_removed

    def _is_pinned(self, db: sqlite3.Connection, blob_id: bytes) -> bool:
        """Some reader holds ``blob_id``; drops the pins of processes that died."""
        ours = os.getpid()
        for reader, pid in db.execute(
            "SELECT reader, pid FROM blob_readers WHERE blob_id = ?", (blob_id,)
        ).fetchall():
            if int(pid) == ours or _process_alive(int(pid)):
                return True
            db.execute("DELETE FROM blob_readers WHERE reader = ?", (reader,))
        return False

    def _iter_complete_blob(self, blob_id: bytes, size: int) -> Iterator[bytes]:
        root = self.read_object(blob_id)
        kind, _ = read_header_untrusted(root)
        if kind is ObjectKind.CHUNK:
            yield open_sealed_object(self.keyring, root, ObjectKind.CHUNK)
            return
        manifest = decode_manifest_untrusted(
            open_sealed_object(self.keyring, root, ObjectKind.MANIFEST)
        )
        if manifest.total_size != size:
            raise IntegrityError(f"blob {blob_id.hex()[:16]}: manifest size mismatch")
        for index, ref in enumerate(manifest.chunks):
            try:
                sealed = self.read_object(ref.chunk_id)
            except (CorruptObject, NotFound) as exc:
                raise CorruptObject(
                    ref.chunk_id,
                    f"blob {blob_id.hex()[:16]} chunk {index + 1} of {len(manifest.chunks)}: "
                    f"{exc}; it will be fetched again from a peer",
                ) from exc
            plaintext = open_sealed_object(self.keyring, sealed, ObjectKind.CHUNK)
            if len(plaintext) != ref.size:
                raise IntegrityError(f"blob {blob_id.hex()[:16]} chunk {index + 1}: size mismatch")
            yield plaintext

    # --- entries --------------------------------------------------------------

    def _feed_tip(self, author: NodeId) -> FeedTip | None:
        return self._feed_tip_raw(author.raw)

    def _feed_tip_raw(self, author: bytes) -> FeedTip | None:
        row = self._db.execute(
            "SELECT seq, entry_id FROM entries WHERE author = ? ORDER BY seq DESC LIMIT 1",
            (author,),
        ).fetchone()
        return None if row is None else FeedTip(int(row[0]), bytes(row[1]))

    def append(
        self,
        kind: Kind,
        meta: Meta,
        *,
        now_ms: int,
        blob: bytes = b"",
        size: int = 0,
    ) -> StoredEntry:
        """Sign and store the next entry of this device's own feed."""
        keys = self.keys
        sealed_meta = seal_meta(keys, meta, self._random_bytes)
        with self._write():
            last = self._feed_tip(self.identity.node_id)
            self._clock.observe(self._max_hlc())
            entry = sign_entry(
                self.identity,
                group_id=keys.group_id,
                seq=1 if last is None else last.seq + 1,
                prev=b"" if last is None else last.entry_id,
                hlc=self._clock.tick(now_ms),
                kind=kind,
                blob=blob,
                size=size,
                meta=sealed_meta,
            )
            cursor = self._insert_verified(entry, meta)
        self._release_superseded()
        return StoredEntry(cursor, entry, meta, True)

    def insert_entries(self, raws: Iterable[bytes], *, now_ms: int) -> InsertResult:
        """Verify and store entries received from peers, in one transaction.

        Entries are checked in order, so a batch may carry consecutive entries
        of one author. Duplicates are counted, not errors; a rejected entry
        does not stop the batch (its reason is returned and logged).

        Each entry meets the checks of :func:`~p2psync.proto.entry.verify_entry`
        plus ``fork`` (another entry holds its seq), ``bad-meta`` and
        ``malformed``, in the order and with the result of checking them one
        entry at a time against the store as the batch changes it. The work is
        batched for speed: the feed tips and held seqs of the batch's authors
        are read in one query each; a first pass predicts which entries will
        reach the signature check, and their Ed25519 checks and meta
        decryption run in worker threads (:data:`~p2psync.defaults.STORE_VERIFY_THREADS`,
        chunks of ``STORE_VERIFY_CHUNK``; libsodium releases the GIL) while
        this thread walks the batch in order, taking over any chunk no worker
        has started; an entry the prediction missed (an earlier one failed
        its signature) is checked inline. Accepted rows go in with
        ``executemany``; heads are updated once per key per batch.
        """
        incoming = [_decode_incoming(raw) for raw in raws]
        accepted: list[Entry] = []
        accepted_raws: list[bytes] = []
        rows: list[_Row] = []
        rejected: list[tuple[bytes, str]] = []
        duplicates = 0
        group_id = self.keys.group_id
        with self._write():
            feeds = self._batch_feeds(incoming)
            checks = self._start_signature_checks(incoming, feeds, group_id, now_ms)
            for index, item in enumerate(incoming):
                entry = item.entry
                try:
                    if entry is None:
                        raise BadFrame(item.error)
                    feed = feeds[entry.author.raw]
                    if _check_before_signature(entry, item.entry_id, feed, group_id, now_ms):
                        duplicates += 1
                        continue
                    meta = checks.verdict(index, entry, item.raw)  # raises EntryRejected
                    feed.extend(entry.seq, item.entry_id)
                    rows.append(self._entry_row(entry, meta, item.raw, item.entry_id))
                    self._clock.observe(entry.hlc)
                    accepted.append(entry)
                    accepted_raws.append(item.raw)
                except EntryRejected as exc:
                    rejected.append((item.raw[:16], exc.reason))
                    log.warning("rejected entry: %s", exc)
                except BadFrame as exc:
                    rejected.append((item.raw[:16], "malformed"))
                    log.warning("rejected malformed entry: %s", exc)
            checks.cancel_unused()
            self._insert_rows(rows)
        self._release_superseded()
        return InsertResult(accepted, accepted_raws, duplicates, rejected)

    def _batch_feeds(self, incoming: Sequence[_Incoming]) -> dict[bytes, _Feed]:
        """Per author of the batch: its feed tip, and which of the batch's seqs we hold."""
        seqs: dict[bytes, set[int]] = {}
        for item in incoming:
            if item.entry is not None:
                seqs.setdefault(item.entry.author.raw, set()).add(item.entry.seq)
        feeds: dict[bytes, _Feed] = {}
        for author, wanted in seqs.items():
            tip = self._feed_tip_raw(author)
            feed = feeds[author] = _Feed(tip, {})
            # Feeds are contiguous (seq n is stored only after n - 1), so we
            # hold exactly the seqs up to the tip.
            held = sorted(seq for seq in wanted if tip is not None and seq <= tip.seq)
            for start in range(0, len(held), _SQL_IN_CHUNK):
                part = held[start : start + _SQL_IN_CHUNK]
                marks = ",".join("?" * len(part))
                for seq, entry_id in self._db.execute(
                    f"SELECT seq, entry_id FROM entries WHERE author = ? AND seq IN ({marks})",
                    (author, *part),
                ):
                    feed.known[int(seq)] = bytes(entry_id)
        return feeds

    def _start_signature_checks(
        self, incoming: Sequence[_Incoming], feeds: dict[bytes, _Feed], group_id: bytes, now_ms: int
    ) -> _Verifier:
        """Predict which entries reach the signature check; start checking them."""
        trial = {author: feed.copy() for author, feed in feeds.items()}
        candidates: list[int] = []
        for index, item in enumerate(incoming):
            entry = item.entry
            if entry is None:
                continue
            feed = trial[entry.author.raw]
            try:
                if _check_before_signature(entry, item.entry_id, feed, group_id, now_ms):
                    continue
            except EntryRejected:
                continue
            candidates.append(index)
            feed.extend(entry.seq, item.entry_id)  # as if it will verify
        chunk = defaults.STORE_VERIFY_CHUNK
        pool = None
        if len(candidates) >= 2 * chunk and defaults.STORE_VERIFY_THREADS > 0:
            if self._verify_pool is None:
                self._verify_pool = ThreadPoolExecutor(
                    defaults.STORE_VERIFY_THREADS, thread_name_prefix="p2psync-verify"
                )
            pool = self._verify_pool
        return _Verifier(self.keyring, incoming, candidates, chunk, pool)

    def _entry_row(self, entry: Entry, meta: Meta, raw: bytes, entry_id: bytes) -> _Row:
        khash = key_hash(self.keys, meta.key) if entry.kind in (Kind.PUT, Kind.DELETE) else None
        return (
            entry_id,
            entry.author.raw,
            entry.seq,
            entry.hlc,
            int(entry.kind),
            entry.blob or None,
            entry.size,
            khash,
            raw,
        )

    _INSERT_ENTRY = (
        "INSERT INTO entries (entry_id, author, seq, hlc, kind, blob, size, key_hash, raw) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )

    def _insert_rows(self, rows: Sequence[_Row]) -> None:
        """Store verified entries (in feed order per author) and update heads."""
        if not rows:
            return
        db = self._db
        db.executemany(self._INSERT_ENTRY, rows)
        db.executemany(
            "INSERT OR IGNORE INTO blobs (blob_id, size, chunk_count, complete) "
            "VALUES (?, ?, NULL, 0)",
            [(row[5], row[6]) for row in rows if row[4] == Kind.PUT],
        )
        keyed = [row for row in rows if row[7] is not None]
        if not keyed:
            return
        # Cursors of the new rows: each author's accepted seqs form one run.
        span: dict[bytes, tuple[int, int]] = {}
        for row in keyed:
            low, high = span.get(row[1], (row[2], row[2]))
            span[row[1]] = (min(low, row[2]), max(high, row[2]))
        cursor_of: dict[tuple[bytes, int], int] = {}
        for author, (low, high) in span.items():
            for seq, cursor in db.execute(
                "SELECT seq, cursor FROM entries WHERE author = ? AND seq BETWEEN ? AND ?",
                (author, low, high),
            ):
                cursor_of[(author, int(seq))] = int(cursor)
        # The head of a key is its entry with the highest (hlc, author); on a
        # tie the one stored first stays (as when inserting one by one).
        best: dict[bytes, tuple[int, bytes]] = {}
        old_blob: dict[bytes, bytes] = {}  # key -> the blob of its head before this batch
        khashes = sorted({bytes(row[7]) for row in keyed if row[7] is not None})
        for start in range(0, len(khashes), _SQL_IN_CHUNK):
            part = khashes[start : start + _SQL_IN_CHUNK]
            marks = ",".join("?" * len(part))
            for khash, hlc, author, kind, blob in db.execute(
                "SELECT h.key_hash, e.hlc, e.author, e.kind, e.blob FROM heads h "
                f"JOIN entries e ON e.cursor = h.cursor WHERE h.key_hash IN ({marks})",
                part,
            ):
                best[bytes(khash)] = (int(hlc), bytes(author))
                if int(kind) == Kind.PUT:
                    old_blob[bytes(khash)] = bytes(blob)
        winners: dict[bytes, int] = {}
        for row in keyed:
            khash = row[7]
            assert khash is not None  # filtered above
            current = best.get(khash)
            if current is None or (row[3], row[1]) > current:
                if khash in old_blob:  # the value that held the head (stored or this batch's)
                    self._superseded.append(old_blob.pop(khash))
                if row[4] == Kind.PUT and row[5] is not None:
                    old_blob[khash] = row[5]
                best[khash] = (row[3], row[1])
                winners[khash] = cursor_of[(row[1], row[2])]
        db.executemany("INSERT OR REPLACE INTO heads VALUES (?, ?)", list(winners.items()))

    def _insert_verified(self, entry: Entry, meta: Meta, raw: bytes | None = None) -> int:
        """Store a verified entry; ``raw`` is its canonical encoding if already at hand."""
        raw = entry.encode() if raw is None else raw
        row = self._entry_row(entry, meta, raw, blake3.blake3(raw).digest())
        khash = row[7]
        cursor = self._db.execute(self._INSERT_ENTRY, row).lastrowid
        assert cursor is not None  # sqlite always sets it after INSERT
        if entry.kind is Kind.PUT:
            self._db.execute(
                "INSERT OR IGNORE INTO blobs (blob_id, size, chunk_count, complete) "
                "VALUES (?, ?, NULL, 0)",
                (entry.blob, entry.size),
            )
        if khash is not None:
            head = self._db.execute(
                "SELECT e.hlc, e.author, e.kind, e.blob FROM heads h "
                "JOIN entries e ON e.cursor = h.cursor WHERE h.key_hash = ?",
                (khash,),
            ).fetchone()
            if head is None or (entry.hlc, entry.author.raw) > (int(head[0]), bytes(head[1])):
                self._db.execute("INSERT OR REPLACE INTO heads VALUES (?, ?)", (khash, cursor))
                if head is not None and int(head[2]) == Kind.PUT:
                    self._superseded.append(bytes(head[3]))
        return cursor

    def _release_superseded(self) -> None:
        """Free the objects of values the last write made no longer live (after its commit)."""
        superseded, self._superseded = self._superseded, []
        for blob in dict.fromkeys(superseded):
            result = self.release_blob(blob)
            self.objects_released += result.objects_removed

    def _stored(self, row: Any) -> StoredEntry:
        cursor, raw, complete = row
        entry = decode_entry_untrusted(bytes(raw))
        try:
            meta: Meta | None = open_meta(self.keyring, entry.meta)
        except (BadFrame, IntegrityError):
            meta = None
        is_complete = entry.kind is not Kind.PUT or bool(complete)
        return StoredEntry(int(cursor), entry, meta, is_complete)

    _SELECT = (
        "SELECT e.cursor, e.raw, COALESCE(b.complete, 1) FROM entries e "
        "LEFT JOIN blobs b ON b.blob_id = e.blob "
    )

    def head(self, key: str) -> StoredEntry | None:
        """The winning entry for ``key`` (a PUT, or a DELETE tombstone)."""
        row = self._db.execute(
            self._SELECT + "JOIN heads h ON h.cursor = e.cursor WHERE h.key_hash = ?",
            (key_hash(self.keys, key),),
        ).fetchone()
        return None if row is None else self._stored(row)

    def live(self) -> list[StoredEntry]:
        """Current value of every key that is not deleted, sorted by key."""
        rows = self._db.execute(
            self._SELECT + "JOIN heads h ON h.cursor = e.cursor WHERE e.kind = ?",
            (int(Kind.PUT),),
        ).fetchall()
        stored = [self._stored(r) for r in rows]
        return sorted(stored, key=lambda s: s.key or "")

    def pull(self, after: int = 0, limit: int = 1000) -> tuple[list[StoredEntry], int]:
        """Entries in local arrival order after ``after``; returns the next cursor."""
        rows = self._db.execute(
            self._SELECT + "WHERE e.cursor > ? ORDER BY e.cursor LIMIT ?", (after, limit)
        ).fetchall()
        stored = [self._stored(r) for r in rows]
        return stored, (stored[-1].cursor if stored else after)

    def frontier(self) -> dict[NodeId, int]:
        """``{author: highest contiguous seq}`` (contiguous by construction)."""
        rows = self._db.execute("SELECT author, MAX(seq) FROM entries GROUP BY author").fetchall()
        return {NodeId(bytes(a)): int(s) for a, s in rows}

    def entries_after(self, author: NodeId, seq: int, limit: int) -> list[bytes]:
        """Raw entries of ``author`` with seq > ``seq``, in order (for a peer)."""
        rows = self._db.execute(
            "SELECT raw FROM entries WHERE author = ? AND seq > ? ORDER BY seq LIMIT ?",
            (author.raw, seq, limit),
        ).fetchall()
        return [bytes(r[0]) for r in rows]

    def members(self) -> list[StoredEntry]:
        rows = self._db.execute(
            self._SELECT + "WHERE e.kind = ? ORDER BY e.cursor", (int(Kind.MEMBER),)
        ).fetchall()
        return [self._stored(r) for r in rows]

    def stats(self) -> dict[str, int]:
        def scalar(sql: str) -> int:
            return int(self._db.execute(sql).fetchone()[0])

        return {
            "entries": scalar("SELECT COUNT(*) FROM entries"),
            "keys": scalar(
                f"SELECT COUNT(*) FROM heads h JOIN entries e ON e.cursor = h.cursor "
                f"WHERE e.kind = {int(Kind.PUT)}"
            ),
            "objects": scalar("SELECT COUNT(*) FROM objects"),
            "object_bytes": scalar("SELECT COALESCE(SUM(size), 0) FROM objects"),
            "pending_blobs": len(self.wanted_blobs()),
        }

    # --- relay mailbox cursors (p2psync.mailbox_sync) ---------------------------

    def mailbox_state(self, relay: bytes, mailbox: bytes) -> tuple[bytes, int, int] | None:
        """``(log_id, pull_cursor, push_cursor)`` kept for a relay's mailbox, if any."""
        row = self._db.execute(
            "SELECT log_id, pull_cursor, push_cursor FROM mailbox_state "
            "WHERE relay = ? AND mailbox = ?",
            (relay, mailbox),
        ).fetchone()
        return None if row is None else (bytes(row[0]), int(row[1]), int(row[2]))

    def save_mailbox_state(
        self,
        relay: bytes,
        mailbox: bytes,
        log_id: bytes,
        *,
        pull: int | None = None,
        push: int | None = None,
    ) -> None:
        """Record a cursor; under a new ``log_id`` the cursor not given restarts at 0."""
        with self._write() as db:
            db.execute(
                "INSERT INTO mailbox_state VALUES (?, ?, ?, COALESCE(?, 0), COALESCE(?, 0)) "
                "ON CONFLICT (relay, mailbox) DO UPDATE SET "
                "pull_cursor = CASE WHEN log_id = excluded.log_id "
                "THEN COALESCE(?, pull_cursor) ELSE excluded.pull_cursor END, "
                "push_cursor = CASE WHEN log_id = excluded.log_id "
                "THEN COALESCE(?, push_cursor) ELSE excluded.push_cursor END, "
                "log_id = excluded.log_id",
                (relay, mailbox, log_id, pull, push, pull, push),
            )

    # --- peers' last seen (p2psync devices) ------------------------------------

    def peers_seen(self) -> dict[NodeId, int]:
        """Unix ms each peer was last seen connected (as far as it was written)."""
        rows = self._db.execute("SELECT node_id, seen_ms FROM peer_seen").fetchall()
        return {NodeId(bytes(n)): int(ms) for n, ms in rows}

    def save_peers_seen(self, seen: Mapping[NodeId, int], keep: int) -> None:
        """Record last-seen times (never moving one back); keep the ``keep`` newest."""
        with self._write() as db:
            db.executemany(
                "INSERT INTO peer_seen VALUES (?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                "seen_ms = MAX(seen_ms, excluded.seen_ms)",
                [(node_id.raw, ms) for node_id, ms in seen.items()],
            )
            db.execute(
                "DELETE FROM peer_seen WHERE node_id NOT IN "
                "(SELECT node_id FROM peer_seen ORDER BY seen_ms DESC LIMIT ?)",
                (keep,),
            )

    def own_entries_after(self, cursor: int, limit: int) -> list[tuple[int, bytes]]:
        """``(local cursor, raw)`` of this device's own entries after ``cursor``, in order."""
        rows = self._db.execute(
            "SELECT cursor, raw FROM entries WHERE author = ? AND cursor > ? "
            "ORDER BY cursor LIMIT ?",
            (self.identity.node_id.raw, cursor, limit),
        ).fetchall()
        return [(int(c), bytes(raw)) for c, raw in rows]

    def count_own_entries_after(self, cursor: int) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM entries WHERE author = ? AND cursor > ?",
            (self.identity.node_id.raw, cursor),
        ).fetchone()
        return int(row[0])

    # --- garbage collection -----------------------------------------------------

    def _is_live_blob(self, db: sqlite3.Connection, blob_id: bytes) -> bool:
        row = db.execute(
            "SELECT 1 FROM entries e JOIN heads h ON h.cursor = e.cursor "
            "WHERE e.blob = ? AND e.kind = ? LIMIT 1",
            (blob_id, int(Kind.PUT)),
        ).fetchone()
        return row is not None

    def release_blob(self, blob_id: bytes) -> GcResult:
        """Free one blob's objects if no live value references it (what a delete costs).

        Work is proportional to this blob's chunks, not to the store: a chunk
        another live or pinned blob shares (equal chunks dedupe) is kept. A
        blob being read (pinned) is kept whole: its last reader frees it.
        Everything else unreferenced (stray files) waits for :meth:`gc`.
        """
        with self._write() as db:
            if self._is_live_blob(db, blob_id) or self._is_pinned(db, blob_id):
                return GcResult(0, 0)
            chunks = [
                bytes(r[0])
                for r in db.execute(
                    "SELECT chunk_id FROM blob_chunks WHERE blob_id = ?", (blob_id,)
                )
            ]

            def kept(blob: bytes) -> bool:
                return self._is_live_blob(db, blob) or self._is_pinned(db, blob)

            doomed: list[tuple[bytes, int]] = []
            for oid in dict.fromkeys([blob_id, *chunks]):
                if (oid != blob_id and kept(oid)) or any(
                    kept(bytes(r[0]))
                    for r in db.execute(
                        "SELECT DISTINCT blob_id FROM blob_chunks "
                        "WHERE chunk_id = ? AND blob_id != ?",
                        (oid, blob_id),
                    ).fetchall()
                ):
                    continue
                row = db.execute("SELECT size FROM objects WHERE object_id = ?", (oid,)).fetchone()
                if row is not None:
                    doomed.append((oid, int(row[0])))
            db.executemany("DELETE FROM objects WHERE object_id = ?", [(o,) for o, _ in doomed])
            db.execute("DELETE FROM blob_chunks WHERE blob_id = ?", (blob_id,))
            db.execute("DELETE FROM blobs WHERE blob_id = ?", (blob_id,))
        for oid, _ in doomed:
            self.files.remove(oid)
        return GcResult(len(doomed), sum(size for _, size in doomed))

    def gc(self) -> GcResult:
        """Delete objects that no live entry references, and stray files."""
        with self._write() as db:
            live = {
                bytes(r[0])
                for r in db.execute(
                    "SELECT e.blob FROM heads h JOIN entries e ON e.cursor = h.cursor "
                    "WHERE e.kind = ?",
                    (int(Kind.PUT),),
                )
            }
            read_now = {  # being read: kept like live values (their readers free them)
                bytes(r[0])
                for r in db.execute("SELECT DISTINCT blob_id FROM blob_readers").fetchall()
            }
            live |= {blob for blob in read_now if self._is_pinned(db, blob)}
            keep = set(live)
            for blob_id in live:
                keep.update(
                    bytes(r[0])
                    for r in db.execute(
                        "SELECT chunk_id FROM blob_chunks WHERE blob_id = ?", (blob_id,)
                    )
                )
            doomed = [
                (bytes(r[0]), int(r[1]))
                for r in db.execute("SELECT object_id, size FROM objects")
                if bytes(r[0]) not in keep
            ]
            db.executemany("DELETE FROM objects WHERE object_id = ?", [(o,) for o, _ in doomed])
            dead_blobs = [
                (bytes(r[0]),)
                for r in db.execute("SELECT blob_id FROM blobs")
                if bytes(r[0]) not in live
            ]
            db.executemany("DELETE FROM blob_chunks WHERE blob_id = ?", dead_blobs)
            db.executemany("DELETE FROM blobs WHERE blob_id = ?", dead_blobs)
        removed = 0
        freed = 0
        for oid, size in doomed:
            self.files.remove(oid)
            removed += 1
            freed += size
        for oid in self.files.iter_ids():  # files whose row never committed
            if oid not in keep and not self.has_object(oid):
                self.files.remove(oid)
                removed += 1
        self.files.clean_temp()
        return GcResult(removed, freed)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


# An ``entries`` row: entry_id, author, seq, hlc, kind, blob, size, key_hash, raw.
_Row = tuple[bytes, bytes, int, int, int, bytes | None, int, bytes | None, bytes]
# Values per ``IN (...)`` list: far below SQLite's 32766 host parameters.
_SQL_IN_CHUNK = 500


@dataclass(frozen=True, slots=True)
class _Incoming:
    """One received raw entry, decoded (``entry``) or not (``error`` says why)."""

    raw: bytes
    entry: Entry | None
    entry_id: bytes
    error: str


def _decode_incoming(raw: bytes) -> _Incoming:
    raw = bytes(raw)
    try:
        entry = decode_entry_untrusted(raw)
    except BadFrame as exc:
        return _Incoming(raw, None, b"", str(exc))
    return _Incoming(raw, entry, blake3.blake3(raw).digest(), "")


@dataclass(slots=True)
class _Feed:
    """One author's feed while a batch is checked: its tip and the seqs we hold."""

    tip: FeedTip | None
    known: dict[int, bytes]  # seq -> entry id, for the batch's seqs only

    def copy(self) -> _Feed:
        return _Feed(self.tip, dict(self.known))

    def extend(self, seq: int, entry_id: bytes) -> None:
        self.tip = FeedTip(seq, entry_id)
        self.known[seq] = entry_id


def _check_before_signature(
    entry: Entry, entry_id: bytes, feed: _Feed, group_id: bytes, now_ms: int
) -> bool:
    """The checks before the signature: True for a duplicate; raise on fork, gap, ..."""
    held = feed.known.get(entry.seq)
    if held is not None:
        if held == entry_id:
            return True
        raise EntryRejected("fork", f"{entry.author.short()}#{entry.seq} differs from ours")
    check_entry_context(entry, group_id=group_id, previous=feed.tip, now_ms=now_ms)
    return False


def _verify_chunk(keyring: Keyring, batch: Sequence[tuple[Entry, bytes]]) -> list[Meta | str]:
    """Per entry: its opened meta, or the reason it fails (``bad-signature``, ``bad-meta``).

    Pure (reads only ``keyring``), so it runs in worker threads: libsodium
    releases the GIL while it verifies and decrypts.
    """
    valid = signatures_valid(batch)
    verdicts: list[Meta | str] = []
    for (entry, _), ok in zip(batch, valid, strict=True):
        if not ok:
            verdicts.append("bad-signature")
            continue
        try:
            verdicts.append(open_meta(keyring, entry.meta))
        except (BadFrame, IntegrityError) as exc:
            verdicts.append(f"bad-meta: {exc}")
    return verdicts


class _VerifyJob:
    """The checks of a few entries: in a worker thread, or here if none took it yet."""

    __slots__ = ("_batch", "_future", "_keyring", "_result")

    def __init__(
        self,
        keyring: Keyring,
        batch: list[tuple[Entry, bytes]],
        pool: ThreadPoolExecutor | None,
    ) -> None:
        self._keyring = keyring
        self._batch = batch
        self._future: Future[list[Meta | str]] | None = (
            pool.submit(_verify_chunk, keyring, batch) if pool is not None else None
        )
        self._result: list[Meta | str] | None = None

    def cancel(self) -> None:
        """Drop the job if no worker started it (its verdicts are not needed)."""
        if self._result is None and self._future is not None:
            self._future.cancel()

    def results(self) -> list[Meta | str]:
        if self._result is None:
            if self._future is None or self._future.cancel():  # not started: do it ourselves
                self._result = _verify_chunk(self._keyring, self._batch)
            else:
                self._result = self._future.result()
        return self._result


class _Verifier:
    """Signature and meta verdicts of one batch, computed ahead in chunks (see insert_entries)."""

    def __init__(
        self,
        keyring: Keyring,
        incoming: Sequence[_Incoming],
        candidates: Sequence[int],
        chunk: int,
        pool: ThreadPoolExecutor | None,
    ) -> None:
        self._keyring = keyring
        self._where: dict[int, tuple[_VerifyJob, int]] = {}
        for start in range(0, len(candidates), chunk):
            part = candidates[start : start + chunk]
            batch: list[tuple[Entry, bytes]] = []
            for index in part:
                entry = incoming[index].entry
                assert entry is not None  # candidates decoded
                batch.append((entry, incoming[index].raw))
            job = _VerifyJob(keyring, batch, pool)
            for position, index in enumerate(part):
                self._where[index] = (job, position)

    def cancel_unused(self) -> None:
        """Cancel jobs whose entries were all rejected before their turn (a prediction miss)."""
        for job, _ in self._where.values():
            job.cancel()

    def verdict(self, index: int, entry: Entry, raw: bytes) -> Meta:
        """The opened meta of a signed, readable entry; else raise :class:`EntryRejected`."""
        found = self._where.get(index)
        if found is None:  # not predicted to get this far: check it now
            result = _verify_chunk(self._keyring, [(entry, raw)])[0]
        else:
            job, position = found
            result = job.results()[position]
        if isinstance(result, Meta):
            return result
        if result == "bad-signature":
            raise EntryRejected(result, f"signature does not verify for {entry.author.short()}")
        raise EntryRejected("bad-meta", result.removeprefix("bad-meta: "))


class Readable(Protocol):
    """A binary file or stream (files, ``sys.stdin.buffer``, ``io.BytesIO``)."""

    def read(self, size: int = -1, /) -> bytes: ...


def _read_chunk(reader: Readable) -> bytes:
    """Read one full chunk unless the stream ends first (pipes return short reads)."""
    first = reader.read(defaults.CHUNK_SIZE)
    if len(first) == defaults.CHUNK_SIZE or not first:
        return first
    parts = [first]
    filled = len(first)
    while filled < defaults.CHUNK_SIZE:
        more = reader.read(defaults.CHUNK_SIZE - filled)
        if not more:
            break
        parts.append(more)
        filled += len(more)
    return b"".join(parts)
