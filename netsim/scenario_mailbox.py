"""The ``mailbox`` scenario: two devices behind hard NATs that are never online together.

``python -m netsim run mailbox [--json FILE]``

Topology: relayd on a public host; ``a`` and ``b`` each behind its own
``hard`` (symmetric) NAT, so they could only ever meet through the relay -
and they never even run at the same time:

1. relayd starts with a ``--data`` directory (its mailbox lives there);
2. ``a``'s daemon starts (``--relay``), ``a`` puts :data:`NOTES` small
   files and one :data:`BIG_SIZE` file, and the daemon pushes them to the
   mailbox; the scenario waits until ``status`` says nothing is left to
   upload, then stops ``a``'s daemon;
3. only then ``b``'s daemon starts, pulls from the mailbox, and the
   scenario waits until ``b`` lists every key of ``a`` as ``ok`` and every
   file reads back byte for byte (``get``, SHA-256).

The result is the usual :class:`~netsim.scenarios.ScenarioResult`:
``synced`` true when ``b`` holds everything intact; the one pair
``a``-``b`` has path ``mailbox`` and ``t_first_sync_s`` measured from ``b``'s
daemon being ready. ``notes`` give the push time, the mailbox counters of
both sides and relayd's ``relayd_mailbox_bytes``; ``relayed_bytes`` is
relayd's relayed-frame counter (0 here: nothing is relayed, all is stored
and forwarded).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Any, Final

from netsim.build import build
from netsim.errors import NetsimError
from netsim.nat import NatKind
from netsim.procs import python_module_argv, wait_until
from netsim.scenarios import (
    DAEMON_PORT,
    READY_TIMEOUT_S,
    RELAY_MISSING_NOTE,
    Node,
    PairResult,
    ScenarioOptions,
    ScenarioResult,
    SyncRun,
    _result,
    _scratch,
    _two_sites,
    _wait_for_log,
    daemon_relay_metavar,
)

NOTES: Final = 20
NOTE_SIZE: Final = 4 * 1024
BIG_SIZE: Final = 3 * 1024 * 1024 + 12345
"""Random bytes of the big file: four chunks (three of 1 MiB, one of 12345 bytes), so
five sealed objects in the mailbox: its manifest and the four chunks."""
POLL_S: Final = 0.2


def _start_daemon(run: SyncRun, node: Node) -> None:
    argv = ["--home", str(node.home), "daemon", "--listen", f"0.0.0.0:{DAEMON_PORT}",
            *run.relay_arguments()]  # fmt: skip
    node.proc = run.net.spawn(
        node.host, python_module_argv("p2psync.cli", *argv), name=f"{node.host}-daemon"
    )
    _wait_for_log(node.proc, "ready:", timeout=READY_TIMEOUT_S)


def _stop_daemon(run: SyncRun, node: Node) -> None:
    if node.proc is not None:
        code = node.proc.stop()
        if code != 0:
            run.notes.append(f"daemon {node.host} exited with {code} on SIGTERM")
        node.proc = None


def _mailbox_status(run: SyncRun, node: Node) -> dict[str, Any] | None:
    state = run.cli_json(node, "status")
    if not isinstance(state, dict) or not isinstance(state.get("mailbox"), dict):
        return None
    return dict(state["mailbox"])


def _put_files(run: SyncRun, node: Node) -> None:
    """NOTES small files and one big one, under ``mailbox/...``."""
    for index in range(NOTES + 1):
        size = BIG_SIZE if index == NOTES else NOTE_SIZE
        data = os.urandom(size)
        key = "mailbox/big.bin" if index == NOTES else f"mailbox/note-{index:02d}"
        source = run.scratch / key.replace("/", "-")
        source.write_bytes(data)
        run.cli(node, "put", str(source), "--key", key, "--json")
        node.keys[key] = hashlib.sha256(data).hexdigest()


def mailbox(options: ScenarioOptions) -> ScenarioResult:
    """a pushes to relayd's mailbox and leaves; b, never online with a, pulls everything."""
    started = time.monotonic()
    params = {"a": str(NatKind.HARD), "b": str(NatKind.HARD), "online": "never together"}
    if daemon_relay_metavar() is None:
        return _result("mailbox", params, synced=False, notes=[RELAY_MISSING_NOTE],
                       started=started)  # fmt: skip
    progress = options.progress
    with _scratch() as scratch, build(_two_sites(NatKind.HARD, NatKind.HARD),
                                      output_base=options.output_base) as net:  # fmt: skip
        progress(f"mailbox: built run {net.run_id} (logs in {net.output_dir})")
        run = SyncRun(net, scratch, progress)
        synced = False
        pair = PairResult(a="a", b="b", path="mailbox", t_first_sync_s=None, t_direct_s=None)
        relayed: int | None = None
        try:
            run.create_nodes(("a", "b"))
            run.start_relay()
            a, b = run.nodes["a"], run.nodes["b"]
            _start_daemon(run, a)
            pushing = time.monotonic()
            _put_files(run, a)
            progress("mailbox: a wrote its files; waiting for the push")
            last: dict[str, Any] = {}

            def pushed() -> bool:
                status = _mailbox_status(run, a)
                if status is None:
                    return False
                last.update(status)
                done = int(status.get("pushed_entries") or 0) >= NOTES + 1
                return done and status.get("pending_uploads") == 0

            wait_until(pushed, timeout=options.timeout_s, what="a's mailbox push")
            run.notes.append(
                f"a pushed {last.get('pushed_entries')} entries and {last.get('pushed_objects')} "
                f"objects in {time.monotonic() - pushing:.1f} s (puts included)"
            )
            _stop_daemon(run, a)
            progress("mailbox: a is offline; starting b")
            _start_daemon(run, b)
            since = time.monotonic()
            wanted = set(a.keys)

            def arrived() -> bool:
                keys = run.ok_keys(b)
                return keys is not None and wanted <= keys

            try:
                wait_until(arrived, timeout=options.timeout_s, what="b receiving a's files")
                pair["t_first_sync_s"] = round(time.monotonic() - since, 2)
                synced = True
            except NetsimError as exc:
                run.notes.append(f"not synced: {exc}")
            status = _mailbox_status(run, b) or {}
            run.notes.append(
                "b's mailbox: "
                + ", ".join(
                    f"{k}={status.get(k)}"
                    for k in (
                        "state",
                        "pull_cursor",
                        "head",
                        "pulled_entries",
                        "fetched_objects",
                        "rejected",
                        "last_error",
                    )
                )
            )
            if synced:
                problems = run.verify_contents()
                run.notes += problems
                synced = not problems
            held = _mailbox_bytes(run)
            run.notes.append(f"relayd_mailbox_bytes at the end: {held}")
            relayed = run.relayed_bytes()
        except NetsimError as exc:
            run.notes.append(f"scenario failed: {exc}")
            synced = False
        finally:
            run.stop_daemons()
            run.stop_relay()
        result = _result(
            "mailbox",
            params,
            synced=synced,
            relayed_bytes=relayed,
            notes=run.notes,
            net=net,
            started=started,
        )
        result["pairs"] = [pair]
        return result


def _mailbox_bytes(run: SyncRun) -> int | None:
    metrics = run.relay_http("/metrics")
    if metrics is None:
        return None
    match = re.search(r"^relayd_mailbox_bytes(?:\{\})? (\S+)$", metrics, re.MULTILINE)
    return int(float(match.group(1))) if match else None


__all__ = ["mailbox"]
