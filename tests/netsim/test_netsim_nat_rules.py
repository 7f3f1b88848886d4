"""nft rule text of each NAT kind, and the self-test's verdicts (pure, no root)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from netsim.nat import EIM_PORT_BASE, EIM_PORT_COUNT, NatKind, carrier_ruleset, router_ruleset
from netsim.probe import NatProbeResult
from netsim.selftest import EXPECTED_BEHAVIOUR, Filtering, Mapping, check_hairpin, classify

PUBLIC = IPv4Address("203.0.113.100")
LAN = IPv4Network("10.1.0.0/24")


def _rules(kind: NatKind, *, hairpin: bool = False) -> str:
    text = router_ruleset(
        kind,
        wan_interface="wan0",
        lan_interface="br-lan",
        public_address=PUBLIC,
        lan_subnet=LAN,
        hairpin=hairpin,
        mapping_seed=0x1234,
    )
    assert text is not None
    return text


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def test_none_loads_no_rules() -> None:
    no_rules = router_ruleset(
        NatKind.NONE,
        wan_interface="wan0",
        lan_interface="br-lan",
        public_address=PUBLIC,
        lan_subnet=LAN,
        hairpin=False,
        mapping_seed=1,
    )
    assert no_rules is None


def test_firewall_filters_inbound_and_translates_nothing() -> None:
    lines = _lines(_rules(NatKind.FIREWALL))
    assert "ct state established,related accept" in lines
    assert 'iifname "wan0" drop' in lines
    assert not any("snat" in line or "masquerade" in line or "type nat" in line for line in lines)


@pytest.mark.parametrize("kind", [NatKind.EASY, NatKind.CGNAT, NatKind.UDP_BLOCKED])
def test_endpoint_independent_kinds_map_by_a_hash_of_the_internal_endpoint(kind: NatKind) -> None:
    text = _rules(kind)
    lines = _lines(text)
    assert f"meta l4proto udp meta mark set jhash ip saddr . udp sport mod {EIM_PORT_COUNT}" in (
        " ".join(lines)
    )
    assert f'oifname "wan0" meta l4proto udp snat ip to {PUBLIC} : meta mark map @eim_port' in lines
    assert f"0 : {EIM_PORT_BASE}," in text
    assert f"{EIM_PORT_COUNT - 1} : {EIM_PORT_BASE + EIM_PORT_COUNT - 1} }}" in text
    assert "random" not in text


def test_hard_nat_picks_a_random_port_per_conntrack_entry() -> None:
    text = _rules(NatKind.HARD)
    assert f'oifname "wan0" meta l4proto udp snat ip to {PUBLIC} random' in _lines(text)
    assert "@eim_port" not in text


@pytest.mark.parametrize("kind", [NatKind.EASY, NatKind.HARD, NatKind.CGNAT, NatKind.UDP_BLOCKED])
def test_every_translating_kind_has_a_prerouting_nat_chain_and_drops_unsolicited(
    kind: NatKind,
) -> None:
    text = _rules(kind)
    assert "type nat hook prerouting priority dstnat" in text
    assert "type nat hook postrouting priority srcnat" in text
    lines = _lines(text)
    assert lines.count('iifname "wan0" drop') == 2  # forward and input
    assert text.startswith("flush ruleset\n")


def test_udp_blocked_drops_lan_udp_except_dns_before_anything_else() -> None:
    lines = _lines(_rules(NatKind.UDP_BLOCKED))
    forward = lines.index("type filter hook forward priority filter; policy accept;")
    assert lines[forward + 1] == 'iifname "br-lan" udp dport != 53 drop'


def test_hairpin_on_dnats_through_the_recorded_mappings_and_snats_the_sender() -> None:
    lines = _lines(_rules(NatKind.EASY, hairpin=True))
    assert f'iifname "br-lan" ip daddr {PUBLIC} dnat ip to udp dport map @eim_reverse' in lines
    assert any(
        line.startswith(f'oifname "br-lan" ct status dnat ip saddr {LAN}') and "snat" in line
        for line in lines
    )
    assert not any("meta l4proto udp drop" in line for line in lines)


def test_hairpin_off_drops_lan_packets_for_the_public_address() -> None:
    lines = _lines(_rules(NatKind.EASY, hairpin=False))
    assert f'iifname "br-lan" ip daddr {PUBLIC} meta l4proto udp drop' in lines
    assert not any("dnat" in line for line in lines)


def test_hairpin_is_refused_without_translation() -> None:
    with pytest.raises(ValueError, match="hairpin"):
        _rules(NatKind.FIREWALL, hairpin=True)


def test_carrier_is_an_easy_nat_towards_its_subscribers() -> None:
    text = carrier_ruleset(
        wan_interface="wan0",
        subscriber_interface="home0",
        public_address=PUBLIC,
        subscriber_subnet=IPv4Network("100.64.1.0/24"),
        mapping_seed=7,
    )
    assert "@eim_port" in text
    assert 'iifname "home0" ip daddr 203.0.113.100 meta l4proto udp drop' in _lines(text)


def _probe(
    mapped_primary: str | None,
    mapped_secondary: str | None,
    *,
    alt: bool | None = False,
    third: bool | None = False,
    local: str = "10.1.0.10:40000",
) -> NatProbeResult:
    return NatProbeResult(
        local=local,
        mapped_primary=mapped_primary,
        mapped_secondary=mapped_secondary,
        alt_port_reply=alt,
        unsolicited_from_third=third,
        dns_reachable=True,
    )


def test_classify_tells_the_kinds_apart() -> None:
    public = "203.0.113.100"
    assert classify(_probe(f"{public}:5", f"{public}:5")) == EXPECTED_BEHAVIOUR[NatKind.EASY]
    assert classify(_probe(f"{public}:5", f"{public}:6")) == EXPECTED_BEHAVIOUR[NatKind.HARD]
    local = "198.51.100.2:40000"
    assert classify(_probe(local, local, local=local)) == EXPECTED_BEHAVIOUR[NatKind.FIREWALL]
    assert (
        classify(_probe(local, local, local=local, alt=True, third=True))
        == (EXPECTED_BEHAVIOUR[NatKind.NONE])
    )
    assert (
        classify(_probe(None, None, alt=None, third=None))
        == (EXPECTED_BEHAVIOUR[NatKind.UDP_BLOCKED])
    )
    address_dependent = classify(_probe(f"{public}:5", f"{public}:5", alt=True))
    assert address_dependent.filtering is Filtering.ADDRESS_DEPENDENT
    assert classify(_probe(f"{public}:5", None)).mapping is Mapping.INCONCLUSIVE


def test_hairpin_verdicts() -> None:
    public = "203.0.113.100"
    delivered = check_hairpin(
        hairpin=True, mapped=f"{public}:1", received_sources=[f"{public}:2"], site_public=public
    )
    assert delivered.passed
    bypassed = check_hairpin(
        hairpin=True, mapped=f"{public}:1", received_sources=["10.1.0.10:2"], site_public=public
    )
    assert not bypassed.passed
    leaked = check_hairpin(
        hairpin=False, mapped=f"{public}:1", received_sources=[f"{public}:2"], site_public=public
    )
    assert not leaked.passed
    assert check_hairpin(
        hairpin=False, mapped=f"{public}:1", received_sources=[], site_public=public
    ).passed
