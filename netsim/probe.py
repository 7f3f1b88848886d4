"""Probe clients for NAT self-tests, run inside a host's namespace.

Each subcommand prints JSON on stdout (one object; ``listen`` prints one
object per line as events happen) and is bounded in time.

``nat --primary A --secondary B --third C``
    From ONE local socket: PING responder A and responder B (the mapping each
    one saw), PING-ALT A (does a reply from A's other port get in?), and ask A
    to have C send to the mapping (does a packet from an address we never
    contacted get in?). ``--dns D`` also PINGs D (a responder on port 53).
``listen --stun A --local-port N --duration S``
    Learn our mapping from A, print it, then print every datagram received.
``send --to E --local-port N``
    Send a few datagrams to E (e.g. another host's mapping, for hairpinning).
``rtt --to A --count N``
    Ping-pong with responder A, print the round-trip times.
``tcp-sink --port P`` / ``tcp-send --to E --bytes N``
    One TCP transfer; the sink prints the bytes and the seconds from
    connection to end of stream (for rate limits).
"""

from __future__ import annotations

import argparse
import json
import secrets
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from netsim.wire import (
    MAX_MESSAGE_SIZE,
    Endpoint,
    format_endpoint,
    parse_endpoint_untrusted,
)

DEFAULT_ATTEMPT_TIMEOUT_S = 0.4
DEFAULT_ATTEMPTS = 3
DEFAULT_NEGATIVE_WAIT_S = 0.6
"""How long to wait for a packet that filtering is expected to drop."""


@dataclass(frozen=True, slots=True)
class NatProbeResult:
    local: str
    """The socket's own address (the source address the route picks)."""
    mapped_primary: str | None
    """What responder A saw; None when A never answered."""
    mapped_secondary: str | None
    alt_port_reply: bool | None
    """A's reply from its alternate port got through (None: not tested)."""
    unsolicited_from_third: bool | None
    """A packet from responder C, never contacted, got through (None: not tested)."""
    dns_reachable: bool | None
    """The responder on port 53 answered (None: not tested)."""


def probe_nat(
    *,
    primary: Endpoint,
    secondary: Endpoint,
    third: Endpoint,
    dns: Endpoint | None = None,
    local_port: int = 0,
    attempt_timeout_s: float = DEFAULT_ATTEMPT_TIMEOUT_S,
    attempts: int = DEFAULT_ATTEMPTS,
    negative_wait_s: float = DEFAULT_NEGATIVE_WAIT_S,
) -> NatProbeResult:
    with _udp_socket(local_port) as sock:
        local = (_source_address_towards(primary), sock.getsockname()[1])
        mapped_primary = request_mapping(sock, primary, attempt_timeout_s, attempts)
        mapped_secondary = request_mapping(sock, secondary, attempt_timeout_s, attempts)
        alt_port_reply: bool | None = None
        unsolicited: bool | None = None
        if mapped_primary is not None:
            alt_port_reply = _alt_port_reply_arrives(sock, primary, negative_wait_s)
            unsolicited = _unsolicited_arrives(
                sock, primary, third, mapped_primary, negative_wait_s
            )
        dns_reachable = (
            None
            if dns is None
            else request_mapping(sock, dns, attempt_timeout_s, attempts) is not None
        )
    return NatProbeResult(
        local=format_endpoint(local),
        mapped_primary=None if mapped_primary is None else format_endpoint(mapped_primary),
        mapped_secondary=None if mapped_secondary is None else format_endpoint(mapped_secondary),
        alt_port_reply=alt_port_reply,
        unsolicited_from_third=unsolicited,
        dns_reachable=dns_reachable,
    )


def request_mapping(
    sock: socket.socket, responder: Endpoint, attempt_timeout_s: float, attempts: int
) -> Endpoint | None:
    """PING ``responder`` (with retries); return the source endpoint it saw, or None."""
    nonce = secrets.token_hex(6)
    for _ in range(attempts):
        sock.sendto(f"PING {nonce}".encode(), responder)
        deadline = time.monotonic() + attempt_timeout_s
        while (message := _receive(sock, deadline)) is not None:
            fields, source = message
            if source == responder and fields[:2] == ["SEEN", nonce] and len(fields) == 3:
                return parse_endpoint_untrusted(fields[2])
    return None


def measure_rtts(
    sock: socket.socket, responder: Endpoint, count: int, timeout_s: float
) -> tuple[list[float], int]:
    """Round-trip times in ms of ``count`` PINGs (sequential), and how many got lost."""
    rtts: list[float] = []
    lost = 0
    for _ in range(count):
        started = time.monotonic()
        if request_mapping(sock, responder, timeout_s, 1) is None:
            lost += 1
        else:
            rtts.append((time.monotonic() - started) * 1000)
    return rtts, lost


def _alt_port_reply_arrives(sock: socket.socket, responder: Endpoint, wait_s: float) -> bool:
    nonce = secrets.token_hex(6)
    return _answer_arrives(
        sock,
        f"PING-ALT {nonce}".encode(),
        responder,
        wait_s,
        lambda fields, source: fields[:2] == ["SEEN", nonce] and source[0] == responder[0],
    )


def _unsolicited_arrives(
    sock: socket.socket,
    via: Endpoint,
    third: Endpoint,
    target: Endpoint,
    wait_s: float,
) -> bool:
    nonce = secrets.token_hex(6)
    return _answer_arrives(
        sock,
        f"FORWARD {format_endpoint(third)} {nonce} {format_endpoint(target)}".encode(),
        via,
        wait_s,
        lambda fields, source: fields[:2] == ["UNSOLICITED", nonce],
    )


def _answer_arrives(
    sock: socket.socket,
    request: bytes,
    destination: Endpoint,
    wait_s: float,
    matches: Callable[[list[str], Endpoint], bool],
) -> bool:
    """Send ``request`` (again at half time); True if a matching datagram arrives in time."""
    deadline = time.monotonic() + wait_s
    resend_at: float | None = time.monotonic() + wait_s / 2
    sock.sendto(request, destination)
    while (now := time.monotonic()) < deadline:
        if resend_at is not None and now >= resend_at:
            sock.sendto(request, destination)
            resend_at = None
        message = _receive(sock, deadline if resend_at is None else resend_at)
        if message is not None and matches(*message):
            return True
    return False


def _receive(sock: socket.socket, deadline: float) -> tuple[list[str], Endpoint] | None:
    """The next datagram before ``deadline`` as (fields, source), or None."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    sock.settimeout(remaining)
    try:
        data, (host, port) = sock.recvfrom(MAX_MESSAGE_SIZE + 1)
    except (TimeoutError, ConnectionRefusedError):
        return None
    return data.decode("ascii", errors="replace").split(), (host, port)


def _source_address_towards(destination: Endpoint) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as route_probe:
        route_probe.connect(destination)
        address: str = route_probe.getsockname()[0]
        return address


def _udp_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock


def _print_json(value: object) -> None:
    print(json.dumps(value, sort_keys=True), flush=True)


def _listen(stun: Endpoint, local_port: int, duration_s: float, attempt_timeout_s: float) -> None:
    with _udp_socket(local_port) as sock:
        mapped = request_mapping(sock, stun, attempt_timeout_s, DEFAULT_ATTEMPTS)
        _print_json(
            {
                "event": "mapped",
                "local": format_endpoint((_source_address_towards(stun), local_port)),
                "mapped": None if mapped is None else format_endpoint(mapped),
            }
        )
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            message = _receive(sock, deadline)
            if message is None:
                continue
            fields, source = message
            _print_json(
                {
                    "event": "received",
                    "source": format_endpoint(source),
                    "payload": " ".join(fields),
                }
            )
    _print_json({"event": "done"})


def _tcp_sink(port: int, timeout_s: float) -> dict[str, float]:
    with socket.create_server(("0.0.0.0", port)) as server:
        print("listening", flush=True)
        server.settimeout(timeout_s)
        connection, _ = server.accept()
        with connection:
            connection.settimeout(timeout_s)
            started = time.monotonic()
            received = 0
            while chunk := connection.recv(65536):
                received += len(chunk)
            return {"bytes": received, "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netsim.probe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    endpoint = parse_endpoint_untrusted

    nat = commands.add_parser("nat", help="mapping and filtering behaviour")
    nat.add_argument("--primary", type=endpoint, required=True)
    nat.add_argument("--secondary", type=endpoint, required=True)
    nat.add_argument("--third", type=endpoint, required=True)
    nat.add_argument("--dns", type=endpoint)
    nat.add_argument("--local-port", type=int, default=0)
    nat.add_argument("--attempt-timeout", type=float, default=DEFAULT_ATTEMPT_TIMEOUT_S)
    nat.add_argument("--negative-wait", type=float, default=DEFAULT_NEGATIVE_WAIT_S)

    listen = commands.add_parser("listen", help="learn our mapping, then report what arrives")
    listen.add_argument("--stun", type=endpoint, required=True)
    listen.add_argument("--local-port", type=int, required=True)
    listen.add_argument("--duration", type=float, default=3.0)
    listen.add_argument("--attempt-timeout", type=float, default=DEFAULT_ATTEMPT_TIMEOUT_S)

    send = commands.add_parser("send", help="send a few datagrams")
    send.add_argument("--to", type=endpoint, required=True)
    send.add_argument("--local-port", type=int, default=0)
    send.add_argument("--count", type=int, default=3)
    send.add_argument("--interval", type=float, default=0.1)
    send.add_argument("--payload", default="HELLO")

    rtt = commands.add_parser("rtt", help="round-trip times to a responder")
    rtt.add_argument("--to", type=endpoint, required=True)
    rtt.add_argument("--count", type=int, default=5)
    rtt.add_argument("--timeout", type=float, default=2.0)

    sink = commands.add_parser("tcp-sink", help="receive one TCP stream, report its duration")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--timeout", type=float, default=30.0)

    tcp_send = commands.add_parser("tcp-send", help="send N bytes over one TCP connection")
    tcp_send.add_argument("--to", type=endpoint, required=True)
    tcp_send.add_argument("--bytes", type=int, required=True)

    options = parser.parse_args(argv)
    if options.command == "tcp-sink":
        _print_json(_tcp_sink(options.port, options.timeout))
    elif options.command == "tcp-send":
        with socket.create_connection(options.to, timeout=30) as connection:
            connection.sendall(b"\0" * options.bytes)
        _print_json({"sent": options.bytes})
    elif options.command == "nat":
        result = probe_nat(
            primary=options.primary,
            secondary=options.secondary,
            third=options.third,
            dns=options.dns,
            local_port=options.local_port,
            attempt_timeout_s=options.attempt_timeout,
            negative_wait_s=options.negative_wait,
        )
        _print_json(asdict(result))
    elif options.command == "listen":
        _listen(options.stun, options.local_port, options.duration, options.attempt_timeout)
    elif options.command == "send":
        with _udp_socket(options.local_port) as sock:
            for index in range(options.count):
                if index:
                    time.sleep(options.interval)
                sock.sendto(options.payload.encode(), options.to)
        _print_json({"sent": options.count})
    else:
        with _udp_socket(0) as sock:
            rtts, lost = measure_rtts(sock, options.to, options.count, options.timeout)
        _print_json({"rtt_ms": rtts, "lost": lost})
    return 0


if __name__ == "__main__":
    sys.exit(main())
