"""``p2psync demo``: a guided tour that a newcomer can read.

Today it shows the local half of the product in a throw-away home: create a
device and a group, put a note and a multi-chunk file, read them back, and
prove that what lies on disk is ciphertext only (it searches every file in
the home for the note's text and a sample of the file's bytes). Later work
extends it to several nodes syncing through relayd.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from pathlib import Path

from p2psync import defaults
from p2psync.crypto.group import group_id_text
from p2psync.home import Home
from p2psync.proto.entry import Kind
from p2psync.store import Meta


def _say(text: str = "") -> None:
    print(text, flush=True)


def _files_containing(root: Path, needle: bytes) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and needle in path.read_bytes():
            hits.append(path)
    return hits


def run_demo(*, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="p2psync-demo-"))
    try:
        home = Home(workdir / "laptop")
        identity = home.init(os.urandom, name="laptop")
        secret = home.create_group(os.urandom)
        _say("p2psync demo: one device, one group, an encrypted local store")
        _say(f"  device  {identity.node_id}  (its Ed25519 public key is its name)")
        _say(f"  group   {group_id_text(secret.keys().group_id)}  (public routing id)")
        _say(f"  home    {home.path}")
        _say()

        note = b"Meet at the lighthouse at seven. Bring the blue notebook.\n"
        big = os.urandom(5 * defaults.CHUNK_SIZE // 2)  # 2.5 MiB: three chunks
        now = time.time_ns() // 1_000_000
        with home.open_store() as store:
            for key, data, kind in (("notes/today.txt", note, "text/plain"),
                                    ("photos/big.bin", big, None)):  # fmt: skip
                blob_id, size = store.put_blob(io.BytesIO(data))
                store.append(
                    Kind.PUT, Meta(key=key, content_type=kind), now_ms=now, blob=blob_id, size=size
                )
                _say(f"put  {key:<18} {size:>9,} bytes -> blob {blob_id.hex()[:16]}…")
            _say()
            for stored in store.live():
                data = b"".join(store.iter_blob(stored.entry.blob))
                expected = note if stored.key == "notes/today.txt" else big
                verdict = "identical" if data == expected else "DIFFERENT"
                _say(f"get  {stored.key:<18} {len(data):>9,} bytes, {verdict} to what was put")
                if data != expected:
                    return 1
            stats = store.stats()
        _say()
        _say(
            f"The store holds {stats['entries']} signed entries and {stats['objects']} "
            f"sealed objects ({stats['object_bytes']:,} bytes):"
        )
        for path in sorted((home.path / "objects").rglob("*")):
            if path.is_file():
                _say(f"  objects/{path.parent.name}/{path.name[:24]}…  {path.stat().st_size:>9,}")
        note_hits = _files_containing(home.path, b"lighthouse")
        big_hits = _files_containing(home.path, big[1000:1064])
        key_hits = _files_containing(home.path, b"notes/today.txt")
        _say()
        _say("Searching every file in the home for the plaintext:")
        _say(f"  the note's words ('lighthouse')     found in {len(note_hits)} files")
        _say(f"  64 bytes from the middle of big.bin found in {len(big_hits)} files")
        _say(f"  the key name 'notes/today.txt'      found in {len(key_hits)} files")
        if note_hits or big_hits or key_hits:
            _say("FAILED: plaintext found on disk")
            return 1
        _say("Only ciphertext is on disk: chunks are XChaCha20-Poly1305 sealed and named by")
        _say("BLAKE3 of the ciphertext; keys and names live inside sealed entry metadata.")
        if keep:
            _say(f"\nKept the demo home: p2psync --home {home.path} ls")
        return 0
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
