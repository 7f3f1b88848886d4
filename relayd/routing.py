"""The relay's routing state, sans-IO: who is connected, what goes where, what is dropped.

Theory
------
relayd keeps one :class:`Router`. The trio shell (:mod:`relayd.relay`) gives
each QUIC connection an opaque, hashable **handle** and feeds the router
plain method calls, each with ``now`` (seconds, any monotonic origin):

- :meth:`Router.open` — a connection's relay stream appeared;
- :meth:`Router.receive` — a decoded :data:`~p2psync.proto.relay.NodeToRelay` arrived;
- :meth:`Router.receive_datagrams` — UDP fast-path datagrams arrived, each
  with its source address (one call per socket read);
- :meth:`Router.rebind` — a connection's newest authenticated QUIC packet
  came from a new address (a NAT rebinding);
- :meth:`Router.fail` — the shell gave up on a connection (bad frame,
  timeout): tell it why and close it;
- :meth:`Router.close` — the connection is gone;
- :meth:`Router.shutdown` — the relay is stopping.

Outputs are per-handle **send queues** the shell drains with
:meth:`Router.take`; every input returns the handles whose queue grew, so
the shell wakes exactly their writer tasks. :meth:`Router.receive_datagrams`
also returns the UDP datagrams to send, ``(bytes, address)`` each, in
arrival order (the shell sends them in one batch, GSO where it can). ``take`` returns the messages
to write and, when the connection must end after them, the
:class:`~p2psync.proto.relay.RelayErrorCode` to close it with. Nothing
here reads a clock, draws entropy (``random_bytes`` is injected) or does
I/O.

Connection states (one table, transitions only in :meth:`Router.receive`)::

    NEW            --HELLO (our version)-->      CHALLENGED   <- CHALLENGE
    CHALLENGED     --AUTH (verifies, allowed)--> AUTHENTICATED <- WELCOME
    AUTHENTICATED  --SEND / LOOKUP / PING-->     AUTHENTICATED
    any            --anything else, fail(), replaced, shutdown--> CLOSING <- ERROR

In CLOSING every input is ignored; the queue holds only the ERROR, and
``take`` hands back the close code with it.

Rules it keeps
--------------
- A NodeId is registered only after its signature over a fresh nonce (and
  the relay's own NodeId) verifies, it passes the allow-list and, if the
  relay has one, the access token matches. A second connection that proves
  the same NodeId **replaces** the first, which gets ERROR(REPLACED).
- Per node, two token buckets (frames/s, bytes/s) admit SEND, LOOKUP and
  PING; a refused frame is dropped and the sender gets an ERROR(RATE_LIMITED)
  notice at most once per ``notice_interval``.
- Per destination, relayed frames wait in a queue of ``queue_per_destination``
  (DERP's 32); when it is full the **oldest** frame is dropped — the inner
  QUIC retransmits, and fresh packets are worth more than stale ones. Control
  replies (PONG, NOT_HERE, LOOKUP_RESULT, notices) have their own small
  queue, drained first, also drop-oldest.
- A SEND to a NodeId with no connection here is answered with NOT_HERE, not
  silence.
- Every drop is counted by reason (:class:`DropReason`) in
  :class:`RoutingCounters`, which the shell exports as metrics.

UDP fast path (``FLAG_UDP_DATAGRAMS``, wire format in :mod:`p2psync.proto.relay`)
-------------------------------------------------------------------------------
Relaying a datagram over the relay stream costs three extra QUIC stacks
(the sender's relay connection, relayd's receive and send, the receiver's
relay connection), two congestion controllers in series and head-of-line
blocking of QUIC-in-a-QUIC-stream. The fast path carries the same payload
as one UDP datagram each way, TURN ChannelData style, while the QUIC relay
connection stays the control plane (login, lookups, pings, refusals) and
the fallback for what does not fit a datagram::

    node A --UDP DATAGRAM_TO_RELAY(dst=B, p)--> relayd --UDP DATAGRAM_FROM_RELAY(src=A, p)--> B
                                                       (B without the flag: RECV(A, p) on
                                                        its stream; B absent: NOT_HERE to A)

Rules:

- **Source address is the credential** (like a TURN permission, RFC 8656
  §9). A connection that asked for the flag in its signed AUTH and was
  granted it in WELCOME *owns* its current UDP address (the source of its
  newest authenticated QUIC packet: the shell reports changes with
  :meth:`Router.rebind`, so the map follows a NAT rebinding). A datagram is
  accepted only from an address some connection owns, and only as that
  connection's NodeId; anything else is dropped and counted
  (``unknown-source``), never answered: no amplification, no oracle.
  When two connections come from one address (a NAT that handed a dead
  mapping's port to a new host), the newest claim wins.
- It is charged to the owner's token buckets exactly like a SEND; a
  refused one is dropped (with the usual RATE_LIMITED notice on the stream,
  at most once per ``notice_interval``).
- It goes out by UDP only to a destination that has the flag and owns its
  address, 1:1 (one datagram out per datagram in, never larger than it,
  only to an authenticated node's address); else it is queued as a RECV on
  the destination's stream (drop-oldest, as any RECV); a destination with
  no connection here gets the sender a NOT_HERE, at most once per
  destination per ``notice_interval``.

What a spoofer can do: an off-path attacker who forges a node's source
address can make the relay forward its bytes, as that node, to a node the
victim could reach anyway. The destination's end-to-end QUIC (AEAD per
packet, RFC 9001 §5) or disco (``crypto_box``) drops them; the forged
datagrams do spend the victim's rate budget (the same as the victim
sending them), which an attacker could use to slow the victim's relayed
traffic. Output is never larger than input and only goes to addresses of
authenticated nodes, so the relay is no amplifier.
"""

from __future__ import annotations

import enum
import hmac
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from p2psync.crypto.identity import NodeId
from p2psync.errors import BadFrame, IntegrityError, LocalProtocolError
from p2psync.proto.relay import (
    FLAG_UDP_DATAGRAMS,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Address,
    Auth,
    Challenge,
    Error,
    Hello,
    Lookup,
    LookupResult,
    NodeIdCache,
    NodeToRelay,
    NotHere,
    Ping,
    Pong,
    Recv,
    RelayErrorCode,
    RelayToNode,
    Send,
    Welcome,
    auth_input,
    datagram_from_relay_header,
    decode_datagram_to_relay_untrusted,
)
from relayd.state import TokenBucket

__all__ = [
    "AccessPolicy",
    "AuthFailure",
    "DatagramDrop",
    "DropReason",
    "Router",
    "RoutingCounters",
    "RoutingLimits",
]

H = TypeVar("H", bound=Hashable)

# Control replies queued per connection beyond the relayed frames: a PONG, a
# few NOT_HEREs and lookup answers; a node that never reads loses the oldest.
CONTROL_QUEUE: Final = 16
# A rate-limited node hears about it at most once a second, so the notices
# cannot become a flood of their own.
NOTICE_INTERVAL_S: Final = 1.0


class DropReason(enum.Enum):
    """Why a frame was not delivered (the metric label)."""

    RATE_LIMITED = "rate-limited"
    FRAME_TOO_LARGE = "frame-too-large"
    NOT_HERE = "not-here"
    QUEUE_FULL = "queue-full"
    CONTROL_QUEUE_FULL = "control-queue-full"
    DISCONNECTED = "disconnected"  # queued for a connection that ended first
    WRITE_TIMEOUT = "write-timeout"


class DatagramDrop(enum.Enum):
    """Why a UDP fast-path datagram was not relayed (the metric label)."""

    UNKNOWN_SOURCE = "unknown-source"  # no fast-path connection owns its source address
    MALFORMED = "malformed"
    RATE_LIMITED = "rate-limited"
    TOO_LARGE = "too-large"
    NOT_HERE = "not-here"


class AuthFailure(enum.Enum):
    """Why an AUTH was refused (the metric label)."""

    BAD_SIGNATURE = "bad-signature"
    BAD_TOKEN = "bad-token"
    NOT_ALLOWED = "not-allowed"


class _State(enum.Enum):
    NEW = "new"
    CHALLENGED = "challenged"
    AUTHENTICATED = "authenticated"
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class RoutingLimits:
    """Per-node limits; the shell builds this from :class:`relayd.config.RelaydLimits`."""

    frames_per_second: float
    frame_burst: float
    bytes_per_second: float
    byte_burst: float
    max_payload: int
    queue_per_destination: int
    control_queue: int = CONTROL_QUEUE
    notice_interval: float = NOTICE_INTERVAL_S
    # Grant FLAG_UDP_DATAGRAMS (the UDP fast path) to nodes that ask for it.
    fast_path: bool = True


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may use the relay: everyone (the default), an allow-list, and/or a token."""

    allowed: frozenset[NodeId] | None = None
    access_token: bytes | None = None


@dataclass(slots=True)
class RoutingCounters:
    """Monotonic counters for metrics (frames/bytes counted when handed to a writer)."""

    frames_relayed: int = 0
    bytes_relayed: int = 0
    drops: dict[DropReason, int] = field(default_factory=lambda: dict.fromkeys(DropReason, 0))
    auths_ok: int = 0
    auths_failed: dict[AuthFailure, int] = field(
        default_factory=lambda: dict.fromkeys(AuthFailure, 0)
    )
    lookups: int = 0
    lookups_found: int = 0
    replaced: int = 0
    protocol_errors: int = 0
    # UDP fast path: relayed UDP in -> UDP out (also in frames/bytes_relayed) ...
    datagrams_forwarded: int = 0
    datagram_bytes_forwarded: int = 0
    # ... UDP in -> RECV on the destination's stream (counted again when taken) ...
    datagrams_to_stream: int = 0
    # ... and not relayed, by reason.
    datagram_drops: dict[DatagramDrop, int] = field(
        default_factory=lambda: dict.fromkeys(DatagramDrop, 0)
    )
    rebinds: int = 0  # a connection's UDP address changed (NAT rebinding)


@dataclass(slots=True)
class _Conn(Generic[H]):
    handle: H
    observed: Address | None
    state: _State = _State.NEW
    nonce: bytes = b""
    udp_header: bytes = b""  # DATAGRAM_FROM_RELAY | its NodeId: prefix of what it sends by UDP
    node_id: NodeId | None = None
    published: tuple[Address, ...] = ()
    frames: TokenBucket | None = None
    bytes: TokenBucket | None = None
    data: deque[Recv] = field(default_factory=deque)
    control: deque[RelayToNode] = field(default_factory=deque)
    close_code: RelayErrorCode | None = None
    last_notice: dict[RelayErrorCode, float] = field(default_factory=dict)
    fast_path: bool = False  # granted FLAG_UDP_DATAGRAMS
    not_here_at: dict[NodeId, float] = field(default_factory=dict)  # fast-path NOT_HEREs


class Router(Generic[H]):
    """The relay's routing table and queues. See the module docstring."""

    def __init__(
        self,
        relay_node_id: NodeId,
        limits: RoutingLimits,
        random_bytes: Callable[[int], bytes],
        policy: AccessPolicy | None = None,
        node_ids: NodeIdCache | None = None,
    ) -> None:
        self.relay_node_id = relay_node_id
        self.limits = limits
        self.policy = policy or AccessPolicy()
        self.counters = RoutingCounters()
        self._random_bytes = random_bytes
        self._node_ids = node_ids if node_ids is not None else NodeIdCache()
        self._conns: dict[H, _Conn[H]] = {}
        self._nodes: dict[NodeId, _Conn[H]] = {}
        # UDP address -> the fast-path connection that owns it (see the module docstring).
        self._by_address: dict[Address, _Conn[H]] = {}

    # --- queries ----------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections with an open relay stream (any state)."""
        return len(self._conns)

    @property
    def nodes(self) -> int:
        """Authenticated NodeIds reachable here now."""
        return len(self._nodes)

    def node_of(self, handle: H) -> NodeId | None:
        """The NodeId ``handle`` proved, once authenticated (and not replaced)."""
        conn = self._conns.get(handle)
        if conn is None or conn.state is not _State.AUTHENTICATED:
            return None
        return conn.node_id

    def handle_of(self, node_id: NodeId) -> H | None:
        conn = self._nodes.get(node_id)
        return None if conn is None else conn.handle

    @property
    def fast_path_nodes(self) -> int:
        """Connections on the UDP fast path now (each owning its address)."""
        return len(self._by_address)

    def fast_path_address(self, handle: H) -> Address | None:
        """The UDP address ``handle`` owns for the fast path (None: not on it)."""
        conn = self._conns.get(handle)
        if conn is None or conn.observed is None:
            return None
        return conn.observed if self._by_address.get(conn.observed) is conn else None

    def closing(self, handle: H) -> bool:
        """True once ``handle`` is CLOSING (its ERROR is queued or written)."""
        conn = self._conns.get(handle)
        return conn is not None and conn.state is _State.CLOSING

    def queued(self, handle: H) -> int:
        """Messages waiting for ``handle``'s writer."""
        conn = self._conns.get(handle)
        return 0 if conn is None else len(conn.data) + len(conn.control)

    def filling(self, handles: list[H]) -> bool:
        """True if a relayed-frame queue of ``handles`` is at least half full.

        The shell's reader gives the writers a turn then, before it routes
        more frames: one read of a sender's stream can complete many frames,
        and without that turn they would overflow the (drop-oldest) queue
        even for a destination that reads fast.
        """
        half = self.limits.queue_per_destination // 2
        for handle in handles:
            conn = self._conns.get(handle)
            if conn is not None and len(conn.data) >= half:
                return True
        return False

    # --- inputs -----------------------------------------------------------------

    def open(self, handle: H, observed: Address | None, now: float) -> None:
        """A connection's relay stream appeared; it must say HELLO next."""
        if handle in self._conns:
            raise LocalProtocolError(f"handle {handle!r} is already open")
        self._conns[handle] = _Conn(handle=handle, observed=observed)

    def receive(self, handle: H, message: NodeToRelay, now: float) -> list[H]:
        """Apply one message from ``handle``; return the handles whose queue grew."""
        conn = self._conns.get(handle)
        if conn is None:
            raise LocalProtocolError(f"handle {handle!r} is not open")
        state = conn.state
        if state is _State.CLOSING:
            return []
        if state is _State.AUTHENTICATED:
            if isinstance(message, Send):
                return self._send(conn, message, now)
            if isinstance(message, Lookup):
                return self._lookup(conn, message, now)
            if isinstance(message, Ping):
                if not self._admit(conn, 0, now):
                    return self._rate_limited(conn, now)
                return self._control(conn, Pong(message.nonce))
            return self._protocol_error(conn, f"{type(message).__name__.upper()} after WELCOME")
        if isinstance(message, Hello):
            if state is not _State.NEW:
                return self._protocol_error(conn, "second HELLO")
            if message.version != PROTOCOL_VERSION:
                return self._end(
                    conn,
                    RelayErrorCode.UNSUPPORTED_VERSION,
                    f"relay protocol version {PROTOCOL_VERSION} only",
                )
            conn.nonce = self._random_bytes(NONCE_SIZE)
            conn.state = _State.CHALLENGED
            return self._control(conn, Challenge(conn.nonce, conn.observed))
        if isinstance(message, Auth):
            if state is not _State.CHALLENGED:
                return self._protocol_error(conn, "AUTH before HELLO")
            return self._auth(conn, message, now)
        return self._end(
            conn, RelayErrorCode.NOT_AUTHENTICATED, "authenticate (HELLO, AUTH) before relaying"
        )

    def receive_datagrams(
        self, batch: Iterable[tuple[bytes, Address]], now: float
    ) -> tuple[list[tuple[bytes, Address]], list[H]]:
        """Route UDP fast-path datagrams ``(data, source)``; see the module docstring.

        Returns the datagrams to send, ``(data, address)`` in arrival order,
        and the handles whose queue grew.
        """
        by_address = self._by_address
        counters = self.counters
        drops = counters.datagram_drops
        max_payload = self.limits.max_payload
        queue_limit = self.limits.queue_per_destination
        out: list[tuple[bytes, Address]] = []
        woken: dict[H, None] = {}
        for data, source in batch:
            conn = by_address.get(source)
            if conn is None:
                drops[DatagramDrop.UNKNOWN_SOURCE] += 1
                continue
            try:
                message = decode_datagram_to_relay_untrusted(data, self._node_ids)
            except BadFrame:
                drops[DatagramDrop.MALFORMED] += 1
                continue
            payload = message.payload
            size = len(payload)
            if not self._admit(conn, size, now):
                drops[DatagramDrop.RATE_LIMITED] += 1
                woken.update(
                    dict.fromkeys(
                        self._notice(
                            conn, RelayErrorCode.RATE_LIMITED, "over the rate limit; dropped", now
                        )
                    )
                )
                continue
            if size > max_payload:
                drops[DatagramDrop.TOO_LARGE] += 1
                continue
            target = self._nodes.get(message.dst)
            if target is None or target.state is not _State.AUTHENTICATED:
                drops[DatagramDrop.NOT_HERE] += 1
                woken.update(dict.fromkeys(self._not_here_datagram(conn, message.dst, now)))
                continue
            address = target.observed
            if target.fast_path and address is not None and by_address.get(address) is target:
                out.append((conn.udp_header + payload, address))
                counters.datagrams_forwarded += 1
                counters.datagram_bytes_forwarded += size
                counters.frames_relayed += 1
                counters.bytes_relayed += size
                continue
            assert conn.node_id is not None  # owning an address implies AUTHENTICATED
            queue = target.data
            if len(queue) >= queue_limit:
                queue.popleft()
                counters.drops[DropReason.QUEUE_FULL] += 1
            queue.append(Recv(conn.node_id, payload))
            counters.datagrams_to_stream += 1
            woken[target.handle] = None
        return out, list(woken)

    def rebind(self, handle: H, address: Address, now: float) -> None:
        """``handle``'s newest authenticated packet came from ``address``: follow it.

        The observed address (LOOKUP answers) moves, and so does the fast
        path's: datagrams are accepted from, and sent to, the new address only.
        """
        conn = self._conns.get(handle)
        if conn is None or conn.observed == address or conn.state is _State.CLOSING:
            return
        self._release_address(conn)
        conn.observed = address
        self.counters.rebinds += 1
        if conn.fast_path:
            self._claim_address(conn)

    def fail(self, handle: H, code: RelayErrorCode, message: str) -> list[H]:
        """The shell ends ``handle`` (bad frame, timeout): queue ERROR, then close."""
        conn = self._conns.get(handle)
        if conn is None or conn.state is _State.CLOSING:
            return []
        if code is RelayErrorCode.PROTOCOL_ERROR or code is RelayErrorCode.FRAME_TOO_LARGE:
            self.counters.protocol_errors += 1
        return self._end(conn, code, message)

    def write_timed_out(self, handle: H) -> None:
        """``handle`` did not take a write in time; the shell closes it next."""
        conn = self._conns.get(handle)
        if conn is not None:
            self._discard(conn, DropReason.WRITE_TIMEOUT)

    def close(self, handle: H, now: float) -> None:
        """The connection is gone: unregister it, drop what was queued for it."""
        conn = self._conns.pop(handle, None)
        if conn is None:
            return
        if conn.node_id is not None and self._nodes.get(conn.node_id) is conn:
            del self._nodes[conn.node_id]
        self._release_address(conn)
        self._discard(conn, DropReason.DISCONNECTED)

    def shutdown(self) -> list[H]:
        """Tell every connection the relay is stopping."""
        woken: list[H] = []
        for conn in list(self._conns.values()):
            if conn.state is not _State.CLOSING:
                woken += self._end(conn, RelayErrorCode.SHUTTING_DOWN, "relay is shutting down")
        return woken

    # --- output -----------------------------------------------------------------

    def take(
        self, handle: H, max_messages: int = 64, max_bytes: int | None = None
    ) -> tuple[list[RelayToNode], RelayErrorCode | None]:
        """Up to ``max_messages`` to write to ``handle`` (control first), and a close code.

        Relayed frames stop once their payloads reach ``max_bytes`` (at least
        one is taken). The close code is set once the connection is CLOSING
        and its ERROR is in the returned batch: write the batch, then close
        with that code.
        """
        conn = self._conns.get(handle)
        if conn is None:
            return [], None
        out: list[RelayToNode] = []
        control, data = conn.control, conn.data
        counters = self.counters
        while control and len(out) < max_messages:
            out.append(control.popleft())
        budget = max_bytes if max_bytes is not None else -1
        taken = 0
        while data and len(out) < max_messages and (budget < 0 or taken < budget):
            frame = data.popleft()
            size = len(frame.payload)
            taken += size
            counters.frames_relayed += 1
            counters.bytes_relayed += size
            out.append(frame)
        if conn.state is _State.CLOSING and not control:
            return out, conn.close_code
        return out, None

    # --- message handlers ---------------------------------------------------------

    def _auth(self, conn: _Conn[H], message: Auth, now: float) -> list[H]:
        policy = self.policy
        node_id = message.node_id
        try:
            node_id.verify(
                auth_input(conn.nonce, node_id, self.relay_node_id, message.flags),
                message.signature,
            )
        except IntegrityError:
            self.counters.auths_failed[AuthFailure.BAD_SIGNATURE] += 1
            return self._end(
                conn, RelayErrorCode.BAD_AUTH, "signature does not verify for this challenge"
            )
        if policy.access_token is not None and (
            message.access_token is None
            or not hmac.compare_digest(message.access_token, policy.access_token)
        ):
            self.counters.auths_failed[AuthFailure.BAD_TOKEN] += 1
            return self._end(conn, RelayErrorCode.BAD_AUTH, "missing or wrong access token")
        if policy.allowed is not None and node_id not in policy.allowed:
            self.counters.auths_failed[AuthFailure.NOT_ALLOWED] += 1
            return self._end(conn, RelayErrorCode.NOT_ALLOWED, "this relay serves other nodes")
        self.counters.auths_ok += 1
        woken: list[H] = []
        previous = self._nodes.get(node_id)
        if previous is not None and previous is not conn:
            self.counters.replaced += 1
            woken += self._end(
                previous, RelayErrorCode.REPLACED, "another connection authenticated as this node"
            )
        limits = self.limits
        conn.state = _State.AUTHENTICATED
        conn.node_id = node_id
        conn.published = message.published
        conn.frames = TokenBucket(limits.frames_per_second, limits.frame_burst, now)
        conn.bytes = TokenBucket(limits.bytes_per_second, limits.byte_burst, now)
        self._nodes[node_id] = conn
        granted: int | None = None  # an AUTH without flags gets a WELCOME without
        if message.flags is not None:
            granted = 0
            if (
                message.flags & FLAG_UDP_DATAGRAMS
                and limits.fast_path
                and conn.observed is not None
            ):
                granted |= FLAG_UDP_DATAGRAMS
                conn.fast_path = True
                conn.udp_header = datagram_from_relay_header(node_id)
                self._claim_address(conn)
        welcome = Welcome(conn.observed, limits.max_payload, granted)
        return woken + self._control(conn, welcome)

    def _send(self, conn: _Conn[H], message: Send, now: float) -> list[H]:
        size = len(message.payload)
        if not self._admit(conn, size, now):
            return self._rate_limited(conn, now)
        if size > self.limits.max_payload:
            self.counters.drops[DropReason.FRAME_TOO_LARGE] += 1
            return self._notice(
                conn,
                RelayErrorCode.FRAME_TOO_LARGE,
                f"payload of {size} bytes exceeds {self.limits.max_payload}; dropped",
                now,
            )
        target = self._nodes.get(message.dst)
        if target is None or target.state is not _State.AUTHENTICATED:
            self.counters.drops[DropReason.NOT_HERE] += 1
            return self._control(conn, NotHere(message.dst))
        assert conn.node_id is not None  # AUTHENTICATED implies it
        queue = target.data
        if len(queue) >= self.limits.queue_per_destination:
            queue.popleft()
            self.counters.drops[DropReason.QUEUE_FULL] += 1
        queue.append(Recv(conn.node_id, message.payload))
        return [target.handle]

    def _lookup(self, conn: _Conn[H], message: Lookup, now: float) -> list[H]:
        if not self._admit(conn, 0, now):
            return self._rate_limited(conn, now)
        self.counters.lookups += 1
        target = self._nodes.get(message.node_id)
        if target is None:
            result = LookupResult(message.request_id, message.node_id, False, None, ())
        else:
            self.counters.lookups_found += 1
            result = LookupResult(
                message.request_id, message.node_id, True, target.observed, target.published
            )
        return self._control(conn, result)

    # --- helpers ------------------------------------------------------------------

    def _admit(self, conn: _Conn[H], size: int, now: float) -> bool:
        frames, nbytes = conn.frames, conn.bytes
        assert frames is not None and nbytes is not None  # set on AUTH
        if frames.available(now) < 1 or nbytes.available(now) < size:
            return False
        frames.take(now, 1)
        nbytes.take(now, size)
        return True

    def _rate_limited(self, conn: _Conn[H], now: float) -> list[H]:
        self.counters.drops[DropReason.RATE_LIMITED] += 1
        return self._notice(conn, RelayErrorCode.RATE_LIMITED, "over the rate limit; dropped", now)

    def _notice(self, conn: _Conn[H], code: RelayErrorCode, text: str, now: float) -> list[H]:
        last = conn.last_notice.get(code)
        if last is not None and now - last < self.limits.notice_interval:
            return []
        conn.last_notice[code] = now
        return self._control(conn, Error(code, text))

    def _not_here_datagram(self, conn: _Conn[H], dst: NodeId, now: float) -> list[H]:
        """NOT_HERE for a fast-path datagram: at most one per destination per interval."""
        sent = conn.not_here_at
        last = sent.get(dst)
        if last is not None and now - last < self.limits.notice_interval:
            return []
        if len(sent) >= self.limits.control_queue:
            sent.clear()  # bounded: forgetting only allows one more NOT_HERE each
        sent[dst] = now
        return self._control(conn, NotHere(dst))

    def _claim_address(self, conn: _Conn[H]) -> None:
        """``conn`` owns its observed address for the fast path (the newest claim wins)."""
        if conn.observed is not None:
            self._by_address[conn.observed] = conn

    def _release_address(self, conn: _Conn[H]) -> None:
        if conn.observed is not None and self._by_address.get(conn.observed) is conn:
            del self._by_address[conn.observed]

    def _control(self, conn: _Conn[H], message: RelayToNode) -> list[H]:
        queue = conn.control
        if len(queue) >= self.limits.control_queue:
            queue.popleft()
            self.counters.drops[DropReason.CONTROL_QUEUE_FULL] += 1
        queue.append(message)
        return [conn.handle]

    def _protocol_error(self, conn: _Conn[H], what: str) -> list[H]:
        self.counters.protocol_errors += 1
        return self._end(conn, RelayErrorCode.PROTOCOL_ERROR, f"unexpected {what}")

    def _end(self, conn: _Conn[H], code: RelayErrorCode, text: str) -> list[H]:
        """Unregister ``conn`` now, keep only an ERROR queued, close after it."""
        if conn.node_id is not None and self._nodes.get(conn.node_id) is conn:
            del self._nodes[conn.node_id]
        self._release_address(conn)
        self._discard(conn, DropReason.DISCONNECTED)
        conn.state = _State.CLOSING
        conn.close_code = code
        conn.control.append(Error(code, text))
        return [conn.handle]

    def _discard(self, conn: _Conn[H], reason: DropReason) -> None:
        if conn.data:
            self.counters.drops[reason] += len(conn.data)
            conn.data.clear()
        conn.control.clear()
