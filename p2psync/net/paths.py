"""Path table: where a peer's packets go now (sans-IO).

Theory
------
QUIC never sees a real address. Every peer NodeId has a stable **virtual
address** (:func:`virtual_address`); QUIC connections to that peer use it as
their peer address, so QUIC never observes a path change (no RFC 9000 §9
migration, no path validation of its own). Underneath, this table keeps,
per peer, its candidate **direct paths** (UDP addresses) and their state,
plus one **relay path** (through the node's home relay, when the shell has
one: :meth:`PathTable.set_relay`), and answers :meth:`PathTable.route`:
"where does this peer's next datagram go". The QUIC shell asks it once per
outgoing datagram (cached per transmit call).

Route choice (:meth:`PathTable.route`)::

    1. a VALIDATED direct path (lowest RTT)                -> that address
    2. else, if a relay is set (and the peer is not the
       relay server itself: never relay the relay)        -> RELAY
    3. else (no relay) the optimistic direct choice:
       the address heard from last, else the newest
       candidate; the QUIC handshake decides if it works  -> that address
    4. else                                                -> None (drop)

Rule 3 is the behaviour without a relay, unchanged: without an alternative,
trying an unproven address costs nothing. With a relay, only a proven
(pong-validated) direct path beats it, so a connection starts relayed and
moves to direct as soon as a pong validates a path, and back to the relay
when the path's validation expires (missed keep-alive pongs), all without
QUIC noticing.

Pings the shell should send (:meth:`PathTable.pings_due`), only while a
relay is set (without one nothing depends on validation)::

    validated best path, no pong or ping for keepalive_interval -> keep-alive PING
    no validated path: each candidate not pinged for
                       reprobe_interval                          -> probe PING

The shell asks after sending a peer's datagrams (traffic-driven, as
Tailscale does: idle peers cost nothing) and after an authenticated PING
from a peer (the "ping back" that validates the path in our direction too,
so the acceptor of a direct dial does not answer over the relay).

Path states (one table, transitions only here)::

    UNKNOWN   --ping_sent-->      PROBING
    PROBING   --pong_received-->  VALIDATED   (pong from the pinged address,
                                               tx id matches an outstanding ping)
    VALIDATED --no pong for PATHS_VALIDITY--> UNKNOWN   (evaluated lazily at `now`)
    any       --ping_sent-->      same state, or PROBING if UNKNOWN

It also remembers which NodeId an authenticated disco PING came from, per
source address (:meth:`PathTable.ping_received` / :meth:`node_for_source`), so
the acceptor can bind a QUIC Initial from that address to the peer.

Virtual addresses are IPv6 ULAs (RFC 4193) under ``fd70:3270:7364::/48``
("p2pd") followed by the first 80 bits of the NodeId, with port 0: no
real datagram has source port 0, so virtual and real addresses never mix.

Everything takes ``now`` (seconds, any monotonic origin); nothing here reads
a clock or does I/O. Every table is bounded (LRU).

The relay's pseudo-address of a peer (the source the shell gives disco
messages that came over the relay) is its virtual address: port 0 never
becomes a direct candidate (:meth:`PathTable.add_candidate` ignores it).
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, Literal

from p2psync.crypto.identity import NodeId
from p2psync.defaults import (
    PATHS_MAX_ADDRESSES_PER_PEER,
    PATHS_MAX_PEERS,
    PATHS_SOURCE_MAPPING_TTL,
    PATHS_VALIDITY,
)

Address = tuple[str, int]

_VIRTUAL_PREFIX: Final = bytes.fromhex("fd7032707364")  # fd70:3270:7364::/48
VIRTUAL_PORT: Final = 0
# Outstanding pings remembered per peer (the oldest is forgotten first).
_MAX_PENDING_PINGS: Final = 16
# TODO(lead): move these two to p2psync.defaults (this change may not edit it).
# Keep-alive PING on an active validated path this often: a third of
# PATHS_VALIDITY, so two pongs may be lost before the path falls back to the
# relay, and well under the 30 s UDP mapping timeout of strict NATs (RFC 4787 REQ-5
# asks for >= 2 min, many home routers use 30 s).
PATHS_KEEPALIVE_INTERVAL: Final = 10.0
# While relayed, re-probe each unvalidated direct candidate this often.
PATHS_REPROBE_INTERVAL: Final = 5.0


class RelayRoute(enum.Enum):
    """The relay path (a singleton: :data:`RELAY`)."""

    RELAY = "relay"


RELAY: Final = RelayRoute.RELAY
Route = Address | Literal[RelayRoute.RELAY]


class PathState(enum.Enum):
    UNKNOWN = "unknown"
    PROBING = "probing"
    VALIDATED = "validated"


@dataclass(slots=True)
class DirectPath:
    """One candidate UDP address of a peer."""

    address: Address
    added_at: float
    state: PathState = PathState.UNKNOWN
    rtt: float | None = None
    last_ping_sent: float | None = None
    last_pong: float | None = None
    last_heard: float | None = None  # last authenticated disco message from here


@dataclass(slots=True)
class _Peer:
    paths: OrderedDict[Address, DirectPath] = field(default_factory=OrderedDict)
    pending: OrderedDict[bytes, tuple[Address, float]] = field(default_factory=OrderedDict)
    relay_heard: float | None = None  # last datagram from this peer over the relay


def virtual_address(node_id: NodeId) -> Address:
    """The stable address QUIC uses for ``node_id`` (pure function)."""
    packed = _VIRTUAL_PREFIX + node_id.raw[:10]
    return (str(ipaddress.IPv6Address(packed)), VIRTUAL_PORT)


def is_virtual(address: Address) -> bool:
    return address[1] == VIRTUAL_PORT and address[0].startswith("fd70:3270:7364:")


class PathTable:
    """Per-peer direct paths and source-address mappings. See the module docstring."""

    def __init__(
        self,
        *,
        max_peers: int = PATHS_MAX_PEERS,
        max_addresses_per_peer: int = PATHS_MAX_ADDRESSES_PER_PEER,
        validity: float = PATHS_VALIDITY,
        source_mapping_ttl: float = PATHS_SOURCE_MAPPING_TTL,
        keepalive_interval: float = PATHS_KEEPALIVE_INTERVAL,
        reprobe_interval: float = PATHS_REPROBE_INTERVAL,
    ) -> None:
        self._keepalive = keepalive_interval
        self._reprobe = reprobe_interval
        self._relay = False
        self._relay_node_id: NodeId | None = None
        self._max_peers = max_peers
        self._max_addresses = max_addresses_per_peer
        self._validity = validity
        self._source_ttl = source_mapping_ttl
        self._peers: OrderedDict[NodeId, _Peer] = OrderedDict()
        self._sources: OrderedDict[Address, tuple[NodeId, float]] = OrderedDict()
        self._virtual: OrderedDict[Address, NodeId] = OrderedDict()

    # -- virtual addresses ---------------------------------------------------

    def virtual_address(self, node_id: NodeId) -> Address:
        """:func:`virtual_address`, remembered so :meth:`node_for_virtual` can invert it."""
        address = virtual_address(node_id)
        self._virtual[address] = node_id
        self._virtual.move_to_end(address)
        if len(self._virtual) > self._max_peers:
            self._virtual.popitem(last=False)
        return address

    def node_for_virtual(self, address: Address) -> NodeId | None:
        return self._virtual.get(address)

    # -- the relay path --------------------------------------------------------

    def set_relay(self, available: bool, relay_node_id: NodeId | None = None) -> None:
        """Whether the shell can send through a relay, and the relay server's NodeId.

        The relay server itself is never routed through the relay (its
        connection *is* the relay path).
        """
        self._relay = available
        self._relay_node_id = relay_node_id if available else None

    @property
    def relay_available(self) -> bool:
        return self._relay

    def add_peer(self, node_id: NodeId) -> None:
        """Know ``node_id`` without any direct address (e.g. dialed through the relay)."""
        self._peer(node_id)

    def relay_received(self, node_id: NodeId, now: float) -> None:
        """A datagram from ``node_id`` arrived over the relay."""
        self._peer(node_id).relay_heard = now

    def relay_heard(self, node_id: NodeId) -> float | None:
        """When a datagram from ``node_id`` last arrived over the relay (None: never)."""
        peer = self._peers.get(node_id)
        return None if peer is None else peer.relay_heard

    # -- direct paths ----------------------------------------------------------

    def add_candidate(self, node_id: NodeId, address: Address, now: float) -> DirectPath:
        """Learn a possible direct address of ``node_id`` (state UNKNOWN if new).

        A virtual address (a relay pseudo-address) is returned as a detached
        path and never stored: it is no direct path.
        """
        if is_virtual(address):
            return DirectPath(address=address, added_at=now)
        peer = self._peer(node_id)
        path = peer.paths.get(address)
        if path is None:
            path = DirectPath(address=address, added_at=now)
            peer.paths[address] = path
            if len(peer.paths) > self._max_addresses:
                evicted, _ = peer.paths.popitem(last=False)
                for tx_id in [t for t, (a, _) in peer.pending.items() if a == evicted]:
                    del peer.pending[tx_id]
        return path

    def ping_sent(self, node_id: NodeId, address: Address, tx_id: bytes, now: float) -> None:
        """We sent PING ``tx_id`` to ``address``; a matching pong validates it."""
        if is_virtual(address):
            return
        path = self.add_candidate(node_id, address, now)
        path.last_ping_sent = now
        if self._state(path, now) is PathState.UNKNOWN:
            path.state = PathState.PROBING
        peer = self._peers[node_id]
        peer.pending[tx_id] = (address, now)
        if len(peer.pending) > _MAX_PENDING_PINGS:
            peer.pending.popitem(last=False)

    def pong_received(
        self, node_id: NodeId, tx_id: bytes, source: Address, now: float
    ) -> DirectPath | None:
        """An authenticated PONG arrived; return the path it validated, if any.

        Only a pong for an outstanding ping, arriving from the very address
        that ping went to, validates a path (the path works both ways).
        """
        peer = self._peers.get(node_id)
        if peer is None:
            return None
        pending = peer.pending.get(tx_id)
        if pending is None or pending[0] != source:
            return None
        del peer.pending[tx_id]
        path = peer.paths.get(source)
        if path is None:
            return None
        path.state = PathState.VALIDATED
        path.rtt = max(0.0, now - pending[1])
        path.last_pong = now
        path.last_heard = now
        self._remember_source(source, node_id, now)
        return path

    def ping_received(self, node_id: NodeId, source: Address, now: float) -> None:
        """An authenticated PING from ``node_id`` arrived from ``source``."""
        if is_virtual(source):
            self.relay_received(node_id, now)
            return
        path = self.add_candidate(node_id, source, now)
        path.last_heard = now
        self._remember_source(source, node_id, now)

    def node_for_source(self, source: Address, now: float) -> NodeId | None:
        """Which peer recently proved (by disco) that it sends from ``source``."""
        entry = self._sources.get(source)
        if entry is None:
            return None
        node_id, heard_at = entry
        if now - heard_at > self._source_ttl:
            del self._sources[source]
            return None
        return node_id

    def send_address(self, node_id: NodeId, now: float) -> Address | None:
        """The best *direct* address of ``node_id`` now, or None if we know none.

        The validated path with the lowest RTT wins; without one, the address
        we heard from most recently, else the newest candidate (optimistic:
        the QUIC handshake itself decides whether it works). Ignores the
        relay; per-datagram routing asks :meth:`route`.
        """
        peer = self._peers.get(node_id)
        if peer is None or not peer.paths:
            return None
        best = self._best_validated(peer, now)
        if best is not None:
            return best.address
        return self._optimistic(peer)

    def route(self, node_id: NodeId, now: float) -> Route | None:
        """Where ``node_id``'s next datagram goes: an address, :data:`RELAY`, or None.

        See the module docstring for the rule. With a relay set, every peer
        the caller asks about gets at least the relay path, even one whose
        entry was evicted from this (bounded) table: the caller only routes
        for peers it holds a connection to.
        """
        peer = self._peers.get(node_id)
        if peer is not None:
            best = self._best_validated(peer, now)
            if best is not None:
                return best.address
        if self._relay and node_id != self._relay_node_id:
            return RELAY
        if peer is None or not peer.paths:
            return None
        return self._optimistic(peer)

    def validated_address(self, node_id: NodeId, now: float) -> Address | None:
        """The best validated direct address of ``node_id``, if any."""
        peer = self._peers.get(node_id)
        if peer is None:
            return None
        best = self._best_validated(peer, now)
        return None if best is None else best.address

    def pings_due(self, node_id: NodeId, now: float) -> list[Address]:
        """Direct addresses the shell should PING now (keep-alive or probe).

        Empty without a relay: then routing never waits for validation. With
        one: a keep-alive for the best validated path when neither a pong nor
        a ping happened for ``keepalive_interval``; without a validated path,
        every candidate not pinged for ``reprobe_interval`` (at most
        ``max_addresses_per_peer`` addresses). Callers record each ping they
        send with :meth:`ping_sent`, which is what rate-limits this.
        """
        if not self._relay:
            return []
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        best = self._best_validated(peer, now)
        if best is not None:
            last = max(best.last_pong or best.added_at, best.last_ping_sent or best.added_at)
            return [best.address] if now - last >= self._keepalive else []
        return [
            path.address
            for path in peer.paths.values()
            if path.last_ping_sent is None or now - path.last_ping_sent >= self._reprobe
        ]

    def paths(self, node_id: NodeId, now: float) -> list[DirectPath]:
        """The peer's direct paths, states evaluated at ``now``."""
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        for path in peer.paths.values():
            self._state(path, now)
        return list(peer.paths.values())

    def forget(self, node_id: NodeId) -> None:
        self._peers.pop(node_id, None)
        for source in [s for s, (n, _) in self._sources.items() if n == node_id]:
            del self._sources[source]

    # -- internals -------------------------------------------------------------

    def _peer(self, node_id: NodeId) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = _Peer()
            if len(self._peers) > self._max_peers:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(node_id)
        return peer

    def _remember_source(self, source: Address, node_id: NodeId, now: float) -> None:
        self._sources[source] = (node_id, now)
        self._sources.move_to_end(source)
        if len(self._sources) > self._max_peers:
            self._sources.popitem(last=False)

    def _best_validated(self, peer: _Peer, now: float) -> DirectPath | None:
        best: DirectPath | None = None
        for path in peer.paths.values():
            if self._state(path, now) is PathState.VALIDATED and (
                best is None or (path.rtt or 0.0) < (best.rtt or 0.0)
            ):
                best = path
        return best

    @staticmethod
    def _optimistic(peer: _Peer) -> Address | None:
        if not peer.paths:
            return None
        heard = [p for p in peer.paths.values() if p.last_heard is not None]
        if heard:
            return max(heard, key=lambda p: p.last_heard or 0.0).address
        return next(reversed(peer.paths.values())).address

    def _state(self, path: DirectPath, now: float) -> PathState:
        if (
            path.state is PathState.VALIDATED
            and path.last_pong is not None
            and now - path.last_pong > self._validity
        ):
            path.state = PathState.UNKNOWN
        return path.state
