"""Object files on disk: one file per sealed object, named by its id.

Rules
-----
- Layout: ``objects/<first 2 hex>/<64 hex>``; temp files in ``objects/tmp``;
  quarantined corrupt files in ``objects/corrupt``.
- A write goes to a fresh temp file, is fsynced, renamed into place and the
  directory fsynced: after :meth:`ObjectFiles.write` returns, the object
  survives power loss, and a crash before that leaves only a temp file.
- Temp files older than :data:`~p2psync.defaults.STALE_TEMP_SECONDS` belong
  to a writer that died; :meth:`ObjectFiles.clean_temp` removes them.
- Every read re-hashes the bytes: a file whose hash no longer matches its
  name raises :class:`CorruptObject` and is moved to ``corrupt/`` so a
  later sync can fetch a good copy. Corrupt bytes are never returned.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

from p2psync import defaults
from p2psync.errors import IntegrityError, NotFound
from p2psync.store.objects import MAX_SEALED_SIZE, object_id

log = logging.getLogger(__name__)


class CorruptObject(IntegrityError):
    """An object file's bytes no longer hash to its name."""

    def __init__(self, oid: bytes, detail: str) -> None:
        super().__init__(f"object {oid.hex()[:16]} is corrupted on disk: {detail}")
        self.object_id = oid


class ObjectFiles:
    __slots__ = ("corrupt_dir", "root", "tmp_dir")

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.corrupt_dir = root / "corrupt"
        for directory in (root, self.tmp_dir, self.corrupt_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, oid: bytes) -> Path:
        name = oid.hex()
        return self.root / name[:2] / name

    def exists(self, oid: bytes) -> bool:
        return self.path(oid).is_file()

    def write(self, oid: bytes, sealed: bytes | memoryview, *, sync_dir: bool = True) -> None:
        """Durably store ``sealed`` under ``oid`` (the caller computed the id).

        With ``sync_dir=False`` the caller must call :meth:`sync_dirs` before
        it relies on the object (batching one directory fsync per fan-out).
        """
        target = self.path(oid)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=oid.hex()[:16] + ".", dir=self.tmp_dir)
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(sealed)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        if sync_dir:
            _fsync_dir(target.parent)

    def sync_dirs(self, oids: set[bytes]) -> None:
        """fsync the fan-out directories of ``oids``, once each."""
        for directory in {self.path(oid).parent for oid in oids}:
            _fsync_dir(directory)

    def read_verified(self, oid: bytes) -> bytes:
        """The object's bytes, checked against its id; quarantines on mismatch."""
        path = self.path(oid)
        try:
            size = path.stat().st_size
            if size > MAX_SEALED_SIZE:
                self.quarantine(oid)
                raise CorruptObject(oid, f"file is {size} bytes, larger than any object")
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"object {oid.hex()[:16]} is not stored here") from None
        if object_id(data) != oid:
            self.quarantine(oid)
            raise CorruptObject(oid, "its hash no longer matches its name")
        return data

    def remove(self, oid: bytes) -> None:
        self.path(oid).unlink(missing_ok=True)

    def quarantine(self, oid: bytes) -> None:
        path = self.path(oid)
        if path.exists():
            os.replace(path, self.corrupt_dir / f"{oid.hex()}.{int(time.time())}")
            log.warning("quarantined corrupt object %s", oid.hex()[:16])

    def clean_temp(self, *, older_than: float = defaults.STALE_TEMP_SECONDS) -> int:
        """Remove temp files left by writers that died; return how many."""
        cutoff = time.time() - older_than
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            try:
                if leftover.stat().st_mtime <= cutoff:
                    leftover.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            log.info("removed %d leftover temp files from an interrupted write", removed)
        return removed

    def iter_ids(self) -> list[bytes]:
        """Ids of every object file present (for garbage collection)."""
        found = []
        for fanout in self.root.iterdir():
            if len(fanout.name) != 2 or not fanout.is_dir():
                continue
            for item in fanout.iterdir():
                try:
                    found.append(bytes.fromhex(item.name))
                except ValueError:
                    continue
        return found


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
