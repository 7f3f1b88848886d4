"""The trio shell of relayd: sockets in, pure state and codecs, sockets out.

``serve(config)`` binds everything, reports the bound addresses through
``task_status`` and runs until cancelled. It reads sockets and the clock,
feeds :mod:`p2psync.net.stun` and :mod:`relayd.state`, writes replies, and
does nothing else.

Sockets and what travels on them
--------------------------------
UDP ``listen`` (default 0.0.0.0:3478), one socket for two protocols,
demultiplexed by :func:`p2psync.net.stun.is_stun` (RFC 7983 style: STUN's
first byte has the top bits ``00``, QUIC's has the fixed bit ``0x40``)::

    -> STUN Binding request        <- Binding success / error (RFC 8489)
    -> anything else               handed to ``quic_datagram_handler``; without
                                   one the datagram is dropped and counted as
                                   relayd_dropped_datagrams_total{reason="no-quic-handler"}

With the QUIC relay (``relay=``, see :mod:`relayd.relay`) the relay's QUIC
endpoint owns this socket instead: it reads every datagram, keeps QUIC and
disco for itself and hands STUN to :meth:`_Relay.stun_from_relay`, which
answers through the endpoint with the same limits and metrics.

UDP ``stun_alt_port`` (optional, same host): STUN only. A node that sees
different mappings from the two ports is behind a port-dependent ("hard",
symmetric) NAT. Same mapping from both only rules that out: an
address-dependent NAT needs a second relay (another IP) to show itself.
Non-STUN datagrams there are dropped (``not-stun-on-alt-port``).

TCP ``http`` (default 127.0.0.1:9478), one request per connection::

    -> GET /health HTTP/1.1        <- 200 application/json
                                      {"status", "version", "uptime_s",
                                       "connections", "nodes"}
    -> GET /metrics HTTP/1.1       <- 200 Prometheus text format 0.0.4
    -> GET /anything-else          <- 404;  other methods <- 405
    -> more than http_max_request_bytes before the blank line  <- 431
    -> nothing complete within http_request_timeout_s          (closed)

Limits: STUN is answered at most ``stun_per_ip_rate`` per second (burst
``stun_per_ip_burst``) per source IP, shared by both ports, with the table of
source IPs bounded (LRU); HTTP connections beyond ``http_max_connections``
are closed at once. Every drop is a metric; logs are rate-limited per reason
and never contain payload bytes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import socket as stdlib_socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from p2psync.errors import ConfigError
from p2psync.net.stun import answer_binding, is_stun
from relayd import defaults
from relayd.config import HostPort, RelaydConfig
from relayd.metrics import CONTENT_TYPE, Registry
from relayd.state import LogGate, PerIpRateLimiter

__all__ = ["BoundAddresses", "QuicDatagramHandler", "RelayPlugin", "serve"]

log = logging.getLogger(__name__)

# The QUIC relay plugs in here: called for every non-STUN datagram on the main
# UDP port with (data, source, now). It must not block; it owns the reply path.
QuicDatagramHandler = Callable[[bytes, tuple[str, int], float], None]
StunHandler = Callable[[bytes, tuple[str, int]], None]


class RelayPlugin(Protocol):
    """The QUIC relay as this shell sees it (:class:`relayd.relay.QuicRelay`).

    It owns the main UDP socket (its QUIC endpoint), passes STUN datagrams to
    the handler set here, sends the replies, and reports its live counts.
    """

    @property
    def node_id_text(self) -> str: ...

    def udp_address(self) -> tuple[str, int]: ...

    def set_stun_handler(self, handler: StunHandler) -> None: ...

    def send_datagram(self, data: bytes, address: tuple[str, int]) -> None: ...

    def live_counts(self) -> tuple[int, int]:
        """(connections, authenticated nodes) right now."""
        ...

    def refresh_metrics(self) -> None:
        """Bring the relay's metrics up to date (called before /metrics and /health)."""
        ...


@dataclass(frozen=True, slots=True)
class BoundAddresses:
    """What ``serve`` actually bound (ports resolved when 0 was asked for)."""

    udp: HostPort
    stun_alt: HostPort | None
    http: HostPort


def _version() -> str:
    try:
        return importlib.metadata.version("p2psync")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Relay:
    """Per-instance state of the shell: pure limiters plus the metrics."""

    def __init__(
        self,
        config: RelaydConfig,
        quic_handler: QuicDatagramHandler | None,
        plugin: RelayPlugin | None = None,
        registry: Registry | None = None,
    ) -> None:
        limits = config.limits
        self.config = config
        self.quic_handler = quic_handler
        self.plugin = plugin
        self.started = trio.current_time()
        self.version = _version()
        self.stun_limiter = PerIpRateLimiter(
            limits.stun_per_ip_rate, limits.stun_per_ip_burst, limits.max_tracked_ips
        )
        self.log_gate = LogGate(limits.log_interval_s)
        self.http_active = 0
        m = self.metrics = registry or Registry(limits.metrics_max_label_sets)
        self.rx_datagrams = m.counter(
            "relayd_udp_datagrams_received_total", "UDP datagrams received.", ("port",)
        )
        self.rx_bytes = m.counter(
            "relayd_udp_bytes_received_total", "UDP payload bytes received.", ("port",)
        )
        self.stun_responses = m.counter(
            "relayd_stun_responses_total", "STUN responses sent.", ("port", "kind")
        )
        self.stun_rate_limited = m.counter(
            "relayd_stun_rate_limited_total",
            "STUN requests dropped by the per-IP rate limit.",
            ("port",),
        )
        self.dropped = m.counter(
            "relayd_dropped_datagrams_total", "UDP datagrams dropped unanswered.", ("reason",)
        )
        self.http_requests = m.counter(
            "relayd_http_requests_total", "HTTP responses sent.", ("path", "code")
        )
        self.http_rejected = m.counter(
            "relayd_http_rejected_total",
            "HTTP connections closed without a normal response.",
            ("reason",),
        )
        self.connections = m.gauge("relayd_connections", "Live relay connections.")
        self.nodes = m.gauge("relayd_nodes", "Nodes with a live relay connection.")
        if plugin is not None:
            self.connections.set_function(lambda: plugin.live_counts()[0])
            self.nodes.set_function(lambda: plugin.live_counts()[1])
        m.gauge("relayd_uptime_seconds", "Seconds since this relay started.").set_function(
            self.uptime
        )
        m.gauge("relayd_stun_tracked_ips", "Source IPs in the STUN rate-limit table.").set_function(
            lambda: len(self.stun_limiter.table)
        )
        self.log_suppressed = m.counter(
            "relayd_log_lines_suppressed_total",
            "Log lines suppressed by the per-reason rate limit.",
        )

    def uptime(self) -> float:
        return trio.current_time() - self.started

    def note(self, reason: str, message: str, *args: object) -> None:
        """Log ``message`` at most once per interval per reason."""
        suppressed = self.log_gate.check(reason, trio.current_time())
        if suppressed is None:
            self.log_suppressed.inc()
        else:
            log.warning(message + " (%d similar suppressed)", *args, suppressed)

    # --- UDP ------------------------------------------------------------

    async def udp_loop(self, sock: trio.socket.SocketType, port_label: str) -> None:
        while True:
            data, addr = await sock.recvfrom(defaults.MAX_DATAGRAM)
            now = trio.current_time()
            source = (str(addr[0]), int(addr[1]))
            self.rx_datagrams.inc(port=port_label)
            self.rx_bytes.inc(len(data), port=port_label)
            if not is_stun(data):
                if port_label == "main" and self.quic_handler is not None:
                    self.quic_handler(data, source, now)
                else:
                    reason = "no-quic-handler" if port_label == "main" else "not-stun-on-alt-port"
                    self.dropped.inc(reason=reason)
                continue
            reply = self.stun_reply(data, source, port_label, now)
            if reply is None:
                continue
            try:
                await sock.sendto(reply, addr)
            except OSError as exc:
                self.dropped.inc(reason="send-failed")
                self.note("udp-send", "UDP send to %s failed: %s", source[0], exc.strerror)
                continue
            self.stun_responses.inc(port=port_label, kind=_stun_kind(reply))

    def stun_reply(
        self, data: bytes, source: tuple[str, int], port_label: str, now: float
    ) -> bytes | None:
        """The reply to a STUN datagram, or None (rate-limited or unanswerable, counted)."""
        if not self.stun_limiter.allow(source[0], now):
            self.stun_rate_limited.inc(port=port_label)
            self.note("stun-rate-limit", "STUN rate limit hit by %s", source[0])
            return None
        reply = answer_binding(data, source)
        if reply is None:
            self.dropped.inc(reason="stun-unanswerable")
        return reply

    def stun_from_relay(self, data: bytes, source: tuple[str, int]) -> None:
        """STUN that arrived on the relay's endpoint (the main port); reply through it."""
        assert self.plugin is not None  # only installed as the plugin's STUN handler
        self.rx_datagrams.inc(port="main")
        self.rx_bytes.inc(len(data), port="main")
        reply = self.stun_reply(data, source, "main", trio.current_time())
        if reply is not None:
            self.plugin.send_datagram(reply, source)
            self.stun_responses.inc(port="main", kind=_stun_kind(reply))

    # --- HTTP -----------------------------------------------------------

    async def handle_http(self, stream: trio.SocketStream) -> None:
        if self.http_active >= self.config.limits.http_max_connections:
            self.http_rejected.inc(reason="overloaded")
            self.note("http-overloaded", "HTTP connection limit reached")
            await trio.aclose_forcefully(stream)
            return
        self.http_active += 1
        try:
            await self._http_exchange(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.http_rejected.inc(reason="broken")
        finally:
            self.http_active -= 1
            await trio.aclose_forcefully(stream)

    async def _http_exchange(self, stream: trio.SocketStream) -> None:
        limits = self.config.limits
        head: bytes | None = None
        too_large = False
        with trio.move_on_after(limits.http_request_timeout_s):
            try:
                head = await _read_head(stream, limits.http_max_request_bytes)
            except _RequestTooLarge:
                too_large = True
        if too_large:
            await self._respond(stream, 431, "too-large", "text/plain", b"request too large\n")
            return
        if head is None:
            self.http_rejected.inc(reason="timeout-or-closed")
            return
        status, path_label, content_type, body, head_only = self._route(head)
        await self._respond(stream, status, path_label, content_type, body, head_only=head_only)

    def _route(self, head: bytes) -> tuple[int, str, str, bytes, bool]:
        """(status, path label, content type, body, head-only) for a request head."""
        try:
            request_line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("ascii")
        except UnicodeDecodeError:
            return 400, "malformed", "text/plain", b"bad request\n", False
        parts = request_line.split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
            return 400, "malformed", "text/plain", b"bad request\n", False
        method, target, _version = parts
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "other", "text/plain", b"only GET and HEAD\n", False
        head_only = method == "HEAD"
        if self.plugin is not None:
            self.plugin.refresh_metrics()
        if path == "/health":
            health: dict[str, object] = {
                "status": "ok",
                "version": self.version,
                "uptime_s": round(self.uptime(), 3),
                "connections": int(self.connections.samples()[0][1]),
                "nodes": int(self.nodes.samples()[0][1]),
            }
            if self.plugin is not None:
                health["relay_node_id"] = self.plugin.node_id_text
            body = json.dumps(health).encode()
            return 200, "/health", "application/json", body + b"\n", head_only
        if path == "/metrics":
            return 200, "/metrics", CONTENT_TYPE, self.metrics.render().encode(), head_only
        return 404, "other", "text/plain", b"not found\n", head_only

    async def _respond(
        self,
        stream: trio.SocketStream,
        status: int,
        path_label: str,
        content_type: str,
        body: bytes,
        *,
        head_only: bool = False,
    ) -> None:
        self.http_requests.inc(path=path_label, code=str(status))
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        ).encode("ascii")
        with trio.move_on_after(self.config.limits.http_request_timeout_s):
            await stream.send_all(head if head_only else head + body)
            # Lingering close: closing with unread request bytes makes the
            # kernel send RST, which can destroy the response in flight (a 431
            # for an oversized request always leaves some). Half-close, then
            # drain a bounded amount until the client closes or time is up.
            await stream.send_eof()
            drained = 0
            while drained <= defaults.HTTP_MAX_DRAIN_BYTES and (
                chunk := await stream.receive_some(16 * 1024)
            ):
                drained += len(chunk)


def _stun_kind(reply: bytes) -> str:
    # The class bit C0 (0x0010) tells error (0x0111) from success (0x0101).
    return "error" if reply[1] & 0x10 else "success"


class _RequestTooLarge(Exception):
    """The request head did not end within the size limit."""


async def _read_head(stream: trio.SocketStream, limit: int) -> bytes | None:
    """Bytes up to and including the blank line, or None if the peer closed."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > limit:
            raise _RequestTooLarge
        chunk = await stream.receive_some(limit + 1 - len(buf))
        if not chunk:
            return None
        buf += chunk
    if len(buf) > limit:
        raise _RequestTooLarge
    return bytes(buf)


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


async def _open_udp(host: str, port: int) -> trio.socket.SocketType:
    family = stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET
    sock = trio.socket.socket(family, stdlib_socket.SOCK_DGRAM)
    try:
        if family == stdlib_socket.AF_INET6 and host == "::":
            # Dual stack on [::]: IPv4 clients appear as ::ffff:a.b.c.d, which
            # the STUN responder maps back to IPv4.
            sock.setsockopt(stdlib_socket.IPPROTO_IPV6, stdlib_socket.IPV6_V6ONLY, 0)
        await sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on UDP {HostPort(host, port)}: {exc.strerror}; "
            "choose another address or port"
        ) from None
    return sock


def _bound(sock: trio.socket.SocketType) -> HostPort:
    name = sock.getsockname()
    return HostPort(str(name[0]), int(name[1]))


async def serve(
    config: RelaydConfig,
    *,
    quic_datagram_handler: QuicDatagramHandler | None = None,
    relay: RelayPlugin | None = None,
    registry: Registry | None = None,
    task_status: trio.TaskStatus[BoundAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind every socket, report :class:`BoundAddresses`, serve until cancelled.

    With ``relay`` the main UDP port is the relay's (already bound) and STUN
    arrives through it; ``registry`` lets the relay's metrics share /metrics.
    Bind failures raise :class:`~p2psync.errors.ConfigError` before
    ``task_status.started``.
    """
    shell = _Relay(config, quic_datagram_handler, relay, registry)
    udp: trio.socket.SocketType | None = None
    if relay is None:
        udp = await _open_udp(config.listen.host, config.listen.port)
        udp_bound = _bound(udp)
    else:
        udp_bound = HostPort(*relay.udp_address())
        relay.set_stun_handler(shell.stun_from_relay)
    with udp if udp is not None else contextlib.nullcontext():
        alt: trio.socket.SocketType | None = None
        if config.stun_alt_port is not None:
            alt = await _open_udp(config.listen.host, config.stun_alt_port)
        try:
            try:
                listeners = await trio.open_tcp_listeners(config.http.port, host=config.http.host)
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on HTTP {config.http}: {exc.strerror}; "
                    "choose another --http address or port"
                ) from None
            bound = BoundAddresses(
                udp=udp_bound,
                stun_alt=_bound(alt) if alt is not None else None,
                http=_bound(listeners[0].socket),
            )
            async with trio.open_nursery() as nursery:
                if udp is not None:
                    nursery.start_soon(shell.udp_loop, udp, "main")
                if alt is not None:
                    nursery.start_soon(shell.udp_loop, alt, "alt")
                await nursery.start(trio.serve_listeners, shell.handle_http, listeners)
                log.info(
                    "relayd ready: udp=%s stun-alt=%s http=%s%s",
                    bound.udp,
                    bound.stun_alt or "off",
                    bound.http,
                    f" relay={relay.node_id_text}" if relay is not None else "",
                )
                task_status.started(bound)
        finally:
            if alt is not None:
                alt.close()
