"""relayd.server over real loopback sockets: STUN, HTTP, abuse, shutdown."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket as stdlib_socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from p2psync.errors import ConfigError
from p2psync.net.stun import (
    Attr,
    StunErrorResponse,
    binding_request,
    decode_stun_untrusted,
    parse_binding_response,
)
from relayd.config import HostPort, RelaydConfig, override_limits
from relayd.server import BoundAddresses, QuicDatagramHandler, serve

LOOPBACK = HostPort("127.0.0.1", 0)


def _config(**limits: object) -> RelaydConfig:
    config = RelaydConfig(listen=LOOPBACK, http=LOOPBACK, stun_alt_port=0)
    return override_limits(config, **limits) if limits else config


@asynccontextmanager
async def running(
    config: RelaydConfig, quic_datagram_handler: QuicDatagramHandler | None = None
) -> AsyncIterator[BoundAddresses]:
    async with trio.open_nursery() as nursery:
        bound: BoundAddresses = await nursery.start(
            partial(serve, config, quic_datagram_handler=quic_datagram_handler)
        )
        yield bound
        nursery.cancel_scope.cancel()


async def stun_query(
    server: HostPort,
    *,
    txid: bytes = b"0123456789ab",
    family: int = stdlib_socket.AF_INET,
    source_ip: str = "127.0.0.1",
) -> tuple[tuple[str, int], tuple[str, int]]:
    """(mapped address the server saw, our socket's address)."""
    with trio.socket.socket(family, stdlib_socket.SOCK_DGRAM) as sock:
        await sock.bind(("::1" if family == stdlib_socket.AF_INET6 else source_ip, 0))
        ours = sock.getsockname()
        await sock.sendto(binding_request(txid), (server.host, server.port))
        with trio.fail_after(5):
            data, _ = await sock.recvfrom(2048)
        return parse_binding_response(data, txid), (ours[0], ours[1])


async def http_get(server: HostPort, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        await stream.send_all(raw)
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), headers, body


async def scrape(server: HostPort) -> dict[str, float]:
    status, headers, body = await http_get(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# --- STUN ------------------------------------------------------------------------


async def test_stun_gives_our_address_on_both_ports() -> None:
    async with running(_config()) as bound:
        assert bound.stun_alt is not None
        assert bound.stun_alt.port != bound.udp.port
        mapped, ours = await stun_query(bound.udp)
        assert mapped == ours
        mapped_alt, ours_alt = await stun_query(bound.stun_alt, txid=b"abcdefghijkl")
        assert mapped_alt == ours_alt
        metrics = await scrape(bound.http)
        assert metrics['relayd_stun_responses_total{port="main",kind="success"}'] == 1
        assert metrics['relayd_stun_responses_total{port="alt",kind="success"}'] == 1


async def test_stun_over_ipv6() -> None:
    config = RelaydConfig(listen=HostPort("::1", 0), http=LOOPBACK)
    async with running(config) as bound:
        assert bound.stun_alt is None
        mapped, ours = await stun_query(bound.udp, family=stdlib_socket.AF_INET6)
        assert mapped == ours
        assert mapped[0] == "::1"


async def test_dual_stack_maps_ipv4_clients_back_to_ipv4() -> None:
    async with running(RelaydConfig(listen=HostPort("::", 0), http=LOOPBACK)) as bound:
        mapped, ours = await stun_query(HostPort("127.0.0.1", bound.udp.port))
        assert mapped == ours
        assert mapped[0] == "127.0.0.1"


async def test_stun_unknown_attribute_gets_420_over_the_wire() -> None:
    async with running(_config()) as bound:
        request = bytearray(binding_request(b"x" * 12, fingerprint=False))
        request[2:4] = (8).to_bytes(2, "big")
        request += b"\x00\x02\x00\x04\x00\x00\x00\x00"  # RESPONSE-ADDRESS: refused
        with trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            await sock.sendto(bytes(request), (bound.udp.host, bound.udp.port))
            with trio.fail_after(5):
                data, _ = await sock.recvfrom(2048)
        with pytest.raises(StunErrorResponse) as caught:
            parse_binding_response(data, b"x" * 12)
        assert caught.value.code == 420
        assert decode_stun_untrusted(data).first(Attr.UNKNOWN_ATTRIBUTES) == b"\x00\x02"
        metrics = await scrape(bound.http)
        assert metrics['relayd_stun_responses_total{port="main",kind="error"}'] == 1


async def test_garbage_datagrams_are_dropped_and_counted() -> None:
    async with running(_config()) as bound:
        garbage = [
            b"",
            b"\x00",
            b"\xc0" + os.urandom(1199),  # looks like a QUIC Initial
            b"\x40" + os.urandom(40),  # QUIC short header
            bytes(20),  # STUN-shaped, not a request we answer
            binding_request(b"t" * 12)[:-1],  # truncated
            b"\x01\x01\x00\x00\x21\x12\xa4\x42" + bytes(12),  # a response, not a request
            os.urandom(65000),
        ]
        with trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            for datagram in garbage:
                await sock.sendto(datagram, (bound.udp.host, bound.udp.port))
            for datagram in garbage[:3]:
                assert bound.stun_alt is not None
                await sock.sendto(datagram, (bound.stun_alt.host, bound.stun_alt.port))
        # Still alive and answering:
        mapped, ours = await stun_query(bound.udp)
        assert mapped == ours
        metrics = await scrape(bound.http)
        assert metrics['relayd_udp_datagrams_received_total{port="main"}'] == len(garbage) + 1
        assert metrics['relayd_dropped_datagrams_total{reason="no-quic-handler"}'] >= 3
        assert metrics['relayd_dropped_datagrams_total{reason="not-stun-on-alt-port"}'] == 3
        dropped = sum(v for k, v in metrics.items() if k.startswith("relayd_dropped_datagrams"))
        assert dropped == len(garbage) + 3


async def test_non_stun_goes_to_the_quic_hook() -> None:
    seen: list[tuple[bytes, tuple[str, int]]] = []

    def hook(data: bytes, source: tuple[str, int], now: float) -> None:
        seen.append((data, source))

    async with running(_config(), quic_datagram_handler=hook) as bound:
        with trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            await sock.sendto(b"\xc0quic", (bound.udp.host, bound.udp.port))
            ours = sock.getsockname()
        mapped, ours_stun = await stun_query(bound.udp)  # STUN is not handed over
        assert mapped == ours_stun
        assert seen == [(b"\xc0quic", (ours[0], ours[1]))]


async def test_stun_flood_is_rate_limited() -> None:
    rate, burst, sent = 2.0, 5, 200
    async with running(_config(stun_per_ip_rate=rate, stun_per_ip_burst=burst)) as bound:
        with trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            started = time.monotonic()
            for i in range(sent):
                await sock.sendto(binding_request(i.to_bytes(12, "big")), bound.udp)
            answers = 0
            with trio.move_on_after(0.5):
                while True:
                    data, _ = await sock.recvfrom(2048)
                    parse_binding_response(data, decode_stun_untrusted(data).transaction_id)
                    answers += 1
            elapsed = time.monotonic() - started
        assert burst <= answers <= burst + rate * elapsed
        # Another source IP has its own bucket (Linux routes all of 127/8 to lo):
        mapped, ours = await stun_query(bound.udp, source_ip="127.0.0.2")
        assert mapped == ours
        metrics = await scrape(bound.http)
        assert metrics['relayd_stun_rate_limited_total{port="main"}'] == sent - answers


# --- HTTP ------------------------------------------------------------------------


async def test_health() -> None:
    async with running(_config()) as bound:
        status, headers, body = await http_get(bound.http, b"GET /health HTTP/1.1\r\n\r\n")
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        assert int(headers["Content-Length"]) == len(body)
        health = json.loads(body)
        assert health["status"] == "ok"
        assert health["version"]
        assert health["uptime_s"] >= 0
        assert (health["connections"], health["nodes"]) == (0, 0)
        status, headers, body = await http_get(bound.http, b"HEAD /health HTTP/1.0\n\n")
        assert (status, body) == (200, b"")


async def test_metrics_lists_the_relay_metrics() -> None:
    async with running(_config()) as bound:
        metrics = await scrape(bound.http)
        assert metrics["relayd_connections"] == 0
        assert metrics["relayd_uptime_seconds"] >= 0
        _, _, body = await http_get(bound.http, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert b"# TYPE relayd_dropped_datagrams_total counter" in body


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"POST /health HTTP/1.1\r\n\r\n", 405),
        (b"GET /health\r\n\r\n", 400),
        (b"\xff\xfe garbage \x00\r\n\r\n", 400),
        (b"GET /health HTTP/2.0\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\n" + b"X: " + b"a" * 10_000 + b"\r\n\r\n", 431),
    ],
)
async def test_bad_http_requests(raw: bytes, status: int) -> None:
    async with running(_config()) as bound:
        got, _, _ = await http_get(bound.http, raw)
        assert got == status
        health, _, _ = await http_get(bound.http, b"GET /health HTTP/1.1\r\n\r\n")
        assert health == 200


async def test_slow_and_silent_http_clients_are_cut() -> None:
    async with running(_config(http_request_timeout_s=0.2)) as bound:
        stream = await trio.open_tcp_stream(bound.http.host, bound.http.port)
        async with stream:
            await stream.send_all(b"GET /health HTTP/1.1\r\n")  # never finishes
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""  # closed by the server
        half_closed = await trio.open_tcp_stream(bound.http.host, bound.http.port)
        async with half_closed:
            await half_closed.send_eof()
        await trio.sleep(0.05)
        metrics = await scrape(bound.http)
        assert metrics['relayd_http_rejected_total{reason="timeout-or-closed"}'] == 2


async def test_http_connection_limit() -> None:
    async with running(_config(http_max_connections=2, http_request_timeout_s=2.0)) as bound:
        idle = [await trio.open_tcp_stream(bound.http.host, bound.http.port) for _ in range(2)]
        await trio.sleep(0.2)
        stream = await trio.open_tcp_stream(bound.http.host, bound.http.port)
        async with stream:
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""
        for s in idle:
            await s.aclose()
        await trio.sleep(0.1)
        metrics = await scrape(bound.http)
        assert metrics['relayd_http_rejected_total{reason="overloaded"}'] == 1


# --- lifecycle ---------------------------------------------------------------------


async def test_address_in_use_is_a_config_error() -> None:
    async with running(_config()) as bound:
        taken = RelaydConfig(listen=bound.udp, http=LOOPBACK)
        with pytest.raises(ConfigError, match="cannot listen on UDP"):
            await serve(taken)
        taken_http = RelaydConfig(listen=LOOPBACK, http=bound.http)
        with pytest.raises(ConfigError, match="cannot listen on HTTP"):
            await serve(taken_http)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_process_exits_0_on_signal(signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayd", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "relayd ready" in line
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
        assert "shutting down" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_process_bind_failure_exits_2() -> None:
    with stdlib_socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "relayd",
                "--listen",
                f"127.0.0.1:{port}",
                "--http",
                "127.0.0.1:0",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.startswith("relayd: cannot listen on UDP")


async def test_flood_logs_once_and_never_payload(caplog: pytest.LogCaptureFixture) -> None:
    marker = b"SECRET-PAYLOAD-MARKER"
    caplog.set_level(logging.DEBUG)
    async with running(_config(stun_per_ip_rate=0.001, stun_per_ip_burst=1)) as bound:
        request = bytearray(binding_request(b"m" * 12, fingerprint=False))
        request[2:4] = (4 + 24).to_bytes(2, "big")
        request += b"\x80\x22\x00\x15" + marker + b"\x00\x00\x00"  # SOFTWARE carries the marker
        with trio.socket.socket(stdlib_socket.AF_INET, stdlib_socket.SOCK_DGRAM) as sock:
            await sock.bind(("127.0.0.1", 0))
            for _ in range(50):
                await sock.sendto(bytes(request), bound.udp)
                await sock.sendto(b"\xc0" + marker, bound.udp)
        # Barrier: one socket queue, so this answer means the flood was handled.
        await stun_query(bound.udp, source_ip="127.0.0.2")
        metrics = await scrape(bound.http)
        assert metrics['relayd_stun_rate_limited_total{port="main"}'] == 49
    limit_lines = [r for r in caplog.records if "rate limit" in r.getMessage()]
    assert len(limit_lines) == 1
    assert metrics["relayd_log_lines_suppressed_total"] == 48
    for record in caplog.records:
        assert marker.decode() not in record.getMessage()
