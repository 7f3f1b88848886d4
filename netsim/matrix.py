"""The NAT matrix: the ``pair`` scenario for every unordered pair of NAT kinds.

For each pair of :class:`~netsim.nat.NatKind` (``none``-``none`` through
``udp-blocked``-``udp-blocked``, 21 pairs for all six kinds) one ``pair``
scenario runs in its own topology, one after the other (the machines have
two cores; daemons racing each other would skew the timings). The outcome
of a pair is its final path (``direct``, ``relay``; ``lan`` does not occur
between two sites) when it synced, else ``no sync``; it is compared with
:func:`expected_path`, and every pair whose outcome differs is marked -
in the table with ``<-- unexpected``, in the JSON with ``"as_expected":
false``. The marks are the point: they are the work list of the NAT
traversal issue, and a mark where the outcome *beats* the expectation is
worth a look too (the expectation, or the simulation, may be wrong).

JSON: a list with one object per pair, ``{"a", "b", "synced", "path",
"expected", "outcome", "as_expected", "t_first_sync_s", "t_direct_s",
"t_relay_to_direct_s", "relay_bytes_after_direct", "why_not_direct",
"relayed_bytes", "notes"}``. ``t_relay_to_direct_s`` is hole punching's
figure (first relayed datagram to a validated direct path, both ways; None
when the pair never went through the relay, e.g. a public host dialed at its
address); ``relay_bytes_after_direct`` what both sides still sent through
relayd after that (disco stragglers only, when all is well);
:func:`summary` gives medians over the rows.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypedDict

from netsim.nat import NatKind
from netsim.scenarios import ScenarioOptions, ScenarioResult, run_scenario

NO_SYNC = "no sync"
UNEXPECTED_MARK = "<-- unexpected"

_RELAY_ONLY = frozenset({frozenset({NatKind.HARD})})


def expected_path(a: NatKind, b: NatKind) -> str:
    """The path two nodes behind NAT kinds ``a`` and ``b`` should end up on.

    - ``"no sync"`` when either side is ``udp-blocked``: p2psync speaks only
      QUIC over UDP (to peers and to relayd); with UDP dropped nothing gets
      out. Only a TCP/WebSocket relay transport would change that.
    - ``"relay"`` for ``hard``↔``hard``: both sides pick a fresh random
      public port per destination, so neither can predict the port to send
      to, and each side's filtering drops what the other guesses; a
      birthday search over two random 16-bit spaces does not converge in
      bounded time.
    - ``"direct"`` everywhere else: ``none`` accepts anything; ``firewall``
      and ``easy``/``cgnat`` (endpoint-independent mapping, address-and-port
      dependent filtering) open to a peer as soon as they have sent to it,
      so simultaneous probes in both directions meet (CALL_ME_MAYBE);
      ``easy``/``cgnat``/``firewall``/``none`` ↔ ``hard`` by the birthday
      search of :mod:`p2psync.net.paths`: the hard side opens 256 ports,
      the other sprays up to 2048 probes (99.97 % odds, < 20 s).
      ``cgnat``↔``hard`` included: the search needs the hard side to open
      the 256 mappings (on its own home router); the ``cgnat`` side sprays
      from its *one* mapping, so the carrier NAT sees one mapping and at
      most 2048 short-lived filter entries for it. (An earlier expectation
      of relay assumed the non-hard side had to open hundreds of mappings,
      which carrier port quotas would refuse; a carrier that also caps
      sessions per mapping below ~2048 would cut the search short, and the
      pair stays relayed, bounded in time - netsim does not model that.)

    Symmetric in ``a`` and ``b``.
    """
    if NatKind.UDP_BLOCKED in (a, b):
        return NO_SYNC
    if frozenset({a, b}) in _RELAY_ONLY:
        return "relay"
    return "direct"


class MatrixRow(TypedDict):
    a: str
    b: str
    synced: bool
    path: str
    """The final path reported by the scenario (``none`` when nothing connected)."""
    expected: str
    outcome: str
    """``path`` when synced, else ``no sync``: what is compared with ``expected``."""
    as_expected: bool
    t_first_sync_s: float | None
    t_direct_s: float | None
    t_relay_to_direct_s: float | None
    relay_bytes_after_direct: int | None
    why_not_direct: str | None
    relayed_bytes: int | None
    notes: list[str]


def kind_pairs(kinds: Sequence[NatKind]) -> list[tuple[NatKind, NatKind]]:
    """Every unordered pair of ``kinds`` (a kind paired with itself included), in order."""
    ordered = [kind for kind in NatKind if kind in kinds]
    return list(itertools.combinations_with_replacement(ordered, 2))


def row_from_result(a: NatKind, b: NatKind, result: ScenarioResult) -> MatrixRow:
    pair_result = result["pairs"][0] if result["pairs"] else None
    path = pair_result["path"] if pair_result is not None else "none"
    outcome = path if result["synced"] else NO_SYNC
    expected = expected_path(a, b)
    return MatrixRow(
        a=str(a),
        b=str(b),
        synced=result["synced"],
        path=path,
        expected=expected,
        outcome=outcome,
        as_expected=outcome == expected,
        t_first_sync_s=pair_result["t_first_sync_s"] if pair_result is not None else None,
        t_direct_s=pair_result["t_direct_s"] if pair_result is not None else None,
        t_relay_to_direct_s=None if pair_result is None else pair_result.get("t_relay_to_direct_s"),
        relay_bytes_after_direct=None
        if pair_result is None
        else pair_result.get("relay_bytes_after_direct"),
        why_not_direct=None if pair_result is None else pair_result.get("why_not_direct"),
        relayed_bytes=result["relayed_bytes"],
        notes=result["notes"],
    )


def run_matrix(
    kinds: Sequence[NatKind],
    options: ScenarioOptions,
    *,
    progress: Callable[[str], None] = print,
) -> list[MatrixRow]:
    """Run the ``pair`` scenario for every pair of ``kinds``, sequentially."""
    pairs = kind_pairs(kinds)
    rows: list[MatrixRow] = []
    for index, (a, b) in enumerate(pairs, start=1):
        started = time.monotonic()
        progress(f"[{index}/{len(pairs)}] {a} <-> {b} ...")
        result = run_scenario("pair", replace(options, a=a, b=b))
        row = row_from_result(a, b, result)
        rows.append(row)
        mark = "" if row["as_expected"] else f"  {UNEXPECTED_MARK}"
        progress(
            f"[{index}/{len(pairs)}] {a} <-> {b}: {row['outcome']} (expected {row['expected']}) "
            f"in {time.monotonic() - started:.1f} s{mark}"
        )
    return rows


def format_table(rows: Sequence[MatrixRow]) -> str:
    """The matrix as a fixed-width table, unexpected outcomes marked."""
    header = (
        f"{'a':<12} {'b':<12} {'expected':<9} {'actual':<9} "
        f"{'first sync':>10} {'direct':>8} {'relay->dir':>10} {'relayed':>9} {'after dir':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        relayed = "-" if row["relayed_bytes"] is None else str(row["relayed_bytes"])
        after = row["relay_bytes_after_direct"]
        line = (
            f"{row['a']:<12} {row['b']:<12} {row['expected']:<9} {row['outcome']:<9} "
            f"{_seconds(row['t_first_sync_s']):>10} {_seconds(row['t_direct_s']):>8} "
            f"{_seconds(row['t_relay_to_direct_s'], 2):>10} {relayed:>9} "
            f"{'-' if after is None else after:>9}"
        )
        if not row["as_expected"]:
            line += f"  {UNEXPECTED_MARK}"
        if row["why_not_direct"] and row["outcome"] != "direct":
            line += f"  ({row['why_not_direct']})"
        lines.append(line)
    unexpected = sum(1 for row in rows if not row["as_expected"])
    lines.append(f"{len(rows)} pairs, {unexpected} unexpected")
    figures = summary(rows)
    lines.append(
        "relay -> direct, median: "
        + ", ".join(f"{k} {_seconds(v, 2)}" for k, v in figures["median_relay_to_direct_s"].items())
        + f"; bytes relayed after direct, total {figures['relay_bytes_after_direct_total']}"
    )
    return "\n".join(lines)


class MatrixSummary(TypedDict):
    median_relay_to_direct_s: dict[str, float | None]
    """Per class of pair: ``easy`` (both sides endpoint-independent or public),
    ``one-hard`` (exactly one side hard), over the rows that went direct."""
    relay_bytes_after_direct_total: int
    unexpected: int


def summary(rows: Sequence[MatrixRow]) -> MatrixSummary:
    """The figures issue 6 asks for, over a matrix run."""
    classes: dict[str, list[float]] = {"easy": [], "one-hard": []}
    for row in rows:
        value = row["t_relay_to_direct_s"]
        if row["outcome"] != "direct" or value is None:
            continue
        hard = [row["a"], row["b"]].count(str(NatKind.HARD))
        classes["one-hard" if hard == 1 else "easy"].append(value)
    return MatrixSummary(
        median_relay_to_direct_s={
            name: round(statistics.median(values), 3) if values else None
            for name, values in classes.items()
        },
        relay_bytes_after_direct_total=sum(
            row["relay_bytes_after_direct"] or 0 for row in rows if row["outcome"] == "direct"
        ),
        unexpected=sum(1 for row in rows if not row["as_expected"]),
    )


def rows_as_json(rows: Sequence[MatrixRow]) -> str:
    return json.dumps(list(rows), indent=2)


def _seconds(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"
