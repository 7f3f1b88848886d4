"""Declarative topologies and their address plan: pure, no I/O.

A :class:`Topology` says *what* the network looks like: public hosts on the
internet segment (relays, STUN responders, servers) and sites (a router of
some :class:`~netsim.nat.NatKind` with a LAN and hosts on it), with optional
:class:`LinkConditions` per link. :func:`plan_network` turns it into a
:class:`NetworkPlan`: every namespace, interface, address, route and nft
ruleset, named and numbered. :mod:`netsim.netns` applies a plan; nothing in
this module touches the system, so address planning is unit-tested without
root.

Address plan (all inside the namespaces of one run, never on the host):

=====================  ===========================  ========================
segment                addresses                    who
=====================  ===========================  ========================
internet               203.0.113.0/24               .1 the internet router,
                                                    .10-.89 public hosts,
                                                    .100-.249 site uplinks
public LANs            198.51.100.0/24 in /28s      ``none``/``firewall``
                                                    sites: .1 router,
                                                    hosts from .2
private LANs           10.N.0.0/24                  translating sites: .1
                                                    router, hosts from .10
carrier (CGNAT)        100.64.N.0/24                .1 carrier, .2 home
                                                    router
=====================  ===========================  ========================

Namespaces are named ``p2ps-<run id>-<role>-<name>``: ``inet`` (the
internet segment: a bridge and a router for the public LAN subnets),
``h-<host>`` for every host, ``r-<site>`` for a site router, ``c-<site>``
for the carrier router of a ``cgnat`` site and ``l-<label>`` for the link
emulator of a conditioned link. Inside a namespace the interface
names are fixed and short (``eth0``, ``wan0``, ``br-lan``, ``lan0`` …), so
parallel runs never collide: only the namespace names carry the run id.

A link with :class:`LinkConditions` is cut in two: each real end gets a veth
into a namespace ``l-<label>`` where :mod:`netsim.linkem` forwards frames
between the halves with delay, jitter, loss and rate, in both directions,
so ``delay_ms=50`` adds about 100 ms of round-trip time.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from netsim.errors import TopologyError
from netsim.nat import NatKind, carrier_ruleset, router_ruleset

PROJECT_PREFIX = "p2ps-"
"""Every namespace netsim creates starts with this; ``cleanup`` looks for it."""

INTERNET_SUBNET = IPv4Network("203.0.113.0/24")
INTERNET_ROUTER_HOST = 1
FIRST_PUBLIC_HOST = 10
MAX_PUBLIC_HOSTS = 80
FIRST_SITE_UPLINK = 100
MAX_SITES = 150
PUBLIC_LAN_POOL = IPv4Network("198.51.100.0/24")
PUBLIC_LAN_PREFIX = 28
FIRST_PUBLIC_LAN_HOST = 2
PRIVATE_LAN_TEMPLATE = "10.{index}.0.0/24"
FIRST_PRIVATE_LAN_HOST = 10
CARRIER_TEMPLATE = "100.64.{index}.0/24"
MAX_PRIVATE_SITES = 250

_NAME_PATTERN = re.compile(r"[a-z]([a-z0-9-]{0,22}[a-z0-9])?")
_RUN_ID_PATTERN = re.compile(r"[0-9a-z]{1,12}")


@dataclass(frozen=True, slots=True)
class LinkConditions:
    """Delay, jitter, loss and rate of a link, applied to each direction.

    ``rate_mbit`` of None means unlimited. Jitter needs a delay; it varies
    each frame's delay uniformly by ``±jitter_ms`` without reordering.
    Emulated by :mod:`netsim.linkem` (this kernel has no netem).
    """

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_percent: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise TopologyError("delay and jitter must not be negative")
        if self.jitter_ms > 0 and self.delay_ms == 0:
            raise TopologyError("jitter needs a delay")
        if not 0 <= self.loss_percent <= 100:
            raise TopologyError(f"loss must be 0..100 %, not {self.loss_percent}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise TopologyError(f"rate must be positive, not {self.rate_mbit}")

    def linkem_arguments(self) -> tuple[str, ...]:
        """The condition options of ``python -m netsim.linkem``."""
        arguments = ["--delay-ms", f"{self.delay_ms:g}"]
        if self.jitter_ms:
            arguments += ["--jitter-ms", f"{self.jitter_ms:g}"]
        if self.loss_percent:
            arguments += ["--loss-percent", f"{self.loss_percent:g}"]
        if self.rate_mbit is not None:
            arguments += ["--rate-mbit", f"{self.rate_mbit:g}"]
        return tuple(arguments)


@dataclass(frozen=True, slots=True)
class Internet:
    """The internet segment: one bridge, one /24 of documentation addresses."""

    subnet: IPv4Network = INTERNET_SUBNET

    def __post_init__(self) -> None:
        if self.subnet.prefixlen != 24:
            raise TopologyError(f"the internet segment is a /24, not {self.subnet}")


@dataclass(frozen=True, slots=True)
class PublicHost:
    """A host with a public address directly on the internet (relay, STUN)."""

    name: str
    link: LinkConditions | None = None


@dataclass(frozen=True, slots=True)
class SiteHost:
    """A host on a site's LAN; ``link`` conditions its cable to the router."""

    name: str
    link: LinkConditions | None = None


@dataclass(frozen=True, slots=True)
class Site:
    """A router of kind ``nat`` with a LAN bridge and ``hosts`` on it.

    ``hairpin`` lets LAN hosts reach each other through the public address
    (translating kinds only); ``uplink`` conditions the router's link to the
    internet (the carrier's link for ``cgnat``).
    """

    name: str
    nat: NatKind
    hosts: tuple[SiteHost, ...]
    hairpin: bool = False
    uplink: LinkConditions | None = None

    def __post_init__(self) -> None:
        if not self.hosts:
            raise TopologyError(f"site {self.name!r} has no hosts")
        if self.hairpin and not self.nat.translates:
            raise TopologyError(
                f"site {self.name!r}: hairpin needs a translating NAT kind, not {self.nat}"
            )


@dataclass(frozen=True, slots=True)
class Topology:
    """Everything one run builds."""

    public_hosts: tuple[PublicHost, ...] = ()
    sites: tuple[Site, ...] = ()
    internet: Internet = field(default_factory=Internet)

    def __post_init__(self) -> None:
        names = [host.name for host in self.public_hosts]
        names += [host.name for site in self.sites for host in site.hosts]
        for name in names + [site.name for site in self.sites]:
            if not _NAME_PATTERN.fullmatch(name):
                raise TopologyError(
                    f"bad name {name!r}: use 1-24 of a-z, 0-9 and '-', starting with a letter"
                )
        _reject_duplicates("host", names)
        _reject_duplicates("site", [site.name for site in self.sites])
        if len(self.public_hosts) > MAX_PUBLIC_HOSTS:
            raise TopologyError(f"at most {MAX_PUBLIC_HOSTS} public hosts")
        if len(self.sites) > MAX_SITES:
            raise TopologyError(f"at most {MAX_SITES} sites")


class NamespaceRole(enum.StrEnum):
    INTERNET = "inet"
    HOST = "h"
    ROUTER = "r"
    CARRIER = "c"
    LINK = "l"
    """Holds the link emulator of one conditioned link."""


@dataclass(frozen=True, slots=True)
class InterfacePlan:
    """An interface inside one namespace (a veth end or a bridge)."""

    name: str
    address: IPv4Interface | None = None
    bridge: str | None = None
    """Enslave this interface to the named bridge of the same namespace."""
    promiscuous: bool = False
    """Link emulator ends take every frame, whatever its MAC address."""


@dataclass(frozen=True, slots=True)
class VethPlan:
    """A veth pair between two namespaces (never the root namespace)."""

    namespace_a: str
    interface_a: str
    namespace_b: str
    interface_b: str


@dataclass(frozen=True, slots=True)
class LinkEmulatorPlan:
    """A conditioned link: two veths and :mod:`netsim.linkem` in between.

    ``outer_ends`` are the (namespace, interface) pairs of the two real ends;
    they must not build GSO super-frames the emulator could not forward.
    """

    label: str
    namespace: str
    interface_a: str
    interface_b: str
    conditions: LinkConditions
    outer_ends: tuple[tuple[str, str], tuple[str, str]]


@dataclass(frozen=True, slots=True)
class RoutePlan:
    destination: IPv4Network
    via: IPv4Address


@dataclass(frozen=True, slots=True)
class NamespacePlan:
    name: str
    role: NamespaceRole
    bridges: tuple[InterfacePlan, ...] = ()
    interfaces: tuple[InterfacePlan, ...] = ()
    default_gateway: IPv4Address | None = None
    routes: tuple[RoutePlan, ...] = ()
    forwarding: bool = False
    nft_ruleset: str | None = None


@dataclass(frozen=True, slots=True)
class HostPlan:
    """Where a host lives and how others see it."""

    name: str
    namespace: str
    address: IPv4Address
    """The host's own address (private for hosts behind a translating NAT)."""
    gateway: IPv4Address
    site: str | None
    """None for a public host."""
    public_address: IPv4Address
    """The address the internet sees: the NAT's public address, or ``address``."""


@dataclass(frozen=True, slots=True)
class SitePlan:
    name: str
    nat: NatKind
    hairpin: bool
    router_namespace: str
    carrier_namespace: str | None
    lan_subnet: IPv4Network
    lan_gateway: IPv4Address
    wan_address: IPv4Address
    """The router's own uplink address (in 100.64.0.0/10 behind a carrier)."""
    public_address: IPv4Address
    """The address on the internet segment: the router's or the carrier's."""
    hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    """Every namespace of one run and how to build it, in creation order."""

    run_id: str
    namespace_prefix: str
    internet_namespace: str
    internet_gateway: IPv4Address
    namespaces: tuple[NamespacePlan, ...]
    veths: tuple[VethPlan, ...]
    link_emulators: tuple[LinkEmulatorPlan, ...]
    hosts: tuple[HostPlan, ...]
    sites: tuple[SitePlan, ...]

    def host(self, name: str) -> HostPlan:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(host.name for host in self.hosts)
        raise TopologyError(f"no host {name!r} in this topology (hosts: {known})")

    def site(self, name: str) -> SitePlan:
        for site in self.sites:
            if site.name == name:
                return site
        known = ", ".join(site.name for site in self.sites)
        raise TopologyError(f"no site {name!r} in this topology (sites: {known})")

    def namespace_names(self) -> tuple[str, ...]:
        return tuple(namespace.name for namespace in self.namespaces)


def namespace_prefix(run_id: str) -> str:
    if not _RUN_ID_PATTERN.fullmatch(run_id):
        raise TopologyError(f"bad run id {run_id!r}: 1-12 of 0-9, a-z")
    return f"{PROJECT_PREFIX}{run_id}-"


def run_id_of_namespace(namespace: str) -> str | None:
    """The run id inside a netsim namespace name, or None for other names."""
    if not namespace.startswith(PROJECT_PREFIX):
        return None
    run_id, _, rest = namespace[len(PROJECT_PREFIX) :].partition("-")
    if not rest or not _RUN_ID_PATTERN.fullmatch(run_id):
        return None
    return run_id


def plan_network(topology: Topology, run_id: str) -> NetworkPlan:
    """Number and name everything in ``topology`` for the run ``run_id``."""
    prefix = namespace_prefix(run_id)
    internet = topology.internet.subnet
    internet_gateway = internet[INTERNET_ROUTER_HOST]
    internet_namespace = f"{prefix}{NamespaceRole.INTERNET}"
    namespaces: list[NamespacePlan] = []
    veths: list[VethPlan] = []
    hosts: list[HostPlan] = []
    sites: list[SitePlan] = []
    internet_ports: list[InterfacePlan] = []
    internet_routes: list[RoutePlan] = []
    link_emulators: list[LinkEmulatorPlan] = []

    def connect(
        namespace_a: str,
        interface_a: str,
        namespace_b: str,
        interface_b: str,
        conditions: LinkConditions | None,
        label: str,
    ) -> None:
        """A cable between two namespaces; with conditions, through a link emulator."""
        if conditions is None:
            veths.append(VethPlan(namespace_a, interface_a, namespace_b, interface_b))
            return
        link_namespace = f"{prefix}{NamespaceRole.LINK}-{label}"
        veths.append(VethPlan(namespace_a, interface_a, link_namespace, "side-a"))
        veths.append(VethPlan(link_namespace, "side-b", namespace_b, interface_b))
        namespaces.append(
            NamespacePlan(
                name=link_namespace,
                role=NamespaceRole.LINK,
                interfaces=(
                    InterfacePlan("side-a", promiscuous=True),
                    InterfacePlan("side-b", promiscuous=True),
                ),
            )
        )
        link_emulators.append(
            LinkEmulatorPlan(
                label=label,
                namespace=link_namespace,
                interface_a="side-a",
                interface_b="side-b",
                conditions=conditions,
                outer_ends=((namespace_a, interface_a), (namespace_b, interface_b)),
            )
        )

    for index, public_host in enumerate(topology.public_hosts):
        namespace = f"{prefix}{NamespaceRole.HOST}-{public_host.name}"
        address = internet[FIRST_PUBLIC_HOST + index]
        port = f"pub{index}"
        internet_ports.append(InterfacePlan(port, bridge="br0"))
        connect(
            internet_namespace, port, namespace, "eth0", public_host.link, f"pub-{public_host.name}"
        )
        namespaces.append(
            NamespacePlan(
                name=namespace,
                role=NamespaceRole.HOST,
                interfaces=(
                    InterfacePlan("eth0", address=IPv4Interface(f"{address}/{internet.prefixlen}")),
                ),
                default_gateway=internet_gateway,
            )
        )
        hosts.append(
            HostPlan(
                name=public_host.name,
                namespace=namespace,
                address=address,
                gateway=internet_gateway,
                site=None,
                public_address=address,
            )
        )

    public_lans = PUBLIC_LAN_POOL.subnets(new_prefix=PUBLIC_LAN_PREFIX)
    private_index = 0
    for site_index, site in enumerate(topology.sites):
        uplink_address = internet[FIRST_SITE_UPLINK + site_index]
        uplink_interface = IPv4Interface(f"{uplink_address}/{internet.prefixlen}")
        port = f"site{site_index}"
        internet_ports.append(InterfacePlan(port, bridge="br0"))
        router_namespace = f"{prefix}{NamespaceRole.ROUTER}-{site.name}"
        carrier_namespace: str | None = None
        mapping_seed = 0x5EED0000 + site_index

        if site.nat.translates:
            private_index += 1
            if private_index > MAX_PRIVATE_SITES:
                raise TopologyError(f"at most {MAX_PRIVATE_SITES} translating sites")
            lan_subnet = IPv4Network(PRIVATE_LAN_TEMPLATE.format(index=private_index))
            first_host = FIRST_PRIVATE_LAN_HOST
        else:
            try:
                lan_subnet = next(public_lans)
            except StopIteration:
                raise TopologyError(
                    f"at most {PUBLIC_LAN_POOL.num_addresses >> (32 - PUBLIC_LAN_PREFIX)}"
                    " sites of kind none/firewall"
                ) from None
            first_host = FIRST_PUBLIC_LAN_HOST
        lan_gateway = lan_subnet[1]
        if first_host + len(site.hosts) > lan_subnet.num_addresses - 1:
            raise TopologyError(f"site {site.name!r} has too many hosts for {lan_subnet}")

        if site.nat is NatKind.CGNAT:
            carrier_namespace = f"{prefix}{NamespaceRole.CARRIER}-{site.name}"
            subscriber_subnet = IPv4Network(CARRIER_TEMPLATE.format(index=private_index))
            carrier_address = subscriber_subnet[1]
            wan_address = subscriber_subnet[2]
            wan_interface = IPv4Interface(f"{wan_address}/{subscriber_subnet.prefixlen}")
            router_gateway = carrier_address
            connect(
                internet_namespace, port, carrier_namespace, "wan0", site.uplink, f"up-{site.name}"
            )
            veths.append(VethPlan(carrier_namespace, "home0", router_namespace, "wan0"))
            namespaces.append(
                NamespacePlan(
                    name=carrier_namespace,
                    role=NamespaceRole.CARRIER,
                    interfaces=(
                        InterfacePlan("wan0", address=uplink_interface),
                        InterfacePlan(
                            "home0",
                            address=IPv4Interface(
                                f"{carrier_address}/{subscriber_subnet.prefixlen}"
                            ),
                        ),
                    ),
                    default_gateway=internet_gateway,
                    forwarding=True,
                    nft_ruleset=carrier_ruleset(
                        wan_interface="wan0",
                        subscriber_interface="home0",
                        public_address=uplink_address,
                        subscriber_subnet=subscriber_subnet,
                        mapping_seed=mapping_seed + 0x8000,
                    ),
                )
            )
        else:
            wan_address = uplink_address
            wan_interface = uplink_interface
            router_gateway = internet_gateway
            connect(
                internet_namespace, port, router_namespace, "wan0", site.uplink, f"up-{site.name}"
            )
            if not site.nat.translates:
                internet_routes.append(RoutePlan(lan_subnet, uplink_address))

        lan_ports: list[InterfacePlan] = []
        host_names: list[str] = []
        for host_index, site_host in enumerate(site.hosts):
            host_namespace = f"{prefix}{NamespaceRole.HOST}-{site_host.name}"
            host_address = lan_subnet[first_host + host_index]
            lan_port = f"lan{host_index}"
            lan_ports.append(InterfacePlan(lan_port, bridge="br-lan"))
            connect(
                router_namespace,
                lan_port,
                host_namespace,
                "eth0",
                site_host.link,
                f"lan-{site_host.name}",
            )
            namespaces.append(
                NamespacePlan(
                    name=host_namespace,
                    role=NamespaceRole.HOST,
                    interfaces=(
                        InterfacePlan(
                            "eth0", address=IPv4Interface(f"{host_address}/{lan_subnet.prefixlen}")
                        ),
                    ),
                    default_gateway=lan_gateway,
                )
            )
            hosts.append(
                HostPlan(
                    name=site_host.name,
                    namespace=host_namespace,
                    address=host_address,
                    gateway=lan_gateway,
                    site=site.name,
                    public_address=uplink_address if site.nat.translates else host_address,
                )
            )
            host_names.append(site_host.name)

        namespaces.append(
            NamespacePlan(
                name=router_namespace,
                role=NamespaceRole.ROUTER,
                bridges=(
                    InterfacePlan(
                        "br-lan", address=IPv4Interface(f"{lan_gateway}/{lan_subnet.prefixlen}")
                    ),
                ),
                interfaces=(
                    InterfacePlan("wan0", address=wan_interface),
                    *lan_ports,
                ),
                default_gateway=router_gateway,
                forwarding=True,
                nft_ruleset=router_ruleset(
                    site.nat,
                    wan_interface="wan0",
                    lan_interface="br-lan",
                    public_address=wan_address,
                    lan_subnet=lan_subnet,
                    hairpin=site.hairpin,
                    mapping_seed=mapping_seed,
                ),
            )
        )
        sites.append(
            SitePlan(
                name=site.name,
                nat=site.nat,
                hairpin=site.hairpin,
                router_namespace=router_namespace,
                carrier_namespace=carrier_namespace,
                lan_subnet=lan_subnet,
                lan_gateway=lan_gateway,
                wan_address=wan_address,
                public_address=uplink_address,
                hosts=tuple(host_names),
            )
        )

    internet_plan = NamespacePlan(
        name=internet_namespace,
        role=NamespaceRole.INTERNET,
        bridges=(
            InterfacePlan("br0", address=IPv4Interface(f"{internet_gateway}/{internet.prefixlen}")),
        ),
        interfaces=tuple(internet_ports),
        routes=tuple(internet_routes),
        forwarding=True,
    )
    return NetworkPlan(
        run_id=run_id,
        namespace_prefix=prefix,
        internet_namespace=internet_namespace,
        internet_gateway=internet_gateway,
        namespaces=(internet_plan, *namespaces),
        veths=tuple(veths),
        link_emulators=tuple(link_emulators),
        hosts=tuple(hosts),
        sites=tuple(sites),
    )


def _reject_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise TopologyError(f"{what} name {name!r} is used twice")
        seen.add(name)
