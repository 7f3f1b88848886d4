"""``p2psync demo``: a guided tour a newcomer can read.

In a throw-away directory: two devices, a laptop and a phone, each with its
own home. The laptop starts a group and prints an invite ticket; the phone
joins with it over real QUIC on loopback. Both run nodes; a note and a
multi-chunk file put on the laptop arrive on the phone, a note written on
the phone arrives on the laptop, a delete propagates as a signed tombstone,
and finally every file of both homes is searched for the plaintext to show
that only ciphertext is stored.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import trio

from p2psync import defaults
from p2psync.crypto.group import group_id_text
from p2psync.daemon import options_for
from p2psync.home import Home
from p2psync.join import join_group
from p2psync.node import Node, NodeOptions, open_node

NOTE = b"Meet at the lighthouse at seven. Bring the blue notebook.\n"
REPLY = b"See you there - phone\n"


def _say(text: str = "") -> None:
    print(text, flush=True)


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def _until(node: Node, what: str, predicate: object) -> float:
    start = time.monotonic()
    with trio.fail_after(30):
        while not predicate():  # type: ignore[operator]
            with trio.move_on_after(0.05):
                await node.changes().wait()
    return time.monotonic() - start


def _has(node: Node, key: str) -> bool:
    return any(s.key == key and s.complete for s in node.store.live())


async def _tour(workdir: Path) -> int:
    laptop_home, phone_home = Home(workdir / "laptop"), Home(workdir / "phone")
    laptop_id = laptop_home.init(os.urandom, name="laptop").node_id
    phone_id = phone_home.init(os.urandom, name="phone").node_id
    secret = laptop_home.create_group(os.urandom)
    _say("p2psync demo: two devices pair and sync, end-to-end encrypted")
    _say(f"  laptop  {laptop_id}")
    _say(f"  phone   {phone_id}")
    _say(f"  group   {group_id_text(secret.keys().group_id)} (created on the laptop)")
    _say()
    local = NodeOptions(listen=("127.0.0.1", 0))
    async with open_node(laptop_home, local) as laptop:
        port = laptop.endpoint.local_address[1]
        ticket = dataclasses.replace(laptop.create_invite(600),
                                     addresses=(("127.0.0.1", port),))  # fmt: skip
        text = ticket.encode()
        _say(f"laptop$ p2psync invite        -> {text[:32]}… ({len(text)} characters)")
        joined = await join_group(phone_home, text, name="phone")
        _say(f"phone $ p2psync join TICKET   -> joined {joined.group_id[:16]}…")
        _say("        (the ticket never holds the group secret: the laptop sealed it to the")
        _say("         phone's key after both proved the invite over QUIC)")
        _say()
        phone_options = dataclasses.replace(options_for(phone_home, listen="127.0.0.1:0", peers=[]),
                                            control=False)  # fmt: skip
        async with open_node(phone_home, phone_options) as phone:
            big = os.urandom(5 * defaults.CHUNK_SIZE // 2)
            await laptop.put_bytes(NOTE, key="notes/today.txt", content_type="text/plain")
            await laptop.put_bytes(big, key="photos/big.bin")
            _say(f"laptop$ p2psync put notes/today.txt  ({len(NOTE)} bytes)")
            _say(f"laptop$ p2psync put photos/big.bin   ({len(big):,} bytes, 3 chunks)")
            took = await _until(phone, "both", lambda: _has(phone, "notes/today.txt")
                                and _has(phone, "photos/big.bin"))  # fmt: skip
            ok = await phone.get_bytes("notes/today.txt") == NOTE
            ok = ok and await phone.get_bytes("photos/big.bin") == big
            path = phone.status()["peers"][0]
            _say(f"phone : both arrived in {took:.2f}s, byte-identical: {ok}; "
                 f"path to laptop: {path['path']} {path['address']}")  # fmt: skip
            await phone.put_bytes(REPLY, key="notes/reply.txt")
            took = await _until(laptop, "reply", lambda: _has(laptop, "notes/reply.txt"))
            _say(f"phone $ p2psync put notes/reply.txt -> on the laptop after {took:.2f}s")
            await laptop.delete("notes/today.txt")
            took = await _until(phone, "tombstone", lambda: not _has(phone, "notes/today.txt"))
            _say(f"laptop$ p2psync rm notes/today.txt  -> gone on the phone after {took:.2f}s")
            keys = sorted(s.key or "" for s in phone.store.live())
            _say(f"phone $ p2psync ls                  -> {', '.join(keys)}")
            if not ok:
                return 1
    _say()
    _say("Searching every file of both homes for plaintext:")
    hits = 0
    for label, needle in (("the note's words ('lighthouse')", b"lighthouse"),
                          ("the phone's reply", b"See you there"),
                          ("the key name 'notes/today.txt'", b"notes/today.txt")):  # fmt: skip
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
            _say(f"\nKept the demo homes: p2psync --home {workdir / 'phone'} ls")
        return code
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
