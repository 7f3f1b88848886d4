"""This host's IPv4 interface addresses (for tickets and, later, candidates).

Read with the ``SIOCGIFADDR`` ioctl per interface, so it works inside a
network namespace and sends no packet. Loopback comes last: it only helps
a peer on the same machine.
"""

from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915


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
