"""Mailbox benchmark: ``python -m netsim.bench mailbox [--json FILE] [options]``.

relayd is a real ``python -m relayd --data DIR`` subprocess on loopback
(dies with the bench; its CPU seconds and RSS come from ``/proc/PID``).
The client is this process: one QUIC endpoint, a
:class:`~p2psync.net.relay_client.RelayClient` and
:class:`~p2psync.mailbox_sync.MailboxClient` streams, as a node uses them.
Entries and objects are made (signed, sealed) before any timing.

Figures, each next to a baseline measured in the same run:

``push_entries_per_s``
    ``--entries`` signed entries of ~1 KiB (sealed metadata padded to
    1 KiB) pushed with up to :data:`~p2psync.mailbox_sync.PUSH_WINDOW`
    requests in flight (what a node does), timed from the first send to
    the last PUSHED; ``push_entries_lockstep_per_s`` one request at a time
    (one round trip each). Baseline ``store_push_entries_per_s``: the same
    entries into a :class:`~relayd.mailbox.MailboxStore` in this process, no
    network (verification + SQLite commit per entry).
``pull_entries_per_s``
    All of them pulled back (PULL pages of :data:`~p2psync.mailbox_sync.PULL_PAGE`).
``push_chunks_mb_s`` / ``fetch_chunks_mb_s``
    One blob of ``--chunks`` 1 MiB chunks: its entry, manifest and chunks
    pushed (window as above; each chunk a file, fsynced), then every chunk
    FETCHed back; MB = 10^6 bytes of sealed objects. Baseline
    ``store_push_chunks_mb_s``: the same objects into an in-process store.
``relayd_rss_mib`` / ``relayd_hwm_mib``
    relayd's VmRSS at the end and its peak (VmHWM); ``relayd_cpu_s_*`` and
    ``client_cpu_s_*`` the CPU seconds of relayd and of this process in each
    phase, and ``*_cpu_bound_*`` the figure over the busier side's CPU
    seconds: what the path does with a core per side, which a shared,
    loaded machine distorts less than wall time (compare ``python -m
    netsim.bench throughput``'s ``endpoint_*`` for a plain QUIC stream).

Only loopback addresses are used; the work directory is removed at exit
unless ``--dir`` names one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from netsim.bench_relay import _Processes, proc_cpu_s, proc_rss_mib
from netsim.benchkit import BenchFailed, Deadline, on_sigterm, print_report

MiB: Final = 1024 * 1024
MB: Final = 1_000_000
ENTRY_PAD: Final = 900  # bytes of app metadata: entries of ~1 KiB once sealed and signed


def _entries(count: int) -> tuple[Any, Any, list[bytes], bytes, Any]:
    """(group keys, author, raw entries, id of the last, the group's mailbox key)."""
    from p2psync.crypto.group import GroupSecret, mailbox_key
    from p2psync.crypto.identity import Identity
    from p2psync.proto.entry import Kind, sign_entry
    from p2psync.store.objects import Meta, seal_meta

    keys = GroupSecret.generate(os.urandom).keys()
    author = Identity.generate(os.urandom)
    now_ms = time.time_ns() // 1_000_000
    raws: list[bytes] = []
    prev = b""
    for seq in range(1, count + 1):
        meta = Meta(key=f"bench/{seq}", app={"pad": os.urandom(ENTRY_PAD)})
        entry = sign_entry(
            author, group_id=keys.group_id, seq=seq, prev=prev, hlc=(now_ms << 16) + seq,
            kind=Kind.DELETE, blob=b"", size=0, meta=seal_meta(keys, meta, os.urandom),
        )  # fmt: skip
        raws.append(entry.encode())
        prev = entry.entry_id
    return keys, author, raws, prev, mailbox_key(keys)


def _blob(keys: Any, author: Any, seq: int, prev: bytes, chunks: int) -> tuple[bytes, list[Any]]:
    """A PUT entry of a ``chunks`` MiB blob, and its objects (manifest first)."""
    from p2psync.proto.entry import Kind, sign_entry
    from p2psync.store.objects import (
        ChunkRef,
        Manifest,
        Meta,
        ObjectKind,
        object_id,
        seal,
        seal_meta,
    )

    sealed = [seal(keys, ObjectKind.CHUNK, os.urandom(MiB)) for _ in range(chunks)]
    refs = tuple(ChunkRef(object_id(s), MiB) for s in sealed)
    manifest = seal(keys, ObjectKind.MANIFEST, Manifest(chunks * MiB, refs).encode())
    blob = object_id(manifest)
    entry = sign_entry(
        author, group_id=keys.group_id, seq=seq, prev=prev,
        hlc=(time.time_ns() // 1_000_000) << 16, kind=Kind.PUT, blob=blob, size=chunks * MiB,
        meta=seal_meta(keys, Meta(key="bench/blob"), os.urandom),
    )  # fmt: skip
    objects = [(blob, manifest), *((object_id(s), s) for s in sealed)]
    return entry.encode(), objects


def _store_baseline(workdir: Path, raws: list[bytes], blob_entry: bytes, objects: list[Any],
                    mailbox: bytes, author: bytes) -> dict[str, float]:  # fmt: skip
    from relayd.config import MailboxConfig
    from relayd.mailbox import MailboxStore

    with MailboxStore.open(workdir / "baseline", MailboxConfig(min_free_bytes=0)) as store:
        now = time.time()
        store.join(mailbox, author, now)
        started = time.perf_counter()
        for raw in raws:
            store.push_entry(mailbox, author, raw, now)
        entries_s = time.perf_counter() - started
        store.push_entry(mailbox, author, blob_entry, now)
        blob = objects[0][0]
        started = time.perf_counter()
        for oid, data in objects:
            store.push_object(mailbox, author, blob, oid, data, now)
        chunks_s = time.perf_counter() - started
    size = sum(len(data) for _, data in objects)
    return {
        "store_push_entries_per_s": round(len(raws) / entries_s),
        "store_push_chunks_mb_s": round(size / MB / chunks_s, 1),
    }


async def _over_the_wire(
    relay_text: str, raws: list[bytes], blob_entry: bytes, objects: list[Any], key: Any,
    sample: Callable[[str], None], lockstep: int,
) -> dict[str, float]:  # fmt: skip
    import trio

    from p2psync.crypto.identity import Identity
    from p2psync.mailbox_sync import PULL_PAGE, PUSH_WINDOW, MailboxClient
    from p2psync.net.endpoint import EndpointConfig, open_endpoint
    from p2psync.net.relay_client import open_relay_client, parse_relay_address
    from p2psync.proto import mailbox as wire
    from p2psync.proto.entry import decode_entry_untrusted
    from p2psync.proto.relay import RELAY_ALPN

    relay_id, address = parse_relay_address(relay_text)
    assert relay_id is not None
    me = Identity.generate(os.urandom)
    report: dict[str, float] = {}

    async def pipelined(client: MailboxClient, requests: list[Any], window: int) -> float:
        started = time.perf_counter()
        inflight = 0
        for request in requests:
            if inflight >= window:
                await client.expect(wire.Pushed)
                inflight -= 1
            await client.send(request)
            inflight += 1
        for _ in range(inflight):
            await client.expect(wire.Pushed)
        return time.perf_counter() - started

    config = EndpointConfig(bind_host="127.0.0.1", alpn=(RELAY_ALPN,))
    async with (
        open_endpoint(me, config) as endpoint,
        open_relay_client(endpoint, me, address, relay_id, (), rng=random.Random(1)) as relay,
    ):
        with trio.fail_after(60):
            await relay.wait_connected()
        group_id = decode_entry_untrusted(blob_entry).group_id  # the JOIN names it
        async with MailboxClient.open(
            relay, key, me.node_id, group_id=group_id, notify=False
        ) as client:
            sample("start")
            seconds = await pipelined(client, [wire.PushEntry(r) for r in raws[lockstep:]],
                                      PUSH_WINDOW)  # fmt: skip
            report["push_entries_per_s"] = round((len(raws) - lockstep) / seconds)
            sample("push_entries")
            seconds = await pipelined(client, [wire.PushEntry(r) for r in raws[:lockstep]], 1)
            report["push_entries_lockstep_per_s"] = round(lockstep / seconds)
            started = time.perf_counter()
            after, pulled = 0, 0
            while True:
                page = await client.request(wire.Pull(after, PULL_PAGE), wire.Items)
                pulled += len(page.items)
                if page.items:
                    after = page.items[-1].cursor
                if not page.has_more:
                    break
            if pulled != len(raws):
                raise BenchFailed(f"pulled {pulled} of {len(raws)} entries")
            report["pull_entries_per_s"] = round(pulled / (time.perf_counter() - started))
            sample("pull_entries")
            await client.request(wire.PushEntry(blob_entry), wire.Pushed)
            blob = objects[0][0]
            requests = [wire.PushChunk(blob, oid, data) for oid, data in objects]
            size = sum(len(data) for _, data in objects)
            seconds = await pipelined(client, requests, PUSH_WINDOW)
            report["push_chunks_mb_s"] = round(size / MB / seconds, 1)
            sample("push_chunks")
            started = time.perf_counter()
            pending: deque[bytes] = deque()
            for oid, _ in objects:
                if len(pending) >= 8:
                    got = await client.expect(wire.ObjectData)
                    assert got.object_id == pending.popleft()
                await client.send(wire.Fetch(oid))
                pending.append(oid)
            while pending:
                got = await client.expect(wire.ObjectData)
                assert got.object_id == pending.popleft()
            report["fetch_chunks_mb_s"] = round(size / MB / (time.perf_counter() - started), 1)
            sample("fetch_chunks")
    return report


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import trio

    deadline = Deadline(args.timeout)
    keys, author, raws, prev, key = _entries(args.entries)
    blob_entry, objects = _blob(keys, author, args.entries + 1, prev, args.chunks)
    report: dict[str, Any] = {
        "entries": args.entries,
        "entry_bytes": round(sum(len(r) for r in raws) / len(raws)),
        "chunks": args.chunks,
    }
    with _Processes(workdir, args.verbose) as processes:
        relayd = processes.relayd("relayd", deadline, data_dir=workdir / "relay-data")
        cpu: dict[str, float] = {}
        last = [proc_cpu_s(relayd.pid), time.process_time()]

        def sample(phase: str) -> None:
            now = [proc_cpu_s(relayd.pid), time.process_time()]
            if phase != "start":
                cpu[f"relayd_cpu_s_{phase}"] = round(now[0] - last[0], 2)
                cpu[f"client_cpu_s_{phase}"] = round(now[1] - last[1], 2)
            last[:] = now

        lockstep = min(200, args.entries // 4)
        report.update(
            trio.run(
                _over_the_wire, relayd.relay_text, raws, blob_entry, objects, key, sample, lockstep
            )
        )
        rss, hwm = proc_rss_mib(relayd.pid)
        report["relayd_rss_mib"] = round(rss, 1)
        report["relayd_hwm_mib"] = round(hwm, 1)
        report.update(cpu)
        # What the path would do with a core per side (this machine is shared
        # and loaded; bench throughput reports the same figure for streams).
        size = sum(len(data) for _, data in objects)
        for phase in ("push_chunks", "fetch_chunks"):
            busiest = max(cpu[f"relayd_cpu_s_{phase}"], cpu[f"client_cpu_s_{phase}"], 1e-3)
            report[f"{phase}_cpu_bound_mb_s"] = round(size / MB / busiest, 1)
        busiest = max(cpu["relayd_cpu_s_push_entries"], cpu["client_cpu_s_push_entries"], 1e-3)
        report["push_entries_cpu_bound_per_s"] = round((len(raws) - lockstep) / busiest)
        report["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
        metrics = relayd.metrics()
        report["relayd_mailbox_items"] = int(metrics.get("relayd_mailbox_items", 0))
        report["relayd_mailbox_bytes"] = int(metrics.get("relayd_mailbox_bytes", 0))
    report.update(
        _store_baseline(workdir, raws, blob_entry, objects, key.node_id.raw, author.node_id.raw)
    )
    report["relayd_command"] = relayd.command
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netsim.bench mailbox",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--entries", type=int, default=5000, help="1 KiB entries to push/pull")
    parser.add_argument("--chunks", type=int, default=64, help="1 MiB chunks to push/fetch")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--dir", help="work directory (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this long")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.entries < 4 or args.chunks < 2:
        parser.error("--entries must be >= 4 and --chunks >= 2")
    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="p2psync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args, workdir)
    except BenchFailed as exc:
        print(f"bench mailbox failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
