"""The mailbox as a relayd service: per-stream protocol state, NOTIFY fan-out, cleanup.

:class:`MailboxSession` is one node's mailbox stream as a state machine
(``AWAIT_JOIN`` -> ``JOINED``): it takes frame bodies and ``now`` and
returns the reply frames, whether the stream must end, and what to tell
other streams. It does no network I/O and reads no clock; its one effect is
the :class:`~relayd.mailbox.MailboxStore` it is given (blocking SQLite and
file I/O), so the shell runs :meth:`MailboxSession.handle` in a worker
thread, one call at a time across all streams.

:class:`MailboxService` is the trio shell (wire format:
:mod:`p2psync.proto.mailbox`)::

    accept  <- CHALLENGE(fresh nonce)
    loop    -> requests (what is buffered, <= MAX_BATCH) -> session.handle_all (one
               worker-thread call; each request commits on its own) -> replies, in
               order, in one write
            new items   -> NOTIFY(head) to every other stream of that mailbox that
                           asked for it (coalesced: one pending head per stream, so
                           a slow reader costs one integer, and a stream that stops
                           reading is cut by the service write timeout)
    fatal   <- ERROR, then the stream ends (the relay closes it)

:func:`run_mailbox` opens the store in ``DATA/mailbox``, registers the
metrics, runs the cleanup every ``cleanup_interval_s`` (and once at start),
and closes the store when cancelled. A cleanup pass goes in bounded steps
(:class:`~relayd.mailbox.CleanupRun`), each its own worker-thread call under
the store lock, which is released in between: requests queued meanwhile go
first (``trio.Lock`` is fair), so none waits for a whole pass.

Metrics: ``relayd_mailbox_groups``, ``_items``, ``_bytes`` (gauges),
``relayd_mailbox_requests_total{op,result}``,
``relayd_mailbox_rejections_total{reason}`` (the error labels),
``relayd_mailbox_evictions_total{reason}`` (``expired``: past the TTL, by
cleanup or by a push that needed the room or the name; ``delivered``: by
cleanup with ``drop_delivered``; ``quota``: delivered items evicted early
to make room; ``orphan``: objects no entry names; ``damaged``: objects that
failed their hash check or lost their file), ``relayd_mailbox_notifies_total``,
``relayd_mailbox_cleanups_total``.
"""

from __future__ import annotations

import enum
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Final, TypeVar

import trio

from p2psync.crypto.identity import NodeId, RandomBytes
from p2psync.errors import BadFrame, IntegrityError
from p2psync.proto import mailbox as wire
from p2psync.proto.mailbox import MailboxErrorCode
from relayd.config import MailboxConfig, RelaydConfig
from relayd.mailbox import NO_EVICTIONS, CleanupResult, Evictions, MailboxRefused, MailboxStore
from relayd.metrics import Registry
from relayd.services import Service, ServiceCall
from relayd.state import LogGate

log = logging.getLogger(__name__)

MAILBOX_DIR: Final = "mailbox"
# Pipelined requests handled per worker-thread call (one hop, one write of
# replies): a node keeps up to PUSH_WINDOW in flight, so this covers them.
MAX_BATCH: Final = 64
# How a service stream ends without any bug: the relay counts these per stream.
_STREAM_ENDED: Final = (
    BadFrame,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)
T = TypeVar("T")


async def _already_received(call: ServiceCall, limit: int) -> list[bytes]:
    """Up to ``limit`` more frames the node has already sent, without waiting for any.

    A receive in an already-cancelled scope returns a frame the decoder holds
    (or completes from bytes the stream holds) and is cancelled at its first
    wait, which loses nothing: bytes it took are kept in the decoder.
    """
    more: list[bytes] = []
    while len(more) < limit:
        with trio.CancelScope() as scope:
            scope.cancel()
            body = await call.receive()
        if scope.cancelled_caught or body is None:
            break  # nothing buffered (or the node's EOF: the next receive sees it)
        more.append(body)
    return more


class SessionState(enum.Enum):
    AWAIT_JOIN = "await-join"
    JOINED = "joined"
    CLOSED = "closed"


@dataclass(slots=True)
class Outcome:
    """What one frame did: replies to send, and what the shell must act on."""

    replies: list[bytes] = field(default_factory=list)
    close: bool = False
    op: str = "protocol"  # metric label: join, push-entry, push-object, pull, fetch, ack
    result: str = "ok"  # ok, new, duplicate, found, not-found, or the error label
    error: MailboxErrorCode | None = None
    detail: str = ""
    new_head: int | None = None  # items were added: NOTIFY the others
    evicted: Evictions = NO_EVICTIONS
    damaged: int = 0  # objects dropped because they failed their hash check
    subscribe: bool = False  # JOIN asked for NOTIFY


class MailboxSession:
    """One node's mailbox stream (see the module docstring)."""

    def __init__(
        self, store: MailboxStore, relay_id: NodeId, node_id: NodeId, nonce: bytes
    ) -> None:
        self.store = store
        self.relay_id = relay_id
        self.node_id = node_id
        self.nonce = nonce
        self.state = SessionState.AWAIT_JOIN
        self.mailbox = b""

    def challenge(self) -> bytes:
        return wire.encode(wire.Challenge(self.nonce))

    def handle(self, body: bytes, now: float) -> Outcome:
        """Handle one frame from the node (blocking: the store)."""
        outcome = Outcome()
        if self.state is SessionState.CLOSED:
            outcome.close = True
            return outcome
        try:
            request = wire.decode_node_to_relay_untrusted(body)
            self._dispatch(request, now, outcome)
        except BadFrame as exc:
            self._refuse(outcome, MailboxErrorCode.PROTOCOL, f"bad frame: {exc}")
        except MailboxRefused as exc:
            self._refuse(outcome, exc.code, exc.detail)
        except (sqlite3.Error, OSError) as exc:
            log.error("mailbox storage failed: %s", exc)
            self._refuse(outcome, MailboxErrorCode.UNAVAILABLE, "storage error; try again later")
        return outcome

    def handle_all(self, bodies: list[bytes], now: float) -> list[Outcome]:
        """:meth:`handle` each frame in order; stops after one that ends the stream."""
        outcomes = []
        for body in bodies:
            outcomes.append(self.handle(body, now))
            if outcomes[-1].close:
                break
        return outcomes

    def _refuse(self, outcome: Outcome, code: MailboxErrorCode, detail: str) -> None:
        outcome.error = code
        outcome.result = code.label
        outcome.detail = detail
        outcome.replies.append(wire.encode(wire.Error(int(code), detail)))
        if code.fatal:
            outcome.close = True
            self.state = SessionState.CLOSED

    def _dispatch(self, request: wire.NodeToRelay, now: float, outcome: Outcome) -> None:
        if self.state is SessionState.AWAIT_JOIN:
            outcome.op = "join"
            if not isinstance(request, wire.Join):
                raise MailboxRefused(MailboxErrorCode.PROTOCOL, "JOIN first")
            try:
                wire.verify_join(request, self.relay_id, self.node_id, self.nonce)
            except (IntegrityError, BadFrame):
                raise MailboxRefused(
                    MailboxErrorCode.BAD_PROOF, "membership proof does not verify"
                ) from None
            # Filed under the mailbox id and the group id the proof signed:
            # claiming another group id opens another mailbox, never re-binds this one.
            address = wire.mailbox_address(request.mailbox, request.group_id)
            info = self.store.join(address, self.node_id.raw, now, group_id=request.group_id)
            self.mailbox = address
            self.state = SessionState.JOINED
            outcome.subscribe = request.notify
            outcome.replies.append(
                wire.encode(
                    wire.Joined(
                        info.log_id, info.head, info.used, info.quota, info.ttl_s, info.max_item
                    )
                )
            )
            return
        store, mailbox, node = self.store, self.mailbox, self.node_id.raw
        match request:
            case wire.PushEntry(raw):
                outcome.op = "push-entry"
                pushed = store.push_entry(mailbox, node, raw, now)
                self._pushed(outcome, pushed.cursor, pushed.new, pushed.used, pushed.evicted)
            case wire.PushChunk(blob, object_id, data):
                outcome.op = "push-object"
                pushed = store.push_object(mailbox, node, blob, object_id, data, now)
                self._pushed(outcome, pushed.cursor, pushed.new, pushed.used, pushed.evicted)
            case wire.Pull(after, limit):
                outcome.op = "pull"
                pulled = store.pull(mailbox, after, limit, now)
                outcome.replies.append(
                    wire.encode(wire.Items(pulled.items, pulled.has_more, pulled.head))
                )
            case wire.Fetch(object_id):
                outcome.op = "fetch"
                found = store.fetch(mailbox, object_id, now)
                outcome.damaged = int(found.damaged)
                if found.data is None:
                    outcome.result = "not-found"
                    outcome.replies.append(
                        wire.encode(
                            wire.Error(int(MailboxErrorCode.NOT_FOUND), "no such object here")
                        )
                    )
                else:
                    outcome.result = "found"
                    outcome.replies.append(wire.encode(wire.ObjectData(object_id, found.data)))
            case wire.Ack(cursor):
                outcome.op = "ack"
                outcome.replies.append(
                    wire.encode(wire.Acked(store.ack(mailbox, node, cursor, now)))
                )
            case wire.Join():
                raise MailboxRefused(MailboxErrorCode.PROTOCOL, "already joined")

    def _pushed(
        self, outcome: Outcome, cursor: int, new: bool, used: int, evicted: Evictions
    ) -> None:
        outcome.result = "new" if new else "duplicate"
        outcome.evicted = evicted
        if new:
            outcome.new_head = cursor
        outcome.replies.append(wire.encode(wire.Pushed(cursor, new, used)))


@dataclass(eq=False, slots=True)
class _Subscriber:
    """A stream that wants NOTIFY: the newest head not yet sent, and a wake-up."""

    node_id: NodeId
    head: int = 0
    wake: trio.Event = field(default_factory=trio.Event)


class MailboxService:
    """The mailbox service of one relayd: handler, NOTIFY hub, cleanup, metrics."""

    def __init__(
        self,
        store: MailboxStore,
        relay_id: NodeId,
        registry: Registry,
        *,
        log_interval: float,
        random_bytes: RandomBytes = os.urandom,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.config: MailboxConfig = store.config
        self.relay_id = relay_id
        self._random_bytes = random_bytes
        self._wall_clock = wall_clock
        self._lock = trio.Lock()
        self._subscribers: dict[bytes, set[_Subscriber]] = {}
        self._log_gate = LogGate(log_interval)
        self._register_metrics(registry)

    def service(self) -> Service:
        return Service(wire.SERVICE, frozenset({wire.VERSION}), self.handle, wire.MAX_FRAME)

    def _register_metrics(self, m: Registry) -> None:
        # Gauges read the store's running totals at scrape time (no query).
        m.gauge("relayd_mailbox_groups", "Group mailboxes held.").set_function(
            lambda: float(self.store.totals.groups)
        )
        m.gauge("relayd_mailbox_items", "Items (entries, objects) held.").set_function(
            lambda: float(self.store.totals.items)
        )
        m.gauge(
            "relayd_mailbox_bytes", "Bytes held, with the per-item charge, all groups."
        ).set_function(lambda: float(self.store.totals.bytes))
        self.m_requests = m.counter(
            "relayd_mailbox_requests_total", "Mailbox requests by operation and result.",
            ("op", "result"),
        )  # fmt: skip
        self.m_rejections = m.counter(
            "relayd_mailbox_rejections_total", "Mailbox requests refused, by reason.", ("reason",)
        )
        self.m_evictions = m.counter(
            "relayd_mailbox_evictions_total", "Items removed before or at expiry, by reason.",
            ("reason",),
        )  # fmt: skip
        self.m_notifies = m.counter("relayd_mailbox_notifies_total", "NOTIFY frames sent.")
        self.m_cleanups = m.counter("relayd_mailbox_cleanups_total", "Cleanup runs.")
        for code in MailboxErrorCode:
            if code is not MailboxErrorCode.NOT_FOUND:
                self.m_rejections.inc(0, reason=code.label)
        for reason in ("expired", "delivered", "orphan", "quota", "damaged"):
            self.m_evictions.inc(0, reason=reason)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        """A store call in a worker thread; one at a time (one SQLite connection)."""
        async with self._lock:
            return await trio.to_thread.run_sync(partial(fn, *args))

    # --- the handler --------------------------------------------------------------------

    async def handle(self, call: ServiceCall) -> None:
        session = MailboxSession(
            self.store, self.relay_id, call.node_id, self._random_bytes(wire.NONCE_SIZE)
        )
        send_lock = trio.Lock()

        async def send(*bodies: bytes) -> None:
            async with send_lock:
                await call.send(*bodies)

        subscriber: _Subscriber | None = None
        # The stream's end (the node left, its connection broke, it stopped
        # reading) is caught here and handled after the nursery, so the relay
        # sees at most one plain error, never a group.
        failure: BaseException | None = None

        async def notify(subscriber: _Subscriber, nursery: trio.Nursery) -> None:
            nonlocal failure
            try:
                await self._notifier(subscriber, send)
            except _STREAM_ENDED as exc:
                failure = failure or exc
                nursery.cancel_scope.cancel()

        try:
            await send(session.challenge())
            async with trio.open_nursery() as nursery:
                try:
                    while (body := await call.receive()) is not None:
                        # Requests the node pipelined are handled in one worker
                        # call and answered in one write (each still commits
                        # on its own before its reply exists).
                        bodies = [body, *await _already_received(call, MAX_BATCH - 1)]
                        outcomes = await self._run(session.handle_all, bodies, self._wall_clock())
                        replies: list[bytes] = []
                        for outcome in outcomes:
                            self._count(outcome, call)
                            replies += outcome.replies
                            if outcome.new_head is not None:
                                self._publish(session.mailbox, outcome.new_head, call.node_id)
                        if replies:
                            await send(*replies)
                        if subscriber is None and any(o.subscribe for o in outcomes):
                            subscriber = _Subscriber(call.node_id)
                            self._subscribers.setdefault(session.mailbox, set()).add(subscriber)
                            nursery.start_soon(notify, subscriber, nursery)
                        if outcomes[-1].close:
                            break
                except _STREAM_ENDED as exc:
                    failure = failure or exc
                nursery.cancel_scope.cancel()
        finally:
            if subscriber is not None:
                subscribers = self._subscribers.get(session.mailbox)
                if subscribers is not None:
                    subscribers.discard(subscriber)
                    if not subscribers:
                        del self._subscribers[session.mailbox]
        # A node that goes away (its connection closed or broke) ends a
        # long-lived mailbox stream normally; a bad frame or a node that
        # stopped reading is the relay's to count and log.
        if isinstance(failure, BadFrame | trio.TooSlowError):
            raise failure

    def _count(self, outcome: Outcome, call: ServiceCall) -> None:
        self.m_requests.inc(op=outcome.op, result=outcome.result)
        for reason, count in (
            ("expired", outcome.evicted.expired),
            ("quota", outcome.evicted.quota),
            ("damaged", outcome.damaged),
        ):
            if count:
                self.m_evictions.inc(count, reason=reason)
        code = outcome.error
        if code is None or code is MailboxErrorCode.NOT_FOUND:
            return
        self.m_rejections.inc(reason=code.label)
        suppressed = self._log_gate.check(f"mailbox-{code.label}", trio.current_time())
        if suppressed is not None:
            log.info("mailbox %s from %s (%s) refused: %s: %s (%d similar suppressed)",
                     outcome.op, call.node_id.short(), call.ip, code.label, outcome.detail,
                     suppressed)  # fmt: skip

    def _publish(self, mailbox: bytes, head: int, pusher: NodeId) -> None:
        for subscriber in self._subscribers.get(mailbox, ()):
            if subscriber.node_id != pusher and head > subscriber.head:
                subscriber.head = head
                subscriber.wake.set()

    async def _notifier(
        self, subscriber: _Subscriber, send: Callable[..., Awaitable[None]]
    ) -> None:
        sent = 0
        while True:
            await subscriber.wake.wait()
            subscriber.wake = trio.Event()
            if subscriber.head > sent:
                sent = subscriber.head
                await send(wire.encode(wire.Notify(sent)))
                self.m_notifies.inc()

    async def close(self) -> None:
        """Close the store once no call is using it."""
        async with self._lock:
            await trio.to_thread.run_sync(self.store.close)

    # --- cleanup --------------------------------------------------------------------------

    async def cleanup(self) -> CleanupResult:
        """One cleanup pass, step by step; the store lock is free between steps."""
        run = self.store.start_cleanup(self._wall_clock())
        while await self._run(run.step):
            pass
        result = run.result()
        self.m_cleanups.inc()
        for reason, count in (
            ("expired", result.expired),
            ("delivered", result.delivered),
            ("orphan", result.orphans),
        ):
            if count:
                self.m_evictions.inc(count, reason=reason)
        if result.expired or result.delivered or result.orphans or result.stray_files:
            log.info(
                "mailbox cleanup: %d expired, %d delivered, %d orphan objects, %d stray files, "
                "%d devices and %d mailboxes forgotten, %d bytes freed",
                result.expired, result.delivered, result.orphans, result.stray_files,
                result.devices, result.mailboxes, result.bytes_freed,
            )  # fmt: skip
        return result

    async def run_cleanup(self) -> None:
        """Clean up now and every ``cleanup_interval_s`` until cancelled."""
        while True:
            try:
                await self.cleanup()
            except (sqlite3.Error, OSError) as exc:
                log.error("mailbox cleanup failed (retrying next interval): %s", exc)
            await trio.sleep(self.config.cleanup_interval_s)


def wants_mailbox(config: RelaydConfig) -> bool:
    """Whether relayd runs the mailbox: enabled, and a data directory to keep it in."""
    return config.mailbox.enabled and config.data_dir is not None


async def run_mailbox(
    config: RelaydConfig,
    relay_id: NodeId,
    registry: Registry,
    *,
    task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open ``DATA/mailbox``, start the cleanup, hand back the Service; close when cancelled.

    Raises :class:`~p2psync.errors.ConfigError` (before ``started``) if the
    store cannot be opened. Needs ``config.data_dir``.
    """
    if config.data_dir is None:
        raise ValueError("the mailbox needs a data directory")
    directory = Path(config.data_dir) / MAILBOX_DIR
    store = await trio.to_thread.run_sync(MailboxStore.open, directory, config.mailbox)
    try:
        mailbox = MailboxService(
            store, relay_id, registry, log_interval=config.limits.log_interval_s
        )
    except BaseException:
        store.close()
        raise
    try:
        totals = store.totals
        log.info(
            "mailbox in %s: %d groups, %d items, %d bytes; retention %d s, group quota %d bytes",
            directory, totals.groups, totals.items, totals.bytes, config.mailbox.retention_s,
            config.mailbox.group_quota_bytes,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(mailbox.run_cleanup)
            task_status.started(mailbox.service())
            await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await mailbox.close()


__all__ = [
    "MailboxService",
    "MailboxSession",
    "Outcome",
    "SessionState",
    "run_mailbox",
    "wants_mailbox",
]
