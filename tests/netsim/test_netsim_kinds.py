"""Every NAT kind, built for real, shows the mapping and filtering it claims."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netsim.build import build
from netsim.nat import NatKind
from netsim.selftest import CheckReport, run_selftest, selftest_topology

pytestmark = pytest.mark.netsim


@pytest.fixture(scope="module")
def selftest_reports(
    netsim_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, CheckReport]]:
    # One build for all kinds: the probes of different sites run in parallel.
    kinds = list(NatKind)
    output = tmp_path_factory.mktemp("netsim-out")
    with build(selftest_topology(kinds), output_base=output) as net:
        reports = run_selftest(net, kinds)
    yield {report.name: report for report in reports}


@pytest.mark.parametrize("kind", list(NatKind), ids=str)
def test_nat_kind_behaves_as_claimed(
    kind: NatKind, selftest_reports: dict[str, CheckReport]
) -> None:
    report = selftest_reports[kind.value]
    assert report.passed, f"{kind}: expected {report.expected}; {report.problems}; {report.details}"
    assert report.observed == report.expected


def test_easy_nat_keeps_one_public_port_per_host_even_when_hosts_share_a_local_port(
    selftest_reports: dict[str, CheckReport],
) -> None:
    # Host a probed stun1 then stun2, host b stun3 then stun1, both from local
    # port 40000: plain masquerade gives b two public ports (checked by hand).
    probes = [observation.probe for observation in selftest_reports["easy"].observations]
    assert [probe.local.rsplit(":", 1)[1] for probe in probes] == ["40000", "40000"]
    for probe in probes:
        assert probe.mapped_primary is not None
        assert probe.mapped_primary == probe.mapped_secondary
    assert probes[0].mapped_primary != probes[1].mapped_primary


def test_hard_nat_gives_each_destination_its_own_port(
    selftest_reports: dict[str, CheckReport],
) -> None:
    for observation in selftest_reports["hard"].observations:
        assert observation.probe.mapped_primary is not None
        assert observation.probe.mapped_primary != observation.probe.mapped_secondary


@pytest.mark.parametrize("name", ["hairpin on", "hairpin off"])
def test_hairpinning(name: str, selftest_reports: dict[str, CheckReport]) -> None:
    report = selftest_reports[name]
    assert report.passed, f"{name}: {report.observed}; {report.problems}; {report.details}"
