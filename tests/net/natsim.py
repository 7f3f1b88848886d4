"""A tiny seeded, stepped-clock network with NATs, for the path table's tests (no sockets).

Two or more :class:`SimNode` (each a real :class:`~p2psync.net.paths.PathTable`
and :class:`~p2psync.net.disco.Disco`, and a shell mirroring
:class:`p2psync.net.traversal.PathDriver`) sit behind :class:`SimNat` routers:

- ``none``: the host's address is public, nothing is filtered;
- ``easy``: endpoint-independent mapping (one public port per private
  address:port), address-and-port-dependent filtering;
- ``hard``: endpoint-dependent mapping (a random public port per private
  address:port *and* destination), the same filtering.

Mappings expire ``timeout`` seconds after their last packet (either way),
as conntrack's UDP timeout. Hosts on one site reach each other directly on
their LAN; a packet to their own NAT's public address is dropped unless the
site hairpins. A relay carries relay frames (CALL_ME_MAYBE, relayed PONGs)
with its own delay. Every datagram takes ``latency`` and is lost with
probability ``loss``; everything random comes from one seeded ``Random``.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from p2psync.crypto.identity import Identity, NodeId
from p2psync.net.disco import (
    BadDisco,
    CallMeMaybe,
    Candidate,
    CandidateKind,
    Disco,
    Ping,
    Pong,
    is_disco,
)
from p2psync.net.netcheck import NatKind
from p2psync.net.paths import (
    RELAY,
    Action,
    Address,
    ClosePortFan,
    OpenPortFan,
    Origin,
    PathTable,
    SendCallMeMaybe,
    SendPing,
    SprayPings,
)

PORT = 47300
DATA = b"\x40quic"  # stands in for a QUIC packet (first byte has the fixed bit)


@dataclass
class _Mapping:
    private: Address
    public_port: int
    last_used: float
    contacted: dict[Address, float] = field(default_factory=dict)  # remote -> last packet


class SimNat:
    def __init__(
        self,
        kind: str,
        public_ip: str,
        lan_prefix: str,
        rng: random.Random,
        *,
        timeout: float = 30.0,
        hairpin: bool = False,
    ) -> None:
        self.kind = kind
        self.public_ip = public_ip
        self.lan = ipaddress.ip_network(f"{lan_prefix}0/24")
        self.rng = rng
        self.timeout = timeout
        self.hairpin = hairpin
        self._by_key: dict[tuple[Address, Address | None], _Mapping] = {}
        self._by_port: dict[int, _Mapping] = {}
        self.dropped = 0

    def outbound(self, private: Address, dst: Address, now: float) -> Address:
        if self.kind == "none":
            return private
        key = (private, None if self.kind == "easy" else dst)
        mapping = self._by_key.get(key)
        if mapping is not None and now - mapping.last_used > self.timeout:
            del self._by_key[key]
            del self._by_port[mapping.public_port]
            mapping = None
        if mapping is None:
            low = 49152 if self.kind == "easy" else 1024
            while True:
                port = self.rng.randrange(low, 65536)
                if port not in self._by_port:
                    break
            mapping = _Mapping(private, port, now)
            self._by_key[key] = mapping
            self._by_port[port] = mapping
        mapping.last_used = now
        mapping.contacted[dst] = now
        return (self.public_ip, mapping.public_port)

    def inbound(self, src: Address, dst: Address, now: float) -> Address | None:
        if self.kind == "none":
            return dst
        mapping = self._by_port.get(dst[1])
        if mapping is None or now - mapping.last_used > self.timeout:
            self.dropped += 1
            return None
        heard = mapping.contacted.get(src)
        if heard is None or now - heard > self.timeout:
            self.dropped += 1  # address-and-port-dependent filtering
            return None
        mapping.last_used = now
        mapping.contacted[src] = now
        return mapping.private

    def rebind(self) -> None:
        """Forget every mapping (a router reboot, a new carrier address)."""
        self._by_key.clear()
        self._by_port.clear()


class SimNet:
    def __init__(self, seed: int, *, latency: float = 0.025, loss: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.latency = latency
        self.loss = loss
        self.relay_delay = latency * 2  # node -> relay -> node
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._hosts: dict[Address, tuple[SimNode, str]] = {}  # address -> (node, socket)
        self.nats: list[SimNat] = []
        self.blocked: set[frozenset[str]] = set()  # pairs of public IPs that cannot talk
        self.nodes: list[SimNode] = []
        self.delivered = 0

    def nat(self, kind: str, public_ip: str, lan_prefix: str, **kwargs: object) -> SimNat:
        nat = SimNat(kind, public_ip, lan_prefix, self.rng, **kwargs)  # type: ignore[arg-type]
        self.nats.append(nat)
        return nat

    def node(self, name: str, nat: SimNat, host: int, **table_options: object) -> SimNode:
        ip = nat.public_ip if nat.kind == "none" else f"{str(nat.lan.network_address)[:-1]}{host}"
        node = SimNode(self, name, nat, (ip, PORT), **table_options)
        self._hosts[node.address] = (node, "main")
        self.nodes.append(node)
        return node

    def bind(self, node: SimNode, address: Address) -> None:
        self._hosts[address] = (node, "fan")

    def unbind(self, address: Address) -> None:
        self._hosts.pop(address, None)

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (when, next(self._seq), callback))

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> float:
        while self._queue and self._queue[0][0] <= until:
            when, _, callback = heapq.heappop(self._queue)
            self.now = when
            callback()
            if stop is not None and stop():
                return self.now
        self.now = until
        return until

    def send(self, sender: SimNode, src: Address, dst: Address, data: bytes) -> None:
        """A UDP datagram from ``sender``'s private ``src`` to ``dst``."""
        now = self.now
        nat = sender.nat
        target_nat = next(
            (n for n in self.nats if n.public_ip == dst[0] and n.kind != "none"), None
        )
        if nat.kind != "none" and ipaddress.ip_address(dst[0]) in nat.lan:
            wire_src, wire_dst = src, dst  # on the host or the LAN: no NAT
        elif target_nat is nat and not nat.hairpin:
            nat.dropped += 1
            return
        else:
            wire_src = nat.outbound(src, dst, now)
            wire_dst = dst
            if frozenset({wire_src[0], dst[0]}) in self.blocked:
                return
            if target_nat is not None:
                inner = target_nat.inbound(wire_src, dst, now)
                if inner is None:
                    return
                wire_dst = inner
        if self.rng.random() < self.loss:
            return
        entry = self._hosts.get(wire_dst)
        if entry is None:
            return
        receiver, socket = entry
        delay = self.latency * (0.8 + 0.4 * self.rng.random())

        def deliver() -> None:
            self.delivered += 1
            receiver.datagram(data, wire_src, wire_dst, socket)

        self.at(now + delay, deliver)

    def relay(self, src: SimNode, dst: SimNode, data: bytes) -> None:
        if self.rng.random() < self.loss:
            return
        self.at(self.now + self.relay_delay, lambda: dst.relayed(src, data))


class SimNode:
    """One node: PathTable + Disco, and a shell like traversal.PathDriver."""

    def __init__(
        self, net: SimNet, name: str, nat: SimNat, address: Address, **table_options: object
    ) -> None:
        self.net = net
        self.name = name
        self.nat = nat
        self.address = address
        rng = random.Random(net.rng.random())
        self.identity = Identity.from_seed(rng.randbytes(32))
        self.disco = Disco(self.identity, rng.randbytes)
        self.table = PathTable(rng=rng, **table_options)  # type: ignore[arg-type]
        self.table.set_relay(True)
        if nat.kind != "none":
            self.table.set_our_networks([nat.lan])
        self.peers: dict[NodeId, SimNode] = {}
        self.fans: dict[Address, Address | None] = {}  # fan port -> locked remote
        self.fan_targets: tuple[Address, ...] = ()
        self.relayed_datagrams = 0
        self.direct_datagrams = 0
        self.spray_probes = 0
        self.cmm_sent = 0
        self._wake_at: float | None = None
        self._next_fan_port = 40000

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    # -- setup ----------------------------------------------------------------

    def knows(self, other: SimNode) -> None:
        self.peers[other.node_id] = other

    def set_netcheck(self, nat: NatKind, public: Address | None) -> None:
        candidates = [Candidate(self.address, CandidateKind.LOCAL)]
        if public is not None:
            candidates.append(Candidate(public, CandidateKind.REFLEXIVE))
        self.table.set_our_candidates(candidates, self.net.now)
        self.table.set_our_nat(nat, self.net.now)

    def public_address(self) -> Address:
        """What a STUN server (the relay) sees: the mapping towards 203.0.113.1:3478."""
        return self.nat.outbound(self.address, ("203.0.113.1", 3478), self.net.now)

    def lookup(self, other: SimNode) -> None:
        """A relay LOOKUP: the peer's local address and the address the relay sees."""
        now = self.net.now
        self.table.add_candidate(other.node_id, other.address, now, Origin.LOOKUP)
        public = other.public_address()
        self.table.add_candidate(other.node_id, public, now, Origin.LOOKUP, reflexive=True)
        self.service()

    # -- traffic ----------------------------------------------------------------

    def talk(self, other: SimNode, every: float, until: float) -> None:
        """Send a stand-in QUIC packet to ``other`` every ``every`` s along route()."""

        def tick() -> None:
            now = self.net.now
            route = self.table.route(other.node_id, now)
            if route is RELAY:
                self.relayed_datagrams += 1
                self.table.relay_sent(other.node_id, len(DATA))
                self.net.relay(self, other, DATA)
            elif route is not None:
                self.direct_datagrams += 1
                self.net.send(self, self.address, route, DATA)
            if self.table.traffic(other.node_id, now):
                self.service()
            if now + every <= until:
                self.net.at(now + every, tick)

        self.net.at(self.net.now, tick)

    # -- the shell ---------------------------------------------------------------

    def service(self) -> None:
        now = self.net.now
        for action in self.table.poll(now):
            self.execute(action)
        deadline = self.table.next_deadline()
        if deadline is not None and (
            self._wake_at is None or deadline < self._wake_at or self._wake_at <= now
        ):
            self._wake_at = max(deadline, now)
            self.net.at(self._wake_at, self._wake)

    def _wake(self) -> None:
        if self._wake_at is not None and self.net.now >= self._wake_at:
            self._wake_at = None
        self.service()

    def execute(self, action: Action) -> None:
        now = self.net.now
        if isinstance(action, SendPing):
            self.ping(action.node_id, action.address)
        elif isinstance(action, SendCallMeMaybe):
            peer = self.peers[action.node_id]
            self.cmm_sent += 1
            self.net.relay(
                self,
                peer,
                self.disco.seal_call_me_maybe(peer.node_id, action.nat, action.candidates),
            )
        elif isinstance(action, SprayPings):
            tx_id = self.disco.new_tx_id()
            for address in action.addresses:
                self.net.send(
                    self, self.address, address, self.disco.seal_ping(action.node_id, tx_id)
                )
            self.spray_probes += len(action.addresses)
            self.table.spray_sent(action.node_id, action.addresses, tx_id, now)
        elif isinstance(action, OpenPortFan):
            self.fan_targets = action.targets
            for _ in range(action.count):
                port = (self.address[0], self._next_fan_port)
                self._next_fan_port += 1
                self.fans[port] = None
                self.net.bind(self, port)
                for target in action.targets:
                    ping = self.disco.seal_ping(action.node_id, self.disco.new_tx_id())
                    self.net.send(self, port, target, ping)

            opened = tuple(self.fans)

            def expire() -> None:
                for port in opened:
                    if port in self.fans and self.fans[port] is None:
                        self._close_fan(port)

            self.net.at(action.until, expire)
        elif isinstance(action, ClosePortFan):
            for port in list(self.fans):
                if ("127.0.0.1", port[1]) != action.keep:
                    self._close_fan(port)

    def _close_fan(self, port: Address) -> None:
        self.fans.pop(port, None)
        self.net.unbind(port)

    def ping(self, node_id: NodeId, address: Address) -> None:
        tx_id = self.disco.new_tx_id()
        self.table.ping_sent(node_id, address, tx_id, self.net.now)
        self._send_main(address, self.disco.seal_ping(node_id, tx_id))

    def _send_main(self, dst: Address, data: bytes) -> None:
        if dst[0] == "127.0.0.1":  # a fan port of ours: forward to its locked remote
            port = (self.address[0], dst[1])
            remote = self.fans.get(port)
            if remote is not None:
                self.net.send(self, port, remote, data)
            return
        self.net.send(self, self.address, dst, data)

    # -- input ----------------------------------------------------------------

    def datagram(self, data: bytes, src: Address, dst: Address, socket: str) -> None:
        if socket == "fan":
            if dst not in self.fans:
                return
            remote = self.fans[dst]
            if remote is None and src[0] in {t[0] for t in self.fan_targets}:
                self.fans[dst] = remote = src
                peer = next(iter(self.peers))
                self.table.port_fan_hit(peer, ("127.0.0.1", dst[1]), src, self.net.now)
            if src != remote:
                return
            src = ("127.0.0.1", dst[1])  # as the main socket sees it
        if not is_disco(data):
            return
        try:
            message = self.disco.open_untrusted(data)
        except BadDisco:
            return
        now = self.net.now
        if isinstance(message, Ping):
            back = self.table.ping_received(message.sender, src, now)
            self._send_main(src, self.disco.seal_pong(message.sender, message.tx_id, src))
            if back:
                self.ping(message.sender, src)
        elif isinstance(message, Pong):
            self.table.pong_received(message.sender, message.tx_id, src, now)
        elif isinstance(message, CallMeMaybe):
            self.table.call_me_maybe_received(message.sender, message.nat, message.candidates, now)
        self.service()

    def relayed(self, src: SimNode, data: bytes) -> None:
        if not is_disco(data):
            return
        message = self.disco.open_untrusted(data)
        if isinstance(message, CallMeMaybe):
            self.table.call_me_maybe_received(
                message.sender, message.nat, message.candidates, self.net.now
            )
            self.service()


def pair(
    seed: int,
    kind_a: str,
    kind_b: str,
    *,
    latency: float = 0.025,
    loss: float = 0.0,
    same_site: bool = False,
    hairpin: bool = False,
    netcheck: bool = True,
    **table_options: object,
) -> tuple[SimNet, SimNode, SimNode]:
    """Two nodes behind NATs of ``kind_a``/``kind_b`` that know each other by relay LOOKUP."""
    net = SimNet(seed, latency=latency, loss=loss)
    nat_a = net.nat(kind_a, "198.51.100.1", "10.0.1.", hairpin=hairpin)
    nat_b = nat_a if same_site else net.nat(kind_b, "198.51.100.2", "10.0.2.")
    a = net.node("a", nat_a, 2, **table_options)
    b = net.node("b", nat_b, 3, **table_options)
    a.knows(b)
    b.knows(a)
    kinds = {"none": NatKind.NONE, "easy": NatKind.EASY, "hard": NatKind.HARD}
    for node, kind in ((a, nat_a.kind), (b, nat_b.kind)):
        if netcheck:
            node.set_netcheck(kinds[kind], node.public_address())
        else:
            node.set_netcheck(NatKind.UNKNOWN, node.public_address())
    return net, a, b


def both_direct(a: SimNode, b: SimNode) -> bool:
    now = a.net.now
    return (
        a.table.validated_address(b.node_id, now) is not None
        and b.table.validated_address(a.node_id, now) is not None
    )
