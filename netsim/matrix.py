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
"relayed_bytes", "notes"}``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypedDict

from netsim.nat import NatKind
from netsim.scenarios import ScenarioOptions, ScenarioResult, run_scenario

NO_SYNC = "no sync"
UNEXPECTED_MARK = "<-- unexpected"

_RELAY_ONLY = frozenset(
    {
        frozenset({NatKind.HARD}),
        frozenset({NatKind.HARD, NatKind.CGNAT}),
    }
)


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
    - ``"relay"`` for ``hard``↔``cgnat`` (debatable): in netsim the
      ``cgnat`` side is endpoint-independent through both layers, so the
      one-sided birthday probe that beats ``easy``↔``hard`` could work in
      principle. We still expect the relay, because that probe needs the
      non-hard side to open hundreds of mappings in seconds, and real
      carrier-grade NATs share one public address among many subscribers
      with per-subscriber port quotas and mapping-rate limits that such a
      burst runs into; a design that counted on it would fail in the field
      even when it passes here. A ``direct`` outcome is then marked, to be
      looked at rather than celebrated blindly.
    - ``"direct"`` everywhere else: ``none`` accepts anything; ``firewall``
      and ``easy``/``cgnat`` (endpoint-independent mapping, address-and-port
      dependent filtering) open to a peer as soon as they have sent to it,
      so simultaneous probes in both directions meet; ``easy``/
      ``firewall``/``none`` ↔ ``hard`` by probing many ports (Tailscale's
      figures: 256 ports on the hard side and ~1024 random probes find a
      match ~98 % of the time).

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
        f"{'first sync':>10} {'direct':>8} {'relayed':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        relayed = "-" if row["relayed_bytes"] is None else str(row["relayed_bytes"])
        line = (
            f"{row['a']:<12} {row['b']:<12} {row['expected']:<9} {row['outcome']:<9} "
            f"{_seconds(row['t_first_sync_s']):>10} {_seconds(row['t_direct_s']):>8} "
            f"{relayed:>9}"
        )
        if not row["as_expected"]:
            line += f"  {UNEXPECTED_MARK}"
        lines.append(line)
    unexpected = sum(1 for row in rows if not row["as_expected"])
    lines.append(f"{len(rows)} pairs, {unexpected} unexpected")
    return "\n".join(lines)


def rows_as_json(rows: Sequence[MatrixRow]) -> str:
    return json.dumps(list(rows), indent=2)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
