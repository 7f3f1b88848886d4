"""A tiny STUN-like UDP responder for NAT self-tests (run inside a namespace).

``python -m netsim.responder --port 3478 --alt-port 3479 --extra-port 53``
binds the ports, prints ``ready <ports>`` and answers until ``--lifetime``
seconds have passed or ``--max-datagrams`` arrived (it is always bounded).

Wire format: one ASCII datagram per message, fields separated by spaces,
at most 512 bytes; anything else is ignored.

-> ``PING <nonce>``
<- ``SEEN <nonce> <ip>:<port>`` from the port that got the PING: the source
   address the responder saw, i.e. the client's mapping.
-> ``PING-ALT <nonce>``
<- ``SEEN <nonce> <ip>:<port>`` from the *alternate* port: reaches the client
   only through a NAT whose filtering ignores the remote port.
-> ``FORWARD <responder ip>:<port> <nonce> <target ip>:<port>``
<- (to the other responder) ``SEND-TO <nonce> <target ip>:<port>``
-> ``SEND-TO <nonce> <target ip>:<port>``
<- (to the target) ``UNSOLICITED <nonce>``: a packet from an address the
   client never sent to; it passes only endpoint-independent filtering.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import sys
import time

from netsim.wire import MAX_MESSAGE_SIZE, format_endpoint, parse_endpoint_untrusted


def serve(
    sockets: list[socket.socket],
    *,
    alternate: socket.socket | None,
    lifetime_s: float,
    max_datagrams: int,
) -> int:
    """Answer requests on ``sockets`` until the lifetime or datagram budget is spent."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    primary = sockets[0]
    deadline = time.monotonic() + lifetime_s
    handled = 0
    while handled < max_datagrams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        for key, _ in selector.select(timeout=remaining):
            ready = key.fileobj
            if not isinstance(ready, socket.socket):
                continue
            try:
                data, (host, port) = ready.recvfrom(MAX_MESSAGE_SIZE + 1)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            handled += 1
            _answer(data, (host, port), ready, primary=primary, alternate=alternate)
    return handled


def _answer(
    data: bytes,
    source: tuple[str, int],
    sock: socket.socket,
    *,
    primary: socket.socket,
    alternate: socket.socket | None,
) -> None:
    if len(data) > MAX_MESSAGE_SIZE:
        return
    fields = data.decode("ascii", errors="replace").split()
    if not fields:
        return
    try:
        if fields[0] == "PING" and len(fields) == 2:
            reply = f"SEEN {fields[1]} {format_endpoint(source)}".encode()
            sock.sendto(reply, source)
        elif fields[0] == "PING-ALT" and len(fields) == 2 and alternate is not None:
            reply = f"SEEN {fields[1]} {format_endpoint(source)}".encode()
            alternate.sendto(reply, source)
        elif fields[0] == "FORWARD" and len(fields) == 4:
            other = parse_endpoint_untrusted(fields[1])
            target = parse_endpoint_untrusted(fields[3])
            sock.sendto(f"SEND-TO {fields[2]} {format_endpoint(target)}".encode(), other)
        elif fields[0] == "SEND-TO" and len(fields) == 3:
            target = parse_endpoint_untrusted(fields[2])
            primary.sendto(f"UNSOLICITED {fields[1]}".encode(), target)
    except ValueError:
        return  # malformed endpoint: ignore, like any other junk
    except OSError:
        return  # unreachable target: the probe's timeout tells the story


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netsim.responder", description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="primary UDP port")
    parser.add_argument("--alt-port", type=int, help="alternate port for PING-ALT replies")
    parser.add_argument(
        "--extra-port", type=int, action="append", default=[], help="more ports answering PING"
    )
    parser.add_argument("--lifetime", type=float, default=120.0, help="seconds, then exit")
    parser.add_argument("--max-datagrams", type=int, default=100_000)
    options = parser.parse_args(argv)

    def bind(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", port))
        return sock

    sockets = [bind(options.port), *(bind(port) for port in options.extra_port)]
    alternate = bind(options.alt_port) if options.alt_port else None
    if alternate is not None:
        sockets.append(alternate)
    ports = " ".join(str(sock.getsockname()[1]) for sock in sockets)
    print(f"ready {ports}", flush=True)
    handled = serve(
        sockets,
        alternate=alternate,
        lifetime_s=options.lifetime,
        max_datagrams=options.max_datagrams,
    )
    print(f"done after {handled} datagrams", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
