"""Path table: where a peer's packets go, and how direct paths are found and kept (sans-IO).

Theory
------
QUIC never sees a real address. Every peer NodeId has a stable **virtual
address** (:func:`virtual_address`); QUIC connections to that peer use it as
their peer address, so QUIC never observes a path change (no RFC 9000 §9
migration, no path validation of its own). Underneath, this table keeps,
per peer, its candidate **direct paths** (UDP addresses) and their state,
plus one **relay path** (through the node's home relay, when the shell has
one: :meth:`PathTable.set_relay`), and answers :meth:`PathTable.route`:
"where does this peer's next datagram go". It also decides, on a timer,
which disco messages to send (:meth:`PathTable.poll`): hole punching,
heartbeats, keep-alives, the hard-NAT port search.

Route choice (:meth:`PathTable.route`)::

    1. the best VALIDATED direct path                     -> that address
       (LAN paths first, then the one the peer pinged us from last - its
       socket lives there - then lowest RTT; the current one is kept unless
       another wins on those, or is 30 % faster: no flapping)
    2. else, if a relay is set (and the peer is not the
       relay server itself: never relay the relay)        -> RELAY
    3. else (no relay) the optimistic direct choice:
       the address heard from last, else the newest
       candidate; the QUIC handshake decides if it works  -> that address
    4. else                                                -> None (drop)

So a connection starts relayed, moves to a direct path the moment a PONG
validates one, and back to the relay when that path stops answering, all
without QUIC noticing (same connection, same virtual address).

Path states (transitions only here, in :meth:`PathTable._state` and the
input methods)::

    UNKNOWN/FAILED --ping_sent-->           PROBING
    PROBING   --pong_received-->            VALIDATED  (pong from the pinged address,
                                                        tx id of an outstanding ping)
    PROBING   --punch window over-->        FAILED
    VALIDATED --PATHS_MISSED_PONGS pings
                unanswered-->               FAILED     (the heartbeat's verdict)
    VALIDATED --no pong for validity-->     FAILED     (backstop for quiet peers)

Hole punching (the rules of :meth:`PathTable.poll`, only while a relay is
set and only for *active* peers: a datagram went to them within
``idle_window``, or they sent us a CALL_ME_MAYBE)::

    no validated path, no attempt running, backoff over  -> start an attempt:
        CALL_ME_MAYBE over the relay (our candidates and NAT kind; at most one
        per punch_window) and PING every candidate of the peer, now
    attempt running                                     -> PING every candidate
        again every probe_interval until punch_window ends (address-and-port
        dependent filtering drops a side's first probes: they only open its
        own NAT; the other side's probes that follow get through)
    CALL_ME_MAYBE received                              -> learn its candidates,
        start an attempt at once (whatever the backoff: the peer is punching now)
    PING received on an unvalidated path                -> PONG and ping back at once
    first PONG                                          -> VALIDATED: route() moves the
                                                           peer's next datagram to it
    window over, nothing validated                      -> FAILED, reason recorded,
        next attempt after a backoff (punch_retry_min doubling to punch_retry_max)

So between two endpoint-independent NATs a direct path is up about two
round trips after the first relayed packet: ours probes open our NAT, the
peer's probes (sent when our CALL_ME_MAYBE arrives) pass it, and our ping
back passes the hole the peer's probes opened in its NAT.

LAN first: a candidate inside one of our interface networks
(:meth:`set_our_networks`) is a LAN path: it wins over any other validated
path whatever the RTT, and while a LAN candidate is not known to have failed
we do not probe a peer's public address that equals our own public IP (that
would hairpin through our own NAT).

Keep-alive and fallback (the best validated path of an active peer)::

    peer busy (a datagram within busy_window)  -> PING every heartbeat_interval
    peer quiet                                 -> PING every keepalive_interval
    missed_pongs PINGs unanswered, the last
    for at least heartbeat_interval            -> FAILED: route() falls back to the
                                                  relay (the QUIC connection stays),
                                                  and a new attempt starts at once
                                                  (a NAT that rebound gets a fresh
                                                  CALL_ME_MAYBE), then backs off

Hard NAT on one side (endpoint-dependent mapping, known from netcheck and
carried in CALL_ME_MAYBE): a birthday search. The hard side opens
``hard_nat_ports`` extra UDP ports (:class:`OpenPortFan`), each pinging the
easy side's public address: that opens as many random public ports on its
NAT, each accepting only the easy side's address. The easy side sprays
PINGs from its one socket at random ports of the hard side's public IP
(:class:`SprayPings`, ``spray_rate`` per second, at most ``spray_probes``,
ports 1024-65535: Linux's ``snat ... random`` range). A probe that hits an
open port reaches the hard side, whose PONG and ping back validate the path
on both sides; the other ports are closed (:class:`ClosePortFan`). Odds
with the defaults (256 open ports among 64,512): 1 - (1 - 256/64512)^n =
63 % after 256 probes (1 s), 98.3 % after 1024, 99.97 % after 2048 (8 s);
the attempt gives up after ``hard_nat_window`` (15 s) and the pair stays
relayed; another search follows no sooner than ``hard_nat_retry``. No
search starts before our own netcheck verdict (:meth:`PathTable.set_our_nat`):
spraying from behind a hard NAT of our own would only burn NAT sessions.
Both sides hard: no search (two random 16-bit ports do not meet in bounded
time), and unless a LAN candidate is still untried the attempt ends at once
with that reason, so ``status`` says why within a round trip of learning it.

Trust and limits: a CALL_ME_MAYBE is sealed by its sender's NodeId but may
come from *any* NodeId the relay forwards, so what it can make us send is
bounded: at most ``max_addresses_per_peer`` candidates per peer, pinged
every ``probe_interval`` for one window per CALL_ME_MAYBE; at most
``max_sprays`` sprays and ``PATHS_MAX_PORT_FANS`` port fans at once, and one
hard-NAT search per peer per ``hard_nat_retry``. With ``hole_punching=False``
no CALL_ME_MAYBE is sent or heeded and no search runs: only addresses given
to the table explicitly (a dial, :meth:`add_candidate`) are probed.

Status (:meth:`report`): the route and since when it holds (stamped when
the best path changes, whether or not a datagram is sent at that moment),
the peer's NAT kind from its CALL_ME_MAYBE, every candidate with its origin,
state, RTT and why it failed, the last failure reason of a direct path or
attempt, and hole punching's figures (first relayed datagram, first direct
path, bytes relayed after it).

Everything takes ``now`` (seconds, any monotonic origin); nothing here reads
a clock, draws entropy (the spray's ports come from the injected ``rng``)
or does I/O. Every table is bounded (LRU).

Virtual addresses are IPv6 ULAs (RFC 4193) under ``fd70:3270:7364::/48``
("p2pd") followed by the first 80 bits of the NodeId, with port 0: no
real datagram has source port 0, so virtual and real addresses never mix.
The relay's pseudo-address of a peer (the source the shell gives disco
messages that came over the relay) is its virtual address: port 0 never
becomes a direct candidate (:meth:`PathTable.add_candidate` ignores it).
"""

from __future__ import annotations

import enum
import ipaddress
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from p2psync.crypto.identity import NodeId
from p2psync.defaults import (
    PATHS_BUSY_WINDOW,
    PATHS_HARD_NAT_PORTS,
    PATHS_HARD_NAT_RETRY,
    PATHS_HARD_NAT_WINDOW,
    PATHS_HEARTBEAT_INTERVAL,
    PATHS_IDLE_WINDOW,
    PATHS_KEEPALIVE_INTERVAL,
    PATHS_MAX_ADDRESSES_PER_PEER,
    PATHS_MAX_PEERS,
    PATHS_MAX_PENDING_PINGS,
    PATHS_MAX_SPRAYS,
    PATHS_MISSED_PONGS,
    PATHS_PING_BACK_INTERVAL,
    PATHS_PROBE_INTERVAL,
    PATHS_PUNCH_RETRY_MAX,
    PATHS_PUNCH_RETRY_MIN,
    PATHS_PUNCH_WINDOW,
    PATHS_SOURCE_MAPPING_TTL,
    PATHS_SPRAY_BATCH,
    PATHS_SPRAY_PROBES,
    PATHS_SPRAY_RATE,
    PATHS_VALIDITY,
)
from p2psync.net.disco import MAX_CANDIDATES, Candidate, CandidateKind
from p2psync.net.netcheck import NatKind

Address = tuple[str, int]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_VIRTUAL_PREFIX: Final = bytes.fromhex("fd7032707364")  # fd70:3270:7364::/48
VIRTUAL_PORT: Final = 0
# Ports a hard NAT picks from: Linux `snat ... random` keeps a source port
# >= 1024 in 1024-65535 (nf_nat_l4proto_unique_tuple); so do most routers.
SPRAY_PORT_LOW: Final = 1024
SPRAY_PORT_HIGH: Final = 65535
# Keep the current best path unless another is this much faster (no flapping).
_SWITCH_RTT_RATIO: Final = 0.7


class RelayRoute(enum.Enum):
    """The relay path (a singleton: :data:`RELAY`)."""

    RELAY = "relay"


RELAY: Final = RelayRoute.RELAY
Route = Address | Literal[RelayRoute.RELAY]


class PathState(enum.Enum):
    UNKNOWN = "unknown"
    PROBING = "probing"
    VALIDATED = "validated"
    FAILED = "failed"


class Origin(enum.StrEnum):
    """Where we learnt a candidate address of a peer (shown by ``doctor``)."""

    DIALED = "dialed"  # the address connect() was given
    LOOKUP = "relay-lookup"  # the relay's LOOKUP answer (published or observed)
    MDNS = "mdns"
    CALL_ME_MAYBE = "call-me-maybe"
    PING = "ping"  # the source of an authenticated PING
    SPRAY = "spray"  # a port of the peer's hard NAT found by the spray
    PORT_FAN = "port-fan"  # one of our own hard-NAT ports, forwarding to the peer
    OTHER = "other"


@dataclass(slots=True)
class DirectPath:
    """One candidate UDP address of a peer."""

    address: Address
    added_at: float
    origin: Origin = Origin.OTHER
    lan: bool = False  # inside one of our interface networks
    reflexive: bool = False  # the peer's public address (from a STUN server or the relay)
    remote: Address | None = None  # PORT_FAN: the peer's address behind our forwarder
    state: PathState = PathState.UNKNOWN
    rtt: float | None = None
    last_ping_sent: float | None = None
    last_pong: float | None = None
    last_heard: float | None = None  # last authenticated disco message from here
    last_pinged_by_peer: float | None = None  # last PING the peer sent from here
    unanswered: int = 0  # pings since the last pong
    pings: int = 0
    pongs: int = 0
    failure: str | None = None  # why it last became FAILED


# -- what the shell should do (outputs of poll) ----------------------------------------


@dataclass(frozen=True, slots=True)
class SendPing:
    """PING ``address`` directly (the shell calls :meth:`PathTable.ping_sent`)."""

    node_id: NodeId
    address: Address


@dataclass(frozen=True, slots=True)
class SendCallMeMaybe:
    """CALL_ME_MAYBE to ``node_id`` over the relay, with our candidates and NAT kind."""

    node_id: NodeId
    nat: NatKind
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True, slots=True)
class SprayPings:
    """PING each of ``addresses`` (one batch of the hard-NAT search); the shell
    reports the tx id it used with :meth:`PathTable.spray_sent`."""

    node_id: NodeId
    addresses: tuple[Address, ...]


@dataclass(frozen=True, slots=True)
class OpenPortFan:
    """Open ``count`` extra UDP ports, each pinging ``targets`` (we are the hard side).

    A port that hears from a target forwards between it and our main socket;
    the shell reports it with :meth:`PathTable.port_fan_hit`. Close them all
    at ``until`` at the latest.
    """

    node_id: NodeId
    targets: tuple[Address, ...]
    count: int
    until: float


@dataclass(frozen=True, slots=True)
class ClosePortFan:
    """Close the extra ports opened for ``node_id``, except the forwarder at ``keep``."""

    node_id: NodeId
    keep: Address | None


Action = SendPing | SendCallMeMaybe | SprayPings | OpenPortFan | ClosePortFan


@dataclass(frozen=True, slots=True)
class CandidateReport:
    address: Address
    origin: str
    state: str
    lan: bool
    rtt_ms: float | None
    pings: int
    pongs: int
    via: Address | None  # PORT_FAN: the peer's address behind our forwarder
    failure: str | None


@dataclass(frozen=True, slots=True)
class PeerReport:
    """Everything ``status`` and ``doctor`` show about one peer's paths."""

    route: str  # "lan", "direct", "relay", "none"
    address: Address | None  # the peer's real address on the current direct path
    since: float | None  # when the current route began (the table's clock)
    their_nat: NatKind
    attempts: int
    punching: bool  # an attempt is running now
    next_attempt_in: float | None
    last_failure: str | None
    last_failure_at: float | None
    first_relay_at: float | None
    first_direct_at: float | None
    relay_bytes_after_direct: int
    candidates: tuple[CandidateReport, ...]


# -- per-peer state ----------------------------------------------------------------------


@dataclass(slots=True)
class _Spray:
    ips: tuple[str, ...]
    ports: list[int]  # still to probe, in random order
    tx_ids: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    next_at: float = 0.0


@dataclass(slots=True)
class _Peer:
    paths: OrderedDict[Address, DirectPath] = field(default_factory=OrderedDict)
    pending: OrderedDict[bytes, tuple[Address, float]] = field(default_factory=OrderedDict)
    relay_heard: float | None = None  # last datagram from this peer over the relay
    last_traffic: float | None = None  # last QUIC datagram we sent to this peer
    wanted_until: float | None = None  # a CALL_ME_MAYBE keeps us punching until then
    ping_now: bool = False  # ping the best path at the next poll (the peer is punching)
    their_nat: NatKind = NatKind.UNKNOWN
    # hole punching
    attempt_until: float | None = None
    attempt_started: float | None = None
    next_probe_at: float = 0.0
    attempts: int = 0
    next_attempt_at: float = 0.0
    backoff: float = 0.0
    cmm_sent_at: float | None = None
    cmm_version: int = -1  # which version of our candidates/NAT kind the peer was told
    cmm_received_at: float | None = None
    spray: _Spray | None = None
    spray_sent: int = 0  # probes of the last spray (for the failure reason)
    last_search_at: float | None = None  # last hard-NAT search (spray or port fan)
    search: Literal["spray", "fan"] | None = None  # the running attempt's search
    fan_open: bool = False  # our hard-NAT ports for this peer are open
    fan_kept: Address | None = None  # the one forwarder kept after a hit
    last_failure: str | None = None
    last_failure_at: float | None = None
    # route history
    current: Address | None = None  # the best direct path last chosen
    route_since: float | None = None  # when the route last changed
    first_relay_at: float | None = None
    first_direct_at: float | None = None
    relay_bytes_after_direct: int = 0


def virtual_address(node_id: NodeId) -> Address:
    """The stable address QUIC uses for ``node_id`` (pure function)."""
    packed = _VIRTUAL_PREFIX + node_id.raw[:10]
    return (str(ipaddress.IPv6Address(packed)), VIRTUAL_PORT)


def is_virtual(address: Address) -> bool:
    return address[1] == VIRTUAL_PORT and address[0].startswith("fd70:3270:7364:")


def _public_addresses(candidates: Iterable[Candidate]) -> set[Address]:
    return {c.address for c in candidates if c.kind is CandidateKind.REFLEXIVE}


def _ip(address: Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address[0])
    except ValueError:
        return None


class PathTable:
    """Per-peer direct paths, the relay path, and the punching plan. See the module docstring.

    Inputs: :meth:`set_relay`, :meth:`set_our_candidates`, :meth:`set_our_nat`,
    :meth:`set_our_networks`, :meth:`add_candidate`, :meth:`traffic`,
    :meth:`ping_sent`, :meth:`ping_received`, :meth:`pong_received`,
    :meth:`call_me_maybe_received`, :meth:`spray_sent`, :meth:`port_fan_hit`,
    :meth:`relay_sent`. Outputs: :meth:`route`, :meth:`poll` (actions),
    :meth:`next_deadline`, :meth:`report`.
    """

    def __init__(
        self,
        *,
        max_peers: int = PATHS_MAX_PEERS,
        max_addresses_per_peer: int = PATHS_MAX_ADDRESSES_PER_PEER,
        validity: float = PATHS_VALIDITY,
        source_mapping_ttl: float = PATHS_SOURCE_MAPPING_TTL,
        heartbeat_interval: float = PATHS_HEARTBEAT_INTERVAL,
        keepalive_interval: float = PATHS_KEEPALIVE_INTERVAL,
        missed_pongs: int = PATHS_MISSED_PONGS,
        busy_window: float = PATHS_BUSY_WINDOW,
        idle_window: float = PATHS_IDLE_WINDOW,
        punch_window: float = PATHS_PUNCH_WINDOW,
        probe_interval: float = PATHS_PROBE_INTERVAL,
        ping_back_interval: float = PATHS_PING_BACK_INTERVAL,
        punch_retry_min: float = PATHS_PUNCH_RETRY_MIN,
        punch_retry_max: float = PATHS_PUNCH_RETRY_MAX,
        hard_nat_ports: int = PATHS_HARD_NAT_PORTS,
        hard_nat_window: float = PATHS_HARD_NAT_WINDOW,
        hard_nat_retry: float = PATHS_HARD_NAT_RETRY,
        spray_probes: int = PATHS_SPRAY_PROBES,
        spray_rate: float = PATHS_SPRAY_RATE,
        spray_batch: int = PATHS_SPRAY_BATCH,
        max_pending_pings: int = PATHS_MAX_PENDING_PINGS,
        max_sprays: int = PATHS_MAX_SPRAYS,
        rng: random.Random | None = None,
        hole_punching: bool = True,
    ) -> None:
        self.hole_punching = hole_punching
        self._max_peers = max_peers
        self._max_addresses = max_addresses_per_peer
        self._validity = validity
        self._source_ttl = source_mapping_ttl
        self._heartbeat = heartbeat_interval
        self._keepalive = keepalive_interval
        self._missed_pongs = max(1, missed_pongs)
        # A peer's ping marks its live address for as long as its heartbeat would.
        self._live_window = heartbeat_interval * (self._missed_pongs + 1)
        self._busy_window = busy_window
        self._idle_window = idle_window
        self._punch_window = punch_window
        self._probe_interval = probe_interval
        self._ping_back_interval = ping_back_interval
        self._retry_min = punch_retry_min
        self._retry_max = punch_retry_max
        self._fan_ports = hard_nat_ports
        self._hard_window = hard_nat_window
        self._hard_retry = hard_nat_retry
        self._spray_probes = spray_probes
        self._spray_batch = max(1, spray_batch)
        self._spray_interval = self._spray_batch / spray_rate
        self._max_pending = max_pending_pings
        self._max_sprays = max_sprays
        # Deterministic unless the shell injects entropy: spray ports are no secret.
        self._rng = rng if rng is not None else random.Random(0x9D15C0)
        self._relay = False
        self._relay_node_id: NodeId | None = None
        self._our_candidates: tuple[Candidate, ...] = ()
        self._our_nat = NatKind.UNKNOWN
        self._nat_measured = False  # netcheck has given a verdict (UNKNOWN is one)
        self._our_networks: tuple[Network, ...] = ()
        self._peers: OrderedDict[NodeId, _Peer] = OrderedDict()
        self._sources: OrderedDict[Address, tuple[NodeId, float]] = OrderedDict()
        self._virtual: OrderedDict[Address, NodeId] = OrderedDict()
        self._deadline: float | None = None
        self.direct_failures = 0  # direct paths in use that broke (netcheck re-runs on it)
        self._version = 0  # bumped when our candidates or NAT kind change

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

    # -- what we know about ourselves -------------------------------------------

    def set_relay(self, available: bool, relay_node_id: NodeId | None = None) -> None:
        """Whether the shell can send through a relay, and the relay server's NodeId.

        The relay server itself is never routed through the relay (its
        connection *is* the relay path) and never punched to.
        """
        self._relay = available
        self._relay_node_id = relay_node_id if available else None

    @property
    def relay_available(self) -> bool:
        return self._relay

    def set_our_candidates(self, candidates: Iterable[Candidate], now: float) -> None:
        """Our addresses for CALL_ME_MAYBE (local first, at most MAX_CANDIDATES are sent).

        A new public address (a NAT that rebound) ends every peer's backoff:
        the next CALL_ME_MAYBE carries it.
        """
        new = tuple(dict.fromkeys(candidates))
        old_public = _public_addresses(self._our_candidates)
        if new != self._our_candidates:
            self._version += 1  # punching peers get a fresh CALL_ME_MAYBE
        self._our_candidates = new
        if _public_addresses(new) - old_public:
            self._retry_now(now)

    @property
    def our_candidates(self) -> tuple[Candidate, ...]:
        return self._our_candidates

    def set_our_nat(self, nat: NatKind, now: float) -> None:
        """Our NAT kind from netcheck (UNKNOWN: it could not tell); a change ends every
        peer's backoff. Until the first call no hard-NAT search starts: a spray from
        behind a hard NAT of our own is 2048 wasted NAT sessions."""
        self._nat_measured = True
        if nat is not self._our_nat:
            self._our_nat = nat
            self._version += 1
            self._retry_now(now)

    @property
    def our_nat(self) -> NatKind:
        return self._our_nat

    def set_our_networks(self, networks: Iterable[Network]) -> None:
        """Our interface networks: a candidate inside one is a LAN path."""
        self._our_networks = tuple(networks)
        for peer in self._peers.values():
            for path in peer.paths.values():
                if path.origin is not Origin.PORT_FAN:
                    path.lan = self._is_lan(path.address)

    # -- inputs about peers ----------------------------------------------------

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

    def relay_sent(self, node_id: NodeId, size: int) -> None:
        """``size`` bytes for ``node_id`` went over the relay (counted once it was direct)."""
        peer = self._peers.get(node_id)
        if peer is not None and peer.first_direct_at is not None:
            peer.relay_bytes_after_direct += size

    def traffic(self, node_id: NodeId, now: float) -> bool:
        """QUIC datagrams went to ``node_id`` now: the peer is active.

        True when this may bring :meth:`next_deadline` forward (the peer was
        quiet, so its heartbeat or punching starts now): poll again.
        """
        peer = self._peers.get(node_id)
        if peer is None:
            if not self._relay or node_id == self._relay_node_id:
                return False
            peer = self._peer(node_id)
        previous = peer.last_traffic
        peer.last_traffic = now
        return previous is None or now - previous > self._busy_window

    def add_candidate(
        self,
        node_id: NodeId,
        address: Address,
        now: float,
        origin: Origin = Origin.OTHER,
        *,
        reflexive: bool = False,
    ) -> DirectPath:
        """Learn a possible direct address of ``node_id`` (state UNKNOWN if new).

        A virtual address (a relay pseudo-address) is returned as a detached
        path and never stored: it is no direct path.
        """
        if is_virtual(address):
            return DirectPath(address=address, added_at=now, origin=origin)
        peer = self._peer(node_id)
        path = peer.paths.get(address)
        if path is None:
            path = DirectPath(
                address=address,
                added_at=now,
                origin=origin,
                lan=origin is not Origin.PORT_FAN and self._is_lan(address),
                reflexive=reflexive,
            )
            peer.paths[address] = path
            if len(peer.paths) > self._max_addresses:
                self._evict_path(peer)
        elif reflexive:
            path.reflexive = True
        return path

    def call_me_maybe_received(
        self, node_id: NodeId, nat: NatKind, candidates: Sequence[Candidate], now: float
    ) -> None:
        """The peer asks us to punch: learn its candidates and NAT kind, start an attempt."""
        if node_id == self._relay_node_id or not self.hole_punching:
            return
        peer = self._peer(node_id)
        peer.their_nat = nat
        peer.cmm_received_at = now
        peer.wanted_until = now + self._punch_window
        for candidate in candidates:
            self.add_candidate(
                node_id,
                candidate.address,
                now,
                Origin.CALL_ME_MAYBE,
                reflexive=candidate.kind is CandidateKind.REFLEXIVE,
            )
        if self._relay and self._best_validated(peer, now) is None:
            peer.next_attempt_at = now  # the peer punches now: so do we (poll starts it)
            if peer.attempt_until is not None and now < peer.attempt_until:
                peer.next_probe_at = now  # already punching: probe the new ones at once
        elif self._relay:
            peer.ping_now = True  # a validated path here: ping it now so the peer learns it

    def ping_sent(self, node_id: NodeId, address: Address, tx_id: bytes, now: float) -> None:
        """We sent PING ``tx_id`` to ``address``; a matching pong validates it."""
        if is_virtual(address):
            return
        path = self.add_candidate(node_id, address, now)
        if node_id not in self._peers:
            return
        path.last_ping_sent = now
        path.pings += 1
        state = self._state(path, now)
        if state is PathState.VALIDATED:
            path.unanswered += 1
        elif state is not PathState.PROBING:
            path.state = PathState.PROBING
            path.unanswered = 1
        else:
            path.unanswered += 1
        peer = self._peers[node_id]
        peer.pending[tx_id] = (address, now)
        if len(peer.pending) > self._max_pending:
            peer.pending.popitem(last=False)

    def spray_sent(
        self, node_id: NodeId, addresses: Sequence[Address], tx_id: bytes, now: float
    ) -> None:
        """The shell sent one :class:`SprayPings` batch, every ping with ``tx_id``."""
        peer = self._peers.get(node_id)
        if peer is None or peer.spray is None:
            return
        peer.spray.tx_ids[tx_id] = None
        while len(peer.spray.tx_ids) > self._max_pending:
            peer.spray.tx_ids.popitem(last=False)

    def pong_received(
        self, node_id: NodeId, tx_id: bytes, source: Address, now: float
    ) -> DirectPath | None:
        """An authenticated PONG arrived; return the path it validated, if any.

        Only a pong for an outstanding ping, arriving from the very address
        that ping went to, validates a path (the path works both ways); a
        pong to a spray ping validates the port of the sprayed IP it came from.
        """
        peer = self._peers.get(node_id)
        if peer is None:
            return None
        pending = peer.pending.get(tx_id)
        if pending is not None and pending[0] == source:
            del peer.pending[tx_id]
            path = peer.paths.get(source)
            sent_at = pending[1]
        elif (
            peer.spray is not None
            and tx_id in peer.spray.tx_ids
            and source[0] in peer.spray.ips
            and not is_virtual(source)
        ):
            path = self.add_candidate(node_id, source, now, Origin.SPRAY, reflexive=True)
            sent_at = max(0.0, now - self._spray_interval)  # rtt unknown: an upper bound
            peer.spray = None  # found: stop the search
        else:
            return None
        if path is None:
            return None
        path.state = PathState.VALIDATED
        path.rtt = max(0.0, now - sent_at)
        path.last_pong = now
        path.last_heard = now
        path.unanswered = 0
        path.pongs += 1
        path.failure = None
        self._remember_source(source, node_id, now)
        best = self._best_validated(peer, now)  # the route may change now: stamp it
        if peer.attempt_until is not None and best is not None:
            self._attempt_succeeded(peer)
        return path

    def ping_received(self, node_id: NodeId, source: Address, now: float) -> bool:
        """An authenticated PING from ``node_id`` arrived from ``source``.

        Returns True when the shell should ping ``source`` back now (a relay
        is set and that path is not validated, nor pinged a moment ago):
        the ping back validates the path in our direction within one round trip.
        """
        if is_virtual(source):
            self.relay_received(node_id, now)
            return False
        path = self.add_candidate(node_id, source, now, Origin.PING)
        path.last_heard = now
        path.last_pinged_by_peer = now
        self._remember_source(source, node_id, now)
        if not self._relay or node_id == self._relay_node_id:
            return False
        if self._state(path, now) is PathState.VALIDATED:
            return False
        return path.last_ping_sent is None or now - path.last_ping_sent >= self._ping_back_interval

    def port_fan_hit(
        self, node_id: NodeId, forwarder: Address, remote: Address, now: float
    ) -> DirectPath:
        """One of our hard-NAT ports heard from ``remote``: ``forwarder`` now leads there."""
        path = self.add_candidate(node_id, forwarder, now, Origin.PORT_FAN)
        path.remote = remote
        path.lan = False
        return path

    def forget(self, node_id: NodeId) -> None:
        self._peers.pop(node_id, None)
        for source in [s for s, (n, _) in self._sources.items() if n == node_id]:
            del self._sources[source]

    # -- outputs ----------------------------------------------------------------

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

        The best validated path wins; without one, the address we heard from
        most recently, else the newest candidate (optimistic: the QUIC
        handshake itself decides whether it works). Ignores the relay;
        per-datagram routing asks :meth:`route`.
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
        if peer is None:
            return RELAY if self._relay and node_id != self._relay_node_id else None
        best = self._best_validated(peer, now)
        if best is not None:
            return best.address
        if self._relay and node_id != self._relay_node_id:
            if peer.first_relay_at is None:
                peer.first_relay_at = now
            if peer.route_since is None:
                peer.route_since = now  # relayed from the first datagram
            return RELAY
        return self._optimistic(peer)

    def validated_address(self, node_id: NodeId, now: float) -> Address | None:
        """The best validated direct address of ``node_id``, if any."""
        peer = self._peers.get(node_id)
        if peer is None:
            return None
        best = self._best_validated(peer, now)
        return None if best is None else best.address

    def paths(self, node_id: NodeId, now: float) -> list[DirectPath]:
        """The peer's direct paths, states evaluated at ``now``."""
        peer = self._peers.get(node_id)
        if peer is None:
            return []
        for path in peer.paths.values():
            self._state(path, now)
        return list(peer.paths.values())

    def poll(self, now: float) -> list[Action]:
        """The disco work due at ``now`` for every active peer (see the module docstring).

        Call it after :meth:`next_deadline` passes and after any input that
        may start work (a CALL_ME_MAYBE, a new candidate, :meth:`traffic`
        returning True, a pong). Execute every action in order.
        """
        actions: list[Action] = []
        deadline: float | None = None
        for node_id, peer in list(self._peers.items()):
            wake = self._poll_peer(node_id, peer, now, actions)
            if wake is not None and (deadline is None or wake < deadline):
                deadline = wake
        self._deadline = deadline
        return actions

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has work (None: not until some input arrives)."""
        return self._deadline

    def report(self, node_id: NodeId, now: float) -> PeerReport | None:
        """What ``status`` and ``doctor`` show about ``node_id`` (None: unknown peer)."""
        peer = self._peers.get(node_id)
        if peer is None:
            return None
        best = self._best_validated(peer, now)
        if best is not None:
            route = "lan" if best.lan else "direct"
            address: Address | None = best.remote or best.address
        elif self._relay and node_id != self._relay_node_id:
            route, address = "relay", None
        else:
            route, address = "none", None
        punching = peer.attempt_until is not None and now < peer.attempt_until
        next_attempt = (
            max(0.0, peer.next_attempt_at - now)
            if best is None and not punching and self._relay and peer.attempts
            else None
        )
        return PeerReport(
            route=route,
            address=address,
            since=peer.route_since,
            their_nat=peer.their_nat,
            attempts=peer.attempts,
            punching=punching,
            next_attempt_in=next_attempt,
            last_failure=peer.last_failure,
            last_failure_at=peer.last_failure_at,
            first_relay_at=peer.first_relay_at,
            first_direct_at=peer.first_direct_at,
            relay_bytes_after_direct=peer.relay_bytes_after_direct,
            candidates=tuple(
                CandidateReport(
                    address=path.address,
                    origin=str(path.origin),
                    state=self._state(path, now).value,
                    lan=path.lan,
                    rtt_ms=None if path.rtt is None else round(path.rtt * 1000, 2),
                    pings=path.pings,
                    pongs=path.pongs,
                    via=path.remote,
                    failure=path.failure,
                )
                for path in peer.paths.values()
            ),
        )

    # -- the punching plan ------------------------------------------------------

    def _poll_peer(
        self, node_id: NodeId, peer: _Peer, now: float, out: list[Action]
    ) -> float | None:
        """Append ``peer``'s due actions to ``out``; return when it next needs a poll."""
        if not self._relay or node_id == self._relay_node_id:
            return None
        wakes: list[float] = []
        if peer.last_traffic is not None and now < peer.last_traffic + self._idle_window:
            wakes.append(peer.last_traffic + self._idle_window)
        if peer.wanted_until is not None and now < peer.wanted_until:
            wakes.append(peer.wanted_until)
        if peer.attempt_until is not None and now < peer.attempt_until:
            wakes.append(peer.attempt_until)
        if not wakes:  # quiet for idle_window: the connection is gone; stop everything
            peer.attempt_until = None
            self._stop_search(node_id, peer, out)
            return None
        best = self._best_validated(peer, now)
        if best is not None:
            self._keep_alive(node_id, peer, best, now, out, wakes)
        else:
            self._punch(node_id, peer, now, out, wakes)
        return min(wakes)

    def _keep_alive(
        self,
        node_id: NodeId,
        peer: _Peer,
        best: DirectPath,
        now: float,
        out: list[Action],
        wakes: list[float],
    ) -> None:
        busy = peer.last_traffic is not None and now < peer.last_traffic + self._busy_window
        interval = self._heartbeat if busy else self._keepalive
        last = max(best.last_ping_sent or best.added_at, best.last_pong or best.added_at)
        if now >= last + interval or peer.ping_now:
            out.append(SendPing(node_id, best.address))
            last = now
        peer.ping_now = False
        wakes.append(last + interval)
        if best.unanswered and best.last_ping_sent is not None:
            wakes.append(best.last_ping_sent + self._heartbeat)  # the heartbeat's verdict
        if busy and peer.last_traffic is not None:
            wakes.append(peer.last_traffic + self._busy_window)  # then the keep-alive pace
        # The search is over: keep only the forwarder that carries the path.
        peer.spray = None
        if peer.fan_open:
            if best.origin is not Origin.PORT_FAN:
                self._stop_search(node_id, peer, out)
            elif peer.fan_kept != best.address:
                out.append(ClosePortFan(node_id, best.address))
                peer.fan_kept = best.address
                self._forget_forwarders(peer, keep=best.address)
        if peer.attempt_until is None:
            return
        if now >= peer.attempt_until:
            self._end_window(peer)
        elif not best.lan:
            # LAN first: keep probing the peer's LAN candidates for the rest of the window.
            if now >= peer.next_probe_at:
                for path in peer.paths.values():
                    if path.lan and self._state(path, now) is not PathState.VALIDATED:
                        out.append(SendPing(node_id, path.address))
                peer.next_probe_at = now + self._probe_interval
            wakes.append(min(peer.next_probe_at, peer.attempt_until))

    def _punch(
        self, node_id: NodeId, peer: _Peer, now: float, out: list[Action], wakes: list[float]
    ) -> None:
        if peer.attempt_until is not None and now >= peer.attempt_until:
            self._attempt_failed(node_id, peer, now, out)
        if peer.attempt_until is None:
            if peer.fan_open:
                self._stop_search(node_id, peer, out)  # the kept forwarder's path broke
            if now < peer.next_attempt_at:
                # In backoff: a candidate never tried (mDNS, lookup) still gets a probe now.
                for path in self._probe_targets(peer, now):
                    if path.last_ping_sent is None:
                        out.append(SendPing(node_id, path.address))
                wakes.append(peer.next_attempt_at)
                return
            self._start_attempt(node_id, peer, now, out)
        elif peer.cmm_version != self._version:
            self._call_me_maybe(node_id, peer, now, out)  # what we told the peer changed
        if self._both_hard(peer) and not self._lan_hope(peer, now):
            # Two endpoint-dependent mappings never meet: say so now, not after the
            # window (the CALL_ME_MAYBE above already told the peer our NAT kind).
            self._attempt_failed(node_id, peer, now, out)
            wakes.append(peer.next_attempt_at)
            return
        if peer.search is None:
            self._maybe_search(node_id, peer, now, out)
        assert peer.attempt_until is not None
        if now >= peer.next_probe_at:
            for path in self._probe_targets(peer, now):
                out.append(SendPing(node_id, path.address))
            peer.next_probe_at = now + self._probe_interval
        wakes.append(min(peer.next_probe_at, peer.attempt_until))
        spray = peer.spray
        if spray is not None and spray.ports:
            if now >= spray.next_at:
                batch = spray.ports[: self._spray_batch]
                del spray.ports[: self._spray_batch]
                peer.spray_sent += len(batch)
                out.append(SprayPings(node_id, tuple((ip, p) for p in batch for ip in spray.ips)))
                spray.next_at = now + self._spray_interval
            if spray.ports:
                wakes.append(spray.next_at)

    def _start_attempt(self, node_id: NodeId, peer: _Peer, now: float, out: list[Action]) -> None:
        peer.attempts += 1
        peer.attempt_started = now
        peer.search = None
        window = self._punch_window
        if (
            peer.cmm_sent_at is None
            or now >= peer.cmm_sent_at + self._punch_window
            or peer.cmm_version != self._version
        ):
            self._call_me_maybe(node_id, peer, now, out)
        peer.attempt_until = now + window
        peer.wanted_until = max(peer.wanted_until or now, peer.attempt_until)
        peer.next_probe_at = now  # the first round goes out in this same poll

    def _call_me_maybe(self, node_id: NodeId, peer: _Peer, now: float, out: list[Action]) -> None:
        if not self.hole_punching:
            return  # we tell peers nothing: only addresses given to us are used
        out.append(SendCallMeMaybe(node_id, self._our_nat, self._cmm_candidates()))
        peer.cmm_sent_at = now
        peer.cmm_version = self._version

    def _maybe_search(self, node_id: NodeId, peer: _Peer, now: float, out: list[Action]) -> None:
        """Start the hard-NAT search in a running attempt once both NAT kinds call for it.

        Checked at every poll of an attempt: the peer's NAT kind and public
        address often arrive (in its CALL_ME_MAYBE) after our attempt began.
        """
        last_search = peer.last_search_at
        if (
            not self.hole_punching
            or not self._nat_measured  # netcheck first: checked again at the next poll
            or (last_search is not None and now - last_search < self._hard_retry)
        ):
            return
        their_public = tuple(p.address for p in peer.paths.values() if p.reflexive)
        if not their_public:
            return
        if peer.their_nat is NatKind.HARD and self._our_nat is not NatKind.HARD:
            if sum(p.spray is not None for p in self._peers.values()) >= self._max_sprays:
                return  # busy spraying for others: retried at the next poll of this attempt
            ips = tuple(dict.fromkeys(address[0] for address in their_public))
            count = min(self._spray_probes, SPRAY_PORT_HIGH - SPRAY_PORT_LOW + 1)
            ports = self._rng.sample(range(SPRAY_PORT_LOW, SPRAY_PORT_HIGH + 1), count)
            peer.spray = _Spray(ips=ips, ports=ports, next_at=now)
            peer.spray_sent = 0
            peer.search = "spray"
        elif self._our_nat is NatKind.HARD and peer.their_nat is not NatKind.HARD:
            peer.fan_open = True
            peer.fan_kept = None
            peer.search = "fan"
            out.append(OpenPortFan(node_id, their_public, self._fan_ports, now + self._hard_window))
        else:
            return
        peer.last_search_at = now
        peer.attempt_until = max(peer.attempt_until or now, now + self._hard_window)
        peer.wanted_until = max(peer.wanted_until or now, peer.attempt_until)

    def _attempt_succeeded(self, peer: _Peer) -> None:
        peer.backoff = 0.0
        peer.spray = None

    def _attempt_failed(self, node_id: NodeId, peer: _Peer, now: float, out: list[Action]) -> None:
        probed = sum(1 for p in peer.paths.values() if p.state is PathState.PROBING)
        if self._both_hard(peer):
            reason = (
                "both sides behind hard NAT (endpoint-dependent mapping): "
                "no direct path possible, staying relayed"
            )
        elif peer.search == "spray":
            reason = (
                f"peer behind hard NAT, probe budget exhausted ({peer.spray_sent} probes "
                "to its ports, none answered)"
            )
        elif peer.search == "fan":
            reason = (
                f"we are behind hard NAT: {self._fan_ports} ports opened, no probe of the "
                "peer reached one in time"
            )
        elif not peer.paths:
            reason = "no candidate address of the peer known (it sent no CALL_ME_MAYBE)"
        else:
            reason = f"no pong from {probed or len(peer.paths)} candidate(s) within the window"
        self._end_window(peer)
        peer.last_failure = reason
        peer.last_failure_at = now
        self._stop_search(node_id, peer, out)
        peer.backoff = min(self._retry_max, max(self._retry_min, peer.backoff * 2))
        peer.next_attempt_at = now + peer.backoff

    def _end_window(self, peer: _Peer) -> None:
        peer.attempt_until = None
        peer.spray = None
        for path in peer.paths.values():
            if path.state is PathState.PROBING:
                path.state = PathState.FAILED
                path.failure = "no pong in the punch window"

    def _stop_search(self, node_id: NodeId, peer: _Peer, out: list[Action]) -> None:
        peer.spray = None
        if peer.fan_open:
            out.append(ClosePortFan(node_id, None))
            peer.fan_open = False
            peer.fan_kept = None
            self._forget_forwarders(peer, keep=None)

    @staticmethod
    def _forget_forwarders(peer: _Peer, keep: Address | None) -> None:
        """Our closed fan ports are no candidates any more."""
        for address in [
            a for a, p in peer.paths.items() if p.origin is Origin.PORT_FAN and a != keep
        ]:
            del peer.paths[address]

    def _probe_targets(self, peer: _Peer, now: float) -> list[DirectPath]:
        """The candidates an attempt pings: all but our forwarders and needless hairpins."""
        our_public = {
            c.address[0] for c in self._our_candidates if c.kind is CandidateKind.REFLEXIVE
        }
        lan_hope = self._lan_hope(peer, now)
        targets = []
        for path in peer.paths.values():
            if path.origin is Origin.PORT_FAN and path.last_heard is None:
                continue
            if lan_hope and not path.lan and path.address[0] in our_public:
                continue  # the peer is behind our own NAT: its LAN address, not a hairpin
            targets.append(path)
        return targets

    def _both_hard(self, peer: _Peer) -> bool:
        return self._our_nat is NatKind.HARD and peer.their_nat is NatKind.HARD

    def _lan_hope(self, peer: _Peer, now: float) -> bool:
        """A LAN candidate of the peer's that has not failed (yet)."""
        return any(
            p.lan and self._state(p, now) is not PathState.FAILED for p in peer.paths.values()
        )

    def _cmm_candidates(self) -> tuple[Candidate, ...]:
        return self._our_candidates[:MAX_CANDIDATES]

    def _retry_now(self, now: float) -> None:
        for peer in self._peers.values():
            if peer.attempt_until is None:
                peer.next_attempt_at = min(peer.next_attempt_at, now)
                peer.backoff = 0.0

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

    def _evict_path(self, peer: _Peer) -> None:
        """Drop the least useful path: the oldest that is not validated (else the oldest)."""
        victim = next(
            (a for a, p in peer.paths.items() if p.state is not PathState.VALIDATED),
            next(iter(peer.paths)),
        )
        del peer.paths[victim]
        for tx_id in [t for t, (a, _) in peer.pending.items() if a == victim]:
            del peer.pending[tx_id]

    def _remember_source(self, source: Address, node_id: NodeId, now: float) -> None:
        self._sources[source] = (node_id, now)
        self._sources.move_to_end(source)
        if len(self._sources) > self._max_peers:
            self._sources.popitem(last=False)

    def _is_lan(self, address: Address) -> bool:
        ip = _ip(address)
        if ip is None:
            return False
        if ip.is_loopback:
            return False  # the same host: no LAN to prefer (and a loopback-bound socket's only)
        return any(ip.version == net.version and ip in net for net in self._our_networks)

    def _best_validated(self, peer: _Peer, now: float) -> DirectPath | None:
        previous = peer.paths.get(peer.current) if peer.current is not None else None
        if previous is not None and self._state(previous, now) is PathState.FAILED:
            # The path we were using broke: fall back (route() sees no validated
            # path) and punch again at once - a NAT that rebound needs a fresh
            # CALL_ME_MAYBE; the backoff still grows if that fails too.
            where = previous.remote or previous.address
            peer.last_failure = f"direct path {where[0]}:{where[1]} {previous.failure}"
            peer.last_failure_at = now
            peer.next_attempt_at = now
            peer.current = None
            self.direct_failures += 1
        validated = [p for p in peer.paths.values() if self._state(p, now) is PathState.VALIDATED]
        # The address the peer last pinged us from is where its socket is now (after
        # a restart or a NAT rebinding its old address may still look validated).
        live = max(
            (p for p in validated if p.last_pinged_by_peer is not None),
            key=lambda p: p.last_pinged_by_peer or 0.0,
            default=None,
        )
        if live is not None and now > (live.last_pinged_by_peer or 0.0) + self._live_window:
            live = None

        def rank(path: DirectPath) -> tuple[bool, bool, float]:
            return (path.lan, path is live, -(path.rtt or 0.0))

        best = max(validated, key=rank, default=None)
        current = peer.paths.get(peer.current) if peer.current is not None else None
        if (
            best is not None
            and current is not None
            and current is not best
            and current.state is PathState.VALIDATED
            and rank(current)[:2] == rank(best)[:2]
            and (best.rtt or 0.0) >= _SWITCH_RTT_RATIO * (current.rtt or 0.0)
        ):
            best = current  # only faster, and not by enough to switch
        chosen = None if best is None else best.address
        if chosen != peer.current or peer.route_since is None:
            # The peer's route changes now (relay -> direct, direct -> relay, or
            # another direct path): "since when" for status, whether or not a
            # datagram happens to be sent at this moment.
            if chosen is not None or peer.route_since is not None:
                peer.route_since = now
            if chosen is not None and peer.first_direct_at is None:
                peer.first_direct_at = now
        peer.current = chosen
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
        if path.state is PathState.VALIDATED:
            if (
                path.unanswered >= self._missed_pongs
                and path.last_ping_sent is not None
                and now >= path.last_ping_sent + self._heartbeat
            ):
                path.state = PathState.FAILED
                path.failure = f"stopped answering ({path.unanswered} pings without a pong)"
            elif path.last_pong is not None and now - path.last_pong > self._validity:
                path.state = PathState.FAILED
                path.failure = f"no pong for {self._validity:g} s"
        return path.state
