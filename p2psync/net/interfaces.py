"""Addresses: parsing ``HOST:PORT`` text, and this host's IPv4 interface addresses.

Read with the ``SIOCGIFADDR`` ioctl per interface, so it works inside a
network namespace and sends no packet. Loopback comes last: it only helps
a peer on the same machine.
"""

from __future__ import annotations

import fcntl
import socket
import struct

from p2psync.errors import ConfigError

_SIOCGIFADDR = 0x8915


def parse_host_port(text: str, *, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[v6]:PORT``; :class:`ConfigError` says what is wrong."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ConfigError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{text!r}: port {port} is outside 0..65535")
    return host, port


def ipv4_addresses() -> list[str]:
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            address = socket.inet_ntoa(reply[20:24])
            if address not in found:
                found.append(address)
    return sorted(found, key=lambda a: (a.startswith("127."), a))
