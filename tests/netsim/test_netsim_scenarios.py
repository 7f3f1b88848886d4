"""Sync scenarios in real namespaces, and the NAT matrix's expectations.

The scenario tests run real p2psync daemons through their CLI in netsim
topologies (each a few seconds when it syncs, bounded by a 60 s sync wait)
and assert what the scenario measured: synced, and the path per pair. After
each, no namespace of the run may be left. The expected-path test is pure.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest

from netsim.matrix import NO_SYNC, expected_path, kind_pairs, row_from_result
from netsim.nat import NatKind
from netsim.scenarios import ScenarioOptions, ScenarioResult, run_scenario

RunNamespaces = Callable[[str], list[str]]
SYNC_TIMEOUT_S = 60.0


def _run(
    name: str, out: Path, a: NatKind = NatKind.EASY, b: NatKind = NatKind.EASY
) -> ScenarioResult:
    # settle_s=0: these pairs are expected to be lan/direct, not upgraded from relay.
    options = ScenarioOptions(a=a, b=b, timeout_s=SYNC_TIMEOUT_S, settle_s=0, output_base=out)
    return run_scenario(name, options)


def _paths(result: ScenarioResult) -> dict[tuple[str, str], str]:
    return {(pair["a"], pair["b"]): pair["path"] for pair in result["pairs"]}


def _assert_torn_down(result: ScenarioResult, run_namespaces: RunNamespaces) -> None:
    assert result["run_id"] is not None, result["notes"]
    assert run_namespaces(result["run_id"]) == []


@pytest.mark.netsim
def test_lan_pair_syncs_over_the_lan(netsim_out: Path, run_namespaces: RunNamespaces) -> None:
    result = _run("lan-pair", netsim_out)
    assert result["synced"], result["notes"]
    assert _paths(result) == {("a", "b"): "lan"}
    (pair,) = result["pairs"]
    assert pair["t_first_sync_s"] is not None and pair["t_first_sync_s"] < SYNC_TIMEOUT_S
    assert pair["t_direct_s"] is not None
    _assert_torn_down(result, run_namespaces)


@pytest.mark.netsim
def test_two_public_hosts_sync_directly(netsim_out: Path, run_namespaces: RunNamespaces) -> None:
    result = _run("pair", netsim_out, a=NatKind.NONE, b=NatKind.NONE)
    assert result["params"] == {"a": "none", "b": "none"}
    assert result["synced"], result["notes"]
    assert _paths(result) == {("a", "b"): "direct"}
    _assert_torn_down(result, run_namespaces)


@pytest.mark.netsim
def test_two_hosts_behind_easy_nats_sync_through_relayd(
    netsim_out: Path, run_namespaces: RunNamespaces
) -> None:
    result = _run("pair", netsim_out, a=NatKind.EASY, b=NatKind.EASY)
    assert result["synced"], result["notes"]
    # relay today; direct once hole punching lands (the matrix tracks which)
    assert _paths(result)[("a", "b")] in ("relay", "direct")
    assert result["relayed_bytes"] is not None and result["relayed_bytes"] > 0
    _assert_torn_down(result, run_namespaces)


@pytest.mark.netsim
def test_hard_nats_on_both_sides_sync_through_relayd(
    netsim_out: Path, run_namespaces: RunNamespaces
) -> None:
    result = _run("pair", netsim_out, a=NatKind.HARD, b=NatKind.HARD)
    assert result["synced"], result["notes"]
    assert _paths(result) == {("a", "b"): "relay"}
    _assert_torn_down(result, run_namespaces)


@pytest.mark.netsim
def test_line_of_three_syncs_end_to_end_through_the_middle(
    netsim_out: Path, run_namespaces: RunNamespaces
) -> None:
    result = _run("line-3", netsim_out)
    assert result["synced"], result["notes"]
    paths = _paths(result)
    assert paths[("a", "b")] == "direct"
    assert paths[("b", "c")] == "direct"
    # a and c never talk: what each has of the other came through b.
    assert paths[("a", "c")] == "none"
    end_to_end = next(p for p in result["pairs"] if (p["a"], p["b"]) == ("a", "c"))
    assert end_to_end["t_direct_s"] is None
    assert end_to_end["t_first_sync_s"] is not None
    _assert_torn_down(result, run_namespaces)


def test_expected_path_is_what_its_docstring_says() -> None:
    kinds = list(NatKind)
    for a, b in itertools.product(kinds, repeat=2):
        expected = expected_path(a, b)
        assert expected == expected_path(b, a), "symmetric"
        if NatKind.UDP_BLOCKED in (a, b):
            assert expected == NO_SYNC, (a, b)
        elif {a, b} == {NatKind.HARD}:
            assert expected == "relay", (a, b)
        else:
            assert expected == "direct", (a, b)
    # The cases the docstring argues for, spelled out.
    assert expected_path(NatKind.EASY, NatKind.HARD) == "direct"
    assert expected_path(NatKind.FIREWALL, NatKind.HARD) == "direct"
    assert expected_path(NatKind.CGNAT, NatKind.CGNAT) == "direct"
    assert expected_path(NatKind.HARD, NatKind.HARD) == "relay"
    assert expected_path(NatKind.CGNAT, NatKind.HARD) == "direct"  # the birthday search
    assert expected_path(NatKind.NONE, NatKind.UDP_BLOCKED) == NO_SYNC


def test_matrix_pairs_every_unordered_pair_once() -> None:
    pairs = kind_pairs(list(NatKind))
    assert len(pairs) == 21
    assert len({frozenset(pair) for pair in pairs}) == 21
    assert kind_pairs([NatKind.HARD, NatKind.EASY]) == [
        (NatKind.EASY, NatKind.EASY),
        (NatKind.EASY, NatKind.HARD),
        (NatKind.HARD, NatKind.HARD),
    ]


def test_matrix_marks_outcomes_that_differ_from_the_expectation() -> None:
    def result(synced: bool, path: str) -> ScenarioResult:
        return ScenarioResult(
            scenario="pair",
            params={},
            synced=synced,
            pairs=[{"a": "a", "b": "b", "path": path, "t_first_sync_s": 1.0, "t_direct_s": None}],
            relayed_bytes=10,
            notes=[],
            run_id="abc123",
            log_dir=None,
            wall_s=3.0,
        )

    relayed = row_from_result(NatKind.EASY, NatKind.EASY, result(True, "relay"))
    assert (relayed["outcome"], relayed["expected"], relayed["as_expected"]) == (
        "relay",
        "direct",
        False,
    )
    stuck = row_from_result(NatKind.HARD, NatKind.HARD, result(False, "none"))
    assert (stuck["outcome"], stuck["as_expected"]) == (NO_SYNC, False)
    blocked = row_from_result(NatKind.EASY, NatKind.UDP_BLOCKED, result(False, "none"))
    assert blocked["as_expected"]
    direct = row_from_result(NatKind.NONE, NatKind.HARD, result(True, "direct"))
    assert direct["as_expected"]
