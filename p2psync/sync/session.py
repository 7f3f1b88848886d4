"""One node <-> node sync session: handshake, frontiers, entries, object wants.

Theory
------
A :class:`SyncSession` is the protocol logic of one connection to one peer,
sans-IO in the style of h11 and aioquic: it owns no socket, reads no clock
and draws no entropy of its own. The shell feeds it and drains it.

Inputs
    ``start(now)``                         once, right after the connection exists
    ``receive_control(data, now)``         bytes read from the control stream
    ``object_received(oid, sealed, now)``  an object stream delivered ``oid``
    ``object_failed(oid, now)``            the peer answered NOT_FOUND, or the stream broke
    ``handle_timer(now)``                  the deadline of ``get_timer()`` passed
    ``announce(raws)``, ``close(code)``    API calls (gossip, shutdown)
    ``connection_lost(code, reason)``      the QUIC connection ended underneath
Outputs
    ``data_to_send()``  bytes for the control stream (call until it returns b"")
    ``next_event()``    :mod:`p2psync.sync.events`, until it returns None
    ``get_timer()``     absolute deadline in ``now``'s time base, or None

``now`` is a monotonic time (``trio.current_time()``) used only for timers.
Entries are checked against wall-clock time (clock skew), so the session
also takes an injected ``wall_clock_ms``; tests pass a fixed value.

Storage: why a synchronous Protocol
-----------------------------------
The session calls the store directly through :class:`SyncStore`, a narrow
synchronous interface that :class:`p2psync.store.Store` satisfies as is.
The alternative — the session emitting "read this"/"insert that" requests
and waiting for answers — doubles the number of states (every step gains a
"waiting for the store" twin) for no gain in testability: tests use real
stores on tmp dirs, stepping ``now`` by hand, and stay deterministic. The
price: the store does blocking SQLite I/O inside session calls, so a trio
shell runs each call (``receive_control``, ``data_to_send``,
``object_received``, ...) in ``trio.to_thread.run_sync`` under one per-node
lock shared by all sessions of that store. Calls are short: one
transaction per received message, one bounded query per sent batch.

Flow (see :mod:`p2psync.proto.messages` for the wire format)::

    D -> A  HELLO
    A -> D  HELLO, AUTH           acceptor knows both challenges now
    D -> A  AUTH, FRONTIER        dialer verified the acceptor's AUTH
    A -> D  FRONTIER              acceptor verified the dialer's AUTH
    both    ENTRIES ...           what the other's frontier lacks, per author in seq order
    both    ANNOUNCE ...          gossip: entries new to us, pushed as they come
    both    FRONTIER              every SYNC_ANTI_ENTROPY_INTERVAL, and after a gap

Handshake checks, each closing with its own code: version
(UNSUPPORTED_VERSION), a challenge seen before or our own echoed back
(REPLAY), the peer not being the node we dialed or believing we are
someone else (WRONG_NODE), the signature over the transcript (BAD_AUTH),
the membership MAC (WRONG_GROUP), and a deadline (TIMEOUT).

Sending entries streams with bounded memory: receiving a FRONTIER only
records, per author, the seq the peer has; ``data_to_send()`` then reads
entries from the store batch by batch while less than SYNC_SEND_BUFFER is
waiting, so a catch-up of a million entries costs one buffer, not one
list. A new FRONTIER from the peer replaces the plan (re-sent entries are
harmless duplicates). Since a plan may re-send every entry the peer claims
to lack, at most one FRONTIER per ``frontier_min_interval`` (1 s) is
planned; a later one waits for that deadline (only the newest is kept), so
a peer that repeats FRONTIER cannot make us re-read the store per message.

Objects: after entries arrive the session asks the store which objects
are missing (:meth:`SyncStore.wanted_blobs`, :meth:`SyncStore.missing_objects`,
a blob's root before its chunks) and keeps at most SYNC_OBJECT_WINDOW of
them in flight, each as an :class:`~p2psync.sync.events.ObjectWanted` that
the shell fetches on its own stream. Every object is verified by
:meth:`SyncStore.add_object` (hash, and fit with the blob that names it);
one that fails is counted and the peer is closed with BAD_OBJECT — the
object stays missing, so another session fetches it. An object the peer
lacks (NOT_FOUND: it may still be fetching it itself, as B in a line
A - B - C) is asked for again after ``SyncConfig.unavailable_retry`` and at
every anti-entropy round. Completeness lives in the store, so a new
session after an interruption asks only for what is still missing:
resumption needs no state here.

Driving it from trio (the shell; ``lock`` serialises store access)::

    session.start(trio.current_time())             # after QUIC is up, control stream open
    loop, in one task per connection:
        data = await control.receive_some()        # or: timer fired / object done
        async with lock:
            await trio.to_thread.run_sync(session.receive_control, data, now)
        # then, after *every* input:
        while (out := await run_sync_locked(session.data_to_send)):
            await control.send_all(out)
        while (event := session.next_event()) is not None:
            ObjectWanted(oid)  -> nursery.start_soon(fetch, oid)   # object stream,
                                  then session.object_received / object_failed
            EntriesReceived    -> for peer in gossip.entries_received(...): flush(peer)
            PeerVerified       -> keep_connection(...) ? gossip.add_peer : session.close(9)
            SessionClosed      -> flush, close QUIC with event.code, gossip.remove_peer
        re-arm: move_on_at(session.get_timer()) -> session.handle_timer(now)

Misbehaviour never raises: it becomes a ProtocolViolation and a
SessionClosed event, and a BYE in ``data_to_send()``. Only API misuse
(calling inputs before ``start``, reporting an object that was never
wanted) raises :class:`~p2psync.errors.LocalProtocolError`. Exceptions of
the store other than verification failures (disk full, ...) are our
failures, not the peer's, and propagate to the shell.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from p2psync import defaults
from p2psync.crypto.group import GroupKeys, membership_mac, verify_membership_mac
from p2psync.crypto.identity import BadSignature, Identity, NodeId, RandomBytes
from p2psync.errors import BadFrame, IntegrityError, LocalProtocolError, NotFound, NotWanted
from p2psync.proto.messages import (
    CHALLENGE_SIZE,
    PROTOCOL_VERSION,
    Announce,
    Auth,
    Bye,
    Entries,
    ErrorCode,
    FrameDecoder,
    Frontier,
    Hello,
    Message,
    MessageType,
    Role,
    auth_input,
    decode_message_untrusted,
    encode_message_frame,
    handshake_transcript,
)
from p2psync.store.store import InsertResult
from p2psync.sync.events import (
    EntriesReceived,
    Event,
    ObjectStored,
    ObjectWanted,
    PeerVerified,
    ProtocolViolation,
    SessionClosed,
)

log = logging.getLogger(__name__)

# Store rejections an honest peer never causes: it verified the same entries
# with the same rules before storing them. Anything else (fork, clock skew,
# an unknown key epoch) can happen between honest nodes and is only logged.
_GARBAGE_REASONS: Final = frozenset({"malformed", "bad-signature", "wrong-group"})


class SyncStore(Protocol):
    """What a session needs of the store; :class:`p2psync.store.Store` fits."""

    def frontier(self) -> Mapping[NodeId, int]: ...

    def entries_after(self, author: NodeId, seq: int, limit: int) -> list[bytes]: ...

    def insert_entries(self, raws: Iterable[bytes], *, now_ms: int) -> InsertResult: ...

    def wanted_blobs(self) -> list[bytes]: ...

    def missing_objects(self, blob_id: bytes) -> list[bytes]: ...

    def has_object(self, oid: bytes) -> bool: ...

    def add_object(self, oid: bytes, sealed: bytes) -> bool: ...


@dataclass(frozen=True, slots=True)
class SyncConfig:
    """Limits and intervals of a session; defaults from :mod:`p2psync.defaults`."""

    handshake_timeout: float = defaults.SYNC_HANDSHAKE_TIMEOUT
    anti_entropy_interval: float = defaults.SYNC_ANTI_ENTROPY_INTERVAL
    repair_min_interval: float = defaults.SYNC_REPAIR_MIN_INTERVAL
    object_window: int = defaults.SYNC_OBJECT_WINDOW
    want_queue: int = defaults.SYNC_WANT_QUEUE
    max_unavailable: int = defaults.SYNC_MAX_UNAVAILABLE
    # Ask a peer again for an object it lacked after this long: in a line
    # A - B - C, C learns of an entry from B before B has fetched its objects
    # from A. A tenth of the anti-entropy interval (3 s) is soon enough for a
    # user and costs one NOT_FOUND round trip per object per retry.
    unavailable_retry: float = defaults.SYNC_ANTI_ENTROPY_INTERVAL / 10
    send_buffer: int = defaults.SYNC_SEND_BUFFER
    max_entries_per_message: int = defaults.SYNC_MAX_ENTRIES_PER_MESSAGE
    max_entries_bytes: int = defaults.SYNC_MAX_ENTRIES_BYTES
    frontier_authors_per_message: int = defaults.SYNC_FRONTIER_AUTHORS_PER_MESSAGE
    max_frontier_authors: int = defaults.SYNC_MAX_FRONTIER_AUTHORS
    frontier_min_interval: float = defaults.SYNC_FRONTIER_MIN_INTERVAL


@dataclass(slots=True)
class SessionStats:
    """Counters of one session (for logs, metrics and tests)."""

    entries_sent: int = 0
    entries_announced: int = 0
    entries_accepted: int = 0
    entries_duplicate: int = 0
    entries_rejected: int = 0
    frontiers_sent: int = 0
    frontiers_deferred: int = 0  # the peer's, held back by frontier_min_interval
    objects_wanted: int = 0
    objects_stored: int = 0
    objects_unavailable: int = 0
    objects_unwanted: int = 0  # arrived after their value stopped being live
    bad_objects: int = 0


class ChallengeCache:
    """Recently seen handshake challenges (bounded LRU), to refuse replays.

    One per node, shared by all its sessions: a challenge is 32 random
    bytes, so seeing one twice means a recorded handshake is being replayed
    (or our own challenge reflected back at us).
    """

    __slots__ = ("_capacity", "_seen")

    def __init__(self, capacity: int = defaults.SYNC_REPLAY_CACHE) -> None:
        self._capacity = capacity
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def remember(self, challenge: bytes) -> bool:
        """Record ``challenge``; False if it was already known (a replay)."""
        if challenge in self._seen:
            self._seen.move_to_end(challenge)
            return False
        self._seen[challenge] = None
        if len(self._seen) > self._capacity:
            self._seen.popitem(last=False)
        return True


class ObjectClaims:
    """Which session of a node is fetching which object (one per node, shared).

    Without it, two peers' sessions would both fetch a chunk they both
    offer. A session claims an object before it emits ObjectWanted and
    releases it when the object arrives, fails, or the session closes; the
    others pick it up when the shell calls their :meth:`SyncSession.wants_changed`
    (the node does when a link ends), else at their next refill.
    """

    __slots__ = ("_owners",)

    def __init__(self) -> None:
        self._owners: dict[bytes, object] = {}

    def claim(self, oid: bytes, owner: object) -> bool:
        """True if ``owner`` may fetch ``oid`` (nobody else is fetching it)."""
        holder = self._owners.setdefault(oid, owner)
        return holder is owner

    def release(self, oid: bytes, owner: object) -> None:
        if self._owners.get(oid) is owner:
            del self._owners[oid]

    def held(self, oid: bytes) -> bool:
        """Some session is fetching ``oid`` now."""
        return oid in self._owners

    def __len__(self) -> int:
        return len(self._owners)


class SessionState(enum.Enum):
    IDLE = "idle"  # created; start() not called yet
    AWAIT_HELLO = "await-hello"  # (dialer: HELLO sent) waiting for the peer's HELLO
    AWAIT_AUTH = "await-auth"  # HELLOs exchanged, our AUTH sent, waiting for theirs
    ESTABLISHED = "established"  # peer verified: frontiers, entries, announces
    CLOSED = "closed"  # BYE sent or received; inputs are ignored


_S = SessionState
_M = MessageType

# Every message a peer may send, by state; anything else is PROTOCOL_ERROR.
# (state, message) -> next state, entered before the message's handler runs;
# a handler that finds fault closes the session instead. WANT/OBJECT/NOT_FOUND belong on object
# streams, never on the control stream.
TRANSITIONS: Final[Mapping[tuple[SessionState, MessageType], SessionState]] = {
    (_S.AWAIT_HELLO, _M.HELLO): _S.AWAIT_AUTH,
    (_S.AWAIT_HELLO, _M.BYE): _S.CLOSED,
    (_S.AWAIT_AUTH, _M.AUTH): _S.ESTABLISHED,
    (_S.AWAIT_AUTH, _M.BYE): _S.CLOSED,
    (_S.ESTABLISHED, _M.FRONTIER): _S.ESTABLISHED,
    (_S.ESTABLISHED, _M.ENTRIES): _S.ESTABLISHED,
    (_S.ESTABLISHED, _M.ANNOUNCE): _S.ESTABLISHED,
    (_S.ESTABLISHED, _M.BYE): _S.CLOSED,
}

_MESSAGE_TYPES: Final[Mapping[type, MessageType]] = {
    Hello: _M.HELLO,
    Auth: _M.AUTH,
    Frontier: _M.FRONTIER,
    Entries: _M.ENTRIES,
    Announce: _M.ANNOUNCE,
    Bye: _M.BYE,
}


class _Violation(Exception):
    """Internal: the peer broke a rule; caught in one place and turned into a close."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class _PeerLog(logging.LoggerAdapter[logging.Logger]):
    def process(self, msg: str, kwargs: MutableMapping[str, Any]) -> tuple[str, Any]:
        return f"[{self.extra['peer'] if self.extra else '?'}] {msg}", kwargs


class SyncSession:
    """The sync protocol of one connection; see the module docstring."""

    def __init__(
        self,
        *,
        identity: Identity,
        keyring: Mapping[int, GroupKeys],
        store: SyncStore,
        role: Role,
        random_bytes: RandomBytes,
        wall_clock_ms: Callable[[], int],
        expected_their_node: NodeId | None = None,
        replay_cache: ChallengeCache | None = None,
        object_claims: ObjectClaims | None = None,
        config: SyncConfig | None = None,
    ) -> None:
        if role is Role.DIALER and expected_their_node is None:
            raise LocalProtocolError("a dialing session must know which NodeId it dialed")
        if not keyring:
            raise LocalProtocolError("this device is in no group: nothing to sync")
        self.role = role
        self.our_node = identity.node_id
        self.stats = SessionStats()
        self._identity = identity
        self._keyring = keyring
        self._store = store
        self._random_bytes = random_bytes
        self._wall_clock_ms = wall_clock_ms
        self._expected_their_node = expected_their_node
        self._replay = replay_cache if replay_cache is not None else ChallengeCache()
        self._claims = object_claims if object_claims is not None else ObjectClaims()
        self._config = config if config is not None else SyncConfig()
        self._state = SessionState.IDLE
        self._log = _PeerLog(
            log, {"peer": expected_their_node.short() if expected_their_node else "?"}
        )

        self._decoder = FrameDecoder(defaults.SYNC_MAX_CONTROL_FRAME)
        self._out = bytearray()
        self._events: deque[Event] = deque()

        self._their_node: NodeId | None = None
        self._our_challenge = b""
        self._transcript = b""
        self.close_code: int | None = None
        self.close_reason = ""

        self._handshake_deadline: float | None = None
        self._next_frontier_at: float | None = None
        self._repair_at: float | None = None
        self._last_frontier_at: float | None = None

        self._their_frontier_parts: dict[NodeId, int] = {}
        # The peer's latest complete FRONTIER not planned yet (it came within
        # frontier_min_interval of the last one we planned), and when we did.
        self._pending_frontier: dict[NodeId, int] | None = None
        self._planned_at: float | None = None
        # author -> seq the peer has (per its last frontier plus what we sent since)
        self._send_plan: dict[NodeId, int] = {}

        self._in_flight: set[bytes] = set()
        self._want_queue: deque[bytes] = deque()
        # oid -> when to consider it again (the peer lacked it, or another
        # session was fetching it); insertion order is deadline order
        self._deferred: OrderedDict[bytes, float] = OrderedDict()
        # Deferred because another session had claimed them (a subset of _deferred's keys):
        # wants_changed() takes them up as soon as that claim is gone.
        self._claim_waits: set[bytes] = set()

    # --- properties -------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def their_node(self) -> NodeId | None:
        """The peer's NodeId: claimed after HELLO, proven once PeerVerified is out."""
        return self._their_node

    @property
    def established(self) -> bool:
        return self._state is SessionState.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self._state is SessionState.CLOSED

    @property
    def objects_in_flight(self) -> frozenset[bytes]:
        return frozenset(self._in_flight)

    @property
    def sending_entries(self) -> bool:
        """True while a catch-up to the peer is still being produced."""
        return bool(self._send_plan)

    # --- outputs ---------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes for the control stream; call until it returns ``b""``.

        Each call also produces the next batches of a catch-up (up to
        SYNC_SEND_BUFFER bytes), so the transport's pace bounds our memory.
        """
        if self._state is SessionState.ESTABLISHED:
            self._pump_entries()
        data = bytes(self._out)
        self._out.clear()
        return data

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        if self._state is SessionState.CLOSED or self._state is SessionState.IDLE:
            return None
        retry_at = next(iter(self._deferred.values())) if self._deferred else None
        plan_at = self._frontier_due() if self._pending_frontier is not None else None
        deadlines = [
            t
            for t in (
                self._handshake_deadline,
                self._next_frontier_at,
                self._repair_at,
                retry_at,
                plan_at,
            )
            if t is not None
        ]
        return min(deadlines) if deadlines else None

    # --- inputs ------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Begin the handshake (the dialer speaks first)."""
        if self._state is not SessionState.IDLE:
            raise LocalProtocolError(f"start() called twice (state {self._state.value})")
        self._our_challenge = self._random_bytes(CHALLENGE_SIZE)
        if len(self._our_challenge) != CHALLENGE_SIZE:
            raise LocalProtocolError("random_bytes returned the wrong number of bytes")
        self._replay.remember(self._our_challenge)  # so a reflected challenge is caught
        self._handshake_deadline = now + self._config.handshake_timeout
        self._state = SessionState.AWAIT_HELLO
        if self.role is Role.DIALER:
            assert self._expected_their_node is not None  # checked in __init__
            self._send(
                Hello(
                    PROTOCOL_VERSION, self.our_node, self._expected_their_node, self._our_challenge
                )
            )

    def receive_control(self, data: bytes, now: float) -> None:
        """Feed bytes read from the control stream (any split).

        Consecutive ENTRIES/ANNOUNCE messages in ``data`` are stored as one
        batch (one store transaction, one EntriesReceived): entries are
        checked in order either way, so this only saves per-batch work.
        """
        self._require_started("receive_control")
        if self._state is SessionState.CLOSED or not data:
            return
        try:
            self._decoder.feed(data)
        except BadFrame as exc:
            self._fail(ErrorCode.TOO_LARGE, str(exc))
            return
        entries: list[bytes] = []  # raws of consecutive ENTRIES/ANNOUNCE, in order
        while not self.closed:  # a message may close the session; drop the rest
            body = self._decoder.next_frame()
            if body is None:
                break
            try:
                message = decode_message_untrusted(body)
            except BadFrame as exc:
                self._store_entries(entries, now)
                if not self.closed:
                    self._fail(ErrorCode.PROTOCOL_ERROR, f"malformed message: {exc}")
                return
            if isinstance(message, Entries | Announce) and self.established:
                entries.extend(message.raws)
                continue
            self._store_entries(entries, now)
            if self.closed:
                return
            try:
                self._dispatch(message, now)
            except _Violation as violation:
                self._fail(violation.code, violation.detail)
        self._store_entries(entries, now)

    def _store_entries(self, raws: list[bytes], now: float) -> None:
        """Insert the entries collected by receive_control (then forget them)."""
        if not raws or self.closed:
            return
        try:
            self._on_entries(raws, now)
        except _Violation as violation:
            self._fail(violation.code, violation.detail)
        raws.clear()

    def handle_timer(self, now: float) -> None:
        self._require_started("handle_timer")
        if self._state is SessionState.CLOSED:
            return
        if self._handshake_deadline is not None and now >= self._handshake_deadline:
            self._close(ErrorCode.TIMEOUT, "handshake did not finish in time", by_peer=False)
            return
        if self._state is not SessionState.ESTABLISHED:
            return
        if self._next_frontier_at is not None and now >= self._next_frontier_at:
            # Anti-entropy round: objects the peer lacked may have reached it since.
            self._deferred.clear()
            self._claim_waits.clear()
            self._send_frontier(now)
        elif self._repair_at is not None and now >= self._repair_at:
            self._send_frontier(now)
        due = self._frontier_due()
        if self._pending_frontier is not None and due is not None and now >= due:
            self._plan(self._pending_frontier, now)
        self._fill_wants(now)

    def wants_changed(self, now: float) -> None:
        """What this node should fetch changed outside this session: another
        session released objects it had claimed (it closed: a duplicate link,
        a peer gone), or entries with blobs arrived by another way (the relay
        mailbox). Look for objects to fetch now, not at the next timer."""
        self._require_started("wants_changed")
        if self._state is not SessionState.ESTABLISHED:
            return
        for oid in [oid for oid in self._claim_waits if not self._claims.held(oid)]:
            self._claim_waits.discard(oid)
            if self._deferred.pop(oid, None) is not None:
                self._want_queue.appendleft(oid)  # its claim is gone: next in line
        self._fill_wants(now)

    def announce(self, raws: Sequence[bytes]) -> None:
        """Push entries new to us (gossip). Dropped before the handshake ends:
        the frontier exchange that follows carries them anyway."""
        self._require_started("announce")
        for raw in raws:
            if len(raw) > defaults.MAX_ENTRY_SIZE:
                raise LocalProtocolError(f"an entry of {len(raw)} bytes cannot be announced")
        if self._state is not SessionState.ESTABLISHED:
            return
        for batch in self._batches(raws):
            self._send(Announce(batch))
            self.stats.entries_announced += len(batch)

    def object_received(self, oid: bytes, sealed: bytes, now: float) -> None:
        """The object stream for ``oid`` delivered ``sealed`` (not yet verified)."""
        self._require_started("object_received")
        if self._state is SessionState.CLOSED:
            return  # a fetch that raced the close; the object stays missing
        self._take_in_flight(oid)
        try:
            self._store.add_object(oid, sealed)
        except NotWanted:
            # Its value was deleted or overwritten while it travelled: ours to drop.
            self.stats.objects_unwanted += 1
            self._fill_wants(now)
            return
        except (IntegrityError, BadFrame) as exc:
            self.stats.bad_objects += 1
            self._fail(ErrorCode.BAD_OBJECT, f"object {oid.hex()[:16]}: {exc}")
            return
        self.stats.objects_stored += 1
        self._events.append(ObjectStored(oid))
        self._fill_wants(now)

    def object_failed(self, oid: bytes, now: float, *, peer_fault: str | None = None) -> None:
        """The peer answered NOT_FOUND for ``oid``, or its stream broke.

        ``peer_fault``: the answer was malformed (say why); the peer is closed
        with BAD_OBJECT, as for an object that fails verification.
        """
        self._require_started("object_failed")
        if self._state is SessionState.CLOSED:
            return
        self._take_in_flight(oid)
        if peer_fault is not None:
            self.stats.bad_objects += 1
            self._fail(ErrorCode.BAD_OBJECT, f"object {oid.hex()[:16]}: {peer_fault}")
            return
        self.stats.objects_unavailable += 1
        self._defer(oid, now)
        self._fill_wants(now)

    def close(self, code: int = ErrorCode.OK, reason: str = "") -> None:
        """Say BYE and end the session (e.g. shutdown, or a duplicate connection)."""
        if self._state is SessionState.CLOSED:
            return
        self._close(code, reason, by_peer=False)

    def connection_lost(self, code: int, reason: str) -> None:
        """The connection ended without a BYE (QUIC close, idle timeout, reset)."""
        if self._state is SessionState.CLOSED:
            return
        self._close(code, reason, by_peer=True, send_bye=False)

    # --- dispatch -----------------------------------------------------------------

    def _dispatch(self, message: Message, now: float) -> None:
        message_type = _MESSAGE_TYPES.get(type(message))
        if message_type is None:
            raise _Violation(
                ErrorCode.PROTOCOL_ERROR, f"{type(message).__name__} is not a control message"
            )
        next_state = TRANSITIONS.get((self._state, message_type))
        if next_state is None:
            raise _Violation(
                ErrorCode.PROTOCOL_ERROR,
                f"{message_type.name} is not allowed in state {self._state.value}",
            )
        if next_state is not SessionState.CLOSED:  # _close() enters CLOSED and says why
            self._state = next_state  # a handler that finds fault closes instead
        match message:
            case Hello():
                self._on_hello(message)
            case Auth():
                self._on_auth(message, now)
            case Frontier():
                self._on_frontier(message, now)
            case Entries() | Announce():
                self._on_entries(message.raws, now)
            case Bye():
                self._close(message.code, message.reason, by_peer=True, send_bye=False)

    # --- handshake ------------------------------------------------------------------

    def _on_hello(self, hello: Hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise _Violation(
                ErrorCode.UNSUPPORTED_VERSION,
                f"peer speaks version {hello.version}, we speak {PROTOCOL_VERSION}",
            )
        if not self._replay.remember(hello.challenge):
            raise _Violation(ErrorCode.REPLAY, "handshake challenge seen before")
        if hello.sender == self.our_node:
            raise _Violation(ErrorCode.WRONG_NODE, "peer claims our own NodeId")
        if hello.receiver != self.our_node:
            raise _Violation(
                ErrorCode.WRONG_NODE, f"peer meant to reach {hello.receiver.short()}, not us"
            )
        if self.role is Role.DIALER and hello.sender != self._expected_their_node:
            expected = self._expected_their_node.short() if self._expected_their_node else "?"
            raise _Violation(
                ErrorCode.WRONG_NODE, f"dialed {expected}, reached {hello.sender.short()}"
            )
        self._their_node = hello.sender
        self._log.extra = {"peer": hello.sender.short()}
        if self.role is Role.DIALER:
            dialer, acceptor = self.our_node, hello.sender
            dialer_challenge, acceptor_challenge = self._our_challenge, hello.challenge
        else:
            dialer, acceptor = hello.sender, self.our_node
            dialer_challenge, acceptor_challenge = hello.challenge, self._our_challenge
            self._send(Hello(PROTOCOL_VERSION, self.our_node, hello.sender, self._our_challenge))
        self._transcript = handshake_transcript(
            dialer=dialer,
            acceptor=acceptor,
            dialer_challenge=dialer_challenge,
            acceptor_challenge=acceptor_challenge,
        )
        our_input = auth_input(self.role, self._transcript)
        epoch = max(self._keyring)
        self._send(
            Auth(
                signature=self._identity.sign(our_input),
                epoch=epoch,
                mac=membership_mac(self._keyring[epoch], our_input),
            )
        )

    def _on_auth(self, auth: Auth, now: float) -> None:
        assert self._their_node is not None  # AWAIT_AUTH follows a HELLO
        their_role = Role.ACCEPTOR if self.role is Role.DIALER else Role.DIALER
        their_input = auth_input(their_role, self._transcript)
        try:
            self._their_node.verify(their_input, auth.signature)
        except BadSignature as exc:
            raise _Violation(ErrorCode.BAD_AUTH, str(exc)) from None
        keys = self._keyring.get(auth.epoch)
        if keys is None:
            raise _Violation(
                ErrorCode.WRONG_GROUP, f"peer proves key epoch {auth.epoch}, unknown here"
            )
        try:
            verify_membership_mac(keys, their_input, auth.mac)
        except IntegrityError as exc:
            raise _Violation(ErrorCode.WRONG_GROUP, str(exc)) from None
        self._handshake_deadline = None
        self._log.info("peer verified (epoch %d, %s)", auth.epoch, self.role.name.lower())
        self._events.append(PeerVerified(self._their_node, auth.epoch))
        self._send_frontier(now)
        self._fill_wants(now)  # resume: objects wanted before this session began

    # --- frontiers and entries --------------------------------------------------------

    def _send_frontier(self, now: float) -> None:
        ours = sorted(self._store.frontier().items())
        step = self._config.frontier_authors_per_message
        parts = [tuple(ours[i : i + step]) for i in range(0, len(ours), step)] or [()]
        for index, part in enumerate(parts):
            self._send(Frontier(part, final=index == len(parts) - 1))
        self.stats.frontiers_sent += 1
        self._last_frontier_at = now
        self._next_frontier_at = now + self._config.anti_entropy_interval
        self._repair_at = None

    def _on_frontier(self, frontier: Frontier, now: float) -> None:
        self._their_frontier_parts.update(frontier.seqs)
        if len(self._their_frontier_parts) > self._config.max_frontier_authors:
            raise _Violation(
                ErrorCode.TOO_LARGE,
                f"frontier of more than {self._config.max_frontier_authors} authors",
            )
        if not frontier.final:
            return
        theirs, self._their_frontier_parts = self._their_frontier_parts, {}
        due = self._frontier_due()
        if due is not None and now < due:
            # Each plan may re-read and re-send every entry the peer claims to lack:
            # a peer repeating FRONTIER {author: 0} would have us do that per message.
            # The latest one waits (nothing is dropped), planned at the deadline.
            self._pending_frontier = theirs
            self.stats.frontiers_deferred += 1
            return
        self._plan(theirs, now)

    def _frontier_due(self) -> float | None:
        """When the peer's next FRONTIER may be planned (None: now)."""
        if self._planned_at is None:
            return None
        return self._planned_at + self._config.frontier_min_interval

    def _plan(self, theirs: Mapping[NodeId, int], now: float) -> None:
        self._pending_frontier = None
        self._planned_at = now
        self._send_plan = {
            author: theirs.get(author, 0)
            for author, seq in sorted(self._store.frontier().items())
            if seq > theirs.get(author, 0)
        }

    def _pump_entries(self) -> None:
        """Produce ENTRIES from the send plan while the send buffer has room."""
        limit = self._config.max_entries_per_message
        while self._send_plan and len(self._out) < self._config.send_buffer:
            author, have = next(iter(self._send_plan.items()))
            raws = self._store.entries_after(author, have, limit)
            batch = next(iter(self._batches(raws)), ())
            if not batch:
                del self._send_plan[author]
                continue
            self._send(Entries(batch))
            self.stats.entries_sent += len(batch)
            if len(batch) == len(raws) and len(raws) < limit:
                del self._send_plan[author]  # that was the last of this author
            else:
                # Feeds are contiguous in the store (seq n is stored only after
                # n - 1), so the batch ends at seq have + len(batch).
                self._send_plan[author] = have + len(batch)

    def _batches(self, raws: Sequence[bytes]) -> Iterable[tuple[bytes, ...]]:
        """Split ``raws`` into ENTRIES/ANNOUNCE-sized batches, order kept."""
        batch: list[bytes] = []
        size = 0
        for raw in raws:
            if batch and (
                len(batch) >= self._config.max_entries_per_message
                or size + len(raw) > self._config.max_entries_bytes
            ):
                yield tuple(batch)
                batch, size = [], 0
            batch.append(raw)
            size += len(raw)
        if batch:
            yield tuple(batch)

    def _on_entries(self, raws: Sequence[bytes], now: float) -> None:
        assert self._their_node is not None  # only in ESTABLISHED
        if not raws:
            return
        result = self._store.insert_entries(raws, now_ms=self._wall_clock_ms())
        reasons = [reason for _, reason in result.rejected]
        self.stats.entries_accepted += len(result.accepted)
        self.stats.entries_duplicate += result.duplicates
        self.stats.entries_rejected += len(reasons)
        if result.accepted or reasons:
            self._events.append(
                EntriesReceived(
                    self._their_node,
                    tuple(result.accepted_raws),
                    result.duplicates,
                    len(reasons),
                )
            )
        garbage = sorted(_GARBAGE_REASONS.intersection(reasons))
        if garbage:
            raise _Violation(ErrorCode.PROTOCOL_ERROR, f"peer sent invalid entries: {garbage}")
        if "seq-gap" in reasons and self._repair_at is None:
            # An entry arrived before its predecessor (gossip overtook a
            # catch-up, or missed a message): ask for a repair, rate-limited.
            last = self._last_frontier_at if self._last_frontier_at is not None else now
            self._repair_at = max(now, last + self._config.repair_min_interval)
        if any(entry.blob for entry in result.accepted):
            self._fill_wants(now)

    # --- objects ----------------------------------------------------------------------

    def _take_in_flight(self, oid: bytes) -> None:
        if oid not in self._in_flight:
            raise LocalProtocolError(f"object {oid.hex()[:16]} was not wanted by this session")
        self._in_flight.discard(oid)
        self._claims.release(oid, self)

    def _fill_wants(self, now: float) -> None:
        """Emit ObjectWanted until SYNC_OBJECT_WINDOW objects are in flight."""
        if self._state is not SessionState.ESTABLISHED:
            return
        while self._deferred:
            oid, retry_at = next(iter(self._deferred.items()))
            if retry_at > now:
                break
            del self._deferred[oid]
            self._claim_waits.discard(oid)
        refilled = False
        while len(self._in_flight) < self._config.object_window:
            if not self._want_queue:
                if refilled:
                    return
                self._refill_want_queue()
                refilled = True
                continue
            oid = self._want_queue.popleft()
            if oid in self._in_flight or oid in self._deferred or self._store.has_object(oid):
                continue
            if not self._claims.claim(oid, self):
                # Another session of this node is fetching it; look again
                # later in case that fetch fails (or at once: wants_changed).
                self._defer(oid, now)
                self._claim_waits.add(oid)
                continue
            self._in_flight.add(oid)
            self.stats.objects_wanted += 1
            self._events.append(ObjectWanted(oid))

    def _defer(self, oid: bytes, now: float) -> None:
        self._deferred.pop(oid, None)  # re-inserted at the end: keeps deadline order
        self._deferred[oid] = now + self._config.unavailable_retry
        if len(self._deferred) > self._config.max_unavailable:
            evicted, _ = self._deferred.popitem(last=False)  # considered again early
            self._claim_waits.discard(evicted)

    def _refill_want_queue(self) -> None:
        queued = set(self._want_queue)
        for blob_id in self._store.wanted_blobs():
            try:
                missing = self._store.missing_objects(blob_id)
            except NotFound:  # the blob was collected meanwhile
                continue
            for oid in missing:
                if oid in self._in_flight or oid in self._deferred or oid in queued:
                    continue
                self._want_queue.append(oid)
                queued.add(oid)
                if len(self._want_queue) >= self._config.want_queue:
                    return

    # --- plumbing -----------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        self._out += encode_message_frame(message)

    def _require_started(self, call: str) -> None:
        if self._state is SessionState.IDLE:
            raise LocalProtocolError(f"{call}() before start()")

    def _fail(self, code: ErrorCode, detail: str) -> None:
        self._log.warning("closing: %s (%s)", detail, code.name)
        self._events.append(ProtocolViolation(int(code), detail))
        self._close(code, detail, by_peer=False)

    def _close(self, code: int, reason: str, *, by_peer: bool, send_bye: bool = True) -> None:
        if self._state is SessionState.CLOSED:
            return
        if send_bye and not by_peer:
            self._send(Bye(int(code), reason[: defaults.SYNC_MAX_BYE_REASON]))
        if by_peer:
            self._log.info("peer closed: code %d %s", code, reason[: defaults.SYNC_MAX_BYE_REASON])
        self._state = SessionState.CLOSED
        self.close_code = int(code)
        self.close_reason = reason
        self._send_plan.clear()
        self._deferred.clear()
        self._claim_waits.clear()
        self._want_queue.clear()
        for oid in self._in_flight:
            self._claims.release(oid, self)
        self._in_flight.clear()
        self._handshake_deadline = self._next_frontier_at = self._repair_at = None
        self._pending_frontier = None
        self._events.append(SessionClosed(int(code), reason, by_peer))
