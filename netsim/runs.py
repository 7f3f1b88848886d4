"""Run ownership and cleanup of what crashed runs left behind.

Every run names its namespaces ``p2ps-<run id>-...`` and, while it is alive,
keeps an owner record ``/run/p2ps-netsim/<run id>.json`` with its pid and
process start time. ``python -m netsim cleanup`` removes every ``p2ps-``
namespace whose run has no live owner (a crashed or killed run, or one
that never wrote a record), and leaves live runs alone so a cleanup in one
terminal does not break a test run in another; ``--force`` removes those
too. /run is a tmpfs: records vanish on reboot, as namespaces do.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from netsim import netns
from netsim.topology import run_id_of_namespace

OWNER_RECORD_DIR = Path("/run/p2ps-netsim")


@dataclass(frozen=True, slots=True)
class CleanupReport:
    removed: tuple[str, ...] = ()
    kept_live: tuple[str, ...] = ()
    """Namespaces of runs whose owner process is still alive."""
    failures: tuple[str, ...] = field(default=())


def write_owner_record(run_id: str) -> None:
    OWNER_RECORD_DIR.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "start_ticks": _start_ticks(os.getpid())}
    _record_path(run_id).write_text(json.dumps(record))


def remove_owner_record(run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _record_path(run_id).unlink()


def run_is_live(run_id: str) -> bool:
    """True when the process that owns ``run_id`` is still running."""
    try:
        record = json.loads(_record_path(run_id).read_text())
        pid = int(record["pid"])
        start_ticks = int(record["start_ticks"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    # The same pid with another start time is a reused pid, not our owner.
    return _start_ticks(pid) == start_ticks


def cleanup_leftovers(*, force: bool = False) -> CleanupReport:
    """Delete the namespaces (and their processes) of runs that have no live owner."""
    removed: list[str] = []
    kept: list[str] = []
    doomed_runs: set[str] = set()
    for namespace in netns.list_namespaces():
        run_id = run_id_of_namespace(namespace)
        if run_id is None:
            continue
        if not force and run_is_live(run_id):
            kept.append(namespace)
            continue
        removed.append(namespace)
        doomed_runs.add(run_id)
    failures = netns.delete_namespaces(removed)
    for run_id in doomed_runs:
        remove_owner_record(run_id)
    failed = {failure.split(":", 1)[0] for failure in failures}
    return CleanupReport(
        removed=tuple(name for name in removed if name not in failed),
        kept_live=tuple(kept),
        failures=tuple(failures),
    )


def _record_path(run_id: str) -> Path:
    return OWNER_RECORD_DIR / f"{run_id}.json"


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime); the command name in field 2 may contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])
