"""The QUIC relay of relayd: a trio shell around :class:`relayd.routing.Router`.

:func:`serve` is relayd's entry point. It opens one QUIC endpoint
(:mod:`p2psync.net.endpoint`, ALPN ``p2psync-relay/1``) on the main UDP
port — the endpoint's STUN hook hands STUN to :mod:`relayd.server`, so QUIC,
disco and STUN share **one** socket — and runs the HTTP listener and the
optional STUN alternate port through :func:`relayd.server.serve`.

Per QUIC connection (wire format: :mod:`p2psync.proto.relay`)::

    accept  -> count it (total / per source IP)   full: close with SERVER_FULL
            -> wait for the node's stream          handshake_timeout_s
    reader  -> frames -> decode_node_to_relay_untrusted -> Router.receive
               (every frame one read completed; when a destination's queue is
               half full, the writers get a turn before the next frame;
               deadline: handshake_timeout_s until WELCOME, then idle_timeout_s
               from the last frame; a bad frame or a timeout -> Router.fail)
    writer  <- Router.take (control first, then relayed frames, at most
               WRITE_BATCH frames / WRITE_BATCH_BYTES), one send_all per batch
               bounded by write_timeout_s: a node that does not read is cut
               (WRITE_TIMEOUT); meanwhile its queue drops oldest, so a slow
               node never stalls anyone else.
    close   <- ERROR, then FIN; the node hangs up, or we close with the same
               code as the QUIC application error after CLOSE_GRACE_S.
    UDP     -> fast-path datagrams (DATAGRAM_TO_RELAY) on the same port: the
               endpoint hands each socket read's batch to Router.receive_datagrams,
               and what it returns goes out at once, batched (GSO) by the
               endpoint; when a connection's newest authenticated packet comes
               from a new address (NAT rebinding), Router.rebind follows it and
               so do the endpoint's own QUIC sends (``follow_peer_address``).
    streams -> every further stream the node opens is a service stream
               (:mod:`p2psync.proto.services`): OPEN names a registered
               service (:mod:`relayd.services`); once the node is
               authenticated its handler gets the stream and the proven
               NodeId. At most RELAY_MAX_SERVICE_STREAMS per connection.

Identity: relayd has its own Ed25519 identity (its NodeId is the QUIC
certificate key nodes pin). With ``--data DIR`` it is kept in
``DIR/relay_identity.key`` (msgpack ``[1, seed bin32]``, mode 0600, written
atomically; created on first start) so the NodeId survives restarts; without
a data directory it is ephemeral and changes on every start. The NodeId is
printed in the "relayd ready" log line and served as ``relay_node_id`` in
``/health``.

Shutdown: cancelling :func:`serve` (relayd's SIGTERM) stops accepting, sends
ERROR(SHUTTING_DOWN) to every connection, waits up to SHUTDOWN_GRACE_S for
them to go, then closes the endpoint (CONNECTION_CLOSE to the rest). The
relay's part runs shielded so the goodbye can still be sent; it is bounded.

Logs never contain payload bytes; every refusal is a metric and at most one
log line per reason per ``log_interval_s``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final

import trio

from p2psync import defaults
from p2psync.crypto.identity import SEED_SIZE, Identity, NodeId
from p2psync.errors import BadFrame, ConfigError
from p2psync.net.endpoint import (
    Connection,
    Endpoint,
    EndpointConfig,
    ResourceClosed,
    Stream,
    open_endpoint,
)
from p2psync.net.service_stream import FramedStream
from p2psync.proto.codec import as_bytes, as_int, as_list, pack, unpack_untrusted
from p2psync.proto.invites import SERVICE as INVITES_SERVICE
from p2psync.proto.mailbox import SERVICE as MAILBOX_SERVICE
from p2psync.proto.relay import (
    RELAY_ALPN,
    Address,
    FrameDecoder,
    FrameTooLarge,
    NodeIdCache,
    RelayErrorCode,
    decode_node_to_relay_untrusted,
    encode_frame,
    max_frame_for,
)
from p2psync.proto.services import (
    MAX_OPEN_FRAME,
    Accept,
    Refuse,
    ServiceRefusal,
    decode_open_untrusted,
    encode_reply,
)
from relayd import server
from relayd.config import HostPort, RelaydConfig
from relayd.invites import InviteStore, invites_service
from relayd.mailbox_service import run_mailbox, wants_mailbox
from relayd.metrics import Counter, Registry
from relayd.routing import (
    AccessPolicy,
    AuthFailure,
    DatagramDrop,
    DropReason,
    Router,
    RoutingLimits,
)
from relayd.services import Service, ServiceCall
from relayd.state import ConnectionCounter, LogGate

__all__ = [
    "IDENTITY_FILE",
    "QuicRelay",
    "RelaydAddresses",
    "load_or_create_identity",
    "serve",
]

log = logging.getLogger(__name__)

IDENTITY_FILE: Final = "relay_identity.key"
_KEYFILE_VERSION: Final = 1

# After a fatal ERROR the node should hang up at once; a node that does not
# is closed this long after the ERROR was written.
CLOSE_GRACE_S: Final = 1.0
# On shutdown, connections get this long to take their ERROR and go.
SHUTDOWN_GRACE_S: Final = 2.0
# Messages written per send_all: amortises the stream call; the payload
# bytes of one batch stop at WRITE_BATCH_BYTES (at least one frame goes), so
# one write never copies megabytes while the others wait.
WRITE_BATCH: Final = 64
WRITE_BATCH_BYTES: Final = 256 * 1024
# QUIC connections beyond max_connections that may be mid-handshake; the
# relay's own count (with its explicit SERVER_FULL) applies to the rest.
HANDSHAKE_SLACK: Final = 64
# Handshaken connections waiting for the accept loop; the loop only spawns a
# task each, so this absorbs a reconnect storm after a restart.
ACCEPT_BACKLOG: Final = 1024
# The node opens its relay stream and up to RELAY_MAX_SERVICE_STREAMS service
# streams; one spare keeps a racing retry from being refused.
MAX_STREAMS_PER_CONNECTION: Final = 2 + defaults.RELAY_MAX_SERVICE_STREAMS


@dataclass(frozen=True, slots=True)
class RelaydAddresses:
    """What :func:`serve` bound, and the relay's NodeId (which nodes pin)."""

    udp: HostPort
    stun_alt: HostPort | None
    http: HostPort
    node_id: NodeId


# --- identity -------------------------------------------------------------------------


def load_or_create_identity(
    data_dir: str | None, random_bytes: Callable[[int], bytes] = os.urandom
) -> tuple[Identity, bool]:
    """(identity, created): from ``DATA/relay_identity.key``, made there if missing.

    Without a data directory the identity is new each time (``created`` True).
    """
    if data_dir is None:
        return Identity.generate(random_bytes), True
    directory = Path(data_dir)
    path = directory / IDENTITY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the relay identity: {exc.strerror}") from None
    else:
        try:
            items = as_list(unpack_untrusted(data, max_size=256), IDENTITY_FILE, length=2)
            as_int(items[0], "version", lo=_KEYFILE_VERSION, hi=_KEYFILE_VERSION)
            seed = as_bytes(items[1], "seed", size=SEED_SIZE)
        except BadFrame as exc:
            raise ConfigError(
                f"{path} is damaged ({exc}); restore it from a backup, or delete it "
                "to make a new relay identity (nodes pinning the old NodeId must be updated)"
            ) from None
        return Identity.from_seed(seed), False
    identity = Identity.generate(random_bytes)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_private(path, pack([_KEYFILE_VERSION, identity.seed]))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the relay identity: {exc.strerror}") from None
    return identity, True


def _write_private(path: Path, data: bytes) -> None:
    """Atomically create ``path`` with ``data``, owner-only from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# --- per-connection state --------------------------------------------------------------


class _Session:
    """One node's connection: the router's handle (hashed by identity)."""

    __slots__ = (
        "close_code",
        "conn",
        "ip",
        "log",
        "observed",
        "read_scope",
        "service_streams",
        "stream",
        "wake",
    )

    def __init__(self, conn: Connection, stream: Stream, ip: str, observed: Address | None) -> None:
        self.conn = conn
        self.stream = stream
        self.ip = ip
        self.observed = observed
        self.service_streams = 0
        self.wake = trio.Event()
        self.read_scope: trio.CancelScope | None = None
        self.close_code: RelayErrorCode | None = None
        self.log = logging.LoggerAdapter(log, {"peer": ip})

    def __repr__(self) -> str:
        return f"<relay session {self.ip}>"


# --- the relay ------------------------------------------------------------------------


class QuicRelay:
    """Accepts node connections on ``endpoint`` and runs them against one Router."""

    def __init__(
        self,
        config: RelaydConfig,
        endpoint: Endpoint,
        identity: Identity,
        *,
        policy: AccessPolicy | None = None,
        registry: Registry | None = None,
    ) -> None:
        limits = config.limits
        self.config = config
        self.endpoint = endpoint
        self.node_id = identity.node_id
        self.node_ids = NodeIdCache(min(limits.max_connections * 2, 1 << 16))
        self.router: Router[_Session] = Router(
            identity.node_id,
            RoutingLimits(
                frames_per_second=limits.frames_per_second,
                frame_burst=limits.frame_burst,
                bytes_per_second=limits.bytes_per_second,
                byte_burst=limits.byte_burst,
                max_payload=limits.max_frame_size,
                queue_per_destination=limits.queue_per_destination,
                fast_path=limits.fast_path,
            ),
            os.urandom,
            policy,
            self.node_ids,
        )
        self.max_frame = max_frame_for(limits.max_frame_size)
        self.counter = ConnectionCounter(limits.max_connections, limits.max_connections_per_ip)
        self.log_gate = LogGate(limits.log_interval_s)
        self.sessions: set[_Session] = set()
        self._by_conn: dict[Connection, _Session] = {}
        self.services: dict[str, Service] = {}
        self._stopping = False
        self._all_gone = trio.Event()
        self._stopped = trio.Event()
        self._register_metrics(registry or Registry(limits.metrics_max_label_sets))
        endpoint.set_relay_datagram_handler(self._datagrams_received)
        endpoint.set_peer_address_handler(self._peer_moved)

    def register_service(self, service: Service) -> None:
        """Offer ``service`` on service streams (see :mod:`relayd.services`)."""
        if service.name in self.services:
            raise ValueError(f"service {service.name!r} is already registered")
        self.services[service.name] = service
        for result in ("ok", "refused", "error"):
            self.m_service_streams.inc(0, service=service.name, result=result)

    # --- server.RelayPlugin ---------------------------------------------------------

    @property
    def node_id_text(self) -> str:
        return str(self.node_id)

    def udp_address(self) -> tuple[str, int]:
        return self.endpoint.local_address

    def set_stun_handler(self, handler: server.StunHandler) -> None:
        self.endpoint.set_stun_handler(handler)

    def send_datagram(self, data: bytes, address: tuple[str, int]) -> None:
        with contextlib.suppress(ResourceClosed):
            self.endpoint.send_datagram(data, address)

    def live_counts(self) -> tuple[int, int]:
        return self.counter.total, self.router.nodes

    def refresh_metrics(self) -> None:
        """Copy the router's and endpoint's counters into the registry's counters."""
        counters = self.router.counters
        _sync(self.m_frames, counters.frames_relayed)
        _sync(self.m_bytes, counters.bytes_relayed)
        for reason, value in counters.drops.items():
            _sync(self.m_drops, value, reason=reason.value)
        _sync(self.m_auths, counters.auths_ok, result="ok")
        for failure, value in counters.auths_failed.items():
            _sync(self.m_auths, value, result=failure.value)
        _sync(self.m_lookups, counters.lookups_found, result="found")
        _sync(self.m_lookups, counters.lookups - counters.lookups_found, result="not-found")
        _sync(self.m_replaced, counters.replaced)
        _sync(self.m_protocol_errors, counters.protocol_errors)
        _sync(self.m_fast_forwarded, counters.datagrams_forwarded)
        _sync(self.m_fast_bytes, counters.datagram_bytes_forwarded)
        _sync(self.m_fast_to_stream, counters.datagrams_to_stream)
        for drop, value in counters.datagram_drops.items():
            _sync(self.m_fast_drops, value, reason=drop.value)
        _sync(self.m_rebinds, counters.rebinds)
        stats = self.endpoint.stats
        _sync(self.m_quic_rx, stats.datagrams_received)
        _sync(self.m_quic_tx, stats.datagrams_sent)
        _sync(self.m_quic_dropped, stats.dropped_malformed, reason="malformed")
        _sync(self.m_quic_dropped, stats.dropped_unknown_connection, reason="unknown-connection")
        _sync(self.m_quic_dropped, stats.refused_connections, reason="refused-connection")
        _sync(self.m_quic_dropped, stats.dropped_send_errors, reason="send-error")

    def _register_metrics(self, registry: Registry) -> None:
        self.registry = m = registry
        self.m_accepted = m.counter(
            "relayd_relay_connections_total", "QUIC relay connections accepted."
        )
        self.m_refused = m.counter(
            "relayd_relay_connections_refused_total",
            "QUIC relay connections refused by a limit.",
            ("reason",),
        )
        self.m_closed = m.counter(
            "relayd_relay_closes_total", "Relay connections the relay ended, by code.", ("code",)
        )
        self.m_auths = m.counter("relayd_auths_total", "Relay AUTH attempts.", ("result",))
        self.m_frames = m.counter("relayd_relayed_frames_total", "Frames relayed.")
        self.m_bytes = m.counter("relayd_relayed_bytes_total", "Payload bytes relayed.")
        self.m_drops = m.counter(
            "relayd_relay_drops_total", "Relay frames not delivered.", ("reason",)
        )
        self.m_lookups = m.counter("relayd_lookups_total", "LOOKUP requests.", ("result",))
        self.m_replaced = m.counter(
            "relayd_relay_replaced_total", "Connections replaced by a newer one of the same node."
        )
        self.m_protocol_errors = m.counter(
            "relayd_relay_protocol_errors_total", "Malformed or out-of-order relay frames."
        )
        self.m_quic_rx = m.counter(
            "relayd_quic_datagrams_received_total", "Datagrams read by the relay's endpoint."
        )
        self.m_quic_tx = m.counter(
            "relayd_quic_datagrams_sent_total", "Datagrams sent by the relay's endpoint."
        )
        self.m_quic_dropped = m.counter(
            "relayd_quic_datagrams_dropped_total",
            "Datagrams the relay's endpoint dropped (in or out).",
            ("reason",),
        )
        self.m_service_streams = m.counter(
            "relayd_service_streams_total",
            "Service streams (invites, mailbox) opened, by service and outcome.",
            ("service", "result"),
        )
        self.m_log_suppressed = m.counter(
            "relayd_relay_log_lines_suppressed_total",
            "Relay log lines suppressed by the per-reason rate limit.",
        )
        self.m_fast_forwarded = m.counter(
            "relayd_fast_path_datagrams_forwarded_total",
            "UDP fast-path datagrams relayed as UDP (also in relayd_relayed_frames_total).",
        )
        self.m_fast_bytes = m.counter(
            "relayd_fast_path_bytes_forwarded_total",
            "Payload bytes of those (also in relayd_relayed_bytes_total).",
        )
        self.m_fast_to_stream = m.counter(
            "relayd_fast_path_datagrams_to_stream_total",
            "UDP fast-path datagrams queued on a destination's stream (it has no fast path).",
        )
        self.m_fast_drops = m.counter(
            "relayd_fast_path_dropped_total",
            "UDP fast-path datagrams not relayed, by reason (never answered).",
            ("reason",),
        )
        self.m_rebinds = m.counter(
            "relayd_relay_rebinds_total",
            "Relay connections whose UDP address changed (NAT rebinding), followed.",
        )
        m.gauge(
            "relayd_fast_path_nodes", "Nodes on the UDP fast path (owning their address)."
        ).set_function(lambda: float(self.router.fast_path_nodes))
        for reason in DropReason:
            self.m_drops.inc(0, reason=reason.value)
        for drop in DatagramDrop:
            self.m_fast_drops.inc(0, reason=drop.value)
        for failure in AuthFailure:
            self.m_auths.inc(0, result=failure.value)
        self.m_auths.inc(0, result="ok")

    def _datagrams_received(self, batch: list[tuple[bytes, Address]]) -> None:
        """One socket read's fast-path datagrams: route them, send what the router says."""
        out, woken = self.router.receive_datagrams(batch, trio.current_time())
        if out:
            with contextlib.suppress(ResourceClosed):
                self.endpoint.send_datagrams(out)
        self._wake(woken)

    def _peer_moved(self, conn: Connection, address: Address) -> None:
        """A node's newest authenticated packet came from ``address`` (a NAT rebinding)."""
        session = self._by_conn.get(conn)
        if session is None:
            return
        session.log.debug("relay node moved to %s", address)
        session.observed = address
        self.router.rebind(session, address, trio.current_time())

    def _note(self, reason: str, message: str, *args: object) -> None:
        """Log ``message`` at most once per interval per reason (never payloads)."""
        suppressed = self.log_gate.check(reason, trio.current_time())
        if suppressed is None:
            self.m_log_suppressed.inc()
        else:
            log.warning(message + " (%d similar suppressed)", *args, suppressed)

    # --- accepting ------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections until :meth:`stop` has finished."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._accept_loop, nursery)
            task_status.started()
            await self._stopped.wait()
            nursery.cancel_scope.cancel()

    async def _accept_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn = await self.endpoint.accept()
            except ResourceClosed:
                return
            nursery.start_soon(self._serve_connection, conn)

    async def stop(self) -> None:
        """ERROR(SHUTTING_DOWN) to everyone, wait (bounded) for them to go, end :meth:`run`."""
        self._stopping = True
        self._wake(self.router.shutdown())
        if self.sessions:
            with trio.move_on_after(SHUTDOWN_GRACE_S):
                await self._all_gone.wait()
        self._stopped.set()

    # --- one connection ---------------------------------------------------------------

    async def _serve_connection(self, conn: Connection) -> None:
        limits = self.config.limits
        if self._stopping:
            await conn.aclose(RelayErrorCode.SHUTTING_DOWN, "relay is shutting down")
            return
        observed = _observed_address(self.endpoint, conn)
        ip = observed[0] if observed is not None else "unknown"
        refusal = self.counter.try_add(ip)
        if refusal is not None:
            self.m_refused.inc(reason=refusal.value)
            self._count_close(RelayErrorCode.SERVER_FULL)
            self._note(refusal.value, "refusing relay connection from %s: %s", ip, refusal.value)
            await conn.aclose(RelayErrorCode.SERVER_FULL, f"relay full ({refusal.value})")
            return
        self.m_accepted.inc()
        session: _Session | None = None
        try:
            started = trio.current_time()
            with trio.move_on_after(limits.handshake_timeout_s):
                stream = await conn.accept_stream()
                session = _Session(conn, stream, ip, observed)
            if session is None:
                self._count_close(RelayErrorCode.TIMEOUT)
                await conn.aclose(RelayErrorCode.TIMEOUT, "no relay stream in time")
                return
            # The address may have moved while the stream was on its way.
            session.observed = observed = _observed_address(self.endpoint, conn) or observed
            self.router.open(session, observed, trio.current_time())
            self.sessions.add(session)
            self._by_conn[conn] = session
            if self._stopping:  # stop() ran while this one was handshaking
                self._wake(self.router.fail(session, RelayErrorCode.SHUTTING_DOWN, "shutting down"))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, session)
                nursery.start_soon(self._accept_services, session, nursery)
                await self._reader(session, started)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection broke under us: the finally cleans up
        finally:
            if session is not None:
                self.router.close(session, trio.current_time())
                self.sessions.discard(session)
                self._by_conn.pop(conn, None)
                if self._stopping and not self.sessions:
                    self._all_gone.set()
            self.counter.remove(ip)
            code = session.close_code if session is not None else None
            with trio.CancelScope(shield=True):
                if code is not None:
                    await conn.aclose(code, _label(code))
                else:
                    await conn.aclose()

    async def _reader(self, session: _Session, started: float) -> None:
        """Read frames into the router until the node goes or the session is over.

        Deadlines: the handshake, then idle time. Once the router is closing
        the session, the reader only discards, until the node hangs up or the
        writer's grace period (set by :meth:`_end_reading`) runs out.
        """
        limits = self.config.limits
        router = self.router
        decoder = FrameDecoder(self.max_frame)
        stream = session.stream
        authenticated = False
        deadline = started + limits.handshake_timeout_s
        while True:
            with trio.CancelScope(deadline=deadline) as scope:
                session.read_scope = scope
                while True:
                    try:
                        data = await stream.receive_some()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                    if not data:
                        return  # the node finished its side
                    if router.closing(session):
                        continue  # discard until the node hangs up or grace ends
                    now = trio.current_time()
                    try:
                        decoder.feed(data)
                        while (body := decoder.next_frame()) is not None:
                            message = decode_node_to_relay_untrusted(
                                body, max_frame=self.max_frame, node_ids=self.node_ids
                            )
                            woken = router.receive(session, message, now)
                            self._wake(woken)
                            if woken and router.filling(woken):
                                # One read can complete more frames than a queue holds:
                                # let the woken writers drain before routing more.
                                await trio.lowlevel.checkpoint()
                                now = trio.current_time()
                    except FrameTooLarge as exc:
                        self._fail(session, RelayErrorCode.FRAME_TOO_LARGE, str(exc))
                    except BadFrame as exc:
                        self._fail(session, RelayErrorCode.PROTOCOL_ERROR, str(exc))
                    if router.closing(session):
                        # The writer shortens this once the ERROR is out.
                        scope.deadline = now + limits.write_timeout_s + CLOSE_GRACE_S
                    elif authenticated or router.node_of(session) is not None:
                        authenticated = True
                        scope.deadline = now + limits.idle_timeout_s
            if router.closing(session) or session.close_code is not None:
                return  # grace is over
            what = "idle for too long" if authenticated else "relay handshake not finished in time"
            self._fail(session, RelayErrorCode.TIMEOUT, what)
            deadline = trio.current_time() + limits.write_timeout_s + CLOSE_GRACE_S

    # --- service streams ----------------------------------------------------------------

    async def _accept_services(self, session: _Session, nursery: trio.Nursery) -> None:
        """Hand each further stream of ``session`` to the service its OPEN frame names."""
        while True:
            try:
                stream = await session.conn.accept_stream()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the connection is over; the reader sees it too
            nursery.start_soon(self._serve_service, session, stream)

    async def _serve_service(self, session: _Session, stream: Stream) -> None:
        framed = FramedStream(stream, MAX_OPEN_FRAME)
        name = "?"
        counted = False
        try:
            with trio.fail_after(defaults.RELAY_SERVICE_OPEN_TIMEOUT):
                body = await framed.receive()
                refusal, service, version = self._admit_service(session, body)
                if service is not None:
                    name = service.name
                if refusal is not None:
                    code, text = refusal
                    self.m_service_streams.inc(service=name, result="refused")
                    self._note(
                        "service-refused", "service stream from %s refused: %s", session.ip, text
                    )
                    await framed.send(encode_reply(Refuse(code, text)))
                    return
                assert service is not None
                node_id = self.router.node_of(session)
                assert node_id is not None
                await framed.send(encode_reply(Accept(version)))
            session.service_streams += 1
            counted = True
            self.m_service_streams.inc(service=name, result="ok")
            framed.max_frame = service.max_frame
            call = ServiceCall(name, version, node_id, session.ip, session.observed, framed)
            await service.handler(call)
        except (
            BadFrame,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
        ) as exc:
            self.m_service_streams.inc(service=name, result="error")
            self._note(
                f"service-{name}", "service %s stream from %s ended: %s", name, session.ip, exc
            )
        except Exception:
            self.m_service_streams.inc(service=name, result="error")
            log.exception("service %s failed on a stream from %s", name, session.ip)
        except BaseExceptionGroup as group:
            # A handler's own nursery can mix our cancellation with its error:
            # log and count the error, let only the cancellation go on.
            cancelled, failed = group.split(trio.Cancelled)
            if failed is not None:
                self.m_service_streams.inc(service=name, result="error")
                log.error(
                    "service %s failed on a stream from %s",
                    name,
                    session.ip,
                    exc_info=failed,
                )
            if cancelled is not None:
                raise cancelled from None
        finally:
            if counted:
                session.service_streams -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _admit_service(
        self, session: _Session, body: bytes | None
    ) -> tuple[tuple[ServiceRefusal, str] | None, Service | None, int]:
        """(refusal or None, the service if known, version) for an OPEN frame."""
        if body is None:
            return (ServiceRefusal.BAD_OPEN, "stream ended before OPEN"), None, 0
        try:
            request = decode_open_untrusted(body)
        except BadFrame as exc:
            return (ServiceRefusal.BAD_OPEN, str(exc)), None, 0
        service = self.services.get(request.service)
        if service is None:
            return (ServiceRefusal.UNKNOWN_SERVICE, f"no service {request.service!r}"), None, 0
        if self.router.node_of(session) is None or self.router.closing(session):
            return (ServiceRefusal.NOT_AUTHENTICATED, "authenticate first"), service, 0
        if self._stopping:
            return (ServiceRefusal.UNAVAILABLE, "relay is shutting down"), service, 0
        if request.version not in service.versions:
            versions = ", ".join(str(v) for v in sorted(service.versions))
            return (
                (ServiceRefusal.UNSUPPORTED_VERSION, f"{service.name} speaks version {versions}"),
                service,
                0,
            )
        if session.service_streams >= defaults.RELAY_MAX_SERVICE_STREAMS:
            return (
                (ServiceRefusal.TOO_MANY_STREAMS, "too many service streams on this connection"),
                service,
                0,
            )
        return None, service, request.version

    def _fail(self, session: _Session, code: RelayErrorCode, reason: str) -> None:
        session.log.debug("relay connection failed: %s", reason)
        self._note(f"fail-{code.name}", "relay connection from %s: %s", session.ip, reason)
        self._wake(self.router.fail(session, code, reason))

    async def _writer(self, session: _Session) -> None:
        """Drain the router's queue for ``session`` to its stream, bounded per write."""
        router = self.router
        stream = session.stream
        write_timeout = self.config.limits.write_timeout_s
        try:
            while True:
                messages, close_code = router.take(session, WRITE_BATCH, WRITE_BATCH_BYTES)
                if not messages and close_code is None:
                    session.wake = trio.Event()
                    await session.wake.wait()
                    continue
                if messages:
                    data = b"".join([encode_frame(message) for message in messages])
                    with trio.move_on_after(write_timeout) as scope:
                        await stream.send_all(data)
                    if scope.cancelled_caught:
                        router.write_timed_out(session)
                        session.close_code = RelayErrorCode.WRITE_TIMEOUT
                        self._count_close(RelayErrorCode.WRITE_TIMEOUT)
                        self._note("write-timeout", "relay node at %s does not read", session.ip)
                        self._end_reading(session, 0.0)
                        return
                if close_code is not None:
                    session.close_code = close_code
                    self._count_close(close_code)
                    if close_code in (RelayErrorCode.BAD_AUTH, RelayErrorCode.NOT_ALLOWED):
                        self._note("auth", "relay auth refused from %s", session.ip)
                    await stream.send_eof()
                    self._end_reading(session, CLOSE_GRACE_S)
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end_reading(session, 0.0)

    def _end_reading(self, session: _Session, grace: float) -> None:
        scope = session.read_scope
        if scope is not None:
            scope.deadline = min(scope.deadline, trio.current_time() + grace)

    def _count_close(self, code: RelayErrorCode) -> None:
        self.m_closed.inc(code=_label(code))

    def _wake(self, handles: list[_Session]) -> None:
        for handle in handles:
            handle.wake.set()


def _describe_policy(policy: AccessPolicy) -> str:
    """The access policy for the log, without the token."""
    parts: list[str] = []
    if policy.allowed is not None:
        parts.append(f"allow-list of {len(policy.allowed)} node(s)")
    if policy.access_token is not None:
        parts.append("shared access token required")
    return ", ".join(parts) or "open to any node (no allow-list, no access token)"


def _label(code: RelayErrorCode) -> str:
    return code.name.lower().replace("_", "-")


def _sync(counter: Counter, value: float, **labels: str) -> None:
    """Raise ``counter`` to ``value`` (the router's counters only go up)."""
    delta = value - counter.value(**labels)
    if delta > 0:
        counter.inc(delta, **labels)


def _observed_address(endpoint: Endpoint, conn: Connection) -> Address | None:
    """The node's public UDP address as this relay sees it.

    The source of its newest authenticated packet
    (:attr:`~p2psync.net.endpoint.Connection.source_address`). Before any
    (never, in practice, for an accepted connection): the path table's
    address for its NodeId (the dialer's disco PING maps it before the QUIC
    Initial, so QUIC only knows a virtual address), else the real address
    QUIC was given.
    """
    if conn.source_address is not None:
        return conn.source_address
    node_id = conn.their_node_id
    if node_id is not None:
        return endpoint.paths.send_address(node_id, trio.current_time())
    address = getattr(conn, "_peer_address", None)
    if isinstance(address, tuple) and len(address) == 2:
        return (str(address[0]), int(address[1]))
    return None


# --- entry point --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _open_relay_endpoint(config: RelaydConfig, identity: Identity) -> AsyncIterator[Endpoint]:
    limits = config.limits
    endpoint_config = EndpointConfig(
        bind_host=config.listen.host,
        bind_port=config.listen.port,
        alpn=(RELAY_ALPN,),
        idle_timeout=limits.idle_timeout_s,
        max_connections=limits.max_connections + HANDSHAKE_SLACK,
        accept_backlog=ACCEPT_BACKLOG,
        max_incoming_streams=MAX_STREAMS_PER_CONNECTION,
        follow_peer_address=True,  # a node's NAT may rebind; its connection follows
    )
    async with contextlib.AsyncExitStack() as stack:
        try:
            endpoint = await stack.enter_async_context(open_endpoint(identity, endpoint_config))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                f"cannot listen on UDP {config.listen}: {reason}; choose another address or port"
            ) from None
        yield endpoint


async def serve(
    config: RelaydConfig,
    *,
    identity: Identity | None = None,
    policy: AccessPolicy | None = None,
    services: Sequence[Service] = (),
    task_status: trio.TaskStatus[RelaydAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run relayd — QUIC relay and STUN on one UDP port, HTTP — until cancelled.

    ``identity`` defaults to :func:`load_or_create_identity` on
    ``config.data_dir``; ``policy`` (allow-list, access token) to the one
    the config asks for (:meth:`RelaydConfig.access_policy`; open if none).
    ``services`` are offered on service streams (:mod:`relayd.services`);
    the short-code invite store (:mod:`relayd.invites`) is one unless
    ``config.invites.enabled`` is false or ``services`` brings its own, and
    so is the group mailbox (:mod:`relayd.mailbox_service`) when relayd has
    a data directory and ``config.mailbox.enabled``.
    Bind failures raise :class:`~p2psync.errors.ConfigError` before
    ``task_status.started``. Cancellation is the graceful shutdown (module
    docstring); it takes at most about ``SHUTDOWN_GRACE_S``.
    """
    created = False
    if identity is None:
        identity, created = load_or_create_identity(config.data_dir)
    relay_identity = identity
    relay_policy = policy if policy is not None else config.access_policy()
    stop = trio.Event()

    async def run_shielded(task_status: trio.TaskStatus[RelaydAddresses]) -> None:
        # Shielded so the endpoint keeps running while we say goodbye; ``stop``
        # (set when serve() is cancelled) ends it, within SHUTDOWN_GRACE_S.
        with trio.CancelScope(shield=True):
            async with _open_relay_endpoint(config, relay_identity) as endpoint:
                relay = QuicRelay(config, endpoint, relay_identity, policy=relay_policy)
                for service in services:
                    relay.register_service(service)
                if config.invites.enabled and INVITES_SERVICE not in relay.services:
                    store = InviteStore(config.invites)
                    relay.register_service(
                        invites_service(
                            store, relay.registry, log_interval=config.limits.log_interval_s
                        )
                    )
                async with trio.open_nursery() as nursery:
                    if wants_mailbox(config) and MAILBOX_SERVICE not in relay.services:
                        mailbox = partial(run_mailbox, config, relay.node_id, relay.registry)
                        relay.register_service(await nursery.start(mailbox))
                    bound: server.BoundAddresses = await nursery.start(
                        partial(server.serve, config, relay=relay, registry=relay.registry)
                    )
                    await nursery.start(relay.run)
                    task_status.started(
                        RelaydAddresses(
                            bound.udp, bound.stun_alt, bound.http, relay_identity.node_id
                        )
                    )
                    log.info("access: %s", _describe_policy(relay_policy))
                    if config.data_dir is None:
                        log.info("relay identity is ephemeral (no --data directory)")
                    elif created:
                        log.info(
                            "new relay identity saved in %s", Path(config.data_dir) / IDENTITY_FILE
                        )
                    await stop.wait()
                    log.info("relay shutting down: telling %d connections", len(relay.sessions))
                    await relay.stop()
                    nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            addresses: RelaydAddresses = await nursery.start(run_shielded)
            task_status.started(addresses)
            try:
                await trio.sleep_forever()
            finally:
                stop.set()
    except BaseExceptionGroup as group:
        # One failure (a bind error, say): raise it as itself, not as a group.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
