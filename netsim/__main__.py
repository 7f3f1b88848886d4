"""``python -m netsim``: self-test the NAT kinds, clean up after crashed runs.

Subcommands:

- ``selftest [KIND ...] [--json] [--out DIR]``: build one site per NAT kind
  (all kinds by default), prove its mapping and filtering with real
  packets, print a table (or JSON); exit 1 if any check fails, 2 if netsim
  cannot run here (not root, tools missing).
- ``cleanup [--force]``: delete the ``p2ps-`` namespaces of runs whose owner
  process is gone (with ``--force``: of all runs), killing what runs inside.
- ``run`` and ``matrix``: scenario runner and NAT-pair matrix; not here yet.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from netsim import netns, runs
from netsim.build import DEFAULT_OUTPUT_BASE, build
from netsim.errors import NetsimError
from netsim.nat import NatKind
from netsim.selftest import format_table, reports_as_json, run_selftest, selftest_topology

EXIT_FAILED = 1
EXIT_CANNOT_RUN = 2


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

    for name in ("run", "matrix"):
        placeholder = commands.add_parser(name, help="not available yet")
        placeholder.add_argument("rest", nargs=argparse.REMAINDER)

    options = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if options.command == "cleanup":
        return _cleanup(force=options.force)
    if options.command == "selftest":
        return _selftest(options.kinds or list(NatKind), as_json=options.json, out=options.out)
    print(
        f"netsim {options.command}: the scenario runner arrives with the relayd/daemon work",
        file=sys.stderr,
    )
    return EXIT_CANNOT_RUN


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
