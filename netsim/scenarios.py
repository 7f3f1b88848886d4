"""Scenarios: real p2psync daemons in netsim topologies, synced and measured.

A scenario builds one topology, runs ``relayd`` on a public host and one
``p2psync daemon`` per node host, puts a file on every node and waits,
bounded, until every node lists every other node's key with status ``ok``.
Everything is driven through the command line inside the hosts'
namespaces, as a user would: ``p2psync init``, ``group create``, ``daemon``,
``put``, ``ls --json``, ``get``, ``status --json``. Each node has its own
home in a scratch folder that is removed afterwards; process logs stay in
the run's output folder (``/tmp/netsim-out/<run id>/`` by default).

The scenarios
-------------
``lan-pair``
    Two hosts on one LAN (an ``easy`` site); each daemon gets the other's
    LAN address as a static peer. Expected path: ``lan``.
``pair`` (``a`` and ``b`` NAT kinds)
    Two sites of the given kinds, one host each. Each daemon gets the other
    host's *public* address (its own, for ``none``/``firewall``; its NAT's,
    for translating kinds) and the daemon port as a static peer, and relayd
    as its relay. That address reaches a public host at once; behind a NAT
    it is the wrong port, the dial goes over the relay, and hole punching
    (CALL_ME_MAYBE, and the birthday search against a ``hard`` NAT) moves
    the pair to a direct path where the NATs allow one.
``pair-50ms``
    ``pair`` with 12.5 ms on each site's uplink: 50 ms RTT between the nodes,
    the condition of issue 6's time-to-direct figure.
``lan-relay``
    Two hosts on one LAN behind a hairpinning ``easy`` NAT, b knowing a by
    NodeId only, both on relayd: the path must end ``lan`` (found through
    the relay's lookup, CALL_ME_MAYBE and mDNS), never a hairpin through the
    router's public address.
``direct-break`` (``a`` and ``b``, default ``easy``)
    The pair goes direct; each side puts a 24 MiB file, and once a transfer
    is under way an nft rule on a drops all UDP to and from b's public
    address. The pair must fall back to the relay (notes: how long it took)
    on the same connections, and every byte must arrive.
``relay-upgrade`` (``a`` and ``b``, default ``easy``)
    UDP between the sites is dropped (nft on a), so the pair meets on the
    relay, which relayd holds to :data:`UPGRADE_RELAY_RATE`; a puts a
    24 MiB file, and once b receives it the rule goes. The next punching
    attempt must move the pair to a direct path mid-transfer (notes: how
    long after the rule went), on the same connection, and every byte must
    arrive.
``line-3``
    Three nodes where only neighbours can talk: ``a`` and ``c`` behind two
    separate ``easy`` NATs, ``b`` on a public (``none``) site between them.
    ``a`` and ``c`` have only ``b`` as a static peer and cannot reach each
    other (address-and-port-dependent filtering on both sides, and no
    relay: with one, they would be neighbours), so ``a``'s file reaches
    ``c`` only as a replica on ``b``.
``relay-restart``
    ``hard`` ↔ ``hard`` (no direct path possible) syncing through relayd;
    relayd is stopped and started again (same identity, from ``--data``)
    and a second round of files must still arrive. Without the daemon's
    ``--relay`` flag there is nothing to test: the result says so, with
    ``synced: false``.
``lossy``
    ``easy`` ↔ ``easy`` (kinds may be overridden) with
    :data:`LOSSY_UPLINK` on both uplinks, and smaller files
    (:data:`LOSSY_PAYLOAD_SIZE`) so the sync fits the usual time bound.

Measurements
------------
The clock starts (``t0``) when every daemon has logged ``ready:``; the
files are put right after. For each reported pair, ``t_first_sync_s`` is
when both sides first listed each other's keys as ``ok``, and
``t_direct_s`` when the direct path to the other began (None: never):
the ``path_since`` of either side's ``status`` when it has one; else its
``connected_since``, exact for a connection that was direct from the start
(used only while the pair was never seen on the relay, since an upgraded
connection began before its direct path); else the poll that first saw it;
0 when the path was already up at ``t0``.
``t_first_sync_s`` is sampled by polling the CLI, so its resolution is one
poll round (about 0.3 s per command). After the sync, pairs still on the
relay are watched for up to ``settle_s`` more to catch a relay→direct
upgrade. The final ``path`` of a pair combines both sides'
``status``: ``direct`` if either says direct (``lan`` when both hosts are
on the same site), else ``relay`` if either says relay, else ``none``.
``t_relay_to_direct_s`` is the slower side's ``direct_after_s`` from
``status`` (from its first relayed datagram to its first validated direct
path; None when the pair never used the relay or never went direct) and
``relay_bytes_after_direct`` the sum of both sides' bytes sent through relayd
after that; ``why_not_direct`` a side's ``last_direct_failure`` when the pair
did not end direct. relayd runs with ``--stun-alt-port`` (its port + 1) so
the daemons' netcheck tells easy from hard NAT.
``relayed_bytes`` is relayd's ``relayd_relayed_bytes_total`` counter at the
end (None when relayd did not run or did not answer). Every received file
is fetched with ``get`` and compared byte for byte: ``synced`` means every
node holds every other node's files, intact.

Teardown: daemons and relayd are stopped with SIGTERM (a non-zero exit is
reported in ``notes``), and :func:`netsim.build.build` removes every
process and namespace of the run, also when a scenario raises.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from netsim.build import Network, build
from netsim.errors import CommandFailed, NetsimError, WaitTimeout
from netsim.nat import NatKind
from netsim.procs import Proc, python_module_argv, wait_until
from netsim.topology import LinkConditions, PublicHost, Site, SiteHost, Topology

DAEMON_PORT = 47300
"""Every daemon listens on this UDP port in its own namespace (p2psync's default)."""
RELAY_HOST = "relay"
RELAY_PORT = 3478
RELAY_STUN_ALT_PORT = RELAY_PORT + 1
"""relayd's second STUN port: where the daemons' netcheck looks (their port + 1)."""
RELAY_HTTP_PORT = 8080
DEFAULT_SYNC_TIMEOUT_S = 60.0
"""Longest wait for a scenario's files to arrive everywhere."""
DEFAULT_SETTLE_S = 20.0
"""How long a relayed pair is watched after syncing for an upgrade to direct.

Issue 6 allows easy↔hard up to 20 s to find a direct path."""
READY_TIMEOUT_S = 20.0
"""A daemon or relayd that has not logged its ready line by then is broken."""
CLI_TIMEOUT_S = 20.0
"""One CLI command (init, put, ls, status, get)."""
POLL_PAUSE_S = 0.1
PAYLOAD_SIZE = 1536 * 1024
"""Random bytes per file: one and a half 1 MiB chunks, so objects stream in parts."""
LOSSY_PAYLOAD_SIZE = 256 * 1024
"""Smaller under loss: at ~200 ms RTT and ~4 % loss a transfer moved ~25-35 KB/s each way
(none↔none: 256 KiB both ways in ~11 s, 1.5 MiB in 44-50 s); at the issue's 100 ms and
2 % easy↔easy through the relay, 256 KiB each way synced in ~14 s."""
# Issue 5's lossy link: 100 ms RTT and 2% loss between the two nodes. Each
# packet crosses both uplinks, each way: 4 x 25 ms = 100 ms RTT, and
# 1 - 0.99**2 ~ 2% loss per direction.
LOSSY_UPLINK = LinkConditions(delay_ms=25.0, loss_percent=1.0)

NodeAddress = Callable[[Network, str], IPv4Address | None]
"""Where a daemon finds a static peer; None: by NodeId alone (through the relay)."""
Progress = Callable[[str], None]


class ScenarioError(NetsimError):
    """A scenario could not be set up (a daemon died, a CLI command failed)."""


class PairResult(TypedDict):
    a: str
    b: str
    path: str
    """``lan``, ``direct``, ``relay`` or ``none``."""
    t_first_sync_s: float | None
    t_direct_s: float | None
    t_relay_to_direct_s: NotRequired[float | None]
    """From the first datagram relayed to a validated direct path, both ways (the
    slower side's ``direct_after_s`` in ``status``); None: never relayed, or never direct."""
    relay_bytes_after_direct: NotRequired[int | None]
    """Bytes both sides sent through relayd after their first direct path (``status``)."""
    why_not_direct: NotRequired[str | None]
    """A side's ``last_direct_failure`` when the pair did not end direct."""


class ScenarioResult(TypedDict):
    scenario: str
    params: dict[str, str]
    synced: bool
    pairs: list[PairResult]
    relayed_bytes: int | None
    notes: list[str]
    run_id: str | None
    log_dir: str | None
    wall_s: float


def _quiet(message: str) -> None:
    pass


@dataclass(frozen=True, slots=True)
class ScenarioOptions:
    """Knobs shared by all scenarios; ``a``/``b`` are used by ``pair`` and ``lossy``."""

    a: NatKind = NatKind.EASY
    b: NatKind = NatKind.EASY
    timeout_s: float = DEFAULT_SYNC_TIMEOUT_S
    settle_s: float = DEFAULT_SETTLE_S
    output_base: Path | None = None
    progress: Progress = _quiet


@functools.cache
def daemon_relay_metavar() -> str | None:
    """How ``p2psync daemon --relay`` names its value (``HOST:PORT``...); None: no such flag.

    Read from the daemon's ``--help`` (no network), so the scenarios pick up
    the relay as soon as the daemon grows the flag.
    """
    completed = subprocess.run(
        python_module_argv("p2psync.cli", "daemon", "--help"),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    match = re.search(r"--relay(?![\w-])(?:[ =]([A-Z][A-Z0-9_@:.-]*))?", completed.stdout)
    if match is None:
        return None
    return match.group(1) or "HOST:PORT"


RELAY_MISSING_NOTE = "relay not available: `p2psync daemon` has no --relay flag yet"


@dataclass(slots=True)
class Node:
    """One p2psync device: a host of the topology with its own home."""

    host: str
    home: Path
    node_id: str
    proc: Proc | None = None
    keys: dict[str, str] = field(default_factory=dict)
    """Keys this node put, each with the SHA-256 of its content."""


@dataclass(frozen=True, slots=True)
class _PeerView:
    path: str
    since: float | None
    """Wall-clock time the path (else the connection) began, as ``status`` reports it."""
    since_is_path: bool
    """``since`` is the path's own start (``path_since``), not the connection's."""
    direct_after_s: float | None = None
    relay_bytes_after_direct: int | None = None
    last_direct_failure: str | None = None


@dataclass(slots=True)
class _PairWatch:
    a: str
    b: str
    same_site: bool
    t_first_sync_s: float | None = None
    t_direct_s: float | None = None
    path: str = "none"
    seen_relay: bool = False
    t_relay_to_direct_s: float | None = None
    relay_bytes_after_direct: int | None = None
    why_not_direct: str | None = None


class SyncRun:
    """Nodes and relayd in a built network, driven through their CLIs."""

    def __init__(self, net: Network, scratch: Path, progress: Progress) -> None:
        self.net = net
        self.scratch = scratch
        self.progress = progress
        self.nodes: dict[str, Node] = {}
        self.relay: Proc | None = None
        self.notes: list[str] = []
        self.t0 = time.monotonic()
        self.t0_wall = time.time()

    # --- commands ------------------------------------------------------------------

    def cli(
        self, node: Node, *arguments: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``p2psync --home HOME ARGUMENTS`` in the node's namespace."""
        return self.net.run(
            node.host,
            python_module_argv("p2psync.cli", "--home", str(node.home), *arguments),
            name=f"{node.host}-{arguments[0]}",
            timeout=CLI_TIMEOUT_S,
            check=check,
        )

    def cli_json(self, node: Node, *arguments: str) -> Any:
        """The parsed ``--json`` output of a command; None when it failed."""
        try:
            completed = self.cli(node, *arguments, "--json", check=False)
        except CommandFailed:  # timed out
            return None
        if completed.returncode != 0:
            return None
        try:
            return json.loads(completed.stdout)
        except json.JSONDecodeError:
            return None

    # --- setup ---------------------------------------------------------------------

    def create_nodes(self, hosts: Sequence[str]) -> None:
        """``init`` every node, ``group create`` on the first, its group key copied to the rest.

        Copying ``group.key`` stands in for pairing (``invite``/``join``),
        which would need the joiner to reach the inviter before anything
        else works - the very thing the scenarios measure.
        """
        for host in hosts:
            home = self.scratch / host
            completed = self.cli(Node(host, home, ""), "init", "--name", host, "--json")
            node_id = str(json.loads(completed.stdout)["node_id"])
            self.nodes[host] = Node(host, home, node_id)
        first = self.nodes[hosts[0]]
        self.cli(first, "group", "create", "--json")
        for host in hosts[1:]:
            shutil.copy2(first.home / "group.key", self.nodes[host].home / "group.key")

    def start_relay(self, config_toml: str | None = None) -> None:
        """Start relayd on the relay host; ``config_toml``: a config file's text for it."""
        data = self.scratch / "relay-data"
        data.mkdir(exist_ok=True)
        config: list[str] = []
        if config_toml is not None:
            path = self.scratch / "relayd.toml"
            path.write_text(config_toml)
            config = ["--config", str(path)]
        argv = python_module_argv(
            "relayd",
            *config,
            "--listen",
            f"0.0.0.0:{RELAY_PORT}",
            "--http",
            f"0.0.0.0:{RELAY_HTTP_PORT}",
            "--data",
            str(data),
            "--stun-alt-port",  # netcheck: a second STUN port tells easy from hard NAT
            str(RELAY_STUN_ALT_PORT),
        )
        self.relay = self.net.spawn(RELAY_HOST, argv, name="relayd")
        _wait_for_log(self.relay, "relayd ready", timeout=READY_TIMEOUT_S)

    def stop_relay(self) -> None:
        if self.relay is not None:
            code = self.relay.stop()
            if code != 0:
                self.notes.append(f"relayd exited with {code} on SIGTERM")
            self.relay = None

    def relay_arguments(self) -> list[str]:
        """``--relay VALUE`` for the daemons when both relayd and the flag exist."""
        metavar = daemon_relay_metavar()
        if self.relay is None or metavar is None:
            return []
        address = f"{self.net.address(RELAY_HOST)}:{RELAY_PORT}"
        if "@" in metavar:  # NODEID@HOST:PORT: the relay's identity comes from /health
            health = self.relay_http("/health")
            node_id = json.loads(health).get("relay_node_id") if health else None
            if not node_id:
                raise ScenarioError("relayd /health names no relay_node_id")
            address = f"{node_id}@{address}"
        return ["--relay", address]

    def relay_http(self, path: str) -> str | None:
        """GET ``path`` from relayd's HTTP port, from inside the relay host."""
        code = (
            "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{RELAY_HTTP_PORT}{path}', timeout=5).read().decode())"
        )
        try:
            completed = self.net.run(
                RELAY_HOST, [sys.executable, "-c", code], name="relay-http", check=False
            )
        except CommandFailed:
            return None
        return completed.stdout if completed.returncode == 0 else None

    def relayed_bytes(self) -> int | None:
        metrics = self.relay_http("/metrics")
        if metrics is None:
            return None
        match = re.search(r"^relayd_relayed_bytes_total(?:\{\})? (\S+)$", metrics, re.MULTILINE)
        return int(float(match.group(1))) if match else None

    def start_daemons(self, peers: Mapping[str, Sequence[str]], address_of: NodeAddress) -> None:
        """Start every node's daemon with static peers ``peers[host]`` at ``address_of(peer)``."""
        relay = self.relay_arguments()
        for node in self.nodes.values():
            argv = [
                "--home",
                str(node.home),
                "daemon",
                "--listen",
                f"0.0.0.0:{DAEMON_PORT}",
                *relay,
            ]
            for peer in peers.get(node.host, ()):
                address = address_of(self.net, peer)
                where = "" if address is None else f"@{address}:{DAEMON_PORT}"
                argv += ["--peer", f"{self.nodes[peer].node_id}{where}"]
            node.proc = self.net.spawn(
                node.host, python_module_argv("p2psync.cli", *argv), name=f"{node.host}-daemon"
            )
        for node in self.nodes.values():
            assert node.proc is not None
            _wait_for_log(node.proc, "ready:", timeout=READY_TIMEOUT_S)
        self.t0 = time.monotonic()
        self.t0_wall = time.time()

    def stop_daemons(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None:
                code = node.proc.stop()
                if code != 0:
                    self.notes.append(f"daemon {node.host} exited with {code} on SIGTERM")
                node.proc = None

    # --- files ---------------------------------------------------------------------

    def put_files(self, tag: str, size: int = PAYLOAD_SIZE) -> None:
        """Put one fresh random file of ``size`` bytes on every node under ``<tag>/<host>.bin``."""
        for host in self.nodes:
            self.put_files_on(host, tag, size)

    def put_files_on(self, host: str, tag: str, size: int = PAYLOAD_SIZE) -> None:
        """Put one fresh random file of ``size`` bytes on ``host`` as ``<tag>/<host>.bin``."""
        node = self.nodes[host]
        data = os.urandom(size)
        source = self.scratch / f"{tag}-{node.host}.bin"
        source.write_bytes(data)
        key = f"{tag}/{node.host}.bin"
        self.cli(node, "put", str(source), "--key", key, "--json")
        node.keys[key] = hashlib.sha256(data).hexdigest()

    def ok_keys(self, node: Node) -> set[str] | None:
        rows = self.cli_json(node, "ls")
        if not isinstance(rows, list):
            return None
        return {
            str(row.get("key"))
            for row in rows
            if isinstance(row, dict) and row.get("status") == "ok"
        }

    def verify_contents(self) -> list[str]:
        """Fetch every node's copy of every other node's file; return what is wrong."""
        problems = []
        for node in self.nodes.values():
            for author in self.nodes.values():
                if author is node:
                    continue
                for key, digest in author.keys.items():
                    out = self.scratch / f"check-{node.host}-{key.replace('/', '-')}"
                    completed = self.cli(node, "get", key, "-o", str(out), check=False)
                    if completed.returncode != 0:
                        problems.append(f"{node.host}: get {key} failed: {completed.stderr[-200:]}")
                    elif hashlib.sha256(out.read_bytes()).hexdigest() != digest:
                        problems.append(f"{node.host}: {key} differs from {author.host}'s file")
                    out.unlink(missing_ok=True)
        return problems

    # --- waiting -------------------------------------------------------------------

    def peer_paths(self, node: Node) -> dict[str, _PeerView] | None:
        """``status --json`` of ``node``: NodeId -> what it says of that peer; None: failed."""
        state = self.cli_json(node, "status")
        if not isinstance(state, dict):
            return None
        views = {}
        for peer in state.get("peers", []):
            if not isinstance(peer, dict):
                continue
            since = peer.get("path_since", peer.get("connected_since"))
            traversal = peer.get("traversal") if isinstance(peer.get("traversal"), dict) else {}
            assert isinstance(traversal, dict)
            after = traversal.get("direct_after_s")
            relayed = traversal.get("relay_bytes_after_direct")
            failure = peer.get("last_direct_failure")
            views[str(peer.get("node_id"))] = _PeerView(
                path=str(peer.get("path")),
                since=float(since) if isinstance(since, int | float) else None,
                since_is_path=peer.get("path_since") is not None,
                direct_after_s=float(after) if isinstance(after, int | float) else None,
                relay_bytes_after_direct=int(relayed) if isinstance(relayed, int) else None,
                last_direct_failure=str(failure) if failure else None,
            )
        return views

    def wait_path(
        self, host: str, peer: str, paths: Sequence[str], *, timeout_s: float
    ) -> float | None:
        """Seconds from ``t0`` when ``host``'s status first shows ``peer`` on one of ``paths``."""
        node, other = self.nodes[host], self.nodes[peer]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_daemons_alive()
            views = self.peer_paths(node)
            view = None if views is None else views.get(other.node_id)
            if view is not None and view.path in paths:
                return time.monotonic() - self.t0
            time.sleep(POLL_PAUSE_S)
        self.notes.append(f"{host} never saw {peer} on {'/'.join(paths)} in {timeout_s:g} s")
        return None

    def wait_transfer_started(self, host: str, *, timeout_s: float) -> None:
        """Until ``host``'s status lists an incoming transfer with bytes done."""
        node = self.nodes[host]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.cli_json(node, "status")
            transfers = state.get("transfers") if isinstance(state, dict) else None
            if isinstance(transfers, list) and any(
                isinstance(t, dict) and t.get("bytes_done", 0) > 0 and not t.get("complete")
                for t in transfers
            ):
                return
            time.sleep(POLL_PAUSE_S)
        raise ScenarioError(f"no transfer started on {host} within {timeout_s:g} s")

    def transfer_complete(self, host: str) -> bool:
        """Whether ``host``'s status lists no incoming transfer still under way."""
        state = self.cli_json(self.nodes[host], "status")
        transfers = state.get("transfers") if isinstance(state, dict) else None
        return isinstance(transfers, list) and not any(
            isinstance(t, dict) and not t.get("complete") for t in transfers
        )

    def watch_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[_PairWatch]:
        watches = []
        for a, b in pairs:
            site = self.net.host(a).site
            watches.append(
                _PairWatch(a, b, same_site=site is not None and site == self.net.host(b).site)
            )
        return watches

    def wait_synced(
        self, watches: Sequence[_PairWatch], *, timeout_s: float, settle_s: float
    ) -> bool:
        """Poll until every node has every other node's keys ok; then let relayed pairs settle.

        Records per pair the first sync and first direct times (from ``t0``)
        and the final path. Returns whether everything arrived in time.
        """
        wanted = {
            host: {key for other in self.nodes.values() if other is not node for key in other.keys}
            for host, node in self.nodes.items()
        }
        have: dict[str, set[str]] = {host: set() for host in self.nodes}
        paths: dict[str, dict[str, _PeerView]] = {host: {} for host in self.nodes}
        deadline = time.monotonic() + timeout_s
        synced = False
        settle_deadline: float | None = None
        while True:
            self._check_daemons_alive()
            for host, node in self.nodes.items():
                if not wanted[host] <= have[host]:
                    keys = self.ok_keys(node)
                    if keys is not None:
                        have[host] = keys
            for host, node in self.nodes.items():
                seen = self.peer_paths(node)
                if seen is not None:
                    paths[host] = seen
            now = time.monotonic() - self.t0
            for watch in watches:
                self._update_watch(watch, have, paths, now)
            if not synced and all(wanted[host] <= have[host] for host in self.nodes):
                synced = True
                self.progress(f"synced after {now:.1f} s")
                settle_deadline = time.monotonic() + settle_s
            if synced:
                assert settle_deadline is not None
                relayed = [w for w in watches if w.path == "relay"]
                if not relayed or time.monotonic() >= settle_deadline:
                    return True
            elif time.monotonic() >= deadline:
                missing = {host: sorted(wanted[host] - have[host]) for host in self.nodes}
                self.notes.append(
                    f"not synced after {timeout_s:g} s; missing: "
                    + "; ".join(f"{h}: {', '.join(keys)}" for h, keys in missing.items() if keys)
                )
                return False
            time.sleep(POLL_PAUSE_S)

    def _update_watch(
        self,
        watch: _PairWatch,
        have: Mapping[str, set[str]],
        paths: Mapping[str, Mapping[str, _PeerView]],
        now: float,
    ) -> None:
        node_a, node_b = self.nodes[watch.a], self.nodes[watch.b]
        if (
            watch.t_first_sync_s is None
            and set(node_b.keys) <= have[watch.a]
            and set(node_a.keys) <= have[watch.b]
        ):
            watch.t_first_sync_s = round(now, 2)
        views = [
            view
            for view in (paths[watch.a].get(node_b.node_id), paths[watch.b].get(node_a.node_id))
            if view is not None
        ]
        kinds = {view.path for view in views}
        path = "direct" if kinds & {"direct", "lan"} else "relay" if "relay" in kinds else "none"
        watch.seen_relay = watch.seen_relay or path == "relay"
        if path == "direct" and watch.t_direct_s is None:
            # Prefer the time status gives for the path (sub-second) over our poll time.
            starts = [
                v.since
                for v in views
                if v.path == "direct"
                and v.since is not None
                and (v.since_is_path or not watch.seen_relay)
            ]
            began = min(starts) - self.t0_wall if starts else now
            watch.t_direct_s = round(max(0.0, min(began, now)), 2)
        watch.path = "lan" if path == "direct" and watch.same_site else path
        afters = [v.direct_after_s for v in views if v.direct_after_s is not None]
        if path == "direct" and afters:
            watch.t_relay_to_direct_s = round(max(afters), 3)
        relayed = [
            v.relay_bytes_after_direct for v in views if v.relay_bytes_after_direct is not None
        ]
        if relayed:
            watch.relay_bytes_after_direct = sum(relayed)
        failures = [v.last_direct_failure for v in views if v.last_direct_failure]
        watch.why_not_direct = failures[0] if failures and path != "direct" else None

    def _check_daemons_alive(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and not node.proc.running:
                tail = node.proc.stderr_text()[-1500:]
                raise ScenarioError(
                    f"daemon {node.host} exited with {node.proc.returncode}; stderr tail:\n{tail}"
                )


def _wait_for_log(proc: Proc, text: str, *, timeout: float) -> None:
    """Wait until ``text`` appears in the process's stderr (where p2psync and relayd log)."""

    def logged() -> bool:
        if text in proc.stderr_text():
            return True
        if not proc.running:
            tail = proc.stderr_text()[-1500:]
            raise ScenarioError(
                f"{proc.name} exited with {proc.returncode} before logging {text!r}:\n{tail}"
            )
        return False

    try:
        wait_until(logged, timeout=timeout, what=f"{proc.name} logging {text!r}")
    except WaitTimeout as exc:
        raise ScenarioError(str(exc)) from None


@contextlib.contextmanager
def _scratch() -> Iterator[Path]:
    """A short private folder for homes and files (control sockets need short paths)."""
    path = Path(tempfile.mkdtemp(prefix="netsim-homes-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _result(
    name: str,
    params: Mapping[str, str],
    *,
    synced: bool,
    watches: Sequence[_PairWatch] = (),
    relayed_bytes: int | None = None,
    notes: Sequence[str] = (),
    net: Network | None = None,
    started: float,
) -> ScenarioResult:
    return ScenarioResult(
        scenario=name,
        params=dict(params),
        synced=synced,
        pairs=[
            PairResult(
                a=w.a,
                b=w.b,
                path=w.path,
                t_first_sync_s=w.t_first_sync_s,
                t_direct_s=w.t_direct_s,
                t_relay_to_direct_s=w.t_relay_to_direct_s,
                relay_bytes_after_direct=w.relay_bytes_after_direct,
                why_not_direct=w.why_not_direct,
            )
            for w in watches
        ],
        relayed_bytes=relayed_bytes,
        notes=list(notes),
        run_id=net.run_id if net is not None else None,
        log_dir=str(net.output_dir) if net is not None else None,
        wall_s=round(time.monotonic() - started, 1),
    )


def _sync_scenario(
    name: str,
    params: Mapping[str, str],
    topology: Topology,
    options: ScenarioOptions,
    *,
    hosts: Sequence[str],
    peers: Mapping[str, Sequence[str]],
    address_of: NodeAddress,
    pairs: Sequence[tuple[str, str]],
    use_relay: bool = True,
    notes: Sequence[str] = (),
    payload_size: int = PAYLOAD_SIZE,
) -> ScenarioResult:
    """The common shape: build, start relayd and daemons, put, wait, measure, tear down."""
    started = time.monotonic()
    all_notes = list(notes)
    if use_relay and daemon_relay_metavar() is None:
        all_notes.append(
            f"{RELAY_MISSING_NOTE}: only a peer with a reachable public address can be reached"
        )
    progress = options.progress
    with _scratch() as scratch, build(topology, output_base=options.output_base) as net:
        progress(f"{name}: built run {net.run_id} (logs in {net.output_dir})")
        run = SyncRun(net, scratch, progress)
        synced = False
        watches = run.watch_pairs(pairs)
        relayed: int | None = None
        try:
            run.create_nodes(hosts)
            if use_relay:
                run.start_relay()
            run.start_daemons(peers, address_of)
            progress(f"{name}: {len(hosts)} daemons ready, putting files")
            run.put_files("first", payload_size)
            synced = run.wait_synced(
                watches, timeout_s=options.timeout_s, settle_s=options.settle_s
            )
            if synced:
                problems = run.verify_contents()
                run.notes += problems
                synced = not problems
            relayed = run.relayed_bytes() if use_relay else None
        except NetsimError as exc:
            run.notes.append(f"scenario failed: {exc}")
            synced = False
        finally:
            run.stop_daemons()
            run.stop_relay()
        return _result(
            name,
            params,
            synced=synced,
            watches=watches,
            relayed_bytes=relayed,
            notes=all_notes + run.notes,
            net=net,
            started=started,
        )


# --- the scenarios ---------------------------------------------------------------------


def _public(net: Network, host: str) -> IPv4Address:
    return net.public_address(host)


def _local(net: Network, host: str) -> IPv4Address:
    return net.address(host)


def lan_pair(options: ScenarioOptions) -> ScenarioResult:
    """Two hosts on one LAN, static peers at each other's LAN address: path ``lan``."""
    topology = Topology(
        public_hosts=(PublicHost(RELAY_HOST),),
        sites=(Site("home", NatKind.EASY, hosts=(SiteHost("a"), SiteHost("b"))),),
    )
    return _sync_scenario(
        "lan-pair",
        {},
        topology,
        options,
        hosts=("a", "b"),
        peers={"a": ("b",), "b": ("a",)},
        address_of=_local,
        pairs=(("a", "b"),),
    )


def _two_sites(kind_a: NatKind, kind_b: NatKind, uplink: LinkConditions | None = None) -> Topology:
    return Topology(
        public_hosts=(PublicHost(RELAY_HOST),),
        sites=(
            Site("site-a", kind_a, hosts=(SiteHost("a"),), uplink=uplink),
            Site("site-b", kind_b, hosts=(SiteHost("b"),), uplink=uplink),
        ),
    )


def pair(options: ScenarioOptions) -> ScenarioResult:
    """Two sites of NAT kinds ``options.a`` and ``options.b``; static peers at public addresses."""
    return _sync_scenario(
        "pair",
        {"a": str(options.a), "b": str(options.b)},
        _two_sites(options.a, options.b),
        options,
        hosts=("a", "b"),
        peers={"a": ("b",), "b": ("a",)},
        address_of=_public,
        pairs=(("a", "b"),),
    )


# Issue 6's RTT for the time-to-direct figure: 4 x 12.5 ms = 50 ms between the nodes.
RTT50_UPLINK = LinkConditions(delay_ms=12.5)


def pair_50ms(options: ScenarioOptions) -> ScenarioResult:
    """``pair`` with 50 ms RTT between the nodes (:data:`RTT50_UPLINK` on both uplinks)."""
    return _sync_scenario(
        "pair-50ms",
        {"a": str(options.a), "b": str(options.b), "rtt": "50 ms"},
        _two_sites(options.a, options.b, uplink=RTT50_UPLINK),
        options,
        hosts=("a", "b"),
        peers={"a": ("b",), "b": ("a",)},
        address_of=_public,
        pairs=(("a", "b"),),
    )


def lossy(options: ScenarioOptions) -> ScenarioResult:
    """``pair`` with :data:`LOSSY_UPLINK` on both sites' uplinks (easy↔easy by default)."""
    conditions = LOSSY_UPLINK
    return _sync_scenario(
        "lossy",
        {
            "a": str(options.a),
            "b": str(options.b),
            "uplink": f"delay {conditions.delay_ms:g} ms, loss {conditions.loss_percent:g} %",
        },
        _two_sites(options.a, options.b, uplink=conditions),
        options,
        hosts=("a", "b"),
        peers={"a": ("b",), "b": ("a",)},
        address_of=_public,
        pairs=(("a", "b"),),
        payload_size=LOSSY_PAYLOAD_SIZE,
    )


def line_3(options: ScenarioOptions) -> ScenarioResult:
    """a - b - c: a and c behind separate easy NATs, each knowing only the public b."""
    topology = Topology(
        sites=(
            Site("site-a", NatKind.EASY, hosts=(SiteHost("a"),)),
            Site("site-b", NatKind.NONE, hosts=(SiteHost("b"),)),
            Site("site-c", NatKind.EASY, hosts=(SiteHost("c"),)),
        ),
    )
    return _sync_scenario(
        "line-3",
        {},
        topology,
        options,
        hosts=("a", "b", "c"),
        peers={"a": ("b",), "c": ("b",)},
        address_of=_public,
        pairs=(("a", "b"), ("b", "c"), ("a", "c")),
        use_relay=False,
        notes=("no relay on purpose: with one, a and c would be neighbours",),
    )


def relay_restart(options: ScenarioOptions) -> ScenarioResult:
    """hard↔hard through relayd; relayd restarts; a second round of files must still sync."""
    started = time.monotonic()
    params = {"a": str(NatKind.HARD), "b": str(NatKind.HARD)}
    if daemon_relay_metavar() is None:
        return _result(
            "relay-restart",
            params,
            synced=False,
            notes=[f"{RELAY_MISSING_NOTE}: nothing to restart"],
            started=started,
        )
    progress = options.progress
    topology = _two_sites(NatKind.HARD, NatKind.HARD)
    with _scratch() as scratch, build(topology, output_base=options.output_base) as net:
        progress(f"relay-restart: built run {net.run_id} (logs in {net.output_dir})")
        run = SyncRun(net, scratch, progress)
        watches = run.watch_pairs((("a", "b"),))
        synced = False
        relayed: int | None = None
        try:
            run.create_nodes(("a", "b"))
            run.start_relay()
            run.start_daemons({"a": ("b",), "b": ("a",)}, _public)
            run.put_files("first")
            synced = run.wait_synced(watches, timeout_s=options.timeout_s, settle_s=0)
            if synced:
                before = run.relayed_bytes()
                progress("relay-restart: first round synced, restarting relayd")
                run.stop_relay()
                run.start_relay()
                restarted = time.monotonic()
                run.put_files("second")
                second = run.watch_pairs((("a", "b"),))
                synced = run.wait_synced(second, timeout_s=options.timeout_s, settle_s=0)
                run.notes.append(
                    f"second round after the relay restart: synced={synced} in "
                    f"{time.monotonic() - restarted:.1f} s, path {second[0].path}; "
                    f"relayed bytes before the restart: {before}"
                )
            if synced:
                problems = run.verify_contents()
                run.notes += problems
                synced = not problems
            relayed = run.relayed_bytes()
        except NetsimError as exc:
            run.notes.append(f"scenario failed: {exc}")
            synced = False
        finally:
            run.stop_daemons()
            run.stop_relay()
        return _result(
            "relay-restart",
            params,
            synced=synced,
            watches=watches,
            relayed_bytes=relayed,
            notes=run.notes,
            net=net,
            started=started,
        )


def _by_node_id(net: Network, host: str) -> IPv4Address | None:
    return None


def lan_relay(options: ScenarioOptions) -> ScenarioResult:
    """Two hosts on one LAN behind a hairpinning NAT, peers known by NodeId only, a relay.

    They find each other through relayd and CALL_ME_MAYBE (and mDNS); the
    path must end on the LAN: not the relay, not a hairpin through the
    router's public address (LAN first, paths.py).
    """
    topology = Topology(
        public_hosts=(PublicHost(RELAY_HOST),),
        sites=(Site("home", NatKind.EASY, hosts=(SiteHost("a"), SiteHost("b")), hairpin=True),),
    )
    return _sync_scenario(
        "lan-relay",
        {"hairpin": "on"},
        topology,
        options,
        hosts=("a", "b"),
        peers={"b": ("a",)},
        address_of=_by_node_id,
        pairs=(("a", "b"),),
    )


BREAK_PAYLOAD_SIZE = 24 * 1024 * 1024
"""The file each side puts in ``direct-break``: big enough to be mid-transfer at the break."""
BREAK_TABLE = "p2ps_break"


def _block_udp(net: Network, host: str, peer: str) -> None:
    """An nft table on ``host`` that drops all UDP to and from ``peer``'s public address
    (the relay, on another address, still gets through)."""
    peer_ip = net.public_address(peer)
    net.run(
        host,
        ["nft", "-f", "-"],
        name="block-direct",
        input_text=(
            f"table inet {BREAK_TABLE} {{\n"
            "  chain out { type filter hook output priority 0; policy accept;\n"
            f"    ip daddr {peer_ip} meta l4proto udp drop\n  }}\n"
            "  chain in { type filter hook input priority 0; policy accept;\n"
            f"    ip saddr {peer_ip} meta l4proto udp drop\n  }}\n"
            "}\n"
        ),
    )


def _unblock_udp(net: Network, host: str) -> None:
    net.run(host, ["nft", "delete", "table", "inet", BREAK_TABLE], name="unblock-direct")


def _mid_transfer_scenario(
    name: str,
    params: Mapping[str, str],
    options: ScenarioOptions,
    steps: Callable[[SyncRun, Network], None],
) -> ScenarioResult:
    """Two sites, nodes a and b; ``steps`` starts relayd and the daemons and changes the
    network mid-transfer; then every file must arrive intact (the shape of
    ``direct-break`` and ``relay-upgrade``)."""
    started = time.monotonic()
    topology = _two_sites(options.a, options.b)
    with _scratch() as scratch, build(topology, output_base=options.output_base) as net:
        options.progress(f"{name}: built run {net.run_id} (logs in {net.output_dir})")
        run = SyncRun(net, scratch, options.progress)
        watches = run.watch_pairs((("a", "b"),))
        synced = False
        relayed: int | None = None
        try:
            run.create_nodes(("a", "b"))
            steps(run, net)
            synced = run.wait_synced(watches, timeout_s=options.timeout_s, settle_s=0)
            if synced:
                problems = run.verify_contents()
                run.notes += problems
                synced = not problems
            relayed = run.relayed_bytes()
        except NetsimError as exc:
            run.notes.append(f"scenario failed: {exc}")
            synced = False
        finally:
            run.stop_daemons()
            run.stop_relay()
        return _result(
            name,
            params,
            synced=synced,
            watches=watches,
            relayed_bytes=relayed,
            notes=run.notes,
            net=net,
            started=started,
        )


def direct_break(options: ScenarioOptions) -> ScenarioResult:
    """``easy`` ↔ ``easy`` go direct; mid-transfer an nft rule on a drops all UDP between
    a and b's public address. The pair must fall back to the relay within seconds (the
    heartbeat's missed pongs) on the same connections, and the transfer must complete."""

    def steps(run: SyncRun, net: Network) -> None:
        run.start_relay()
        run.start_daemons({"a": ("b",), "b": ("a",)}, _public)
        direct_at = run.wait_path("a", "b", ("direct",), timeout_s=options.timeout_s)
        if direct_at is None:
            raise ScenarioError("the pair never went direct before the break")
        run.put_files("big", BREAK_PAYLOAD_SIZE)
        run.wait_transfer_started("b", timeout_s=options.timeout_s)
        broke = time.monotonic() - run.t0
        _block_udp(net, "a", "b")
        options.progress(f"direct-break: direct path dropped at {broke:.1f} s")
        relay_at = run.wait_path("a", "b", ("relay",), timeout_s=options.timeout_s)
        if relay_at is not None:
            run.notes.append(
                f"direct at {direct_at:.1f} s; dropped at {broke:.1f} s; on the relay "
                f"{relay_at - broke:.1f} s later"
            )

    params = {"a": str(options.a), "b": str(options.b), "file": f"{BREAK_PAYLOAD_SIZE >> 20} MiB"}
    return _mid_transfer_scenario("direct-break", params, options, steps)


UPGRADE_PAYLOAD_SIZE = 24 * 1024 * 1024
"""The file ``a`` puts in ``relay-upgrade``."""
UPGRADE_RELAY_RATE = 1024 * 1024
"""relayd's per-node byte rate (and burst) in ``relay-upgrade``: the relayed part of the
transfer takes ~20 s, so the upgrade is sure to land mid-transfer, whatever the CPU."""


def relay_upgrade(options: ScenarioOptions) -> ScenarioResult:
    """``easy`` ↔ ``easy`` with UDP between the sites dropped (nft on a): the pair starts on
    the relay (held to :data:`UPGRADE_RELAY_RATE`) and a 24 MiB transfer from a begins
    there; then the drop rule goes. The next punching attempt must move the same
    connection to a direct path mid-transfer, and every byte must arrive."""

    def steps(run: SyncRun, net: Network) -> None:
        run.start_relay(
            "[limits]\n"
            f"bytes_per_second = {UPGRADE_RELAY_RATE}\n"
            f"byte_burst = {UPGRADE_RELAY_RATE}\n"
        )
        _block_udp(net, "a", "b")
        run.start_daemons({"a": ("b",), "b": ("a",)}, _public)
        if run.wait_path("a", "b", ("relay",), timeout_s=options.timeout_s) is None:
            raise ScenarioError("the pair never met on the relay")
        run.put_files_on("a", "big", UPGRADE_PAYLOAD_SIZE)
        run.wait_transfer_started("b", timeout_s=options.timeout_s)
        opened = time.monotonic() - run.t0
        _unblock_udp(net, "a")
        options.progress(f"relay-upgrade: direct UDP allowed at {opened:.1f} s, mid-transfer")
        direct_at = run.wait_path("a", "b", ("direct",), timeout_s=options.timeout_s)
        if direct_at is not None:
            late = " (after the transfer had finished)" if run.transfer_complete("b") else ""
            run.notes.append(
                f"allowed at {opened:.1f} s; direct {direct_at - opened:.1f} s later{late}"
            )

    params = {
        "a": str(options.a),
        "b": str(options.b),
        "file": f"{UPGRADE_PAYLOAD_SIZE >> 20} MiB",
        "relay rate": f"{UPGRADE_RELAY_RATE >> 20} MiB/s",
    }
    return _mid_transfer_scenario("relay-upgrade", params, options, steps)


def _mailbox(options: ScenarioOptions) -> ScenarioResult:
    """:func:`netsim.scenario_mailbox.mailbox` (imported here: that module builds on this one)."""
    from netsim.scenario_mailbox import mailbox

    return mailbox(options)


SCENARIOS: dict[str, Callable[[ScenarioOptions], ScenarioResult]] = {
    "lan-pair": lan_pair,
    "pair": pair,
    "line-3": line_3,
    "relay-restart": relay_restart,
    "lossy": lossy,
    "pair-50ms": pair_50ms,
    "lan-relay": lan_relay,
    "direct-break": direct_break,
    "relay-upgrade": relay_upgrade,
    "mailbox": _mailbox,
}
"""Every scenario by its command-line name."""


def run_scenario(name: str, options: ScenarioOptions) -> ScenarioResult:
    """Run scenario ``name``; setup errors become ``synced: false`` with a note."""
    scenario = SCENARIOS[name]
    started = time.monotonic()
    try:
        return scenario(options)
    except NetsimError as exc:
        return _result(name, {}, synced=False, notes=[f"scenario failed: {exc}"], started=started)


def format_report(result: ScenarioResult) -> str:
    """A few readable lines about one scenario's outcome."""
    params = " ".join(f"{key}={value}" for key, value in result["params"].items())
    head = f"scenario {result['scenario']}" + (f" ({params})" if params else "")
    lines = [f"{head}: {'SYNCED' if result['synced'] else 'NOT SYNCED'} in {result['wall_s']} s"]
    if result["pairs"]:
        lines.append(
            f"  {'pair':<8} {'path':<7} {'first sync':>10} {'direct after':>12} "
            f"{'relay->direct':>13} {'relayed after direct':>20}"
        )
        for entry in result["pairs"]:
            after = entry.get("relay_bytes_after_direct")
            lines.append(
                f"  {entry['a'] + '-' + entry['b']:<8} {entry['path']:<7} "
                f"{_seconds(entry['t_first_sync_s']):>10} {_seconds(entry['t_direct_s']):>12} "
                f"{_seconds(entry.get('t_relay_to_direct_s')):>13} "
                f"{'-' if after is None else after:>20}"
            )
            if entry.get("why_not_direct"):
                lines.append(f"    not direct: {entry['why_not_direct']}")
    relayed = result["relayed_bytes"]
    lines.append(f"  relayed bytes: {'-' if relayed is None else relayed}")
    for note in result["notes"]:
        lines.append(f"  note: {note}")
    if result["log_dir"]:
        lines.append(f"  logs: {result['log_dir']}")
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"
