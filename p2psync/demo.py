"""``p2psync demo``: a guided tour a newcomer can read.

In a throw-away directory, on loopback: one relayd (what an operator runs on
a VPS) and three devices — a laptop, a phone and a tablet — each with its own
home, driven through the library API (:mod:`p2psync.library`, and the
:class:`~p2psync.node.Node` methods ``put``, ``get``, ``pull``,
``subscribe``, ``delete``, ``peers``) exactly as an app would; each step
prints the CLI command that does the same.

1. The laptop starts a group and offers a 16-character short code; the
   phone joins with it through relayd (the relay holds only a ticket sealed
   under the code, which it never sees whole); the tablet joins through the
   phone with a code of the phone's, and is told the laptop's NodeId as a
   peer (``daemon --peer NODEID``: reached through the relay, then directly).
2. The path each of the three pairs uses (``direct`` or ``relay``), and
   whether it changed on the way.
3. A note and a 20 MiB file put on the laptop arrive on the other two:
   each receiver follows its ``subscribe`` stream and reads the values.
4. The note is deleted: the tombstone arrives on the others as a ``delete``
   change of their ``subscribe`` stream.
5. Every file of the three homes and of relayd's data directory is searched
   for the plaintext: only ciphertext is stored.

Everything is then stopped; the exit code is 0 if every step held: a pair
that never connected is a failure (the sync still goes through the third
device), and a step that does not finish within ``STEP_TIMEOUT`` ends the
tour with one ``FAILED`` line and exit code 1 (no traceback).
``--keep`` leaves the homes for exploring.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from p2psync import library
from p2psync.api import NodeEvent, PathChanged, PeerConnected
from p2psync.errors import NotFound
from p2psync.home import Home
from p2psync.node import Node, open_node
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses, serve

NOTE_KEY = "notes/today.txt"
NOTE = b"Meet at the lighthouse at seven. Bring the blue notebook.\n"
CLIP_KEY = "videos/clip.bin"
BIG_FILE_SIZE = 20 * 1024 * 1024
NAMES = ("laptop", "phone", "tablet")
PAIRS = (("laptop", "phone"), ("phone", "tablet"), ("laptop", "tablet"))
STEP_TIMEOUT = 120.0  # generous: a loaded 2-core machine is slow, never this slow
CONNECT_TIMEOUT = 30.0  # a pair not connected by then is reported, with why


def _say(text: str = "") -> None:
    print(text, flush=True)


class _StepTimedOut(Exception):
    """A step of the tour did not finish in time (reported in one line, not a traceback)."""


def _files_containing(roots: list[Path], needle: bytes) -> list[Path]:
    return [
        p for root in roots for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()
    ]


@dataclass
class _Paths:
    """What one node's status events said about each peer's path (for the path table)."""

    first: dict[str, str] = field(default_factory=dict)  # node_id -> path when it connected
    changes: dict[str, list[str]] = field(default_factory=dict)  # node_id -> later paths

    def note(self, event: NodeEvent) -> None:
        if isinstance(event, PeerConnected):
            self.first.setdefault(event.node_id, event.path)
        elif isinstance(event, PathChanged):
            self.changes.setdefault(event.node_id, []).append(event.path)


async def _record_paths(node: Node, paths: _Paths, *, task_status: trio.TaskStatus[None]) -> None:
    async with node.events() as events:
        task_status.started()
        async for event in events:
            paths.note(event)


@asynccontextmanager
async def _relayd(data: Path) -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(
        listen=HostPort("127.0.0.1", 0), http=HostPort("127.0.0.1", 0), data_dir=str(data)
    )
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


class _Tour:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.files = workdir / "files"  # the user's own (plaintext) files, outside the homes
        self.homes: dict[str, Home] = {}
        self.nodes: dict[str, Node] = {}
        self.paths: dict[str, _Paths] = {name: _Paths() for name in NAMES}
        self.ok = True
        self.big = b""  # the 20 MiB file's content, once written
        self.timed_out: str | None = None  # the step that ran out of time, if one did

    @contextmanager
    def deadline(self, step: str) -> Iterator[None]:
        """``trio.fail_after(STEP_TIMEOUT)`` that records which step ran out of time."""
        try:
            with trio.fail_after(STEP_TIMEOUT):
                yield
        except trio.TooSlowError:
            self.timed_out = f"{step} did not finish within {STEP_TIMEOUT:g}s"
            raise _StepTimedOut(self.timed_out) from None

    def fail(self, why: str) -> None:
        self.ok = False
        _say(f"FAILED: {why}")

    async def run(self) -> int:
        self.files.mkdir()
        for name in NAMES:
            self.homes[name] = library.init(self.workdir / name, name=name)
        group = library.create_group(self.homes["laptop"])
        _say("p2psync demo: a relay and three devices pair and sync, end-to-end encrypted.")
        _say(f"Everything runs in this process, on loopback, under {self.workdir}")
        _say()
        try:
            async with _relayd(self.workdir / "relayd") as relay, trio.open_nursery() as nursery:
                relay_text = f"{relay.node_id}@{relay.udp[0]}:{relay.udp[1]}"
                _say(f"  relayd  {relay.node_id} on udp {relay.udp[0]}:{relay.udp[1]}")
                _say("          (RELAY below: its NODEID@HOST:PORT, what devices are told)")
                for name in NAMES:
                    _say(f"  {name:<7} {self.homes[name].load_identity().node_id}")
                _say(f"  group   {group} (created on the laptop: p2psync group create)")
                with self.deadline("pairing"):
                    await self.pair(relay_text, nursery)
                before = await self.show_paths()
                await self.sync()
                self.paths_after(before)
                await self.delete()
                nursery.cancel_scope.cancel()  # stops the three nodes
        except* _StepTimedOut:
            pass  # the nodes and relayd are stopped; self.timed_out names the step
        if self.timed_out is not None:
            self.fail(f"{self.timed_out} (a slow or overloaded machine?); the tour stopped there")
            return 1
        self.search_disk()
        _say()
        _say("Stopped the three devices and relayd.")
        if not self.ok:
            _say("Some step FAILED (see above).")
        return 0 if self.ok else 1

    async def start(self, name: str, relay: str, nursery: trio.Nursery, *peers: str) -> Node:
        """Run ``name``'s node as ``p2psync daemon`` would (loopback, no mDNS, no socket)."""
        options = library.options_from_config(
            self.homes[name], listen="127.0.0.1:0", peers=peers, relay=relay
        )

        async def run(*, task_status: trio.TaskStatus[Node]) -> None:
            async with open_node(self.homes[name], options) as node:
                await nursery.start(_record_paths, node, self.paths[name])
                task_status.started(node)
                await trio.sleep_forever()

        self.nodes[name] = await nursery.start(run)
        return self.nodes[name]

    # --- 1. pairing ---------------------------------------------------------------

    async def pair(self, relay: str, nursery: trio.Nursery) -> None:
        _say()
        _say("1. Pairing with short codes (each device: p2psync daemon --relay RELAY)")
        for inviter, joiner in (("laptop", "phone"), ("phone", "tablet")):
            node = self.nodes.get(inviter) or await self.start(inviter, relay, nursery)
            offer = await node.create_short_invite(600, lan=False)
            _say(f"{inviter:<6}$ p2psync invite --short        -> {offer.code}")
            joined = await library.join_group(
                self.homes[joiner], offer.code, joiner, relay=relay, lan=False
            )
            how = "directly" if joined.via == "direct" else "through the relay"
            _say(f"{joiner:<6}$ p2psync join {offer.code} --relay RELAY --no-mdns"
                 f"  -> joined, handshake {how}")  # fmt: skip
            if inviter == "laptop":
                _say("         (relayd held the ticket sealed under the code's first half; the")
                _say("          second half, which relayd never saw, opens it: only the phone can)")
        laptop_id = str(self.nodes["laptop"].node_id)
        await self.start("tablet", relay, nursery, laptop_id)
        _say(f"tablet$ p2psync daemon --peer {laptop_id[:16]}…")
        _say("         (joined through the phone, the tablet is told the laptop's NodeId:")
        _say("          without an address it is reached through relayd, then directly)")

    # --- 2. paths -----------------------------------------------------------------

    def _peer(self, name: str, other: str) -> tuple[bool, str, str | None, str | None]:
        their_id = str(self.nodes[other].node_id)
        for peer in self.nodes[name].peers():
            if peer.node_id == their_id:
                return peer.connected, peer.path, peer.address, peer.last_error
        return False, "none", None, None

    def _path_table(self) -> list[tuple[str, str, str]]:
        return [(a, b, self._peer(a, b)[1]) for a, b in PAIRS]

    def paths_after(self, before: list[tuple[str, str, str]]) -> None:
        after = self._path_table()
        if after == before:
            _say("(all three pairs kept those paths during the transfers)")
            return
        for (a, b, was), (_, _, now) in zip(before, after, strict=True):
            if was != now:
                _say(f"(path {a} <-> {b} changed during the transfers: {was} -> {now})")

    async def show_paths(self) -> list[tuple[str, str, str]]:
        _say()
        _say("2. Connections: the path each pair uses (p2psync status)")
        with trio.move_on_after(CONNECT_TIMEOUT):
            while not all(self._peer(a, b)[0] for a, b in PAIRS):  # noqa: ASYNC110 -- status
                await trio.sleep(0.05)
        with trio.move_on_after(3.0):  # give a relayed pair a moment to find its direct path
            while any(self._peer(a, b)[1] == "relay" for a, b in PAIRS):  # noqa: ASYNC110
                await trio.sleep(0.05)
        for a, b in PAIRS:
            connected, path, address, error = self._peer(a, b)
            label = f"  {a:<6} <-> {b:<6}"
            if not connected:
                why = error or "no connection yet; neither found the other's address"
                _say(f"{label} not connected after {CONNECT_TIMEOUT:.0f}s: {why}")
                _say("                     what one writes reaches the other through the third")
                self.fail(f"{a} and {b} never connected")
                continue
            where = f" {address}" if address and path != "relay" else ""
            meaning = "(UDP between the two)" if path != "relay" else "(through relayd)"
            history = self._history(a, b, path)
            _say(f"{label} {path}{where} {meaning}{history}")
        return self._path_table()

    def _history(self, a: str, b: str, now: str) -> str:
        their_id = str(self.nodes[b].node_id)
        seen = self.paths[a]
        first = seen.first.get(their_id)
        steps = [p for p in [first, *seen.changes.get(their_id, [])] if p is not None]
        if len(steps) > 1 or (steps and steps[0] != now):
            return "; path so far: " + " -> ".join(steps)
        return ""

    # --- 3. sync ------------------------------------------------------------------

    async def _cursor(self, node: Node) -> int:
        """The cursor of the last change ``node`` holds: follow changes after it."""
        page = await node.pull(after=0)
        while page.more:
            page = await node.pull(after=page.cursor)
        return page.cursor

    async def _arrival(self, name: str, key: str, after: int, copy: Path | None) -> bytes:
        """Follow ``name``'s changes after ``after`` until ``key`` is put; read its value."""
        node = self.nodes[name]
        async for change in node.subscribe(after=after):
            if change.kind == "put" and change.key == key:
                break
        if copy is None:
            return await node.get(key, wait=True)  # small: whole
        await node.get_to_path(key, copy, wait=True)  # streamed to a file
        return await trio.Path(copy).read_bytes()

    async def _put_and_follow(self, key: str, value: bytes, show: str, copy: bool) -> None:
        """Put ``key`` on the laptop; time its arrival (value read back) on the others."""
        receivers = ("phone", "tablet")
        cursors = {name: await self._cursor(self.nodes[name]) for name in receivers}
        arrived: dict[str, tuple[float, bool]] = {}

        async def follow(name: str, start: float) -> None:
            out = self.files / f"{Path(key).name}-on-{name}" if copy else None
            got = await self._arrival(name, key, cursors[name], out)
            arrived[name] = (time.monotonic() - start, got == value)

        with self.deadline(f"syncing {key}"):
            async with trio.open_nursery() as nursery:
                start = time.monotonic()
                for name in receivers:
                    nursery.start_soon(follow, name, start)
                if copy:
                    source = self.files / Path(key).name
                    await trio.Path(source).write_bytes(value)
                    await self.nodes["laptop"].put(source, key=key)  # streamed from the file
                else:
                    await self.nodes["laptop"].put(value, key=key, content_type="text/plain")
                _say(show)
        read = f"p2psync get {key} -o {Path(key).name}" if copy else f"p2psync get {key}"
        for name in receivers:
            took, same = arrived[name]
            _say(f"{name:<6}: arrived and read back ({read}) after {took:.2f}s, "
                 f"byte-identical: {same}")  # fmt: skip
            if not same:
                self.fail(f"the {name} holds different bytes for {key}")

    async def sync(self) -> None:
        _say()
        _say("3. A note and a 20 MiB file, written on the laptop")
        show = f"laptop$ echo '{NOTE.decode().strip()}' | p2psync put --key {NOTE_KEY} -"
        await self._put_and_follow(NOTE_KEY, NOTE, show, copy=False)
        self.big = os.urandom(BIG_FILE_SIZE)
        show = f"laptop$ p2psync put {Path(CLIP_KEY).name} --key {CLIP_KEY}   (20 MiB: 20 chunks)"
        await self._put_and_follow(CLIP_KEY, self.big, show, copy=True)

    # --- 4. delete ----------------------------------------------------------------

    async def delete(self) -> None:
        _say()
        _say("4. Deleting the note: a signed tombstone that syncs like any write")
        laptop = self.nodes["laptop"]
        receivers = ("phone", "tablet")
        cursors = {name: await self._cursor(self.nodes[name]) for name in receivers}
        arrived: dict[str, tuple[str, str | None]] = {}

        async def tombstone(name: str, start: float) -> None:
            node = self.nodes[name]
            async for change in node.subscribe(after=cursors[name]):
                if change.kind == "delete" and change.key == NOTE_KEY:
                    took = time.monotonic() - start
                    try:
                        await node.get(NOTE_KEY)
                        gone = None
                    except NotFound as exc:
                        gone = str(exc)
                    line = (
                        f"tombstone arrived after {took:.2f}s as change #{change.cursor}: "
                        f"{change.kind} {change.key}, entry {change.seq} of the laptop's feed"
                    )
                    arrived[name] = (line, gone)
                    return

        with self.deadline("the delete's tombstone"):
            async with trio.open_nursery() as nursery:
                start = time.monotonic()  # before the delete: its whole trip is timed
                for name in receivers:
                    nursery.start_soon(tombstone, name, start)
                change = await laptop.delete(NOTE_KEY)
                _say(f"laptop$ p2psync rm {NOTE_KEY}   -> change #{change.cursor} {change.kind}")
        for name in receivers:
            _say(f"{name:<6}: {arrived[name][0]}")
        for name in receivers:
            if arrived[name][1] is None:
                self.fail(f"get of the deleted note still returns it on the {name}")
        _say(f"tablet$ p2psync get {NOTE_KEY}   -> error: {arrived['tablet'][1]}")
        keys = [row["key"] for row in await self.nodes["tablet"].ls()]
        _say(f"tablet$ p2psync ls   -> {', '.join(keys) or '(empty)'}")
        if NOTE_KEY in keys:
            self.fail("the note is still listed on the tablet")

    # --- 5. on disk ---------------------------------------------------------------

    def search_disk(self) -> None:
        _say()
        _say("5. Searching every file of the three homes and of relayd's data for plaintext:")
        roots = [self.workdir / name for name in (*NAMES, "relayd")]
        big = self.big
        hits = 0
        for label, needle in (
            ("the note's words ('lighthouse')", b"lighthouse"),
            (f"the key name '{NOTE_KEY}'", NOTE_KEY.encode()),
            ("a slice of the 20 MiB file", big[4096:4160]),
        ):
            found = _files_containing(roots, needle)
            hits += len(found)
            _say(f"  {label:<36} found in {len(found)} files")
        if hits:
            self.fail("plaintext found on disk")
            return
        _say("Only ciphertext is stored: chunks are XChaCha20-Poly1305 sealed and named by the")
        _say("BLAKE3 hash of their ciphertext; keys and names live in sealed entry metadata.")


def run_demo(*, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="p2psync-demo-"))
    try:
        code: int = trio.run(_Tour(workdir).run)
        if keep:
            _say(f"\nKept the demo homes in {workdir}:")
            for name in NAMES:
                _say(f"  p2psync --home {workdir / name} ls")
            _say(f"  p2psync --home {workdir / 'tablet'} devices")
            _say(f"  rm -r {workdir}     # when done")
        return code
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
