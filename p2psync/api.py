"""The library API's values, and how changes and status reach an app.

Theory
------
**Changes are numbered.** Every entry a node stores — written on this device
or received from a peer — gets the next local *cursor* (SQLite
``AUTOINCREMENT``: assigned inside the one writer's transaction, so in commit
order, and never reused, not even after a restart). "Everything after cursor
``c``" is therefore an exact question:

- :meth:`Node.pull(after=c) <p2psync.node.Node.pull>` answers it one page at
  a time (:class:`PullResult`: the changes and the cursor to ask after next);
- :meth:`Node.subscribe(after=c) <p2psync.node.Node.subscribe>` answers it
  for ever (:class:`Subscription`): it pulls after the last change it
  delivered, and when there is nothing new it waits for the node's change
  signal, taken *before* the read, so a commit between the read and the wait
  is never missed; a slow poll (``SUBSCRIBE_POLL_INTERVAL``) also catches
  writes by another process on the same home. Delivery is by cursor, so a
  change is never delivered twice.

An app that saves the cursor of the last change it processed and later calls
``subscribe(after=saved)`` (even in a new process, after a crash) sees every
later change exactly once. A change whose blob is still on its way is
delivered at once with ``pending=True``; ``get(..., wait=True)`` waits for it,
and ``sync-progress`` events tell how far it got.

**Status is a snapshot.** Peer connections, paths and transfer progress
describe the present, not a history: :class:`EventHub` fans them out to
readers through bounded queues. A reader that falls behind loses the newest
events, and is told how many (:class:`EventsDropped`) so it can re-read
``status()``.

Rates are smoothed (EWMA, :data:`~p2psync.defaults.RATE_SMOOTHING`) over the
node's sampling ticks; :class:`RateMeter` and :class:`TransferTracker` are
plain classes that take ``now`` and never read a clock.

**Local transfers** (a ``put`` or ``get_to_path`` of a big file) report
through their ``progress(bytes_done)`` callback, called after each chunk in
the worker thread. :class:`ProgressMeter` is such a callback that also knows
the total and the rate (bytes/s since the transfer began: a local transfer
runs at disk speed, no smoothing needed) and hands each
:class:`TransferProgress` on; its clock is injected. The control API's
``progress`` events are its snapshots.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import trio

from p2psync import defaults
from p2psync.proto.entry import Kind, hlc_to_ms
from p2psync.store.objects import AppValue

if TYPE_CHECKING:
    from p2psync.node import Node
    from p2psync.store import StoredEntry

ChangeKind = Literal["put", "delete", "member"]
JsonDict = dict[str, Any]


def app_value_json(value: AppValue) -> Any:
    """JSON for one ``meta`` value: bytes become ``{"base64": "..."}``."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    return value


@dataclass(frozen=True, slots=True)
class Change:
    """One entry as this device stores it, in local arrival order.

    ``kind`` is ``"put"`` (a new value for ``key``), ``"delete"`` (a
    tombstone for ``key``) or ``"member"`` (a device joined the group;
    ``key`` is ``""`` and ``meta`` holds its ``node_id``). ``pending`` is
    True while a put's blob has not fully arrived (listed, not yet readable).
    ``hlc`` orders writes across devices (last writer wins per key);
    ``cursor`` orders them on this device only.
    """

    cursor: int
    kind: ChangeKind
    key: str | None
    blob: str | None  # 64 hex digits, or None for deletes and members
    size: int
    author: str  # NodeId text of the device that wrote it
    seq: int  # position in the author's feed
    hlc: int
    pending: bool
    content_type: str | None = None
    name: str | None = None
    meta: Mapping[str, AppValue] = field(default_factory=lambda: MappingProxyType({}), hash=False)

    @property
    def deleted(self) -> bool:
        return self.kind == "delete"

    @property
    def time_ms(self) -> int:
        """Wall-clock milliseconds of the write (the HLC's physical part)."""
        return hlc_to_ms(self.hlc)

    @classmethod
    def from_stored(cls, stored: StoredEntry) -> Change:
        entry = stored.entry
        meta = stored.meta
        kind: ChangeKind = "member"
        if entry.kind is Kind.PUT:
            kind = "put"
        elif entry.kind is Kind.DELETE:
            kind = "delete"
        return cls(
            cursor=stored.cursor,
            kind=kind,
            key=stored.key,
            blob=entry.blob.hex() or None,
            size=entry.size,
            author=str(entry.author),
            seq=entry.seq,
            hlc=entry.hlc,
            pending=not stored.complete,
            content_type=meta.content_type if meta else None,
            name=meta.name if meta else None,
            meta=MappingProxyType(dict(meta.app) if meta else {}),
        )

    def to_json(self) -> JsonDict:
        """The ``entry`` object of the control API (docs/control-api.md)."""
        return {
            "cursor": self.cursor,
            "kind": self.kind,
            "key": self.key,
            "blob": self.blob,
            "size": self.size,
            "author": self.author,
            "seq": self.seq,
            "hlc": self.hlc,
            "time_ms": self.time_ms,
            "deleted": self.deleted,
            "pending": self.pending,
            "status": "pending" if self.pending else "ok",
            "content_type": self.content_type,
            "name": self.name,
            "meta": {k: app_value_json(v) for k, v in self.meta.items()},
        }


@dataclass(frozen=True, slots=True)
class PullResult:
    """A page of changes after a cursor; ask again ``after=result.cursor``.

    ``cursor`` is the last change's cursor (or the cursor asked after when
    the page is empty); ``more`` is True when the page was full, so more
    changes may be waiting.
    """

    changes: tuple[Change, ...]
    cursor: int
    more: bool

    def __iter__(self) -> Iterator[Change]:
        return iter(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def to_json(self) -> JsonDict:
        return {
            "changes": [c.to_json() for c in self.changes],
            "cursor": self.cursor,
            "more": self.more,
        }


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One device of the group as this node sees it now."""

    node_id: str
    connected: bool
    path: str  # "lan"/"direct": our own UDP path; "relay": through relayd; "none"
    address: str | None  # HOST:PORT last used, if any
    rtt_ms: float | None
    bytes_in: int  # on the current connection (QUIC bytes, all streams)
    bytes_out: int
    rx_rate: float  # bytes/s, smoothed
    tx_rate: float
    connected_since: float | None  # unix time
    last_seen: float | None
    last_error: str | None

    def to_json(self) -> JsonDict:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class Transfer:
    """A blob on its way to this device (bytes counted to the chunk)."""

    blob: str
    key: str | None
    bytes_done: int
    bytes_total: int
    rate: float  # bytes/s, smoothed
    complete: bool

    def to_json(self) -> JsonDict:
        return dataclasses.asdict(self)


# --- status events --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerConnected:
    type: ClassVar[str] = "peer-connected"
    node_id: str
    path: str
    address: str | None


@dataclass(frozen=True, slots=True)
class PeerDisconnected:
    type: ClassVar[str] = "peer-disconnected"
    node_id: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class PathChanged:
    type: ClassVar[str] = "path-changed"
    node_id: str
    path: str
    previous: str


@dataclass(frozen=True, slots=True)
class SyncProgress:
    type: ClassVar[str] = "sync-progress"
    transfer: Transfer


@dataclass(frozen=True, slots=True)
class EventsDropped:
    type: ClassVar[str] = "events-dropped"
    count: int


NodeEvent = PeerConnected | PeerDisconnected | PathChanged | SyncProgress | EventsDropped


def event_json(event: NodeEvent) -> JsonDict:
    """The control API's event object: ``{"type": ..., fields...}``."""
    if isinstance(event, SyncProgress):
        return {"type": event.type, **event.transfer.to_json()}
    return {"type": event.type, **dataclasses.asdict(event)}


class EventStream:
    """One reader's bounded queue of status events (use :meth:`EventHub.open`).

    :meth:`only` narrows it to some event types: the others are never
    queued, so they neither fill the queue nor count as dropped.
    """

    def __init__(self, limit: int) -> None:
        self._send, self._receive = trio.open_memory_channel[NodeEvent](limit)
        self._dropped = 0
        self._types: frozenset[str] | None = None  # None: every type

    def only(self, types: Iterable[str]) -> None:
        """Queue only events of these ``type`` names (``EventsDropped`` counts only those)."""
        self._types = frozenset(types)

    def offer(self, event: NodeEvent) -> None:
        if self._types is not None and event.type not in self._types:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self._dropped += 1

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> NodeEvent:
        if self._dropped:
            dropped, self._dropped = self._dropped, 0
            return EventsDropped(dropped)
        return await self._receive.receive()


class EventHub:
    """Fans status events out to every open :class:`EventStream`."""

    def __init__(self, limit: int = defaults.EVENT_QUEUE_MAX) -> None:
        self._limit = limit
        self._streams: set[EventStream] = set()

    def publish(self, event: NodeEvent) -> None:
        for stream in self._streams:
            stream.offer(event)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[EventStream]:
        stream = EventStream(self._limit)
        self._streams.add(stream)
        try:
            yield stream
        finally:
            self._streams.discard(stream)


# --- rates and transfers (pure: the caller passes ``now``) -------------------------


class RateMeter:
    """Smoothed bytes/s of ever-growing byte counters, one per name."""

    def __init__(self, smoothing: float = defaults.RATE_SMOOTHING) -> None:
        self._smoothing = smoothing
        self._last: dict[object, tuple[int, float, float]] = {}  # name -> (total, at, rate)

    def sample(self, name: object, total: int, now: float) -> float:
        last = self._last.get(name)
        if last is None or total < last[0] or now <= last[1]:
            rate = 0.0 if last is None or total < last[0] else last[2]
            self._last[name] = (total, now, rate)
            return rate
        instant = (total - last[0]) / (now - last[1])
        rate = self._smoothing * instant + (1 - self._smoothing) * last[2]
        self._last[name] = (total, now, rate)
        return rate

    def rate(self, name: object) -> float:
        last = self._last.get(name)
        return 0.0 if last is None else last[2]

    def forget(self, name: object) -> None:
        self._last.pop(name, None)


@dataclass(slots=True)
class _Tracked:
    key: str | None
    size: int
    done: int = 0
    complete: bool = False


class TransferTracker:
    """Blobs this device is fetching, and how far each got.

    The node tells it which blobs to track (pending puts it received) and, at
    every sampling tick, how many chunks of each are present; it answers with
    the transfers that moved, each with a smoothed rate. A blob that
    completed is reported once more with ``complete=True`` and then dropped;
    one that is no longer wanted (its key was overwritten or deleted) is
    dropped silently.
    """

    def __init__(self, chunk_size: int = defaults.CHUNK_SIZE) -> None:
        self._chunk_size = chunk_size
        self._blobs: dict[bytes, _Tracked] = {}
        self._rates = RateMeter()

    def __len__(self) -> int:
        return len(self._blobs)

    def __contains__(self, blob: bytes) -> bool:
        return blob in self._blobs

    def blobs(self) -> list[bytes]:
        return list(self._blobs)

    def track(self, blob: bytes, key: str | None, size: int) -> None:
        if blob not in self._blobs:
            self._blobs[blob] = _Tracked(key, size)

    def update(
        self, progress: Mapping[bytes, tuple[int, int] | None], now: float
    ) -> list[Transfer]:
        """``progress[blob]`` = (chunks present, chunks needed), or None: not wanted now."""
        moved: list[Transfer] = []
        for blob, counts in progress.items():
            tracked = self._blobs.get(blob)
            if tracked is None:
                continue
            if counts is None:
                del self._blobs[blob]
                self._rates.forget(blob)
                continue
            present, needed = counts
            complete = needed > 0 and present >= needed
            done = tracked.size if complete else min(tracked.size, present * self._chunk_size)
            rate = self._rates.sample(blob, done, now)
            if done != tracked.done or complete:
                tracked.done, tracked.complete = done, complete
                moved.append(self._transfer(blob, tracked, rate))
            if complete:
                del self._blobs[blob]
                self._rates.forget(blob)
        return moved

    def transfers(self) -> list[Transfer]:
        return [self._transfer(b, t, self._rates.rate(b)) for b, t in self._blobs.items()]

    def _transfer(self, blob: bytes, tracked: _Tracked, rate: float) -> Transfer:
        return Transfer(blob.hex(), tracked.key, tracked.done, tracked.size, rate, tracked.complete)


# --- iterators an app holds -------------------------------------------------------


class Subscription:
    """``async for change in node.subscribe(after=cursor)``: every change after ``cursor``.

    First the backlog (in pages), then live changes as they land, local or
    from peers, each exactly once and in cursor order. :attr:`cursor` is the
    cursor of the last change delivered: save it to resume later. Holds no
    resources between iterations; just stop iterating to unsubscribe.
    """

    def __init__(self, node: Node, after: int = 0) -> None:
        if after < 0:
            raise ValueError("after is a cursor: 0 or more")
        self._node = node
        self.cursor = after
        self._buffer: deque[Change] = deque()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Change:
        while not self._buffer:
            changed = self._node.changes()  # before the read: nothing slips between
            page = await self._node.pull(after=self.cursor, limit=defaults.SUBSCRIBE_PAGE)
            if page.changes:
                self._buffer.extend(page.changes)
                break
            with trio.move_on_after(defaults.SUBSCRIBE_POLL_INTERVAL):
                await changed.wait()
        change = self._buffer.popleft()
        self.cursor = change.cursor
        return change


class BlobReader:
    """``async for chunk in node.get_stream(key_or_blob)``: plaintext, 1 MiB at a time.

    Each chunk is read, verified and decrypted in a worker thread; at most
    one chunk is in memory. Errors (not found, pending, corrupt) surface on
    the first iteration.

    The reader sees the value the key held at its first chunk, whole: the
    store pins that blob (:meth:`p2psync.store.Store.iter_blob`), so an
    overwrite or delete meanwhile frees the old value only when the reader
    is done. It is done at its end, on an error, or when closed: a reader
    you stop early should be closed (``async with node.get_stream(key) as
    reader: async for chunk in reader: ...``, or ``await reader.aclose()``).
    """

    def __init__(self, node: Node, target: str) -> None:
        self._node = node
        self._target = target
        self._chunks: Generator[bytes, None, None] | None = None
        self._done = False
        self.bytes_read = 0

    def __aiter__(self) -> BlobReader:
        return self

    async def __aenter__(self) -> BlobReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _first(self) -> bytes | None:
        """Resolve and read the first chunk in one store call: no write slips between."""
        from p2psync import ops

        store = self._node.store
        self._chunks = store.iter_blob(ops.resolve_blob(store, self._target))
        return next(self._chunks, None)

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._chunks is None:
                chunk = await self._node.locked(self._first)
            else:
                chunk = await self._node.locked(next, self._chunks, None)
        except BaseException:
            await self.aclose()
            raise
        if chunk is None:
            self._done = True  # the iterator ran out: its pin is already gone
            raise StopAsyncIteration
        self.bytes_read += len(chunk)
        return chunk

    async def aclose(self) -> None:
        """Stop reading; the store frees the value now if it is no longer live."""
        self._done = True
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            with trio.CancelScope(shield=True):  # the pin must go even when cancelled
                await self._node.locked(chunks.close)


Progress = Callable[[int], None]
"""``progress(bytes_done)``: called from a worker thread after each chunk."""


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """How far a local put or get got (a snapshot; see :class:`ProgressMeter`)."""

    bytes_done: int
    bytes_total: int | None  # None: unknown (a stream)
    rate: float  # bytes/s since the transfer began

    def to_json(self) -> JsonDict:
        return dataclasses.asdict(self)


class ProgressMeter:
    """A ``progress=`` callback that also knows the total and the rate::

        meter = p2psync.ProgressMeter(total=path.stat().st_size, on_update=show)
        await node.put(path, key="media/video", progress=meter)
        meter.progress  # TransferProgress(bytes_done, bytes_total, rate)

    Like any ``progress`` callback it is called from the worker thread after
    each chunk, and so is ``on_update(TransferProgress)``: keep that cheap and
    thread-safe. :attr:`progress` is replaced whole at each call, so another
    thread (the event loop) may read it at any time. The rate counts from
    the meter's creation: create it just before the transfer. ``clock``
    (monotonic seconds) is injected for tests.
    """

    def __init__(
        self,
        total: int | None = None,
        on_update: Callable[[TransferProgress], None] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._total = total
        self._on_update = on_update
        self._clock = clock
        self._started = clock()
        self.progress = TransferProgress(0, total, 0.0)

    def __call__(self, bytes_done: int) -> None:
        elapsed = self._clock() - self._started
        rate = bytes_done / elapsed if elapsed > 0 else 0.0
        self.progress = TransferProgress(bytes_done, self._total, round(rate, 1))
        if self._on_update is not None:
            self._on_update(self.progress)


__all__ = [
    "BlobReader",
    "Change",
    "EventHub",
    "EventStream",
    "EventsDropped",
    "NodeEvent",
    "PathChanged",
    "PeerConnected",
    "PeerDisconnected",
    "PeerStatus",
    "Progress",
    "ProgressMeter",
    "PullResult",
    "RateMeter",
    "Subscription",
    "SyncProgress",
    "Transfer",
    "TransferProgress",
    "TransferTracker",
    "event_json",
]
