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

``throughput``
    SIZE MiB of random bytes over loopback, three ways, each side in its own
    process (so CPU seconds and peak RSS are per side):

    - *stock*: one stream with aioquic's own asyncio client/server
      (``aioquic.asyncio.connect`` / ``serve``, self-signed P-256
      certificate, same max datagram size, aioquic's default windows). The
      sender writes 1 MiB pieces with ``write`` + ``drain`` (``drain`` never
      blocks in aioquic, so the sender buffers what the network has not
      taken yet);
    - *endpoint*: the same bytes over one stream between two p2psync
      endpoints (:mod:`p2psync.net.endpoint`, no store);
    - *node*: node A puts the file (``Node.put_stream_from``; timed, not
      counted), node B (A's static peer, already linked) syncs it. Timed from
      A's put returning to B seeing the blob complete (B polls
      ``Store.head`` every 50 ms under the node's store lock).

    stock and endpoint are timed at the sender, from the first write to the
    receiver's byte count coming back (one extra RTT). CPU seconds are
    user+system of that process (all threads) over the timed window; peak
    RSS is ``VmHWM`` over the process's life. The node's blob is checked
    (SHA-256 of what B reads back) after timing. ``*_cpu_bound_mb_s`` is
    the bytes over the CPU seconds of the busier side: what the path would
    do with a core per side, a figure that shared, loaded machines distort
    less than wall time. ``--rounds N`` runs every path N times, rotating
    their order, and reports each path's median round.

``entries``
    COUNT small entries A -> B. Node A appends them (``Store.append`` in a
    loop inside one store-lock hold of the running node: one transaction
    and one signature per entry, no batching; B is not connected yet, so no
    gossip) -- the append rate; then B dials A and catches up (HELLO,
    FRONTIER, ENTRIES batches). Timed from B's dial ("A done", connect
    included; also reported from the link being verified) until B holds A's
    last entry. Baseline: the same raw entries verified and inserted into a
    fresh store in-process, in batches of ``SYNC_MAX_ENTRIES_PER_MESSAGE``
    (what B must do at least). Entries are DELETE tombstones (no blob), as in
    ``store``; ``--blobs`` makes them PUTs of a few bytes each instead, so B
    also fetches one object per entry.

``relay`` and ``mailbox``
    relayd's figures, in :mod:`netsim.bench_relay` (relayed vs direct sync,
    relayd CPU per relayed MB, idle connections and RSS, re-accept after a
    restart) and :mod:`netsim.bench_mailbox` (pushes/s, pulls/s, MB/s of
    chunks, relayd RSS); each takes its own options (``relay --help``).

Child processes are this module (``_child ROLE JSON``) talking JSON lines
over stdin/stdout; their stderr goes to a log in the work dir (its tail is
printed if a step fails). Every wait is bounded by ``--timeout``; children
are stopped and the work dir removed on any exit (children also die with
the parent, PR_SET_PDEATHSIG). ``-v`` prints progress and child pids (for
``py-spy dump --pid``) on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import queue
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from netsim.benchkit import (
    BenchFailed,
    Deadline,
    die_with_parent,
    emit,
    log_tail,
    make_homes,
    on_sigterm,
    print_report,
    random_file,
)
from p2psync import defaults
from p2psync.crypto.aead import keyed_nonce, xchacha_encrypt
from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.proto.entry import Kind
from p2psync.store import Meta, Store
from p2psync.store.objects import object_id

MiB = 1024 * 1024
TARGET_RATIO_VS_STOCK = 2.0
TARGET_NODE_RSS_MIB = 200
TARGET_ENTRIES_PER_S = 5000
# Seconds between completion checks in a node child. Each check is a store
# lock + worker-thread hop on the measured node: at 10 ms py-spy put them at
# ~8% of node B's busy time; at 50 ms they cost ~1/5 of that, and timing
# resolution (<= 50 ms) stays under 1% of every transfer measured here.
_POLL = 0.05
_LOOPBACK = "127.0.0.1"


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


# -- child processes ---------------------------------------------------------------
#
# Each runs ``python -m netsim.bench _child ROLE JSON``, prints JSON lines on
# stdout (the first one once it is listening) and, for nodes, takes one JSON
# command per stdin line. Times are time.monotonic(): CLOCK_MONOTONIC is one
# clock for every process on the machine, so they compare across processes.


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _mark(endpoint: Any = None) -> dict[str, Any]:
    """Now: time, CPU seconds, peak RSS and (given an endpoint) its datagram counters."""
    mark = {"t": time.monotonic(), "cpu": _cpu_s(), "rss": _peak_rss_mib()}
    if endpoint is not None:
        mark.update(out=endpoint.stats.datagrams_sent, into=endpoint.stats.datagrams_received)
    return mark


def _window(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What happened between two marks (peak RSS: over the whole life so far)."""
    keys = ("t", "cpu", "out", "into")
    window: dict[str, Any] = {key: after[key] - before[key] for key in keys if key in after}
    return {**window, "seconds": window.pop("t"), "rss": after["rss"]}


async def _node_child(args: dict[str, Any]) -> None:
    import trio

    from p2psync import ops
    from p2psync.crypto.identity import NodeId
    from p2psync.home import Home
    from p2psync.node import Node, NodeOptions, StaticPeer, open_node

    # Completion is polled at a fixed rate on purpose: waking on every stored
    # object would take the store lock hundreds of times a second.
    async def poll(node: Node, check: Callable[[], bool]) -> None:
        while not await node.locked(check):  # noqa: ASYNC110
            await trio.sleep(_POLL)

    async def command(node: Node, cmd: dict[str, Any]) -> dict[str, Any]:
        store = node.store
        op = cmd["op"]
        if op == "mark":
            return _mark(node.endpoint)
        if op == "linked":
            while not node.active:  # noqa: ASYNC110
                await trio.sleep(_POLL)
            return _mark(node.endpoint)
        if op == "put":
            start = time.monotonic()
            await node.put_stream_from(Path(cmd["path"]), key=cmd["key"])
            return {**_mark(node.endpoint), "put_s": time.monotonic() - start}
        if op == "wait_blob":
            key = cmd["key"]

            def complete() -> bool:
                head = store.head(key)
                return head is not None and head.complete

            await poll(node, complete)
            return _mark(node.endpoint)
        if op == "digest":

            def digest() -> str:
                sha = hashlib.sha256()
                for piece in store.iter_blob(ops.resolve_blob(store, cmd["key"])):
                    sha.update(piece)
                return sha.hexdigest()

            return {"sha256": await node.locked(digest)}
        if op == "append":
            count, blobs = int(cmd["count"]), bool(cmd["blobs"])

            def append() -> int:
                seq = 0
                for i in range(count):
                    if blobs:
                        seq = ops.put_stream(store, io.BytesIO(b"v%d" % i), key=f"b/{i}").entry.seq
                    else:
                        meta = Meta(key=f"k/{i}")
                        seq = store.append(Kind.DELETE, meta, now_ms=ops.now_ms()).entry.seq
                return seq

            start = time.monotonic()
            last_seq = await node.locked(append)
            return {**_mark(node.endpoint), "append_s": time.monotonic() - start, "seq": last_seq}
        if op == "dial":
            author = NodeId.parse(cmd["node_id"])
            node.add_peer(StaticPeer(author, (_LOOPBACK, int(cmd["port"]))))
            return _mark(node.endpoint)
        if op == "wait_entries":
            author, seq, blobs = NodeId.parse(cmd["node_id"]), int(cmd["seq"]), cmd["blobs"]
            linked_at = None

            def has_all() -> bool:
                if not store.entries_after(author, seq - 1, 1):
                    return False
                return not blobs or not store.wanted_blobs()

            while not await node.locked(has_all):
                if linked_at is None and author in node.active:
                    linked_at = time.monotonic()
                await trio.sleep(_POLL)
            return {**_mark(node.endpoint), "linked_t": linked_at}
        raise ValueError(f"unknown command {op!r}")

    peers = (StaticPeer.parse(args["peer"]),) if args.get("peer") else ()
    options = NodeOptions(listen=(_LOOPBACK, 0), peers=peers)
    async with open_node(Home(Path(args["home"])), options) as node:
        emit(node_id=str(node.node_id), port=node.endpoint.local_address[1], pid=os.getpid())
        commands = trio.lowlevel.FdStream(os.dup(0))
        pending = b""
        while True:
            data = await commands.receive_some()
            if not data:
                return
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                cmd = json.loads(line)
                if cmd["op"] == "quit":
                    return
                emit(**await command(node, cmd))


async def _endpoint_receiver(args: dict[str, Any]) -> None:
    import trio

    from p2psync.net.endpoint import EndpointConfig, open_endpoint

    config = EndpointConfig(bind_host=_LOOPBACK)
    async with open_endpoint(Identity.generate(os.urandom), config) as endpoint:
        emit(node_id=str(endpoint.node_id), port=endpoint.local_address[1], pid=os.getpid())
        conn = await endpoint.accept()
        stream = await conn.accept_stream()
        before, total = _mark(endpoint), 0
        while data := await stream.receive_some():
            total += len(data)
        after = _mark(endpoint)
        await stream.send_all(b"%d" % total)
        await stream.send_eof()
        emit(**_window(before, after), bytes=total)
        # Stay until the sender has our count (it closes) or we are stopped.
        gone = (trio.BrokenResourceError, trio.ClosedResourceError)
        with trio.move_on_after(30), contextlib.suppress(*gone):
            await conn.accept_stream()


async def _endpoint_sender(args: dict[str, Any], source: IO[bytes]) -> None:
    from p2psync.crypto.identity import NodeId
    from p2psync.net.endpoint import EndpointConfig, open_endpoint

    config = EndpointConfig(bind_host=_LOOPBACK)
    async with open_endpoint(Identity.generate(os.urandom), config) as endpoint:
        conn = await endpoint.connect(NodeId.parse(args["node_id"]), (_LOOPBACK, args["port"]))
        stream = await conn.open_stream()
        before = _mark(endpoint)
        while chunk := source.read(MiB):
            await stream.send_all(chunk)
        await stream.send_eof()
        reply = b""
        while data := await stream.receive_some():
            reply += data
        after = _mark(endpoint)
        await conn.aclose()
    emit(**_window(before, after), bytes=int(reply))


def _stock_configuration(is_client: bool) -> Any:
    from aioquic.quic.configuration import QuicConfiguration

    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=["bench"],
        max_datagram_size=defaults.NET_MAX_DATAGRAM_SIZE,
    )
    if is_client:
        config.verify_mode = ssl.CERT_NONE
        return config
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    config.certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    config.private_key = key
    return config


async def _stock_receiver(args: dict[str, Any]) -> None:
    from aioquic.asyncio.server import serve

    done = asyncio.Event()
    result: dict[str, Any] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        before, total = _mark(), 0
        while chunk := await reader.read(MiB):
            total += len(chunk)
        result.update(_window(before, _mark()), bytes=total)
        writer.write(b"%d" % total)
        writer.write_eof()
        done.set()

    def on_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(handle(reader, writer))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    server = await serve(
        _LOOPBACK, 0, configuration=_stock_configuration(False), stream_handler=on_stream
    )
    assert server._transport is not None
    emit(port=server._transport.get_extra_info("sockname")[1], pid=os.getpid())
    await done.wait()
    emit(**result)
    await asyncio.sleep(30)  # until the sender has our count and the parent stops us
    server.close()


async def _stock_sender(args: dict[str, Any], source: IO[bytes]) -> None:
    from aioquic.asyncio.client import connect

    async with connect(_LOOPBACK, args["port"], configuration=_stock_configuration(True)) as client:
        reader, writer = await client.create_stream()
        before = _mark()
        while chunk := source.read(MiB):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0)  # let the loop transmit while we read (drain never waits)
        writer.write_eof()
        reply = await reader.read()
        after = _mark()
    emit(**_window(before, after), bytes=int(reply))


def _child_main(role: str, args: dict[str, Any]) -> int:
    die_with_parent()
    import trio

    if role == "node":
        trio.run(_node_child, args)
    elif role == "endpoint-receiver":
        trio.run(_endpoint_receiver, args)
    elif role == "stock-receiver":
        asyncio.run(_stock_receiver(args))
    else:
        with open(args["path"], "rb") as source:
            if role == "endpoint-sender":
                trio.run(_endpoint_sender, args, source)
            elif role == "stock-sender":
                asyncio.run(_stock_sender(args, source))
            else:
                raise SystemExit(f"unknown child role {role!r}")
    return 0


# -- the parent side ---------------------------------------------------------------


class _Child:
    """One child process: JSON commands in on stdin, JSON lines out on stdout."""

    def __init__(self, name: str, role: str, args: dict[str, Any], workdir: Path) -> None:
        self.name = name
        self.takes_commands = role == "node"
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "netsim.bench", "_child", role, json.dumps(args)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self._lines: queue.Queue[bytes | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def receive(self, deadline: Deadline) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=deadline.left())
        except queue.Empty:
            raise BenchFailed(
                f"{self.name} did not answer in time{log_tail(self.log_path)}"
            ) from None
        if line is None:
            self.proc.wait()
            raise BenchFailed(
                f"{self.name} exited (code {self.proc.returncode}){log_tail(self.log_path)}"
            )
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, deadline: Deadline, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()
        return self.receive(deadline)

    def stop(self) -> None:
        if self.takes_commands and self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()


class _Children:
    """Starts children and stops every one of them on exit."""

    def __init__(self, workdir: Path, verbose: bool) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self.running: list[_Child] = []

    def start(self, name: str, role: str, **args: Any) -> _Child:
        child = _Child(name, role, args, self.workdir)
        self.running.append(child)
        _progress(self.verbose, f"started {name} (pid {child.proc.pid})")
        return child

    def stop(self, child: _Child) -> None:
        child.stop()
        self.running.remove(child)

    def __enter__(self) -> _Children:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.running):
            child.stop()
        self.running.clear()


def _progress(verbose: bool, message: str) -> None:
    if verbose:
        print(f"bench: {message}", file=sys.stderr, flush=True)


_PATHS = ("stock", "endpoint", "node")
_SIDES = {
    "stock": ("stock_sender", "stock_receiver"),
    "endpoint": ("endpoint_sender", "endpoint_receiver"),
    "node": ("node_a", "node_b"),
}


def _stream_pair(
    children: _Children, kind: str, source: Path, deadline: Deadline
) -> dict[str, Any]:
    """One stream of ``source`` from a ``kind`` sender to a ``kind`` receiver process."""
    receiver = children.start(f"{kind}-receiver", f"{kind}-receiver")
    ready = receiver.receive(deadline)
    sender = children.start(f"{kind}-sender", f"{kind}-sender", path=str(source), **ready)
    sent = sender.receive(deadline)
    received = receiver.receive(deadline)
    children.stop(sender)
    children.stop(receiver)
    if not sent["bytes"] == received["bytes"] == source.stat().st_size:
        raise BenchFailed(f"{kind}: sent {source.stat().st_size}, got {received['bytes']}")
    sender_side, receiver_side = _SIDES[kind]
    return {"seconds": sent["seconds"], sender_side: sent, receiver_side: received}


def _node_pair(
    children: _Children, homes: list[Path], source: Path, sha256: str, deadline: Deadline
) -> dict[str, Any]:
    """Node A puts ``source``; node B, already linked, syncs it. Timed from put to complete."""
    a_home, b_home = homes
    b = children.start("node-b", "node", home=str(b_home))
    b_ready = b.receive(deadline)
    peer = f"{b_ready['node_id']}@{_LOOPBACK}:{b_ready['port']}"
    a = children.start("node-a", "node", home=str(a_home), peer=peer)
    a.receive(deadline)
    a.call(deadline, op="linked")
    b.call(deadline, op="linked")
    b_before = b.call(deadline, op="mark")
    a_put = a.call(deadline, op="put", path=str(source), key="bench/blob")
    b_done = b.call(deadline, op="wait_blob", key="bench/blob")
    a_after = a.call(deadline, op="mark")
    if b.call(deadline, op="digest", key="bench/blob")["sha256"] != sha256:
        raise BenchFailed("node B's copy of the blob differs from the file A put")
    children.stop(a)
    children.stop(b)
    return {
        "seconds": b_done["t"] - a_put["t"],
        "put_seconds": a_put["put_s"],
        "node_a": _window(a_put, a_after),
        "node_b": _window(b_before, b_done),
    }


def bench_throughput(
    size_mib: int, rounds: int, workdir: Path, deadline: Deadline, verbose: bool
) -> dict[str, Any]:
    load_start = round(os.getloadavg()[0], 2)
    source = workdir / "input.bin"
    sha256 = random_file(source, size_mib)
    mb = size_mib * MiB / 1e6
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in _PATHS}
    with _Children(workdir, verbose) as children:
        for index in range(rounds):
            # Rotate the order so load that drifts over the run hits every path alike.
            for path in _PATHS[index % 3 :] + _PATHS[: index % 3]:
                _progress(verbose, f"round {index + 1}/{rounds}: {path}")
                if path == "node":
                    homes = make_homes(workdir / f"round{index}", ("a", "b"))
                    run = _node_pair(children, homes, source, sha256, deadline)
                    shutil.rmtree(workdir / f"round{index}", ignore_errors=True)
                else:
                    run = _stream_pair(children, path, source, deadline)
                _progress(verbose, f"{path}: {mb / run['seconds']:.1f} MB/s")
                runs[path].append(run)

    # The median round of each path by time (the lower one for even --rounds) speaks for it.
    median = {
        path: sorted(done, key=lambda r: r["seconds"])[(len(done) - 1) // 2]
        for path, done in runs.items()
    }
    seconds = {path: run["seconds"] for path, run in median.items()}
    # Throughput if each side had a core of its own: bytes / CPU seconds of the busier side.
    ceiling = {
        path: mb / max(run[side]["cpu"] for side in _SIDES[path]) for path, run in median.items()
    }
    report: dict[str, Any] = {
        "bench": "throughput",
        "size_mib": size_mib,
        "rounds": rounds,
        "max_datagram_size": defaults.NET_MAX_DATAGRAM_SIZE,
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
    }
    report.update({f"{path}_mb_s": round(mb / seconds[path], 1) for path in _PATHS})
    report.update(
        {
            "endpoint_ratio_vs_stock": round(seconds["stock"] / seconds["endpoint"], 3),
            "node_ratio_vs_stock": round(seconds["stock"] / seconds["node"], 3),
            "node_ratio_vs_endpoint": round(seconds["endpoint"] / seconds["node"], 3),
        }
    )
    if rounds > 1:
        each = {path: [round(r["seconds"], 2) for r in runs[path]] for path in _PATHS}
        report.update({f"{path}_seconds_each_round": each[path] for path in _PATHS})
    report.update({f"{path}_seconds": round(seconds[path], 3) for path in _PATHS})
    report["node_a_put_seconds"] = round(median["node"]["put_seconds"], 3)
    sides = {side: median[path][side] for path in _PATHS for side in _SIDES[path]}
    report.update({f"{side}_cpu_s": round(w["cpu"], 2) for side, w in sides.items()})
    report.update({f"{path}_cpu_bound_mb_s": round(ceiling[path], 1) for path in _PATHS})
    report.update(
        {
            "endpoint_cpu_bound_ratio_vs_stock": round(ceiling["endpoint"] / ceiling["stock"], 3),
            "node_cpu_bound_ratio_vs_stock": round(ceiling["node"] / ceiling["stock"], 3),
        }
    )
    peak = {
        side: max(run[side]["rss"] for run in runs[path])
        for path in _PATHS
        for side in _SIDES[path]
    }
    report.update({f"{side}_peak_rss_mib": round(rss, 1) for side, rss in peak.items()})
    report.update(
        {
            f"{side}_datagrams_sent_per_mib": round(w["out"] / size_mib)
            for side, w in sides.items()
            if "out" in w
        }
    )
    node_ratio = seconds["stock"] / seconds["node"]
    report.update(
        {
            "target_ratio_vs_stock": TARGET_RATIO_VS_STOCK,
            "target_node_rss_mib": TARGET_NODE_RSS_MIB,
            "node_meets_ratio": node_ratio >= TARGET_RATIO_VS_STOCK,
            "endpoint_meets_ratio": seconds["stock"] / seconds["endpoint"] >= TARGET_RATIO_VS_STOCK,
            "nodes_meet_rss": max(peak["node_a"], peak["node_b"]) < TARGET_NODE_RSS_MIB,
        }
    )
    return report


def bench_entries(
    count: int, blobs: bool, workdir: Path, deadline: Deadline, verbose: bool
) -> dict[str, Any]:
    from p2psync.home import Home

    load_start = round(os.getloadavg()[0], 2)
    a_home, b_home = make_homes(workdir, ("a", "b"))
    with _Children(workdir, verbose) as children:
        a = children.start("node-a", "node", home=str(a_home))
        b = children.start("node-b", "node", home=str(b_home))
        a_ready, _ = a.receive(deadline), b.receive(deadline)
        appended = a.call(deadline, op="append", count=count, blobs=blobs)
        _progress(verbose, f"A appended {count} in {appended['append_s']:.2f}s; B dials A")
        b_before = b.call(deadline, op="dial", node_id=a_ready["node_id"], port=a_ready["port"])
        b_done = b.call(
            deadline, op="wait_entries", node_id=a_ready["node_id"], seq=appended["seq"],
            blobs=blobs,
        )  # fmt: skip
        a_after = a.call(deadline, op="mark")

    # Baseline, children gone: B's least work, verify + insert the same entries.
    source = Home(a_home).open_store()
    try:
        raws = source.entries_after(source.identity.node_id, 0, appended["seq"])
        secrets = Home(a_home).load_secrets()
    finally:
        source.close()
    scratch = Store(workdir / "scratch", Identity.generate(os.urandom), secrets)
    batch = defaults.SYNC_MAX_ENTRIES_PER_MESSAGE
    now = time.time_ns() // 1_000_000
    try:
        insert_s = _timed(
            lambda: [
                scratch.insert_entries(raws[i : i + batch], now_ms=now)
                for i in range(0, len(raws), batch)
            ]
        )
    finally:
        scratch.close()

    sync_s = b_done["t"] - b_before["t"]
    linked_t = b_done["linked_t"]
    after_link_s = b_done["t"] - linked_t if linked_t is not None else None
    local_rate = len(raws) / insert_s
    node_a, node_b = _window(appended, a_after), _window(b_before, b_done)
    return {
        "bench": "entries",
        "count": count,
        "kind": "put (tiny blob each)" if blobs else "delete (no blob)",
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": round(os.getloadavg()[0], 2),
        "append_per_s": round(count / appended["append_s"]),
        "local_insert_per_s": round(local_rate),
        "sync_seconds": round(sync_s, 3),
        "sync_per_s": round(count / sync_s),
        "sync_ratio_vs_local_insert": round(count / sync_s / local_rate, 3),
        "connect_seconds": round(linked_t - b_before["t"], 3) if linked_t is not None else None,
        "sync_per_s_after_link": round(count / after_link_s) if after_link_s else None,
        "node_a_cpu_s": round(node_a["cpu"], 2),
        "node_b_cpu_s": round(node_b["cpu"], 2),
        "node_a_peak_rss_mib": round(node_a["rss"], 1),
        "node_b_peak_rss_mib": round(node_b["rss"], 1),
        "node_a_datagrams_sent": node_a["out"],
        "node_b_datagrams_sent": node_b["out"],
        "target_per_s": TARGET_ENTRIES_PER_S,
        "meets_target": count / sync_s >= TARGET_ENTRIES_PER_S,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"] and len(argv) == 3:
        return _child_main(argv[1], json.loads(argv[2]))
    if argv[:1] == ["relay"]:  # relayed vs direct, idle connections, restart
        from netsim import bench_relay

        return bench_relay.main(argv[1:])
    if argv[:1] == ["mailbox"]:  # relayd's mailbox: pushes/s, pulls/s, MB/s, RSS
        from netsim import bench_mailbox

        return bench_mailbox.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m netsim.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    store = sub.add_parser("store", help="local store put/get and entry throughput")
    store.add_argument("--size-mib", type=int, default=256)
    store.add_argument("--entries", type=int, default=10_000)
    throughput = sub.add_parser(
        "throughput", help="a blob node to node vs one stream (p2psync endpoint, stock aioquic)"
    )
    throughput.add_argument("--size-mib", type=int, default=256)
    throughput.add_argument(
        "--rounds", type=int, default=1, help="run each path N times, order rotated; medians"
    )
    entries = sub.add_parser("entries", help="small entries node to node, end to end")
    entries.add_argument("--count", type=int, default=10_000)
    entries.add_argument("--blobs", action="store_true", help="PUTs of a tiny blob each")
    # Listed for --help only: main() hands these to their own modules before parsing.
    sub.add_parser("relay", help="relayed vs direct sync, relayd CPU/MB, idle connections, "
                   "restart (options: relay --help)")  # fmt: skip
    sub.add_parser("mailbox", help="relayd's mailbox: pushes/s, pulls/s, MB/s, RSS "
                   "(options: mailbox --help)")  # fmt: skip
    for command in (store, throughput, entries):
        command.add_argument("--json", metavar="FILE", help="also write the report as JSON")
        command.add_argument("--dir", help="work directory (default: a temp dir, removed)")
    for command in (throughput, entries):
        command.add_argument(
            "--timeout", type=float, default=900, help="give up after this many seconds"
        )
        command.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="p2psync-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.bench == "store":
            report = bench_store(args.size_mib, args.entries, workdir)
        elif args.bench == "throughput":
            deadline = Deadline(args.timeout)
            report = bench_throughput(args.size_mib, args.rounds, workdir, deadline, args.verbose)
        else:
            deadline = Deadline(args.timeout)
            report = bench_entries(args.count, args.blobs, workdir, deadline, args.verbose)
    except BenchFailed as exc:
        print(f"bench {args.bench} failed: {exc}", file=sys.stderr)
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
