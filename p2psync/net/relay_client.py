"""A node's connection to its home relay (relayd), kept up for as long as it runs.

Theory
------
:func:`open_relay_client` dials the relay over the node's own QUIC endpoint
(one UDP socket for everything), authenticates, and keeps the connection:
when it breaks, it dials again after a capped exponential backoff with
jitter (``backoff_initial`` doubling to ``backoff_max``, each wait drawn
uniformly from its upper half; reset by every successful WELCOME).

While connected, the client

- tells the relay the local addresses the node publishes (AUTH) and learns
  its own public address as the relay sees it (:attr:`RelayClient.our_public_address`);
  :meth:`RelayClient.republish` changes them: the client logs in again at
  once (a new AUTH carries them; the protocol has no separate update), so
  LOOKUPs answer the new addresses within a round trip or two;
- carries opaque payloads: :meth:`RelayClient.send` / :meth:`RelayClient.try_send`
  to a NodeId, and hands what arrives either to a synchronous ``deliver``
  callback (the node's endpoint: :meth:`~p2psync.net.endpoint.Endpoint.receive_relayed_batch`),
  called once per read of the relay stream with every ``(src, payload)``
  that read completed, or, without one, to a **bounded** channel
  :attr:`RelayClient.received`. When the channel's reader does not keep up,
  new arrivals are dropped and counted (a relay path carries QUIC packets:
  losing one is what UDP does; blocking would stall PONGs and lookups on
  the same stream);
- answers :meth:`RelayClient.lookup` with what the relay knows of a NodeId;
- PINGs every ``ping_interval`` (keeps NAT mappings and the relay's idle
  timer fresh, measures :attr:`RelayClient.rtt`); no PONG within
  ``ping_timeout`` means the connection is dead and is replaced;
- asks for the **UDP fast path** (``FLAG_UDP_DATAGRAMS`` in its signed AUTH,
  unless ``config.fast_path`` is off) and says when WELCOME granted it
  (:meth:`RelayClient.using_fast_path`, the ``fast_path`` hook of
  :meth:`~p2psync.net.endpoint.Endpoint.set_relay`): the endpoint then
  sends relayed datagrams that fit one UDP datagram as DATAGRAM_TO_RELAY
  from its own socket to the relay's address, batched with its other
  output; what does not fit still goes through :meth:`RelayClient.try_send`.
  The endpoint takes DATAGRAM_FROM_RELAY from the relay's address only
  (that of its QUIC connection to the relay's NodeId). The relay connection's
  pings keep the NAT mapping those datagrams use (the same socket) open.
  A relay that refuses the flagged AUTH as malformed (older than the flag)
  is logged into without flags from the next attempt on.

Wire: :mod:`p2psync.proto.relay` on one bidirectional stream the client opens::

    -> HELLO  <- CHALLENGE  -> AUTH(flags)  <- WELCOME(flags)  (bounded by handshake_timeout)
    -> SEND / LOOKUP / PING     <- RECV / NOT_HERE / LOOKUP_RESULT / PONG / ERROR

    and, granted the fast path, UDP datagrams from the endpoint's socket:
    -> DATAGRAM_TO_RELAY(dst, payload)   <- DATAGRAM_FROM_RELAY(src, payload)

Dialing needs the relay's NodeId: :meth:`p2psync.net.endpoint.Endpoint.connect`
pins the certificate key of the peer it dials. A relay is configured as
``NODEID@HOST:PORT`` (relayd prints its NodeId at startup and serves it as
``relay_node_id`` in ``/health``) or as ``HOST:PORT``, whose NodeId the
node learns once and pins (:mod:`p2psync.known_relays`) before it opens
this client (:func:`parse_relay_address` parses both).

The endpoint must offer ALPN ``p2psync-relay/1`` (``EndpointConfig.alpn``)
for the relay to accept the connection.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio

from p2psync import errors
from p2psync.crypto.identity import Identity, NodeId
from p2psync.defaults import RELAY_FAST_PATH, RELAY_NODE_ID_CACHE
from p2psync.errors import BadFrame, LocalProtocolError
from p2psync.net.endpoint import Connection, Endpoint, ResourceClosed, Stream
from p2psync.net.interfaces import parse_host_port
from p2psync.net.service_stream import FramedStream, open_service
from p2psync.proto.relay import (
    DEFAULT_MAX_PAYLOAD,
    FLAG_UDP_DATAGRAMS,
    RELAY_ALPN,
    Address,
    Auth,
    Challenge,
    Error,
    FrameDecoder,
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
    decode_relay_to_node_untrusted,
    encode_frame,
    max_frame_for,
)

__all__ = [
    "Deliver",
    "LookupFailed",
    "RelayClient",
    "RelayClientConfig",
    "RelayClientStats",
    "RelayRefused",
    "RelayState",
    "RelayUnavailable",
    "open_relay_client",
    "parse_relay_address",
]

logger = logging.getLogger(__name__)

# The largest payload limit a relay may announce that we accept: beyond this
# a (hostile) relay could make us buffer huge frames.
MAX_ACCEPTED_PAYLOAD: Final = 1024 * 1024
# Messages written per send_all on the relay stream.
_WRITE_BATCH: Final = 64


# Takes every relayed (src, payload) one read of the relay stream produced; must not block.
Deliver = Callable[[list[tuple[NodeId, bytes]]], None]


# --- configuration ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelayClientConfig:
    """Timers and bounds of the relay client; each default says why."""

    # Below the relay's 60 s idle timeout and the usual 30 s UDP NAT timeout.
    ping_interval: float = 15.0
    # A PONG slower than this means the path is dead for practical purposes.
    ping_timeout: float = 10.0
    # QUIC handshake plus HELLO..WELCOME: a few RTTs, generous for mobile links.
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    # Reconnect backoff: quick first retry, at most one attempt per 30 s.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # Received payloads waiting for the application (then drop newest, counted).
    receive_queue: int = 256
    # Outgoing messages waiting for the stream (send() waits, try_send() drops).
    send_queue: int = 64
    # NOT_HERE notices kept for the application (then dropped).
    not_here_queue: int = 64
    lookup_timeout: float = 5.0
    max_pending_lookups: int = 64
    # The relay's shared access token, if it requires one.
    access_token: bytes | None = None
    # Largest end-to-end datagram sent over the relay (if the relay's frame
    # limit allows): a relayed QUIC packet rides inside the relay stream, whose
    # own packets are path-sized, so no path MTU applies; per-packet costs
    # dominate in Python, and 16 KiB packets cut them ~11x against 1452-byte
    # ones (see RelayClient.datagram_size). Used only without the UDP fast path.
    datagram_size: int = 16 * 1024
    # Ask the relay for the UDP fast path (p2psync.proto.relay); see RELAY_FAST_PATH.
    fast_path: bool = RELAY_FAST_PATH


# --- errors ---------------------------------------------------------------------------------


class RelayUnavailable(errors.BrokenResourceError, trio.BrokenResourceError):
    """Not connected to the relay right now (it reconnects by itself; retry later)."""


class RelayRefused(errors.RemoteProtocolError):
    """The relay sent a fatal ERROR; ``code`` is its :class:`RelayErrorCode` value."""


class LookupFailed(errors.P2PSyncError):
    """A LOOKUP got no answer (timeout, or the connection went away)."""


# --- state ----------------------------------------------------------------------------------


class RelayState(enum.Enum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKING_OFF = "backing-off"
    CLOSED = "closed"


@dataclass(slots=True)
class RelayClientStats:
    tx_frames: int = 0
    tx_bytes: int = 0
    rx_frames: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0  # receive channel full
    tx_dropped: int = 0  # try_send with a full queue, or queued when the connection died
    not_here: int = 0
    rate_limited: int = 0  # RATE_LIMITED notices from the relay
    too_large: int = 0  # FRAME_TOO_LARGE notices from the relay
    connects: int = 0  # successful WELCOMEs
    fast_path_connects: int = 0  # ... of which granted the UDP fast path
    failures: int = 0  # connection attempts or sessions that ended in an error
    republishes: int = 0  # published addresses changed (each a new login)
    errors: dict[int, int] = field(default_factory=dict)  # ERROR codes received


def parse_relay_address(text: str) -> tuple[NodeId | None, Address]:
    """``NODEID@HOST:PORT`` or ``HOST:PORT`` (``[v6]:PORT`` for IPv6).

    Raises :class:`~p2psync.errors.ConfigError` saying what is wrong.
    """
    node_part, at, address_part = text.strip().rpartition("@")
    node_id: NodeId | None = None
    if at:
        try:
            node_id = NodeId.parse(node_part)
        except BadFrame as exc:
            raise errors.ConfigError(f"relay {text!r}: {exc}") from None
    try:
        host, port = parse_host_port(address_part, default_host="")
    except errors.ConfigError as exc:
        raise errors.ConfigError(f"relay {text!r}: {exc}") from None
    if not host:
        raise errors.ConfigError(f"relay {text!r} is not HOST:PORT (e.g. relay.example.org:3478)")
    if port == 0:
        raise errors.ConfigError(f"relay {text!r}: port must be a number from 1 to 65535")
    return node_id, (host, port)


# --- the client -------------------------------------------------------------------------------


class RelayClient:
    """The node's side of its home relay. Get one from :func:`open_relay_client`."""

    def __init__(
        self,
        endpoint: Endpoint,
        identity: Identity,
        relay_address: Address,
        relay_node_id: NodeId,
        published_addresses: Sequence[Address],
        config: RelayClientConfig,
        rng: random.Random,
        deliver: Deliver | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.identity = identity
        self.relay_address = relay_address
        self.relay_node_id = relay_node_id
        self.published_addresses = tuple(published_addresses)
        self.config = config
        self.stats = RelayClientStats()
        self.state = RelayState.CONNECTING
        self.our_public_address: Address | None = None
        self.rtt: float | None = None
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.fast_path = False  # the relay granted the UDP fast path on this connection
        self.last_error: Error | None = None
        self.last_failure: str | None = None  # why the last session ended (or never began)
        self._rng = rng
        self._deliver = deliver
        self._node_ids = NodeIdCache(RELAY_NODE_ID_CACHE)
        self._rx_send, self.received = trio.open_memory_channel[tuple[NodeId, bytes]](
            config.receive_queue
        )
        self._not_here_send, self.not_here = trio.open_memory_channel[NodeId](config.not_here_queue)
        self._tx_send, self._tx_receive = trio.open_memory_channel[NodeToRelay](config.send_queue)
        self._connected_event = trio.Event()
        self._lookups: dict[int, LookupResult | None] = {}
        self._lookup_lot = trio.lowlevel.ParkingLot()
        self._next_request = 1
        self._pongs: dict[int, float] = {}
        self._pong_lot = trio.lowlevel.ParkingLot()
        self._session_id = 0
        self._conn: Connection | None = None
        self._auth_flags = True  # False once the relay refused an AUTH with flags
        self._session_scope: trio.CancelScope | None = None

    @property
    def spec(self) -> str:
        """``NODEID@HOST:PORT``: this relay as config, tickets and status name it."""
        host, port = self.relay_address
        return f"{self.relay_node_id}@{f'[{host}]' if ':' in host else host}:{port}"

    def __repr__(self) -> str:
        return (
            f"<RelayClient {self.relay_node_id.short()} at {self.relay_address} {self.state.value}>"
        )

    @property
    def connected(self) -> bool:
        return self.state is RelayState.CONNECTED

    async def wait_connected(self) -> None:
        """Return once the client is authenticated (at once if it is)."""
        while not self.connected:
            await self._connected_event.wait()

    def datagram_size(self) -> int:
        """The largest payload to send now: ``config.datagram_size`` within the relay's limit."""
        return min(self.config.datagram_size, self.max_payload)

    def using_fast_path(self) -> bool:
        """True while connected with the UDP fast path granted (the endpoint's hook)."""
        return self.fast_path and self.state is RelayState.CONNECTED

    # --- sending ------------------------------------------------------------------------

    def _check_send(self, dst: NodeId, payload: bytes) -> None:
        if len(payload) > self.max_payload:
            raise LocalProtocolError(
                f"payload of {len(payload)} bytes exceeds the relay's limit of {self.max_payload}"
            )
        if not self.connected:
            raise RelayUnavailable(f"not connected to relay {self.relay_node_id.short()}")

    async def send(self, dst: NodeId, payload: bytes) -> None:
        """Queue ``payload`` for ``dst``; waits while the send queue is full."""
        self._check_send(dst, payload)
        await self._tx_send.send(Send(dst, payload))

    def try_send(self, dst: NodeId, payload: bytes) -> bool:
        """Queue ``payload`` for ``dst`` if there is room now; False (counted) if not."""
        self._check_send(dst, payload)
        try:
            self._tx_send.send_nowait(Send(dst, payload))
        except trio.WouldBlock:
            self.stats.tx_dropped += 1
            return False
        return True

    async def lookup(self, node_id: NodeId) -> LookupResult:
        """What the relay knows of ``node_id``; :class:`LookupFailed` if no answer."""
        if not self.connected:
            raise RelayUnavailable(f"not connected to relay {self.relay_node_id.short()}")
        if len(self._lookups) >= self.config.max_pending_lookups:
            raise LookupFailed(f"{len(self._lookups)} lookups already pending; try again soon")
        request_id = self._next_request
        self._next_request = request_id % 0xFFFF_FFFF + 1
        self._lookups[request_id] = None
        session = self._session_id
        try:
            with trio.move_on_after(self.config.lookup_timeout):
                await self._tx_send.send(Lookup(request_id, node_id))
                while self._lookups.get(request_id) is None:
                    if self._session_id != session or not self.connected:
                        raise LookupFailed(f"relay connection lost during lookup of {node_id}")
                    await self._lookup_lot.park()
            result = self._lookups.get(request_id)
            if result is None:
                raise LookupFailed(f"no lookup answer for {node_id.short()} in time")
            return result
        finally:
            self._lookups.pop(request_id, None)

    async def open_service(self, service: str, version: int, max_frame: int) -> FramedStream:
        """Open a service stream (mailbox, invites) on the current relay connection.

        Raises :class:`RelayUnavailable` when not connected and
        :class:`~p2psync.net.service_stream.ServiceRefused` when the relay
        says no. The stream breaks when the relay connection does; open a
        new one after :meth:`wait_connected`.
        """
        conn = self._conn
        if not self.connected or conn is None:
            raise RelayUnavailable(f"not connected to relay {self.relay_node_id.short()}")
        try:
            return await open_service(conn, service, version, max_frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ResourceClosed) as exc:
            raise RelayUnavailable(f"relay connection lost opening {service}: {exc}") from exc

    # --- the connection loop ---------------------------------------------------------------

    def republish(self, addresses: Sequence[Address]) -> bool:
        """Publish ``addresses`` instead (the node's interfaces changed).

        Returns True if they differ from the published ones; a connected
        client then logs in again at once to tell the relay (AUTH is where
        they travel), a connecting one sends them in its next AUTH.
        """
        addresses = tuple(addresses)
        if addresses == self.published_addresses:
            return False
        self.published_addresses = addresses
        self.stats.republishes += 1
        if self._session_scope is not None and self.state is RelayState.CONNECTED:
            self._session_scope.cancel()
        return True

    async def _run(self) -> None:
        delay = self.config.backoff_initial
        while True:
            self.state = RelayState.CONNECTING
            connects = self.stats.connects
            try:
                with trio.CancelScope() as scope:
                    self._session_scope = scope  # republish() cancels it while CONNECTED
                    await self._session()
                if scope.cancelled_caught:  # republish(): log in again now, no backoff
                    logger.info(
                        "relay %s: logging in again to publish %d new address(es)",
                        self.relay_node_id.short(),
                        len(self.published_addresses),
                    )
                    delay = self.config.backoff_initial
                    continue
            except BaseException as exc:
                if _contains(exc, ResourceClosed) and not _contains(exc, trio.Cancelled):
                    self.state = RelayState.CLOSED
                    return  # our endpoint is closed: nothing to reconnect with
                if not _only_expected(exc):
                    raise
                self.stats.failures += 1
                self.last_failure = _describe(exc)
                logger.info("relay %s: %s", self.relay_node_id.short(), self.last_failure)
            if self.stats.connects != connects:
                delay = self.config.backoff_initial
            self.state = RelayState.BACKING_OFF
            wait = self._rng.uniform(delay / 2, delay)
            delay = min(delay * 2, self.config.backoff_max)
            await trio.sleep(wait)

    async def _session(self) -> None:
        config = self.config
        address = await resolve_relay_host(self.relay_address)
        with trio.fail_after(config.connect_timeout):
            conn = await self.endpoint.connect(self.relay_node_id, address)
        try:
            stream = await conn.open_stream()
            decoder = FrameDecoder(max_frame_for(DEFAULT_MAX_PAYLOAD))
            with trio.fail_after(config.handshake_timeout):
                welcome = await self._handshake(stream, decoder)
            self.max_payload = min(welcome.max_payload, MAX_ACCEPTED_PAYLOAD)
            decoder.max_frame = max_frame_for(self.max_payload)
            self.our_public_address = welcome.observed
            self.fast_path = self.config.fast_path and welcome.grants(FLAG_UDP_DATAGRAMS)
            if self.fast_path:
                self.stats.fast_path_connects += 1
            self._drain_stale_sends()
            self._session_id += 1
            self._conn = conn
            self.state = RelayState.CONNECTED
            self.stats.connects += 1
            self._connected_event.set()
            self._connected_event = trio.Event()
            logger.debug(
                "relay %s connected; public address %s; UDP fast path %s",
                self.relay_node_id.short(),
                welcome.observed,
                "on" if self.fast_path else "off",
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, stream)
                nursery.start_soon(self._pinger)
                await self._reader(stream, decoder)
                nursery.cancel_scope.cancel()
        finally:
            self._conn = None
            self.fast_path = False
            if self.state is RelayState.CONNECTED:
                self.state = RelayState.CONNECTING
            self._session_id += 1
            self._lookup_lot.unpark_all()
            self._pong_lot.unpark_all()
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _handshake(self, stream: Stream, decoder: FrameDecoder) -> Welcome:
        started = trio.current_time()
        await stream.send_all(encode_frame(Hello()))
        challenge = await self._read_one(stream, decoder)
        if not isinstance(challenge, Challenge):
            raise errors.RemoteProtocolError(
                f"relay sent {type(challenge).__name__}, not CHALLENGE"
            )
        self.rtt = trio.current_time() - started
        our_id = self.identity.node_id
        # The capability flags are signed with the rest (proto/relay.py); none at all
        # when we want none, or for a relay that refused them before (it predates them).
        flags = FLAG_UDP_DATAGRAMS if self.config.fast_path and self._auth_flags else None
        signed = auth_input(challenge.nonce, our_id, self.relay_node_id, flags)
        auth = Auth(
            our_id,
            self.identity.sign(signed),
            self.config.access_token,
            self.published_addresses,
            flags,
        )
        await stream.send_all(encode_frame(auth))
        try:
            welcome = await self._read_one(stream, decoder)
        except RelayRefused as exc:
            if flags is not None and exc.code == RelayErrorCode.PROTOCOL_ERROR:
                logger.info(
                    "relay %s refused AUTH with flags (an older relay?); "
                    "next login without them (no UDP fast path)",
                    self.relay_node_id.short(),
                )
                self._auth_flags = False
            raise
        if not isinstance(welcome, Welcome):
            raise errors.RemoteProtocolError(f"relay sent {type(welcome).__name__}, not WELCOME")
        return welcome

    async def _read_one(self, stream: Stream, decoder: FrameDecoder) -> RelayToNode:
        """The next message; a relay ERROR becomes :class:`RelayRefused`."""
        while (body := decoder.next_frame()) is None:
            data = await stream.receive_some()
            if not data:
                raise RelayUnavailable("relay closed the stream during the handshake")
            decoder.feed(data)
        message = decode_relay_to_node_untrusted(
            body, max_frame=decoder.max_frame, node_ids=self._node_ids
        )
        if isinstance(message, Error):
            self._error_received(message)
        return message

    def _error_received(self, message: Error) -> None:
        stats = self.stats
        stats.errors[message.code] = stats.errors.get(message.code, 0) + 1
        if message.code == RelayErrorCode.RATE_LIMITED:
            stats.rate_limited += 1
        elif message.code == RelayErrorCode.FRAME_TOO_LARGE:
            stats.too_large += 1
        if message.is_fatal:
            self.last_error = message
            known = message.known_code
            name = known.name if known is not None else str(message.code)
            raise RelayRefused(f"relay refused: {name}: {message.message}", message.code)

    async def _reader(self, stream: Stream, decoder: FrameDecoder) -> None:
        stats = self.stats
        deliver = self._deliver
        node_ids = self._node_ids
        while True:
            # Everything one read completed, handed over at once (see Deliver).
            arrived: list[tuple[NodeId, bytes]] = []
            while (body := decoder.next_frame()) is not None:
                message = decode_relay_to_node_untrusted(
                    body, max_frame=decoder.max_frame, node_ids=node_ids
                )
                if isinstance(message, Recv):
                    arrived.append((message.src, message.payload))
                else:
                    self._control_received(message)
            if arrived:
                stats.rx_frames += len(arrived)
                stats.rx_bytes += sum(len(payload) for _, payload in arrived)
                if deliver is not None:
                    deliver(arrived)
                else:
                    self._queue_received(arrived)
            data = await stream.receive_some()
            if not data:
                raise RelayUnavailable("relay closed the stream")
            decoder.feed(data)

    def _queue_received(self, arrived: list[tuple[NodeId, bytes]]) -> None:
        """No ``deliver`` callback: into :attr:`received`, dropping (counted) when full."""
        for item in arrived:
            try:
                self._rx_send.send_nowait(item)
            except trio.WouldBlock:
                self.stats.rx_dropped += 1

    def _control_received(self, message: RelayToNode) -> None:
        """Anything but RECV after WELCOME."""
        stats = self.stats
        if isinstance(message, NotHere):
            stats.not_here += 1
            with contextlib.suppress(trio.WouldBlock):
                self._not_here_send.send_nowait(message.dst)
        elif isinstance(message, Pong):
            sent = self._pongs.pop(message.nonce, None)
            if sent is not None:
                self.rtt = trio.current_time() - sent
                self._pong_lot.unpark_all()
        elif isinstance(message, LookupResult):
            if message.request_id in self._lookups:
                self._lookups[message.request_id] = message
                self._lookup_lot.unpark_all()
        elif isinstance(message, Error):
            self._error_received(message)
        else:
            raise errors.RemoteProtocolError(f"relay sent {type(message).__name__} after WELCOME")

    async def _writer(self, stream: Stream) -> None:
        stats = self.stats
        receive = self._tx_receive
        while True:
            batch = [await receive.receive()]
            while len(batch) < _WRITE_BATCH:
                try:
                    batch.append(receive.receive_nowait())
                except trio.WouldBlock:
                    break
            for message in batch:
                if isinstance(message, Send):
                    stats.tx_frames += 1
                    stats.tx_bytes += len(message.payload)
            await stream.send_all(b"".join([encode_frame(m) for m in batch]))

    async def _pinger(self) -> None:
        config = self.config
        while True:
            await trio.sleep(config.ping_interval)
            nonce = self._rng.getrandbits(64)
            self._pongs.clear()
            self._pongs[nonce] = trio.current_time()
            await self._tx_send.send(Ping(nonce))
            with trio.move_on_after(config.ping_timeout) as scope:
                while nonce in self._pongs:
                    await self._pong_lot.park()
            if scope.cancelled_caught:
                raise RelayUnavailable(f"no PONG within {config.ping_timeout} s")

    def _drain_stale_sends(self) -> None:
        """Drop what was queued for a connection that died (stale packets)."""
        while True:
            try:
                self._tx_receive.receive_nowait()
            except trio.WouldBlock:
                return
            self.stats.tx_dropped += 1


async def resolve_relay_host(address: Address) -> Address:
    """``address`` with its host name resolved (a numeric host as it is)."""
    host, port = address
    try:
        ipaddress.ip_address(host)
        return address
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
    except OSError as exc:
        raise RelayUnavailable(f"cannot resolve relay host {host!r}: {exc}") from None
    if not infos:
        raise RelayUnavailable(f"relay host {host!r} has no address")
    sockaddr = infos[0][4]
    return (str(sockaddr[0]), int(sockaddr[1]))


# What ends a session for a reason worth a reconnect (never Cancelled, never a bug).
_EXPECTED: Final = (trio.BrokenResourceError, errors.P2PSyncError, trio.TooSlowError)


def _only_expected(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_expected(inner) for inner in exc.exceptions)
    return isinstance(exc, _EXPECTED)


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_contains(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextlib.asynccontextmanager
async def open_relay_client(
    endpoint: Endpoint,
    identity: Identity,
    relay_address: Address,
    relay_node_id: NodeId | None,
    published_addresses: Sequence[Address] = (),
    *,
    config: RelayClientConfig | None = None,
    rng: random.Random | None = None,
    deliver: Deliver | None = None,
) -> AsyncIterator[RelayClient]:
    """Keep a connection to the relay at ``relay_address`` while the block runs.

    Returns at once; use :meth:`RelayClient.wait_connected` to wait for the
    first WELCOME. ``relay_node_id`` is required: a relay configured by ``HOST:PORT`` alone is
    identified first (:func:`p2psync.known_relays.resolve_relay`). ``rng`` draws backoff
    jitter and ping nonces. ``deliver`` takes relayed payloads in batches (see the module
    docstring); without it they go to :attr:`RelayClient.received`.
    """
    if relay_node_id is None:
        raise LocalProtocolError(
            "the relay's NodeId is needed to dial it (Endpoint.connect pins the certificate "
            "key): resolve a HOST:PORT relay with p2psync.known_relays.resolve_relay first"
        )
    if RELAY_ALPN not in endpoint.config.alpn:
        raise LocalProtocolError(
            f"the endpoint does not offer ALPN {RELAY_ALPN!r}; add it to EndpointConfig.alpn"
        )
    if endpoint.node_id != identity.node_id:
        raise LocalProtocolError("the relay identity must be the endpoint's identity")
    client = RelayClient(
        endpoint,
        identity,
        relay_address,
        relay_node_id,
        published_addresses,
        config or RelayClientConfig(),
        rng or random.Random(),
        deliver,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._run)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
                client.state = RelayState.CLOSED
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
