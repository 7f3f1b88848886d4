"""Path table: where a peer's packets go now (sans-IO).

Theory
------
QUIC never sees a real address. Every peer NodeId has a stable **virtual
address** (:func:`virtual_address`); QUIC connections to that peer use it as
their peer address, so QUIC never observes a path change (no RFC 9000 §9
migration, no path validation of its own). Underneath, this table keeps,
per peer, its candidate **direct paths** (UDP addresses) and their state,
and answers :meth:`PathTable.send_address`: "where do I send this peer's
datagrams now". Relay paths and hole punching extend this table later;
the QUIC shell only ever asks :meth:`PathTable.send_address`.

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
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final

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
    ) -> None:
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

    # -- direct paths ----------------------------------------------------------

    def add_candidate(self, node_id: NodeId, address: Address, now: float) -> DirectPath:
        """Learn a possible direct address of ``node_id`` (state UNKNOWN if new)."""
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
        """Where to send ``node_id``'s datagrams now, or None if we know no path.

        The validated path with the lowest RTT wins; without one, the address
        we heard from most recently, else the newest candidate (optimistic:
        the QUIC handshake itself decides whether it works).
        """
        peer = self._peers.get(node_id)
        if peer is None or not peer.paths:
            return None
        best: DirectPath | None = None
        for path in peer.paths.values():
            if self._state(path, now) is PathState.VALIDATED and (
                best is None or (path.rtt or 0.0) < (best.rtt or 0.0)
            ):
                best = path
        if best is not None:
            return best.address
        heard = [p for p in peer.paths.values() if p.last_heard is not None]
        if heard:
            return max(heard, key=lambda p: p.last_heard or 0.0).address
        return next(reversed(peer.paths.values())).address

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

    def _state(self, path: DirectPath, now: float) -> PathState:
        if (
            path.state is PathState.VALIDATED
            and path.last_pong is not None
            and now - path.last_pong > self._validity
        ):
            path.state = PathState.UNKNOWN
        return path.state
