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
- optionally the **control socket** (the daemon passes ``control=True``).

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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import trio

from p2psync import defaults, ops
from p2psync.crypto.group import group_id_text
from p2psync.crypto.identity import BadNodeId, NodeId
from p2psync.errors import BadFrame, BrokenResourceError, ConfigError, IntegrityError, P2PSyncError
from p2psync.home import Home
from p2psync.net.endpoint import Connection, Endpoint, EndpointConfig, open_endpoint
from p2psync.net.interfaces import ipv4_addresses, parse_host_port
from p2psync.net.relay_client import RelayClient, open_relay_client, parse_relay_address
from p2psync.pairing import (
    CHALLENGE_SIZE,
    JOIN_CHALLENGE,
    JOIN_PROOF,
    JOIN_REFUSED,
    JOIN_REQUEST,
    JOIN_TYPES,
    JOIN_WELCOME,
    MAX_JOIN_FRAME,
    InviteBook,
    JoinRefused,
    Ticket,
    check_mac,
    decode_join_untrusted,
    decode_request_fields,
    first_frame_type,
    join_frame,
    join_mac,
    seal_secrets,
    transcript,
)
from p2psync.proto.entry import Kind
from p2psync.proto.messages import ErrorCode, FrameDecoder, Role
from p2psync.proto.relay import RELAY_ALPN
from p2psync.store import Store, StoredEntry
from p2psync.store.objects import Meta
from p2psync.sync.events import (
    EntriesReceived,
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
                    await node.serve_join(control, first)
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
                data = await control.receive_some(65536)
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
            async with stream:
                await stream.send_all(want_frame(oid))
                await stream.send_eof()
                decoder = FrameDecoder(defaults.SYNC_MAX_OBJECT_FRAME)
                body = None
                while body is None:
                    data = await stream.receive_some(1 << 20)
                    if not data:
                        break
                    decoder.feed(data)
                    body = decoder.next_frame()
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
                await stream.send_all(reply)
                await stream.send_eof()
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
        self.peers: dict[NodeId, PeerInfo] = {}
        self.counters: dict[str, int] = {
            "protocol_violations": 0,
            "objects_received": 0,
            "objects_served": 0,
            "bad_object_requests": 0,
            "connections_failed": 0,
            "entries_received": 0,
            "joins_refused": 0,
        }
        self.invites = InviteBook()
        self._dialing: set[NodeId] = set()
        self.relay: RelayClient | None = None
        self.mdns_status = "off"
        self.joined = trio.Event()  # set after each successful join (for `invite` w/o daemon)
        self.started_at = time.time()
        self._changes = trio.Event()  # set and replaced on every store change

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

    # --- local API ------------------------------------------------------------------

    async def put_path(self, path: Path, *, key: str | None = None) -> StoredEntry:
        stored = await self.locked(ops.put_path, self.store, path, key=key)
        self._announce_local(stored)
        return stored

    async def put_stream_from(self, path: Path, *, key: str) -> StoredEntry:
        """Put a file's content under ``key`` without recording its name or type."""

        def put() -> StoredEntry:
            with path.open("rb") as handle:
                return ops.put_stream(self.store, handle, key=key)

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

    async def delete(self, key: str) -> StoredEntry:
        stored, _ = await self.locked(ops.remove, self.store, key)
        self._announce_local(stored)
        return stored

    async def get_to_path(self, target: str, output: Path) -> int:
        return await self.locked(ops.get_to_path, self.store, target, output)

    async def get_bytes(self, target: str) -> bytes:
        def read() -> bytes:
            return b"".join(self.store.iter_blob(ops.resolve_blob(self.store, target)))

        return await self.locked(read)

    async def ls(self) -> list[dict[str, Any]]:
        return await self.locked(ops.list_live, self.store)

    def status(self) -> dict[str, Any]:
        now = time.time()
        peers = []
        for info in sorted(self.peers.values(), key=lambda p: str(p.node_id)):
            link = self.active.get(info.node_id)
            path = "none"
            if link is not None:
                path = link.conn.path if link.conn.path != "none" else info.path
                if path == "direct" and info.path == "lan":
                    path = "lan"
                remote = link.conn.remote_address
                if remote is not None:
                    info.address = (str(remote[0]), int(remote[1]))
                stats = link.conn.stats
                info.bytes_in = stats.bytes_received
                info.bytes_out = stats.bytes_sent
                info.rtt_ms = round(stats.rtt * 1000, 2) if stats.rtt is not None else None
                info.last_seen = now
            peers.append(
                {
                    "node_id": str(info.node_id),
                    "path": path,
                    "address": f"{info.address[0]}:{info.address[1]}" if info.address else None,
                    "rtt_ms": info.rtt_ms,
                    "bytes_in": info.bytes_in,
                    "bytes_out": info.bytes_out,
                    "connected_since": info.connected_since if link is not None else None,
                    "last_seen": info.last_seen,
                    "last_error": info.last_error,
                }
            )
        group = group_id_text(self.store.keys.group_id) if self.store.has_group else None
        host, port = self.endpoint.local_address
        return {
            "node_id": str(self.node_id),
            "name": self.home.load_config().name,
            "group_id": group,
            "listening": [f"{host}:{port}"],
            "mdns": self.mdns_status,
            "relay": self._relay_status(),
            "uptime_s": round(now - self.started_at, 1),
            "peers": peers,
            "counters": dict(self.counters),
            "endpoint": {
                "datagrams_received": self.endpoint.stats.datagrams_received,
                "datagrams_sent": self.endpoint.stats.datagrams_sent,
                "dropped_malformed": self.endpoint.stats.dropped_malformed,
                "gso": self.endpoint.stats.gso,
            },
        }

    # --- pairing ----------------------------------------------------------------------

    def create_invite(self, lifetime: int = defaults.INVITE_LIFETIME) -> Ticket:
        invite = self.invites.create(os.urandom, int(time.time()), lifetime)
        host, port = self.endpoint.local_address
        hosts = ipv4_addresses() if host in ("0.0.0.0", "") else [host]
        return Ticket(
            inviter=self.node_id,
            addresses=tuple((h, port) for h in hosts),
            expires=invite.expires,
            invite_id=invite.invite_id,
            invite_secret=invite.secret,
        )

    async def serve_join(self, stream: Any, first: bytes) -> None:
        """Answer a join handshake whose first frame is already read (``first``)."""
        decoder = FrameDecoder(MAX_JOIN_FRAME)
        decoder.feed(first)

        async def next_message() -> tuple[int, list[object]]:
            while (body := decoder.next_frame()) is None:
                data = await stream.receive_some(MAX_JOIN_FRAME)
                if not data:
                    raise trio.BrokenResourceError("joiner went away")
                decoder.feed(data)
            return decode_join_untrusted(body)

        try:
            with trio.fail_after(defaults.SYNC_HANDSHAKE_TIMEOUT):
                kind, fields = await next_message()
                if kind != JOIN_REQUEST:
                    raise BadFrame("a join starts with JOIN_REQUEST")
                request = decode_request_fields(fields)
                invite = self.invites.find(request.invite_id, int(time.time()))
                challenge = os.urandom(CHALLENGE_SIZE)
                script = transcript(
                    request.invite_id, self.node_id, request.joiner, request.challenge, challenge
                )
                await stream.send_all(
                    join_frame(
                        JOIN_CHALLENGE, challenge, join_mac(invite.secret, b"inviter", script)
                    )
                )
                kind, fields = await next_message()
                if kind != JOIN_PROOF or len(fields) != 1:
                    raise BadFrame("expected JOIN_PROOF")
                try:
                    check_mac(join_mac(invite.secret, b"joiner", script), fields[0], "joiner")
                except IntegrityError:
                    self.invites.failed_proof(invite)
                    raise JoinRefused("wrong-code", "wrong or mistyped invite code") from None
                self.invites.consume(invite)
                sealed = seal_secrets(request.joiner, self.home.load_secrets())
                await stream.send_all(join_frame(JOIN_WELCOME, sealed))
                await stream.send_eof()
            member = Meta(
                key="",
                content_type="device",
                name=request.name,
                app={"node_id": str(request.joiner), "added_by": str(self.node_id)},
            )
            stored = await self.locked(self.store.append, Kind.MEMBER, member, now_ms=ops.now_ms())
            self._announce_local(stored)
            log.info("device %s (%s) joined the group", request.joiner.short(), request.name)
            self.joined.set()
            self.joined = trio.Event()
        except JoinRefused as exc:
            self.counters["joins_refused"] += 1
            log.warning("refused a join: %s", exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(join_frame(JOIN_REFUSED, exc.code, str(exc)))
                await stream.send_eof()
        except (BadFrame, trio.TooSlowError) as exc:
            self.counters["joins_refused"] += 1
            log.warning("bad join attempt: %s", exc)

    def _relay_status(self) -> dict[str, Any] | None:
        relay = self.relay
        if relay is None:
            return None
        public = relay.our_public_address
        error = relay.last_error
        return {
            "relay": f"{relay.relay_node_id}@{relay.relay_address[0]}:{relay.relay_address[1]}",
            "connected": relay.connected,
            "rtt_ms": round(relay.rtt * 1000, 2) if relay.rtt is not None else None,
            "public_address": f"{public[0]}:{public[1]}" if public else None,
            "last_error": str(error) if error is not None else None,
            "relayed_bytes_sent": self.endpoint.stats.relay_bytes_sent,
            "relayed_bytes_received": self.endpoint.stats.relay_bytes_received,
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
            self.peers.setdefault(expected, PeerInfo(expected))
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
        info = self.peers.setdefault(their, PeerInfo(their))
        if link.address is not None:
            info.address = link.address
        info.path = "lan" if link.address in info.lan_addresses else "direct"
        info.connected_since = time.time()
        info.last_error = None
        log.info("peer %s verified (%s)", their.short(), "dialed" if link.dialed else "accepted")

    def _entries_received(self, link: PeerLink, event: EntriesReceived) -> None:
        if event.accepted:
            self.counters["entries_received"] += len(event.accepted)
            for node_id in self.gossip.entries_received(event.their_node, event.accepted):
                target = self.active.get(node_id)
                if target is not None:
                    target.kick()
            self._notify_changed()

    def _session_closed(self, link: PeerLink, event: SessionClosed) -> None:
        their = link.their_node
        if their is not None:
            info = self.peers.setdefault(their, PeerInfo(their))
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
            info = self.peers.get(their)
            if info is not None:
                info.path = "none"
                info.last_seen = time.time()

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
        info = self.peers.setdefault(peer.node_id, PeerInfo(peer.node_id, peer.address))
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
        if relay is None or not relay.connected:
            return
        with trio.move_on_after(defaults.RELAY_LOOKUP_TIMEOUT):
            try:
                found = await relay.lookup(node_id)
            except (P2PSyncError, trio.BrokenResourceError) as exc:
                log.debug("lookup of %s failed: %s", node_id.short(), exc)
                return
            for address in (*found.published, *((found.observed,) if found.observed else ())):
                self.endpoint.add_candidate(node_id, address)

    # --- LAN discovery ------------------------------------------------------------

    def _mdns_peer(self, peer: DiscoveredPeer) -> None:
        """mDNS found a device of our group: remember its LAN addresses, dial it."""
        if peer.node_id == self.node_id:
            return
        info = self.peers.setdefault(peer.node_id, PeerInfo(peer.node_id))
        info.lan_addresses = peer.addresses
        if peer.node_id in self.active or peer.node_id in self._dialing:
            return
        self._nursery.start_soon(self._dial_lan, peer)

    async def _dial_lan(self, peer: DiscoveredPeer) -> None:
        self._dialing.add(peer.node_id)
        try:
            for address in peer.addresses:
                with trio.move_on_after(defaults.LAN_DIAL_TIMEOUT):
                    try:
                        conn = await self.endpoint.connect(peer.node_id, address)
                    except (P2PSyncError, trio.BrokenResourceError, OSError) as exc:
                        log.info("LAN peer %s not reachable at %s: %s", peer.node_id.short(),
                                 address, exc)  # fmt: skip
                        continue
                    self._dialing.discard(peer.node_id)
                    with contextlib.suppress(P2PSyncError, trio.BrokenResourceError):
                        await self.run_link(conn, dialed=True, expected=peer.node_id,
                                            address=address)  # fmt: skip
                    return
        finally:
            self._dialing.discard(peer.node_id)

    def _mdns_status(self, status: str) -> None:
        self.mdns_status = status
        log.info("%s", status)

    def add_peer(self, peer: StaticPeer) -> None:
        self._nursery.start_soon(self.dial_forever, peer)


async def _run_relay(
    node: Node, relay_text: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Keep the home relay connection; carry relayed datagrams into the endpoint."""
    relay_node_id, relay_address = parse_relay_address(relay_text)
    host, port = node.endpoint.local_address
    published = [(h, port) for h in ipv4_addresses() if not h.startswith("127.")]
    if host not in ("0.0.0.0", ""):
        published = [(host, port)]
    async with open_relay_client(
        node.endpoint, node.store.identity, relay_address, relay_node_id, published
    ) as relay:
        node.relay = relay
        node.endpoint.set_relay(relay.try_send, relay_node_id=relay.relay_node_id)
        task_status.started()
        try:
            async for src, payload in relay.received:
                node.endpoint.receive_relayed(src, payload)
        finally:
            node.endpoint.set_relay(None)
            node.relay = None


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
