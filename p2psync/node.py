"""A running node: the trio shell that wires store, endpoint, sessions and gossip.

Theory
------
``open_node(home, options)`` opens the device's store, binds one QUIC
endpoint, and runs, under one nursery:

- an **accept loop**: every incoming QUIC connection becomes a
  :class:`PeerLink` in the acceptor role;
- a **dial loop per static peer** (``--peer NODEID@HOST:PORT`` or
  ``peers`` in config.toml): connect, run the link until it ends, then
  reconnect after a capped exponential backoff with jitter. While any link to
  that peer is up (ours or theirs) the loop waits instead of dialing;
- optionally the **control socket** (the daemon passes ``control=True``);
- a **status sampler** (``Node._watch``): every ``PROGRESS_INTERVAL`` it
  notes path changes and byte rates per peer and the progress of incoming
  blobs, and publishes them as events (:mod:`p2psync.api`).

The app-facing methods (``put``, ``get``, ``pull``, ``subscribe``,
``delete``, ``status``, ``peers``, ``events``, ``invite``) are documented in
docs/library-api.md; their values and the cursor theory are in
:mod:`p2psync.api`.

A :class:`PeerLink` is the shell of one :class:`~p2psync.sync.session.SyncSession`:
it reads the control stream and feeds the session, answers the peer's object
streams (WANT -> OBJECT), fetches the objects the session wants on streams
of its own, and after every input drains ``data_to_send()`` and
``next_event()``. Every session call touches the store, so each runs in a
worker thread under the node's one store lock (SQLite and fsync never block
the event loop; one writer at a time).

Local writes (``put``, ``delete``) land in the store first and are then
announced through :class:`~p2psync.sync.gossip.Gossip` to every verified
peer; frontiers exchanged on connect and every anti-entropy interval repair
whatever gossip missed, so a peer that was away converges when it returns.

Two links to one peer (both dialed at once) are resolved by
:func:`~p2psync.sync.rules.keep_connection`: the lower NodeId's outgoing
connection wins, on both sides. A new link that arrives when the current
one is older than ``DUPLICATE_WINDOW`` replaces it instead: the peer dialed
again because it lost the old connection (a restart), and waiting for the
old one's idle timeout would stall sync for that long.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import trio

from p2psync import defaults, ops
from p2psync.api import (
    BlobReader,
    Change,
    EventHub,
    EventStream,
    PathChanged,
    PeerConnected,
    PeerDisconnected,
    PeerStatus,
    PullResult,
    RateMeter,
    Subscription,
    SyncProgress,
    Transfer,
    TransferTracker,
)
from p2psync.crypto.codes import has_prefix
from p2psync.crypto.group import group_id_text
from p2psync.crypto.identity import BadNodeId, NodeId
from p2psync.errors import (
    BadFrame,
    BrokenResourceError,
    ConfigError,
    LocalProtocolError,
    P2PSyncError,
)
from p2psync.home import Home
from p2psync.known_relays import KnownRelays, address_key, resolve_relay
from p2psync.mailbox_sync import MailboxSync, check_mode, run_mailbox_sync
from p2psync.net.endpoint import (
    ConnectFailed,
    Connection,
    Endpoint,
    EndpointConfig,
    open_endpoint,
)
from p2psync.net.interfaces import ipv4_addresses, parse_host_port
from p2psync.net.netcheck import NatKind, NetcheckReport
from p2psync.net.netcheck_shell import NetcheckFailed, netcheck_on_endpoint
from p2psync.net.paths import Origin
from p2psync.net.relay_client import (
    RelayClient,
    RelayClientConfig,
    RelayUnavailable,
    open_relay_client,
    parse_relay_address,
)
from p2psync.net.tls import PeerIdentityMismatch
from p2psync.net.traversal import local_addresses
from p2psync.pairing import (
    CHALLENGE_SIZE,
    JOIN_CHALLENGE,
    JOIN_PROOF,
    JOIN_REFUSED,
    JOIN_REQUEST,
    JOIN_TYPES,
    JOIN_WELCOME,
    MAX_JOIN_FRAME,
    SHORT_CODE_MAX_LIFETIME,
    TICKET_PREFIX,
    Invite,
    InviteBook,
    InviterHandshake,
    JoinRefused,
    ShortCode,
    Ticket,
    decode_join_untrusted,
    decode_request_fields,
    decode_ticket_untrusted,
    first_frame_type,
    join_frame,
    seal_secrets,
)
from p2psync.proto.entry import Kind, decode_entry_untrusted
from p2psync.proto.messages import ErrorCode, FrameDecoder, Role
from p2psync.proto.relay import RELAY_ALPN
from p2psync.proto.relay import Error as RelayError
from p2psync.ratelimit import source_key
from p2psync.store import BlobPending, Store, StoredEntry
from p2psync.store.objects import AppValue, Meta, open_meta
from p2psync.sync.events import (
    EntriesReceived,
    ObjectStored,
    ObjectWanted,
    PeerVerified,
    ProtocolViolation,
    SessionClosed,
)
from p2psync.sync.gossip import Gossip
from p2psync.sync.object_stream import (
    WANT_MAX_FRAME,
    answer_want_untrusted,
    decode_object_response_untrusted,
    want_frame,
)
from p2psync.sync.rules import keep_connection
from p2psync.sync.session import ChallengeCache, ObjectClaims, SyncSession

if TYPE_CHECKING:
    from p2psync.discovery.mdns import DiscoveredPeer  # imports zeroconf: only when used
    from p2psync.join import ShortInvite

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
Address = tuple[str, int]


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name.lower().replace("_", "-")
    except ValueError:
        return f"code {code}"


@dataclass(frozen=True, slots=True)
class StaticPeer:
    """A device to keep connected: by address, or by NodeId alone through the relay."""

    node_id: NodeId
    address: Address | None

    @classmethod
    def parse(cls, text: str) -> StaticPeer:
        """``NODEID@HOST:PORT``, or ``NODEID`` (reach it through the relay)."""
        node_text, sep, address = text.strip().partition("@")
        try:
            node_id = NodeId.parse(node_text)
        except BadNodeId as exc:
            raise ConfigError(f"peer {text!r}: {exc}") from exc
        if not sep:
            return cls(node_id, None)
        host, port = parse_host_port(address)
        if port == 0:
            raise ConfigError(f"peer {text!r}: needs a port")
        return cls(node_id, (host, port))

    def __str__(self) -> str:
        if self.address is None:
            return str(self.node_id)
        return f"{self.node_id}@{self.address[0]}:{self.address[1]}"


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """How to run a node. Built by the CLI from flags and config.toml."""

    listen: Address = ("0.0.0.0", defaults.NODE_PORT)
    peers: tuple[StaticPeer, ...] = ()
    endpoint: EndpointConfig | None = None  # bind address comes from ``listen``
    control: bool = False  # serve the control socket (daemon mode)
    mdns: bool = False  # advertise and browse on the LAN (the daemon turns it on)
    relay: str | None = None  # home relay, "NODEID@HOST:PORT"
    relay_token: bytes | None = field(default=None, repr=False)  # the relay's access token
    mailbox: str = "auto"  # the relay's mailbox: auto, always, pull, off (p2psync.mailbox_sync)
    reconnect_min: float = defaults.RECONNECT_MIN_DELAY
    reconnect_max: float = defaults.RECONNECT_MAX_DELAY


@dataclass(slots=True)
class PeerInfo:
    """What ``status`` shows about a peer."""

    node_id: NodeId
    address: Address | None = None
    path: str = "none"
    connected_since: float | None = None
    last_seen: float | None = None
    last_error: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    rtt_ms: float | None = None
    lan_addresses: tuple[Address, ...] = ()  # from mDNS


async def _read_first_frame(stream: Any) -> tuple[bytes, bytes]:
    """Read until the first frame is complete: ``(all bytes read, first body)``."""
    decoder = FrameDecoder(defaults.SYNC_MAX_CONTROL_FRAME)
    raw = bytearray()
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("the peer closed its first stream")
        raw += data
        decoder.feed(data)
        body = decoder.next_frame()
        if body is not None:
            return bytes(raw), body


class PeerLink:
    """One connection's shell around its :class:`SyncSession`."""

    def __init__(
        self,
        node: Node,
        conn: Connection,
        session: SyncSession,
        dialed: bool,
        address: Address | None = None,
    ) -> None:
        self.node = node
        self.address = address  # the address we dialed (None for accepted links)
        self.conn = conn
        self.session = session
        self.dialed = dialed
        self.verified = False
        self.verified_at = 0.0
        self._kick_send, self._kick_receive = trio.open_memory_channel[None](1)
        self._wants_changed = False  # see wants_changed()
        self._objects_moved_at = 0.0  # last progress of any object reply (_receive_object_bytes)
        # Object replies written at once (see defaults.SYNC_SERVE_STREAMS).
        self._serving = trio.Semaphore(defaults.SYNC_SERVE_STREAMS)
        self._done = trio.Event()
        self._close_code = 0
        self._close_reason = ""

    @property
    def their_node(self) -> NodeId | None:
        return self.session.their_node

    def kick(self) -> None:
        """Something changed (announce queued, object arrived): run the session loop."""
        with contextlib.suppress(trio.WouldBlock):
            self._kick_send.send_nowait(None)

    def wants_changed(self) -> None:
        """Objects to fetch may have changed elsewhere (:meth:`SyncSession.wants_changed`)."""
        self._wants_changed = True
        self.kick()

    async def run(self) -> None:
        node = self.node
        try:
            first = b""
            if self.dialed:
                control = await self.conn.open_stream()
            else:
                with trio.fail_after(defaults.SYNC_HANDSHAKE_TIMEOUT):
                    control = await self.conn.accept_stream()
                    first, body = await _read_first_frame(control)
                if first_frame_type(body) in JOIN_TYPES:
                    await node.serve_join(self.conn, control, first)
                    return
            async with trio.open_nursery() as nursery:
                await node.locked(self.session.start, trio.current_time())
                if first:
                    await node.locked(self.session.receive_control, first, trio.current_time())
                await self._flush(control, nursery)
                nursery.start_soon(self._read_control, control, nursery)
                nursery.start_soon(self._serve_objects, nursery)
                while not self.session.closed:
                    deadline = self.session.get_timer()
                    with trio.move_on_at(deadline if deadline is not None else float("inf")):
                        await self._kick_receive.receive()
                    if self.session.closed:
                        break
                    now = trio.current_time()
                    timer = self.session.get_timer()
                    if timer is not None and timer <= now:
                        await node.locked(self.session.handle_timer, now)
                    if self._wants_changed:
                        self._wants_changed = False
                        await node.locked(self.session.wants_changed, now)
                    await self._flush(control, nursery)
                await self._flush(control, nursery)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            if not self.session.closed:
                await node.locked(self.session.connection_lost, 0, str(exc) or type(exc).__name__)
                await self._drain_events(None, None)
        finally:
            self._done.set()
            with trio.CancelScope(shield=True), contextlib.suppress(P2PSyncError):
                await self.conn.aclose(self._close_code, self._close_reason)
            node._link_ended(self)

    async def _read_control(self, control: Any, nursery: trio.Nursery) -> None:
        try:
            while True:
                # Up to a whole control frame per read: the session stores
                # the ENTRIES of one read as one batch (fewer transactions
                # and worker-thread hops in a catch-up).
                data = await control.receive_some(defaults.SYNC_MAX_CONTROL_FRAME)
                if not data:
                    await self.node.locked(self.session.connection_lost, 0, "control stream ended")
                    self.kick()
                    return
                await self.node.locked(self.session.receive_control, data, trio.current_time())
                await self._flush(control, nursery)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not self.session.closed:
                await self.node.locked(self.session.connection_lost, 0, str(exc))
            self.kick()

    async def _flush(self, control: Any, nursery: trio.Nursery | None) -> None:
        """Send what the session produced and act on its events."""
        while True:
            out = await self.node.locked(self.session.data_to_send)
            if not out:
                break
            try:
                await control.send_all(out)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
        await self._drain_events(control, nursery)

    async def _drain_events(self, control: Any, nursery: trio.Nursery | None) -> None:
        node = self.node
        while (event := self.session.next_event()) is not None:
            match event:
                case PeerVerified():
                    node._peer_verified(self, event.their_node)
                case EntriesReceived():
                    node._entries_received(self, event)
                case ObjectWanted():
                    if nursery is not None:
                        nursery.start_soon(self._fetch, event.oid)
                case ObjectStored():
                    node._objects_arrived()
                case ProtocolViolation():
                    node.counters["protocol_violations"] += 1
                    log.warning("peer %s broke the protocol: %s", self._peer_label(), event.detail)
                case SessionClosed():
                    self._close_code = event.code
                    self._close_reason = event.reason
                    node._session_closed(self, event)
                    self.kick()

    def _peer_label(self) -> str:
        their = self.their_node
        return their.short() if their else "(unverified)"

    async def _fetch(self, oid: bytes) -> None:
        node = self.node
        try:
            stream = await self.conn.open_stream()
            body = None
            stalled = False
            self._objects_moved()  # a new request starts the clock
            async with stream:
                await stream.send_all(want_frame(oid))
                await stream.send_eof()
                decoder = FrameDecoder(defaults.SYNC_MAX_OBJECT_FRAME)
                while body is None:
                    data = await self._receive_object_bytes(stream)
                    if data is None:
                        stalled = True
                        break
                    if not data:
                        break
                    decoder.feed(data)
                    body = decoder.next_frame()
            if stalled:
                node.counters["objects_stalled"] += 1
                log.info(
                    "object %s from %s: no object data for %.0f s; asking again",
                    oid.hex()[:12], self._peer_label(), defaults.SYNC_OBJECT_STALL_TIMEOUT,
                )  # fmt: skip
            if body is None:
                await node.locked(self.session.object_failed, oid, trio.current_time())
            else:
                try:
                    sealed = decode_object_response_untrusted(oid, body)
                except P2PSyncError as exc:
                    await node.locked(
                        self.session.object_failed, oid, trio.current_time(), peer_fault=str(exc)
                    )
                else:
                    if sealed is None:
                        await node.locked(self.session.object_failed, oid, trio.current_time())
                    else:
                        node.counters["objects_received"] += 1
                        await node.locked(
                            self.session.object_received, oid, sealed, trio.current_time()
                        )
        except (trio.BrokenResourceError, trio.ClosedResourceError, P2PSyncError) as exc:
            if not self.session.closed:
                log.debug("object %s from %s failed: %s", oid.hex()[:12], self._peer_label(), exc)
                with contextlib.suppress(P2PSyncError):
                    await node.locked(self.session.object_failed, oid, trio.current_time())
        self.kick()

    def _objects_moved(self) -> None:
        self._objects_moved_at = trio.current_time()

    async def _receive_object_bytes(self, stream: Any) -> bytes | None:
        """The next bytes of an object reply; None once no object reply of this link
        has moved for ``SYNC_OBJECT_STALL_TIMEOUT``.

        The clock is per link, not per reply: the peer writes replies one at
        a time (SYNC_SERVE_STREAMS), so on a slow link a reply may wait its
        turn behind several others, which is progress all the same. A peer
        (or path) that sends nothing must not hold the fetch window and the
        node's claims on those objects for ever: the replies are given up and
        the objects asked for again, from this peer or another.
        """
        while True:
            deadline = self._objects_moved_at + defaults.SYNC_OBJECT_STALL_TIMEOUT
            if trio.current_time() >= deadline:
                return None
            with trio.move_on_at(deadline):
                data: bytes = await stream.receive_some(1 << 20)
                self._objects_moved()
                return data

    async def _serve_objects(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await self.conn.accept_stream()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            nursery.start_soon(self._serve_one, stream)

    async def _serve_one(self, stream: Any) -> None:
        node = self.node
        if not self.verified:
            await stream.aclose()  # objects only for verified group members
            return
        try:
            async with stream:
                decoder = FrameDecoder(WANT_MAX_FRAME)
                body = None
                with trio.fail_after(defaults.SYNC_HANDSHAKE_TIMEOUT):
                    while body is None:
                        data = await stream.receive_some(WANT_MAX_FRAME + 8)
                        if not data:
                            return
                        decoder.feed(data)
                        body = decoder.next_frame()
                reply = await node.locked(answer_want_untrusted, node.store, body)
                if len(reply) < defaults.SYNC_SERVE_HANDOFF:  # NOT_FOUND, small objects
                    await stream.send_all(reply)
                    await stream.send_eof()
                else:
                    async with self._serving:
                        await stream.send_all(reply)
                        await stream.send_eof()
                        await stream.wait_unsent_below(defaults.SYNC_SERVE_HANDOFF)
                node.counters["objects_served"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            return
        except P2PSyncError as exc:
            node.counters["bad_object_requests"] += 1
            log.warning("bad object request from %s: %s", self._peer_label(), exc)

    async def wait_done(self) -> None:
        await self._done.wait()


class Node:
    """A device's running node. Use :func:`open_node`; don't construct directly."""

    def __init__(
        self,
        home: Home,
        store: Store,
        endpoint: Endpoint,
        options: NodeOptions,
        nursery: trio.Nursery,
    ) -> None:
        self.home = home
        self.store = store
        self.endpoint = endpoint
        self.options = options
        self._nursery = nursery
        self._store_lock = trio.Lock()
        self.gossip = Gossip()
        self.replay_cache = ChallengeCache()
        self.object_claims = ObjectClaims()
        self.links: set[PeerLink] = set()
        self.active: dict[NodeId, PeerLink] = {}
        self.peer_info: dict[NodeId, PeerInfo] = {}  # every device we know of; see peers()
        self.counters: dict[str, int] = {
            "protocol_violations": 0,
            "objects_received": 0,
            "objects_served": 0,
            "objects_stalled": 0,
            "bad_object_requests": 0,
            "connections_failed": 0,
            "entries_received": 0,
            "joins_refused": 0,
            "joins_abandoned": 0,
            "joins_node_mismatch": 0,  # JOIN_REQUESTs naming another NodeId than their sender
        }
        self.invites = InviteBook()
        self._invite_ended: dict[bytes, trio.Event] = {}  # short codes waiting for their end
        self._dialing: set[NodeId] = set()
        self.relay: RelayClient | None = None
        self.relay_error: str | None = None  # why a HOST:PORT relay is not identified yet
        self.netcheck: NetcheckReport | None = None  # the background netcheck's last report
        self.netcheck_at: float | None = None  # unix time of that report
        self.mailbox: MailboxSync | None = None  # while the relay runs (p2psync.mailbox_sync)
        self.mdns_status = "off"
        self.joined = trio.Event()  # set after each successful join (for `invite` w/o daemon)
        self.started_at = time.time()
        self._seen_written_at = 0.0  # unix time of the last write of peers' last seen
        self._changes = trio.Event()  # set and replaced on every store change
        # Status for apps (p2psync.api): events, paths, rates, incoming transfers.
        self.events_hub = EventHub()
        self._paths: dict[NodeId, str] = {}
        self._rates = RateMeter()
        self._transfers = TransferTracker()
        self._received: list[bytes] = []  # raw entries since the last sample (bounded)
        self._rescan_transfers = True  # at start: blobs left pending by an earlier run
        self._transfers_changed = trio.Event()

    @property
    def node_id(self) -> NodeId:
        return self.store.identity.node_id

    # --- store access -------------------------------------------------------------

    async def locked(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a store-touching call in a worker thread, one at a time."""
        async with self._store_lock:
            return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    def _notify_changed(self) -> None:
        self._changes.set()
        self._changes = trio.Event()

    def changes(self) -> trio.Event:
        """An event set at the next change to the store (local or from a peer).

        Take it *before* reading the store, then wait on it: no change can
        slip between the read and the wait.
        """
        return self._changes

    def _announce_local(self, stored: StoredEntry) -> None:
        raw = stored.entry.encode()
        for node_id in self.gossip.local_entries([raw]):
            link = self.active.get(node_id)
            if link is not None:
                link.kick()
        self._notify_changed()

    # --- local API (docs/library-api.md) ----------------------------------------------

    async def put(
        self,
        data: ops.Source,
        *,
        key: str | None = None,
        meta: Mapping[str, AppValue] | None = None,
        content_type: str | None = None,
        progress: ops.Progress | None = None,
    ) -> Change:
        """Store ``data`` under ``key`` and announce it; return the new change.

        ``data`` is bytes, a path (``str`` or :class:`~pathlib.Path`: the file
        is streamed; ``key`` defaults to its name) or a binary file object
        (streamed chunk by chunk, never read whole). ``meta`` is small app
        data (str/int/bytes/bool/None values, 4 KiB in all) sealed with the
        entry. Returns once the value is durable here; peers get it in the
        background. ``progress(bytes_done)`` is called from a worker thread.
        """
        stored = await self.locked(ops.put_source, self.store, data, key=key, app=meta,
                                   content_type=content_type, progress=progress)  # fmt: skip
        self._announce_local(stored)
        return Change.from_stored(stored)

    async def put_path(self, path: Path, *, key: str | None = None) -> StoredEntry:
        stored = await self.locked(ops.put_path, self.store, path, key=key)
        self._announce_local(stored)
        return stored

    async def put_stream_from(
        self, path: Path, *, key: str, progress: ops.Progress | None = None
    ) -> StoredEntry:
        """Put a file's content under ``key`` without recording its name or type."""

        def put() -> StoredEntry:
            with path.open("rb") as handle:
                return ops.put_stream(self.store, handle, key=key, progress=progress)

        stored = await self.locked(put)
        self._announce_local(stored)
        return stored

    async def put_bytes(
        self, data: bytes, *, key: str, content_type: str | None = None
    ) -> StoredEntry:
        stored = await self.locked(
            ops.put_stream, self.store, io.BytesIO(data), key=key, content_type=content_type
        )
        self._announce_local(stored)
        return stored

    async def delete(self, key: str) -> Change:
        """Tombstone ``key`` (a signed entry that syncs like any write); return it.

        Raises :class:`~p2psync.errors.NotFound` if ``key`` has no live value.
        The value's chunks are freed here at once; peers drop theirs when the
        tombstone reaches them. A later put of ``key`` (anywhere) revives it.
        """
        stored, _ = await self.locked(ops.remove, self.store, key)
        self._announce_local(stored)
        return Change.from_stored(stored)

    async def get(self, target: str, *, wait: bool = False) -> bytes:
        """The current value of a key (or a blob by its 64-hex id), whole.

        Raises :class:`~p2psync.errors.NotFound` for an unknown or deleted key
        and :class:`~p2psync.store.BlobPending` while the value is still on its
        way, unless ``wait`` is true: then it waits for the value to arrive.
        For large values use :meth:`get_stream` or :meth:`get_to_path`.
        """
        return await self._maybe_waiting(wait, target, functools.partial(self.get_bytes, target))

    async def _maybe_waiting(self, wait: bool, target: str, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``; if the blob is pending and ``wait``, retry whenever transfers move."""
        while True:
            changed = self._transfers_changed  # before the read: no completion slips between
            try:
                return await read()
            except BlobPending:
                if not wait:
                    raise
            blob = await self.locked(ops.resolve_blob, self.store, target)
            if blob not in self._transfers:
                self._rescan_transfers = True  # _watch then tracks it, and wakes us
            await changed.wait()

    def get_stream(self, target: str) -> BlobReader:
        """``async for chunk in node.get_stream(key)``: the value, one chunk at a time."""
        return BlobReader(self, target)

    async def get_to_path(
        self,
        target: str,
        output: Path,
        *,
        wait: bool = False,
        progress: ops.Progress | None = None,
    ) -> int:
        """Write the value to ``output`` (atomically: temp file, then rename); its size."""

        async def write() -> int:
            return await self.locked(ops.get_to_path, self.store, target, output,
                                     progress=progress)  # fmt: skip

        return await self._maybe_waiting(wait, target, write)

    async def get_bytes(self, target: str) -> bytes:
        def read() -> bytes:
            return b"".join(self.store.iter_blob(ops.resolve_blob(self.store, target)))

        return await self.locked(read)

    async def ls(self) -> list[dict[str, Any]]:
        return await self.locked(ops.list_live, self.store)

    async def pull(self, after: int = 0, limit: int = defaults.PULL_DEFAULT_LIMIT) -> PullResult:
        """Changes after cursor ``after`` in local arrival order (see :mod:`p2psync.api`).

        At most ``limit`` (1..PULL_MAX_LIMIT) per call; ask again with
        ``after=result.cursor`` while ``result.more``.
        """
        if after < 0 or not 1 <= limit <= defaults.PULL_MAX_LIMIT:
            raise LocalProtocolError(
                f"pull needs after >= 0 and 1 <= limit <= {defaults.PULL_MAX_LIMIT}"
            )

        def page() -> PullResult:
            stored, cursor = self.store.pull(after, limit)
            changes = tuple(Change.from_stored(s) for s in stored)
            return PullResult(changes, cursor, len(changes) == limit)

        return await self.locked(page)

    def subscribe(self, after: int = 0) -> Subscription:
        """``async for change in node.subscribe(after=cursor)``: every change after it, for ever.

        Backlog first, then live changes (local or from peers), each exactly
        once in cursor order; resume after a restart with the last cursor seen.
        """
        return Subscription(self, after)

    def events(self) -> contextlib.AbstractAsyncContextManager[EventStream]:
        """``async with node.events() as events: async for event in events``.

        Status events as they happen: :class:`~p2psync.api.PeerConnected`,
        ``PeerDisconnected``, ``PathChanged``, ``SyncProgress`` and, for a
        reader that fell behind, ``EventsDropped``.
        """
        return self.events_hub.open()

    def invite(self, lifetime: int = defaults.INVITE_LIFETIME) -> str:
        """A one-time ticket another device passes to :func:`p2psync.join_group`."""
        return self.create_invite(lifetime).encode()

    def transfers(self) -> list[Transfer]:
        """Blobs on their way here: bytes done/total and rate (updated every second)."""
        return self._transfers.transfers()

    def _peer_path(self, info: PeerInfo, link: PeerLink | None) -> str:
        if link is None:
            return "none"
        report = self.endpoint.paths.report(info.node_id, trio.current_time())
        if report is not None and report.route != "none":
            return report.route  # the path table routes every datagram: it knows best
        path = link.conn.path if link.conn.path != "none" else info.path
        return "lan" if path == "direct" and info.path == "lan" else path

    def peers(self) -> list[PeerStatus]:
        """Every device this node knows of, connected or not, by NodeId."""
        now = time.time()
        result = []
        for info in sorted(self.peer_info.values(), key=lambda p: str(p.node_id)):
            link = self.active.get(info.node_id)
            if link is not None:
                remote = link.conn.remote_address
                if remote is not None:
                    info.address = (str(remote[0]), int(remote[1]))
                stats = link.conn.stats
                info.bytes_in = stats.bytes_received
                info.bytes_out = stats.bytes_sent
                info.rtt_ms = round(stats.rtt * 1000, 2) if stats.rtt is not None else None
                info.last_seen = now
            result.append(
                PeerStatus(
                    node_id=str(info.node_id),
                    connected=link is not None,
                    path=self._peer_path(info, link),
                    address=f"{info.address[0]}:{info.address[1]}" if info.address else None,
                    rtt_ms=info.rtt_ms,
                    bytes_in=info.bytes_in,
                    bytes_out=info.bytes_out,
                    rx_rate=round(self._rates.rate((info.node_id, "rx")), 1),
                    tx_rate=round(self._rates.rate((info.node_id, "tx")), 1),
                    connected_since=info.connected_since if link is not None else None,
                    last_seen=info.last_seen,
                    last_error=info.last_error,
                )
            )
        return result

    def status(self) -> dict[str, Any]:
        """This node as JSON: identity, listening address, relay, peers, transfers, counters."""
        now = time.time()
        group = group_id_text(self.store.keys.group_id) if self.store.has_group else None
        host, port = self.endpoint.local_address
        return {
            "node_id": str(self.node_id),
            "name": self.home.load_config().name,
            "group_id": group,
            "listening": [f"{host}:{port}"],
            "mdns": self.mdns_status,
            "relay": self._relay_status(),
            "mailbox": self.mailbox.status() if self.mailbox is not None else None,
            "uptime_s": round(now - self.started_at, 1),
            "peers": [self._path_details(peer.to_json()) for peer in self.peers()],
            "nat": self._nat_status(),
            "transfers": [t.to_json() for t in self.transfers()],
            "counters": dict(self.counters),
            "endpoint": {
                "datagrams_received": self.endpoint.stats.datagrams_received,
                "datagrams_sent": self.endpoint.stats.datagrams_sent,
                "dropped_malformed": self.endpoint.stats.dropped_malformed,
                "gso": self.endpoint.stats.gso,
            },
        }

    def _path_details(self, row: dict[str, Any]) -> dict[str, Any]:
        """A peer's status row plus what the path table knows: since when, why not direct.

        Times are unix seconds. ``direct_after_s``: from the first datagram
        relayed to the first validated direct path (hole punching's figure).
        """
        clock = trio.current_time()
        report = self.endpoint.paths.report(NodeId.parse(row["node_id"]), clock)

        def wall(at: float | None) -> float | None:
            return None if at is None else round(time.time() - (clock - at), 3)

        if report is None:
            row.update(path_since=None, last_direct_failure=None, traversal=None)
            return row
        first_relay, first_direct = report.first_relay_at, report.first_direct_at
        row.update(
            path_since=wall(report.since) if row.get("connected") else None,
            last_direct_failure=report.last_failure,
            traversal={
                "their_nat": str(report.their_nat),
                "punching": report.punching,
                "attempts": report.attempts,
                "next_attempt_in_s": None
                if report.next_attempt_in is None
                else round(report.next_attempt_in, 1),
                "last_failure_at": wall(report.last_failure_at),
                "first_relay_at": wall(first_relay),
                "first_direct_at": wall(first_direct),
                "direct_after_s": round(first_direct - first_relay, 3)
                if first_relay is not None and first_direct is not None
                else None,
                "relay_bytes_after_direct": report.relay_bytes_after_direct,
                "direct_address": f"{report.address[0]}:{report.address[1]}"
                if report.address
                else None,
                "candidates": [
                    {
                        "address": f"{c.address[0]}:{c.address[1]}",
                        "origin": c.origin,
                        "state": c.state,
                        "lan": c.lan,
                        "rtt_ms": c.rtt_ms,
                        "pings": c.pings,
                        "pongs": c.pongs,
                        "via": f"{c.via[0]}:{c.via[1]}" if c.via else None,
                        "failure": c.failure,
                    }
                    for c in report.candidates
                ],
            },
        )
        return row

    def _nat_status(self) -> dict[str, Any] | None:
        """Our side for ``doctor``: the background netcheck and the hard-NAT machinery."""
        report = self.netcheck
        stats = self.endpoint.traversal.stats
        return {
            "netcheck": None if report is None else report.to_json(),
            "netcheck_at": self.netcheck_at,
            "explain": None if report is None else report.explain(),
            "nat": str(self.endpoint.paths.our_nat),
            "candidates": [
                f"{c.kind.name.lower()} {c.address[0]}:{c.address[1]}"
                for c in self.endpoint.paths.our_candidates
            ],
            "call_me_maybe_sent": stats.cmm_sent,
            "call_me_maybe_received": stats.cmm_received,
            "spray_probes_sent": stats.spray_sent,
            "port_fans_opened": stats.fans_opened,
        }

    # --- status sampling (paths, rates, transfers) --------------------------------------

    async def _watch(self) -> None:
        """Every PROGRESS_INTERVAL: note path changes, byte rates and transfer progress."""
        while True:
            now = trio.current_time()
            self._sample_peers(now)
            if self._received or self._rescan_transfers or len(self._transfers):
                await self._sample_transfers(now)
            await trio.sleep(defaults.PROGRESS_INTERVAL)

    def _sample_peers(self, now: float) -> None:
        for node_id, link in list(self.active.items()):
            info = self.peer_info.get(node_id)
            if info is None:
                continue
            path = self._peer_path(info, link)
            previous = self._paths.get(node_id)
            self._paths[node_id] = path
            if previous is not None and previous != path:
                log.info("path to %s: %s -> %s", node_id.short(), previous, path)
                self.events_hub.publish(PathChanged(str(node_id), path, previous))
            stats = link.conn.stats
            self._rates.sample((node_id, "rx"), stats.bytes_received, now)
            self._rates.sample((node_id, "tx"), stats.bytes_sent, now)

    async def _sample_transfers(self, now: float) -> None:
        received, self._received = self._received, []
        rescan, self._rescan_transfers = self._rescan_transfers, False
        tracked = self._transfers.blobs()
        room = defaults.TRANSFER_TRACK_MAX - len(tracked)
        Track = tuple[bytes, str | None, int]  # blob, key, size

        def sample() -> tuple[list[Track], dict[bytes, tuple[int, int] | None]]:
            wanted = set(self.store.wanted_blobs())
            new: list[Track] = []
            if rescan and wanted:
                new = [(s.entry.blob, s.key, s.entry.size) for s in self.store.live()
                       if s.entry.blob in wanted]  # fmt: skip
            elif wanted:
                for raw in received:
                    entry = decode_entry_untrusted(raw)  # stored already: it decodes
                    if entry.kind is Kind.PUT and entry.blob in wanted:
                        try:
                            key: str | None = open_meta(self.store.keyring, entry.meta).key
                        except P2PSyncError:
                            key = None
                        new.append((entry.blob, key, entry.size))
            new = [t for t in new if t[0] not in self._transfers][: max(0, room)]
            blobs = {*tracked, *(blob for blob, _, _ in new)}
            progress: dict[bytes, tuple[int, int] | None] = {}
            for blob in blobs:
                done, needed = self.store.blob_progress(blob)
                complete = needed > 0 and done >= needed
                progress[blob] = (done, needed) if complete or blob in wanted else None
            return new, progress

        new, progress = await self.locked(sample)
        for blob, key, size in new:
            self._transfers.track(blob, key, size)
        moved = self._transfers.update(progress, now)
        for transfer in moved:
            self.events_hub.publish(SyncProgress(transfer))
        # Wake get(wait=True) callers: a blob completed or went away, or one
        # of them asked for this rescan (its blob may have completed meanwhile).
        if rescan or any(t.complete for t in moved) or None in progress.values():
            self._transfers_changed.set()
            self._transfers_changed = trio.Event()

    # --- pairing ----------------------------------------------------------------------

    def create_invite(self, lifetime: int = defaults.INVITE_LIFETIME) -> Ticket:
        invite = self.invites.create(os.urandom, int(time.time()), lifetime)
        return self.ticket_for(invite)

    def ticket_addresses(self) -> tuple[Address, ...]:
        """Where a joiner may dial us directly: every IPv4 address, or the bound one."""
        host, port = self.endpoint.local_address
        hosts = ipv4_addresses() if host in ("0.0.0.0", "") else [host]
        return tuple((h, port) for h in hosts)

    def ticket_for(self, invite: Invite) -> Ticket:
        """The ticket of an open invite: our addresses and, if we have one, our home relay."""
        return Ticket(
            inviter=self.node_id,
            addresses=self.ticket_addresses(),
            expires=invite.expires,
            invite_id=invite.invite_id,
            invite_secret=invite.secret,
            relay=self.relay.spec if self.relay is not None else None,
        )

    async def create_short_invite(
        self, lifetime: int = SHORT_CODE_MAX_LIFETIME, *, lan: bool | None = None
    ) -> ShortInvite:
        """Offer a short code through the home relay and (``lan``, default: mDNS on) the LAN.

        It stays open until a device joins with it, it expires, it is
        revoked (:meth:`revoke_short_invite`) or the node stops; see
        :func:`p2psync.join.keep_short_invite`.
        """
        from p2psync.join import keep_short_invite

        offered: ShortInvite = await self._nursery.start(
            keep_short_invite, self, lifetime, self.options.mdns if lan is None else lan
        )
        return offered

    def revoke_short_invite(self, code_text: str) -> bool:
        """Close an open invite: a short code (also withdrawn from relay and LAN) or a
        ticket (``p2pt...``). False if it was not open (used, expired, revoked) or a
        device is joining with it right now."""
        if has_prefix(code_text, TICKET_PREFIX):
            invite_id = decode_ticket_untrusted(code_text).invite_id
        else:
            invite_id = ShortCode.parse_untrusted(code_text).lookup.invite_id
        revoked = self.invites.revoke(invite_id, time.time())
        self._invite_events()
        return revoked

    def invite_end(self, invite_id: bytes) -> trio.Event:
        """An event set when the invite is used up (joined, burnt or revoked)."""
        return self._invite_ended.setdefault(invite_id, trio.Event())

    def invite_closed(self, invite_id: bytes) -> None:
        event = self._invite_ended.pop(invite_id, None)
        if event is not None:
            event.set()

    def _invite_events(self) -> None:
        """Wake whoever waits on an invite the book has ended."""
        while (ended := self.invites.next_event()) is not None:
            log.info("invite %s ended: %s", ended.invite_id[:4].hex(), ended.reason)
            self.invite_closed(ended.invite_id)

    def _join_source(self, conn: Connection, their: NodeId) -> str:
        """Whom JOIN_REQUEST limits count against: the joiner's address (IPv6 by its
        prefix), or, through the relay, ``their``: the NodeId the connection is
        from (the relay authenticated it; :meth:`_join_node` checked it), never
        whatever the request claims."""
        address = conn.source_address
        if address is not None:
            return source_key(str(address[0]), defaults.JOIN_IPV6_PREFIX)
        return f"relayed:{their}"

    def _join_node(self, conn: Connection, claimed: NodeId) -> NodeId:
        """The joiner's NodeId: the one its connection is from, which the JOIN_REQUEST
        must name; else :class:`JoinRefused` (``node-mismatch``).

        The acceptor's ``conn.their_node_id`` comes from the relay (which
        authenticated the sender) or from the joiner's disco PING (sealed with
        its key; :mod:`p2psync.net.endpoint`). Every joiner pings before it
        dials, so None means we cannot tie the request to a key: refused too.
        """
        their = conn.their_node_id
        if their == claimed:
            return claimed
        self.counters["joins_node_mismatch"] += 1
        seen = their.short() if their is not None else "no NodeId we could check"
        raise JoinRefused(
            "node-mismatch",
            f"the join request names {claimed.short()} but its connection is from {seen}; "
            "run the join again (if it keeps failing, something on the path rewrites traffic)",
        )

    # --- devices: peers' last seen, kept in the store ---------------------------------

    def _seen_since_last_write(self, now: float) -> dict[NodeId, int]:
        """Unix ms last seen of the peers connected now or since the last write."""
        seen = {node_id: int(now * 1000) for node_id in self.active}
        for node_id, info in self.peer_info.items():
            if node_id in seen or info.last_seen is None:
                continue
            if info.last_seen > self._seen_written_at:
                seen[node_id] = int(info.last_seen * 1000)
        return seen

    async def _write_seen(self) -> None:
        now = time.time()
        seen = self._seen_since_last_write(now)
        if seen:
            await self.locked(self.store.save_peers_seen, seen, defaults.PEER_SEEN_MAX)
        self._seen_written_at = now

    async def _keep_seen(self) -> None:
        """Write peers' last seen to the store (`p2psync devices` reads it without a
        daemon): every PEER_SEEN_WRITE_INTERVAL, one row per peer seen meanwhile, and
        once more when the node stops."""
        try:
            while True:
                await trio.sleep(defaults.PEER_SEEN_WRITE_INTERVAL)
                await self._write_seen()
        finally:
            with trio.move_on_after(defaults.PEER_SEEN_FINAL_WRITE_TIMEOUT) as scope:
                scope.shield = True
                await self._write_seen()

    async def serve_join(self, conn: Connection, stream: Any, first: bytes) -> None:
        """Answer a join handshake whose first frame is already read (``first``).

        The :class:`~p2psync.pairing.InviteBook` decides each step; this only
        reads, writes, and records the MEMBER entry once the book says the
        invite is used up (after the joiner acknowledged the welcome).
        """
        decoder = FrameDecoder(MAX_JOIN_FRAME)
        decoder.feed(first)

        async def next_message() -> tuple[int, list[object]]:
            while (body := decoder.next_frame()) is None:
                data = await stream.receive_some(MAX_JOIN_FRAME)
                if not data:
                    raise trio.BrokenResourceError("joiner went away")
                decoder.feed(data)
            return decode_join_untrusted(body)

        handshake: InviterHandshake | None = None
        try:
            with trio.fail_after(defaults.SYNC_HANDSHAKE_TIMEOUT):
                kind, fields = await next_message()
                if kind != JOIN_REQUEST:
                    raise BadFrame("a join starts with JOIN_REQUEST")
                request = decode_request_fields(fields)
                source = self._join_source(conn, self._join_node(conn, request.joiner))
                challenge = os.urandom(CHALLENGE_SIZE)
                try:
                    handshake = self.invites.begin(
                        request, source, self.node_id, challenge, time.time()
                    )
                finally:
                    self._invite_events()
                await stream.send_all(join_frame(JOIN_CHALLENGE, challenge, handshake.mac))
                kind, fields = await next_message()
                if kind != JOIN_PROOF or len(fields) != 1:
                    raise BadFrame("expected JOIN_PROOF")
                try:
                    self.invites.prove(handshake, fields[0], time.time())
                finally:
                    self._invite_events()
                sealed = seal_secrets(request.joiner, self.home.load_secrets())
                await stream.send_all(join_frame(JOIN_WELCOME, sealed))
                # The joiner ends its stream once it has opened the secrets:
                # until then the invite stays claimed, not used.
                if await stream.receive_some(MAX_JOIN_FRAME) or decoder.buffered:
                    raise BadFrame("expected the joiner's end of stream after JOIN_WELCOME")
                self.invites.welcomed(handshake)
                self._invite_events()
                member = Meta(
                    key="",
                    content_type="device",
                    name=request.name,
                    app={"node_id": str(request.joiner), "added_by": str(self.node_id)},
                )
                stored = await self.locked(
                    self.store.append, Kind.MEMBER, member, now_ms=ops.now_ms()
                )
                self._announce_local(stored)
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_eof()
            log.info("device %s (%s) joined the group", request.joiner.short(), request.name)
            self.joined.set()
            self.joined = trio.Event()
        except JoinRefused as exc:
            self.counters["joins_refused"] += 1
            log.warning("refused a join: %s", exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(join_frame(JOIN_REFUSED, exc.code, str(exc)))
                await stream.send_eof()
        except (BadFrame, trio.TooSlowError, trio.BrokenResourceError) as exc:
            self.counters["joins_abandoned" if handshake is not None else "joins_refused"] += 1
            log.warning("join attempt ended: %s", exc or type(exc).__name__)
        finally:
            if handshake is not None:
                self.invites.abandon(handshake, time.time())  # a no-op once it ended
                self._invite_events()

    def _relay_status(self) -> dict[str, Any] | None:
        relay = self.relay
        if relay is None:
            if self.relay_error is None:
                return None
            return {  # a relay named by HOST:PORT that has not answered yet
                "relay": self.options.relay,
                "connected": False,
                "last_error": self.relay_error,
            }
        public = relay.our_public_address
        error = relay.last_error
        return {
            "relay": relay.spec,
            "connected": relay.connected,
            "rtt_ms": round(relay.rtt * 1000, 2) if relay.rtt is not None else None,
            "public_address": f"{public[0]}:{public[1]}" if public else None,
            # The relay's last fatal ERROR (e.g. "BAD_AUTH: missing or wrong access token").
            "last_error": _relay_error_text(error) if error is not None else None,
            "last_error_code": error.code if error is not None else None,
            # Why the last connection attempt or session ended (e.g. another key at a
            # pinned relay's address: "PeerIdentityMismatch: dialed ... but ...").
            "last_failure": relay.last_failure,
            "relayed_bytes_sent": self.endpoint.stats.relay_bytes_sent,
            "relayed_bytes_received": self.endpoint.stats.relay_bytes_received,
            # The UDP fast path (relayed datagrams as plain UDP to the relay, not in
            # its QUIC stream): granted on this connection, and the share it carried.
            "fast_path": relay.using_fast_path(),
            "fast_path_bytes_sent": self.endpoint.stats.relay_fast_bytes_sent,
            "fast_path_bytes_received": self.endpoint.stats.relay_fast_bytes_received,
        }

    # --- links ------------------------------------------------------------------------

    def _new_session(self, role: Role, expected: NodeId | None) -> SyncSession:
        return SyncSession(
            identity=self.store.identity,
            keyring=self.store.keyring,
            store=self.store,
            role=role,
            random_bytes=os.urandom,
            wall_clock_ms=ops.now_ms,
            expected_their_node=expected,
            replay_cache=self.replay_cache,
            object_claims=self.object_claims,
        )

    async def run_link(
        self,
        conn: Connection,
        *,
        dialed: bool,
        expected: NodeId | None,
        address: Address | None = None,
    ) -> None:
        role = Role.DIALER if dialed else Role.ACCEPTOR
        link = PeerLink(self, conn, self._new_session(role, expected), dialed, address)
        self.links.add(link)
        if expected is not None:
            self.peer_info.setdefault(expected, PeerInfo(expected))
        await link.run()

    def _peer_verified(self, link: PeerLink, their: NodeId) -> None:
        current = self.active.get(their)
        if current is not None and current is not link:
            if trio.current_time() - current.verified_at > defaults.DUPLICATE_WINDOW:
                # Not a simultaneous dial: the peer opened a new connection
                # because it lost the old one (it restarted, or its address
                # changed). The old one is dead or dying; the new one wins.
                loser = current
            else:
                loser = current if keep_connection(self.node_id, their, link.dialed) else link
            log.info("duplicate connection to %s: closing the %s one", their.short(),
                     "outgoing" if loser.dialed else "incoming")  # fmt: skip
            loser.session.close(ErrorCode.DUPLICATE_CONNECTION, "duplicate connection")
            loser.kick()
            if loser is link:
                return
            # The new link replaces the current one from this moment on.
            self.gossip.remove_peer(their)
            del self.active[their]
        link.verified = True
        link.verified_at = trio.current_time()
        self.active[their] = link
        self.gossip.add_peer(their, link.session)
        info = self.peer_info.setdefault(their, PeerInfo(their))
        if link.address is not None:
            info.address = link.address
        info.path = "lan" if link.address in info.lan_addresses else "direct"
        info.connected_since = time.time()
        info.last_error = None
        path = self._peer_path(info, link)
        self._paths[their] = path
        address = link.conn.remote_address or link.address
        self.events_hub.publish(
            PeerConnected(str(their), path, f"{address[0]}:{address[1]}" if address else None)
        )
        log.info("peer %s verified (%s)", their.short(), "dialed" if link.dialed else "accepted")

    def _entries_received(self, link: PeerLink, event: EntriesReceived) -> None:
        if event.accepted:
            self.counters["entries_received"] += len(event.accepted)
            if len(self._received) < defaults.TRANSFER_TRACK_MAX:
                self._received.extend(event.accepted)  # _watch looks for blobs to track
            else:
                self._rescan_transfers = True
            for node_id in self.gossip.entries_received(event.their_node, event.accepted):
                target = self.active.get(node_id)
                if target is not None:
                    target.kick()
            self._notify_changed()

    def _objects_arrived(self) -> None:
        """Objects were stored: a pending value may be complete now, so every
        ``get(wait=True)`` reads again at once (not at the next status sample)."""
        self._transfers_changed.set()
        self._transfers_changed = trio.Event()

    def mailbox_received(self, raws: list[bytes]) -> None:
        """The relay mailbox delivered: entries the store accepted (gossip them), or objects."""
        if raws:
            self.counters["entries_received"] += len(raws)
            for node_id in self.gossip.local_entries(raws):  # no peer sent them: all get them
                target = self.active.get(node_id)
                if target is not None:
                    target.kick()
            if len(self._received) < defaults.TRANSFER_TRACK_MAX:
                self._received.extend(raws)  # _watch tracks their blobs (cheap: no rescan)
            else:
                self._rescan_transfers = True
            for link in self.active.values():  # their blobs: connected peers may have them
                link.wants_changed()
        else:
            self._objects_arrived()  # objects only
        self._notify_changed()

    def _session_closed(self, link: PeerLink, event: SessionClosed) -> None:
        their = link.their_node
        if their is not None:
            info = self.peer_info.setdefault(their, PeerInfo(their))
            if event.code not in (ErrorCode.OK, ErrorCode.DUPLICATE_CONNECTION):
                info.last_error = f"{_code_name(event.code)}: {event.reason}"
        log.info("session with %s closed (code %s%s): %s", link._peer_label(), event.code,
                 ", by peer" if event.by_peer else "", event.reason)  # fmt: skip

    def _link_ended(self, link: PeerLink) -> None:
        self.links.discard(link)
        their = link.their_node
        if their is not None and self.active.get(their) is link:
            del self.active[their]
            self.gossip.remove_peer(their)
            info = self.peer_info.get(their)
            if info is not None:
                info.path = "none"
                info.last_seen = time.time()
            self._paths.pop(their, None)
            self._rates.forget((their, "rx"))
            self._rates.forget((their, "tx"))
            reason = link._close_reason or None
            self.events_hub.publish(PeerDisconnected(str(their), reason))
        # Its session released the objects it was fetching: the others take them up now.
        for other in self.active.values():
            other.wants_changed()

    # --- loops ------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        while True:
            conn = await self.endpoint.accept()
            self._nursery.start_soon(self._run_accepted, conn)

    async def _run_accepted(self, conn: Connection) -> None:
        with contextlib.suppress(P2PSyncError, trio.BrokenResourceError):
            await self.run_link(conn, dialed=False, expected=None)

    async def dial_forever(self, peer: StaticPeer) -> None:
        """Keep a link to ``peer``: dial, run, back off, repeat (until cancelled)."""
        delay = self.options.reconnect_min
        info = self.peer_info.setdefault(peer.node_id, PeerInfo(peer.node_id, peer.address))
        while True:
            existing = self.active.get(peer.node_id)
            if existing is not None:
                await existing.wait_done()
                await trio.sleep(random.uniform(0, self.options.reconnect_min))
                continue
            await self._learn_candidates(peer.node_id)
            try:
                conn = await self.endpoint.connect(peer.node_id, peer.address)
            except (P2PSyncError, trio.BrokenResourceError, OSError) as exc:
                self.counters["connections_failed"] += 1
                where = f"{peer.address[0]}:{peer.address[1]}" if peer.address else "the relay"
                info.last_error = f"connect via {where} failed: {exc}"
                log.info("could not reach %s: %s (retry in %.1fs)", peer.node_id.short(), exc,
                         delay)  # fmt: skip
                await trio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.options.reconnect_max)
                continue
            info.address = peer.address
            started = trio.current_time()
            with contextlib.suppress(P2PSyncError, trio.BrokenResourceError):
                await self.run_link(conn, dialed=True, expected=peer.node_id, address=peer.address)
            if trio.current_time() - started > self.options.reconnect_max:
                delay = self.options.reconnect_min  # it ran well: start over
            await trio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.options.reconnect_max)

    async def _learn_candidates(self, node_id: NodeId) -> None:
        """Ask the relay where ``node_id`` is and offer those addresses to the path table."""
        relay = self.relay
        if relay is None or not relay.connected or not self.endpoint.config.hole_punching:
            return
        with trio.move_on_after(defaults.RELAY_LOOKUP_TIMEOUT):
            try:
                found = await relay.lookup(node_id)
            except (P2PSyncError, trio.BrokenResourceError) as exc:
                log.debug("lookup of %s failed: %s", node_id.short(), exc)
                return
            for address in found.published:
                self.endpoint.add_candidate(node_id, address, Origin.LOOKUP)
            if found.observed:  # its public address as the relay sees it
                self.endpoint.add_candidate(node_id, found.observed, Origin.LOOKUP, reflexive=True)

    # --- LAN discovery ------------------------------------------------------------

    def _mdns_peer(self, peer: DiscoveredPeer) -> None:
        """mDNS found a device of our group: remember its LAN addresses, dial it."""
        if peer.node_id == self.node_id:
            return
        info = self.peer_info.setdefault(peer.node_id, PeerInfo(peer.node_id))
        info.lan_addresses = peer.addresses
        # LAN first: a relayed or public path moves here. A LAN address is a direct
        # candidate, not hole punching: offered with or without ``hole_punching``.
        for address in peer.addresses:
            with contextlib.suppress(P2PSyncError):
                self.endpoint.add_candidate(peer.node_id, address, Origin.MDNS)
        link = self.active.get(peer.node_id)
        if link is not None:
            remote = link.conn.remote_address
            if remote is not None and (str(remote[0]), int(remote[1])) in peer.addresses:
                info.path = "lan"  # a link it dialed to us: on our LAN after all
            return
        if peer.node_id in self._dialing:
            return
        self._nursery.start_soon(self._dial_lan, peer)

    async def _dial_lan(self, peer: DiscoveredPeer) -> None:
        """Keep a link to a LAN peer mDNS found, while its advert is fresh.

        Dial its LAN addresses (the newest mDNS gave) in turn and run the
        first link that connects; when that link ends, or none connects,
        try again after a backoff (``reconnect_min`` doubling to
        ``reconnect_max``, jittered) for up to ``LAN_REDIAL_WINDOW`` since
        the last link ended; stop as soon as another link to the peer runs
        (it dialed us, or a static or relayed dial won). mDNS reports a peer
        that comes back later anew, which starts this again.
        ``LAN_DIAL_TIMEOUT`` bounds each connect, never the link it gives.
        """
        node_id = peer.node_id
        self._dialing.add(node_id)
        delay = self.options.reconnect_min
        give_up = trio.current_time() + defaults.LAN_REDIAL_WINDOW
        try:
            while self.active.get(node_id) is None and trio.current_time() < give_up:
                info = self.peer_info.get(node_id)
                newest = info.lan_addresses if info is not None else ()
                conn, address = await self._connect_lan(node_id, newest or peer.addresses)
                if conn is not None:
                    with contextlib.suppress(P2PSyncError, trio.BrokenResourceError):
                        await self.run_link(conn, dialed=True, expected=node_id, address=address)
                    delay = self.options.reconnect_min
                    give_up = trio.current_time() + defaults.LAN_REDIAL_WINDOW
                await trio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, self.options.reconnect_max)
        finally:
            self._dialing.discard(node_id)

    async def _connect_lan(
        self, node_id: NodeId, addresses: Sequence[Address]
    ) -> tuple[Connection | None, Address | None]:
        """The first of ``addresses`` that connects within ``LAN_DIAL_TIMEOUT``, if any."""
        for address in addresses:
            with trio.move_on_after(defaults.LAN_DIAL_TIMEOUT):
                try:
                    return await self.endpoint.connect(node_id, address), address
                except (P2PSyncError, trio.BrokenResourceError, OSError) as exc:
                    log.info("LAN peer %s not reachable at %s: %s", node_id.short(), address, exc)
        return None, None

    def _mdns_status(self, status: str) -> None:
        self.mdns_status = status
        log.info("%s", status)

    def add_peer(self, peer: StaticPeer) -> None:
        self._nursery.start_soon(self.dial_forever, peer)


def _relay_error_text(error: RelayError) -> str:
    known = error.known_code
    return f"{known.name if known is not None else error.code}: {error.message}"


async def _run_relay(
    node: Node, relay_text: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Keep the home relay connection; carry relayed datagrams into the endpoint.

    A relay named by ``HOST:PORT`` alone is identified first (its NodeId pinned
    on first use, :mod:`p2psync.known_relays`); while it does not answer we
    retry with the relay client's backoff, and the node runs on without it.
    """
    relay_node_id, relay_address = parse_relay_address(relay_text)
    check_mode(node.options.mailbox)
    started = False
    if relay_node_id is None:
        known = KnownRelays(node.home.path)
        config = RelayClientConfig()
        delay = config.backoff_initial
        while relay_node_id is None:
            try:
                relay_node_id = await resolve_relay(node.endpoint, known, relay_address)
            except (ConnectFailed, RelayUnavailable, PeerIdentityMismatch) as exc:
                node.relay_error = f"relay {address_key(relay_address)}: {exc}"
                log.info("%s; retrying", node.relay_error)
                if not started:
                    task_status.started()
                    started = True
                await trio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, config.backoff_max)
        node.relay_error = None
    async with open_relay_client(
        node.endpoint,
        node.store.identity,
        relay_address,
        relay_node_id,
        _published_addresses(node),
        config=RelayClientConfig(access_token=node.options.relay_token),
        deliver=node.endpoint.receive_relayed_batch,  # every read's datagrams at once
    ) as relay:
        node.relay = relay
        node.endpoint.set_relay(
            relay.try_send,
            relay_node_id=relay.relay_node_id,
            datagram_size=relay.datagram_size,
            fast_path=relay.using_fast_path,
        )
        if not started:
            task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_mailbox_sync, node, relay, node.options.mailbox)
                nursery.start_soon(_netcheck_loop, node, relay)
                nursery.start_soon(_republish_loop, node, relay)
                await trio.sleep_forever()
        finally:
            node.endpoint.set_relay(None)
            node.relay = None


def _published_addresses(node: Node) -> list[Address]:
    """The local addresses we tell the relay (its LOOKUPs hand them to peers): the
    ones CALL_ME_MAYBE offers too (:func:`~p2psync.net.traversal.local_addresses`)."""
    host, port = node.endpoint.local_address
    return [(h, port) for h in local_addresses(host)]


async def _republish_loop(node: Node, relay: RelayClient) -> None:
    """Tell the relay when our interface addresses change (Wi-Fi to Ethernet, a
    new DHCP lease): peers that look us up get the addresses we have now."""
    while True:
        await trio.sleep(defaults.RELAY_REPUBLISH_INTERVAL)
        published = await trio.to_thread.run_sync(_published_addresses, node)
        if relay.republish(published):
            log.info("local addresses changed; published %s", published)


async def _netcheck_loop(node: Node, relay: RelayClient) -> None:
    """The daemon's background netcheck: our NAT kind and public address, for hole punching.

    Runs once the relay is connected, then every NETCHECK_INTERVAL, and
    sooner (at most every NETCHECK_MIN_INTERVAL) after a direct path broke:
    a NAT that rebound gives us a new public address to tell peers. STUN
    goes to the relay's port and its second port (port + NETCHECK_ALT_PORT_OFFSET,
    relayd --stun-alt-port) from the node's own socket.
    """
    traversal = node.endpoint.traversal
    paths = node.endpoint.paths
    server = relay.relay_address
    alt_port = server[1] + defaults.NETCHECK_ALT_PORT_OFFSET
    while True:
        await relay.wait_connected()
        if relay.our_public_address is not None and node.netcheck is None:
            # The relay's view of us (WELCOME) at once: peers can punch before netcheck ends.
            traversal.set_public_addresses([relay.our_public_address])
        failures = paths.direct_failures
        started = trio.current_time()
        try:
            report = await netcheck_on_endpoint(node.endpoint, server, alt_port)
        except NetcheckFailed as exc:
            log.info("netcheck: %s", exc)
            traversal.set_nat(NatKind.UNKNOWN)  # a verdict all the same: punch as best we can
        else:
            node.netcheck, node.netcheck_at = report, time.time()
            public = list(report.public)
            observed = relay.our_public_address
            if observed is not None and observed not in public:
                public.append(observed)
            traversal.refresh_interfaces()
            traversal.set_public_addresses(public)
            # The relay's QUIC works, so UDP gets out: silence is the relay's STUN, not UDP.
            nat = NatKind.UNKNOWN if report.nat is NatKind.UDP_BLOCKED else report.nat
            traversal.set_nat(nat)
            log.info("netcheck: %s NAT, public %s, rtt %s ms, hairpin %s", report.nat,
                     ", ".join(f"{h}:{p}" for h, p in report.public) or "-", report.rtt_ms,
                     report.hairpin)  # fmt: skip
        while True:
            await trio.sleep(defaults.NETCHECK_MIN_INTERVAL)
            now = trio.current_time()
            if now - started >= defaults.NETCHECK_INTERVAL or paths.direct_failures != failures:
                break


async def _start_mdns(node: Node, nursery: trio.Nursery) -> None:
    from p2psync.discovery.mdns import Advert, MdnsConfig, run_mdns
    from p2psync.discovery.tags import advert_tag, current_tags

    store = node.store
    advert = Advert(
        node.node_id,
        node.endpoint.local_address[1],
        tag=lambda: advert_tag(store.keys, time.time()),
    )
    node.mdns_status = await nursery.start(
        functools.partial(
            run_mdns,
            MdnsConfig(),
            advert,
            lambda: current_tags(store.keyring.values(), time.time()),
            node._mdns_peer,
            on_status=node._mdns_status,
        )
    )
    log.info("%s", node.mdns_status)


@asynccontextmanager
async def open_node(
    home: Home | Path | str, options: NodeOptions | None = None
) -> AsyncIterator[Node]:
    """Open a device's store and run its node until the block exits."""
    home = home if isinstance(home, Home) else Home(Path(home))
    options = options or NodeOptions()
    store = home.open_store()
    if not store.has_group:
        store.close()
        raise ConfigError(
            "this device is in no group yet: run `p2psync group create` or `p2psync join CODE`"
        )
    base = options.endpoint or EndpointConfig()
    host, port = options.listen
    endpoint_config = dataclasses.replace(base, bind_host=host, bind_port=port)
    if options.relay is not None and RELAY_ALPN not in endpoint_config.alpn:
        endpoint_config = dataclasses.replace(
            endpoint_config, alpn=(*endpoint_config.alpn, RELAY_ALPN)
        )
    try:
        async with (
            open_endpoint(store.identity, endpoint_config) as endpoint,
            trio.open_nursery() as nursery,
        ):
            node = Node(home, store, endpoint, options, nursery)
            nursery.start_soon(node._accept_loop)
            nursery.start_soon(node._watch)
            nursery.start_soon(node._keep_seen)
            if options.relay is not None:
                await nursery.start(_run_relay, node, options.relay)
            for peer in options.peers:
                node.add_peer(peer)
            if options.mdns:
                await _start_mdns(node, nursery)
            if options.control:
                from p2psync.control.daemon import serve_control_for

                await nursery.start(serve_control_for, node)
            try:
                yield node
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)


__all__ = [
    "BrokenResourceError",
    "Node",
    "NodeOptions",
    "PeerInfo",
    "StaticPeer",
    "open_node",
    "parse_host_port",
]
