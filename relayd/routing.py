"""The relay's routing state, sans-IO: who is connected, what goes where, what is dropped.

Theory
------
relayd keeps one :class:`Router`. The trio shell (:mod:`relayd.relay`) gives
each QUIC connection an opaque, hashable **handle** and feeds the router
plain method calls, each with ``now`` (seconds, any monotonic origin):

- :meth:`Router.open` — a connection's relay stream appeared;
- :meth:`Router.receive` — a decoded :data:`~p2psync.proto.relay.NodeToRelay` arrived;
- :meth:`Router.fail` — the shell gave up on a connection (bad frame,
  timeout): tell it why and close it;
- :meth:`Router.close` — the connection is gone;
- :meth:`Router.shutdown` — the relay is stopping.

Outputs are per-handle **send queues** the shell drains with
:meth:`Router.take`; every input returns the handles whose queue grew, so
the shell wakes exactly their writer tasks. ``take`` returns the messages
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
"""

from __future__ import annotations

import enum
import hmac
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from p2psync.crypto.identity import NodeId
from p2psync.errors import IntegrityError, LocalProtocolError
from p2psync.proto.relay import (
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Address,
    Auth,
    Challenge,
    Error,
    Hello,
    Lookup,
    LookupResult,
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
)
from relayd.state import TokenBucket

__all__ = [
    "AccessPolicy",
    "AuthFailure",
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


@dataclass(slots=True)
class _Conn(Generic[H]):
    handle: H
    observed: Address | None
    state: _State = _State.NEW
    nonce: bytes = b""
    node_id: NodeId | None = None
    published: tuple[Address, ...] = ()
    frames: TokenBucket | None = None
    bytes: TokenBucket | None = None
    data: deque[Recv] = field(default_factory=deque)
    control: deque[RelayToNode] = field(default_factory=deque)
    close_code: RelayErrorCode | None = None
    last_notice: dict[RelayErrorCode, float] = field(default_factory=dict)


class Router(Generic[H]):
    """The relay's routing table and queues. See the module docstring."""

    def __init__(
        self,
        relay_node_id: NodeId,
        limits: RoutingLimits,
        random_bytes: Callable[[int], bytes],
        policy: AccessPolicy | None = None,
    ) -> None:
        self.relay_node_id = relay_node_id
        self.limits = limits
        self.policy = policy or AccessPolicy()
        self.counters = RoutingCounters()
        self._random_bytes = random_bytes
        self._conns: dict[H, _Conn[H]] = {}
        self._nodes: dict[NodeId, _Conn[H]] = {}

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
            node_id.verify(auth_input(conn.nonce, node_id, self.relay_node_id), message.signature)
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
        return woken + self._control(conn, Welcome(conn.observed, limits.max_payload))

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
