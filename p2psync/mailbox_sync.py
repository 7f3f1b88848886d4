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
    answers idempotently. Entries older than the relay's retention are
    skipped (they would expire at once). The mode decides *when*:

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
    and every :data:`PULL_INTERVAL_S` as a safety net, the node pulls the
    items after its *pull cursor* page by page, feeds the entries to
    :meth:`~p2psync.store.Store.insert_entries` (the very verification peer
    sync uses: signature, feed chain, group, clock skew; duplicates of what
    a peer already sent are counted, not stored twice), saves the cursor,
    then FETCHes the objects its store still misses for pending blobs
    (:meth:`~p2psync.store.Store.add_object` checks each against its hash)
    and finally ACKs the cursor to relayd. If relayd's ``log_id`` changed
    (it lost or dropped the mailbox) both cursors start over from 0.

The local store stays the source of truth: nothing is deleted or marked
synced because relayd acknowledged it.

Node options: ``NodeOptions.mailbox`` is ``"auto"``, ``"always"``,
``"pull"`` or ``"off"``. ``status`` shows a ``mailbox`` section (:meth:`MailboxSync.status`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from p2psync import errors, ops
from p2psync.crypto.group import mailbox_key
from p2psync.crypto.identity import Identity, NodeId
from p2psync.net.relay_client import RelayClient, RelayUnavailable
from p2psync.net.service_stream import FramedStream, ServiceRefused
from p2psync.proto import mailbox as wire
from p2psync.proto.entry import Kind, decode_entry_untrusted, hlc_to_ms
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
# Objects looked up per fetch round (pending blobs can be many).
FETCH_ROUND: Final = 512
# Pull even without a NOTIFY this often (a NOTIFY lost with a connection).
PULL_INTERVAL_S: Final = 300.0
# After quota-exceeded or storage-full, the next push attempt waits this long.
QUOTA_RETRY_S: Final = 300.0
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


class _StorageRefused(errors.P2PSyncError):
    """quota-exceeded or storage-full: stop pushing for a while."""


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
        cls, relay: RelayClient, key: Identity, node_id: NodeId, *, notify: bool
    ) -> AsyncIterator[MailboxClient]:
        """Open the mailbox service on ``relay`` and JOIN the mailbox of ``key``."""
        stream = await relay.open_service(wire.SERVICE, wire.VERSION, wire.MAX_FRAME)
        try:
            client = cls(stream, wire.Joined(b"\0" * wire.LOG_ID_SIZE, 0, 0, 0, 0, 0))
            challenge = await client._next()
            if not isinstance(challenge, wire.Challenge):
                raise errors.RemoteProtocolError("mailbox did not start with CHALLENGE")
            join = wire.sign_join(key, relay.relay_node_id, node_id, challenge.nonce)
            await stream.send(wire.encode(wire.Join(join.mailbox, join.proof, notify)))
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


@dataclass(slots=True)
class MailboxStats:
    pushed_entries: int = 0
    pushed_objects: int = 0
    already_there: int = 0  # pushes relayd already held
    pulled_entries: int = 0  # new entries the store accepted from the mailbox
    pulled_duplicates: int = 0
    fetched_objects: int = 0
    rejected: int = 0  # items relayd refused, or pulled items our store rejected
    skipped_old: int = 0  # own entries older than the relay's retention


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
        self._quota_until = 0.0
        self.pulled = trio.Event()  # set (and replaced) after every pull round; for tests

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
                    self.relay, self.key, self.node.node_id, notify=what == "pull"
                ) as client:
                    self._joined(client.joined)
                    await session(client)
            except ServiceRefused as exc:
                self.state = "unavailable"
                self.last_error = str(exc)
                log.info("relay has no mailbox for us (%s); asking again later", exc)
                wait = UNAVAILABLE_RETRY_S
            except _StorageRefused as exc:
                self.last_error = str(exc)
                log.warning("mailbox push paused: %s", exc)
                wait = max(0.0, self._quota_until - trio.current_time())
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

    async def _load_state(self, log_id: bytes) -> tuple[int, int]:
        """(pull, push) cursors for relayd's log ``log_id``: zeros for a new log."""
        store = self.node.store
        state = await self.node.locked(store.mailbox_state, self.relay_id, self.mailbox)
        if state is not None and state[0] == log_id:
            return state[1], state[2]
        if state is not None:
            log.info("relay mailbox log changed: pulling and pushing from the start")
        await self.node.locked(
            store.save_mailbox_state, self.relay_id, self.mailbox, log_id, pull=0, push=0
        )
        return 0, 0

    # --- pull -----------------------------------------------------------------------------

    async def _pull_session(self, client: MailboxClient) -> None:
        self.pull_cursor, _ = await self._load_state(client.joined.log_id)
        while True:
            seen = await self._pull_all(client)
            # Wait for a head past the one the last ITEMS reported: items up to
            # it were either pulled or are gone (expired), so never busy-loop.
            with trio.move_on_after(PULL_INTERVAL_S):
                await client.wait_notify(seen)

    async def _pull_all(self, client: MailboxClient) -> int:
        """Pull everything after the cursor, fetch missing objects, ACK; relayd's head."""
        node, store = self.node, self.node.store
        log_id = client.joined.log_id
        while True:
            page = await client.request(wire.Pull(self.pull_cursor, PULL_PAGE), wire.Items)
            raws = [item.raw for item in page.items if isinstance(item, wire.EntryItem)]
            if raws:
                result = await node.locked(store.insert_entries, raws, now_ms=ops.now_ms())
                accepted = [entry.encode() for entry in result.accepted]
                self.stats.pulled_entries += len(accepted)
                self.stats.pulled_duplicates += result.duplicates
                self.stats.rejected += len(result.rejected)
                if result.rejected:
                    log.info("mailbox: the store rejected %d pulled entries (%s)",
                             len(result.rejected),
                             ", ".join(sorted({r for _, r in result.rejected})))  # fmt: skip
                node.mailbox_received(accepted)
            if page.items:
                self.pull_cursor = page.items[-1].cursor
                await node.locked(
                    store.save_mailbox_state, self.relay_id, self.mailbox, log_id,
                    pull=self.pull_cursor,
                )  # fmt: skip
            if self.joined is not None:
                self.joined = wire.Joined(
                    log_id, page.head, self.joined.used, self.joined.quota,
                    self.joined.ttl_s, self.joined.max_item,
                )  # fmt: skip
            if not page.has_more:
                break
        await self._fetch_missing(client)
        await client.request(wire.Ack(self.pull_cursor), wire.Acked)
        self.pulled.set()
        self.pulled = trio.Event()
        return page.head

    async def _fetch_missing(self, client: MailboxClient) -> None:
        """FETCH what pending blobs still lack, until a round adds nothing."""
        node, store = self.node, self.node.store
        tried: set[bytes] = set()

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
                        added += await self._take_object(client, inflight.popleft())
                    await client.send(wire.Fetch(oid))
                    inflight.append(oid)
                while inflight:
                    added += await self._take_object(client, inflight.popleft())
            finally:
                for oid in claimed:
                    node.object_claims.release(oid, self)
            if added:
                node.mailbox_received([])
            else:
                return

    async def _take_object(self, client: MailboxClient, oid: bytes) -> int:
        message = await client.reply()
        if isinstance(message, wire.Error):
            return 0  # not there (expired, or its pusher has not sent it yet)
        if not isinstance(message, wire.ObjectData) or message.object_id != oid:
            raise errors.RemoteProtocolError("mailbox answered FETCH with something else")
        try:
            new = await self.node.locked(self.node.store.add_object, oid, message.data)
        except (errors.IntegrityError, errors.BadFrame) as exc:
            self.stats.rejected += 1
            log.warning("mailbox object %s refused by the store: %s", oid.hex()[:12], exc)
            return 0
        self.stats.fetched_objects += 1
        return 1 if new else 0

    # --- push ------------------------------------------------------------------------------

    async def _push_session(self, client: MailboxClient) -> None:
        if trio.current_time() < self._quota_until:
            raise _StorageRefused("waiting for the relay to have room again")
        _, self.push_cursor = await self._load_state(client.joined.log_id)
        node = self.node
        while True:
            changed = node.changes()  # taken before reading: no write slips past
            pending = await node.locked(node.store.count_own_entries_after, self.push_cursor)
            self.pending_uploads = pending
            if pending and await self._should_push():
                self.holding_back = False
                await self._push_batch(client)
                continue
            self.holding_back = bool(pending)
            timeout = AUTO_RECHECK_S if pending else PULL_INTERVAL_S
            with trio.move_on_after(timeout):
                await changed.wait()

    async def _should_push(self) -> bool:
        if self.mode == "always":
            return True
        node = self.node
        authors = await node.locked(node.store.frontier)
        others = {*authors, *node.peer_info} - {node.node_id}
        return not others or not others <= set(node.active)

    async def _push_batch(self, client: MailboxClient) -> None:
        node, store = self.node, self.node.store
        joined = client.joined
        batch = await node.locked(store.own_entries_after, self.push_cursor, PUSH_BATCH)
        oldest_ms = ops.now_ms() - joined.ttl_s * 1000
        inflight: collections.deque[tuple[int | None, str]] = collections.deque()
        pushed_to = self.push_cursor

        async def settle() -> None:
            nonlocal pushed_to
            marker, what = inflight.popleft()
            message = await client.reply()
            if isinstance(message, wire.Pushed):
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
                if code in (MailboxErrorCode.QUOTA_EXCEEDED, MailboxErrorCode.STORAGE_FULL):
                    self._quota_until = trio.current_time() + QUOTA_RETRY_S
                    raise _StorageRefused(f"relay mailbox: {message.label}: {message.message}")
                self.stats.rejected += 1
                log.warning("mailbox refused our %s: %s: %s", what, message.label, message.message)
            else:
                raise errors.RemoteProtocolError(f"mailbox answered a push with {message!r}")
            if marker is not None:
                pushed_to = marker

        async def push(request: wire.NodeToRelay, what: str) -> None:
            if len(inflight) >= PUSH_WINDOW:
                await settle()
            await client.send(request)
            inflight.append((None, what))

        try:
            for local_cursor, raw in batch:
                entry = decode_entry_untrusted(raw)
                if hlc_to_ms(entry.hlc) < oldest_ms:
                    self.stats.skipped_old += 1
                    if not inflight:
                        pushed_to = local_cursor
                    else:  # done once what is in flight before it is
                        inflight[-1] = (local_cursor, inflight[-1][1])
                    continue
                objects: list[bytes] = []
                if entry.kind is Kind.PUT:
                    objects = await node.locked(self._blob_objects, entry.blob)
                await push(wire.PushEntry(raw), "entry")
                for oid in objects:
                    data = await node.locked(self._read_object, oid)
                    if data is not None:  # else gone here (deleted since): push the rest
                        await push(wire.PushChunk(entry.blob, oid, data), "object")
                # The entry counts as pushed when the reply to its last request
                # arrives (replies come in order; push() leaves that one in flight).
                inflight[-1] = (local_cursor, inflight[-1][1])
            while inflight:
                await settle()
        finally:
            if pushed_to != self.push_cursor:
                self.push_cursor = pushed_to
                with trio.CancelScope(shield=True):
                    await node.locked(
                        store.save_mailbox_state, self.relay_id, self.mailbox,
                        joined.log_id, push=pushed_to,
                    )  # fmt: skip

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
