"""The node's QUIC endpoint: one UDP socket, aioquic driven by trio.

Theory
------
One UDP socket per node carries QUIC (both roles), disco and STUN. A single
driver task owns the socket and every :class:`aioquic.quic.connection.QuicConnection`:

1. wait until the socket is readable, a QUIC timer is due, or an
   application task asked for output (:meth:`Endpoint._kick`);
2. **read every datagram that is ready** (non-blocking ``recvfrom`` until
   ``EAGAIN``, at most ``recv_batch`` reads; with UDP GRO, Linux ≥ 5.0, one
   read returns a whole batch of equal-size datagrams, split here) and feed
   each to its owner —
   QUIC by destination connection id (RFC 9000 §5.2; new server
   connections only for a full-size Initial, §14.1), disco and STUN to their
   handlers;
3. fire due QUIC timers (one heap for the whole endpoint);
4. only then ask every touched connection for output and send it
   **batched**: runs of equal-size datagrams to one address go out in one
   ``sendmsg`` with UDP GSO (``UDP_SEGMENT``, Linux ≥ 4.18) when the kernel
   accepts it (probed once at startup, disabled for good on the first
   refusal), else one ``sendto`` each.

Reading everything first means one ACK per batch instead of one per
datagram, which is most of the win over aioquic's asyncio glue. The other
part: aioquic's pacer (RFC 9002 §7.7) allows bursts of 16 datagrams, so
every 16 datagrams cost a timer wake-up; :class:`_BurstPacer` allows one GSO
batch (45 x 1452 bytes) per burst at the same average rate.

Addresses: QUIC sees a stable *virtual address* per peer NodeId
(:mod:`.paths`). The dialer sends disco PINGs (:mod:`.disco`) to the real
address first and waits (bounded) for a PONG, so the acceptor already maps
that source address to the dialer's NodeId when the Initial arrives and
creates the connection with the dialer's virtual address. Datagrams of a
connection with a known peer are always fed to QUIC with its virtual
address, whichever path they came by; each outgoing one goes wherever
:meth:`PathTable.route` says at that moment (a direct address or the relay).
A connection from an unmapped source keeps the real address and
``their_node_id is None``. The acceptor-side NodeId is a routing hint learnt
from disco (or from the relay, below), not proof: the node protocol's HELLO
authenticates the dialer.

Relay paths: the endpoint does not speak to relayd itself. The relay
client hands it two hooks: :meth:`Endpoint.set_relay` gives a
**non-blocking** ``send(dst, payload) -> bool`` (False, or an exception:
the datagram is dropped and counted in ``relay_dropped``; QUIC's loss
recovery retransmits, as for a full socket buffer), and the client's
receive task calls :meth:`Endpoint.receive_relayed_batch` with every
``(src, payload)`` one read of its relay stream completed. A relayed
payload is **exactly the UDP payload**
a direct path would carry (a QUIC packet or a disco message, never STUN),
so it is demultiplexed by the same first-byte rule:

- QUIC -> its connection by connection id, fed with ``src``'s virtual
  address; a packet for a connection of another peer is dropped; a
  full-size Initial creates a server connection whose ``their_node_id`` is
  ``src`` (the relay authenticated ``src``; still only a routing hint);
- disco -> the disco handler with source = ``src``'s relay pseudo-address
  (its virtual address): a PING is answered over the relay and teaches no
  direct path, a PONG validates nothing.

The whole batch is fed first; then the driver is kicked once to flush
output, as after a socket read (one ACK per batch, not per datagram). Per
outgoing datagram the path table picks a validated direct address, else the
relay (if set), else (no relay) today's optimistic direct address; direct
ones are batched/GSO'd as below, relayed ones are one hook call each —
unless the UDP fast path is on.

The relay's UDP fast path (wire format and trust rules in
:mod:`p2psync.proto.relay` and :mod:`relayd.routing`): while
``set_relay(fast_path=...)`` says the relay granted it, a relayed datagram
that fits (payload + ``DATAGRAM_OVERHEAD`` <= ``max_datagram_size``) is
sent as ``DATAGRAM_TO_RELAY | dst | payload`` straight from our socket to
:attr:`Endpoint.relay_address` — the relay server's address as our QUIC
connection to it knows it — in the same batch (GSO run) as our direct
output, not handed to the hook; bigger ones still are. A
``DATAGRAM_FROM_RELAY | src | payload`` is taken only from that address
(anything else with the fast-path prefix is dropped and counted in
``relay_fast_dropped_source``); the fast-path datagrams of one socket read
are fed together through the same path as the relay stream's batches (as
if from ``src`` over the relay), after the read.

Packet size on relay paths. Over the fast path every inner packet must fit
one UDP datagram, so while a peer is routed over the relay and the fast
path is on, its connection builds packets of ``max_datagram_size -
DATAGRAM_OVERHEAD`` (1414) bytes, from the first Initial on. Without the
fast path a relayed packet travels inside the relay stream, which the relay
connection's own QUIC cuts into path-sized packets, so no path MTU bounds
it, only the relay's frame limit: an established connection (handshake
confirmed) then builds packets up to ``set_relay(datagram_size=...)``,
capped at ``MAX_RELAYED_DATAGRAM_SIZE`` (16 KiB) — in Python a packet costs
mostly per packet, and 11x fewer inner packets made stream-relayed
transfers ~3x cheaper in CPU. The size is chosen per transmit from the
route of that moment, so a move to a direct path changes the next packets
(QUIC retransmits frames, not packets, so lost big ones come back small).

Both choices, measured (``python -m netsim.bench relay --only throughput
--rounds 3``: 32 MiB blob, loopback, 2 cores for three processes, medians;
run 1 with relayd's old 8 MiB/s per-node limit, run 2 with 16 MiB/s)::

    path                               run 1 MB/s (x direct)  run 2 MB/s (x direct)  relayd CPU/MB
    direct                             22.7                   23.6                   -
    fast path, 1414-byte packets       12.5 (0.55)            17.6 (0.74)            11.6-11.9 ms
    fast path, relayd unthrottled      14.3 (0.63)            14.8 (0.63)            10.8-11.0 ms
    relay stream, 16 KiB packets        9.0 (0.40)             6.2 (0.26)            65.7-73.7 ms

Single rounds spread widely (0.56-1.15 of direct for the fast path: three
busy processes share two cores with other work); per CPU second of the
busiest process the fast path moves 0.84-1.04 of what direct does, the
stream 0.56-0.60.

The fast path wins, so it is the default: per datagram relayd does a few
dict lookups and a token-bucket charge (reads and sends batched per socket
read, GRO/GSO) instead of a QUIC receive, a stream reassembly and a QUIC
send, and the nodes skip their relay connections' QUIC entirely; that is
worth more than the 11x fewer packets the stream's 16 KiB ones saved.
Before it, relayed throughput was 0.34-0.39 of direct at 87 ms of relayd
CPU per relayed MB.

While a relay is set the path driver (:mod:`.traversal`) sends the disco
messages the path table plans: CALL_ME_MAYBE and probes while relayed
(relay -> direct upgrade), heartbeats and keep-alives on the direct path
(fallback when its pongs stop), and a ping back on an authenticated PING
(so the acceptor's side of a direct path is validated too). :attr:`Connection.path` tells which
path the connection's last datagram took.

Dialer authentication: see :mod:`.tls`. The certificate is checked after
every datagram fed to a dialing connection and before ``connect`` returns.

Flow control and backpressure (RFC 9000 §4): aioquic 1.x doubles
MAX_STREAM_DATA / MAX_DATA as data *arrives*, whatever the application
reads. :class:`_GatedQuicConnection` switches that off; credit is granted
here only as the application consumes bytes (``receive_some``), so unread
data per stream is bounded by ``stream_receive_window`` and per connection
by ``connection_receive_window``. ``send_all`` waits while the stream's
unacknowledged bytes in aioquic exceed ``stream_send_buffer``.

Errors: a peer or network that breaks a connection or stream makes every
pending and later operation raise :class:`ConnectionLost` /
:class:`StreamReset`, which are both :class:`p2psync.errors.BrokenResourceError`
**and** :class:`trio.BrokenResourceError`; using a resource we closed
raises :class:`ResourceClosed` (both ``ClosedResourceError`` flavours), so
generic trio stream code and p2psync code can each catch their own.

Time: every ``now`` given to aioquic is ``trio.current_time()``, timers are
trio deadlines. Under ``MockClock`` QUIC's timers run in virtual time
(tested with ``autojump_threshold=0`` over loopback); with real sockets an
autojump may fire a loss timer while a datagram is still in the kernel,
which costs a spurious retransmission, never correctness.

aioquic internals we rely on (checked against aioquic 1.7; the tests fail
loudly if they change): ``_write_connection_limits`` / ``_write_stream_limits``
(flow-control gating), ``_local_max_data`` / ``QuicStream.max_stream_data_local``
(granting credit), ``_local_max_streams_bidi/uni`` (stream limits, set before
the first transport parameters), ``_loss._pacer`` (burst pacer),
``tls._peer_certificate`` (dialer check), ``sender._buffer_start/_stop``
(unacknowledged bytes), ``sender._pending`` (unsent bytes), ``_loss._rtt_smoothed`` (stats),
``_max_datagram_size`` / ``_handshake_confirmed`` / ``_loss._pacer._max_datagram_size``
(packet size on relay paths), ``_spaces[ONE_RTT].largest_received_packet``
(which datagram was the newest authenticated one: :attr:`Connection.source_address`).

Peer address (:attr:`Connection.source_address`): the real source of the
first datagram fed to a connection, then of every 1-RTT packet that
decrypted with the highest packet number yet (RFC 9000 §9.3's trigger for a
peer address change), reported to :meth:`Endpoint.set_peer_address_handler`.
With ``EndpointConfig.follow_peer_address`` (relayd) a known peer's
datagrams go there instead of to the path table's choice, so a client whose
NAT rebinds keeps its connection. An on-path attacker who races a copy of
a fresh packet from another address can move it until the peer's next
packet moves it back (RFC 9000 §9.3.3); an off-path one cannot.

Limits and known gaps: no Retry/address validation tokens (RFC 9000 §8.1)
and no Version Negotiation replies; no stateless resets; no
unidirectional streams (peers get MAX_STREAMS_UNI = 0); a stream the
application never closes (``aclose()``) stays in its connection's table until the
connection ends; connections we closed linger (for CONNECTION_CLOSE
retransmission) for aioquic's closing period and count against
``max_connections`` meanwhile. Relay paths: hole punching (CALL_ME_MAYBE
over the relay), heartbeats, keep-alives and the fallback to the relay are
the path table's plan (paths.py), carried out by :mod:`.traversal`;
``set_relay`` must be told the relay server's NodeId or the relay
connection itself could be routed through the relay once its direct path
lapses.

Wire (this module adds nothing to QUIC v1, RFC 9000/9001), dialer's view::

    -> disco PING(tx)                      (up to 3, 200 ms apart, see disco.py)
    <- disco PONG(tx, our observed address) (or none within 1 s: go on anyway,
                                            over the relay if one is set)
    <- disco PING(tx') (acceptor pings back while it has a relay)
    -> disco PONG(tx', observed address)
    -> QUIC Initial (ALPN p2psync/1, no SNI)
    <- Initial + Handshake (certificate = the NodeId's key, CertificateVerify)
       [dialer: certificate key == dialed NodeId, else CONNECTION_CLOSE 0x12a]
    -> Handshake Finished, then 1-RTT streams

Over the relay each of these datagrams is one relay frame ``{dst, payload}``
whose payload is the unchanged UDP payload (or, on the fast path, one UDP
datagram to the relay ``DATAGRAM_TO_RELAY | dst | payload``); dialing with
``address=None`` skips the disco PINGs. A relayed connection then punches
(see paths.py)::

    -> disco CALL_ME_MAYBE(our candidates, NAT kind)   over the relay
    -> disco PING to each candidate of the peer        direct, every 0.5 s for 5 s
    <- disco PING from the peer (after its CALL_ME_MAYBE arrived) -> PONG, PING back
    <- disco PONG: the path is validated; the next QUIC datagram goes direct

Use::

    async with open_endpoint(identity, EndpointConfig()) as endpoint:
        conn = await endpoint.connect(peer_id, ("192.0.2.7", 41641))
        stream = await conn.open_stream()
        await stream.send_all(b"hello")
        await stream.send_eof()
        reply = await stream.receive_some()
        # acceptor side: conn = await endpoint.accept(); s = await conn.accept_stream()
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import math
import os
import random
import socket
import struct
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import trio
from aioquic._buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicErrorCode, QuicPacketType, pull_quic_header
from aioquic.quic.packet_builder import QuicPacketBuilder
from aioquic.quic.recovery import K_MICRO_SECOND, QuicPacketPacer, QuicPacketSpace
from aioquic.quic.stream import QuicStream
from aioquic.tls import Epoch

from p2psync import errors
from p2psync.crypto.identity import Identity, NodeId
from p2psync.defaults import (
    DISCO_PING_ATTEMPTS,
    DISCO_PING_INTERVAL,
    DISCO_PONG_WAIT,
    NET_ACCEPT_BACKLOG,
    NET_CONNECTION_RECEIVE_WINDOW,
    NET_IDLE_TIMEOUT,
    NET_MAX_CONNECTIONS,
    NET_MAX_DATAGRAM_SIZE,
    NET_MAX_INCOMING_STREAMS,
    NET_READ_COALESCE,
    NET_RECV_BATCH,
    NET_SEND_BACKLOG,
    NET_SOCKET_BUFFER,
    NET_STREAM_RECEIVE_WINDOW,
    NET_STREAM_SEND_BUFFER,
    RELAY_NODE_ID_CACHE,
)
from p2psync.errors import BadFrame
from p2psync.net import tls
from p2psync.net.disco import Disco, is_disco
from p2psync.net.paths import RELAY, Address, Origin, PathState, PathTable, Route
from p2psync.net.stun import is_stun
from p2psync.net.traversal import PathDriver
from p2psync.proto.relay import (
    DATAGRAM_FROM_RELAY,
    DATAGRAM_OVERHEAD,
    DATAGRAM_PREFIX,
    DATAGRAM_TO_RELAY,
    NodeIdCache,
    decode_datagram_from_relay_untrusted,
)

logger = logging.getLogger(__name__)

StunHandler = Callable[[bytes, Address], None]
# Hand one datagram for a peer to the relay without blocking; False if it was not taken.
RelaySend = Callable[[NodeId, bytes], bool]
# Which path a connection's last datagram took ("none" before the first one).
PathKind = Literal["direct", "relay", "none"]
# True while the relay granted the UDP fast path on the relay client's current connection.
RelayFastPath = Callable[[], bool]
# Takes every DATAGRAM_TO_RELAY one socket read produced, (data, source) each (relayd).
RelayDatagramHandler = Callable[[list[tuple[bytes, Address]]], None]

# Linux UDP GSO/GRO (include/uapi/linux/udp.h); Python 3.11 does not export these.
SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104
_GRO_CMSG_SPACE: Final = socket.CMSG_SPACE(4)
# Kernel limit of segments per GSO send (UDP_MAX_SEGMENTS in older kernels).
_GSO_MAX_SEGMENTS: Final = 64
_GSO_MAX_BYTES: Final = 65000
# RFC 8489 §5: STUN messages carry this cookie at bytes 4..8.
# RFC 9000 §14.1: a server drops client Initials in datagrams below 1200 bytes.
_MIN_INITIAL_SIZE: Final = 1200
# Our connection ids are 8 bytes (aioquic's default), needed to parse short headers.
_CID_LENGTH: Final = 8
# Largest packet built for a relayed peer, whatever the relay allows: aioquic
# writes STREAM and CRYPTO frame lengths as 2-byte varints (< 16384), so a
# larger packet could carry a frame whose length field overflows (checked
# against aioquic 1.7: 32 KiB packets broke connections with garbage frames).
MAX_RELAYED_DATAGRAM_SIZE: Final = 16 * 1024
# Application error code we reset/stop streams with when the app drops them.
STREAM_ABANDONED: Final = 0x101
_TO_RELAY_KIND: Final = DATAGRAM_TO_RELAY[-1]
_FROM_RELAY_KIND: Final = DATAGRAM_FROM_RELAY[-1]


# -- errors ---------------------------------------------------------------------


class ConnectionLost(errors.BrokenResourceError, trio.BrokenResourceError):
    """The peer closed the connection, or it timed out or failed."""

    def __init__(self, message: str, code: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class ConnectFailed(ConnectionLost):
    """The QUIC handshake did not complete (no answer, refused, or no common ALPN)."""


class StreamReset(errors.BrokenResourceError, trio.BrokenResourceError):
    """The peer reset (RESET_STREAM) or stopped (STOP_SENDING) this stream."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ResourceClosed(errors.ClosedResourceError, trio.ClosedResourceError):
    """We closed this endpoint, connection or stream already."""


class TooManyConnections(errors.LocalProtocolError):
    """The endpoint already holds ``max_connections`` connections."""


# -- configuration and stats ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    bind_host: str = "0.0.0.0"
    bind_port: int = 0
    alpn: tuple[str, ...] = ("p2psync/1",)
    max_datagram_size: int = NET_MAX_DATAGRAM_SIZE
    idle_timeout: float = NET_IDLE_TIMEOUT
    max_connections: int = NET_MAX_CONNECTIONS
    accept_backlog: int = NET_ACCEPT_BACKLOG
    max_incoming_streams: int = NET_MAX_INCOMING_STREAMS
    stream_receive_window: int = NET_STREAM_RECEIVE_WINDOW
    connection_receive_window: int = NET_CONNECTION_RECEIVE_WINDOW
    stream_send_buffer: int = NET_STREAM_SEND_BUFFER
    recv_batch: int = NET_RECV_BATCH
    socket_buffer: int = NET_SOCKET_BUFFER
    use_gso: bool = True
    use_gro: bool = True
    disco_ping_attempts: int = DISCO_PING_ATTEMPTS
    disco_ping_interval: float = DISCO_PING_INTERVAL
    disco_pong_wait: float = DISCO_PONG_WAIT
    # False: only addresses given to connect() / add_candidate() are ever used; no
    # CALL_ME_MAYBE either way, no hard-NAT search (peers reached by NodeId alone stay
    # on the relay; the node then offers no looked-up addresses either, but LAN
    # addresses found by mDNS are direct candidates and still reach the table).
    hole_punching: bool = True
    # True (relayd): a known peer's datagrams go to the address its newest
    # authenticated packet came from (RFC 9000 §9.3), not the path table's
    # choice, so a NAT rebinding of a client does not strand its connection.
    follow_peer_address: bool = False


@dataclass(slots=True)
class ConnectionStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    datagrams_sent: int = 0
    datagrams_received: int = 0
    rtt: float | None = None  # smoothed RTT (RFC 9002 §5.3), None before a sample
    congestion_window: int = 0


@dataclass(slots=True)
class EndpointStats:
    datagrams_received: int = 0
    datagrams_sent: int = 0
    send_calls: int = 0  # sendto/sendmsg system calls
    recv_calls: int = 0  # recvfrom/recvmsg system calls that returned data
    gso: bool = False  # UDP GSO in use (send side)
    gro: bool = False  # UDP GRO in use (receive side)
    dropped_malformed: int = 0
    dropped_unknown_connection: int = 0
    dropped_send_errors: int = 0
    refused_connections: int = 0
    stun_received: int = 0
    disco_received: int = 0
    receive_batches: int = 0
    dropped_no_path: int = 0  # a peer's datagram with no direct address and no relay
    relay_datagrams_sent: int = 0  # handed to the relay hook and taken
    relay_bytes_sent: int = 0
    relay_datagrams_received: int = 0  # given to receive_relayed
    relay_bytes_received: int = 0
    relay_dropped: int = 0  # the relay hook refused (queue full, relay down) or was unset
    # The UDP fast path (node side; also counted in relay_datagrams_*/relay_bytes_*):
    relay_fast_datagrams_sent: int = 0  # DATAGRAM_TO_RELAY sent to the relay
    relay_fast_bytes_sent: int = 0  # their payload bytes
    relay_fast_datagrams_received: int = 0  # DATAGRAM_FROM_RELAY from the relay's address
    relay_fast_bytes_received: int = 0
    # Fast-path datagrams dropped: not from our relay's address (or no fast path now),
    # or a direction this endpoint does not take; malformed.
    relay_fast_dropped_source: int = 0
    relay_fast_dropped_malformed: int = 0
    relay_datagrams_routed: int = 0  # DATAGRAM_TO_RELAY handed to the relay handler (relayd)


# -- aioquic with application-driven flow control --------------------------------


class _GatedQuicConnection(QuicConnection):
    """QuicConnection whose receive windows move only when the shell says so.

    aioquic 1.x raises MAX_DATA / MAX_STREAM_DATA by doubling whenever more
    than half the window has *arrived* (``_write_connection_limits`` /
    ``_write_stream_limits``), so a receiver that never reads grows without
    bound. We hide the "used" figures from that doubling rule for the
    duration of the call; the frames themselves are still written by aioquic
    whenever the limit differs from what was last sent — and the limit is
    raised by :class:`Stream` as the application reads.
    """

    def _write_connection_limits(self, builder: QuicPacketBuilder, space: QuicPacketSpace) -> None:
        limit = self._local_max_data
        used, limit.used = limit.used, 0
        try:
            super()._write_connection_limits(builder, space)
        finally:
            limit.used = used

    def _write_stream_limits(
        self, builder: QuicPacketBuilder, space: QuicPacketSpace, stream: QuicStream
    ) -> None:
        # aioquic calls this for every stream on every packet it builds. With
        # doubling hidden, a frame is due only when Stream._credit moved the
        # limit: skip the rest (a measurable share of the sender's CPU).
        if stream.max_stream_data_local_sent == stream.max_stream_data_local:
            return
        receiver = stream.receiver
        highest, receiver.highest_offset = receiver.highest_offset, 0
        try:
            super()._write_stream_limits(builder, space, stream)
        finally:
            receiver.highest_offset = highest


class _BurstPacer(QuicPacketPacer):
    """aioquic's pacer (RFC 9002 §7.7), allowing bursts of one GSO batch.

    aioquic caps a burst at 16 datagrams, so every 16 datagrams cost one
    timer wake-up and one ``datagrams_to_send`` call. We let a burst be as
    large as one GSO send (what TCP's TSO autosizing does with 64 KiB);
    the average rate is still cwnd / smoothed RTT.
    """

    def __init__(self, *, max_datagram_size: int, burst: int) -> None:
        super().__init__(max_datagram_size=max_datagram_size)
        self._burst = burst

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        super().update_rate(congestion_window, smoothed_rtt)
        size = self._max_datagram_size
        pacing_rate = congestion_window / max(smoothed_rtt, K_MICRO_SECOND)
        self.bucket_max = (
            max(2 * size, min(congestion_window // 4, self._burst * size)) / pacing_rate
        )
        self.bucket_time = min(self.bucket_time, self.bucket_max)


# -- streams -------------------------------------------------------------------------


class Stream(trio.abc.HalfCloseableStream):
    """One bidirectional QUIC stream as a trio stream.

    Peer-opened streams come from :meth:`Connection.accept_stream`. A stream
    we open is invisible to the peer until the first ``send_all`` or
    ``send_eof`` (QUIC streams open implicitly with their first frame).
    """

    def __init__(self, connection: Connection, stream_id: int) -> None:
        self._conn = connection
        self.stream_id = stream_id
        self._rx: deque[bytes] = deque()
        self._rx_buffered = 0
        self._rx_consumed = 0  # bytes handed to the app (or discarded), for credit
        self._rx_eof = False
        self._rx_error: BaseException | None = None
        self._tx_error: BaseException | None = None
        self._tx_eof = False
        self._closed = False
        self._receiving = False
        self._sending = False
        self._rx_lot = trio.lowlevel.ParkingLot()

    def __repr__(self) -> str:
        return f"<Stream {self.stream_id} of {self._conn!r}>"

    # -- trio.abc.SendStream --

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            self._check_send()
            view = memoryview(data).cast("B")
            waited = False
            conn = self._conn
            limit = conn._endpoint.config.stream_send_buffer
            while view:
                space = limit - self._unacked()
                if space <= 0:
                    await conn._send_lot.park()
                    waited = True
                    self._check_send()
                    continue
                chunk, view = view[:space], view[space:]
                conn._quic.send_stream_data(self.stream_id, bytes(chunk), False)
                conn._endpoint._mark_dirty(conn)
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._check_send()
        limit = self._conn._endpoint.config.stream_send_buffer
        while self._unacked() >= limit:
            await self._conn._send_lot.park()
            self._check_send()
        await trio.lowlevel.checkpoint()

    async def wait_unsent_below(self, limit: int) -> None:
        """Wait until fewer than ``limit`` bytes written here are still unsent.

        "Unsent" is what aioquic has not put into a packet yet (new data and
        data queued for retransmission), not what awaits an ACK. For a writer
        that serialises many streams (object serving): aioquic visits every
        stream with unsent data for every packet it builds, so starting the
        next stream just before this one runs dry keeps that loop to about
        one stream, while the congestion window alone bounds what is in
        flight. Raises like ``send_all`` if the stream or connection breaks.
        """
        while self._unsent() >= limit:
            if self._tx_error is not None:
                raise self._tx_error
            self._conn._check_usable()
            await self._conn._send_lot.park()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._tx_eof:
            return
        self._check_send()
        self._tx_eof = True
        self._conn._quic.send_stream_data(self.stream_id, b"", True)
        self._conn._endpoint._mark_dirty(self._conn)

    # -- trio.abc.ReceiveStream --

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            waited = False
            while not self._rx:
                if self._closed:
                    raise ResourceClosed("stream was closed")
                if self._rx_error is not None:
                    raise self._rx_error
                if self._rx_eof:
                    break
                await self._rx_lot.park()
                waited = True
            data = self._take(max_bytes)
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        finally:
            self._receiving = False

    # -- closing --

    async def aclose(self) -> None:
        """Finish our direction (FIN after queued data) and stop reading theirs."""
        if not self._closed:
            self._closed = True
            conn = self._conn
            if conn._usable():
                quic = conn._quic
                # ValueError: aioquic already finished and discarded that side.
                if not self._tx_eof and self._tx_error is None:
                    self._tx_eof = True
                    with contextlib.suppress(ValueError):
                        quic.send_stream_data(self.stream_id, b"", True)
                if not self._rx_eof and self._rx_error is None:
                    with contextlib.suppress(ValueError):
                        quic.stop_stream(self.stream_id, STREAM_ABANDONED)
                conn._endpoint._mark_dirty(conn)
            self._discard_buffer()
            self._rx_lot.unpark_all()
            conn._send_lot.unpark_all()
            conn._maybe_forget(self)
        await trio.lowlevel.checkpoint()

    # -- driver side (synchronous, called by Connection) --

    def _on_data(self, data: bytes, end_stream: bool) -> None:
        if data:
            if self._closed:
                self._credit(len(data))
            else:
                self._rx.append(data)
                self._rx_buffered += len(data)
        if end_stream:
            self._rx_eof = True
        if self._rx_lot:
            self._rx_lot.unpark_all()

    def _on_reset(self, code: int) -> None:
        self._rx_error = StreamReset(f"peer reset stream {self.stream_id} (code {code})", code)
        self._discard_buffer()
        # Bytes the peer counted against MAX_DATA up to the final size but that
        # will never arrive (RFC 9000 §4.5): give them back, or resets would
        # shrink the connection window for good.
        quic_stream = self._conn._quic._streams.get(self.stream_id)
        if quic_stream is not None:
            never_delivered = quic_stream.receiver.highest_offset - self._rx_consumed
            if never_delivered > 0:
                self._credit(never_delivered)
        self._rx_lot.unpark_all()

    def _on_stop_sending(self, code: int) -> None:
        self._tx_error = StreamReset(f"peer stopped stream {self.stream_id} (code {code})", code)
        # RFC 9000 §3.5: aioquic has already answered with RESET_STREAM.
        self._conn._send_lot.unpark_all()

    def _on_connection_lost(self, error: BaseException) -> None:
        if self._rx_error is None and not self._rx_eof:
            self._rx_error = error
        if self._tx_error is None:
            self._tx_error = error
        self._rx_lot.unpark_all()

    # -- internals --

    def _check_send(self) -> None:
        if self._closed:
            raise ResourceClosed("stream was closed")
        if self._tx_error is not None:
            raise self._tx_error
        if self._tx_eof:
            raise ResourceClosed("send_eof() was called on this stream")
        self._conn._check_usable()

    def _unsent(self) -> int:
        quic_stream = self._conn._quic._streams.get(self.stream_id)
        if quic_stream is None:
            return 0
        return sum(len(r) for r in quic_stream.sender._pending)

    def _unacked(self) -> int:
        quic_stream = self._conn._quic._streams.get(self.stream_id)
        if quic_stream is None:
            return 0
        sender = quic_stream.sender
        return sender._buffer_stop - sender._buffer_start

    def _take(self, max_bytes: int | None) -> bytes:
        """Up to ``max_bytes`` (default: what is buffered, capped at NET_READ_COALESCE)."""
        rx = self._rx
        if not rx:
            return b""
        limit = NET_READ_COALESCE if max_bytes is None else max_bytes
        first = rx[0]
        if len(first) >= limit:
            if len(first) == limit or max_bytes is None:
                data = rx.popleft()
            else:
                data, rx[0] = first[:limit], first[limit:]
        else:
            # Coalesce the per-packet pieces so a reader gets a useful amount at once.
            pieces = [rx.popleft()]
            size = len(pieces[0])
            while rx and size + len(rx[0]) <= limit:
                piece = rx.popleft()
                pieces.append(piece)
                size += len(piece)
            if rx and max_bytes is not None and size < limit:
                head = rx[0]
                pieces.append(head[: limit - size])
                rx[0] = head[limit - size :]
            data = b"".join(pieces)
        self._rx_buffered -= len(data)
        self._credit(len(data))
        return data

    def _discard_buffer(self) -> None:
        if self._rx_buffered:
            self._credit(self._rx_buffered)
        self._rx.clear()
        self._rx_buffered = 0

    def _credit(self, count: int) -> None:
        """Application consumed ``count`` bytes: move the receive windows (RFC 9000 §4.2)."""
        self._rx_consumed += count
        conn = self._conn
        conn._rx_consumed += count
        if not conn._usable():
            return
        window = conn._endpoint.config.stream_receive_window
        quic_stream = conn._quic._streams.get(self.stream_id)
        moved = False
        if quic_stream is not None and not quic_stream.receiver.is_finished:
            target = self._rx_consumed + window
            # Update after a quarter window, not per read: fewer MAX_STREAM_DATA frames.
            if target - quic_stream.max_stream_data_local >= window // 4:
                quic_stream.max_stream_data_local = target
                moved = True
        conn_window = conn._endpoint.config.connection_receive_window
        limit = conn._quic._local_max_data
        target = conn._rx_consumed + conn_window
        if target - limit.value >= conn_window // 4:
            limit.value = target
            moved = True
        if moved:
            conn._endpoint._mark_dirty(conn)

    @property
    def _finished(self) -> bool:
        return self._closed and (self._rx_eof or self._rx_error is not None)


# -- connections -------------------------------------------------------------------


class _PeerLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every message with the peer it concerns (never keys)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        peer = self.extra["peer"] if self.extra else "?"
        return f"[{peer}] {msg}", kwargs


class Connection(trio.abc.AsyncResource):
    """One QUIC connection to a peer. Get one from :meth:`Endpoint.connect` or ``accept``."""

    def __init__(
        self,
        endpoint: Endpoint,
        quic: QuicConnection,
        *,
        is_dialer: bool,
        their_node_id: NodeId | None,
        peer_address: Address,
        expected_node_id: NodeId | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._quic = quic
        self.is_dialer = is_dialer
        self.their_node_id = their_node_id
        self._expected_node_id = expected_node_id
        self._peer_address = peer_address  # virtual if the peer is known, else real
        # Whose path table entry routes this connection's datagrams (None: real address).
        self._route_node = expected_node_id if is_dialer else their_node_id
        self._verified = not is_dialer
        self._handshake_done = trio.Event()
        self._established = False
        self._failure: BaseException | None = None  # why it ended, for later calls
        self._closed_by_us = False
        self._gone = False  # aioquic reported ConnectionTerminated
        self._timer_at: float | None = None
        self._cids: set[bytes] = set()
        self._streams: dict[int, Stream] = {}
        self._highest_peer_stream = -1
        self._rx_consumed = 0
        self._send_lot = trio.lowlevel.ParkingLot()
        self._incoming_send, self._incoming_receive = trio.open_memory_channel[Stream](
            endpoint.config.max_incoming_streams
        )
        self._stats = ConnectionStats()
        self._path: PathKind = "none"
        self._remote_address: Address | None = None
        # The real address of the peer's newest authenticated packet (None: relayed only).
        self._source_address: Address | None = None
        self._rx_space: QuicPacketSpace | None = None  # aioquic's 1-RTT packet space
        known = their_node_id or expected_node_id
        who = known.short() if known is not None else peer_address
        self.log = _PeerLog(logger, {"peer": str(who)})

    def __repr__(self) -> str:
        who = self.their_node_id.short() if self.their_node_id else self._peer_address
        role = "dialer" if self.is_dialer else "acceptor"
        return f"<Connection {role} peer={who}>"

    @property
    def path(self) -> PathKind:
        """The path of the last datagram sent: ``"direct"``, ``"relay"`` (``"none"`` before)."""
        return self._path

    @property
    def remote_address(self) -> Address | None:
        """The real UDP address the last datagram went to; None while relayed."""
        return self._remote_address

    @property
    def source_address(self) -> Address | None:
        """The real UDP address the peer sends from, as far as we can trust it.

        The source of the first direct datagram, then of each 1-RTT packet
        that decrypted and had the highest packet number yet (RFC 9000 §9.3's
        rule for a peer address change): an off-path attacker cannot move
        it. None if every datagram came over the relay.
        """
        return self._source_address

    @property
    def stats(self) -> ConnectionStats:
        loss = self._quic._loss
        self._stats.rtt = loss._rtt_smoothed if loss._rtt_initialized else None
        self._stats.congestion_window = loss.congestion_window
        return self._stats

    async def open_stream(self) -> Stream:
        """A new bidirectional stream (the peer sees it at the first send)."""
        await trio.lowlevel.checkpoint()
        self._check_usable()
        stream_id = self._quic.get_next_available_stream_id()
        # Writing nothing creates aioquic's stream state now, so the next call
        # gets the next id; no frame is sent until there is data or a FIN.
        self._quic.send_stream_data(stream_id, b"", False)
        stream = Stream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    async def accept_stream(self) -> Stream:
        """Wait for the next stream the peer opens."""
        self._check_usable()
        try:
            return await self._incoming_receive.receive()
        except trio.EndOfChannel:
            self._check_usable()
            raise ResourceClosed("connection closed") from None

    async def aclose(self, error_code: int = 0, reason: str = "") -> None:
        """Close with an application error code (RFC 9000 §10.2); sends CONNECTION_CLOSE now."""
        if self._usable():
            self._closed_by_us = True
            # frame_type=None makes aioquic send an application CONNECTION_CLOSE (0x1d).
            self._quic.close(error_code=error_code, reason_phrase=reason)
            self._endpoint._service(self, trio.current_time())
            self._shut_down(ResourceClosed("connection was closed"))
        await trio.lowlevel.checkpoint()

    # -- internals --

    def _usable(self) -> bool:
        return not self._closed_by_us and self._failure is None and not self._gone

    def _check_usable(self) -> None:
        if self._closed_by_us:
            raise ResourceClosed("connection was closed")
        if self._failure is not None:
            raise self._failure
        if self._gone:
            raise ConnectionLost("connection ended")

    def _shut_down(self, error: BaseException) -> None:
        """Fail every pending and future operation with ``error``."""
        if self._failure is None:
            self._failure = error
        for stream in list(self._streams.values()):
            stream._on_connection_lost(self._failure)
        self._incoming_send.close()
        self._send_lot.unpark_all()
        self._handshake_done.set()

    def _maybe_forget(self, stream: Stream) -> None:
        if stream._finished:
            self._streams.pop(stream.stream_id, None)

    def _check_identity(self) -> None:
        """Dialer only: the certificate key must be the NodeId we dialed (see tls.py).

        A dial of nobody in particular (:meth:`Endpoint.identify`) takes the key the
        certificate names instead; TLS 1.3's CertificateVerify proves its holder.
        """
        if self._verified:
            return
        tls_context = getattr(self._quic, "tls", None)
        certificate = getattr(tls_context, "_peer_certificate", None)
        if certificate is None:
            return
        self._verified = True
        try:
            if self._expected_node_id is None:
                found = tls.certificate_node_id(certificate)
                if found is None:
                    raise tls.PeerIdentityMismatch(None, "a non-Ed25519 key")
                self.their_node_id = found
            else:
                self.their_node_id = tls.check_peer_certificate(self._expected_node_id, certificate)
        except tls.PeerIdentityMismatch as exc:
            self._quic.close(
                error_code=tls.CRYPTO_ERROR_BAD_CERTIFICATE,
                frame_type=0x06,  # CRYPTO frame: a transport-level close (RFC 9000 §19.19)
                reason_phrase="certificate is not the expected NodeId",
            )
            self._shut_down(exc)

    def _process_events(self) -> None:
        quic = self._quic
        endpoint = self._endpoint
        while (event := quic.next_event()) is not None:
            if isinstance(event, events.StreamDataReceived):
                self._on_stream_data(event)
            elif isinstance(event, events.ConnectionIdIssued):
                self._cids.add(event.connection_id)
                endpoint._by_cid[event.connection_id] = self
            elif isinstance(event, events.ConnectionIdRetired):
                self._cids.discard(event.connection_id)
                if endpoint._by_cid.get(event.connection_id) is self:
                    del endpoint._by_cid[event.connection_id]
            elif isinstance(event, events.HandshakeCompleted):
                self._on_handshake_completed()
            elif isinstance(event, events.StreamReset):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_reset(event.error_code)
                    self._maybe_forget(stream)
            elif isinstance(event, events.StopSendingReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._on_stop_sending(event.error_code)
            elif isinstance(event, events.ConnectionTerminated):
                self._on_terminated(event)

    def _on_handshake_completed(self) -> None:
        if self._failure is not None:
            return
        if self.is_dialer:
            self._check_identity()
            if self.their_node_id is None and self._failure is None:
                self._quic.close(
                    error_code=tls.CRYPTO_ERROR_BAD_CERTIFICATE,
                    frame_type=0x06,
                    reason_phrase="no certificate",
                )
                self._shut_down(ConnectFailed("peer sent no certificate"))
                return
            self._established = True
            self._handshake_done.set()
            self.log.debug("connected")
            return
        self._established = True
        try:
            self._endpoint._incoming_send.send_nowait(self)
        except trio.WouldBlock:
            self._endpoint.stats.refused_connections += 1
            self.log.warning("accept backlog full; refusing connection")
            self._quic.close(
                error_code=QuicErrorCode.CONNECTION_REFUSED,
                frame_type=0,
                reason_phrase="busy",
            )
            self._shut_down(ConnectionLost("refused: accept backlog full"))
        else:
            self.log.debug("accepted")

    def _on_stream_data(self, event: events.StreamDataReceived) -> None:
        stream_id = event.stream_id
        stream = self._streams.get(stream_id)
        if stream is None:
            peer_initiated = bool(stream_id & 1) == self.is_dialer
            if not peer_initiated or stream_id <= self._highest_peer_stream or stream_id & 2:
                # A stream we already forgot (closed by the app), or a
                # unidirectional one we never allow: discard, keep credit flowing.
                stream = Stream(self, stream_id)
                stream._closed = True
                stream._on_data(event.data, event.end_stream)
                return
            self._highest_peer_stream = stream_id
            stream = Stream(self, stream_id)
            self._streams[stream_id] = stream
            try:
                self._incoming_send.send_nowait(stream)
            except (trio.WouldBlock, trio.ClosedResourceError):
                # Queue full: refuse the stream (RFC 9000 §3.5), keep credit flowing.
                stream._closed = True
                with contextlib.suppress(ValueError):
                    self._quic.stop_stream(stream_id, STREAM_ABANDONED)
                    self._quic.reset_stream(stream_id, STREAM_ABANDONED)
        stream._on_data(event.data, event.end_stream)
        self._maybe_forget(stream)

    def _on_terminated(self, event: events.ConnectionTerminated) -> None:
        self._gone = True
        endpoint = self._endpoint
        endpoint._forget(self)
        if self._closed_by_us:
            return
        reason = event.reason_phrase or "no reason given"
        if not self._established:
            error: ConnectionLost = ConnectFailed(
                f"handshake failed: {reason} (code {event.error_code:#x})",
                event.error_code,
                event.reason_phrase,
            )
        else:
            error = ConnectionLost(
                f"connection lost: {reason} (code {event.error_code:#x})",
                event.error_code,
                event.reason_phrase,
            )
        self.log.debug("terminated: %s", error)
        self._shut_down(error)


# -- the endpoint -------------------------------------------------------------------


class Endpoint:
    """One UDP socket, many QUIC connections. Create with :func:`open_endpoint`."""

    def __init__(self, identity: Identity, config: EndpointConfig, sock: socket.socket) -> None:
        self.config = config
        self.node_id = identity.node_id
        self.stats = EndpointStats()
        self.paths = PathTable(
            rng=random.Random(os.urandom(16)), hole_punching=config.hole_punching
        )
        self.disco = Disco(identity, os.urandom)
        # Hole punching, keep-alives, the hard-NAT search: see traversal.py.
        self.traversal = PathDriver(self)
        self.observed_address: Address | None = None  # our address as a peer saw it
        self._sock = sock
        limits: dict[str, Any] = {
            "alpn": config.alpn,
            "max_datagram_size": config.max_datagram_size,
            "idle_timeout": config.idle_timeout,
            "max_data": config.connection_receive_window,
            "max_stream_data": config.stream_receive_window,
        }
        self._server_config = tls.server_configuration(identity, **limits)
        self._client_config = tls.client_configuration(**limits)
        self._by_cid: dict[bytes, Connection] = {}
        self._connections: set[Connection] = set()
        self._dirty: dict[Connection, None] = {}
        self._timers: list[tuple[float, int, Connection]] = []
        self._timer_seq = itertools.count()
        self._wait_scope: trio.CancelScope | None = None
        self._kicked = False
        self._closed = False
        self._backlog: deque[tuple[bytes, Address, int]] = deque()
        self._incoming_send, self._incoming_receive = trio.open_memory_channel[Connection](
            config.accept_backlog
        )
        self._pong_lot = trio.lowlevel.ParkingLot()
        self._stun_handler: StunHandler | None = None
        self._relay_send: RelaySend | None = None
        self._relay_datagram_size: Callable[[], int] | None = None
        self._relay_fast_path: RelayFastPath | None = None
        self._relay_node_id: NodeId | None = None
        self._relay_conn: Connection | None = None  # our QUIC connection to the relay server
        self._relay_datagram_handler: RelayDatagramHandler | None = None
        self._peer_address_handler: Callable[[Connection, Address], None] | None = None
        # Fast-path datagrams of the current socket read, handed on after it.
        self._rx_from_relay: list[tuple[NodeId, bytes]] = []
        self._rx_to_relay: list[tuple[bytes, Address]] = []
        self._node_ids = NodeIdCache(RELAY_NODE_ID_CACHE)
        self.stats.gso = config.use_gso and _gso_supported(sock)
        self.stats.gro = config.use_gro and _enable_gro(sock)

    @property
    def local_address(self) -> Address:
        host, port = self._sock.getsockname()[:2]
        return (str(host), int(port))

    def set_stun_handler(self, handler: StunHandler | None) -> None:
        """Route STUN datagrams (RFC 8489 §5 demultiplexing) to ``handler(data, source)``."""
        self._stun_handler = handler

    def send_datagram(self, data: bytes, address: Address) -> None:
        """Send one raw datagram from the node socket (for STUN and friends)."""
        self._check_open()
        self._send_run([data], address, len(data))

    def set_relay(
        self,
        send: RelaySend | None,
        *,
        relay_node_id: NodeId | None = None,
        datagram_size: Callable[[], int] | None = None,
        fast_path: RelayFastPath | None = None,
    ) -> None:
        """Use ``send(dst, payload) -> bool`` as the relay path (None: no relay).

        ``send`` must not block: it queues the datagram (bounded) and returns
        False, or raises, when it cannot (queue full, relay down); the datagram
        is then dropped and counted and QUIC retransmits. ``relay_node_id``
        is the relay server's NodeId: its own connection is never routed
        through the relay. ``datagram_size()`` is the largest datagram the
        relay path takes now (the relay's frame limit); established
        connections build their packets up to that size while relayed
        (module docstring). ``fast_path()`` is True while the relay granted
        the UDP fast path: relayed datagrams that fit then go straight to
        :attr:`relay_address` from our socket (module docstring). Fast-path
        datagrams *from* the relay are taken whenever a ``relay_node_id`` is
        set, from :attr:`relay_address` only. Takes effect from the next datagram.
        """
        self._relay_send = send
        self._relay_datagram_size = datagram_size if send is not None else None
        self._relay_fast_path = fast_path if send is not None else None
        self._relay_node_id = relay_node_id if send is not None else None
        self._relay_conn = None
        self.paths.set_relay(send is not None, relay_node_id)

    @property
    def relay_address(self) -> Address | None:
        """The relay server's UDP address: the source of its newest authenticated packet.

        That of our live QUIC connection to the ``relay_node_id`` given to
        :meth:`set_relay`; None without one. The one address fast-path
        datagrams go to and are taken from.
        """
        relay_node_id = self._relay_node_id
        if relay_node_id is None:
            return None
        conn = self._relay_conn
        if conn is None or not conn._usable() or conn._route_node != relay_node_id:
            conn = self._relay_conn = next(
                (
                    c
                    for c in self._connections
                    if c.is_dialer and c._route_node == relay_node_id and c._usable()
                ),
                None,
            )
        return conn._source_address if conn is not None else None

    def _fast_path_to(self) -> Address | None:
        """Where fast-path datagrams go now (None: the relay stream, or no relay)."""
        fast_path = self._relay_fast_path
        if fast_path is None or not fast_path():
            return None
        return self.relay_address

    def set_relay_datagram_handler(self, handler: RelayDatagramHandler | None) -> None:
        """relayd: hand every DATAGRAM_TO_RELAY to ``handler``, one list per socket read.

        The handler runs in the driver (synchronous, must not block); what it
        sends with :meth:`send_datagrams` goes out at once, batched.
        """
        self._relay_datagram_handler = handler

    def set_peer_address_handler(
        self, handler: Callable[[Connection, Address], None] | None
    ) -> None:
        """Call ``handler(conn, address)`` when :attr:`Connection.source_address` moves.

        Not for its first value (the connection's first datagram), only for
        changes: a peer's NAT rebinding, or a client that moved.
        """
        self._peer_address_handler = handler

    def send_datagrams(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        """Send raw datagrams ``(data, address)`` from our socket, in order, batched.

        Runs of one address and one size (the last may be shorter) go out as
        one GSO ``sendmsg`` where the kernel has it, as QUIC's own output does.
        """
        self._check_open()
        self._send_batched(datagrams)

    def receive_relayed(self, src: NodeId, payload: bytes) -> None:
        """A datagram ``payload`` from peer ``src`` arrived over the relay (a batch of one)."""
        self.receive_relayed_batch(((src, payload),))

    def receive_relayed_batch(self, batch: Iterable[tuple[NodeId, bytes]]) -> None:
        """Datagrams that arrived over the relay, ``(src, payload)`` each, in arrival order.

        Call from the relay client's receive task (synchronous, never
        blocks) with everything one read of the relay stream produced. Each
        ``payload`` is what ``src`` would have sent in one UDP datagram: it
        is demultiplexed and fed as in the module docstring. Only after the
        whole batch are the touched connections' events handed to their
        streams and the driver kicked, once: as for a socket read, one ACK
        and one transmit per batch, not per datagram.
        """
        if self._closed:
            return
        touched = self._feed_relayed(batch, trio.current_time())
        for conn in touched:
            if conn._gone:
                continue
            # We run outside the driver: hand the events to the streams now, so no
            # application task sees aioquic's state ahead of ours (e.g. a stream
            # aioquic reset on STOP_SENDING that our Stream still thinks is open).
            # Transmitting stays with the driver, batched as for socket reads.
            try:
                conn._process_events()
            except Exception as exc:  # an aioquic bug must not take the endpoint down
                self._abandon(conn, exc)
                continue
            self._mark_dirty(conn)

    def _feed_relayed(
        self, batch: Iterable[tuple[NodeId, bytes]], now: float
    ) -> dict[Connection, None]:
        """Demultiplex and feed relayed datagrams; return the connections they touched."""
        stats = self.stats
        paths = self.paths
        touched: dict[Connection, None] = {}
        for src, payload in batch:
            stats.relay_datagrams_received += 1
            stats.relay_bytes_received += len(payload)
            if not payload or src == self.node_id:
                stats.dropped_malformed += 1
                continue
            paths.relay_received(src, now)
            first = payload[0]
            if first & 0x40 or (first & 0xC0 == 0x80 and not is_disco(payload)):
                conn = self._quic_received(payload, None, now, relayed_from=src)
                if conn is not None:
                    touched[conn] = None
            elif is_disco(payload):
                self._disco_received(payload, paths.virtual_address(src), now, relayed_from=src)
            else:  # STUN is between a node and a relay, never relayed end to end
                stats.dropped_malformed += 1
        return touched

    def add_candidate(
        self,
        node_id: NodeId,
        address: Address,
        origin: Origin = Origin.OTHER,
        *,
        reflexive: bool = False,
    ) -> None:
        """Learn a possible direct address of ``node_id`` (mDNS, relay lookup, ...).

        With a relay set, it is probed with disco PINGs (hole punching, see
        paths.py); the first PONG moves the peer's datagrams from the relay
        to it. ``reflexive``: it is the peer's public address (as the relay saw it).
        """
        self._check_open()
        self.traversal.add_candidate(node_id, _normalize(address), origin, reflexive=reflexive)

    async def connect(self, node_id: NodeId, address: Address | None = None) -> Connection:
        """Dial ``node_id`` at ``address``: disco PING first, then QUIC; verify its certificate.

        With ``address=None`` the handshake goes over the relay at once
        (:meth:`set_relay`). With an address and a relay, a dial whose pings
        get no pong within ``disco_pong_wait`` goes over the relay too (the
        path table decides per datagram); without a relay it tries the
        address anyway.

        Raises :class:`p2psync.net.tls.PeerIdentityMismatch` if another node answers,
        :class:`ConnectFailed` if the handshake fails or times out (idle
        timeout) or there is no address and no relay,
        :class:`TooManyConnections` at the connection limit.
        Cancel it with a cancel scope for a shorter deadline.
        """
        self._check_open()
        if node_id == self.node_id:
            raise errors.LocalProtocolError("cannot connect to ourselves")
        if len(self._connections) >= self.config.max_connections:
            raise TooManyConnections(
                f"already {len(self._connections)} connections; close some first"
            )
        if address is None:
            if self._relay_send is None:
                raise ConnectFailed(
                    f"no address for {node_id.short()} and no relay to reach it through; "
                    "give an address or configure a relay"
                )
            self.paths.add_peer(node_id)
        else:
            address = _normalize(address)
            self.paths.add_candidate(node_id, address, trio.current_time(), Origin.DIALED)
            await self._probe(node_id, address)
        self._check_open()

        quic = self._new_quic(self._client_config)
        virtual = self.paths.virtual_address(node_id)
        conn = Connection(
            self,
            quic,
            is_dialer=True,
            their_node_id=None,
            peer_address=virtual,
            expected_node_id=node_id,
        )
        now = trio.current_time()
        quic.connect(virtual, now=now)
        self._register(conn, [quic.host_cid])
        self._service(conn, now)
        try:
            await conn._handshake_done.wait()
        except BaseException:
            if conn._usable():
                conn._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="cancelled")
                conn._closed_by_us = True
                self._service(conn, trio.current_time())
                conn._shut_down(ResourceClosed("connect was cancelled"))
            raise
        if conn._failure is not None:
            raise conn._failure
        return conn

    async def identify(self, address: Address) -> NodeId:
        """The NodeId of whoever answers QUIC at ``address`` (trust on first use).

        A full handshake (the peer proves it holds the key its certificate
        names), then the connection is closed at once. For configuration that
        names a relay by ``HOST:PORT`` only: the caller pins what this returns
        and dials that NodeId from then on (:mod:`p2psync.known_relays`). No
        disco ping goes first (a ping is sealed to a key we do not know yet).

        Raises :class:`ConnectFailed` when nobody completes a handshake (cancel
        it with a cancel scope for a deadline) and
        :class:`p2psync.net.tls.PeerIdentityMismatch` for a certificate that
        names no Ed25519 key, or ours.
        """
        self._check_open()
        if len(self._connections) >= self.config.max_connections:
            raise TooManyConnections(
                f"already {len(self._connections)} connections; close some first"
            )
        address = _normalize(address)
        quic = self._new_quic(self._client_config)
        conn = Connection(self, quic, is_dialer=True, their_node_id=None, peer_address=address)
        now = trio.current_time()
        quic.connect(address, now=now)
        self._register(conn, [quic.host_cid])
        self._service(conn, now)
        try:
            await conn._handshake_done.wait()
            if conn._failure is not None:
                raise conn._failure
            found = conn.their_node_id
            assert found is not None  # _on_handshake_completed refuses a connection without
            if found == self.node_id:
                raise tls.PeerIdentityMismatch(None, "our own NodeId")
            return found
        finally:
            if conn._usable():  # no await here: the close goes out even when cancelled
                conn._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="identified")
                conn._closed_by_us = True
                self._service(conn, trio.current_time())
                conn._shut_down(ResourceClosed("identified: closed"))

    async def accept(self) -> Connection:
        """Wait for the next connection a peer completes a handshake on."""
        self._check_open()
        try:
            return await self._incoming_receive.receive()
        except trio.EndOfChannel:
            raise ResourceClosed("endpoint closed") from None

    # -- disco ---------------------------------------------------------------

    async def _probe(self, node_id: NodeId, address: Address) -> bool:
        """Ping ``address`` until a pong validates it (bounded); True if it did."""
        config = self.config
        if self._validated(node_id, address):
            self._send_ping(node_id, address)  # refresh the peer's mapping; don't wait
            return True
        with trio.move_on_after(config.disco_pong_wait):
            for _ in range(max(1, config.disco_ping_attempts)):
                self._send_ping(node_id, address)
                with trio.move_on_after(config.disco_ping_interval):
                    while not self._validated(node_id, address):
                        await self._pong_lot.park()
                if self._validated(node_id, address):
                    return True
            while not self._validated(node_id, address):
                await self._pong_lot.park()
            return True
        logger.debug("no disco pong from %s at %s; trying QUIC anyway", node_id.short(), address)
        return False

    def _validated(self, node_id: NodeId, address: Address) -> bool:
        now = trio.current_time()
        return any(
            p.address == address and p.state is PathState.VALIDATED
            for p in self.paths.paths(node_id, now)
        )

    def _send_ping(self, node_id: NodeId, address: Address) -> None:
        tx_id = self.disco.new_tx_id()
        self.paths.ping_sent(node_id, address, tx_id, trio.current_time())
        self._send_run([self.disco.seal_ping(node_id, tx_id)], address, 0)

    def _send_pings_due(self, node_id: NodeId, now: float) -> None:
        """Datagrams went to ``node_id``: its heartbeat / hole punching (traversal.py)."""
        self.traversal.traffic(node_id, now)

    def _disco_received(
        self, data: bytes, source: Address, now: float, relayed_from: NodeId | None = None
    ) -> None:
        """One disco datagram; ``relayed_from``: it came over the relay from that peer."""
        self.stats.disco_received += 1
        self.traversal.disco_received(data, source, now, relayed_from)

    # -- the driver ----------------------------------------------------------

    async def _run(self) -> None:
        """The one task that reads, feeds, fires timers and transmits."""
        sock = self._sock
        while True:
            now = trio.current_time()
            self._fire_timers(now)
            self._flush(now)
            if self._backlog:
                await self._drain_backlog()
                continue
            if self._kicked:
                self._kicked = False
                await trio.lowlevel.checkpoint()
            else:
                deadline = self._timers[0][0] if self._timers else math.inf
                with trio.CancelScope(deadline=deadline) as scope:
                    self._wait_scope = scope
                    await trio.lowlevel.wait_readable(sock)
                self._wait_scope = None
                self._kicked = False
            self._receive_ready()

    def _kick(self) -> None:
        self._kicked = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()
            self._wait_scope = None

    def _mark_dirty(self, conn: Connection) -> None:
        if conn not in self._dirty:
            self._dirty[conn] = None
            self._kick()

    def _receive_ready(self) -> None:
        sock = self._sock
        now = trio.current_time()
        stats = self.stats
        stats.receive_batches += 1
        gro = stats.gro
        for _ in range(self.config.recv_batch):
            try:
                if gro:
                    data, ancillary, _, source = sock.recvmsg(65535, _GRO_CMSG_SPACE)
                else:
                    data, source = sock.recvfrom(65535)
                    ancillary = []
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP error
                logger.debug("recvfrom: %s", exc)
                continue
            stats.recv_calls += 1
            segment = 0
            for level, kind, value in ancillary:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                    segment = int.from_bytes(value[:4], sys.byteorder)
            if 0 < segment < len(data):
                # GRO: the kernel glued equal-size datagrams from one source.
                for offset in range(0, len(data), segment):
                    self._datagram_received(data[offset : offset + segment], source, now)
            else:
                self._datagram_received(data, source, now)
        self._deliver_relay_datagrams(now)

    def _deliver_relay_datagrams(self, now: float) -> None:
        """Hand on the fast-path datagrams of one read, all at once (driver only)."""
        if self._rx_from_relay:
            batch, self._rx_from_relay = self._rx_from_relay, []
            # As over the relay stream; the driver services what they touched next.
            for conn in self._feed_relayed(batch, now):
                self._dirty[conn] = None
        if self._rx_to_relay:
            routed, self._rx_to_relay = self._rx_to_relay, []
            handler = self._relay_datagram_handler
            if handler is not None:
                self.stats.relay_datagrams_routed += len(routed)
                try:
                    handler(routed)
                except Exception:
                    logger.exception("relay datagram handler failed")

    def _relay_datagram_received(self, data: bytes, source: Any) -> None:
        """One fast-path datagram (``DATAGRAM_PREFIX``): keep it for this read's batch."""
        stats = self.stats
        kind = data[5] if len(data) > 5 else -1
        if kind == _FROM_RELAY_KIND:
            relay_address = self.relay_address
            if relay_address is None or _normalize(source) != relay_address:
                stats.relay_fast_dropped_source += 1  # only our relay speaks for other nodes
                return
            try:
                message = decode_datagram_from_relay_untrusted(data, self._node_ids)
            except BadFrame:
                stats.relay_fast_dropped_malformed += 1
                return
            stats.relay_fast_datagrams_received += 1
            stats.relay_fast_bytes_received += len(message.payload)
            self._rx_from_relay.append((message.src, message.payload))
        elif kind == _TO_RELAY_KIND and self._relay_datagram_handler is not None:
            self._rx_to_relay.append((data, _normalize(source)))
        else:
            stats.relay_fast_dropped_source += 1  # not a direction we take

    def _datagram_received(self, data: bytes, source: Any, now: float) -> None:
        """Demultiplex one datagram by its first byte (rule in disco.py's docstring)."""
        self.stats.datagrams_received += 1
        if not data:
            self.stats.dropped_malformed += 1
            return
        first = data[0]
        if first & 0x40:  # QUIC Fixed Bit (RFC 9000 §17)
            conn = self._quic_received(data, source, now)
            if conn is not None:
                self._dirty[conn] = None
        elif first & 0xC0 == 0:
            self._stun_received(data, source)
        elif is_disco(data):
            self._disco_received(data, _normalize(source), now)
        elif data[:5] == DATAGRAM_PREFIX:  # the relay's UDP fast path (proto/relay.py)
            self._relay_datagram_received(data, source)
        else:  # Version Negotiation has an arbitrary Fixed Bit (RFC 9000 §17.2.1)
            conn = self._quic_received(data, source, now)
            if conn is not None:
                self._dirty[conn] = None

    def _quic_received(
        self, data: bytes, source: Any, now: float, relayed_from: NodeId | None = None
    ) -> Connection | None:
        """Feed one QUIC datagram; ``source`` is ignored when ``relayed_from`` is set."""
        conn = None
        if not data[0] & 0x80:
            # Short header (RFC 9000 §17.3.1): our fixed-length DCID follows the first byte.
            conn = self._by_cid.get(data[1 : 1 + _CID_LENGTH])
        if conn is None:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=_CID_LENGTH)
            except ValueError:
                self.stats.dropped_malformed += 1
                return None
            conn = self._by_cid.get(header.destination_cid)
        if conn is None:
            if (
                header.packet_type == QuicPacketType.INITIAL
                and len(data) >= _MIN_INITIAL_SIZE
                and header.version in self._server_config.supported_versions
                and not self._closed
            ):
                conn = self._new_incoming(header.destination_cid, source, now, relayed_from)
            if conn is None:
                self.stats.dropped_unknown_connection += 1
                return None
        elif relayed_from is not None and conn._route_node != relayed_from:
            # Over the relay, only the connection's own peer may feed it (and a
            # connection to an unmapped real address has no virtual one to feed).
            self.stats.dropped_unknown_connection += 1
            return None
        stats = conn._stats
        stats.bytes_received += len(data)
        stats.datagrams_received += 1
        # Known peers are always fed under their virtual address: path choice
        # belongs to the path table, QUIC never sees addresses move.
        address = conn._peer_address if conn._route_node is not None else _normalize(source)
        space = conn._rx_space
        newest = space.largest_received_packet if space is not None else -1
        try:
            conn._quic.receive_datagram(data, address, now)
        except Exception as exc:  # an aioquic bug must not take the endpoint down
            self._abandon(conn, exc)
            return None
        if relayed_from is None:
            if space is None:
                space = conn._rx_space = conn._quic._spaces.get(Epoch.ONE_RTT)
            if conn._source_address is None:
                conn._source_address = _normalize(source)
            elif space is not None and space.largest_received_packet > newest:
                # A 1-RTT packet decrypted with the highest number yet: if it came
                # from elsewhere, the peer moved (RFC 9000 §9.3).
                real = _normalize(source)
                if real != conn._source_address:
                    self._peer_moved(conn, real)
        if not conn._verified:
            conn._check_identity()
        return conn

    def _peer_moved(self, conn: Connection, address: Address) -> None:
        conn.log.debug("peer address moved from %s to %s", conn._source_address, address)
        conn._source_address = address
        handler = self._peer_address_handler
        if handler is not None:
            try:
                handler(conn, address)
            except Exception:
                logger.exception("peer address handler failed")

    def _new_incoming(
        self, original_dcid: bytes, source: Any, now: float, relayed_from: NodeId | None
    ) -> Connection | None:
        if len(self._connections) >= self.config.max_connections:
            self.stats.refused_connections += 1
            logger.debug("connection limit reached; ignoring Initial from %s", source)
            return None
        if relayed_from is not None:
            their_node_id: NodeId | None = relayed_from
            peer_address = self.paths.virtual_address(relayed_from)
        else:
            source = _normalize(source)
            their_node_id = self.paths.node_for_source(source, now)
            peer_address = (
                self.paths.virtual_address(their_node_id) if their_node_id is not None else source
            )
        quic = self._new_quic(self._server_config, original_dcid)
        conn = Connection(
            self, quic, is_dialer=False, their_node_id=their_node_id, peer_address=peer_address
        )
        self._register(conn, [original_dcid, quic.host_cid])
        return conn

    def _new_quic(
        self, configuration: QuicConfiguration, original_dcid: bytes | None = None
    ) -> QuicConnection:
        quic = _GatedQuicConnection(
            configuration=configuration, original_destination_connection_id=original_dcid
        )
        # Peer-opened streams: bidirectional up to the accept queue, no unidirectional.
        # Set before the transport parameters are first sent.
        quic._local_max_streams_bidi.value = quic._local_max_streams_bidi.sent = (
            self.config.max_incoming_streams
        )
        quic._local_max_streams_uni.value = quic._local_max_streams_uni.sent = 0
        size = self.config.max_datagram_size
        quic._loss._pacer = _BurstPacer(
            max_datagram_size=size, burst=min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // size)
        )
        return quic

    def _register(self, conn: Connection, cids: list[bytes]) -> None:
        self._connections.add(conn)
        for cid in cids:
            conn._cids.add(cid)
            self._by_cid[cid] = conn

    def _abandon(self, conn: Connection, exc: Exception) -> None:
        """Drop a connection whose QUIC state raised: log it, fail its users, move on."""
        conn.log.error("QUIC state machine failed; dropping the connection", exc_info=exc)
        conn._gone = True
        self._forget(conn)
        conn._shut_down(ConnectionLost(f"internal error: {exc!r}"))

    def _forget(self, conn: Connection) -> None:
        self._connections.discard(conn)
        for cid in conn._cids:
            if self._by_cid.get(cid) is conn:
                del self._by_cid[cid]
        conn._cids.clear()
        conn._timer_at = None

    def _stun_received(self, data: bytes, source: Any) -> None:
        # RFC 8489 messages (magic cookie) and classic RFC 3489 Binding
        # requests (no cookie: Debian's stun-client, pystun3) reach the handler;
        # relayd answers both, a node's probe ignores what it did not ask for.
        if not is_stun(data):
            self.stats.dropped_malformed += 1
            return
        self.stats.stun_received += 1
        handler = self._stun_handler
        if handler is not None:
            try:
                handler(data, _normalize(source))
            except Exception:
                logger.exception("STUN handler failed")

    def _fire_timers(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, conn = heapq.heappop(timers)
            if conn._timer_at != when:
                continue  # stale entry: the timer moved since
            conn._timer_at = None
            try:
                conn._quic.handle_timer(now)
            except Exception as exc:
                self._abandon(conn, exc)
                continue
            self._dirty[conn] = None

    def _compact_timers(self) -> None:
        """Drop stale heap entries (timers that moved): keeps the heap O(connections)."""
        self._timers = [
            entry for entry in self._timers if entry[2]._timer_at == entry[0] and not entry[2]._gone
        ]
        heapq.heapify(self._timers)

    def _flush(self, now: float) -> None:
        if self._rx_from_relay or self._rx_to_relay:  # fed outside _receive_ready (port fans)
            self._deliver_relay_datagrams(now)
        while self._dirty:
            conns = list(self._dirty)
            self._dirty.clear()
            for conn in conns:
                self._service(conn, now)

    def _service(self, conn: Connection, now: float) -> None:
        """Drain events, transmit, re-arm the timer: everything after new input."""
        self._dirty.pop(conn, None)
        try:
            conn._process_events()
            if not conn._gone:
                self._transmit(conn, now)
                conn._process_events()  # CIDs issued and closes decided while sending
        except Exception as exc:  # an aioquic bug must not take the endpoint down
            self._abandon(conn, exc)
        if not conn._gone:
            timer_at = conn._quic.get_timer()
            if timer_at != conn._timer_at:
                conn._timer_at = timer_at
                if timer_at is not None:
                    heapq.heappush(self._timers, (timer_at, next(self._timer_seq), conn))
                    if len(self._timers) > 64 + 4 * len(self._connections):
                        self._compact_timers()
                    # Serviced outside the driver (connect, aclose): pull its wake-up in.
                    scope = self._wait_scope
                    if scope is not None and timer_at < scope.deadline:
                        scope.deadline = timer_at
        if conn._send_lot:
            conn._send_lot.unpark_all()

    def _fit_datagram_size(self, conn: Connection, now: float) -> None:
        """Size ``conn``'s next packets for the path they will take (module docstring)."""
        quic = conn._quic
        size = self.config.max_datagram_size
        node_id = conn._route_node
        if (
            self._relay_send is not None
            and node_id is not None
            and self.paths.route(node_id, now) is RELAY
        ):
            relay_size = self._relay_datagram_size
            if self._fast_path_to() is not None:
                # Every packet one fast-path datagram (module docstring).
                size -= DATAGRAM_OVERHEAD
            elif relay_size is not None and quic._handshake_confirmed:
                size = max(size, min(relay_size(), MAX_RELAYED_DATAGRAM_SIZE))
        if quic._max_datagram_size != size:
            quic._max_datagram_size = size
            quic._loss._pacer._max_datagram_size = size

    def _transmit(self, conn: Connection, now: float) -> None:
        self._fit_datagram_size(conn, now)
        datagrams = conn._quic.datagrams_to_send(now)
        if not datagrams:
            return
        stats = conn._stats
        outgoing: list[tuple[bytes, Address]] = []
        resolved: dict[Any, tuple[NodeId | None, Route | None]] = {}
        fast_to: Address | None = None
        fast_headers: dict[NodeId, bytes] = {}
        fast_limit = self.config.max_datagram_size - DATAGRAM_OVERHEAD
        for data, address in datagrams:
            stats.bytes_sent += len(data)
            stats.datagrams_sent += 1
            if address in resolved:
                node_id, route = resolved[address]
            else:
                node_id, route = resolved[address] = self._resolve(conn, address, now)
                if route is RELAY:
                    fast_to = self._fast_path_to()
            if route is None:
                self.stats.dropped_no_path += 1
                continue
            if route is RELAY:
                conn._path, conn._remote_address = "relay", None
                if node_id is None:
                    continue
                if fast_to is not None and len(data) <= fast_limit:
                    # The UDP fast path: batched with the rest of this output.
                    header = fast_headers.get(node_id)
                    if header is None:
                        header = fast_headers[node_id] = DATAGRAM_TO_RELAY + node_id.raw
                    outgoing.append((header + data, fast_to))
                    self._count_fast_sent(node_id, len(data))
                else:
                    self._send_relayed(node_id, data)
                continue
            conn._path, conn._remote_address = "direct", route
            outgoing.append((data, route))
        if outgoing:
            self._send_batched(outgoing)
        for node_id, _ in resolved.values():
            if node_id is not None:
                self._send_pings_due(node_id, now)  # keep-alive / re-probe (relay set only)

    def _count_fast_sent(self, node_id: NodeId, size: int) -> None:
        stats = self.stats
        stats.relay_fast_datagrams_sent += 1
        stats.relay_fast_bytes_sent += size
        stats.relay_datagrams_sent += 1
        stats.relay_bytes_sent += size
        self.paths.relay_sent(node_id, size)

    def _send_batched(self, datagrams: Iterable[tuple[bytes, Address]]) -> None:
        """Send ``(data, address)`` in order: GSO runs of one address and one size."""
        run: list[bytes] = []
        run_to: Address | None = None
        segment = 0
        max_segments = 0
        for data, address in datagrams:
            # A GSO run: same destination, equal sizes, only the last may be shorter.
            if (
                run
                and address == run_to
                and len(run) < max_segments
                and len(run[-1]) == segment
                and len(data) <= segment
            ):
                run.append(data)
                continue
            if run and run_to is not None:
                self._send_run(run, run_to, segment)
            run, run_to, segment = [data], address, len(data)
            max_segments = min(_GSO_MAX_SEGMENTS, _GSO_MAX_BYTES // max(segment, 1))
        if run and run_to is not None:
            self._send_run(run, run_to, segment)

    def _resolve(
        self, conn: Connection, address: Any, now: float
    ) -> tuple[NodeId | None, Route | None]:
        """(peer, route) for a datagram QUIC addressed to ``address``."""
        if conn._route_node is not None and address == conn._peer_address:
            node_id: NodeId | None = conn._route_node
            if self.config.follow_peer_address and conn._source_address is not None:
                return node_id, conn._source_address
        else:
            node_id = self.paths.node_for_virtual(address)
        if node_id is None:
            return None, _normalize(address)
        return node_id, self.paths.route(node_id, now)

    def _send_relayed(self, node_id: NodeId, data: bytes) -> bool:
        """Hand one datagram for ``node_id`` to the relay hook; count what happened."""
        stats = self.stats
        send = self._relay_send
        taken = False
        if send is not None:
            try:
                taken = send(node_id, data)
            except Exception as exc:  # e.g. the relay client is not connected
                logger.debug("relay refused a datagram for %s: %r", node_id.short(), exc)
        if taken:
            stats.relay_datagrams_sent += 1
            stats.relay_bytes_sent += len(data)
            self.paths.relay_sent(node_id, len(data))
        else:
            stats.relay_dropped += 1
        return taken

    def _send_run(self, run: list[bytes], address: Address, segment: int) -> None:
        """Send datagrams to one address: one GSO sendmsg if possible, else sendto each."""
        if self._backlog:
            self._queue_backlog(run, address, segment)
            return
        sock = self._sock
        stats = self.stats
        if len(run) > 1 and stats.gso:
            try:
                sock.sendmsg(
                    [b"".join(run)],
                    [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment))],
                    0,
                    address,
                )
                stats.send_calls += 1
                stats.datagrams_sent += len(run)
                return
            except BlockingIOError:
                self._queue_backlog(run, address, segment)
                return
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    logger.info("UDP GSO refused by the kernel (%s); using sendto", exc)
                    stats.gso = False
                else:
                    stats.dropped_send_errors += len(run)
                    logger.debug("sendmsg to %s: %s", address, exc)
                    return
        for index, data in enumerate(run):
            try:
                sock.sendto(data, address)
                stats.send_calls += 1
                stats.datagrams_sent += 1
            except BlockingIOError:
                self._queue_backlog(run[index:], address, 0)
                return
            except OSError as exc:
                stats.dropped_send_errors += 1
                logger.debug("sendto %s: %s", address, exc)

    def _queue_backlog(self, run: list[bytes], address: Address, segment: int) -> None:
        for data in run:
            if len(self._backlog) >= NET_SEND_BACKLOG:
                self.stats.dropped_send_errors += 1
                continue
            self._backlog.append((data, address, segment))
        self._kick()

    async def _drain_backlog(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)
        backlog = self._backlog
        while backlog:
            data, address, _ = backlog[0]
            try:
                self._sock.sendto(data, address)
            except BlockingIOError:
                return
            except OSError as exc:
                self.stats.dropped_send_errors += 1
                logger.debug("sendto %s: %s", address, exc)
            else:
                self.stats.send_calls += 1
                self.stats.datagrams_sent += 1
            backlog.popleft()

    # -- lifecycle -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ResourceClosed("endpoint is closed")

    def _shutdown(self) -> None:
        """Close every connection (one CONNECTION_CLOSE each, best effort) and stop."""
        self._closed = True
        now = trio.current_time()
        for conn in list(self._connections):
            if conn._usable():
                conn._quic.close(error_code=QuicErrorCode.NO_ERROR, reason_phrase="shutting down")
                conn._closed_by_us = True
                self._transmit(conn, now)
            conn._shut_down(ResourceClosed("endpoint closed"))
        self._connections.clear()
        self._by_cid.clear()
        self._incoming_send.close()


def _normalize(address: Any) -> Address:
    """(host, port) from whatever recvfrom returned (IPv6 adds flowinfo, scope)."""
    return (str(address[0]), int(address[1]))


def _gso_supported(sock: socket.socket) -> bool:
    """Probe UDP_SEGMENT once (Linux ≥ 4.18); the first refused send also turns it off."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def _enable_gro(sock: socket.socket) -> bool:
    """Ask for UDP GRO (Linux ≥ 5.0): fewer, larger reads; False if refused."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def _open_socket(config: EndpointConfig) -> socket.socket:
    infos = socket.getaddrinfo(
        config.bind_host, config.bind_port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):  # the kernel caps, or refuses: not fatal
                sock.setsockopt(socket.SOL_SOCKET, option, config.socket_buffer)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def open_endpoint(
    identity: Identity, config: EndpointConfig | None = None
) -> AsyncIterator[Endpoint]:
    """Bind the node's UDP socket and run the endpoint until the block exits.

    On exit every connection is closed (CONNECTION_CLOSE sent once, no
    draining wait) and the socket is released.
    """
    config = config or EndpointConfig()
    sock = _open_socket(config)
    endpoint = Endpoint(identity, config, sock)
    logger.debug(
        "endpoint %s on %s (gso=%s)",
        identity.node_id.short(),
        endpoint.local_address,
        endpoint.stats.gso,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(endpoint._run)
            nursery.start_soon(endpoint.traversal.run)
            try:
                yield endpoint
            finally:
                endpoint._shutdown()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The driver never raises on its own; unwrap the body's one exception
        # so callers see what they raised, not a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        sock.close()


__all__ = [
    "ConnectFailed",
    "Connection",
    "ConnectionLost",
    "ConnectionStats",
    "Endpoint",
    "EndpointConfig",
    "EndpointStats",
    "ResourceClosed",
    "Stream",
    "StreamReset",
    "TooManyConnections",
    "open_endpoint",
]
