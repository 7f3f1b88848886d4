"""relayd benchmark: ``python -m netsim.bench_relay [--json FILE] [options]``.

Four figures, each against a baseline or a bound measured in the same run,
all over loopback, relayd always a real ``python -m relayd`` subprocess
(its bound ports and NodeId are read from its "relayd ready" log line; its
CPU seconds from ``/proc/PID/stat``, its RSS from ``/proc/PID/status``):

``throughput``
    Node A puts a ``--size-mib`` blob (random bytes), node B syncs it; each
    node is its own process (this module's ``_child node``). Timed from A's
    put returning to B seeing the blob complete (B polls ``Store.head``
    every 10 ms), after both nodes are linked (connection setup excluded).
    Three paths, order rotated per round, ``--rounds`` rounds, medians:

    - *direct*: B dials A's loopback address; no relay;
    - *relayed*: both nodes use relayd as home relay, B knows only A's
      NodeId, and both node processes run with ``EndpointConfig(hole_punching=False)``
      (as in tests/node/test_relayed_sync.py), so every datagram
      goes through relayd; relayd runs with its **default limits**
      (relayd/defaults.py), so the nodes use the UDP fast path (one inner
      QUIC packet per UDP datagram to and from relayd);
    - *relayed-unthrottled*: the same against a second relayd whose per-node
      token buckets are lifted (1 GiB/s, 1M frames/s): what the relay
      itself can carry, not what its per-node policy allows;
    - *relayed-stream*: default limits but the fast path off at relayd
      (``fast_path = false``), so the nodes relay inside their relay
      connections' QUIC streams with 16 KiB inner packets (how every
      relayed byte travelled before the fast path).

    ``*_fast_path_share`` is the part of relayd's relayed payload bytes
    (``relayd_relayed_bytes_total``) that went UDP to UDP
    (``relayd_fast_path_bytes_forwarded_total``).

    ``*_ratio_vs_direct`` is direct seconds / relayed seconds (target >=
    0.5). On this 2-core machine the relayed paths run three busy processes
    (A, B, relayd) on two cores against two for direct; that is part of the
    figure. relayd's CPU seconds over each relayed transfer divided by the
    payload bytes it relayed (``relayd_relayed_bytes_total`` from
    /metrics: the inner QUIC packets both ways, headers included) gives
    ``relayd_cpu_ms_per_relayed_mb`` (MB = 10^6 bytes).

``idle``
    Authenticated idle node connections one relayd holds, with its RSS.
    Clients are lean: ``_child clients`` runs one plain ``selectors`` loop
    driving one sans-IO aioquic ``QuicConnection`` per node identity (own
    Ed25519 identity each, so own NodeId), several per UDP socket
    (demultiplexed by connection id), each socket bound to its own
    127.0.x.y address with at most ``--per-ip`` connections, so relayd's
    default per-IP limit (32) holds; each connection does what a node's
    RelayClient does: TLS with the relay's certificate checked against its
    NodeId, HELLO / CHALLENGE / signed AUTH / WELCOME, then a relay PING
    every 15 s (the node's default; a PONG within 10 s or it reconnects).
    Lean clients do not send disco pings first (a node's endpoint does),
    and their handshakes are paced (at most ``--window`` in flight).
    relayd runs with default limits. Ramp ``--step`` connections at a time
    up to ``--target``; the ramp ends early when ``--idle-budget`` seconds
    are used, a step is not fully connected within ``--step-timeout``, or
    relayd's RSS passes ``--rss-cap-mib``. After each step relayd's CPU is
    sampled for 3 s with the connections idle. Then hold ``--hold`` seconds
    (more than a ping interval) and count again: ``idle_connections_held``
    is relayd's own ``nodes`` count in /health after the hold; RSS is
    ``VmRSS`` then, with relayd's CPU use while holding.

``restart``
    ``--restart-nodes`` lean clients on a relayd with a ``--data`` directory
    (stable NodeId); SIGTERM (relayd tells each node SHUTTING_DOWN and
    exits 0), start a new relayd on the same port and directory, and time
    until its /health counts every node again. The clients reconnect as
    RelayClient does: first retry after 0.25-0.5 s, then capped
    exponential backoff with jitter; an attempt made while relayd is down
    is answered when aioquic retransmits its Initial. Reported from SIGTERM
    and from the new relayd's "ready" line.

Every wait is bounded (``--timeout`` overall, ``--idle-budget`` for the
ramp); children (nodes, clients, relayds) are stopped and the work dir
removed on any exit, and die with this process (PR_SET_PDEATHSIG).
``-v`` prints progress on stderr. Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import itertools
import json
import os
import queue
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

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

MiB: Final = 1024 * 1024
MB: Final = 1_000_000
_LOOPBACK: Final = "127.0.0.1"
_POLL: Final = 0.01

TARGET_RATIO_VS_DIRECT: Final = 0.5
TARGET_IDLE_CONNECTIONS: Final = 5000
TARGET_RELAYD_RSS_MIB: Final = 1024

# Lifted per-node limits for the "relayed-unthrottled" path.
_UNTHROTTLED_LIMITS: Final = {
    "bytes_per_second": 1024 * MiB,
    "byte_burst": 1024 * MiB,
    "frames_per_second": 1_000_000,
    "frame_burst": 1_000_000,
}
# relayd's CPU is sampled this long after each ramp step (connections idle).
_IDLE_SAMPLE_S: Final = 3.0
_THROUGHPUT_PATHS: Final = ("direct", "relayed", "relayed-unthrottled", "relayed-stream")
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


# --- /proc ------------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all threads) from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def proc_rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


# --- plumbing ---------------------------------------------------------------------------------


def _progress(verbose: bool, message: str) -> None:
    if verbose:
        print(f"bench relay: {message}", file=sys.stderr, flush=True)


def _stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Child:
    """A child of this module: JSON commands in on stdin, JSON lines out on stdout."""

    def __init__(self, name: str, role: str, args: dict[str, Any], workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "netsim.bench_relay", "_child", role, json.dumps(args)],
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
        if "error" in reply:
            raise BenchFailed(f"{self.name}: {reply['error']}{log_tail(self.log_path)}")
        return reply

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        self.proc.stdin.flush()

    def call(self, deadline: Deadline, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.receive(deadline)

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        _stop_process(self.proc, 5)
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()


# relayd is started through this wrapper so that it, too, dies with the bench
# (PR_SET_PDEATHSIG); otherwise it is exactly ``python -m relayd ARGS``.
_RUN_DYING_WITH_PARENT: Final = (
    "import ctypes, os, runpy, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
    "os.getppid() == int(sys.argv[1]) or os._exit(1)\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)
_READY: Final = re.compile(
    r"relayd ready: udp=(?P<udp_host>[\d.]+):(?P<udp_port>\d+) .*?"
    r"http=(?P<http_host>[\d.]+):(?P<http_port>\d+) relay=(?P<node_id>\S+)"
)


class _Relayd:
    """One ``python -m relayd`` process on loopback."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        port: int = 0,
        data_dir: Path | None = None,
        limits: dict[str, int | bool] | None = None,
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        args = ["--listen", f"{_LOOPBACK}:{port}", "--http", f"{_LOOPBACK}:0"]
        if data_dir is not None:
            args += ["--data", str(data_dir)]
        if limits:
            config = workdir / f"{name}.toml"
            toml = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in limits.items()}
            lines = [f"{k} = {v}\n" for k, v in toml.items()]
            config.write_text("[limits]\n" + "".join(lines))
            args += ["--config", str(config)]
        self.command = "python -m relayd " + " ".join(args)
        argv = [sys.executable, "-c", _RUN_DYING_WITH_PARENT, str(os.getpid()), "relayd", *args]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
            )
        self.pid = self.proc.pid
        self.started_t = time.monotonic()
        self.ready_t = 0.0
        self.udp = ("", 0)
        self.http = ("", 0)
        self.node_id = ""

    def wait_ready(self, deadline: Deadline) -> None:
        while True:
            match = _READY.search(self.log_path.read_text(errors="replace"))
            if match is not None:
                break
            if self.proc.poll() is not None:
                raise BenchFailed(f"{self.name} exited before ready{log_tail(self.log_path)}")
            deadline.left()
            time.sleep(_POLL)
        self.ready_t = time.monotonic()
        self.udp = (match["udp_host"], int(match["udp_port"]))
        self.http = (match["http_host"], int(match["http_port"]))
        self.node_id = match["node_id"]

    @property
    def relay_text(self) -> str:
        return f"{self.node_id}@{self.udp[0]}:{self.udp[1]}"

    def _get(self, path: str) -> bytes:
        url = f"http://{self.http[0]}:{self.http[1]}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body: bytes = response.read()
        return body

    def health(self) -> dict[str, Any]:
        health: dict[str, Any] = json.loads(self._get("/health"))
        return health

    def metrics(self) -> dict[str, float]:
        samples = {}
        for line in self._get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[name] = float(value)
        return samples

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def rss_mib(self) -> tuple[float, float]:
        return proc_rss_mib(self.pid)

    def terminate(self, grace: float = 15.0) -> int:
        """SIGTERM (graceful shutdown), wait; the exit code."""
        _stop_process(self.proc, grace)
        return self.proc.returncode


class _Processes:
    """Every child and relayd started, stopped on exit whatever happens."""

    def __init__(self, workdir: Path, verbose: bool) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self.children: list[_Child] = []
        self.relayds: list[_Relayd] = []

    def child(self, name: str, role: str, **args: Any) -> _Child:
        child = _Child(name, role, args, self.workdir)
        self.children.append(child)
        _progress(self.verbose, f"started {name} (pid {child.proc.pid})")
        return child

    def relayd(self, name: str, deadline: Deadline, **kwargs: Any) -> _Relayd:
        relayd = _Relayd(self.workdir, name, **kwargs)
        self.relayds.append(relayd)
        relayd.wait_ready(deadline)
        _progress(self.verbose, f"{name} ready (pid {relayd.pid}): {relayd.command}")
        return relayd

    def stop(self, what: _Child | _Relayd) -> None:
        if isinstance(what, _Child):
            what.stop()
            self.children.remove(what)
        else:
            what.terminate()
            self.relayds.remove(what)

    def __enter__(self) -> _Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for child in reversed(self.children):
            child.stop()
        for relayd in reversed(self.relayds):
            relayd.terminate()
        self.children.clear()
        self.relayds.clear()


# --- child: a node ----------------------------------------------------------------------------


async def _node_child(args: dict[str, Any]) -> None:
    import trio

    from p2psync import ops
    from p2psync.home import Home
    from p2psync.net.endpoint import EndpointConfig
    from p2psync.node import Node, NodeOptions, StaticPeer, open_node

    # As tests/node/test_relayed_sync.py: no direct address is ever learnt.
    endpoint = EndpointConfig(hole_punching=False) if args.get("block_direct") else None

    async def poll(node: Node, check: Callable[[], bool]) -> None:
        while not await node.locked(check):  # noqa: ASYNC110 -- fixed-rate poll on purpose
            await trio.sleep(_POLL)

    def mark(node: Node) -> dict[str, Any]:
        return {"t": time.monotonic(), "cpu": proc_cpu_s(os.getpid())}

    async def command(node: Node, cmd: dict[str, Any]) -> dict[str, Any]:
        store = node.store
        op = cmd["op"]
        if op == "relay_connected":
            relay = node.relay
            assert relay is not None
            await relay.wait_connected()
            return mark(node)
        if op == "linked":
            while not node.active:  # noqa: ASYNC110
                await trio.sleep(_POLL)
            return mark(node)
        if op == "mark":
            return mark(node)
        if op == "put":
            await node.put_stream_from(Path(cmd["path"]), key=cmd["key"])
            return mark(node)
        if op == "wait_blob":
            key = cmd["key"]

            def complete() -> bool:
                head = store.head(key)
                return head is not None and head.complete

            await poll(node, complete)
            return mark(node)
        if op == "digest":

            def digest() -> str:
                sha = hashlib.sha256()
                for piece in store.iter_blob(ops.resolve_blob(store, cmd["key"])):
                    sha.update(piece)
                return sha.hexdigest()

            return {"sha256": await node.locked(digest)}
        if op == "paths":
            stats = node.endpoint.stats
            counters = {
                "datagrams_sent": stats.datagrams_sent,
                "relay_datagrams_sent": stats.relay_datagrams_sent,
                "relay_dropped": stats.relay_dropped,
            }
            if node.relay is not None:
                counters["relay_client_tx_dropped"] = node.relay.stats.tx_dropped
                counters["relay_client_rx_dropped"] = node.relay.stats.rx_dropped
            return {"paths": [peer["path"] for peer in node.status()["peers"]], **counters}
        raise ValueError(f"unknown command {op!r}")

    peers = (StaticPeer.parse(args["peer"]),) if args.get("peer") else ()
    options = NodeOptions(
        listen=(_LOOPBACK, 0), peers=peers, relay=args.get("relay"), endpoint=endpoint
    )
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


# --- child: lean relay clients ----------------------------------------------------------------

# Slot states.
_IDLE, _HANDSHAKE, _CONNECTED = 0, 1, 2
# Heap entry kinds.
_QUIC_TIMER, _DEADLINE, _PING, _PING_TIMEOUT, _RECONNECT = range(5)


@dataclass(eq=False, slots=True)
class _Slot:
    """One node identity and its (current) QUIC connection to the relay."""

    index: int
    identity: Any  # p2psync.crypto.identity.Identity
    sock: socket.socket
    quic: Any = None  # aioquic QuicConnection
    state: int = _IDLE
    epoch: int = 0
    decoder: Any = None
    stream_id: int | None = None
    cids: list[bytes] = field(default_factory=list)
    quic_timer: float | None = None
    backoff: float = 0.5
    ever_connected: bool = False
    ping_nonce: int | None = None
    started: float = 0.0


class _LeanClients:
    """Many relay node connections driven by one selectors loop (sans-IO aioquic)."""

    BACKOFF_INITIAL: Final = 0.5  # RelayClientConfig defaults
    BACKOFF_MAX: Final = 30.0
    CONNECT_TIMEOUT: Final = 10.0
    PING_TIMEOUT: Final = 10.0

    def __init__(self, args: dict[str, Any]) -> None:
        from p2psync.crypto.identity import NodeId
        from p2psync.defaults import NET_MAX_DATAGRAM_SIZE
        from p2psync.net import tls
        from p2psync.proto.relay import RELAY_ALPN

        self.relay_address = (str(args["relay_host"]), int(args["relay_port"]))
        self.relay_id = NodeId.parse(args["relay_node_id"])
        self.ips: list[str] = args["ips"]
        self.per_ip = int(args["per_ip"])
        self.window = int(args["window"])
        self.ping_interval = float(args["ping_interval"])
        self.config = tls.client_configuration(
            alpn=[RELAY_ALPN],
            max_datagram_size=NET_MAX_DATAGRAM_SIZE,
            idle_timeout=60.0,
            max_data=256 * 1024,
            max_stream_data=128 * 1024,
        )
        self.selector = selectors.DefaultSelector()
        self.sockets: list[socket.socket] = []
        self.slots: list[_Slot] = []
        self.by_cid: dict[bytes, _Slot] = {}
        self.heap: list[tuple[float, int, int, _Slot, int]] = []
        self.seq = itertools.count()
        self.dirty: dict[_Slot, None] = {}
        self.waiting_to_open: deque[_Slot] = deque()
        self.rng = random.Random()
        self.in_flight = 0
        self.connected = 0
        self.stats = {"welcomes": 0, "failures": 0, "losses": 0, "pongs": 0, "errors": 0}
        self.handshake_seconds: list[float] = []  # start -> WELCOME, since the last report
        self.pending: dict[str, Any] | None = None
        self.stdin_buffer = b""
        self.quit = False
        os.set_blocking(0, False)
        self.selector.register(0, selectors.EVENT_READ, None)

    # --- slots ---------------------------------------------------------------------------

    def _socket_for(self, index: int) -> socket.socket:
        which = index // self.per_ip
        while len(self.sockets) <= which:
            if len(self.sockets) >= len(self.ips):
                raise BenchFailed(f"out of source addresses: {len(self.ips)} x {self.per_ip}")
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MiB)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MiB)
            sock.bind((self.ips[len(self.sockets)], 0))
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, sock)
            self.sockets.append(sock)
        return self.sockets[which]

    def add(self, count: int) -> None:
        from p2psync.crypto.identity import Identity

        for _ in range(count):
            index = len(self.slots)
            slot = _Slot(index, Identity.generate(os.urandom), self._socket_for(index))
            self.slots.append(slot)
            self.waiting_to_open.append(slot)

    def _push(self, when: float, kind: int, slot: _Slot) -> None:
        heapq.heappush(self.heap, (when, next(self.seq), kind, slot, slot.epoch))

    def _start(self, slot: _Slot, now: float) -> None:
        from aioquic.quic.connection import QuicConnection

        from p2psync.proto.relay import DEFAULT_MAX_PAYLOAD, FrameDecoder, max_frame_for

        slot.epoch += 1
        quic = QuicConnection(configuration=self.config)
        slot.quic = quic
        slot.state = _HANDSHAKE
        slot.decoder = FrameDecoder(max_frame_for(DEFAULT_MAX_PAYLOAD))
        slot.stream_id = None
        slot.quic_timer = None
        slot.ping_nonce = None
        slot.started = now
        self.in_flight += 1
        quic.connect(self.relay_address, now=now)
        self._add_cid(slot, quic.host_cid)
        self._push(now + self.CONNECT_TIMEOUT, _DEADLINE, slot)
        self.dirty[slot] = None

    def _add_cid(self, slot: _Slot, cid: bytes) -> None:
        slot.cids.append(cid)
        self.by_cid[cid] = slot

    def _lose(self, slot: _Slot, now: float) -> None:
        """The connection is over (failed, refused, closed): forget it, retry later."""
        if slot.state == _CONNECTED:
            self.connected -= 1
            self.stats["losses"] += 1
        elif slot.state == _HANDSHAKE:
            self.in_flight -= 1
            self.stats["failures"] += 1
        if slot.state == _IDLE:
            return
        quic = slot.quic
        if quic is not None:
            with contextlib.suppress(Exception):
                quic.close(error_code=0, reason_phrase="bye")
                self._send(slot, quic, now)
        for cid in slot.cids:
            if self.by_cid.get(cid) is slot:
                del self.by_cid[cid]
        slot.cids.clear()
        slot.quic = None
        slot.state = _IDLE
        slot.epoch += 1
        self.dirty.pop(slot, None)
        wait = self.rng.uniform(slot.backoff / 2, slot.backoff)
        slot.backoff = min(slot.backoff * 2, self.BACKOFF_MAX)
        self._push(now + wait, _RECONNECT, slot)

    # --- protocol ------------------------------------------------------------------------

    def _send_message(self, slot: _Slot, message: Any) -> None:
        from p2psync.proto.relay import encode_frame

        assert slot.stream_id is not None
        slot.quic.send_stream_data(slot.stream_id, encode_frame(message))

    def _handle_events(self, slot: _Slot, now: float) -> None:
        from aioquic.quic import events

        from p2psync.net.tls import check_peer_certificate
        from p2psync.proto.relay import Hello

        quic = slot.quic
        while slot.quic is quic and (event := quic.next_event()) is not None:
            if isinstance(event, events.ConnectionIdIssued):
                self._add_cid(slot, event.connection_id)
            elif isinstance(event, events.ConnectionIdRetired):
                if self.by_cid.get(event.connection_id) is slot:
                    del self.by_cid[event.connection_id]
            elif isinstance(event, events.HandshakeCompleted):
                certificate = quic.tls._peer_certificate
                try:
                    if certificate is None:
                        raise ValueError("no certificate")
                    check_peer_certificate(self.relay_id, certificate)
                except Exception:
                    self._lose(slot, now)
                    return
                slot.stream_id = quic.get_next_available_stream_id()
                self._send_message(slot, Hello())
            elif isinstance(event, events.StreamDataReceived):
                slot.decoder.feed(event.data)
                self._read_frames(slot, now)
                if event.end_stream and slot.quic is quic:
                    self._lose(slot, now)
            elif isinstance(event, events.StreamReset | events.ConnectionTerminated):
                self._lose(slot, now)

    def _read_frames(self, slot: _Slot, now: float) -> None:
        from p2psync.proto.relay import (
            Auth,
            Challenge,
            Error,
            Pong,
            Welcome,
            auth_input,
            decode_relay_to_node_untrusted,
        )

        quic = slot.quic
        while slot.quic is quic and (body := slot.decoder.next_frame()) is not None:
            message = decode_relay_to_node_untrusted(body, max_frame=slot.decoder.max_frame)
            if isinstance(message, Challenge):
                our_id = slot.identity.node_id
                signature = slot.identity.sign(auth_input(message.nonce, our_id, self.relay_id))
                self._send_message(slot, Auth(our_id, signature))
            elif isinstance(message, Welcome):
                slot.state = _CONNECTED
                slot.ever_connected = True
                slot.backoff = self.BACKOFF_INITIAL
                self.in_flight -= 1
                self.connected += 1
                self.stats["welcomes"] += 1
                self.handshake_seconds.append(now - slot.started)
                self._push(now + self.ping_interval * self.rng.uniform(0.5, 1.0), _PING, slot)
            elif isinstance(message, Pong):
                if message.nonce == slot.ping_nonce:
                    slot.ping_nonce = None
                    self.stats["pongs"] += 1
            elif isinstance(message, Error):
                self.stats["errors"] += 1
                if message.is_fatal:
                    self._lose(slot, now)

    def _timer(self, kind: int, slot: _Slot, when: float, now: float) -> None:
        from p2psync.proto.relay import Ping

        if kind == _QUIC_TIMER:
            if when != slot.quic_timer:
                return  # superseded by a later get_timer()
            slot.quic_timer = None
            slot.quic.handle_timer(now)
            self.dirty[slot] = None
        elif kind == _DEADLINE:
            if slot.state == _HANDSHAKE:
                self._lose(slot, now)
        elif kind == _PING:
            if slot.state == _CONNECTED:
                slot.ping_nonce = self.rng.getrandbits(64)
                self._send_message(slot, Ping(slot.ping_nonce))
                self.dirty[slot] = None
                self._push(now + self.PING_TIMEOUT, _PING_TIMEOUT, slot)
                self._push(now + self.ping_interval, _PING, slot)
        elif kind == _PING_TIMEOUT:
            if slot.state == _CONNECTED and slot.ping_nonce is not None:
                self._lose(slot, now)
        elif kind == _RECONNECT:
            self._start(slot, now)

    def _send(self, slot: _Slot, quic: Any, now: float) -> None:
        sock = slot.sock
        for data, address in quic.datagrams_to_send(now=now):
            with contextlib.suppress(BlockingIOError, InterruptedError):
                sock.sendto(data, address)  # a full buffer drops it: QUIC retransmits

    def _flush(self, now: float) -> None:
        while self.dirty:
            slot = next(iter(self.dirty))
            del self.dirty[slot]
            if slot.quic is None:
                continue
            self._handle_events(slot, now)
            quic = slot.quic
            if quic is None:
                continue
            self._send(slot, quic, now)
            timer = quic.get_timer()
            if timer is not None and timer != slot.quic_timer:
                slot.quic_timer = timer
                self._push(timer, _QUIC_TIMER, slot)

    # --- the loop ------------------------------------------------------------------------

    def _receive(self, sock: socket.socket, now: float) -> None:
        for _ in range(1024):
            try:
                data, address = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ECONNREFUSED from an earlier ICMP: read on
                continue
            if len(data) < 7:
                continue
            # Long header: flags, version(4), dcid length, dcid; short: flags, dcid (ours: 8).
            cid = data[6 : 6 + data[5]] if data[0] & 0x80 else data[1:9]
            slot = self.by_cid.get(cid)
            if slot is None or slot.quic is None:
                continue
            slot.quic.receive_datagram(data, address, now=now)
            self.dirty[slot] = None

    def _command(self, cmd: dict[str, Any]) -> None:
        op = cmd["op"]
        now = time.monotonic()
        if op == "quit":
            self.quit = True
        elif op == "open":
            self.add(int(cmd["count"]))
            self.pending = {"want": len(self.slots), "until": now + float(cmd["timeout"])}
            self.pending["started"] = now
        elif op == "wait":
            self.pending = {"want": int(cmd["count"]), "until": now + float(cmd["timeout"])}
            self.pending["started"] = now
        elif op == "stats":
            emit(**self._status(now))
        else:
            emit(error=f"unknown command {op!r}")

    def _status(self, now: float) -> dict[str, Any]:
        times = sorted(self.handshake_seconds)
        self.handshake_seconds = []
        return {
            "handshake_s_p50": round(times[len(times) // 2], 3) if times else None,
            "handshake_s_p90": round(times[len(times) * 9 // 10], 3) if times else None,
            "t": now,
            "slots": len(self.slots),
            "connected": self.connected,
            "in_flight": self.in_flight,
            "cpu": proc_cpu_s(os.getpid()),
            "rss_mib": proc_rss_mib(os.getpid())[0],
            **self.stats,
        }

    def _read_stdin(self) -> None:
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return
        if not data:
            self.quit = True
            return
        self.stdin_buffer += data
        while b"\n" in self.stdin_buffer:
            line, self.stdin_buffer = self.stdin_buffer.split(b"\n", 1)
            self._command(json.loads(line))

    def run(self) -> None:
        while not self.quit:
            now = time.monotonic()
            timeout = 0.5
            if self.heap:
                timeout = min(timeout, max(0.0, self.heap[0][0] - now))
            if self.waiting_to_open and self.in_flight < self.window:
                timeout = 0.0
            for key, _ in self.selector.select(timeout):
                if key.data is None:
                    self._read_stdin()
                else:
                    self._receive(key.data, time.monotonic())
            now = time.monotonic()
            while self.heap and self.heap[0][0] <= now:
                when, _, kind, slot, epoch = heapq.heappop(self.heap)
                if epoch == slot.epoch:
                    self._timer(kind, slot, when, now)
            while self.waiting_to_open and self.in_flight < self.window:
                self._start(self.waiting_to_open.popleft(), now)
            self._flush(now)
            pending = self.pending
            if pending is not None and (
                self.connected >= pending["want"] or now >= pending["until"]
            ):
                self.pending = None
                reached = self.connected >= pending["want"]
                emit(
                    **self._status(now),
                    reached=reached,
                    seconds=now - pending["started"],
                )
        # Hang up politely (CONNECTION_CLOSE), as a node that shuts down does.
        now = time.monotonic()
        for slot in self.slots:
            if slot.quic is not None:
                with contextlib.suppress(Exception):
                    slot.quic.close(error_code=0, reason_phrase="bye")
                    self._send(slot, slot.quic, now)
        for sock in self.sockets:
            sock.close()


# --- throughput -------------------------------------------------------------------------------


def _transfer(
    procs: _Processes,
    path: str,
    relayd: _Relayd | None,
    homes: list[Path],
    source: Path,
    sha256: str,
    deadline: Deadline,
) -> dict[str, Any]:
    """One blob A -> B over ``path``; relayd's CPU and relayed bytes over the transfer."""
    relay = relayd.relay_text if relayd is not None else None
    blocked = relayd is not None
    a = procs.child(f"{path}-node-a", "node", home=str(homes[0]), relay=relay, block_direct=blocked)
    a_ready = a.receive(deadline)
    if relayd is not None:
        a.call(deadline, op="relay_connected")
        peer = a_ready["node_id"]  # B knows A's NodeId only
    else:
        peer = f"{a_ready['node_id']}@{_LOOPBACK}:{a_ready['port']}"
    b = procs.child(
        f"{path}-node-b", "node", home=str(homes[1]), relay=relay, peer=peer, block_direct=blocked
    )
    b.receive(deadline)
    a.call(deadline, op="linked")
    b.call(deadline, op="linked")
    relay_before = (relayd.cpu_s(), relayd.metrics()) if relayd is not None else None
    b_before = b.call(deadline, op="mark")
    a_put = a.call(deadline, op="put", path=str(source), key="bench/blob")
    b_done = b.call(deadline, op="wait_blob", key="bench/blob")
    a_after = a.call(deadline, op="mark")
    run: dict[str, Any] = {
        "seconds": b_done["t"] - a_put["t"],
        "node_a_cpu_s": a_after["cpu"] - a_put["cpu"],
        "node_b_cpu_s": b_done["cpu"] - b_before["cpu"],
    }
    if relayd is not None and relay_before is not None:
        cpu_before, metrics_before = relay_before
        metrics_after = relayd.metrics()
        key = "relayd_relayed_bytes_total"
        fast_key = "relayd_fast_path_bytes_forwarded_total"
        run["relayd_cpu_s"] = relayd.cpu_s() - cpu_before
        run["relayed_bytes"] = metrics_after[key] - metrics_before[key]
        run["fast_path_bytes"] = metrics_after[fast_key] - metrics_before[fast_key]
        drops = {
            name.partition('reason="')[2].rstrip('"}'): value - metrics_before.get(name, 0.0)
            for name, value in metrics_after.items()
            if name.startswith("relayd_relay_drops_total{")
        }
        run["relayd_drops"] = {reason: int(n) for reason, n in drops.items() if n}
    a_counters = a.call(deadline, op="paths")
    b_counters = b.call(deadline, op="paths")
    paths = b_counters.pop("paths")
    a_counters.pop("paths")
    # The sender's side tells whether its relay path dropped datagrams locally.
    run["node_a_counters"] = a_counters
    run["node_b_counters"] = b_counters
    want = "relay" if relayd is not None else "direct"
    if paths != [want]:
        raise BenchFailed(f"{path}: B reached A by {paths}, expected [{want!r}]")
    if b.call(deadline, op="digest", key="bench/blob")["sha256"] != sha256:
        raise BenchFailed(f"{path}: B's copy of the blob differs from what A put")
    procs.stop(a)
    procs.stop(b)
    return run


def bench_throughput(
    size_mib: int, rounds: int, workdir: Path, deadline: Deadline, verbose: bool
) -> dict[str, Any]:
    source = workdir / "blob.bin"
    sha256 = random_file(source, size_mib)
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in _THROUGHPUT_PATHS}
    with _Processes(workdir, verbose) as procs:
        relayds = {
            "direct": None,
            "relayed": procs.relayd("relayd-default", deadline),
            "relayed-unthrottled": procs.relayd(
                "relayd-unthrottled", deadline, limits=dict(_UNTHROTTLED_LIMITS)
            ),
            "relayed-stream": procs.relayd("relayd-stream", deadline, limits={"fast_path": False}),
        }
        commands = {name: r.command for name, r in relayds.items() if r is not None}
        peak_rss = 0.0
        for index in range(rounds):
            turn = index % len(_THROUGHPUT_PATHS)
            order = _THROUGHPUT_PATHS[turn:] + _THROUGHPUT_PATHS[:turn]
            for path in order:
                homes = make_homes(workdir / f"round{index}-{path}")
                run = _transfer(procs, path, relayds[path], homes, source, sha256, deadline)
                shutil.rmtree(workdir / f"round{index}-{path}", ignore_errors=True)
                _progress(
                    verbose,
                    f"round {index + 1}/{rounds} {path}: {size_mib * MiB / MB / run['seconds']:.1f}"
                    " MB/s",
                )
                runs[path].append(run)
        for relayd in relayds.values():
            if relayd is not None:
                peak_rss = max(peak_rss, relayd.rss_mib()[1])

    median = {
        path: sorted(done, key=lambda r: r["seconds"])[(len(done) - 1) // 2]
        for path, done in runs.items()
    }
    mb = size_mib * MiB / MB
    report: dict[str, Any] = {"size_mib": size_mib, "rounds": rounds}
    for path in _THROUGHPUT_PATHS:
        name = path.replace("-", "_")
        report[f"{name}_mb_s"] = round(mb / median[path]["seconds"], 1)
    for path in _THROUGHPUT_PATHS[1:]:
        name = path.replace("-", "_")
        run = median[path]
        report[f"{name}_ratio_vs_direct"] = round(median["direct"]["seconds"] / run["seconds"], 3)
        relayed_mb = run["relayed_bytes"] / MB
        report[f"{name}_relayd_cpu_ms_per_relayed_mb"] = round(
            1000 * run["relayd_cpu_s"] / relayed_mb, 2
        )
        report[f"{name}_relayd_cpu_s"] = round(run["relayd_cpu_s"], 2)
        report[f"{name}_relayed_bytes_per_blob_byte"] = round(
            run["relayed_bytes"] / (size_mib * MiB), 3
        )
        report[f"{name}_fast_path_share"] = round(run["fast_path_bytes"] / run["relayed_bytes"], 3)
        report[f"{name}_relayd_drops"] = run["relayd_drops"]
        report[f"{name}_node_a_relay_dropped"] = run["node_a_counters"]["relay_dropped"]
    for path in _THROUGHPUT_PATHS:
        name = path.replace("-", "_")
        run = median[path]
        report[f"{name}_node_a_cpu_s"] = round(run["node_a_cpu_s"], 2)
        report[f"{name}_node_b_cpu_s"] = round(run["node_b_cpu_s"], 2)
        # As bench.py: MB over the CPU seconds of the busiest process on the path --
        # what it would do with a core per process, less distorted by a loaded machine.
        busiest = max(run["node_a_cpu_s"], run["node_b_cpu_s"], run.get("relayd_cpu_s", 0.0))
        report[f"{name}_cpu_bound_mb_s"] = round(mb / busiest, 1)
        if rounds > 1:
            report[f"{name}_seconds_each_round"] = [round(r["seconds"], 2) for r in runs[path]]
    for path in _THROUGHPUT_PATHS[1:]:
        name = path.replace("-", "_")
        if rounds > 1:  # the spread: each round's ratio against that round's direct run
            report[f"{name}_ratio_each_round"] = [
                round(direct["seconds"] / relayed["seconds"], 3)
                for direct, relayed in zip(runs["direct"], runs[path], strict=True)
            ]
        report[f"{name}_cpu_bound_ratio_vs_direct"] = round(
            report[f"{name}_cpu_bound_mb_s"] / report["direct_cpu_bound_mb_s"], 3
        )
    report["relayd_peak_rss_mib_throughput"] = round(peak_rss, 1)
    report["target_ratio_vs_direct"] = TARGET_RATIO_VS_DIRECT
    report["relayed_meets_ratio"] = report["relayed_ratio_vs_direct"] >= TARGET_RATIO_VS_DIRECT
    report["relayed_unthrottled_meets_ratio"] = (
        report["relayed_unthrottled_ratio_vs_direct"] >= TARGET_RATIO_VS_DIRECT
    )
    report["throughput_relayd_commands"] = commands
    return report


# --- idle connections and restart -------------------------------------------------------------


def _source_ips(first: int, count: int) -> list[str]:
    """``count`` loopback addresses 127.X.Y.Z (Z in 1..250), from the ``first``-th on."""
    ips = []
    for n in range(first, first + count):
        block, host = divmod(n, 250)
        ips.append(f"127.{1 + block // 250}.{block % 250}.{host + 1}")
    return ips


def _clients(
    procs: _Processes,
    name: str,
    relayd: _Relayd,
    ips: list[str],
    per_ip: int,
    window: int,
) -> _Child:
    return procs.child(
        name,
        "clients",
        relay_host=relayd.udp[0],
        relay_port=relayd.udp[1],
        relay_node_id=relayd.node_id,
        ips=ips,
        per_ip=per_ip,
        window=window,
        ping_interval=15.0,
    )


def bench_idle(
    target: int,
    step: int,
    budget: float,
    step_timeout_s: float,
    hold: float,
    client_procs: int,
    per_ip: int,
    window: int,
    rss_cap_mib: float,
    workdir: Path,
    deadline: Deadline,
    verbose: bool,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    stopped_because = "target reached"
    with _Processes(workdir, verbose) as procs:
        relayd = procs.relayd("relayd-idle", deadline)
        rss_start = relayd.rss_mib()[0]
        ips_each = -(-target // per_ip) + 4
        clients = [
            _clients(
                procs,
                f"clients-{i}",
                relayd,
                _source_ips(i * ips_each, ips_each),
                per_ip,
                max(1, window // client_procs),
            )
            for i in range(client_procs)
        ]
        started = time.monotonic()
        total = fully_connected = 0
        while total < target:
            left = budget - (time.monotonic() - started)
            if left <= 0:
                stopped_because = f"time budget {budget:.0f}s used"
                break
            add = min(step, target - total)
            shares = [add // client_procs + (i < add % client_procs) for i in range(client_procs)]
            cpu_before, t_before = relayd.cpu_s(), time.monotonic()
            step_timeout = min(left, step_timeout_s, deadline.left())
            for child, share in zip(clients, shares, strict=True):
                child.send(op="open", count=share, timeout=step_timeout)
            replies = [child.receive(deadline) for child in clients]
            seconds = time.monotonic() - t_before
            accept_cpu = relayd.cpu_s() - cpu_before
            total += add
            connected = sum(r["connected"] for r in replies)
            # relayd's CPU while just holding them (pings every 15 s, spread out).
            cpu_idle, t_idle = relayd.cpu_s(), time.monotonic()
            time.sleep(_IDLE_SAMPLE_S)
            idle_percent = 100 * (relayd.cpu_s() - cpu_idle) / (time.monotonic() - t_idle)
            health = relayd.health()
            rss, _ = relayd.rss_mib()
            steps.append(
                {
                    "wanted": total,
                    "clients_connected": connected,
                    "relayd_nodes": health["nodes"],
                    "relayd_connections": health["connections"],
                    "seconds": round(seconds, 2),
                    "accepts_per_s": round(add / seconds, 1),
                    "relayd_cpu_ms_per_accept": round(1000 * accept_cpu / add, 2),
                    "relayd_cpu_percent_idle": round(idle_percent, 1),
                    "relayd_rss_mib": round(rss, 1),
                    "client_failures": sum(r["failures"] for r in replies),
                }
            )
            _progress(verbose, f"ramp: {steps[-1]}")
            if not all(r["reached"] for r in replies):
                stopped_because = (
                    f"step to {total}: only {connected} connected within {step_timeout:.0f}s"
                )
                break
            fully_connected = total
            if rss > rss_cap_mib:
                stopped_because = f"relayd RSS {rss:.0f} MiB passed the cap {rss_cap_mib:.0f}"
                break
        # Hold: longer than a ping interval, so every connection pings at least once.
        _progress(verbose, f"holding for {hold:.0f}s")
        cpu_before, t_before = relayd.cpu_s(), time.monotonic()
        time.sleep(min(hold, max(0.0, deadline.left() - 30)))
        held_seconds = time.monotonic() - t_before
        hold_cpu = relayd.cpu_s() - cpu_before
        health = relayd.health()
        rss, hwm = relayd.rss_mib()
        stats = [child.call(deadline, op="stats") for child in clients]
        command = relayd.command
    held = int(health["nodes"])
    report: dict[str, Any] = {
        "idle_target": target,
        "idle_connections_held": held,
        "idle_last_step_fully_connected": fully_connected,
        "idle_relayd_connections": int(health["connections"]),
        "idle_clients_connected": sum(s["connected"] for s in stats),
        "idle_stopped_because": stopped_because,
        "idle_relayd_rss_mib": round(rss, 1),
        "idle_relayd_peak_rss_mib": round(hwm, 1),
        "idle_relayd_rss_mib_at_start": round(rss_start, 1),
        "idle_relayd_kib_per_connection": (
            round((rss - rss_start) * 1024 / held, 1) if held else None
        ),
        "idle_hold_seconds": round(held_seconds, 1),
        "idle_relayd_cpu_percent_while_holding": round(100 * hold_cpu / held_seconds, 1),
        "idle_client_losses_total": sum(s["losses"] for s in stats),
        "idle_client_failures_total": sum(s["failures"] for s in stats),
        "idle_client_pongs_total": sum(s["pongs"] for s in stats),
        "idle_ramp_seconds": round(sum(s["seconds"] for s in steps), 1),
        "idle_ramp": steps,
        "idle_relayd_command": command,
        "target_idle_connections": TARGET_IDLE_CONNECTIONS,
        "target_relayd_rss_mib": TARGET_RELAYD_RSS_MIB,
        "idle_meets_target": held >= TARGET_IDLE_CONNECTIONS and rss < TARGET_RELAYD_RSS_MIB,
    }
    return report


def bench_restart(
    nodes: int, per_ip: int, window: int, workdir: Path, deadline: Deadline, verbose: bool
) -> dict[str, Any]:
    data_dir = workdir / "relayd-restart-data"
    with _Processes(workdir, verbose) as procs:
        first = procs.relayd("relayd-before-restart", deadline, data_dir=data_dir)
        clients = _clients(
            procs, "clients-restart", first, _source_ips(0, -(-nodes // per_ip)), per_ip, window
        )
        opened = clients.call(deadline, op="open", count=nodes, timeout=min(120, deadline.left()))
        if not opened["reached"]:
            raise BenchFailed(f"restart: only {opened['connected']} of {nodes} connected at first")
        if first.health()["nodes"] != nodes:
            raise BenchFailed(f"restart: relayd counts {first.health()['nodes']} nodes")
        port = first.udp[1]
        _progress(verbose, f"restart: {nodes} connected; SIGTERM relayd")
        t_term = time.monotonic()
        code = first.terminate()
        procs.relayds.remove(first)
        t_exit = time.monotonic()
        second = procs.relayd("relayd-after-restart", deadline, port=port, data_dir=data_dir)
        if second.node_id != first.node_id:
            raise BenchFailed("restart: the relay NodeId changed despite --data")
        clients.send(op="wait", count=nodes, timeout=min(120, deadline.left()))
        # relayd's own count is the figure; poll it while the clients work.
        cpu_ready = second.cpu_s()
        seen: dict[int, float] = {}  # first time relayd counted >= 50%, 90%, 100%
        marks = {50: nodes // 2, 90: nodes * 9 // 10, 100: nodes}
        limit = time.monotonic() + min(120, deadline.left())
        while time.monotonic() < limit and 100 not in seen:
            count = int(second.health()["nodes"])
            now = time.monotonic()
            for percent, want in marks.items():
                if count >= want and percent not in seen:
                    seen[percent] = now
            time.sleep(0.02)
        reaccept_cpu = second.cpu_s() - cpu_ready
        t_all = seen.get(100)
        waited = clients.receive(deadline)
        stats = clients.call(deadline, op="stats")
    return {
        "restart_nodes": nodes,
        "restart_exit_code": code,
        "restart_shutdown_seconds": round(t_exit - t_term, 3),
        "restart_new_relayd_start_seconds": round(second.ready_t - t_exit, 3),
        "restart_reaccept_seconds_from_ready": (
            round(t_all - second.ready_t, 3) if t_all is not None else None
        ),
        "restart_reaccept_seconds_from_sigterm": (
            round(t_all - t_term, 3) if t_all is not None else None
        ),
        **{
            f"restart_{percent}pct_back_seconds_from_ready": round(t - second.ready_t, 3)
            for percent, t in sorted(seen.items())
        },
        "restart_relayd_cpu_s_from_ready_to_all_back": round(reaccept_cpu, 2),
        "restart_all_back": t_all is not None and bool(waited["reached"]),
        "restart_client_reconnect_attempts_failed": stats["failures"],
    }


# --- main -------------------------------------------------------------------------------------


def _child_main(role: str, args: dict[str, Any]) -> int:
    die_with_parent()
    if role == "node":
        import trio

        trio.run(_node_child, args)
    elif role == "clients":
        _LeanClients(args).run()
    else:
        raise SystemExit(f"unknown child role {role!r}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of this benchmark (for ``python -m netsim.bench relay`` too)."""
    parser.add_argument(
        "--only",
        choices=("throughput", "idle", "restart"),
        action="append",
        help="run only this part (repeatable; default: all)",
    )
    parser.add_argument("--size-mib", type=int, default=32, help="blob size (throughput)")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds; medians")
    parser.add_argument("--target", type=int, default=TARGET_IDLE_CONNECTIONS)
    parser.add_argument("--step", type=int, default=500, help="connections added per ramp step")
    parser.add_argument("--idle-budget", type=float, default=300, help="seconds for the ramp")
    parser.add_argument(
        "--step-timeout", type=float, default=90, help="a ramp step not done by then ends it"
    )
    parser.add_argument("--hold", type=float, default=20, help="seconds to hold after the ramp")
    parser.add_argument("--client-procs", type=int, default=1, help="lean client processes")
    parser.add_argument("--per-ip", type=int, default=25, help="connections per source address")
    parser.add_argument("--window", type=int, default=64, help="handshakes in flight (ramp)")
    parser.add_argument("--rss-cap-mib", type=float, default=1536, help="stop the ramp above")
    parser.add_argument("--restart-nodes", type=int, default=500)
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--dir", help="work directory (default: a temp dir, removed)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up after this long")
    parser.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts asked for; the report. Raises BenchFailed."""
    parts = args.only or ["throughput", "idle", "restart"]
    deadline = Deadline(args.timeout)
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="p2psync-bench-relay-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "bench": "relay",
        "cpus": os.cpu_count(),
        "loadavg_1m_start": round(os.getloadavg()[0], 2),
    }
    try:
        if "throughput" in parts:
            _progress(args.verbose, "throughput")
            report.update(
                bench_throughput(args.size_mib, args.rounds, workdir, deadline, args.verbose)
            )
        if "idle" in parts:
            _progress(args.verbose, "idle connections")
            report.update(
                bench_idle(
                    args.target,
                    args.step,
                    args.idle_budget,
                    args.step_timeout,
                    args.hold,
                    args.client_procs,
                    args.per_ip,
                    args.window,
                    args.rss_cap_mib,
                    workdir,
                    deadline,
                    args.verbose,
                )
            )
        if "restart" in parts:
            _progress(args.verbose, "restart")
            report.update(
                bench_restart(
                    args.restart_nodes, args.per_ip, args.window, workdir, deadline, args.verbose
                )
            )
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"] and len(argv) == 3:
        return _child_main(argv[1], json.loads(argv[2]))
    parser = argparse.ArgumentParser(
        prog="python -m netsim.bench_relay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        report = run(args)
    except BenchFailed as exc:
        print(f"bench relay failed: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
