"""``p2psync demo``: a guided tour a newcomer can read.

In a throw-away directory, on loopback: one relayd (what an operator runs on
a VPS) and three devices — a laptop, a phone and a tablet — each with its own
home. The laptop starts a group and offers a 16-character short code; the
phone joins with it through relayd (the relay holds only an encrypted
ticket it cannot open); the tablet then joins through the phone with a code
of the phone's. A note and a 20 MiB file put on the laptop arrive on the
other two, each line naming the path the pair uses; a delete propagates as a
signed tombstone; finally every file of the three homes and of relayd's data
directory is searched for the plaintext to show that only ciphertext is
stored. ``--keep`` leaves the homes for exploring.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import trio

from p2psync.crypto.group import group_id_text
from p2psync.daemon import options_for
from p2psync.home import Home
from p2psync.join import join_group
from p2psync.node import Node, NodeOptions, open_node
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses, serve

NOTE = b"Meet at the lighthouse at seven. Bring the blue notebook.\n"
BIG_FILE_SIZE = 20 * 1024 * 1024
STEP_TIMEOUT = 120.0  # generous: a loaded 2-core machine is slow, never this slow


def _say(text: str = "") -> None:
    print(text, flush=True)


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def _until(node: Node, predicate: Callable[[], bool], start: float) -> float:
    """Seconds from ``start`` (monotonic) until ``predicate`` holds on ``node``."""
    with trio.fail_after(STEP_TIMEOUT):
        while not predicate():
            with trio.move_on_after(0.05):
                await node.changes().wait()
    return time.monotonic() - start


def _has(node: Node, key: str) -> bool:
    return any(s.key == key and s.complete for s in node.store.live())


def _path_to(node: Node, other: Node) -> str:
    for peer in node.peers():
        if peer.node_id == str(other.node_id) and peer.connected:
            return f"{peer.path} {peer.address}" if peer.address else peer.path
    return "not connected (what one writes reaches the other through the third)"


@asynccontextmanager
async def _relayd(data: Path) -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(
        listen=HostPort("127.0.0.1", 0), http=HostPort("127.0.0.1", 0), data_dir=str(data)
    )
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


async def _tour(workdir: Path) -> int:
    names = ("laptop", "phone", "tablet")
    homes = {name: Home(workdir / name) for name in names}
    ids = {name: homes[name].init(os.urandom, name=name).node_id for name in names}
    secret = homes["laptop"].create_group(os.urandom)
    _say("p2psync demo: a relay and three devices pair and sync, end-to-end encrypted")
    async with _relayd(workdir / "relayd") as relay:
        relay_text = f"{relay.node_id}@{relay.udp[0]}:{relay.udp[1]}"
        _say(f"  relayd  {relay.node_id.short()} on udp {relay.udp[0]}:{relay.udp[1]}")
        for name in names:
            _say(f"  {name:<7} {ids[name]}")
        _say(f"  group   {group_id_text(secret.keys().group_id)} (created on the laptop)")
        _say()

        def options(name: str) -> NodeOptions:
            # Like `p2psync daemon`: static peers from config.toml (join wrote
            # the inviter there); loopback only, no mDNS, no control socket.
            found = options_for(
                homes[name], listen="127.0.0.1:0", peers=[], mdns=False, relay=relay_text
            )
            return dataclasses.replace(found, control=False)

        async with open_node(homes["laptop"], options("laptop")) as laptop:
            offer = await laptop.create_short_invite(600, lan=False)
            _say(f"laptop$ p2psync invite --short      -> {offer.code}")
            joined = await join_group(homes["phone"], offer.code, "phone", relay=relay_text,
                                      lan=False)  # fmt: skip
            _say(f"phone $ p2psync join {offer.code} -> joined {joined.group_id[:16]}…")
            _say("        (relayd stored the ticket encrypted under the code's first half;")
            _say("         the second half, which it never saw, decrypts it)")
            async with open_node(homes["phone"], options("phone")) as phone:
                offer = await phone.create_short_invite(600, lan=False)
                _say(f"phone $ p2psync invite --short      -> {offer.code}")
                joined = await join_group(homes["tablet"], offer.code, "tablet",
                                          relay=relay_text, lan=False)  # fmt: skip
                _say(f"tablet$ p2psync join {offer.code} -> joined through the phone")
                _say()
                async with open_node(homes["tablet"], options("tablet")) as tablet:
                    return await _sync(laptop, phone, tablet, workdir)


async def _sync(laptop: Node, phone: Node, tablet: Node, workdir: Path) -> int:
    big = os.urandom(BIG_FILE_SIZE)
    start = time.monotonic()
    await laptop.put_bytes(NOTE, key="notes/today.txt", content_type="text/plain")
    await laptop.put_bytes(big, key="videos/clip.bin")
    _say(f"laptop$ p2psync put notes/today.txt  ({len(NOTE)} bytes)")
    _say(f"laptop$ p2psync put videos/clip.bin  ({len(big) // (1 << 20)} MiB, 20 chunks)")
    ok = True
    for name, node in (("phone", phone), ("tablet", tablet)):
        took = await _until(node, lambda n=node: _has(n, "notes/today.txt")  # type: ignore[misc]
                            and _has(n, "videos/clip.bin"), start)  # fmt: skip
        same = await node.get_bytes("notes/today.txt") == NOTE
        same = same and await node.get_bytes("videos/clip.bin") == big
        ok = ok and same
        _say(f"{name:<6}: both complete {took:.2f}s after the put, byte-identical: {same}")
    _say(f"paths:  laptop->phone  {_path_to(laptop, phone)}")
    _say(f"        phone->tablet  {_path_to(phone, tablet)}")
    _say(f"        laptop->tablet {_path_to(laptop, tablet)}")
    await laptop.delete("notes/today.txt")
    start = time.monotonic()
    for name, node in (("phone", phone), ("tablet", tablet)):
        took = await _until(node, lambda n=node: not _has(n, "notes/today.txt"), start)  # type: ignore[misc]
        _say(f"laptop$ p2psync rm notes/today.txt  -> gone on the {name} after {took:.2f}s")
    keys = sorted(s.key or "" for s in tablet.store.live())
    _say(f"tablet$ p2psync ls                  -> {', '.join(keys)}")
    if not ok:
        _say("FAILED: a device holds different bytes")
        return 1
    _say()
    _say("Searching every file of the three homes and of relayd's data for plaintext:")
    hits = 0
    for label, needle in (("the note's words ('lighthouse')", b"lighthouse"),
                          ("the key name 'notes/today.txt'", b"notes/today.txt"),
                          ("a slice of the 20 MiB file", big[4096:4160])):  # fmt: skip
        found = _files_containing(workdir, needle)
        hits += len(found)
        _say(f"  {label:<36} found in {len(found)} files")
    if hits:
        _say("FAILED: plaintext found on disk")
        return 1
    _say("Only ciphertext is stored: chunks are XChaCha20-Poly1305 sealed and named by the")
    _say("BLAKE3 hash of their ciphertext; keys and names live in sealed entry metadata.")
    return 0


def run_demo(*, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="p2psync-demo-"))
    try:
        code: int = trio.run(_tour, workdir)
        if keep:
            _say(f"\nKept the demo homes in {workdir}:")
            _say(f"  p2psync --home {workdir / 'tablet'} ls")
            _say(f"  p2psync --home {workdir / 'tablet'} devices")
        return code
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
