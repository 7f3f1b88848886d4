"""Store-and-forward through relayd's group mailbox: the node's side.

Theory
------
Two devices that are never online together cannot sync directly. Each
node therefore also talks to the **mailbox** of its home relay
(:mod:`p2psync.proto.mailbox` has the protocol; relayd keeps ciphertext
only): it **pushes** what it wrote, and **pulls** what the others pushed.

Push (own entries only: every device is responsible for its own feed)
    The node walks its own entries in local-cursor order from its *push
    cursor* (kept per relay in the store), pushing each entry and then the
    sealed objects of its blob (root first, then the manifest's chunks, read
    from the store one at a time), pipelined up to :data:`PUSH_WINDOW`
    requests. The push cursor advances past an entry only when relayd has
    acknowledged the entry and all of its objects, so a crash or a broken
    connection re-pushes at most the unacknowledged tail, which relayd
    answers idempotently.

    Every entry is pushed, however old: relayd sets expiry from the time of
    the push, not the entry's clock, and a receiver needs each author's feed
    without gaps (it cannot store seq n+1 before seq n). What may be left
    out are *objects*: those the store no longer holds (the blob was
    superseded or deleted and collected: receivers do not want it either),
    those larger than the relay's ``max_item`` (from JOINED), and those
    relayd refuses as ``too-large`` or ``bad-object`` (it never will take
    them); receivers get such blobs from a peer. Any other refusal of an
    entry or an object (``bad-entry``, say an entry stamped ahead of the
    relay's clock; ``unknown-blob``, the relay no longer holds the entry)
    pauses the push for :data:`REFUSED_RETRY_S` without moving the cursor,
    so the entry is pushed again, with its objects. The mode decides *when*:

    - ``auto`` (default): push while some other known device of the group
      (an author in our frontier, a device we have a link to or know of) is
      not connected to us; while every one of them is, they get our writes
      directly and the push waits (and catches up when one goes away);
    - ``always``: push every write; ``pull``: never push, only pull;
      ``off``: leave the mailbox alone altogether.

    ``quota-exceeded`` and ``storage-full`` stop pushing for
    :data:`QUOTA_RETRY_S`; nothing is lost, the entries stay pending.

Pull
    On start, on every reconnect, on every NOTIFY (relayd's "new items"),
    after each push that relayd stored something new of (relayd NOTIFYs a
    node of others' pushes only; pulling our own back keeps the saved pull
    cursor a proof of how far relayd's log reached, see "Starting over"),
    and every :data:`PULL_INTERVAL_S` as a safety net, the node pulls the
    items after what it has looked at, in rounds of up to :data:`PULL_ROUND`
    items: it feeds the entries to :meth:`~p2psync.store.Store.insert_entries`
    (the very verification peer sync uses: signature, feed chain, group,
    clock skew; duplicates of what a peer already sent are counted, not
    stored twice), FETCHes the objects its store still misses for pending
    blobs (:meth:`~p2psync.store.Store.add_object` checks each against its
    hash), and only then saves its *pull cursor* and ACKs it to relayd.

    The rule: **the cursor never passes an item that is not stored here
    yet** (and that could be). An entry whose feed has a gap here
    (``seq-gap``: an earlier entry of its author expired at the relay, or
    was never pushed to it, and reaches us from a peer later) or that is
    stamped too far ahead of our clock *waits*; so does an object of a
    pending blob that a FETCH could not get just now. Waiting items are
    kept in memory (at most :data:`WAITING_MAX`) and tried again every
    round, the cursor stays just before the first of them, and every
    :data:`RESCAN_INTERVAL_S` (and on every reconnect) the node pulls again
    from the saved cursor, which finds waiting items that did not fit in
    memory and lets go of those the relay no longer holds. An ACK therefore
    tells relayd only what this device really holds, so relayd never
    counts a waiting item as delivered. Entries the store refuses for good
    (bad signature, another group, a fork) are counted in ``rejected`` and
    passed.

Starting over
    Both cursors are kept per ``(relay, mailbox, log_id)`` and checked
    against every JOINED (of either stream, one check at a time):

    - relayd's ``log_id`` changed (it forgot the mailbox, or lost its
      database): both cursors start over from 0;
    - same ``log_id``, but JOINED's ``head`` is below the saved pull cursor
      or below the highest head or cursor this process saw of that log (in
      JOINED, ITEMS or PUSHED): relayd's log was **rolled back** (a power
      loss under ``synchronous=NORMAL`` lost its last commits, or it was
      restored from a backup). It will hand out again the cursors we
      passed, to new items, and it lost some of what we pushed. Both
      cursors start over from 0 too: we pull everything again (the store
      counts what it holds as duplicates; FETCH asks only for objects still
      missing) and push our whole feed again (relayd answers what it still
      holds with PUSHED ``new=False``; what it lost is stored again). That
      costs one full re-push of our objects, once per rollback, which is
      rare; working out exactly what relayd still holds would need it to
      tell. ``rollbacks`` in ``status`` counts these resets. A stream that
      joined before a reset (the other one, still on a connection to the
      old relayd) never saves its cursor over it: it joins again.

    What this cannot see: a rollback after which other devices push so
    much, before we join again, that the head passes both our saved pull
    cursor and what we saw (a node that was off meanwhile knows only its
    saved pull cursor, which trails its last pushes until the pull that
    follows them). Then the items at cursors we passed are skipped, and
    entries of ours relayd lost reach other devices only from a peer.

The local store stays the source of truth: nothing is deleted or marked
synced because relayd acknowledged it.

Node options: ``NodeOptions.mailbox`` is ``"auto"``, ``"always"``,
``"pull"`` or ``"off"`` (``mailbox = "..."`` in ``config.toml``, or
``p2psync daemon --mailbox MODE``). ``status`` shows a ``mailbox`` section
(:meth:`MailboxSync.status`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from p2psync import defaults, errors, ops
from p2psync.crypto.group import mailbox_key
from p2psync.crypto.identity import Identity, NodeId
from p2psync.net.relay_client import RelayClient, RelayUnavailable
from p2psync.net.service_stream import FramedStream, ServiceRefused
from p2psync.proto import mailbox as wire
from p2psync.proto.entry import Entry, Kind, decode_entry_untrusted, hlc_to_ms
from p2psync.proto.mailbox import MailboxErrorCode
from p2psync.store.objects import (
    ObjectKind,
    decode_manifest_untrusted,
    open_sealed_object,
    read_header_untrusted,
)

if TYPE_CHECKING:
    from p2psync.node import Node

log = logging.getLogger(__name__)

MODES: Final = ("auto", "always", "pull", "off")
# Requests in flight on the push stream: hides the RTT (100 entries over a
# 100 ms path take ~0.1 s, not 10 s) while bounding what we buffer (at most
# this many 1 MiB objects).
PUSH_WINDOW: Final = 16
# FETCHes in flight: each reply is up to one object (~1 MiB).
FETCH_WINDOW: Final = 8
# Items asked for per PULL (relayd also caps a reply at MAX_PULL_BYTES).
PULL_PAGE: Final = 256
# Own entries read from the store per push round.
PUSH_BATCH: Final = 64
# Items pulled per round before objects are fetched, the cursor saved and
# ACKed: bounds what a round holds in memory, and a long catch-up shows
# progress (and is resumed from there after a crash).
PULL_ROUND: Final = 4 * PULL_PAGE
# Pulled items that cannot be stored yet (an entry whose feed has a gap
# here, an object a FETCH could not get just now) kept in memory to try
# again each round; beyond this the cursor still stays before them, and the
# next rescan finds them again.
WAITING_MAX: Final = 4096
# While items wait, pull again from the saved cursor this often: what did
# not fit in memory is looked at again, and items the relay dropped stop
# holding the cursor back.
RESCAN_INTERVAL_S: Final = 600.0
# Objects looked up per fetch round (pending blobs can be many).
FETCH_ROUND: Final = 512
# Pull even without a NOTIFY this often (a NOTIFY lost with a connection).
PULL_INTERVAL_S: Final = 300.0
# After quota-exceeded or storage-full, the next push attempt waits this long.
QUOTA_RETRY_S: Final = 300.0
# After relayd refused one of our entries (stamped ahead of its clock, a fork
# of one it still holds) or an object of an entry it no longer holds, push
# again this much later, that entry first: it must reach the mailbox.
REFUSED_RETRY_S: Final = 60.0
# In auto mode, how often to look again whether every device is connected.
AUTO_RECHECK_S: Final = 5.0
# A reply slower than this means relayd is stuck (a dead connection is found
# sooner by the relay client's pings); generous for a window of 1 MiB
# objects on a slow uplink.
REPLY_TIMEOUT_S: Final = 120.0
# Reconnect backoff of a mailbox stream (doubling, with jitter).
RETRY_MIN_S: Final = 1.0
RETRY_MAX_S: Final = 60.0
# A relay without a mailbox (no --data) is asked again this rarely.
UNAVAILABLE_RETRY_S: Final = 600.0

R = TypeVar("R", bound=wire.RelayToNode)


def check_mode(mode: str) -> None:
    """Raise :class:`~p2psync.errors.ConfigError` unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise errors.ConfigError(f"mailbox mode {mode!r}: choose one of {', '.join(MODES)}")


class MailboxError(errors.RemoteProtocolError):
    """relayd refused a mailbox request; ``code`` is its :class:`MailboxErrorCode` value."""


class _PushPaused(errors.P2PSyncError):
    """relayd refused a push (quota, or an entry it will take later): push again later."""


class _StartOver(errors.P2PSyncError):
    """The cursors were reset (relayd's log rolled back) since this stream joined: join again."""


# --- one stream --------------------------------------------------------------------------


class MailboxClient:
    """One joined mailbox stream: pipelined requests, replies in order, NOTIFY noted.

    Use from one task. :meth:`send` queues a request; :meth:`reply` returns
    the reply to the oldest request still unanswered (NOTIFYs arriving in
    between are remembered in :attr:`notified`).
    """

    def __init__(self, stream: FramedStream, joined: wire.Joined) -> None:
        self.stream = stream
        self.joined = joined
        self.notified = joined.head
        self.pending = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, relay: RelayClient, key: Identity, node_id: NodeId, *, group_id: bytes, notify: bool
    ) -> AsyncIterator[MailboxClient]:
        """Open the mailbox service on ``relay``; JOIN the mailbox of ``key`` and ``group_id``."""
        stream = await relay.open_service(wire.SERVICE, wire.VERSION, wire.MAX_FRAME)
        try:
            client = cls(stream, wire.Joined(b"\0" * wire.LOG_ID_SIZE, 0, 0, 0, 0, 0))
            challenge = await client._next()
            if not isinstance(challenge, wire.Challenge):
                raise errors.RemoteProtocolError("mailbox did not start with CHALLENGE")
            join = wire.sign_join(
                key, group_id, relay.relay_node_id, node_id, challenge.nonce, notify=notify
            )
            await stream.send(wire.encode(join))
            client.pending = 1
            client.joined = await client.expect(wire.Joined)
            client.notified = client.joined.head
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _next(self) -> wire.RelayToNode:
        body = await self.stream.receive()
        if body is None:
            raise trio.BrokenResourceError("relay ended the mailbox stream")
        return wire.decode_relay_to_node_untrusted(body)

    async def send(self, request: wire.NodeToRelay) -> None:
        await self.stream.send(wire.encode(request))
        self.pending += 1

    async def reply(self) -> wire.RelayToNode:
        """The reply to the oldest unanswered request; fatal ERRORs raise MailboxError."""
        if self.pending <= 0:
            raise errors.LocalProtocolError("no request is waiting for a reply")
        while True:
            with trio.fail_after(REPLY_TIMEOUT_S):
                message = await self._next()
            if isinstance(message, wire.Notify):
                self.notified = max(self.notified, message.head)
                continue
            self.pending -= 1
            if isinstance(message, wire.Error) and message.fatal:
                raise MailboxError(
                    f"relay mailbox: {message.label}: {message.message}", message.code
                )
            return message

    async def expect(self, kind: type[R]) -> R:
        """:meth:`reply`, which must be ``kind`` (an ERROR raises MailboxError)."""
        message = await self.reply()
        if isinstance(message, kind):
            return message
        if isinstance(message, wire.Error):
            raise MailboxError(f"relay mailbox: {message.label}: {message.message}", message.code)
        raise errors.RemoteProtocolError(
            f"mailbox sent {type(message).__name__}, not {kind.__name__}"
        )

    async def request(self, request: wire.NodeToRelay, kind: type[R]) -> R:
        await self.send(request)
        return await self.expect(kind)

    async def wait_notify(self, above: int) -> None:
        """Return once relayd says its head is past ``above``."""
        if self.pending:
            raise errors.LocalProtocolError("wait_notify with replies outstanding")
        while self.notified <= above:
            message = await self._next()
            if not isinstance(message, wire.Notify):
                raise errors.RemoteProtocolError(
                    f"mailbox sent {type(message).__name__} with no request pending"
                )
            self.notified = max(self.notified, message.head)


# --- the node's mailbox sync -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Ingested:
    """What storing a round's pulled entries did."""

    accepted: list[bytes]  # raw entries the store took
    duplicates: int
    rejected: int  # refused for good
    reasons: list[str]  # every rejection's reason, waiting ones included (for the log)
    waiting: list[wire.Item]  # not storable yet (seq-gap, clock-skew)


@dataclass(slots=True)
class MailboxStats:
    pushed_entries: int = 0
    pushed_objects: int = 0
    already_there: int = 0  # pushes relayd already held
    pulled_entries: int = 0  # new entries the store accepted from the mailbox
    pulled_duplicates: int = 0
    fetched_objects: int = 0
    pulls: int = 0  # pulls done (each to relayd's head, the cursor saved and ACKed)
    rejected: int = 0  # pulled items our store refused for good, or pushes relayd refused
    skipped_objects: int = 0  # own objects this relay does not take (too large, refused)
    rollbacks: int = 0  # times relayd's log was found rolled back (both cursors reset)


class MailboxSync:
    """Keeps one node's pushes and pulls with its home relay's mailbox going."""

    def __init__(self, node: Node, relay: RelayClient, mode: str = "auto") -> None:
        check_mode(mode)
        self.node = node
        self.relay = relay
        self.mode = mode
        self.key = mailbox_key(node.store.keys)
        self.mailbox = self.key.node_id.raw
        self.stats = MailboxStats()
        self.state = "connecting"
        self.last_error: str | None = None
        self.joined: wire.Joined | None = None
        self.pull_cursor = 0
        self.push_cursor = 0
        self.pending_uploads: int | None = None
        self.quota_used: int | None = None
        self.holding_back = False
        self._paused_until = 0.0
        # Pull state of the current stream (see "Pull" in the module docstring).
        self._scanned = 0  # items up to here were looked at; >= pull_cursor
        self._waiting: dict[int, wire.Item] = {}  # cursor -> item not stored yet, in order
        self._overflow: int | None = None  # lowest cursor of a waiting item not kept
        self._rescan_at = 0.0
        # Rollback detection (see "Starting over"): the highest head or cursor seen of
        # relayd's log this process, and how many times the cursors were reset.
        self._seen_head: tuple[bytes, int] | None = None  # (log_id, head)
        self._resets = 0
        self._reset_event = trio.Event()  # set (and replaced) at every reset: wakes the push
        self._pushed_event = trio.Event()  # set (and replaced) when relayd took new pushes
        self.pulled = trio.Event()  # set (and replaced) after every pull; for tests

    @property
    def relay_id(self) -> bytes:
        return self.relay.relay_node_id.raw

    def status(self) -> dict[str, Any]:
        joined = self.joined
        return {
            "relay": str(self.relay.relay_node_id),
            "mode": self.mode,
            "state": self.state,
            "mailbox_id": self.key.node_id.short(),
            "log_id": joined.log_id.hex() if joined else None,
            "head": max(joined.head, 0) if joined else None,
            "pull_cursor": self.pull_cursor,
            "waiting": len(self._waiting),
            "push_cursor": self.push_cursor,
            "pending_uploads": self.pending_uploads,
            "holding_back": self.holding_back,
            "quota_used": self.quota_used,
            "quota_bytes": joined.quota if joined else None,
            "retention_s": joined.ttl_s if joined else None,
            "last_error": self.last_error,
            **{name: getattr(self.stats, name) for name in MailboxStats.__slots__},
        }

    # --- running --------------------------------------------------------------------------

    async def run(self) -> None:
        """Pull (and push, in ``auto`` and ``always``) until cancelled, reconnecting as needed."""
        if self.mode == "off":
            self.state = "off"
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep, "pull", self._pull_session)
            if self.mode != "pull":
                nursery.start_soon(self._keep, "push", self._push_session)

    async def _keep(self, what: str, session: Any) -> None:
        delay = RETRY_MIN_S
        while True:
            await self.relay.wait_connected()
            started = trio.current_time()
            wait = delay
            try:
                async with MailboxClient.open(
                    self.relay,
                    self.key,
                    self.node.node_id,
                    group_id=self.node.store.keys.group_id,
                    notify=what == "pull",
                ) as client:
                    self._joined(client.joined)
                    await session(client)
            except ServiceRefused as exc:
                self.state = "unavailable"
                self.last_error = str(exc)
                log.info("relay has no mailbox for us (%s); asking again later", exc)
                wait = UNAVAILABLE_RETRY_S
            except _PushPaused as exc:
                self.last_error = str(exc)
                log.warning("mailbox push paused: %s", exc)
                wait = max(0.0, self._paused_until - trio.current_time())
            except _StartOver as exc:
                log.info("mailbox %s stream: %s", what, exc)
                wait = 0.0  # the other stream reset the cursors: join again at once
            except MailboxError as exc:
                self.state = "error"
                self.last_error = str(exc)
                log.warning("mailbox %s stream refused: %s", what, exc)
            except (
                RelayUnavailable,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                trio.TooSlowError,
                errors.BrokenResourceError,
                errors.BadFrame,
                errors.RemoteProtocolError,
            ) as exc:
                self.state = "connecting"
                self.last_error = f"{what}: {exc or type(exc).__name__}"
                log.info("mailbox %s stream ended: %s", what, exc or type(exc).__name__)
            if trio.current_time() - started > RETRY_MAX_S:
                delay = RETRY_MIN_S  # it ran well: start over
            else:
                delay = min(delay * 2, RETRY_MAX_S)
            await trio.sleep(wait * random.uniform(0.5, 1.0))

    def _joined(self, joined: wire.Joined) -> None:
        self.joined = joined
        self.state = "connected"
        self.quota_used = joined.used
        self.last_error = None

    def _saw_head(self, log_id: bytes, head: int, generation: int) -> None:
        """relayd's log ``log_id`` reached ``head`` (heads only grow while it keeps its commits).

        Ignored from a stream that joined before the last reset (``generation``).
        """
        seen = self._seen_head
        if self._resets != generation:
            return
        if seen is None or seen[0] != log_id or seen[1] < head:
            self._seen_head = (log_id, head)

    async def _load_state(self, joined: wire.Joined) -> tuple[int, int]:
        """(pull, push) cursors for the log relayd just JOINED us to; resets them if needed.

        Zeros for a new log, and for one rolled back (see "Starting over" in
        the module docstring). The check runs under the node's store lock
        and this task goes on without a checkpoint until the reset is noted
        here, so of two streams joining at once only the first resets.
        """
        pull, push, reset = await self.node.locked(self._check_state, joined)
        if reset in (None, "new"):
            self._saw_head(joined.log_id, joined.head, self._resets)
            return pull, push
        self._resets += 1
        self.pull_cursor = self.push_cursor = 0
        self._seen_head = (joined.log_id, joined.head)
        self._reset_event.set()
        self._reset_event = trio.Event()
        if reset == "rolled-back":
            self.stats.rollbacks += 1
            log.warning("relay mailbox log rolled back (its head is %d, below what we pulled "
                        "or saw): pulling and pushing from the start", joined.head)  # fmt: skip
        elif reset == "log-changed":
            log.info("relay mailbox log changed: pulling and pushing from the start")
        return 0, 0

    def _check_state(self, joined: wire.Joined) -> tuple[int, int, str | None]:
        """Saved (pull, push) cursors, or zeros and why (blocking: the store)."""
        store = self.node.store
        state = store.mailbox_state(self.relay_id, self.mailbox)
        seen = self._seen_head
        seen_head = seen[1] if seen is not None and seen[0] == joined.log_id else 0
        if state is None:
            reset = "new"
        elif state[0] != joined.log_id:
            reset = "log-changed"
        elif joined.head < max(state[1], seen_head):
            reset = "rolled-back"
        else:
            return state[1], state[2], None
        store.save_mailbox_state(self.relay_id, self.mailbox, joined.log_id, pull=0, push=0)
        return 0, 0, reset

    # --- pull -----------------------------------------------------------------------------

    async def _pull_session(self, client: MailboxClient) -> None:
        self.pull_cursor, _ = await self._load_state(client.joined)
        generation = self._resets
        self._start_scan()
        while True:
            pushed = self._pushed_event  # taken before pulling: no push of ours slips past
            seen = await self._pull_all(client, generation)
            # Wait for a head past the one the last ITEMS reported: items up to
            # it were either pulled or are gone (expired), so never busy-loop.
            timeout = PULL_INTERVAL_S
            if self._holding():
                timeout = min(timeout, max(1.0, self._rescan_at - trio.current_time()))
            with trio.move_on_after(timeout):
                # relayd does not NOTIFY a node of its own pushes: we pull them
                # too, so that the saved pull cursor vouches for them.
                await _first_of(partial(client.wait_notify, seen), pushed.wait)

    def _start_scan(self) -> None:
        """Look at everything after the saved cursor again (a new stream, or a rescan)."""
        self._scanned = self.pull_cursor
        self._waiting = {}
        self._overflow = None
        self._rescan_at = trio.current_time() + RESCAN_INTERVAL_S

    def _holding(self) -> bool:
        return bool(self._waiting) or self._overflow is not None

    async def _pull_all(self, client: MailboxClient, generation: int) -> int:
        """Pull rounds until relayd has nothing more; relayd's head.

        ``generation``: the count of cursor resets when this stream joined.
        """
        if self._holding() and trio.current_time() >= self._rescan_at:
            self._start_scan()
        tried: set[bytes] = set()  # FETCHed during this pull (each object once)
        gone: set[bytes] = set()  # of those, what relayd does not have
        while True:
            more, head = await self._pull_round(client, tried, gone, generation)
            if not more:
                break
        self.stats.pulls += 1
        self.pulled.set()
        self.pulled = trio.Event()
        return head

    async def _pull_round(
        self, client: MailboxClient, tried: set[bytes], gone: set[bytes], generation: int
    ) -> tuple[bool, int]:
        """One round: pull, store entries, fetch objects, then save and ACK the cursor.

        Returns (whether relayd has more, its head).
        """
        node, store = self.node, self.node.store
        log_id = client.joined.log_id
        pulled: list[wire.Item] = []
        while True:
            page = await client.request(wire.Pull(self._scanned, PULL_PAGE), wire.Items)
            pulled += page.items
            if page.items:
                self._scanned = page.items[-1].cursor
            self._saw_head(log_id, page.head, generation)
            if not page.has_more or len(pulled) >= PULL_ROUND:
                break
        # Waiting items first: they came before these, and their turn may have come.
        items = [*self._waiting.values(), *pulled]
        waiting: list[wire.Item] = []
        entries = [item for item in items if isinstance(item, wire.EntryItem)]
        if entries:
            ingested = await node.locked(self._ingest, entries, ops.now_ms())
            self.stats.pulled_entries += len(ingested.accepted)
            self.stats.pulled_duplicates += ingested.duplicates
            self.stats.rejected += ingested.rejected
            if ingested.reasons:
                log.info("mailbox: the store refused %d pulled entries (%s); %d wait for their "
                         "turn", len(ingested.reasons), ", ".join(sorted(set(ingested.reasons))),
                         len(ingested.waiting))  # fmt: skip
            waiting += ingested.waiting
            node.mailbox_received(ingested.accepted)
        objects = [item for item in items if isinstance(item, wire.ObjectItem)]
        for listed in objects:  # listed now: worth a FETCH even if one failed before
            tried.discard(listed.object_id)
            gone.discard(listed.object_id)
        await self._fetch_missing(client, tried, gone)
        if objects:
            waiting += await node.locked(self._objects_missing, objects, gone)
        self._waiting = {}
        for item in sorted(waiting, key=lambda item: item.cursor):
            if len(self._waiting) < WAITING_MAX:
                self._waiting[item.cursor] = item
            elif self._overflow is None or item.cursor < self._overflow:
                self._overflow = item.cursor
        # Never past an item not stored yet: just before the first one waiting.
        first = min([*self._waiting, *([self._overflow] if self._overflow is not None else [])],
                    default=None)  # fmt: skip
        target = self._scanned if first is None else first - 1
        if self._resets != generation:  # never save a cursor of the log before the reset
            raise _StartOver("the cursors were reset since this stream joined")
        if target > self.pull_cursor:
            self.pull_cursor = target
            await node.locked(
                store.save_mailbox_state, self.relay_id, self.mailbox, log_id,
                pull=self.pull_cursor,
            )  # fmt: skip
        await client.request(wire.Ack(self.pull_cursor), wire.Acked)
        if self.joined is not None:
            self.joined = wire.Joined(
                log_id, page.head, self.joined.used, self.joined.quota,
                self.joined.ttl_s, self.joined.max_item,
            )  # fmt: skip
        return page.has_more, page.head

    def _ingest(self, items: list[wire.EntryItem], now_ms: int) -> _Ingested:
        """Store pulled entries; sort those not stored into waiting and refused (blocking).

        Entries go in feed order (author, seq), so one that waited is stored
        in the same call as the one it waited for, whichever came first in
        the mailbox. Only entries that can extend their feed now (the next
        seq, or a run of them from it) reach the store; the others wait
        without being tried (and logged as rejected) again and again.
        """
        store = self.node.store
        frontier = store.frontier()
        by_feed: list[tuple[wire.EntryItem, Entry]] = []
        malformed: list[bytes] = []  # the store refuses these for good, and says why
        for item in items:
            try:
                by_feed.append((item, decode_entry_untrusted(item.raw)))
            except errors.BadFrame:
                malformed.append(item.raw)
        by_feed.sort(key=lambda pair: (pair[1].author.raw, pair[1].seq))
        tried: list[tuple[wire.EntryItem, Entry]] = []
        waiting: list[wire.Item] = []
        expected: dict[NodeId, int] = {}
        for item, entry in by_feed:
            next_seq = expected.setdefault(entry.author, frontier.get(entry.author, 0) + 1)
            if entry.seq > next_seq:
                waiting.append(item)  # a gap before it: not yet
                continue
            tried.append((item, entry))
            if entry.seq == next_seq:
                expected[entry.author] = next_seq + 1
        raws = [item.raw for item, _ in tried] + malformed
        result = store.insert_entries(raws, now_ms=now_ms) if raws else None
        if result is None:
            return _Ingested([], 0, 0, [], waiting)
        frontier = store.frontier()
        group_id = store.keys.group_id
        retry = 0
        for item, entry in tried:
            held = frontier.get(entry.author, 0)
            if entry.group_id != group_id or entry.seq <= held:
                continue  # stored (or a fork of what we hold, another group: never storable)
            too_early = hlc_to_ms(entry.hlc) > now_ms + defaults.MAX_CLOCK_SKEW_MS
            if entry.seq > held + 1 or too_early:
                waiting.append(item)  # seq-gap (one before it failed) or clock-skew
                retry += 1
        # Every entry tried and waiting again was rejected; the other rejections are for good.
        return _Ingested(
            accepted=result.accepted_raws,
            duplicates=result.duplicates,
            rejected=len(result.rejected) - retry,
            reasons=[reason for _, reason in result.rejected],
            waiting=waiting,
        )

    def _objects_missing(self, items: list[wire.ObjectItem], gone: set[bytes]) -> list[wire.Item]:
        """The pulled objects still wanted and not held here, that relayd may still give."""
        store = self.node.store
        wanted = set(store.wanted_blobs())
        missing_of: dict[bytes, set[bytes] | None] = {}
        missing: list[wire.Item] = []
        for item in items:
            if item.blob not in wanted or item.object_id in gone:
                continue
            if item.blob not in missing_of:  # None: its root is not here, so neither is the list
                held_root = store.has_object(item.blob)
                missing_of[item.blob] = set(store.missing_objects(item.blob)) if held_root else None
            of_blob = missing_of[item.blob]
            if (of_blob is None and not store.has_object(item.object_id)) or (
                of_blob is not None and item.object_id in of_blob
            ):
                missing.append(item)
        return missing

    async def _fetch_missing(
        self, client: MailboxClient, tried: set[bytes], gone: set[bytes]
    ) -> None:
        """FETCH what pending blobs still lack, until a round adds nothing.

        ``tried``: objects FETCHed already in this pull (not asked again);
        ``gone`` gains those relayd does not have.
        """
        node, store = self.node, self.node.store

        def missing() -> list[bytes]:
            found: list[bytes] = []
            for blob in store.wanted_blobs():
                for oid in store.missing_objects(blob):
                    if oid not in tried and oid not in found:
                        found.append(oid)
                        if len(found) >= FETCH_ROUND:
                            return found
            return found

        while True:
            wanted = await node.locked(missing)
            if not wanted:
                return
            tried.update(wanted)
            claimed = [oid for oid in wanted if node.object_claims.claim(oid, self)]
            added = 0
            try:
                inflight: collections.deque[bytes] = collections.deque()
                for oid in claimed:
                    if len(inflight) >= FETCH_WINDOW:
                        added += await self._take_object(client, inflight.popleft(), gone)
                    await client.send(wire.Fetch(oid))
                    inflight.append(oid)
                while inflight:
                    added += await self._take_object(client, inflight.popleft(), gone)
            finally:
                for oid in claimed:
                    node.object_claims.release(oid, self)
            if added:
                node.mailbox_received([])
            else:
                return

    async def _take_object(self, client: MailboxClient, oid: bytes, gone: set[bytes]) -> int:
        message = await client.reply()
        if isinstance(message, wire.Error):
            if message.known_code is MailboxErrorCode.NOT_FOUND:
                gone.add(oid)  # expired, damaged, or its pusher has not sent it yet
            return 0  # else try-again: relayd kept it; it waits for the next pull
        if not isinstance(message, wire.ObjectData) or message.object_id != oid:
            raise errors.RemoteProtocolError("mailbox answered FETCH with something else")
        try:
            new = await self.node.locked(self.node.store.add_object, oid, message.data)
        except errors.NotWanted:
            return 0  # its value was deleted or overwritten meanwhile
        except (errors.IntegrityError, errors.BadFrame) as exc:
            self.stats.rejected += 1
            log.warning("mailbox object %s refused by the store: %s", oid.hex()[:12], exc)
            return 0
        self.stats.fetched_objects += 1
        return 1 if new else 0

    # --- push ------------------------------------------------------------------------------

    async def _push_session(self, client: MailboxClient) -> None:
        if trio.current_time() < self._paused_until:
            raise _PushPaused("waiting before pushing to the relay again")
        _, self.push_cursor = await self._load_state(client.joined)
        generation = self._resets
        node = self.node
        while True:
            if self._resets != generation:
                raise _StartOver("the cursors were reset since this stream joined")
            changed = node.changes()  # taken before reading: no write slips past
            reset = self._reset_event
            pending = await node.locked(node.store.count_own_entries_after, self.push_cursor)
            self.pending_uploads = pending
            if pending and await self._should_push():
                self.holding_back = False
                await self._push_batch(client, generation)
                continue
            self.holding_back = bool(pending)
            timeout = AUTO_RECHECK_S if pending else PULL_INTERVAL_S
            with trio.move_on_after(timeout):
                await _first_of(changed.wait, reset.wait)

    async def _should_push(self) -> bool:
        if self.mode == "always":
            return True
        node = self.node
        authors = await node.locked(node.store.frontier)
        others = {*authors, *node.peer_info} - {node.node_id}
        return not others or not others <= set(node.active)

    async def _push_batch(self, client: MailboxClient, generation: int) -> None:
        node, store = self.node, self.node.store
        joined = client.joined
        batch = await node.locked(store.own_entries_after, self.push_cursor, PUSH_BATCH)
        inflight: collections.deque[tuple[int | None, str]] = collections.deque()
        pushed_to = self.push_cursor
        pushed_before = self.stats.pushed_entries + self.stats.pushed_objects
        paused: _PushPaused | None = None

        def pause(delay: float, why: str) -> None:
            nonlocal paused
            if paused is None:  # the first refusal says why; the rest is drained
                self._paused_until = trio.current_time() + delay
                paused = _PushPaused(why)

        def skip_object(oid: bytes, why: str) -> None:
            self.stats.skipped_objects += 1
            log.warning("mailbox: object %s not pushed (%s); devices get it from a peer",
                        oid.hex()[:12], why)  # fmt: skip

        async def settle() -> None:
            nonlocal pushed_to
            marker, what = inflight.popleft()
            message = await client.reply()
            if isinstance(message, wire.Pushed):
                self._saw_head(joined.log_id, message.cursor, generation)
                self.quota_used = message.used
                if message.new:
                    if what == "entry":
                        self.stats.pushed_entries += 1
                    else:
                        self.stats.pushed_objects += 1
                else:
                    self.stats.already_there += 1
            elif isinstance(message, wire.Error):
                code = message.known_code
                text = f"relay mailbox: {message.label}: {message.message}"
                if code in (MailboxErrorCode.QUOTA_EXCEEDED, MailboxErrorCode.STORAGE_FULL):
                    pause(QUOTA_RETRY_S, text)
                elif what != "entry" and code in (
                    MailboxErrorCode.TOO_LARGE,
                    MailboxErrorCode.BAD_OBJECT,
                ):
                    skip_object(bytes.fromhex(what), text)  # this relay will never take it
                else:
                    self.stats.rejected += 1
                    ours = "entry" if what == "entry" else "object"
                    pause(REFUSED_RETRY_S, f"our {ours}: {text}")
            else:
                raise errors.RemoteProtocolError(f"mailbox answered a push with {message!r}")
            if marker is not None and paused is None:
                pushed_to = marker

        async def push(request: wire.NodeToRelay, what: str) -> None:
            if len(inflight) >= PUSH_WINDOW:
                await settle()
            await client.send(request)
            inflight.append((None, what))

        try:
            for local_cursor, raw in batch:
                if paused is not None:
                    break
                entry = decode_entry_untrusted(raw)
                objects: list[bytes] = []
                if entry.kind is Kind.PUT:
                    objects = await node.locked(self._blob_objects, entry.blob)
                await push(wire.PushEntry(raw), "entry")
                for oid in objects:
                    data = await node.locked(self._read_object, oid)
                    if data is None:
                        continue  # gone here (superseded or deleted since): push the rest
                    if len(data) > joined.max_item:
                        skip_object(oid, f"{len(data)} bytes; this relay takes {joined.max_item}")
                        continue
                    await push(wire.PushChunk(entry.blob, oid, data), oid.hex())
                # The entry counts as pushed when the reply to its last request
                # arrives (replies come in order; push() leaves that one in flight).
                inflight[-1] = (local_cursor, inflight[-1][1])
            while inflight:
                await settle()
        finally:
            if self.stats.pushed_entries + self.stats.pushed_objects != pushed_before:
                self._pushed_event.set()  # the pull session pulls them (see _pull_session)
                self._pushed_event = trio.Event()
            # After a reset (relayd rolled back) what the old relayd acknowledged may be lost.
            if pushed_to != self.push_cursor and self._resets == generation:
                self.push_cursor = pushed_to
                with trio.CancelScope(shield=True):
                    await node.locked(
                        store.save_mailbox_state, self.relay_id, self.mailbox,
                        joined.log_id, push=pushed_to,
                    )  # fmt: skip
        if paused is not None:
            raise paused

    def _blob_objects(self, blob: bytes) -> list[bytes]:
        """Object ids of a local blob, root first (blocking: the store)."""
        store = self.node.store
        try:
            root = store.read_object(blob)
        except errors.P2PSyncError:
            return []
        kind, _ = read_header_untrusted(root)
        if kind is not ObjectKind.MANIFEST:
            return [blob]
        manifest = decode_manifest_untrusted(
            open_sealed_object(store.keyring, root, ObjectKind.MANIFEST)
        )
        return [blob, *(ref.chunk_id for ref in manifest.chunks)]

    def _read_object(self, oid: bytes) -> bytes | None:
        try:
            return self.node.store.read_object(oid)
        except errors.P2PSyncError:
            return None


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return once the first of ``waits`` returns; the others are cancelled.

    An error of one is raised as itself (not in an exception group), for
    :meth:`MailboxSync._keep` to tell a broken stream from a bug.
    """
    failed: list[Exception] = []
    async with trio.open_nursery() as nursery:

        async def run(wait: Callable[[], Awaitable[object]]) -> None:
            try:
                await wait()
            except Exception as exc:  # re-raised below, unwrapped
                failed.append(exc)
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(run, wait)
    if failed:
        raise failed[0]


async def run_mailbox_sync(node: Node, relay: RelayClient, mode: str) -> None:
    """Run ``node``'s mailbox sync with ``relay`` until cancelled (``node.mailbox`` meanwhile)."""
    sync = MailboxSync(node, relay, mode)
    node.mailbox = sync
    try:
        await sync.run()
    finally:
        node.mailbox = None


__all__ = [
    "MODES",
    "MailboxClient",
    "MailboxError",
    "MailboxSync",
    "check_mode",
    "run_mailbox_sync",
]
