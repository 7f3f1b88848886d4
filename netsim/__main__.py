"""``python -m netsim``: self-test the NAT kinds, clean up after crashed runs.

Subcommands:

- ``selftest [KIND ...] [--json] [--out DIR]``: build one site per NAT kind
  (all kinds by default), prove its mapping and filtering with real
  packets, print a table (or JSON); exit 1 if any check fails, 2 if netsim
  cannot run here (not root, tools missing).
- ``cleanup [--force]``: delete the ``p2ps-`` namespaces of runs whose owner
  process is gone (with ``--force``: of all runs), killing what runs inside.
- ``run NAME [--a KIND --b KIND] [--json FILE]``: one scenario of
  :mod:`netsim.scenarios` (``lan-pair``, ``pair``, ``line-3``,
  ``relay-restart``, ``lossy``); prints a report, writes the result as JSON
  (``--json -``: JSON on stdout instead of the report); exit 0 when it
  synced, 1 when not, 2 if netsim cannot run here.
- ``matrix [--kinds KIND ...] [--json FILE]``: the ``pair`` scenario for
  every unordered pair of NAT kinds (:mod:`netsim.matrix`), progress on
  stderr, a table with expected vs actual path; exit 0 when every pair got
  its expected outcome, 1 when any did not, 2 if netsim cannot run here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from netsim import netns, runs
from netsim.build import DEFAULT_OUTPUT_BASE, build
from netsim.errors import NetsimError
from netsim.matrix import format_table as format_matrix
from netsim.matrix import rows_as_json, run_matrix
from netsim.nat import NatKind
from netsim.scenarios import (
    DEFAULT_SETTLE_S,
    DEFAULT_SYNC_TIMEOUT_S,
    SCENARIOS,
    ScenarioOptions,
    format_report,
    run_scenario,
)
from netsim.selftest import format_table, reports_as_json, run_selftest, selftest_topology

EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2
MATRIX_SYNC_TIMEOUT_S = 30.0
"""Per pair in the matrix: every pair that cannot sync waits this long."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netsim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every ip/nft/tc call")
    commands = parser.add_subparsers(dest="command", required=True)

    selftest = commands.add_parser("selftest", help="prove each NAT kind's behaviour")
    selftest.add_argument(
        "kinds",
        nargs="*",
        type=NatKind,
        metavar="KIND",
        help=f"NAT kinds to test (default: all of {', '.join(NatKind)})",
    )
    selftest.add_argument("--json", action="store_true", help="print JSON instead of a table")
    selftest.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUTPUT_BASE,
        help=f"base folder for process logs (default: {DEFAULT_OUTPUT_BASE})",
    )

    cleanup = commands.add_parser("cleanup", help="remove namespaces left by crashed runs")
    cleanup.add_argument(
        "--force", action="store_true", help="also remove namespaces of runs still alive"
    )

    run = commands.add_parser("run", help="run one sync scenario")
    run.add_argument(
        "scenario",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"one of: {', '.join(SCENARIOS)}",
    )
    run.add_argument(
        "--a",
        type=NatKind,
        default=NatKind.EASY,
        metavar="KIND",
        help="NAT kind of site a for pair/lossy (default: easy)",
    )
    run.add_argument(
        "--b",
        type=NatKind,
        default=NatKind.EASY,
        metavar="KIND",
        help="NAT kind of site b for pair/lossy (default: easy)",
    )
    _scenario_options(run)

    matrix = commands.add_parser("matrix", help="the pair scenario for every pair of NAT kinds")
    matrix.add_argument(
        "--kinds",
        nargs="+",
        type=NatKind,
        metavar="KIND",
        help=f"NAT kinds to pair (default: all of {', '.join(NatKind)})",
    )
    _scenario_options(matrix, timeout=MATRIX_SYNC_TIMEOUT_S)

    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if options.command == "cleanup":
        return _cleanup(force=options.force)
    if options.command == "selftest":
        return _selftest(options.kinds or list(NatKind), as_json=options.json, out=options.out)
    if options.command == "run":
        return _run(options)
    return _matrix(options)


def _scenario_options(parser: argparse.ArgumentParser, *, timeout: float | None = None) -> None:
    timeout = timeout or DEFAULT_SYNC_TIMEOUT_S
    parser.add_argument(
        "--json", type=Path, metavar="FILE", help="write the result as JSON to FILE (- for stdout)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="S",
        help=f"longest wait for the files to sync (default: {timeout:g})",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=DEFAULT_SETTLE_S,
        metavar="S",
        help="after syncing, how long a relayed pair may take to go direct "
        f"(default: {DEFAULT_SETTLE_S:g})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUTPUT_BASE,
        help=f"base folder for process logs (default: {DEFAULT_OUTPUT_BASE})",
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _options(options: argparse.Namespace) -> ScenarioOptions:
    return ScenarioOptions(
        timeout_s=options.timeout,
        settle_s=options.settle,
        output_base=options.out,
        progress=_progress,
    )


def _write_json(target: Path | None, text: str) -> None:
    if target is None:
        return
    if str(target) == "-":
        print(text)
    else:
        target.write_text(text + "\n")


def _cannot_run() -> bool:
    problems = netns.missing_prerequisites()
    for problem in problems:
        print(f"netsim cannot run here: {problem}", file=sys.stderr)
    return bool(problems)


def _run(options: argparse.Namespace) -> int:
    if _cannot_run():
        return EXIT_CANNOT_RUN
    scenario_options = _options(options)
    if options.scenario in ("pair", "lossy", "pair-50ms", "direct-break"):
        scenario_options = dataclasses.replace(scenario_options, a=options.a, b=options.b)
    result = run_scenario(options.scenario, scenario_options)
    if str(options.json) != "-":
        print(format_report(result))
    _write_json(options.json, json.dumps(result, indent=2))
    return 0 if result["synced"] else EXIT_FAILED


def _matrix(options: argparse.Namespace) -> int:
    if _cannot_run():
        return EXIT_CANNOT_RUN
    started = time.monotonic()
    rows = run_matrix(options.kinds or list(NatKind), _options(options), progress=_progress)
    if str(options.json) != "-":
        print(format_matrix(rows))
        print(f"(wall time {time.monotonic() - started:.0f} s)")
    _write_json(options.json, rows_as_json(rows))
    return 0 if all(row["as_expected"] for row in rows) else EXIT_FAILED


def _cleanup(*, force: bool) -> int:
    report = runs.cleanup_leftovers(force=force)
    for name in report.removed:
        print(f"removed {name}")
    for name in report.kept_live:
        print(f"kept {name} (its run is still alive; --force removes it)")
    for failure in report.failures:
        print(f"could not remove {failure}", file=sys.stderr)
    if not (report.removed or report.kept_live or report.failures):
        print("nothing to clean up")
    return EXIT_FAILED if report.failures else 0


def _selftest(kinds: list[NatKind], *, as_json: bool, out: Path) -> int:
    problems = netns.missing_prerequisites()
    if problems:
        for problem in problems:
            print(f"netsim cannot run here: {problem}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    try:
        with build(selftest_topology(kinds), output_base=out) as net:
            reports = run_selftest(net, kinds)
            log_dir = net.output_dir
    except NetsimError as exc:
        print(f"netsim selftest: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(reports_as_json(reports) if as_json else format_table(reports))
    if not as_json:
        print(f"(process logs in {log_dir})")
    return 0 if all(report.passed for report in reports) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
