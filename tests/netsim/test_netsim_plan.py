"""Address planning, naming and link conditions of netsim topologies (pure, no root)."""

from __future__ import annotations

import itertools
import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from netsim.errors import TopologyError
from netsim.linkem import Conditions, TransmitState, release_time
from netsim.nat import NatKind
from netsim.topology import (
    LinkConditions,
    NamespaceRole,
    PublicHost,
    Site,
    SiteHost,
    Topology,
    plan_network,
    run_id_of_namespace,
)


def _site(name: str, kind: NatKind, *hosts: str, hairpin: bool = False) -> Site:
    return Site(name, kind, hosts=tuple(SiteHost(host) for host in hosts), hairpin=hairpin)


def _mixed_topology() -> Topology:
    return Topology(
        public_hosts=(PublicHost("relay"), PublicHost("stun")),
        sites=(
            _site("home", NatKind.EASY, "laptop", "desktop"),
            _site("office", NatKind.FIREWALL, "workstation"),
            _site("mobile", NatKind.CGNAT, "phone"),
            _site("cafe", NatKind.NONE, "tablet"),
        ),
    )


def test_public_hosts_and_uplinks_get_internet_addresses() -> None:
    plan = plan_network(_mixed_topology(), "abc123")
    assert plan.host("relay").address == IPv4Address("203.0.113.10")
    assert plan.host("stun").address == IPv4Address("203.0.113.11")
    assert plan.host("relay").public_address == plan.host("relay").address
    assert plan.site("home").public_address == IPv4Address("203.0.113.100")
    assert plan.site("office").public_address == IPv4Address("203.0.113.101")
    assert plan.internet_gateway == IPv4Address("203.0.113.1")


def test_translating_sites_get_private_lans_and_share_the_public_address() -> None:
    plan = plan_network(_mixed_topology(), "abc123")
    home = plan.site("home")
    assert home.lan_subnet == IPv4Network("10.1.0.0/24")
    assert plan.host("laptop").address == IPv4Address("10.1.0.10")
    assert plan.host("desktop").address == IPv4Address("10.1.0.11")
    assert plan.host("laptop").gateway == IPv4Address("10.1.0.1")
    assert plan.host("laptop").public_address == home.public_address
    assert plan.host("desktop").public_address == home.public_address


def test_public_lan_sites_get_routed_documentation_subnets() -> None:
    plan = plan_network(_mixed_topology(), "abc123")
    office, cafe = plan.site("office"), plan.site("cafe")
    assert office.lan_subnet == IPv4Network("198.51.100.0/28")
    assert cafe.lan_subnet == IPv4Network("198.51.100.16/28")
    assert plan.host("workstation").address == IPv4Address("198.51.100.2")
    assert plan.host("workstation").public_address == IPv4Address("198.51.100.2")
    internet = next(ns for ns in plan.namespaces if ns.role is NamespaceRole.INTERNET)
    routes = {(route.destination, route.via) for route in internet.routes}
    assert routes == {
        (office.lan_subnet, office.wan_address),
        (cafe.lan_subnet, cafe.wan_address),
    }


def test_cgnat_site_sits_behind_a_carrier_in_shared_address_space() -> None:
    plan = plan_network(_mixed_topology(), "abc123")
    mobile = plan.site("mobile")
    assert mobile.carrier_namespace == "p2ps-abc123-c-mobile"
    assert mobile.wan_address in IPv4Network("100.64.0.0/10")
    assert mobile.public_address in IPv4Network("203.0.113.0/24")
    assert plan.host("phone").public_address == mobile.public_address
    assert plan.host("phone").address in IPv4Network("10.0.0.0/8")
    router = next(ns for ns in plan.namespaces if ns.name == mobile.router_namespace)
    assert router.default_gateway is not None
    assert router.default_gateway in IPv4Network("100.64.0.0/10")


def test_every_namespace_carries_the_run_prefix_and_every_veth_joins_two_of_them() -> None:
    plan = plan_network(_mixed_topology(), "abc123")
    names = set(plan.namespace_names())
    assert all(name.startswith("p2ps-abc123-") for name in names)
    assert len(names) == len(plan.namespaces)
    for veth in plan.veths:
        assert veth.namespace_a in names
        assert veth.namespace_b in names
        assert veth.namespace_a != veth.namespace_b
    assert {run_id_of_namespace(name) for name in names} == {"abc123"}


def test_interface_names_fit_the_kernel_limit() -> None:
    plan = plan_network(_mixed_topology(), "abc123")
    for namespace in plan.namespaces:
        for interface in (*namespace.bridges, *namespace.interfaces):
            assert len(interface.name) <= 15, interface.name


def test_only_routers_forward_and_only_translating_or_firewall_routers_have_rules() -> None:
    plan = plan_network(_mixed_topology(), "abc123")
    by_name = {namespace.name: namespace for namespace in plan.namespaces}
    assert by_name[plan.host("laptop").namespace].forwarding is False
    assert by_name[plan.site("home").router_namespace].nft_ruleset is not None
    assert by_name[plan.site("office").router_namespace].nft_ruleset is not None
    assert by_name[plan.site("cafe").router_namespace].nft_ruleset is None


def test_conditioned_links_go_through_a_link_emulator_namespace() -> None:
    slow = LinkConditions(delay_ms=50, jitter_ms=5, loss_percent=1, rate_mbit=10)
    topology = Topology(
        public_hosts=(PublicHost("relay", link=slow),),
        sites=(Site("home", NatKind.EASY, hosts=(SiteHost("laptop"),), uplink=slow),),
    )
    plan = plan_network(topology, "abc123")
    labels = {emulator.label: emulator for emulator in plan.link_emulators}
    assert set(labels) == {"pub-relay", "up-home"}
    emulator = labels["up-home"]
    assert emulator.namespace == "p2ps-abc123-l-up-home"
    assert set(emulator.outer_ends) == {
        ("p2ps-abc123-inet", "site0"),
        ("p2ps-abc123-r-home", "wan0"),
    }
    assert slow.linkem_arguments() == (
        "--delay-ms",
        "50",
        "--jitter-ms",
        "5",
        "--loss-percent",
        "1",
        "--rate-mbit",
        "10",
    )


def test_names_must_be_unique_and_well_formed() -> None:
    with pytest.raises(TopologyError, match="used twice"):
        Topology(public_hosts=(PublicHost("a"),), sites=(_site("s", NatKind.EASY, "a"),))
    with pytest.raises(TopologyError, match="bad name"):
        Topology(public_hosts=(PublicHost("Relay_1"),))
    with pytest.raises(TopologyError, match="no hosts"):
        Site("empty", NatKind.EASY, hosts=())


def test_hairpin_is_refused_where_nothing_is_translated() -> None:
    with pytest.raises(TopologyError, match="hairpin"):
        _site("office", NatKind.FIREWALL, "pc", hairpin=True)


def test_link_conditions_are_validated() -> None:
    with pytest.raises(TopologyError):
        LinkConditions(jitter_ms=5)
    with pytest.raises(TopologyError):
        LinkConditions(loss_percent=101)
    with pytest.raises(TopologyError):
        LinkConditions(rate_mbit=0)


def test_too_many_hosts_for_a_public_lan_is_refused() -> None:
    hosts = [f"h{index}" for index in range(14)]
    with pytest.raises(TopologyError, match="too many hosts"):
        plan_network(Topology(sites=(_site("office", NatKind.NONE, *hosts),)), "abc123")
    plan_network(Topology(sites=(_site("office", NatKind.NONE, *hosts[:13]),)), "abc123")


def test_run_ids_are_found_only_in_netsim_names() -> None:
    assert run_id_of_namespace("p2ps-0a1b2c-h-laptop") == "0a1b2c"
    assert run_id_of_namespace("p2ps-0a1b2c") is None
    assert run_id_of_namespace("docker-1") is None


def test_link_emulator_delays_serialises_and_keeps_order() -> None:
    rng = random.Random(1)
    delayed = Conditions(delay_s=0.05, jitter_s=0.0, loss=0.0, rate_bps=None)
    assert release_time(10.0, 1500, TransmitState(), delayed, rng) == pytest.approx(10.05)

    throttled = Conditions(delay_s=0.0, jitter_s=0.0, loss=0.0, rate_bps=8_000_000)
    timing = TransmitState()
    first = release_time(0.0, 1000, timing, throttled, rng)
    second = release_time(0.0, 1000, timing, throttled, rng)
    assert first == pytest.approx(0.001)
    assert second == pytest.approx(0.002)

    jittery = Conditions(delay_s=0.05, jitter_s=0.04, loss=0.0, rate_bps=None)
    timing = TransmitState()
    releases = [release_time(index * 0.001, 100, timing, jittery, rng) for index in range(200)]
    assert releases == sorted(releases)
    assert min(releases) >= 0.01
    assert max(b - a for a, b in itertools.pairwise(releases)) > 0.005
