"""Prove that every NAT kind behaves as claimed, with real packets.

One topology holds three responders on public hosts (``stun1``-``stun3``)
and one site per NAT kind with two hosts, ``<kind>-a`` and ``<kind>-b``.
Both hosts run the ``nat`` probe (:mod:`netsim.probe`) from the SAME local
port, one after the other: a talks to stun1 then stun2 (stun3 is its
never-contacted third party), b to stun3 then stun1 (stun2 its third). So b
first gets a public port where a has no flow, then needs it towards stun1,
where a already holds the port a plain Linux masquerade would have kept for
b: the case where masquerade loses endpoint-independence (see
:mod:`netsim.nat`). An ``easy`` router passes only if its mapping really
depends on the internal endpoint alone.

What each observation means (RFC 4787 terms):

- mapping: the address stun1 and stun2 saw are the host's own (*not
  translated*), equal (*endpoint-independent*) or different
  (*endpoint-dependent*); no answer at all: *no UDP*.
- filtering: a packet from stun3, never contacted, arrives (*open*); only
  a reply from stun1's other port arrives (*address-dependent*); neither
  (*address-and-port-dependent*).

When ``easy`` is tested, hairpinning is checked too: on a second ``easy``
site with ``hairpin=True`` a host reaches its neighbour's public mapping and
the neighbour sees the sender's public address; on the ``easy`` site
(hairpin off) the same packet never arrives.

:func:`classify` and the expectations are pure; :func:`run_selftest` drives
probes in a built :class:`~netsim.build.Network`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from netsim.build import Network
from netsim.errors import CommandFailed
from netsim.nat import DNS_PORT, NatKind
from netsim.probe import NatProbeResult
from netsim.procs import Proc, python_module_argv
from netsim.topology import PublicHost, Site, SiteHost, Topology
from netsim.wire import parse_endpoint_untrusted

RESPONDER_HOSTS = ("stun1", "stun2", "stun3")
RESPONDER_PORT = 3478
RESPONDER_ALT_PORT = 3479
SHARED_LOCAL_PORT = 40000
HAIRPIN_LISTEN_PORT = 40001
HAIRPIN_SEND_PORT = 40002
HAIRPIN_SITE = "hairpin"
HAIRPIN_LISTEN_S = 1.5
PROBE_TIMEOUT_S = 20.0
RESPONDER_LIFETIME_S = 300.0


class Mapping(enum.StrEnum):
    """RFC 4787 mapping behaviour, by its usual abbreviation."""

    NOT_TRANSLATED = "no NAT"
    ENDPOINT_INDEPENDENT = "EIM"
    ENDPOINT_DEPENDENT = "EDM"
    NO_UDP = "no UDP"
    INCONCLUSIVE = "inconclusive"


class Filtering(enum.StrEnum):
    """RFC 4787 filtering behaviour, by its usual abbreviation."""

    OPEN = "open"
    ADDRESS_DEPENDENT = "ADF"
    ADDRESS_AND_PORT_DEPENDENT = "APDF"
    NO_UDP = "no UDP"


LEGEND = (
    "EIM/EDM: endpoint-independent/-dependent mapping; ADF/APDF: address-/"
    "address-and-port-dependent filtering; open: anyone may send (RFC 4787)"
)


@dataclass(frozen=True, slots=True)
class Behaviour:
    mapping: Mapping
    filtering: Filtering
    dns_reachable: bool


EXPECTED_BEHAVIOUR: dict[NatKind, Behaviour] = {
    NatKind.NONE: Behaviour(Mapping.NOT_TRANSLATED, Filtering.OPEN, True),
    NatKind.FIREWALL: Behaviour(Mapping.NOT_TRANSLATED, Filtering.ADDRESS_AND_PORT_DEPENDENT, True),
    NatKind.EASY: Behaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT, True
    ),
    NatKind.HARD: Behaviour(Mapping.ENDPOINT_DEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT, True),
    NatKind.CGNAT: Behaviour(
        Mapping.ENDPOINT_INDEPENDENT, Filtering.ADDRESS_AND_PORT_DEPENDENT, True
    ),
    NatKind.UDP_BLOCKED: Behaviour(Mapping.NO_UDP, Filtering.NO_UDP, True),
}


def classify(result: NatProbeResult) -> Behaviour:
    """What a ``nat`` probe result says about the NAT in front of the host."""
    dns_reachable = bool(result.dns_reachable)
    if result.mapped_primary is None and result.mapped_secondary is None:
        return Behaviour(Mapping.NO_UDP, Filtering.NO_UDP, dns_reachable)
    if result.mapped_primary is None or result.mapped_secondary is None:
        mapping = Mapping.INCONCLUSIVE
    elif result.mapped_primary == result.mapped_secondary == result.local:
        mapping = Mapping.NOT_TRANSLATED
    elif result.mapped_primary == result.mapped_secondary:
        mapping = Mapping.ENDPOINT_INDEPENDENT
    else:
        mapping = Mapping.ENDPOINT_DEPENDENT
    if result.unsolicited_from_third:
        filtering = Filtering.OPEN
    elif result.alt_port_reply:
        filtering = Filtering.ADDRESS_DEPENDENT
    elif result.mapped_primary is None:
        filtering = Filtering.NO_UDP
    else:
        filtering = Filtering.ADDRESS_AND_PORT_DEPENDENT
    return Behaviour(mapping, filtering, dns_reachable)


@dataclass(frozen=True, slots=True)
class HostObservation:
    host: str
    probe: NatProbeResult
    behaviour: Behaviour


@dataclass(frozen=True, slots=True)
class CheckReport:
    """One row of the self-test table."""

    name: str
    expected: str
    observed: str
    problems: tuple[str, ...] = ()
    details: dict[str, object] = field(default_factory=dict)
    observations: tuple[HostObservation, ...] = ()
    """The probe results behind a NAT-kind row (empty for hairpin rows)."""

    @property
    def passed(self) -> bool:
        return not self.problems


def selftest_topology(kinds: Iterable[NatKind]) -> Topology:
    kinds = list(dict.fromkeys(kinds))
    sites = [
        Site(kind.value, kind, hosts=(SiteHost(f"{kind.value}-a"), SiteHost(f"{kind.value}-b")))
        for kind in kinds
    ]
    if NatKind.EASY in kinds:
        sites.append(
            Site(
                HAIRPIN_SITE,
                NatKind.EASY,
                hosts=(SiteHost("hairpin-a"), SiteHost("hairpin-b")),
                hairpin=True,
            )
        )
    return Topology(
        public_hosts=tuple(PublicHost(name) for name in RESPONDER_HOSTS), sites=tuple(sites)
    )


def check_kind(
    kind: NatKind, observations: Sequence[HostObservation], public_addresses: dict[str, str]
) -> CheckReport:
    """Compare what the hosts of a ``kind`` site observed with the claim (pure)."""
    expected = EXPECTED_BEHAVIOUR[kind]
    problems: list[str] = []
    for observation in observations:
        if observation.behaviour != expected:
            problems.append(f"{observation.host}: {_describe(observation.behaviour)}")
        mapped = observation.probe.mapped_primary
        if mapped is not None:
            seen_address = parse_endpoint_untrusted(mapped)[0]
            if seen_address != public_addresses[observation.host]:
                problems.append(
                    f"{observation.host}: seen as {seen_address},"
                    f" expected {public_addresses[observation.host]}"
                )
    observed = sorted({_describe(observation.behaviour) for observation in observations})
    return CheckReport(
        name=kind.value,
        expected=_describe(expected),
        observed=" | ".join(observed),
        problems=tuple(problems),
        details={observation.host: asdict(observation.probe) for observation in observations},
        observations=tuple(observations),
    )


def check_hairpin(
    *, hairpin: bool, mapped: str | None, received_sources: Sequence[str], site_public: str
) -> CheckReport:
    """Did a packet to the neighbour's public mapping arrive, and from where? (pure)."""
    name = f"hairpin {'on' if hairpin else 'off'}"
    expected = "delivered from the public address" if hairpin else "dropped"
    if not received_sources:
        observed = "dropped"
    else:
        observed = "delivered from " + ", ".join(sorted(set(received_sources)))
    problems: list[str] = []
    if mapped is None:
        problems.append("the listener learned no mapping")
    elif hairpin:
        if not received_sources:
            problems.append("nothing arrived through the public address")
        elif any(parse_endpoint_untrusted(s)[0] != site_public for s in received_sources):
            problems.append(f"sender not seen as {site_public}")
    elif received_sources:
        problems.append("hairpin is off, yet packets arrived")
    return CheckReport(
        name=name,
        expected=expected,
        observed=observed,
        problems=tuple(problems),
        details={"listener_mapping": mapped, "received_from": list(received_sources)},
    )


def run_selftest(net: Network, kinds: Iterable[NatKind]) -> list[CheckReport]:
    """Run the probes of every kind in ``net`` (built from :func:`selftest_topology`)."""
    kinds = list(dict.fromkeys(kinds))
    responders = [
        net.spawn(
            host,
            python_module_argv(
                "netsim.responder",
                "--port",
                str(RESPONDER_PORT),
                "--alt-port",
                str(RESPONDER_ALT_PORT),
                "--extra-port",
                str(DNS_PORT),
                "--lifetime",
                str(RESPONDER_LIFETIME_S),
            ),
            name=f"{host}-responder",
        )
        for host in RESPONDER_HOSTS
    ]
    for responder in responders:
        responder.wait_for_output("ready", timeout=10)
    stun1, stun2, stun3 = (_responder_endpoint(net, host) for host in RESPONDER_HOSTS)
    dns = f"{net.address('stun1')}:{DNS_PORT}"

    observations: dict[NatKind, list[HostObservation]] = {kind: [] for kind in kinds}
    # Host a of every site at once, then host b from the same local port: b
    # first talks to stun3 (where a has no flow, so plain masquerade would
    # keep b's port), then to stun1 (where a holds that public port).
    for suffix, primary, secondary, third in (
        ("a", stun1, stun2, stun3),
        ("b", stun3, stun1, stun2),
    ):
        probes = {
            kind: net.spawn(
                f"{kind.value}-{suffix}",
                python_module_argv(
                    "netsim.probe",
                    "nat",
                    "--primary",
                    primary,
                    "--secondary",
                    secondary,
                    "--third",
                    third,
                    "--dns",
                    dns,
                    "--local-port",
                    str(SHARED_LOCAL_PORT),
                ),
                name=f"{kind.value}-{suffix}-probe",
            )
            for kind in kinds
        }
        for kind, probe in probes.items():
            result = _nat_probe_result(probe)
            observations[kind].append(
                HostObservation(f"{kind.value}-{suffix}", result, classify(result))
            )

    public_addresses = {host.name: str(host.public_address) for host in net.plan.hosts}
    reports = [check_kind(kind, observations[kind], public_addresses) for kind in kinds]
    if NatKind.EASY in kinds:
        reports += _run_hairpin_checks(net, stun1)
    return reports


def _run_hairpin_checks(net: Network, stun: str) -> list[CheckReport]:
    cases = ((True, HAIRPIN_SITE), (False, NatKind.EASY.value))
    listeners = {
        site: net.spawn(
            f"{site}-b",
            python_module_argv(
                "netsim.probe",
                "listen",
                "--stun",
                stun,
                "--local-port",
                str(HAIRPIN_LISTEN_PORT),
                "--duration",
                str(HAIRPIN_LISTEN_S),
            ),
            name=f"{site}-b-hairpin-listener",
        )
        for _, site in cases
    }
    mappings: dict[str, str | None] = {}
    for site, listener in listeners.items():
        listener.wait_for_output('"event": "mapped"', timeout=PROBE_TIMEOUT_S)
        mapped = _events(listener)[0].get("mapped")
        mappings[site] = mapped if isinstance(mapped, str) else None
    for site, mapped in mappings.items():
        if mapped is not None:
            net.run(
                f"{site}-a",
                python_module_argv(
                    "netsim.probe",
                    "send",
                    "--to",
                    mapped,
                    "--local-port",
                    str(HAIRPIN_SEND_PORT),
                    "--payload",
                    "HAIRPIN",
                ),
                name=f"{site}-a-hairpin-send",
                timeout=PROBE_TIMEOUT_S,
            )
    reports = []
    for hairpin, site in cases:
        listener = listeners[site]
        listener.wait(PROBE_TIMEOUT_S)
        sources = [
            str(event["source"])
            for event in _events(listener)
            if event.get("event") == "received" and event.get("payload") == "HAIRPIN"
        ]
        reports.append(
            check_hairpin(
                hairpin=hairpin,
                mapped=mappings[site],
                received_sources=sources,
                site_public=str(net.site(site).public_address),
            )
        )
    return reports


def format_table(reports: Sequence[CheckReport]) -> str:
    header = ("check", "expected", "observed", "result")
    rows = [header] + [
        (
            report.name,
            report.expected,
            report.observed,
            "pass" if report.passed else "FAIL: " + "; ".join(report.problems),
        )
        for report in reports
    ]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
        + "  "
        + row[3]
        for row in rows
    ]
    return "\n".join([*lines, "", LEGEND])


def reports_as_json(reports: Sequence[CheckReport]) -> str:
    return json.dumps(
        [
            {
                "check": report.name,
                "expected": report.expected,
                "observed": report.observed,
                "passed": report.passed,
                "problems": list(report.problems),
                "details": report.details,
            }
            for report in reports
        ],
        indent=2,
        sort_keys=True,
    )


def _describe(behaviour: Behaviour) -> str:
    text = f"{behaviour.mapping} / {behaviour.filtering}"
    if behaviour.mapping is Mapping.NO_UDP and behaviour.dns_reachable:
        text += " (UDP 53 passes)"
    elif not behaviour.dns_reachable:
        text += " (UDP 53 blocked too)"
    return text


def _responder_endpoint(net: Network, host: str) -> str:
    return f"{net.address(host)}:{RESPONDER_PORT}"


def _nat_probe_result(probe: Proc) -> NatProbeResult:
    probe.wait(PROBE_TIMEOUT_S)
    if probe.returncode != 0:
        raise CommandFailed(list(probe.argv), probe.returncode or -1, probe.stderr_text())
    fields = json.loads(probe.stdout_text())
    return NatProbeResult(**fields)


def _events(listener: Proc) -> list[dict[str, object]]:
    return [json.loads(line) for line in listener.stdout_text().splitlines() if line.strip()]
