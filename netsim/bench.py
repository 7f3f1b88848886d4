"""Benchmarks: ``python -m netsim.bench NAME [--json FILE] [options]``.

Every figure is reported next to a baseline measured in the same run on the
same bytes, because these machines are noisy and absolute MB/s mean little:
the *ratio* is the figure to compare across runs.

``store``
    put and get of a file through the local store (chunking, sealing,
    hashing, fsync, SQLite) against the raw crypto pipeline alone (keyed
    BLAKE3 nonce + XChaCha20-Poly1305 + BLAKE3 of the ciphertext) over the
    same bytes; peak RSS of the process; entries appended (signed and
    stored) and entries verified+inserted on a second device, per second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2psync import defaults
from p2psync.crypto.aead import keyed_nonce, xchacha_encrypt
from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.proto.entry import Kind
from p2psync.store import Meta, Store
from p2psync.store.objects import object_id

MiB = 1024 * 1024


def _peak_rss_mib() -> float:
    # VmHWM, not ru_maxrss: Linux carries the parent's peak across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def bench_store(size_mib: int, entries: int, workdir: Path) -> dict[str, Any]:
    source = workdir / "input.bin"
    with source.open("wb") as handle:
        for _ in range(size_mib):
            handle.write(os.urandom(MiB))
    secret = GroupSecret.generate(os.urandom)
    keys = secret.keys()
    size = size_mib * MiB

    def raw_pipeline() -> None:
        with source.open("rb") as handle:
            while chunk := handle.read(defaults.CHUNK_SIZE):
                nonce = keyed_nonce(keys.dedupe_key, chunk, aad=b"bench")
                object_id(xchacha_encrypt(keys.blob_key, nonce, chunk, b"bench"))

    raw_s = _timed(raw_pipeline)

    def raw_disk() -> None:
        # The same bytes written as 1 MiB files with fsync: the disk's share.
        out = workdir / "disk"
        out.mkdir()
        with source.open("rb") as handle:
            index = 0
            while chunk := handle.read(defaults.CHUNK_SIZE):
                with (out / str(index)).open("wb") as target:
                    target.write(chunk)
                    target.flush()
                    os.fsync(target.fileno())
                index += 1
        shutil.rmtree(out)

    disk_s = _timed(raw_disk)
    store = Store(workdir / "a", Identity.generate(os.urandom), [secret])
    result: dict[str, Any] = {}

    def put() -> None:
        with source.open("rb") as handle:
            result["blob"], _ = store.put_blob(handle)

    put_s = _timed(put)

    def get() -> None:
        for _chunk in store.iter_blob(result["blob"]):
            pass

    get_s = _timed(get)
    store.close()

    # entries: sign + store locally, then verify + insert on a second device
    writer = Store(workdir / "w", Identity.generate(os.urandom), [secret])
    now = time.time_ns() // 1_000_000
    append_s = _timed(
        lambda: [writer.append(Kind.DELETE, Meta(key=f"k{i}"), now_ms=now) for i in range(entries)]
    )
    raws = writer.entries_after(writer.identity.node_id, 0, entries)
    reader = Store(workdir / "r", Identity.generate(os.urandom), [secret])
    insert_s = _timed(lambda: reader.insert_entries(raws, now_ms=now))
    assert reader.frontier() == writer.frontier(), "entries did not all verify"
    writer.close()
    reader.close()

    mb = size / 1e6
    return {
        "bench": "store",
        "size_mib": size_mib,
        "raw_crypto_mb_s": round(mb / raw_s, 1),
        "raw_disk_write_mb_s": round(mb / disk_s, 1),
        "put_mb_s": round(mb / put_s, 1),
        "get_mb_s": round(mb / get_s, 1),
        "put_ratio_vs_raw": round(raw_s / put_s, 3),
        "put_ratio_vs_crypto_plus_disk": round((raw_s + disk_s) / put_s, 3),
        "get_ratio_vs_raw": round(raw_s / get_s, 3),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        "entries": entries,
        "entries_appended_per_s": round(entries / append_s),
        "entries_verified_per_s": round(entries / insert_s),
    }


def _print(report: dict[str, Any]) -> None:
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netsim.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    store = sub.add_parser("store", help="local store put/get and entry throughput")
    store.add_argument("--size-mib", type=int, default=256)
    store.add_argument("--entries", type=int, default=10_000)
    for command in (store,):
        command.add_argument("--json", metavar="FILE", help="also write the report as JSON")
        command.add_argument("--dir", help="work directory (default: a temp dir, removed)")
    args = parser.parse_args(argv)

    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="p2psync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = bench_store(args.size_mib, args.entries, workdir)
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
