"""Store-and-forward through a real relayd's mailbox, with real nodes on loopback.

Device A writes while B is off; A goes away; B comes online and gets
everything from relayd, which held only ciphertext. And relayd killed with
SIGKILL in the middle of pushes loses nothing it acknowledged; a relayd
whose database was rolled back (restored from a copy) gets back what it
lost from the nodes, and they pull what is new in it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from p2psync.crypto.group import GroupKeys, GroupSecret, mailbox_key
from p2psync.crypto.identity import Identity, NodeId
from p2psync.home import Home
from p2psync.mailbox_sync import MailboxClient
from p2psync.net.endpoint import EndpointConfig, open_endpoint
from p2psync.net.relay_client import RelayClient, RelayClientConfig, open_relay_client
from p2psync.node import Node, NodeOptions, StaticPeer, open_node
from p2psync.proto import mailbox as wire
from p2psync.proto.entry import Kind, decode_entry_untrusted, sign_entry
from p2psync.proto.relay import RELAY_ALPN
from p2psync.store.objects import OVERHEAD, Meta, ObjectKind, object_id, seal, seal_meta
from relayd.config import HostPort, MailboxConfig, RelaydConfig
from relayd.mailbox import RUNNING_MARK
from relayd.relay import RelaydAddresses, load_or_create_identity, serve

from .conftest import wait_until

LOOPBACK = ("127.0.0.1", 0)
KNOWN = b"KNOWN-PLAINTEXT-7f3a9c"  # written by A; must never appear on relayd's disk
FAST = RelayClientConfig(backoff_initial=0.05, backoff_max=0.5, ping_interval=1.0)


@asynccontextmanager
async def relay_with_data(
    data: Path, mailbox: MailboxConfig | None = None, udp_port: int = 0
) -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(
        listen=HostPort("127.0.0.1", udp_port),
        http=HostPort("127.0.0.1", 0),
        data_dir=str(data),
        mailbox=mailbox or MailboxConfig(),
    )
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


class RestartableRelay:
    """A relayd on a fixed port that a test stops and starts again while nodes run on."""

    def __init__(self, nursery: trio.Nursery, data: Path, udp_port: int) -> None:
        self.nursery, self.data, self.udp_port = nursery, data, udp_port
        self._stop: trio.Event | None = None
        self._stopped = trio.Event()

    async def start(self) -> RelaydAddresses:
        stop, stopped = trio.Event(), trio.Event()
        self._stop, self._stopped = stop, stopped

        async def run(task_status: trio.TaskStatus[RelaydAddresses]) -> None:
            try:
                async with relay_with_data(self.data, udp_port=self.udp_port) as addresses:
                    task_status.started(addresses)
                    await stop.wait()
            finally:
                stopped.set()

        addresses: RelaydAddresses = await self.nursery.start(run)
        return addresses

    async def stop(self) -> None:
        assert self._stop is not None
        self._stop.set()
        await self._stopped.wait()


def fast_relay_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes notice a relayd that went away, and reconnect to it, within seconds."""
    import p2psync.mailbox_sync
    import p2psync.node

    fast = partial(RelayClientConfig, backoff_initial=0.05, backoff_max=0.5, ping_interval=0.5,
                   ping_timeout=1.0)  # fmt: skip
    monkeypatch.setattr(p2psync.node, "RelayClientConfig", fast)
    monkeypatch.setattr(p2psync.mailbox_sync, "RETRY_MIN_S", 0.1)
    monkeypatch.setattr(p2psync.mailbox_sync, "RETRY_MAX_S", 0.5)


def relay_text(relay: RelaydAddresses) -> str:
    return f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"


def block_direct_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    from p2psync.net.endpoint import Endpoint

    monkeypatch.setattr(Endpoint, "add_candidate", lambda self, node_id, address: None)


def complete_keys(node: Node) -> set[str]:
    return {s.key or "" for s in node.store.live() if s.complete}


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def metrics(http: HostPort) -> str:
    stream = await trio.open_tcp_stream(http.host, http.port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


async def until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` (the mailbox's state lives in another task); callers bound it."""
    while not predicate():  # noqa: ASYNC110 -- no event to wait on for these counters
        await trio.sleep(0.05)


async def test_offline_device_gets_everything_from_the_mailbox(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A writes 100 entries and a 32 MiB file while B is off; A leaves; B comes and gets it all."""
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    data = tmp_path / "relay-data"
    big = random.Random(9).randbytes(32 * 1024 * 1024)
    notes = {f"notes/{i:03d}": KNOWN + b" note %d" % i for i in range(100)}
    with trio.fail_after(240):
        async with relay_with_data(data) as relay:
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay))
            async with open_node(a_home, options) as a:
                for key, value in notes.items():
                    await a.put_bytes(value, key=key)
                await a.put_bytes(big, key="files/big.bin")
                # A is alone online: it pushes until nothing is pending.
                await until(
                    lambda: (
                        a.mailbox is not None
                        and a.mailbox.pending_uploads == 0
                        and a.mailbox.stats.pushed_entries >= 101
                    )
                )
                status = a.status()["mailbox"]
                assert status["state"] == "connected" and status["push_cursor"] > 0
                assert status["quota_used"] > len(big)
                # One chunk per note; a manifest and 32 chunks for the big file.
                assert status["pushed_objects"] == 100 + 33
            # A is gone. B was never online with it.
            async with open_node(b_home, options) as b:
                wanted = {*notes, "files/big.bin"}
                await wait_until(b, lambda: wanted <= complete_keys(b))
                for key, value in notes.items():
                    assert await b.get_bytes(key) == value
                got = await b.get_bytes("files/big.bin")
                assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
                status = b.status()["mailbox"]
                assert status["pulled_entries"] == 101 and status["rejected"] == 0
                assert status["pull_cursor"] == status["head"] == 101 + 100 + 33
                assert b.peers() == []  # no peer ever: all of it came through the mailbox
    # relayd's data directory holds ciphertext only.
    assert files_containing(data, KNOWN) == []
    assert files_containing(data, b"notes/0") == []  # keys are sealed too
    assert files_containing(data, big[1000:1064]) == []
    assert any(p.stat().st_size > 1024 * 1024 for p in data.rglob("*") if p.is_file())


async def test_same_entry_from_peer_and_mailbox_is_stored_once(
    make_home: Callable[..., Home], tmp_path: Path
) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(120):
        async with relay_with_data(tmp_path / "relay-data") as relay:
            a_options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay), mailbox="always")
            async with open_node(a_home, a_options) as a:
                b_options = NodeOptions(
                    listen=LOOPBACK,
                    relay=relay_text(relay),
                    peers=(StaticPeer(a.node_id, ("127.0.0.1", a.endpoint.local_address[1])),),
                )
                async with open_node(b_home, b_options) as b:
                    await wait_until(b, lambda: a.node_id in b.active)
                    for i in range(20):
                        await a.put_bytes(b"value %d" % i, key=f"k{i}")
                    await wait_until(b, lambda: len(complete_keys(b)) == 20)
                    # Wait until B has pulled A's pushes too (both paths delivered).
                    assert b.mailbox is not None
                    stats = b.mailbox.stats
                    await until(lambda: stats.pulled_entries + stats.pulled_duplicates >= 20)
                    assert stats.rejected == 0
                    assert b.store.stats()["entries"] == 20
                    assert b.status()["mailbox"]["holding_back"] is False


async def test_auto_mode_holds_back_while_every_device_is_connected(
    make_home: Callable[..., Home], tmp_path: Path
) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(120):
        async with relay_with_data(tmp_path / "relay-data") as relay:
            a_options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay))
            async with open_node(a_home, a_options) as a:
                b_options = NodeOptions(
                    listen=LOOPBACK,
                    relay=relay_text(relay),
                    mailbox="pull",
                    peers=(StaticPeer(a.node_id, ("127.0.0.1", a.endpoint.local_address[1])),),
                )
                async with open_node(b_home, b_options) as b:
                    await wait_until(b, lambda: a.node_id in b.active)
                    await wait_until(a, lambda: b.node_id in a.active)
                    # B wrote something: A now knows B as an author of the group.
                    await b.put_bytes(b"from b", key="b-key")
                    await wait_until(a, lambda: "b-key" in complete_keys(a))
                    await a.put_bytes(b"while b is here", key="held")
                    assert a.mailbox is not None
                    mailbox = a.mailbox
                    await until(lambda: mailbox.holding_back)
                    assert a.mailbox.stats.pushed_entries == 0
                    assert b.mailbox is not None and b.mailbox.stats.pushed_entries == 0
                # B went away: A pushes what B might still miss.
                await until(lambda: mailbox.pending_uploads == 0)
                assert mailbox.stats.pushed_entries >= 1


async def test_entries_older_than_the_retention_are_pushed_and_arrive(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A's first writes are 8 days old (beyond the 7-day TTL): pushed anyway, B gets all."""
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    old_ms = time.time_ns() // 1_000_000 - 8 * 24 * 3600 * 1000
    store = a_home.open_store()
    try:
        for i in range(3):
            blob, size = store.put_blob(io.BytesIO(b"old %d" % i))
            store.append(Kind.PUT, Meta(key=f"old/{i}"), now_ms=old_ms + i, blob=blob, size=size)
    finally:
        store.close()
    with trio.fail_after(120):
        async with relay_with_data(tmp_path / "relay-data") as relay:
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay))
            async with open_node(a_home, options) as a:
                await a.put_bytes(b"new", key="new")
                await until(lambda: a.mailbox is not None and a.mailbox.pending_uploads == 0)
                assert a.mailbox is not None and a.mailbox.stats.pushed_entries == 4
            async with open_node(b_home, options) as b:
                wanted = {"old/0", "old/1", "old/2", "new"}
                await wait_until(b, lambda: wanted <= complete_keys(b))
                assert await b.get_bytes("old/2") == b"old 2"
                assert b.mailbox is not None and b.mailbox.stats.rejected == 0


@asynccontextmanager
async def raw_member(
    relay: RelaydAddresses, keys: GroupKeys, me: Identity | None = None
) -> AsyncIterator[tuple[Identity, MailboxClient]]:
    """A device that talks to the mailbox by hand (its entries are signed by the test)."""
    me = me or Identity.generate(os.urandom)
    config = EndpointConfig(bind_host="127.0.0.1", alpn=(RELAY_ALPN,))
    async with (
        open_endpoint(me, config) as endpoint,
        open_relay_client(endpoint, me, relay.udp, relay.node_id, (), config=FAST,
                          rng=random.Random(4)) as client,
    ):  # fmt: skip
        await client.wait_connected()
        async with MailboxClient.open(
            client, mailbox_key(keys), me.node_id, group_id=keys.group_id, notify=False
        ) as mailbox:
            yield me, mailbox


def feed(author: Identity, keys: GroupKeys, count: int) -> list[bytes]:
    """``count`` signed entries of ``author``'s feed, in order."""
    raws, prev = [], b""
    now_ms = time.time_ns() // 1_000_000
    for seq in range(1, count + 1):
        entry = sign_entry(
            author, group_id=keys.group_id, seq=seq, prev=prev, hlc=(now_ms + seq) << 16,
            kind=Kind.DELETE, blob=b"", size=0,
            meta=seal_meta(keys, Meta(key=f"x/{seq}"), os.urandom),
        )  # fmt: skip
        raws.append(entry.encode())
        prev = entry.entry_id
    return raws


def relay_acked(data: Path, node: NodeId) -> int:
    db = sqlite3.connect(data / "mailbox" / "mailbox.sqlite")
    try:
        row = db.execute("SELECT acked FROM devices WHERE node = ?", (node.raw,)).fetchone()
    finally:
        db.close()
    return int(row[0])


async def test_entries_after_a_gap_wait_and_hold_the_cursor(
    make_home: Callable[..., Home],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Seq 4-6 of X's feed arrive before 1-3: B stores nothing early, loses nothing, ACKs nothing
    past what it holds; once 1-3 come, it stores all six and moves on."""
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    keys = secret.keys()
    b_home = make_home("b", secret)
    data = tmp_path / "relay-data"
    with trio.fail_after(120):
        async with (
            relay_with_data(data) as relay,
            raw_member(relay, keys) as (x, pusher),
        ):
            raws = feed(x, keys, 6)
            for raw in raws[3:]:
                await pusher.request(wire.PushEntry(raw), wire.Pushed)
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay), mailbox="pull")
            async with open_node(b_home, options) as b:
                await until(lambda: b.mailbox is not None and b.mailbox.stats.pulls >= 1)
                mailbox = b.mailbox  # the pull that found them is over (saved, ACKed)
                assert mailbox is not None and mailbox.status()["waiting"] == 3
                assert b.store.frontier().get(x.node_id) is None  # nothing of X stored
                assert mailbox.pull_cursor == 0 and mailbox.stats.rejected == 0
                assert relay_acked(data, b.node_id) == 0  # not delivered: relayd keeps them
                # The entries that fill the gap come (here, through the mailbox too).
                for raw in raws[:3]:
                    await pusher.request(wire.PushEntry(raw), wire.Pushed)
                await until(lambda: b.store.frontier().get(x.node_id) == 6)
                await until(lambda: mailbox.pull_cursor == 6)
                assert mailbox.status()["waiting"] == 0 and mailbox.stats.rejected == 0
                await until(lambda: relay_acked(data, b.node_id) == 6)
    # Waiting entries were not handed to the store (and rejected, and logged) again and again.
    assert "seq-gap" not in caplog.text


async def test_objects_beyond_the_relays_max_item_are_not_pushed(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """relayd takes items up to 512 KiB: A pushes every entry and the small objects only."""
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    a_home = make_home("a", secret)
    small_items = MailboxConfig(max_item_bytes=512 * 1024)
    with trio.fail_after(120):
        async with relay_with_data(tmp_path / "relay-data", small_items) as relay:
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay))
            async with open_node(a_home, options) as a:
                await a.put_bytes(os.urandom(3 * 1024 * 1024 + 10), key="big")  # 4 chunks
                await a.put_bytes(b"small", key="small")
                await until(lambda: a.mailbox is not None and a.mailbox.pending_uploads == 0)
                stats = a.mailbox.stats if a.mailbox is not None else None
                assert stats is not None
                # Both entries, the manifest, the big file's last chunk (10 bytes) and the
                # small file's chunk; three full 1 MiB chunks left out, never sent.
                assert (stats.pushed_entries, stats.pushed_objects) == (2, 3)
                assert stats.skipped_objects == 3 and stats.rejected == 0
                text = await metrics(relay.http)
                assert 'relayd_mailbox_rejections_total{reason="too-large"} 0' in text


async def test_an_entry_relayd_refuses_holds_the_push_cursor(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A's clock was 2 days ahead when it wrote: relayd refuses the entry (clock-skew). A must
    not move past it (nor push the next one, which would leave a gap): it retries later."""
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    a_home = make_home("a", secret)
    ahead_ms = time.time_ns() // 1_000_000 + 2 * 24 * 3600 * 1000
    store = a_home.open_store()
    try:
        store.append(Kind.DELETE, Meta(key="from-the-future"), now_ms=ahead_ms)
    finally:
        store.close()
    with trio.fail_after(120):
        async with relay_with_data(tmp_path / "relay-data") as relay:
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay))
            async with open_node(a_home, options) as a:
                await a.put_bytes(b"later", key="later")
                await until(lambda: a.mailbox is not None and a.mailbox.stats.rejected >= 1)
                mailbox = a.mailbox
                assert mailbox is not None
                await until(lambda: "clock-skew" in (mailbox.last_error or ""))
                assert mailbox.push_cursor == 0 and mailbox.stats.pushed_entries == 0
                assert mailbox.pending_uploads == 2


async def test_quota_exceeded_pauses_the_push_without_moving_its_cursor(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The group's quota holds one 40 KiB file, not two: A pushes the second entry, relayd
    refuses its chunk, and A keeps the entry pending (cursor before it) for the next try."""
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    a_home = make_home("a", secret)
    tight = MailboxConfig(max_item_bytes=64 * 1024, group_quota_bytes=64 * 1024 + 1024)
    with trio.fail_after(120):
        async with relay_with_data(tmp_path / "relay-data", tight) as relay:
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay), mailbox="always")
            async with open_node(a_home, options) as a:
                await a.put_bytes(os.urandom(40 * 1024), key="first")
                await until(lambda: a.mailbox is not None and a.mailbox.pending_uploads == 0)
                mailbox = a.mailbox
                assert mailbox is not None and mailbox.stats.pushed_objects == 1
                first_cursor = mailbox.push_cursor
                assert first_cursor > 0
                await a.put_bytes(os.urandom(40 * 1024), key="second")
                await until(lambda: "quota-exceeded" in (mailbox.last_error or ""))
                assert mailbox.push_cursor == first_cursor  # not past the refused blob
                assert mailbox.pending_uploads == 1
                assert mailbox.stats.pushed_entries == 2 and mailbox.stats.pushed_objects == 1
                assert mailbox.stats.rejected == 0 and mailbox.stats.skipped_objects == 0
                saved = await a.locked(a.store.mailbox_state, mailbox.relay_id, mailbox.mailbox)
                assert saved is not None and saved[2] == first_cursor
                text = await metrics(relay.http)
                assert 'relayd_mailbox_rejections_total{reason="quota-exceeded"} 1' in text


async def test_pull_cursor_resumes_after_a_node_restart(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """B pulls 3 entries and stops; 2 more arrive; B starts again and pulls only those 2."""
    block_direct_paths(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    keys = secret.keys()
    b_home = make_home("b", secret)
    with trio.fail_after(120):
        async with (
            relay_with_data(tmp_path / "relay-data") as relay,
            raw_member(relay, keys) as (x, pusher),
        ):
            raws = feed(x, keys, 5)
            for raw in raws[:3]:
                await pusher.request(wire.PushEntry(raw), wire.Pushed)
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay), mailbox="pull")
            async with open_node(b_home, options) as b:
                await until(lambda: b.mailbox is not None and b.mailbox.pull_cursor == 3)
                assert b.store.frontier().get(x.node_id) == 3
            for raw in raws[3:]:
                await pusher.request(wire.PushEntry(raw), wire.Pushed)
            async with open_node(b_home, options) as b:
                await until(lambda: b.mailbox is not None and b.mailbox.pull_cursor == 5)
                assert b.store.frontier().get(x.node_id) == 5
                stats = b.mailbox.stats if b.mailbox is not None else None
                # From the saved cursor: the first three were not pulled (nor stored) again.
                assert stats is not None
                assert (stats.pulled_entries, stats.pulled_duplicates) == (2, 0)


async def test_pull_goes_on_after_the_relay_connection_drops_and_comes_back(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """relayd goes away under a running B and comes back: B pulls what is pushed after."""
    block_direct_paths(monkeypatch)
    fast_relay_reconnects(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    keys = secret.keys()
    b_home = make_home("b", secret)
    x = Identity.generate(os.urandom)
    raws = feed(x, keys, 4)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            relayd = RestartableRelay(nursery, tmp_path / "relay-data", free_udp_port())
            relay = await relayd.start()
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay), mailbox="pull")
            async with open_node(b_home, options) as b:
                async with raw_member(relay, keys, x) as (_, pusher):
                    for raw in raws[:2]:
                        await pusher.request(wire.PushEntry(raw), wire.Pushed)
                await until(lambda: b.mailbox is not None and b.mailbox.pull_cursor == 2)
                mailbox = b.mailbox
                assert mailbox is not None
                await relayd.stop()
                await until(lambda: not mailbox.relay.connected)
                relay = await relayd.start()
                async with raw_member(relay, keys, x) as (_, pusher):
                    for raw in raws[2:]:
                        await pusher.request(wire.PushEntry(raw), wire.Pushed)
                await until(lambda: b.store.frontier().get(x.node_id) == 4)
                await until(lambda: mailbox.pull_cursor == 4)
                assert mailbox.stats.pulled_entries == 4 and mailbox.stats.pulled_duplicates == 0
                assert mailbox.stats.rollbacks == 0 and mailbox.stats.rejected == 0
            nursery.cancel_scope.cancel()


def items_by_author(data: Path, author: NodeId) -> int:
    """Entries of ``author`` relayd's database holds (read beside the running relayd)."""
    db = sqlite3.connect(data / "mailbox" / "mailbox.sqlite")
    try:
        row = db.execute(
            "SELECT count(*) FROM items WHERE kind = 1 AND author = ?", (author.raw,)
        ).fetchone()
    finally:
        db.close()
    return int(row[0])


def pulled_to(node: Node, cursor: int) -> Callable[[], bool]:
    """``node`` uploaded everything and pulled up to ``cursor``."""
    return lambda: (
        node.mailbox is not None and node.mailbox.pending_uploads == 0
        and node.mailbox.pull_cursor == cursor
    )  # fmt: skip


async def push_copy_push(relayd: RestartableRelay, a: Node, copy: Path) -> None:
    """A pushes 3 files (cursors 1-6: 3 entries, 3 chunks, pulled back), relayd's data
    directory is copied to ``copy`` (relayd stopped meanwhile), A pushes 3 more (7-12)."""
    for i in range(3):
        await a.put_bytes(b"before the copy %d" % i, key=f"kept/{i}")
    await until(pulled_to(a, 6))
    await relayd.stop()
    shutil.copytree(relayd.data, copy)
    await relayd.start()
    for i in range(3):
        await a.put_bytes(b"after the copy %d" % i, key=f"lost/{i}")
    await until(pulled_to(a, 12))


@pytest.mark.parametrize("a_stays_up", [True, False], ids=["node-up", "node-restarted"])
async def test_a_rolled_back_relay_gets_lost_pushes_again_and_new_items_are_pulled(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    a_stays_up: bool,
) -> None:  # fmt: skip
    """relayd's data dir is copied after A pushed 3 files, A pushes 3 more, then the copy is
    restored (a backup restore, or a power loss that lost the last commits) and relayd hands
    out cursors 7.. again, to X's new entries. A pulled to 12 before: it must see the
    rollback, pull X's entries anyway, and push again the 3 files relayd lost."""
    block_direct_paths(monkeypatch)
    fast_relay_reconnects(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    keys = secret.keys()
    a_home = make_home("a", secret)
    data, copy = tmp_path / "relay-data", tmp_path / "relay-data-copy"
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery, AsyncExitStack() as running:
            relayd = RestartableRelay(nursery, data, free_udp_port())
            relay = await relayd.start()
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay), mailbox="always")
            a = await running.enter_async_context(open_node(a_home, options))
            a_id = a.node_id

            await push_copy_push(relayd, a, copy)
            assert a.mailbox is not None and a.mailbox.stats.rollbacks == 0
            if not a_stays_up:
                await running.aclose()  # A is off while relayd rolls back
            await relayd.stop()
            shutil.rmtree(data)
            shutil.copytree(copy, data)
            relay = await relayd.start()
            assert items_by_author(data, a_id) == 3
            # X writes after the rollback: its entries get cursors 7 and 8, which A passed.
            async with raw_member(relay, keys) as (x, pusher):
                for raw in feed(x, keys, 2):
                    pushed = await pusher.request(wire.PushEntry(raw), wire.Pushed)
                    assert pushed.cursor <= 12
            if not a_stays_up:
                a = await running.enter_async_context(open_node(a_home, options))
            await until(lambda: a.store.frontier().get(x.node_id) == 2)
            await until(lambda: items_by_author(data, a_id) == 6)
            # Pushed again from the start: the first 3 files relayd still held (entries and
            # chunks), the last 3 it had lost and takes again.
            await until(pulled_to(a, 6 + 2 + 6))
            mailbox = a.mailbox
            assert mailbox is not None
            assert mailbox.stats.rollbacks == 1
            assert mailbox.stats.already_there == 6
            new = 9 if a_stays_up else 3  # a restarted node's stats start over
            assert mailbox.stats.pushed_entries == mailbox.stats.pushed_objects == new
            assert mailbox.stats.pulled_entries == 2 and mailbox.stats.rejected == 0
            await running.aclose()
            nursery.cancel_scope.cancel()


async def test_a_restore_marked_for_relayd_gives_a_new_log_and_nodes_start_over(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The rollback a node cannot see by itself: after the restore, another device pushes
    past every cursor A had (head 16 > A's 12). The operator's mark (or a reboot under a
    running relayd) makes relayd renew the log_id; A starts over, gets all of X's entries
    and pushes again the files relayd lost."""
    block_direct_paths(monkeypatch)
    fast_relay_reconnects(monkeypatch)
    secret = GroupSecret.generate(os.urandom)
    keys = secret.keys()
    a_home = make_home("a", secret)
    data, copy = tmp_path / "relay-data", tmp_path / "relay-data-copy"
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery, AsyncExitStack() as running:
            relayd = RestartableRelay(nursery, data, free_udp_port())
            relay = await relayd.start()
            options = NodeOptions(listen=LOOPBACK, relay=relay_text(relay), mailbox="always")
            a = await running.enter_async_context(open_node(a_home, options))
            a_id = a.node_id

            await push_copy_push(relayd, a, copy)
            await relayd.stop()
            shutil.rmtree(data)
            shutil.copytree(copy, data)
            (data / "mailbox" / RUNNING_MARK).write_text("restored\n")  # docs/mailbox.md
            relay = await relayd.start()
            async with raw_member(relay, keys) as (x, pusher):
                for raw in feed(x, keys, 10):
                    await pusher.request(wire.PushEntry(raw), wire.Pushed)
            await until(lambda: a.store.frontier().get(x.node_id) == 10)
            await until(lambda: items_by_author(data, a_id) == 6)
            mailbox = a.mailbox
            assert mailbox is not None
            assert mailbox.stats.pulled_entries == 10 and mailbox.stats.rejected == 0
            await running.aclose()
            nursery.cancel_scope.cancel()


# --- relayd SIGKILLed during pushes ----------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def relayd_process(data: Path, udp: int, http: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    argv = [sys.executable, "-m", "relayd", "--data", str(data), "--listen",
            f"127.0.0.1:{udp}", "--http", f"127.0.0.1:{http}"]  # fmt: skip
    with log.open("ab") as sink:
        proc = subprocess.Popen(argv, stderr=sink, stdout=sink)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def wait_logged(log: Path, text: bytes, proc: subprocess.Popen[bytes], count: int) -> None:
    def logged() -> bool:
        assert proc.poll() is None, log.read_bytes()[-2000:]
        return log.read_bytes().count(text) >= count

    await until(logged)


async def test_relayd_sigkill_during_pushes_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data, log = tmp_path / "relay-data", tmp_path / "relayd.log"
    relay_identity, _ = load_or_create_identity(str(data))  # the subprocess loads this one
    udp, http = free_udp_port(), free_tcp_port()
    keys = GroupSecret.generate(os.urandom).keys()
    key = mailbox_key(keys)
    me = Identity.generate(os.urandom)
    started_ms = time.time_ns() // 1_000_000
    acked: dict[bytes, int] = {}  # content hash -> cursor relayd acknowledged
    big_objects: dict[bytes, bytes] = {}

    def entry(seq: int, prev: bytes, blob: bytes = b"", size: int = 0) -> bytes:
        kind = Kind.PUT if blob else Kind.DELETE
        return sign_entry(
            me, group_id=keys.group_id, seq=seq, prev=prev, hlc=(started_ms + seq) << 16,
            kind=kind, blob=blob, size=size,
            meta=seal_meta(keys, Meta(key=f"k{seq}"), os.urandom),
        ).encode()  # fmt: skip

    async def push_until_broken(client: MailboxClient) -> None:
        prev, seq = b"", 0
        # The kill breaks the stream mid-push; anything else is a failure.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                seq += 1
                if seq % 10 == 0:  # every tenth: a one-chunk blob of 1 MiB in a file
                    sealed = seal(keys, ObjectKind.CHUNK, os.urandom(1024 * 1024))
                    oid = object_id(sealed)
                    raw = entry(seq, prev, oid, len(sealed) - OVERHEAD)
                    await client.send(wire.PushEntry(raw))
                    await client.send(wire.PushChunk(oid, oid, sealed))
                    first = await client.expect(wire.Pushed)
                    acked[hashlib.blake2b(raw).digest()] = first.cursor
                    second = await client.expect(wire.Pushed)
                    acked[oid] = second.cursor
                    big_objects[oid] = sealed
                else:
                    raw = entry(seq, prev)
                    pushed = await client.request(wire.PushEntry(raw), wire.Pushed)
                    acked[hashlib.blake2b(raw).digest()] = pushed.cursor
                prev = decode_entry_untrusted(raw).entry_id

    config = EndpointConfig(bind_host="127.0.0.1", alpn=(RELAY_ALPN,))
    with trio.fail_after(120):
        async with (
            open_endpoint(me, config) as endpoint,
            open_relay_client(
                endpoint, me, ("127.0.0.1", udp), relay_identity.node_id, (), config=FAST,
                rng=random.Random(3),
            ) as relay,
        ):  # fmt: skip
            with relayd_process(data, udp, http, log) as proc:
                await wait_logged(log, b"relayd ready", proc, 1)
                await relay.wait_connected()
                async with (
                    trio.open_nursery() as nursery,
                    MailboxClient.open(
                        relay, key, me.node_id, group_id=keys.group_id, notify=False
                    ) as client,
                ):
                    nursery.start_soon(push_until_broken, client)
                    await until(lambda: len(acked) >= 60)
                    proc.send_signal(signal.SIGKILL)  # mid-push, no goodbye
                    proc.wait(timeout=10)
            assert len(acked) >= 60
            connects = relay.stats.connects
            with relayd_process(data, udp, http, log) as proc:
                await wait_logged(log, b"relayd ready", proc, 2)
                # A session with the new relayd, not the dead one the client may still
                # believe in until its pings time out.
                await until(lambda: relay.stats.connects > connects and relay.connected)
                await check_everything_acknowledged(
                    relay, key, keys.group_id, me, acked, big_objects
                )


async def check_everything_acknowledged(
    relay: RelayClient,
    key: Identity,
    group_id: bytes,
    me: Identity,
    acked: dict[bytes, int],
    big_objects: dict[bytes, bytes],
) -> None:
    while True:  # the client may still be reconnecting to the restarted relayd
        try:
            async with MailboxClient.open(
                relay, key, me.node_id, group_id=group_id, notify=False
            ) as client:
                held: dict[bytes, int] = {}
                after = 0
                while True:
                    page = await client.request(wire.Pull(after, 1000), wire.Items)
                    for item in page.items:
                        if isinstance(item, wire.EntryItem):
                            held[hashlib.blake2b(item.raw).digest()] = item.cursor
                        else:
                            held[item.object_id] = item.cursor
                    if page.items:
                        after = page.items[-1].cursor
                    if not page.has_more:
                        break
                for name, cursor in acked.items():
                    assert held.get(name) == cursor  # acknowledged: kept, same cursor
                assert sorted(held.values()) == list(range(1, len(held) + 1))  # no gaps
                for oid, sealed in big_objects.items():
                    got = await client.request(wire.Fetch(oid), wire.ObjectData)
                    assert got.data == sealed
                return
        except trio.BrokenResourceError:
            await trio.sleep(0.1)


# --- choosing the push mode: config.toml and the daemon flag -------------------------------


def test_mailbox_mode_from_config_toml_and_the_daemon_flag(
    make_home: Callable[..., Home],
) -> None:
    from p2psync.cli import build_parser
    from p2psync.daemon import options_for
    from p2psync.errors import ConfigError
    from p2psync.home import parse_config_untrusted

    home = make_home("a", GroupSecret.generate(os.urandom))
    assert options_for(home, listen="127.0.0.1:0", peers=[]).mailbox == "auto"  # the default
    home.config_file.write_text('name = "a"\nmailbox = "pull"\n')
    assert home.load_config().mailbox == "pull"
    assert options_for(home, listen="127.0.0.1:0", peers=[]).mailbox == "pull"
    # The flag wins over the file.
    args = build_parser().parse_args(["daemon", "--mailbox", "always"])
    assert args.mailbox == "always"
    assert options_for(home, listen="127.0.0.1:0", peers=[], mailbox=args.mailbox).mailbox == (
        "always"
    )
    with pytest.raises(ConfigError, match="choose one of auto, always, pull, off"):
        options_for(home, listen="127.0.0.1:0", peers=[], mailbox="sometimes")
    # Rewriting config.toml (here: setting the relay) keeps the mode.
    home.set_relay(f"{Identity.generate(os.urandom).node_id}@127.0.0.1:3478")
    assert home.load_config().mailbox == "pull"
    for text in ('mailbox = "never"', "mailbox = 1"):
        with pytest.raises(ConfigError, match=r"config.toml: .*auto, always, pull"):
            parse_config_untrusted(text, "config.toml")
