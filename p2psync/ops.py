"""Local operations on a device's store, shared by the CLI, the daemon and the library.

One home for what ``put``, ``get``, ``ls`` and ``rm`` mean, so the CLI
working on the store directly, the daemon answering its control socket and
an app embedding :class:`~p2psync.node.Node` behave identically. Functions
here are synchronous (SQLite and file I/O); the node runs them in a worker
thread. Results are JSON-ready dicts: the same shape the CLI prints with
``--json`` and the control socket returns (the ``entry`` object of
docs/control-api.md, built by :meth:`p2psync.api.Change.to_json`).

``progress(bytes_done)`` callbacks run in that worker thread, once per chunk.
"""

from __future__ import annotations

import io
import mimetypes
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from p2psync.api import Change
from p2psync.crypto.group import GroupSecret
from p2psync.errors import LocalProtocolError, NotFound
from p2psync.home import Home
from p2psync.proto.entry import Kind
from p2psync.store import Meta, Store, StoredEntry
from p2psync.store.objects import AppValue
from p2psync.store.store import Readable

Progress = Callable[[int], None]
Source = bytes | bytearray | memoryview | str | os.PathLike[str] | Readable


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def entry_json(stored: StoredEntry) -> dict[str, Any]:
    return Change.from_stored(stored).to_json()


def check_app_meta(app: Mapping[str, object] | None) -> dict[str, AppValue]:
    """App metadata: string names, values str/int/bytes/bool/None (sealed with the entry)."""
    checked: dict[str, AppValue] = {}
    for name, value in (app or {}).items():
        if not isinstance(name, str):
            raise LocalProtocolError("meta names must be strings")
        if value is not None and not isinstance(value, str | int | bytes | bool):
            raise LocalProtocolError(
                f"meta[{name!r}] is a {type(value).__name__}; values are str, int, bytes, "
                "bool or None"
            )
        checked[name] = value
    return checked


def put_stream(
    store: Store,
    reader: Readable,
    *,
    key: str,
    name: str | None = None,
    content_type: str | None = None,
    app: Mapping[str, AppValue] | None = None,
    progress: Progress | None = None,
) -> StoredEntry:
    if not key:
        raise LocalProtocolError("a key is a non-empty string")
    meta = Meta(key=key, content_type=content_type, name=name, app=check_app_meta(app))
    meta.encode()  # too-large metadata fails before any chunk is written
    blob_id, size = store.put_blob(reader, progress=progress)
    return store.append(
        Kind.PUT,
        meta,
        now_ms=now_ms(),
        blob=blob_id,
        size=size,
    )


def put_path(
    store: Store,
    path: Path,
    *,
    key: str | None = None,
    content_type: str | None = None,
    app: Mapping[str, AppValue] | None = None,
    progress: Progress | None = None,
) -> StoredEntry:
    """Store a file under ``key`` (default: its name), recording its name and type."""
    if not path.is_file():
        raise LocalProtocolError(f"{path} is not a readable file")
    with path.open("rb") as handle:
        return put_stream(
            store,
            handle,
            key=key or path.name,
            name=path.name,
            content_type=content_type or mimetypes.guess_type(path.name)[0],
            app=app,
            progress=progress,
        )


def put_source(
    store: Store,
    source: Source,
    *,
    key: str | None = None,
    content_type: str | None = None,
    app: Mapping[str, AppValue] | None = None,
    progress: Progress | None = None,
) -> StoredEntry:
    """Store bytes, a file named by a path, or a binary file object (streamed).

    Bytes and file objects need ``key``; a path defaults to its file name. A
    ``str`` is always a path: to store text, encode it.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        return put_path(store, path, key=key, content_type=content_type, app=app, progress=progress)
    if key is None:
        raise LocalProtocolError("putting bytes or a stream needs a key")
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(bytes(source))
    if not callable(getattr(source, "read", None)):
        raise LocalProtocolError(
            f"cannot put a {type(source).__name__}: give bytes, a path or a binary file"
        )
    return put_stream(store, source, key=key, content_type=content_type, app=app, progress=progress)


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


def get_to_path(
    store: Store, target: str, output: Path, *, progress: Progress | None = None
) -> int:
    """Write a blob to ``output`` atomically (temp file, then rename); return its size."""
    blob_id = resolve_blob(store, target)
    tmp = output.with_name(f".{output.name}.p2psync-tmp")
    written = 0
    try:
        with tmp.open("wb") as handle:
            for chunk in store.iter_blob(blob_id):
                handle.write(chunk)
                written += len(chunk)
                if progress is not None:
                    progress(written)
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
    """Tombstone ``key``; return the DELETE entry and how many objects were freed.

    Frees the deleted value's objects only (unless another key still holds
    the same content): the cost of a delete is that value's size, never the
    store's (the store frees whatever a new head supersedes, see
    :class:`~p2psync.store.Store`).
    """
    head = store.head(key)
    if head is None or head.entry.kind is not Kind.PUT:
        raise NotFound(f"no key named {key!r} (see `p2psync ls`)")
    before = store.objects_released
    stored = store.append(Kind.DELETE, Meta(key=key), now_ms=now_ms())
    return stored, store.objects_released - before


def blob_size(store: Store, target: str) -> int | None:
    """Size of a key's current value (None for a blob id or an unknown key)."""
    head = store.head(target)
    return head.entry.size if head is not None and head.entry.kind is Kind.PUT else None


def value_size(store: Store, target: str) -> int | None:
    """Size of what ``get target`` returns: a key's value, or a blob given by its id.

    None if neither is known (``get`` then says why); nothing is read.
    """
    size = blob_size(store, target)
    if size is not None or store.head(target) is not None or len(target) != 64:
        return size
    try:
        return store.blob_size(bytes.fromhex(target))
    except ValueError:
        return None


def create_group(home: Home, random_bytes: Callable[[int], bytes] = os.urandom) -> GroupSecret:
    """Start a new group with this device and record it as the first member."""
    secret = home.create_group(random_bytes)
    with home.open_store() as store:
        node_id = str(store.identity.node_id)
        name = home.load_config().name
        store.append(
            Kind.MEMBER,
            Meta(key="", content_type="device", name=name, app={"node_id": node_id}),
            now_ms=now_ms(),
        )
    return secret
