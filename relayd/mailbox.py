"""relayd's mailbox store: per-group logs of ciphertext, in SQLite and files beside it.

Theory
------
The mailbox (:mod:`p2psync.proto.mailbox` has the protocol and the
membership proof) keeps, per **mailbox** (filed under the address of a
group's public mailbox key and its group id, never a secret: see
:func:`~p2psync.proto.mailbox.mailbox_address`), a log of **items**:
signed entries, and the sealed objects (chunks, manifests) those entries'
blobs consist of. Each item has a
**cursor**, the mailbox's ``head`` plus one, assigned in the same
``BEGIN IMMEDIATE`` transaction that inserts the item: cursors have no gaps
(a refused push rolls back and uses none), are never reused (``head`` only
grows, and the mailbox row outlives its items; unless the database itself
is rolled back, see Durability), and never come from a clock. An item
also records its sender's NodeId, size, content hash (BLAKE3: the entry
id or the object id), creation and expiry time.

Rules the store keeps
~~~~~~~~~~~~~~~~~~~~~
- **Verify before storing** (a relay must never store garbage it will later
  serve): an entry must decode canonically and carry its author's valid
  signature, must not be stamped far in the future, must be of the group the
  mailbox is bound to (the group id its JOIN proof signed, part of its
  address: no pusher can re-bind it), and must not fork a feed the mailbox holds
  (another entry at the same author and seq). An object must hash to the
  name its pusher gives (BLAKE3 of the ciphertext), have a well-formed chunk or manifest
  header, and fit its blob: the blob must be named by a live entry of the
  mailbox; a one-chunk blob's root is exactly the entry's size plus the
  sealing overhead; a manifest or further chunks only for blobs larger than
  one chunk, and no more chunks than the blob's size needs.
- **Idempotent**: an item the mailbox holds (same hash) is not stored again;
  the push returns its cursor. An object pushed for a second blob gains a
  reference and the later expiry.
- **Dedupe** per mailbox by content hash; objects of other mailboxes are
  never shared (each group's ciphertext is its own).
- **Lifetime**: items expire ``retention_s`` after their push (an object
  lives as long as the longest-lived entry referencing its blob) and are
  never served once expired, whenever cleanup runs. A cleanup pass
  (:meth:`MailboxStore.start_cleanup`, hourly) deletes expired items,
  **orphan** objects (no entry names their blob any more), devices not seen
  for ``retention_s``, empty mailboxes nobody used for that long, stray
  files; it then returns free pages to the filesystem
  (``PRAGMA incremental_vacuum``, run to completion) and truncates the
  WAL. It works in bounded steps (at most
  :data:`~relayd.defaults.MAILBOX_CLEANUP_BATCH` rows per transaction) so
  the service can serve requests between them.
- **Delivered**: an item is delivered when at least one registered device
  other than its pusher exists and every such device has ACKed a cursor at
  or past it; an entry of a blob only once the mailbox holds the blob whole
  (root, and every chunk its size needs) and each of those objects is
  delivered too. A device that ACKed an entry before its chunks arrived has
  not got the file yet.
- **Limits**: an item over ``max_item_bytes`` is refused (too-large); a push
  beyond the group's quota first evicts the mailbox's expired items, then
  its delivered ones (never those of the blob being pushed), and is refused
  (quota-exceeded) if that is not enough; beyond the total quota, or with
  less than ``min_free_bytes`` free on the filesystem, it is refused
  (storage-full) before the disk fills. Sizes charge
  :data:`~relayd.defaults.MAILBOX_ITEM_OVERHEAD_BYTES` per item on top of
  its bytes. A mailbox serves at most ``max_devices_per_group`` registered
  devices (a device registers by proving membership, and its registration
  lapses after ``retention_s`` unseen). With ``drop_delivered``, cleanup
  also drops delivered items early.
- **Files outlive no row, and no row outlives its file**: a file is
  unlinked after the COMMIT that deleted its row, and only if no committed
  row names it again (re-pushing an expired object reuses its path).

Storage: files vs in the database
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Items up to ``inline_max_bytes`` (64 KiB: entries, manifests, the small
last chunk of a file) live in the ``items`` row. Larger ones (full 1 MiB
chunks) are files ``objects/<mailbox hex>/<object id hex>`` beside the
database: SQLite reads small blobs faster than the filesystem but large
ones slower (sqlite.org, "Internal Versus External BLOBs", crossover
~100 KB), a large blob in WAL mode is written twice (WAL, then
checkpoint), and deleting it leaves free pages rather than free disk.

Durability
~~~~~~~~~~
WAL with ``synchronous=NORMAL``: a commit is in the WAL before the push is
acknowledged, so a relayd killed at any moment (SIGKILL) loses only pushes
it had not acknowledged (the kernel keeps the WAL's pages); a power loss
may roll back the last few commits (SQLite's documented trade-off), and a
restore from a backup rolls back more: the head goes back and its cursors
are handed out again. So the store keeps a running mark (``running``, the
machine's boot id while open, removed by :meth:`MailboxStore.close`); a
mark of another boot at open (the machine went down under relayd), or any
other text in it (an operator's mark after a restore), gives every log a
new ``log_id`` (:meth:`MailboxStore._mark_running`). Nodes start over on a new
``log_id``, and also when a JOINED head is below what they pulled or saw:
they pull everything again and push their whole feed again
(:mod:`p2psync.mailbox_sync`, "Starting over"), since
their local store is the source of truth. A file is written to a
temporary name, fsynced and renamed before the transaction that records
it commits; a crash in between leaves a stray file that cleanup removes.
Every object read back is hashed against its name; a damaged or missing
one is dropped and reported missing; a read that fails for another reason
(EMFILE, EIO) keeps the item and refuses the FETCH with ``try-again``.

Schema (``PRAGMA user_version`` is the schema version; :data:`MIGRATIONS`
upgrade older databases in order, each in one transaction)::

    mailboxes (mailbox PK, log_id, group_id, head, items, bytes, created, last_used)
    items     (mailbox, cursor, kind 1 entry | 2 object, hash, sender, size, charge,
               created, expires, blob, blob_size, author, seq, data | NULL = file)
    refs      (mailbox, blob, object)       which blobs a held object belongs to
    devices   (mailbox, node, first_seen, last_seen, acked)
    totals    (one row: items, bytes)

The store does blocking I/O and takes ``now`` (wall-clock seconds: expiry
must survive restarts) from its caller; relayd calls it from worker
threads, one call at a time (:mod:`relayd.mailbox_service`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import blake3

from p2psync import defaults as node_defaults
from p2psync.crypto.identity import RandomBytes
from p2psync.errors import BadFrame, ConfigError, IntegrityError, P2PSyncError
from p2psync.proto.entry import Entry, Kind, decode_entry_untrusted, hlc_to_ms
from p2psync.proto.mailbox import (
    LOG_ID_SIZE,
    MAX_PULL_BYTES,
    MAX_PULL_LIMIT,
    EntryItem,
    Item,
    MailboxErrorCode,
    ObjectItem,
    item_wire_size,
)
from p2psync.store.objects import OVERHEAD, ObjectKind, object_id, read_header_untrusted
from relayd import defaults
from relayd.config import MailboxConfig

log = logging.getLogger(__name__)

DB_FILE: Final = "mailbox.sqlite"
OBJECTS_DIR: Final = "objects"
# Which boot of the machine the store was last opened in; removed on close.
RUNNING_MARK: Final = "running"
_BOOT_ID_FILE: Final = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id() -> str:
    """This boot of the machine (Linux's random boot id), or "" where there is none."""
    try:
        return _BOOT_ID_FILE.read_text().strip()
    except OSError:
        return ""


ITEM_ENTRY: Final = 1
ITEM_OBJECT: Final = 2

_SCHEMA_V1: Final = """
CREATE TABLE mailboxes (
    mailbox   BLOB PRIMARY KEY,
    log_id    BLOB NOT NULL,
    group_id  BLOB,
    head      INTEGER NOT NULL DEFAULT 0,
    items     INTEGER NOT NULL DEFAULT 0,
    bytes     INTEGER NOT NULL DEFAULT 0,
    created   INTEGER NOT NULL,
    last_used INTEGER NOT NULL
) STRICT;
CREATE TABLE items (
    mailbox   BLOB NOT NULL,
    cursor    INTEGER NOT NULL,
    kind      INTEGER NOT NULL,
    hash      BLOB NOT NULL,
    sender    BLOB NOT NULL,
    size      INTEGER NOT NULL,
    charge    INTEGER NOT NULL,
    created   INTEGER NOT NULL,
    expires   INTEGER NOT NULL,
    blob      BLOB,
    blob_size INTEGER,
    author    BLOB,
    seq       INTEGER,
    data      BLOB,
    PRIMARY KEY (mailbox, cursor)
) STRICT;
CREATE UNIQUE INDEX items_by_hash ON items (mailbox, hash);
CREATE UNIQUE INDEX items_by_feed ON items (mailbox, author, seq) WHERE kind = 1;
CREATE INDEX items_by_blob ON items (mailbox, blob) WHERE kind = 1;
CREATE INDEX items_by_expiry ON items (expires);
CREATE TABLE refs (
    mailbox BLOB NOT NULL,
    blob    BLOB NOT NULL,
    object  BLOB NOT NULL,
    PRIMARY KEY (mailbox, blob, object)
) STRICT;
CREATE INDEX refs_by_object ON refs (mailbox, object);
CREATE TABLE devices (
    mailbox    BLOB NOT NULL,
    node       BLOB NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    acked      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (mailbox, node)
) STRICT;
CREATE TABLE totals (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    items INTEGER NOT NULL,
    bytes INTEGER NOT NULL
) STRICT;
INSERT INTO totals VALUES (1, 0, 0);
"""

MIGRATIONS: Final[tuple[tuple[int, str], ...]] = ((1, _SCHEMA_V1),)
"""``(version, script)`` in order; a database at version N runs every later script."""
SCHEMA_VERSION: Final = MIGRATIONS[-1][0]


class MailboxRefused(P2PSyncError):
    """A request the mailbox refuses; ``code`` goes on the wire in ERROR."""

    def __init__(self, code: MailboxErrorCode, message: str) -> None:
        super().__init__(f"{code.label}: {message}")
        self.code = code
        self.detail = message


@dataclass(frozen=True, slots=True)
class JoinInfo:
    log_id: bytes
    head: int
    used: int
    quota: int
    ttl_s: int
    max_item: int


@dataclass(frozen=True, slots=True)
class Evictions:
    """Items a request removed, by reason (the ``relayd_mailbox_evictions_total`` labels)."""

    expired: int = 0  # past their TTL, not cleaned up yet
    quota: int = 0  # delivered items evicted early to make room

    def __add__(self, other: Evictions) -> Evictions:
        return Evictions(self.expired + other.expired, self.quota + other.quota)

    @property
    def total(self) -> int:
        return self.expired + self.quota


NO_EVICTIONS: Final = Evictions()


@dataclass(frozen=True, slots=True)
class PushResult:
    cursor: int
    new: bool
    used: int
    evicted: Evictions = NO_EVICTIONS


@dataclass(frozen=True, slots=True)
class FetchResult:
    """A FETCH's answer: the object's bytes, or None (absent; ``damaged`` if dropped now)."""

    data: bytes | None
    damaged: bool = False


@dataclass(frozen=True, slots=True)
class PullResult:
    items: tuple[Item, ...]
    has_more: bool
    head: int


@dataclass(frozen=True, slots=True)
class CleanupResult:
    expired: int
    delivered: int
    orphans: int
    devices: int
    mailboxes: int
    stray_files: int
    bytes_freed: int


@dataclass(frozen=True, slots=True)
class Totals:
    groups: int
    items: int
    bytes: int


def free_space(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


# --- checks that need no key (pure) ------------------------------------------------------


def check_entry_untrusted(raw: bytes, now: float) -> Entry:
    """Decode and check a pushed entry; :class:`MailboxRefused` (bad-entry) says why."""
    try:
        entry = decode_entry_untrusted(raw)
    except BadFrame as exc:
        raise MailboxRefused(MailboxErrorCode.BAD_ENTRY, f"malformed: {exc}") from None
    ahead_ms = hlc_to_ms(entry.hlc) - int(now * 1000)
    if ahead_ms > node_defaults.MAX_CLOCK_SKEW_MS:
        raise MailboxRefused(
            MailboxErrorCode.BAD_ENTRY, f"clock-skew: entry stamped {ahead_ms} ms ahead"
        )
    try:
        entry.author.verify(entry.signed_bytes(), entry.sig)
    except IntegrityError:
        raise MailboxRefused(
            MailboxErrorCode.BAD_ENTRY, f"bad-signature: not signed by {entry.author.short()}"
        ) from None
    return entry


def check_object_untrusted(claimed: bytes, data: bytes) -> ObjectKind:
    """The kind of a pushed sealed object named ``claimed``; :class:`MailboxRefused` if not so."""
    if object_id(data) != claimed:
        raise MailboxRefused(
            MailboxErrorCode.BAD_OBJECT, f"object {claimed.hex()[:16]} does not match its hash"
        )
    try:
        kind, _epoch = read_header_untrusted(data)
    except BadFrame as exc:
        raise MailboxRefused(MailboxErrorCode.BAD_OBJECT, str(exc)) from None
    if kind not in (ObjectKind.CHUNK, ObjectKind.MANIFEST):
        raise MailboxRefused(MailboxErrorCode.BAD_OBJECT, f"a {kind.name} is not a blob's object")
    return kind


def check_object_fits(
    oid: bytes, kind: ObjectKind, size: int, blob: bytes, blob_size: int, chunks_held: int
) -> None:
    """Does an object of ``size`` bytes fit the blob of ``blob_size`` plaintext bytes?

    ``chunks_held``: the blob's non-root chunks the mailbox already holds.
    """
    chunk = node_defaults.CHUNK_SIZE
    multi = blob_size > chunk
    if oid == blob:
        if kind is ObjectKind.CHUNK and (multi or size != blob_size + OVERHEAD):
            raise MailboxRefused(
                MailboxErrorCode.BAD_OBJECT,
                f"the blob's only chunk must be {blob_size + OVERHEAD} bytes, got {size}",
            )
        if kind is ObjectKind.MANIFEST and not multi:
            raise MailboxRefused(MailboxErrorCode.BAD_OBJECT, "a blob of one chunk has no manifest")
        return
    if kind is not ObjectKind.CHUNK or not multi:
        raise MailboxRefused(
            MailboxErrorCode.BAD_OBJECT, "only a multi-chunk blob has objects besides its root"
        )
    if size > chunk + OVERHEAD:
        raise MailboxRefused(MailboxErrorCode.BAD_OBJECT, f"a chunk of {size} bytes is too big")
    if chunks_held >= math.ceil(blob_size / chunk):
        raise MailboxRefused(
            MailboxErrorCode.BAD_OBJECT, "the blob already has every chunk its size allows"
        )


# --- delivered items (SQL over ``items``) -----------------------------------------------

_CHUNK: Final = node_defaults.CHUNK_SIZE


def _acked_by_others(item: str) -> str:
    """SQL: some registered device other than ``item``'s pusher exists, and all such ACKed it."""
    return (
        f"EXISTS (SELECT 1 FROM devices d WHERE d.mailbox = {item}.mailbox "
        f"AND d.node != {item}.sender) AND NOT EXISTS (SELECT 1 FROM devices d "
        f"WHERE d.mailbox = {item}.mailbox AND d.node != {item}.sender "
        f"AND d.acked < {item}.cursor)"
    )


# An item every other device holds. An object: ACKed. An entry of a blob:
# ACKed, and the mailbox holds the blob whole (its root, and every chunk its
# size needs), each object ACKed as well. So an entry ACKed before its chunks
# arrived is not delivered, and evicting it cannot strand the chunks still
# being pushed (they would be refused unknown-blob, and those already stored
# would be orphans).
_DELIVERED: Final = (
    f"{_acked_by_others('items')} AND (items.kind = {ITEM_OBJECT} OR items.blob IS NULL OR ("
    "EXISTS (SELECT 1 FROM refs r WHERE r.mailbox = items.mailbox AND r.blob = items.blob "
    "AND r.object = items.blob) "
    f"AND (items.blob_size <= {_CHUNK} OR (SELECT COUNT(*) FROM refs r "
    "WHERE r.mailbox = items.mailbox AND r.blob = items.blob AND r.object != items.blob) "
    f">= (items.blob_size + {_CHUNK - 1}) / {_CHUNK}) "
    "AND NOT EXISTS (SELECT 1 FROM refs r JOIN items o ON o.mailbox = r.mailbox "
    "AND o.hash = r.object WHERE r.mailbox = items.mailbox AND r.blob = items.blob "
    f"AND NOT ({_acked_by_others('o')}))))"
)


# --- the store ---------------------------------------------------------------------------


class MailboxStore:
    """The mailboxes of one relayd data directory. Open with :meth:`open`; :meth:`close` it."""

    def __init__(
        self,
        directory: Path,
        db: sqlite3.Connection,
        config: MailboxConfig,
        random_bytes: RandomBytes,
        free: Callable[[Path], int],
    ) -> None:
        self.directory = directory
        self.config = config
        self._db = db
        self._random_bytes = random_bytes
        self._free = free
        self._objects = directory / OBJECTS_DIR
        # Files of deleted items, (mailbox, object id): unlinked once the
        # transaction commits, unless a row of it names the file again.
        self._doomed: list[tuple[bytes, bytes]] = []
        self.totals = self._read_totals(count_groups=True)
        # Logs given a new log_id at open: the last run ended with the machine.
        self.renewed_log_ids = 0

    @classmethod
    def open(
        cls,
        directory: Path,
        config: MailboxConfig,
        *,
        random_bytes: RandomBytes = os.urandom,
        free: Callable[[Path], int] = free_space,
        boot_id: Callable[[], str] = current_boot_id,
    ) -> MailboxStore:
        """Open (creating, migrating) the mailbox database in ``directory``.

        If the running mark says the store was open in another boot of the
        machine (or holds anything but this boot's id), every log gets a new
        ``log_id`` first (module docstring, "Durability").

        Raises :class:`~p2psync.errors.ConfigError` if it cannot, saying why.
        """
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            (directory / OBJECTS_DIR).mkdir(mode=0o700, exist_ok=True)
            db = sqlite3.connect(directory / DB_FILE, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"{directory}: cannot open the mailbox store: {exc}") from None
        try:
            db.execute(f"PRAGMA busy_timeout = {defaults.MAILBOX_BUSY_TIMEOUT_MS}")
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                # Only takes effect on a new, empty database (before WAL mode
                # and the first table): freed pages can then be returned to
                # the filesystem by cleanup's incremental_vacuum.
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            _migrate(db, directory / DB_FILE)
        except sqlite3.Error as exc:
            db.close()
            raise ConfigError(f"{directory / DB_FILE}: mailbox database unusable: {exc}") from None
        except ConfigError:
            db.close()
            raise
        store = cls(directory, db, config, random_bytes, free)
        try:
            store.renewed_log_ids = store._mark_running(boot_id())
        except (OSError, sqlite3.Error) as exc:
            db.close()  # not close(): a mark found here must stay for the next start
            raise ConfigError(f"{directory / RUNNING_MARK}: {exc}") from None
        return store

    def close(self) -> None:
        self._db.close()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / RUNNING_MARK).unlink()

    def __enter__(self) -> MailboxStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _mark_running(self, boot_id: str) -> int:
        """Record that the store is open in boot ``boot_id``; renew every log_id if the
        mark left by the last open names another boot (or anything else). Returns
        the number of logs renewed.

        A mark that is still there names the boot in which relayd last had the
        store open and did not close it. The same boot: the process died
        (SIGKILL, a crash), which loses nothing committed (the kernel still had
        the WAL's pages). Another boot: the machine went down under relayd
        (power loss, kernel crash), which with ``synchronous=NORMAL`` may have
        rolled back the last commits, so cursors already handed out could be
        handed out again: a new ``log_id`` tells every node to start over.
        """
        mark = self.directory / RUNNING_MARK
        renewed = 0
        try:
            previous: str | None = mark.read_text().strip()
        except FileNotFoundError:
            previous = None
        if previous is not None and (not boot_id or previous != boot_id):
            with self._write() as db:
                mailboxes = db.execute("SELECT mailbox FROM mailboxes").fetchall()
                for (mailbox,) in mailboxes:
                    db.execute(
                        "UPDATE mailboxes SET log_id = ? WHERE mailbox = ?",
                        (self._random_bytes(LOG_ID_SIZE), mailbox),
                    )
            self._db.execute("PRAGMA wal_checkpoint(FULL)")  # the new ids on disk first
            renewed = len(mailboxes)
            log.warning(
                "the mailbox store was open when the machine went down (or the running mark "
                "was set): %d logs get a new log_id, so nodes pull and push them again",
                renewed,
            )
        # A name of its own: handles opened side by side (tests, tools) must not share it.
        tmp = mark.with_name(f"{mark.name}.{os.getpid()}.{self._random_bytes(4).hex()}.tmp")
        with open(tmp, "w") as out:
            out.write(boot_id + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, mark)
        return renewed

    # --- transactions ------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; files of items it deleted are unlinked after COMMIT.

        A file is unlinked only if no committed row names it: the same
        transaction may have deleted an expired copy of an object and stored
        it again under the same name (and so the same path).
        """
        self._doomed = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            self._doomed = []
            raise
        self._db.execute("COMMIT")
        doomed, self._doomed = self._doomed, []
        for mailbox, oid in doomed:
            named = self._db.execute(
                "SELECT 1 FROM items WHERE mailbox = ? AND hash = ? AND kind = 2 AND data IS NULL",
                (mailbox, oid),
            ).fetchone()
            if named is None:
                try:
                    self._object_path(mailbox, oid).unlink(missing_ok=True)
                except OSError as exc:  # committed anyway; cleanup removes it as a stray file
                    log.warning("mailbox object file %s not removed: %s", oid.hex()[:16], exc)

    def _read_totals(self, *, count_groups: bool = False) -> Totals:
        items, size = self._db.execute("SELECT items, bytes FROM totals").fetchone()
        if count_groups:
            (groups,) = self._db.execute("SELECT COUNT(*) FROM mailboxes").fetchone()
        else:
            groups = self.totals.groups
        return Totals(int(groups), int(items), int(size))

    def _object_path(self, mailbox: bytes, oid: bytes) -> Path:
        return self._objects / mailbox.hex() / oid.hex()

    # --- join, ack -----------------------------------------------------------------------

    def join(
        self, mailbox: bytes, node: bytes, now: float, *, group_id: bytes | None = None
    ) -> JoinInfo:
        """Register ``node`` (its proof checked by the caller) with ``mailbox``, creating it.

        ``group_id``: the group the mailbox takes entries of (relayd's session
        passes the one the JOIN proof signed, and files the mailbox under an
        address derived from it); None takes entries of any group.
        """
        t = int(now)
        config = self.config
        with self._write() as db:
            row = db.execute(
                "SELECT log_id, head, bytes, group_id FROM mailboxes WHERE mailbox = ?",
                (mailbox,),
            ).fetchone()
            if row is None:
                log_id = self._random_bytes(LOG_ID_SIZE)
                db.execute(
                    "INSERT INTO mailboxes (mailbox, log_id, group_id, created, last_used) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (mailbox, log_id, group_id, t, t),
                )
                row = (log_id, 0, 0, group_id)
            elif group_id is not None and row[3] is not None and bytes(row[3]) != group_id:
                raise MailboxRefused(
                    MailboxErrorCode.PROTOCOL, "this mailbox belongs to another group"
                )
            else:
                db.execute(
                    "UPDATE mailboxes SET last_used = ?, group_id = COALESCE(group_id, ?) "
                    "WHERE mailbox = ?",
                    (t, group_id, mailbox),
                )
            # A registration lapses after retention_s unseen (cleanup deletes it).
            known = db.execute(
                "SELECT 1 FROM devices WHERE mailbox = ? AND node = ? AND last_seen > ?",
                (mailbox, node, t - config.retention_s),
            ).fetchone()
            if known is None:
                (count,) = db.execute(
                    "SELECT COUNT(*) FROM devices WHERE mailbox = ? AND last_seen > ?",
                    (mailbox, t - config.retention_s),
                ).fetchone()
                if count >= config.max_devices_per_group:
                    raise MailboxRefused(
                        MailboxErrorCode.TOO_MANY_DEVICES,
                        f"this group's mailbox already serves {count} devices",
                    )
                db.execute(
                    "INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?, 0)", (mailbox, node, t, t)
                )
            else:
                db.execute(
                    "UPDATE devices SET last_seen = ? WHERE mailbox = ? AND node = ?",
                    (t, mailbox, node),
                )
        self.totals = self._read_totals(count_groups=True)
        return JoinInfo(
            log_id=bytes(row[0]),
            head=int(row[1]),
            used=int(row[2]),
            quota=config.group_quota_bytes,
            ttl_s=config.retention_s,
            max_item=config.max_item_bytes,
        )

    def ack(self, mailbox: bytes, node: bytes, cursor: int, now: float) -> int:
        """``node`` holds everything up to ``cursor``; returns what is recorded (<= head)."""
        with self._write() as db:
            db.execute(
                "UPDATE devices SET acked = MAX(acked, MIN(?, "
                "(SELECT head FROM mailboxes WHERE mailbox = ?))), last_seen = ? "
                "WHERE mailbox = ? AND node = ?",
                (cursor, mailbox, int(now), mailbox, node),
            )
            row = db.execute(
                "SELECT acked FROM devices WHERE mailbox = ? AND node = ?", (mailbox, node)
            ).fetchone()
        return int(row[0]) if row is not None else 0

    # --- push ------------------------------------------------------------------------------

    def push_entry(self, mailbox: bytes, sender: bytes, raw: bytes, now: float) -> PushResult:
        """Store a signed entry (verified here); its cursor, new or existing."""
        self._check_size(len(raw))
        entry = check_entry_untrusted(raw, now)
        entry_id = blake3.blake3(raw).digest()
        t = int(now)
        blob = entry.blob if entry.kind is Kind.PUT else None
        with self._write() as db:
            head, used, group_id = self._mailbox_row(db, mailbox)
            existing = self._live_item(db, mailbox, entry_id, t)
            if existing is not None:
                return PushResult(existing, False, used)
            if group_id is not None and group_id != entry.group_id:
                raise MailboxRefused(
                    MailboxErrorCode.BAD_ENTRY, "wrong-group: not this mailbox's group"
                )
            fork = db.execute(
                "SELECT hash, expires FROM items WHERE mailbox = ? AND kind = 1 "
                "AND author = ? AND seq = ?",
                (mailbox, entry.author.raw, entry.seq),
            ).fetchone()
            evicted = NO_EVICTIONS
            if fork is not None:
                if int(fork[1]) > t:
                    raise MailboxRefused(
                        MailboxErrorCode.BAD_ENTRY,
                        f"fork: {entry.author.short()}#{entry.seq} differs from the one held",
                    )
                expired = self._evict_where(db, "mailbox = ? AND hash = ?", (mailbox, fork[0]))
                evicted += Evictions(expired=expired)
            charge = len(raw) + defaults.MAILBOX_ITEM_OVERHEAD_BYTES
            evicted += self._make_room(db, mailbox, charge, t)
            cursor = head + 1
            db.execute(
                "INSERT INTO items (mailbox, cursor, kind, hash, sender, size, charge, created, "
                "expires, blob, blob_size, author, seq, data) "
                "VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mailbox, cursor, entry_id, sender, len(raw), charge, t,
                 t + self.config.retention_s, blob, entry.size if blob else None,
                 entry.author.raw, entry.seq, raw),
            )  # fmt: skip
            used = self._added(db, mailbox, cursor, charge, t)
        self.totals = self._read_totals()
        return PushResult(cursor, True, used, evicted)

    def push_object(
        self, mailbox: bytes, sender: bytes, blob: bytes, oid: bytes, data: bytes, now: float
    ) -> PushResult:
        """Store sealed object ``oid`` of ``blob`` (an entry of the mailbox must name it)."""
        self._check_size(len(data))
        kind = check_object_untrusted(oid, data)
        t = int(now)
        written: Path | None = None
        try:
            with self._write() as db:
                head, used, _ = self._mailbox_row(db, mailbox)
                owner = db.execute(
                    "SELECT blob_size, expires FROM items WHERE mailbox = ? AND kind = 1 "
                    "AND blob = ? AND expires > ? ORDER BY expires DESC LIMIT 1",
                    (mailbox, blob, t),
                ).fetchone()
                if owner is None:
                    raise MailboxRefused(
                        MailboxErrorCode.UNKNOWN_BLOB,
                        f"no entry in this mailbox names blob {blob.hex()[:16]}",
                    )
                blob_size, expires = int(owner[0]), int(owner[1])
                existing = self._live_item(db, mailbox, oid, t)
                if existing is not None:
                    db.execute("INSERT OR IGNORE INTO refs VALUES (?, ?, ?)", (mailbox, blob, oid))
                    db.execute(
                        "UPDATE items SET expires = MAX(expires, ?) WHERE mailbox = ? AND hash = ?",
                        (expires, mailbox, oid),
                    )
                    return PushResult(existing, False, used)
                # An expired copy not cleaned up yet goes first (and with it its
                # references, so it does not count as a chunk the blob holds).
                # Its file has the same name as the new one: _write keeps it.
                expired = self._evict_where(db, "mailbox = ? AND hash = ?", (mailbox, oid))
                evicted = Evictions(expired=expired)
                (held,) = db.execute(
                    "SELECT COUNT(*) FROM refs WHERE mailbox = ? AND blob = ? AND object != ?",
                    (mailbox, blob, blob),
                ).fetchone()
                check_object_fits(oid, kind, len(data), blob, blob_size, int(held))
                charge = len(data) + defaults.MAILBOX_ITEM_OVERHEAD_BYTES
                evicted += self._make_room(db, mailbox, charge, t, keep_blob=blob)
                inline: bytes | None = data
                if len(data) > self.config.inline_max_bytes:
                    written = self._write_file(mailbox, oid, data)
                    inline = None
                cursor = head + 1
                db.execute(
                    "INSERT INTO items (mailbox, cursor, kind, hash, sender, size, charge, "
                    "created, expires, blob, data) VALUES (?, ?, 2, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (mailbox, cursor, oid, sender, len(data), charge, t, expires, blob, inline),
                )
                db.execute("INSERT OR IGNORE INTO refs VALUES (?, ?, ?)", (mailbox, blob, oid))
                used = self._added(db, mailbox, cursor, charge, t)
        except BaseException:
            if written is not None:
                written.unlink(missing_ok=True)
            raise
        self.totals = self._read_totals()
        return PushResult(cursor, True, used, evicted)

    def _check_size(self, size: int) -> None:
        if size > self.config.max_item_bytes:
            raise MailboxRefused(
                MailboxErrorCode.TOO_LARGE,
                f"item of {size} bytes exceeds this relay's {self.config.max_item_bytes}",
            )

    def _mailbox_row(self, db: sqlite3.Connection, mailbox: bytes) -> tuple[int, int, bytes | None]:
        row = db.execute(
            "SELECT head, bytes, group_id FROM mailboxes WHERE mailbox = ?", (mailbox,)
        ).fetchone()
        if row is None:
            raise MailboxRefused(MailboxErrorCode.PROTOCOL, "unknown mailbox: JOIN first")
        return int(row[0]), int(row[1]), None if row[2] is None else bytes(row[2])

    def _live_item(
        self, db: sqlite3.Connection, mailbox: bytes, item_hash: bytes, t: int
    ) -> int | None:
        row = db.execute(
            "SELECT cursor FROM items WHERE mailbox = ? AND hash = ? AND expires > ?",
            (mailbox, item_hash, t),
        ).fetchone()
        return None if row is None else int(row[0])

    def _added(
        self, db: sqlite3.Connection, mailbox: bytes, cursor: int, charge: int, t: int
    ) -> int:
        """Account for a new item; returns the mailbox's bytes now."""
        db.execute(
            "UPDATE mailboxes SET head = ?, items = items + 1, bytes = bytes + ?, "
            "last_used = ? WHERE mailbox = ?",
            (cursor, charge, t, mailbox),
        )
        db.execute("UPDATE totals SET items = items + 1, bytes = bytes + ?", (charge,))
        (used,) = db.execute("SELECT bytes FROM mailboxes WHERE mailbox = ?", (mailbox,)).fetchone()
        return int(used)

    def _make_room(
        self,
        db: sqlite3.Connection,
        mailbox: bytes,
        charge: int,
        t: int,
        *,
        keep_blob: bytes | None = None,
    ) -> Evictions:
        """Evict expired, then delivered items until ``charge`` fits; else refuse.

        ``keep_blob``: the blob being pushed; its entry is never evicted to make
        room for the rest of it (the delivered rule already keeps the entry of
        a blob the mailbox does not hold whole; this holds even if it did).
        """
        config = self.config
        try:
            free = self._free(self.directory)
        except OSError as exc:
            raise MailboxRefused(
                MailboxErrorCode.STORAGE_FULL, f"cannot check disk: {exc}"
            ) from None
        if free - charge < config.min_free_bytes:
            raise MailboxRefused(
                MailboxErrorCode.STORAGE_FULL,
                "the relay's disk is nearly full; push again later or to another relay",
            )

        def fits() -> bool:
            (used,) = db.execute(
                "SELECT bytes FROM mailboxes WHERE mailbox = ?", (mailbox,)
            ).fetchone()
            (total,) = db.execute("SELECT bytes FROM totals").fetchone()
            return bool(
                used + charge <= config.group_quota_bytes
                and total + charge <= config.total_quota_bytes
            )

        expired = quota = 0
        batch = defaults.MAILBOX_CLEANUP_BATCH
        while not fits():
            count = self._evict_where(db, "mailbox = ? AND expires <= ?", (mailbox, t), limit=batch)
            expired += count
            if count < batch:
                break
        step = defaults.MAILBOX_EVICT_STEP
        where = f"mailbox = ? AND {_DELIVERED}"
        args: tuple[object, ...] = (mailbox,)
        if keep_blob is not None:
            where += " AND NOT (kind = 1 AND blob = ?)"
            args = (mailbox, keep_blob)
        while not fits():
            count = self._evict_where(db, where, args, limit=step, oldest_first=True)
            quota += count
            if count < step:
                break
        if fits():
            return Evictions(expired=expired, quota=quota)
        (used,) = db.execute("SELECT bytes FROM mailboxes WHERE mailbox = ?", (mailbox,)).fetchone()
        if used + charge > config.group_quota_bytes:
            raise MailboxRefused(
                MailboxErrorCode.QUOTA_EXCEEDED,
                f"this group's mailbox holds {used} of {config.group_quota_bytes} bytes; "
                "push again once older items expire",
            )
        raise MailboxRefused(
            MailboxErrorCode.STORAGE_FULL, "the relay's mailbox storage is full; push again later"
        )

    # --- eviction -----------------------------------------------------------------------------

    def _evict_where(
        self,
        db: sqlite3.Connection,
        where: str,
        args: tuple[object, ...],
        *,
        limit: int | None = None,
        oldest_first: bool = False,
    ) -> int:
        """Delete up to ``limit`` items matching ``where``, their refs and files; fix counters."""
        sql = f"SELECT mailbox, cursor, hash, charge, kind, data IS NULL FROM items WHERE {where}"
        if oldest_first:
            sql += " ORDER BY mailbox, cursor"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = db.execute(sql, args).fetchall()
        if not rows:
            return 0
        per_mailbox: dict[bytes, tuple[int, int]] = {}
        objects: list[tuple[bytes, bytes]] = []
        for mailbox, _cursor, item_hash, charge, kind, no_data in rows:
            count, size = per_mailbox.get(bytes(mailbox), (0, 0))
            per_mailbox[bytes(mailbox)] = (count + 1, size + int(charge))
            if kind == ITEM_OBJECT:
                objects.append((bytes(mailbox), bytes(item_hash)))
                if no_data:
                    self._doomed.append((bytes(mailbox), bytes(item_hash)))
        db.executemany(
            "DELETE FROM items WHERE mailbox = ? AND cursor = ?",
            [(bytes(r[0]), int(r[1])) for r in rows],
        )
        # An object no longer held belongs to no blob: refs name held objects only.
        db.executemany("DELETE FROM refs WHERE mailbox = ? AND object = ?", objects)
        for mailbox, (count, size) in per_mailbox.items():
            db.execute(
                "UPDATE mailboxes SET items = items - ?, bytes = bytes - ? WHERE mailbox = ?",
                (count, size, mailbox),
            )
            db.execute("UPDATE totals SET items = items - ?, bytes = bytes - ?", (count, size))
        return len(rows)

    # --- pull, fetch ------------------------------------------------------------------------

    def pull(self, mailbox: bytes, after: int, limit: int, now: float) -> PullResult:
        """Live items after cursor ``after``: entries whole, objects as headers."""
        limit = max(1, min(limit, MAX_PULL_LIMIT))
        row = self._db.execute(
            "SELECT head FROM mailboxes WHERE mailbox = ?", (mailbox,)
        ).fetchone()
        if row is None:
            raise MailboxRefused(MailboxErrorCode.PROTOCOL, "unknown mailbox: JOIN first")
        head = int(row[0])
        rows = self._db.execute(
            "SELECT cursor, kind, hash, size, blob, CASE WHEN kind = 1 THEN data END FROM items "
            "WHERE mailbox = ? AND cursor > ? AND expires > ? ORDER BY cursor LIMIT ?",
            (mailbox, after, int(now), limit + 1),
        ).fetchall()
        items: list[Item] = []
        budget = MAX_PULL_BYTES
        has_more = len(rows) > limit
        for cursor, kind, item_hash, size, blob, data in rows[:limit]:
            item: Item
            if kind == ITEM_ENTRY:
                item = EntryItem(int(cursor), bytes(data))
            else:
                item = ObjectItem(int(cursor), bytes(item_hash), int(size), bytes(blob))
            cost = item_wire_size(item)
            if items and cost > budget:
                has_more = True
                break
            budget -= cost
            items.append(item)
        return PullResult(tuple(items), has_more, head)

    def fetch(self, mailbox: bytes, oid: bytes, now: float) -> FetchResult:
        """A live object's bytes, verified against its name.

        Absent or expired: no data. Damaged (its bytes do not hash to its
        name) or its file gone: dropped now, and ``damaged``. A file that
        cannot be read just now (EMFILE, EIO) is kept: :class:`MailboxRefused`
        ``try-again``.
        """
        row = self._db.execute(
            "SELECT data, expires FROM items WHERE mailbox = ? AND hash = ? AND kind = 2",
            (mailbox, oid),
        ).fetchone()
        if row is None or int(row[1]) <= int(now):
            return FetchResult(None)
        if row[0] is not None:
            data = bytes(row[0])
        else:
            try:
                data = self._object_path(mailbox, oid).read_bytes()
            except FileNotFoundError:
                data = b""  # gone: as damaged as can be
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, "I/O error")
                raise MailboxRefused(
                    MailboxErrorCode.TRY_AGAIN,
                    f"cannot read object {oid.hex()[:16]} just now ({name}); fetch it again later",
                ) from None
        if object_id(data) != oid:
            log.warning("mailbox object %s damaged or missing on disk: dropped", oid.hex()[:16])
            with self._write() as db:
                self._evict_where(db, "mailbox = ? AND hash = ?", (mailbox, oid))
            self.totals = self._read_totals()
            return FetchResult(None, damaged=True)
        return FetchResult(data)

    def head(self, mailbox: bytes) -> int:
        row = self._db.execute(
            "SELECT head FROM mailboxes WHERE mailbox = ?", (mailbox,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    # --- files ------------------------------------------------------------------------------

    def _write_file(self, mailbox: bytes, oid: bytes, data: bytes) -> Path:
        """Write ``data`` durably under its name (temp file, fsync, rename, fsync dir)."""
        path = self._object_path(mailbox, oid)
        directory = path.parent
        if not directory.is_dir():
            directory.mkdir(mode=0o700, exist_ok=True)
            _fsync_dir(directory.parent)
        tmp = directory / (path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(directory)
        return path

    # --- cleanup ------------------------------------------------------------------------------

    def start_cleanup(self, now: float) -> CleanupRun:
        """A cleanup pass as of ``now``; nothing happens until its first :meth:`CleanupRun.step`."""
        return CleanupRun(self, now)

    def cleanup(self, now: float) -> CleanupResult:
        """A whole cleanup pass at once (tests, tools; relayd steps through one)."""
        run = self.start_cleanup(now)
        while run.step():
            pass
        return run.result()

    def _cleanup_steps(self, now: float, run: CleanupRun) -> Iterator[None]:
        """The pass, yielding after each bounded transaction (see :class:`CleanupRun`)."""
        t = int(now)
        config = self.config
        batch = defaults.MAILBOX_CLEANUP_BATCH

        def evict_all(where: str, args: tuple[object, ...]) -> Iterator[int]:
            while True:
                with self._write() as db:
                    count = self._evict_where(db, where, args, limit=batch)
                yield count
                if count < batch:
                    return

        def delete_all(table: str, where: str, args: tuple[object, ...]) -> Iterator[int]:
            while True:
                with self._write() as db:
                    count = db.execute(
                        f"DELETE FROM {table} WHERE rowid IN "
                        f"(SELECT rowid FROM {table} WHERE {where} LIMIT ?)",
                        (*args, batch),
                    ).rowcount
                yield max(0, count)
                if count < batch:
                    return

        for count in evict_all("expires <= ?", (t,)):
            run.expired += count
            yield
        if config.drop_delivered:
            for count in evict_all(_DELIVERED, ()):
                run.delivered += count
                yield
        # References of blobs no entry names any more (or of objects gone),
        # then the objects no reference keeps.
        for _ in delete_all(
            "refs",
            "NOT EXISTS (SELECT 1 FROM items e WHERE e.mailbox = refs.mailbox AND e.kind = 1 "
            "AND e.blob = refs.blob) OR NOT EXISTS (SELECT 1 FROM items o WHERE "
            "o.mailbox = refs.mailbox AND o.hash = refs.object)",
            (),
        ):
            yield
        for count in evict_all(
            "kind = 2 AND NOT EXISTS (SELECT 1 FROM refs r WHERE r.mailbox = items.mailbox "
            "AND r.object = items.hash)",
            (),
        ):
            run.orphans += count
            yield
        for count in delete_all("devices", "last_seen <= ?", (t - config.retention_s,)):
            run.devices += count
            yield
        for count in delete_all(
            "mailboxes",
            "last_used <= ? AND NOT EXISTS (SELECT 1 FROM items i WHERE "
            "i.mailbox = mailboxes.mailbox) AND NOT EXISTS (SELECT 1 FROM devices d "
            "WHERE d.mailbox = mailboxes.mailbox)",
            (t - config.retention_s,),
        ):
            run.mailboxes += count
            yield
        yield from self._recount()
        if self._objects.is_dir():
            for directory in sorted(self._objects.iterdir()):
                run.stray_files += self._remove_stray_files(directory)
                yield
        yield from self._vacuum()
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        self.totals = self._read_totals(count_groups=True)

    def _recount(self) -> Iterator[None]:
        """Counters from the rows themselves, a few mailboxes per step: they never drift long."""
        after = b""
        size = defaults.MAILBOX_RECOUNT_BATCH
        while True:
            with self._write() as db:
                rows = db.execute(
                    "SELECT mailbox FROM mailboxes WHERE mailbox > ? ORDER BY mailbox LIMIT ?",
                    (after, size),
                ).fetchall()
                for (mailbox,) in rows:
                    db.execute(
                        "UPDATE mailboxes SET items = (SELECT COUNT(*) FROM items i WHERE "
                        "i.mailbox = ?1), bytes = (SELECT COALESCE(SUM(charge), 0) FROM items i "
                        "WHERE i.mailbox = ?1) WHERE mailbox = ?1",
                        (mailbox,),
                    )
                if len(rows) < size:  # every mailbox is recounted: the totals are their sum
                    db.execute(
                        "UPDATE totals SET items = (SELECT COALESCE(SUM(items), 0) FROM "
                        "mailboxes), bytes = (SELECT COALESCE(SUM(bytes), 0) FROM mailboxes)"
                    )
            yield
            if len(rows) < size:
                return
            after = bytes(rows[-1][0])

    def _vacuum(self) -> Iterator[None]:
        """Return free pages to the filesystem, a bounded number per step.

        ``PRAGMA incremental_vacuum(N)`` frees one page per step of the
        statement and returns no rows, so Python's ``execute`` (one step;
        ``fetchall`` does not step a row-less statement again) frees a single
        page. ``executescript`` runs it to completion.
        """
        pages = defaults.MAILBOX_VACUUM_PAGES
        (before,) = self._db.execute("PRAGMA freelist_count").fetchone()
        while before:
            self._db.executescript(f"PRAGMA incremental_vacuum({pages});")
            (free,) = self._db.execute("PRAGMA freelist_count").fetchone()
            yield
            if free >= before:  # not an incremental-vacuum database: nothing to give back
                return
            before = free

    def _remove_stray_files(self, directory: Path) -> int:
        """Files of ``directory`` no row names (a crash between rename and commit), temp files."""
        try:
            mailbox = bytes.fromhex(directory.name)
        except ValueError:
            return 0
        held = {
            bytes(r[0]).hex()
            for r in self._db.execute(
                "SELECT hash FROM items WHERE mailbox = ? AND kind = 2 AND data IS NULL",
                (mailbox,),
            )
        }
        removed = 0
        for path in directory.iterdir():
            if path.name not in held:
                path.unlink(missing_ok=True)
                removed += 1
        if not held:
            with contextlib.suppress(OSError):
                directory.rmdir()
        return removed

    # --- inspection (status, tests) -----------------------------------------------------------

    def mailbox_stats(self, mailbox: bytes) -> tuple[int, int, int]:
        """(head, items, bytes) of one mailbox; zeros if unknown."""
        row = self._db.execute(
            "SELECT head, items, bytes FROM mailboxes WHERE mailbox = ?", (mailbox,)
        ).fetchone()
        return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))

    def cursors(self, mailbox: bytes) -> list[int]:
        """Every stored cursor of ``mailbox`` in order (tests check gaps and duplicates)."""
        rows = self._db.execute(
            "SELECT cursor FROM items WHERE mailbox = ? ORDER BY cursor", (mailbox,)
        ).fetchall()
        return [int(r[0]) for r in rows]


class CleanupRun:
    """One cleanup pass of a store (:meth:`MailboxStore.start_cleanup`), in bounded steps.

    Each :meth:`step` does one short transaction (at most
    :data:`~relayd.defaults.MAILBOX_CLEANUP_BATCH` rows), one directory of
    stray files or one batch of free pages, and says whether more remains;
    the caller serves other requests between steps (relayd releases its
    store lock). Blocking, like the store; :meth:`result` sums the counts.
    """

    def __init__(self, store: MailboxStore, now: float) -> None:
        self.expired = self.delivered = self.orphans = 0
        self.devices = self.mailboxes = self.stray_files = 0
        self.steps = 0
        self._store = store
        self._bytes_before = store.totals.bytes
        self._steps = store._cleanup_steps(now, self)
        self._done = False

    def step(self) -> bool:
        """Do the next piece; False once the pass is complete (and nothing was done)."""
        if self._done:
            return False
        try:
            next(self._steps)
        except StopIteration:
            self._done = True
            return False
        self.steps += 1
        return True

    def result(self) -> CleanupResult:
        return CleanupResult(
            expired=self.expired,
            delivered=self.delivered,
            orphans=self.orphans,
            devices=self.devices,
            mailboxes=self.mailboxes,
            stray_files=self.stray_files,
            bytes_freed=max(0, self._bytes_before - self._store.totals.bytes),
        )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"{path}: mailbox schema {version} is newer than this relayd ({SCHEMA_VERSION}); "
            "upgrade relayd, or move the mailbox directory aside to start empty"
        )
    for number, script in MIGRATIONS:
        if number <= version:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        log.info("mailbox database at schema %d", number)


__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "CleanupResult",
    "CleanupRun",
    "Evictions",
    "FetchResult",
    "JoinInfo",
    "MailboxRefused",
    "MailboxStore",
    "PullResult",
    "PushResult",
    "Totals",
    "check_entry_untrusted",
    "check_object_fits",
    "check_object_untrusted",
]
