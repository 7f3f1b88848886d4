"""Local operations on a device's store, shared by the CLI and the daemon.

One home for what ``put``, ``get``, ``ls`` and ``rm`` mean, so the CLI
working on the store directly and the daemon answering its control socket
behave identically. Functions here are synchronous (SQLite and file I/O);
the daemon runs them in a worker thread. Results are JSON-ready dicts: the
same shape the CLI prints with ``--json`` and the control socket returns.
"""

from __future__ import annotations

import mimetypes
import time
from pathlib import Path
from typing import Any

from p2psync.errors import LocalProtocolError, NotFound
from p2psync.proto.entry import Kind, hlc_to_ms
from p2psync.store import Meta, Store, StoredEntry
from p2psync.store.store import Readable


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def entry_json(stored: StoredEntry) -> dict[str, Any]:
    entry = stored.entry
    meta = stored.meta
    return {
        "key": stored.key,
        "kind": entry.kind.name.lower(),
        "blob": entry.blob.hex() or None,
        "size": entry.size,
        "status": "ok" if stored.complete else "pending",
        "author": str(entry.author),
        "seq": entry.seq,
        "time_ms": hlc_to_ms(entry.hlc),
        "content_type": meta.content_type if meta else None,
        "name": meta.name if meta else None,
        "cursor": stored.cursor,
    }


def put_stream(
    store: Store,
    reader: Readable,
    *,
    key: str,
    name: str | None = None,
    content_type: str | None = None,
) -> StoredEntry:
    blob_id, size = store.put_blob(reader)
    return store.append(
        Kind.PUT,
        Meta(key=key, content_type=content_type, name=name),
        now_ms=now_ms(),
        blob=blob_id,
        size=size,
    )


def put_path(store: Store, path: Path, *, key: str | None = None) -> StoredEntry:
    if not path.is_file():
        raise LocalProtocolError(f"{path} is not a readable file")
    with path.open("rb") as handle:
        return put_stream(
            store,
            handle,
            key=key or path.name,
            name=path.name,
            content_type=mimetypes.guess_type(path.name)[0],
        )


def resolve_blob(store: Store, target: str) -> bytes:
    """A key's current blob, or a blob given by its 64-hex id."""
    head = store.head(target)
    if head is not None and head.entry.kind is Kind.PUT:
        return head.entry.blob
    if head is not None:
        raise NotFound(f"{target} was deleted")
    if len(target) == 64:
        try:
            return bytes.fromhex(target)
        except ValueError:
            pass
    raise NotFound(f"no key or blob named {target!r} (see `p2psync ls`)")


def get_to_path(store: Store, target: str, output: Path) -> int:
    """Write a blob to ``output`` atomically (temp file, then rename); return its size."""
    blob_id = resolve_blob(store, target)
    tmp = output.with_name(f".{output.name}.p2psync-tmp")
    written = 0
    try:
        with tmp.open("wb") as handle:
            for chunk in store.iter_blob(blob_id):
                handle.write(chunk)
                written += len(chunk)
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def list_live(store: Store) -> list[dict[str, Any]]:
    rows = []
    for stored in store.live():
        row = entry_json(stored)
        if not stored.complete:
            done, needed = store.blob_progress(stored.entry.blob)
            row["progress"] = {"chunks_done": done, "chunks_total": needed}
        rows.append(row)
    return rows


def remove(store: Store, key: str) -> tuple[StoredEntry, int]:
    """Tombstone ``key``; return the DELETE entry and how many objects were freed."""
    head = store.head(key)
    if head is None or head.entry.kind is not Kind.PUT:
        raise NotFound(f"no key named {key!r} (see `p2psync ls`)")
    stored = store.append(Kind.DELETE, Meta(key=key), now_ms=now_ms())
    return stored, store.gc().objects_removed
