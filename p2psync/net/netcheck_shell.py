"""Run a :class:`~p2psync.net.netcheck.NetcheckProbe` (trio shells).

Two shells for the one plan:

- :func:`netcheck_on_endpoint`: the daemon's, on the node's own UDP socket
  (the mapping that matters is the one peers see); STUN answers come back
  through :meth:`Endpoint.set_stun_handler`;
- :func:`netcheck_on_new_socket`: ``p2psync netcheck``'s, on a fresh UDP
  socket (an endpoint-independent NAT maps it the same way; a hard one
  differs per socket anyway).

Both only send what the probe says, feed what arrives, sleep until its
deadline, and return its report. The relay's address may be a host name;
it is resolved once (:func:`resolve_udp`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket

import trio

from p2psync.errors import P2PSyncError
from p2psync.net.endpoint import Endpoint
from p2psync.net.interfaces import ipv4_addresses
from p2psync.net.netcheck import Address, NetcheckProbe, NetcheckReport


class NetcheckFailed(P2PSyncError):
    """The relay's address does not resolve, or no socket could be opened."""


async def resolve_udp(address: Address) -> Address:
    host, port = address
    try:
        ipaddress.ip_address(host)
        return address
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError as exc:
        raise NetcheckFailed(f"cannot resolve relay host {host!r}: {exc}") from None
    if not infos:
        raise NetcheckFailed(f"relay host {host!r} has no IPv4 address")
    return (str(infos[0][4][0]), int(infos[0][4][1]))


def _local_ips(bound_host: str) -> list[str]:
    if ipaddress.ip_address(bound_host).is_unspecified:
        return ipv4_addresses()
    return [bound_host]


async def netcheck_on_endpoint(
    endpoint: Endpoint, server: Address, alt_port: int | None
) -> NetcheckReport:
    """Probe from the node's socket. Takes the endpoint's STUN handler for the duration."""
    server = await resolve_udp(server)
    local = endpoint.local_address
    probe = NetcheckProbe(
        server,
        alt_port,
        local=local,
        local_ips=_local_ips(local[0]),
        random_bytes=os.urandom,
        now=trio.current_time(),
    )
    wake = trio.Event()

    def on_stun(data: bytes, source: Address) -> None:
        if probe.receive(data, source, trio.current_time()):
            wake.set()

    endpoint.set_stun_handler(on_stun)
    try:
        while not probe.done(trio.current_time()):
            for data, destination in probe.datagrams_to_send(trio.current_time()):
                endpoint.send_datagram(data, destination)
            deadline = probe.next_deadline(trio.current_time())
            if deadline is None:
                break
            with trio.move_on_at(deadline):
                await wake.wait()
            wake = trio.Event()
    finally:
        endpoint.set_stun_handler(None)
    return probe.report()


async def netcheck_on_new_socket(server: Address, alt_port: int | None) -> NetcheckReport:
    """Probe from a fresh wildcard UDP socket (``p2psync netcheck`` without a daemon)."""
    server = await resolve_udp(server)
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            await sock.bind(("0.0.0.0", 0))
        except OSError as exc:
            raise NetcheckFailed(f"cannot open a UDP socket: {exc}") from None
        local = (str(sock.getsockname()[0]), int(sock.getsockname()[1]))
        probe = NetcheckProbe(
            server,
            alt_port,
            local=local,
            local_ips=_local_ips(local[0]),
            random_bytes=os.urandom,
            now=trio.current_time(),
        )
        while not probe.done(trio.current_time()):
            for data, destination in probe.datagrams_to_send(trio.current_time()):
                # No route, an ICMP error: the same as a lost datagram here.
                with contextlib.suppress(OSError):
                    await sock.sendto(data, destination)
            deadline = probe.next_deadline(trio.current_time())
            if deadline is None:
                break
            with trio.move_on_at(deadline):
                while True:
                    try:
                        data, source = await sock.recvfrom(2048)
                    except OSError:
                        continue  # e.g. ICMP port unreachable from an earlier send
                    if probe.receive(data, (str(source[0]), int(source[1])), trio.current_time()):
                        break
        return probe.report()
