"""NAT kinds as nftables rulesets: pure text, no I/O.

Every NAT router of a netsim topology is a network namespace with a WAN
interface (towards the internet segment, or towards the carrier for a CGNAT
home router) and a LAN bridge. :func:`router_ruleset` returns the complete
``nft -f`` input for one router; :mod:`netsim.netns` loads it. Nothing here
shells out, so the rule text is unit-tested without root.

Vocabulary (RFC 4787): *mapping* is how the router picks the public
``address:port`` for an internal ``address:port``; *filtering* is which
inbound packets it lets through to that mapping.

The kinds
---------
``none``
    No router behaviour at all: the site's LAN is a public subnet that the
    router forwards as is. No ruleset is loaded. Mapping: none (the peer sees
    the host's own address); filtering: none (anyone can send to the host).
``firewall``
    Public subnet, no translation, but a stateful firewall: the forward chain
    accepts ``ct state established,related`` and drops every other packet
    that enters from the WAN. Address-and-port-dependent filtering, no
    mapping.
``easy``
    Endpoint-independent mapping (EIM) and address-and-port-dependent
    filtering (APDF): what most home routers do, and what UDP hole punching
    needs from at least one side.
``hard``
    Endpoint-dependent mapping ("symmetric NAT"): ``snat ... random`` makes
    the kernel pick a fresh random public port for every new conntrack
    entry, i.e. for every destination ``address:port``. APDF filtering.
``cgnat``
    Two ``easy`` routers in a row: the site's home router translates the LAN
    to an address in 100.64.0.0/10, the carrier router translates that to a
    public address. Both use the ``easy`` ruleset; the carrier never
    hairpins.
``udp-blocked``
    ``easy`` translation, but every UDP packet from the LAN is dropped unless
    it goes to port 53 (DNS), like captive portals and some guest networks.
    QUIC cannot work there; only a TCP/WebSocket relay transport could.

How EIM is built, and why not with ``masquerade``
-------------------------------------------------
Measured on kernel 6.18.44-fc-v595 with nftables 1.0.6 (Debian 12):

* Plain ``masquerade`` / ``snat to ADDR`` is *usually* endpoint-independent:
  the kernel keeps the source port when it is free and reuses an existing
  mapping of the same internal ``address:port`` (``find_appropriate_src`` in
  ``nf_nat_core.c``). It breaks as soon as two LAN hosts use the same local
  port: host B on port 6000 talking to server X got public port 6000 (free
  towards X), then towards server Y, where host A already held public port
  6000, it got a random port. Two p2psync nodes behind one router bind the
  same default port, so this case matters; we do not rely on it.
* So the public port is a pure function of the internal endpoint:
  ``meta mark set jhash ip saddr . udp sport mod 16384 seed S`` then
  ``snat ip to PUBLIC : meta mark map @eim_port``, where ``@eim_port`` is a
  constant map ``0 → 49152 … 16383 → 65535``. The same internal
  ``address:port`` gets the same public port towards every destination, and
  two hosts using the same local port get different public ports.
* The map is needed because nft 1.0.6 hands the hash to ``snat`` in host
  byte order: ``snat to ADDR : jhash ... offset 49152`` produced
  byte-swapped ports (port 215 for 55040). A map lookup converts it.
  ``typeof jhash ...`` as the map key loads, but ``nft list ruleset`` then
  segfaults; keying by ``mark`` (also a host-order u32) lists cleanly.
* Limit: two internal endpoints whose hashes collide (chance 1/16384 per
  pair) get the same public port; if both then talk to the same remote
  ``address:port``, the later flow's packets are dropped (conntrack clash),
  as on a real NAT that has run out of ports for that destination.
* Filtering needs no extra state: replies match conntrack
  (``ct state established``); anything else arriving on the WAN is dropped
  in the forward and input chains. That is APDF: a packet from a known
  address but another port is also dropped.
* The ``type nat hook prerouting`` chain is always present. On 6.18 replies
  were de-translated even without it, but the notes from other labs report
  kernels that need it, and hairpinning uses it anyway.

Hairpinning
-----------
With ``hairpin=True`` a LAN host can reach another LAN host through the
router's public address and the other host's mapped port, as it would after
learning that address from STUN. A filter chain at postrouting priority 200
(after NAT) records every translated UDP flow in ``@eim_reverse``
(public port → internal ``address . port``, refreshed on use, 2 minutes
timeout). Prerouting DNATs LAN packets for ``PUBLIC:port`` through that map,
and postrouting SNATs them to the sender's own mapping, so the receiver sees
the sender's public ``address:port`` (as real hairpinning routers do).
With ``hairpin=False`` such packets are dropped at the router's input.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

# Public ports of the EIM mapping: the IANA dynamic range, 16384 ports.
EIM_PORT_BASE = 49152
EIM_PORT_COUNT = 16384
# Idle lifetime of a recorded mapping for hairpinning; longer than conntrack's
# UDP stream timeout would only keep dead entries.
EIM_REVERSE_TIMEOUT_S = 120
# Port that stays open in the udp-blocked kind.
DNS_PORT = 53

TABLE_NAME = "netsim"


class NatKind(enum.StrEnum):
    """How a site's router treats traffic between its LAN and the internet."""

    NONE = "none"
    FIREWALL = "firewall"
    EASY = "easy"
    HARD = "hard"
    CGNAT = "cgnat"
    UDP_BLOCKED = "udp-blocked"

    @property
    def translates(self) -> bool:
        """True when hosts of this kind sit on a private LAN behind NAT."""
        return self not in (NatKind.NONE, NatKind.FIREWALL)


def router_ruleset(
    kind: NatKind,
    *,
    wan_interface: str,
    lan_interface: str,
    public_address: IPv4Address,
    lan_subnet: IPv4Network,
    hairpin: bool,
    mapping_seed: int,
) -> str | None:
    """The ``nft -f`` text for a site router of ``kind``; None when it needs none.

    For ``cgnat`` this is the *home* router (it behaves as ``easy``); the
    carrier's ruleset is :func:`carrier_ruleset`.
    """
    if hairpin and not kind.translates:
        raise ValueError(f"hairpin needs a translating NAT kind, not {kind}")
    if kind is NatKind.NONE:
        return None
    if kind is NatKind.FIREWALL:
        return _render_table(
            nat_chains=None,
            forward_rules=_inbound_filter(wan_interface),
            input_rules=_inbound_filter(wan_interface),
        )
    wan = _quote(wan_interface)
    lan = _quote(lan_interface)
    endpoint_independent = kind is not NatKind.HARD
    postrouting: list[str] = []
    if endpoint_independent:
        udp_snat_statement = f"snat ip to {public_address} : meta mark map @eim_port"
        postrouting += [
            f"meta l4proto udp meta mark set jhash ip saddr . udp sport mod {EIM_PORT_COUNT}"
            f" seed {mapping_seed:#x}",
            f"oifname {wan} meta l4proto udp {udp_snat_statement}",
        ]
    else:
        udp_snat_statement = f"snat ip to {public_address} random"
        postrouting.append(f"oifname {wan} meta l4proto udp {udp_snat_statement}")
    postrouting.append(f"oifname {wan} snat ip to {public_address}")
    prerouting: list[str] = []
    input_rules = _inbound_filter(wan_interface)
    if hairpin:
        prerouting.append(
            f"iifname {lan} ip daddr {public_address} dnat ip to udp dport map @eim_reverse"
        )
        postrouting.append(
            f"oifname {lan} ct status dnat ip saddr {lan_subnet}"
            f" meta l4proto udp {udp_snat_statement}"
        )
    else:
        input_rules.append(f"iifname {lan} ip daddr {public_address} meta l4proto udp drop")
    forward_rules = _inbound_filter(wan_interface)
    if kind is NatKind.UDP_BLOCKED:
        forward_rules.insert(0, f"iifname {lan} udp dport != {DNS_PORT} drop")
    return _render_table(
        nat_chains=_NatChains(
            prerouting=prerouting,
            postrouting=postrouting,
            endpoint_independent=endpoint_independent,
        ),
        forward_rules=forward_rules,
        input_rules=input_rules,
    )


def carrier_ruleset(
    *,
    wan_interface: str,
    subscriber_interface: str,
    public_address: IPv4Address,
    subscriber_subnet: IPv4Network,
    mapping_seed: int,
) -> str:
    """The carrier-grade NAT in front of a ``cgnat`` site: ``easy``, no hairpin."""
    text = router_ruleset(
        NatKind.EASY,
        wan_interface=wan_interface,
        lan_interface=subscriber_interface,
        public_address=public_address,
        lan_subnet=subscriber_subnet,
        hairpin=False,
        mapping_seed=mapping_seed,
    )
    if text is None:  # pragma: no cover - EASY always has rules
        raise AssertionError("easy NAT without rules")
    return text


@dataclass(frozen=True, slots=True)
class _NatChains:
    prerouting: list[str]
    postrouting: list[str]
    endpoint_independent: bool


def _quote(interface: str) -> str:
    return f'"{interface}"'


def _inbound_filter(wan_interface: str) -> list[str]:
    """Address-and-port-dependent filtering: only replies may come in."""
    return [
        "ct state established,related accept",
        f"iifname {_quote(wan_interface)} drop",
    ]


def _eim_port_map() -> str:
    elements = ", ".join(f"{i} : {EIM_PORT_BASE + i}" for i in range(EIM_PORT_COUNT))
    return f"\tmap eim_port {{\n\t\ttype mark : inet_service\n\t\telements = {{ {elements} }}\n\t}}"


def _eim_reverse_map() -> str:
    return (
        "\tmap eim_reverse {\n"
        "\t\ttypeof udp sport : ip saddr . udp sport\n"
        "\t\tflags dynamic,timeout\n"
        f"\t\ttimeout {EIM_REVERSE_TIMEOUT_S}s\n"
        "\t}"
    )


def _chain(name: str, header: str, rules: list[str]) -> str:
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return f"\tchain {name} {{\n\t\t{header}\n{body}\t}}"


def _render_table(
    *, nat_chains: _NatChains | None, forward_rules: list[str], input_rules: list[str]
) -> str:
    parts: list[str] = []
    if nat_chains is not None:
        if nat_chains.endpoint_independent:
            parts.append(_eim_port_map())
        parts.append(_eim_reverse_map())
        # Must exist even when empty: see the module docstring.
        parts.append(
            _chain(
                "prerouting",
                "type nat hook prerouting priority dstnat; policy accept;",
                nat_chains.prerouting,
            )
        )
        parts.append(
            _chain(
                "postrouting",
                "type nat hook postrouting priority srcnat; policy accept;",
                nat_chains.postrouting,
            )
        )
        # Priority 200 runs after srcnat (100): the packet already carries its
        # public port, and ct original holds the internal endpoint.
        parts.append(
            _chain(
                "record_mappings",
                "type filter hook postrouting priority 200; policy accept;",
                [
                    "ct direction original ct status snat meta l4proto udp"
                    " update @eim_reverse { udp sport : ct original ip saddr"
                    " . ct original proto-src }"
                ],
            )
        )
    parts.append(
        _chain("forward", "type filter hook forward priority filter; policy accept;", forward_rules)
    )
    parts.append(
        _chain("input", "type filter hook input priority filter; policy accept;", input_rules)
    )
    body = "\n".join(parts)
    # "flush ruleset" first: loading is idempotent and replaces anything stale.
    return f"flush ruleset\ntable ip {TABLE_NAME} {{\n{body}\n}}\n"
