"""The path driver: runs the path table's plan on a real endpoint (trio shell).

Theory
------
:class:`~p2psync.net.paths.PathTable` decides (sans-IO) which disco messages
go where and when; this module only carries that out on the endpoint's one
UDP socket, its relay hook, and - for the hard-NAT search - a fan of extra
UDP ports. Per endpoint one :class:`PathDriver`:

- :meth:`PathDriver.run` sleeps until the table's :meth:`~PathTable.next_deadline`
  (or a :meth:`PathDriver.kick`), then executes :meth:`~PathTable.poll`'s actions;
- inputs that may start work execute the plan at once, synchronously
  (:meth:`PathDriver.service`): a disco message (:meth:`disco_received`),
  a new candidate, the first datagram to a quiet peer (:meth:`traffic`);
- disco handling moved here from the endpoint, so every table call stays in
  one place::

    PING  direct   -> PONG(observed source) to the source; ping back if the
                      table says so (an unvalidated path: one RTT to validate)
    PING  relayed  -> PONG over the relay (validates nothing)
    PONG  direct   -> the table validates the path (or a spray hit)
    CALL_ME_MAYBE  -> the table learns the candidates and starts punching

The port fan (:class:`PortFan`, we are behind a hard NAT, the peer is not):
``count`` extra sockets bound like the main socket, each pinging the peer's
public address(es), so our NAT opens as many random public ports that accept
the peer. The first datagram a fan port receives from the peer's public IP
*locks* that port: from then on it is a two-way forwarder between the peer
and our main socket (which it reaches at the main socket's local address,
127.0.0.1 when the main socket is bound to the wildcard). The main socket
sees the peer's packets coming from the forwarder's local address - a direct
candidate of origin ``port-fan`` in the table, pinged, validated and used
like any other; QUIC still sees only the virtual address. Unlocked ports
close at the search's deadline; the rest close when the table says
(:class:`~p2psync.net.paths.ClosePortFan`). Datagrams from anyone else are
dropped and counted. At most ``PATHS_MAX_PORT_FANS`` fans are open at once.

Wire: nothing new (disco, see :mod:`.disco`).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import math
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from p2psync.crypto.identity import NodeId
from p2psync.defaults import PATHS_MAX_PORT_FANS
from p2psync.net.disco import BadDisco, CallMeMaybe, Candidate, CandidateKind, Ping, Pong
from p2psync.net.interfaces import ipv4_addresses
from p2psync.net.netcheck import NatKind
from p2psync.net.paths import (
    Action,
    Address,
    ClosePortFan,
    Network,
    OpenPortFan,
    Origin,
    SendCallMeMaybe,
    SendPing,
    SprayPings,
)

if TYPE_CHECKING:
    from p2psync.net.endpoint import Endpoint

logger = logging.getLogger(__name__)

# A fan port re-pings the peer's public address this often until it hears
# from it: refreshes the mapping (30 s conntrack timeout) well within it.
_FAN_REPING_INTERVAL: Final = 5.0
# The timer task sleeps at least this long between polls (a deadline that is
# already due, from float rounding or a bug, must not become a busy loop).
_MIN_SLEEP: Final = 0.001
# Bytes read per fan recvfrom: any UDP datagram.
_MAX_DATAGRAM: Final = 65535


@dataclass(slots=True)
class DriverStats:
    cmm_sent: int = 0
    cmm_received: int = 0
    pings_sent: int = 0
    spray_sent: int = 0
    fans_opened: int = 0
    fans_refused: int = 0  # PATHS_MAX_PORT_FANS reached
    fan_forwarded: int = 0  # datagrams the fans carried (both directions)
    fan_dropped: int = 0  # datagrams at a fan port from someone else


class PathDriver:
    """Executes one endpoint's path table plan. Created by the endpoint."""

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self.paths = endpoint.paths
        self.disco = endpoint.disco
        self.stats = DriverStats()
        self._lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._fans: dict[NodeId, PortFan] = {}
        self._public: tuple[Address, ...] = ()

    # -- what we tell peers about ourselves ------------------------------------------------

    def refresh_interfaces(self) -> None:
        """Re-read our interface addresses and networks (CALL_ME_MAYBE, LAN paths)."""
        self.paths.set_our_networks(interface_networks())
        self._update_candidates()

    def set_public_addresses(self, addresses: Iterable[Address]) -> None:
        """Our public address(es) as a STUN server or the relay saw them (netcheck)."""
        self._public = tuple(dict.fromkeys(addresses))
        self._update_candidates()

    def set_nat(self, nat: NatKind) -> None:
        """Our NAT kind (netcheck): picks the hard-NAT strategy, told to peers."""
        self.paths.set_our_nat(nat, trio.current_time())
        self.service(trio.current_time())

    def _update_candidates(self) -> None:
        host, port = self._endpoint.local_address
        local = [Candidate((ip, port), CandidateKind.LOCAL) for ip in local_addresses(host)]
        public = [Candidate(address, CandidateKind.REFLEXIVE) for address in self._public]
        self.paths.set_our_candidates([*local, *public], trio.current_time())

    async def run(self) -> None:
        """The timer task (the endpoint starts it): poll the table when it asks."""
        self.refresh_interfaces()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                while True:
                    self.service(trio.current_time())
                    deadline = self.paths.next_deadline()
                    if deadline is not None:  # never spin on a deadline already due
                        deadline = max(deadline, trio.current_time() + _MIN_SLEEP)
                    with trio.move_on_at(math.inf if deadline is None else deadline):
                        await self._lot.park()
            finally:
                self._nursery = None
                for fan in list(self._fans.values()):
                    fan.close_all()
                self._fans.clear()

    def kick(self) -> None:
        """The table's deadline may have moved earlier: re-read it."""
        self._lot.unpark_all()

    def service(self, now: float) -> None:
        """Run every action the table has due at ``now``."""
        for action in self.paths.poll(now):
            try:
                self._execute(action, now)
            except OSError as exc:  # e.g. no route, a port we cannot open
                logger.debug("path action %s failed: %s", type(action).__name__, exc)
        self.kick()

    # -- inputs from the endpoint ------------------------------------------------------

    def traffic(self, node_id: NodeId, now: float) -> None:
        """QUIC datagrams went to ``node_id``: start its heartbeat or punching if quiet."""
        if self.paths.traffic(node_id, now):
            self.service(now)

    def add_candidate(
        self, node_id: NodeId, address: Address, origin: Origin, *, reflexive: bool = False
    ) -> None:
        now = trio.current_time()
        self.paths.add_candidate(node_id, address, now, origin, reflexive=reflexive)
        self.service(now)

    def disco_received(
        self, data: bytes, source: Address, now: float, relayed_from: NodeId | None = None
    ) -> None:
        """One disco datagram; ``relayed_from``: it came over the relay from that peer."""
        endpoint = self._endpoint
        try:
            message = self.disco.open_untrusted(data)
        except BadDisco as exc:
            logger.debug("dropped disco datagram from %s: %s", source, exc)
            return
        if relayed_from is not None and message.sender != relayed_from:
            endpoint.stats.dropped_malformed += 1  # the relay vouches for src, the box for sender
            return
        if isinstance(message, CallMeMaybe):
            self.stats.cmm_received += 1
            logger.debug(
                "CALL_ME_MAYBE from %s: nat %s, %d candidate(s)",
                message.sender.short(),
                message.nat,
                len(message.candidates),
            )
            self.paths.call_me_maybe_received(message.sender, message.nat, message.candidates, now)
            self.service(now)
            return
        if relayed_from is not None:
            if isinstance(message, Ping):
                pong = self.disco.seal_pong(message.sender, message.tx_id, source)
                endpoint._send_relayed(message.sender, pong)
            return  # a pong over the relay validates no direct path
        if isinstance(message, Ping):
            ping_back = self.paths.ping_received(message.sender, source, now)
            try:
                pong = self.disco.seal_pong(message.sender, message.tx_id, source)
            except ValueError:  # a source address we cannot encode (scoped IPv6 text)
                return
            endpoint._send_run([pong], source, 0)
            if ping_back:
                self._ping(message.sender, source)
            self.service(now)
        elif isinstance(message, Pong):
            path = self.paths.pong_received(message.sender, message.tx_id, source, now)
            if path is not None:
                if path.origin is not Origin.PORT_FAN:
                    endpoint.observed_address = message.observed
                endpoint._pong_lot.unpark_all()
                self.service(now)

    # -- actions ------------------------------------------------------------------------

    def _execute(self, action: Action, now: float) -> None:
        if isinstance(action, SendPing):
            self._ping(action.node_id, action.address)
        elif isinstance(action, SendCallMeMaybe):
            message = self.disco.seal_call_me_maybe(action.node_id, action.nat, action.candidates)
            if self._endpoint._send_relayed(action.node_id, message):
                self.stats.cmm_sent += 1
        elif isinstance(action, SprayPings):
            tx_id = self.disco.new_tx_id()
            send_run = self._endpoint._send_run
            for address in action.addresses:
                send_run([self.disco.seal_ping(action.node_id, tx_id)], address, 0)
            self.stats.spray_sent += len(action.addresses)
            self.paths.spray_sent(action.node_id, action.addresses, tx_id, now)
        elif isinstance(action, OpenPortFan):
            self._open_fan(action)
        elif isinstance(action, ClosePortFan):
            fan = self._fans.get(action.node_id)
            if fan is not None:
                fan.close_except(action.keep)
                if fan.empty:
                    del self._fans[action.node_id]

    def fan_ports(self, node_id: NodeId) -> list[Address]:
        """Where our main socket reaches the open hard-NAT ports for ``node_id``."""
        fan = self._fans.get(node_id)
        return [] if fan is None else fan.ports

    def _ping(self, node_id: NodeId, address: Address) -> None:
        self.stats.pings_sent += 1
        self._endpoint._send_ping(node_id, address)

    def _open_fan(self, action: OpenPortFan) -> None:
        nursery = self._nursery
        if nursery is None:
            return
        old = self._fans.pop(action.node_id, None)
        if old is not None:
            old.close_all()
        if len(self._fans) >= PATHS_MAX_PORT_FANS:
            self.stats.fans_refused += 1
            logger.info(
                "hard-NAT search for %s skipped: %d port fans already open",
                action.node_id.short(),
                len(self._fans),
            )
            return
        fan = PortFan(self, action)
        self._fans[action.node_id] = fan
        self.stats.fans_opened += 1
        nursery.start_soon(fan.run)

    def _fan_hit(self, node_id: NodeId, forwarder: Address, remote: Address) -> None:
        now = trio.current_time()
        logger.debug("hard-NAT port %s reached by %s (%s)", forwarder[1], node_id.short(), remote)
        self.paths.port_fan_hit(node_id, forwarder, remote, now)

    def _fan_deliver(self, data: bytes, forwarder: Address) -> None:
        """A datagram a fan port forwards to the main socket (as from ``forwarder``).

        Fed and answered at once, as the endpoint's driver does after a read
        (so no application task sees aioquic's state ahead of the streams').
        """
        endpoint = self._endpoint
        now = trio.current_time()
        endpoint._datagram_received(data, forwarder, now)
        endpoint._flush(now)


class PortFan:
    """The extra ports of one hard-NAT search (see the module docstring)."""

    def __init__(self, driver: PathDriver, action: OpenPortFan) -> None:
        self._driver = driver
        self._action = action
        self.node_id = action.node_id
        self._targets = action.targets
        self._target_ips = {address[0] for address in action.targets}
        host, port = driver._endpoint.local_address
        unspecified = ipaddress.ip_address(host).is_unspecified
        self._bind_host = host
        self._main: Address = ("127.0.0.1" if unspecified else host, port)
        self._sockets: list[_FanPort] = []
        self._cancel = trio.CancelScope()

    @property
    def ports(self) -> list[Address]:
        return [p.forward for p in self._sockets if not p.closed]

    @property
    def empty(self) -> bool:
        return not any(not p.closed for p in self._sockets)

    async def run(self) -> None:
        with self._cancel:
            for _ in range(self._action.count):
                try:
                    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    await sock.bind((self._bind_host, 0))
                except OSError as exc:
                    opened = len(self._sockets)
                    logger.info("hard-NAT search: opened %d ports, then %s", opened, exc)
                    break
                forward = (self._main[0], int(sock.getsockname()[1]))
                self._sockets.append(_FanPort(sock, forward))
            try:
                async with trio.open_nursery() as nursery:
                    for fan_port in self._sockets:
                        nursery.start_soon(self._serve, fan_port)
                    with trio.move_on_at(self._action.until):
                        await trio.sleep_forever()
                    for fan_port in self._sockets:  # the search is over: unlocked ports go
                        if fan_port.remote is None:
                            fan_port.close()
                    if self.empty:
                        nursery.cancel_scope.cancel()
            finally:
                self.close_all()

    def close_except(self, keep: Address | None) -> None:
        for fan_port in self._sockets:
            if fan_port.forward != keep:
                fan_port.close()
        if self.empty:
            self._cancel.cancel()

    def close_all(self) -> None:
        self.close_except(None)

    async def _serve(self, fan_port: _FanPort) -> None:
        driver = self._driver
        stats = driver.stats
        sock = fan_port.sock
        with fan_port.scope, contextlib.suppress(trio.ClosedResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reping, fan_port)
                while True:
                    try:
                        data, source = await sock.recvfrom(_MAX_DATAGRAM)
                    except OSError as exc:  # ICMP errors from earlier sends
                        logger.debug("fan port %d: %s", fan_port.forward[1], exc)
                        continue
                    source = (str(source[0]), int(source[1]))
                    if source == self._main:
                        if fan_port.remote is None:
                            stats.fan_dropped += 1
                            continue
                        with contextlib.suppress(OSError):
                            await sock.sendto(data, fan_port.remote)
                            stats.fan_forwarded += 1
                        continue
                    if fan_port.remote is None and source[0] in self._target_ips:
                        fan_port.remote = source
                        driver._fan_hit(self.node_id, fan_port.forward, source)
                    if source != fan_port.remote:
                        stats.fan_dropped += 1
                        continue
                    stats.fan_forwarded += 1
                    driver._fan_deliver(data, fan_port.forward)

    async def _reping(self, fan_port: _FanPort) -> None:
        """Ping the peer's public address(es) from this port until one answers."""
        disco = self._driver.disco
        while fan_port.remote is None:
            for target in self._targets:
                ping = disco.seal_ping(self.node_id, disco.new_tx_id())
                with contextlib.suppress(OSError):
                    await fan_port.sock.sendto(ping, target)
            await trio.sleep(_FAN_REPING_INTERVAL)


class _FanPort:
    def __init__(self, sock: trio.socket.SocketType, forward: Address) -> None:
        self.sock = sock
        self.forward = forward  # where the main socket reaches this port
        self.remote: Address | None = None  # the peer, once it reached us here
        self.scope = trio.CancelScope()
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.scope.cancel()
            self.sock.close()


# -- interfaces ----------------------------------------------------------------------------

_SIOCGIFADDR: Final = 0x8915
_SIOCGIFNETMASK: Final = 0x891B


def interface_networks() -> list[Network]:
    """Our IPv4 interface networks (SIOCGIFADDR + SIOCGIFNETMASK; Linux, no packets)."""
    found: list[Network] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return found
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            request = struct.pack("256s", name.encode()[:15])
            try:
                address = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)[20:24])
                mask = socket.inet_ntoa(fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, request)[20:24])
            except OSError:
                continue  # no IPv4 address on this interface
            network = ipaddress.IPv4Network(f"{address}/{mask}", strict=False)
            if network not in found:
                found.append(network)
    return found


def local_addresses(bind_host: str) -> list[str]:
    """The interface addresses a peer may reach our socket at (for CALL_ME_MAYBE).

    A socket bound to one address is reachable there only; a wildcard one
    on every interface address but loopback (a peer's loopback is its own).
    """
    if not ipaddress.ip_address(bind_host).is_unspecified:
        return [bind_host]
    return [a for a in ipv4_addresses() if not ipaddress.ip_address(a).is_loopback]
