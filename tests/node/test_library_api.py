"""The library API as an app uses it: put/get/pull/subscribe/delete/events on real nodes.

The promise under test: every change (local or from a peer) reaches an app
that follows ``pull`` then ``subscribe`` exactly once, in cursor order, even
across a restart of the node; deletes are tombstones that sync.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel

import p2psync
from p2psync import defaults
from p2psync.api import (
    Change,
    EventHub,
    EventsDropped,
    PeerConnected,
    PeerDisconnected,
    RateMeter,
    SyncProgress,
    Transfer,
    TransferTracker,
)
from p2psync.crypto.group import GroupSecret
from p2psync.errors import LocalProtocolError, NotFound
from p2psync.home import Home
from p2psync.node import Node, NodeOptions, StaticPeer
from p2psync.pairing import JoinRefused
from p2psync.store import BlobPending
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses
from relayd.relay import serve as relayd_serve

LOOPBACK = ("127.0.0.1", 0)


async def collect(node: Node, after: int, count: int) -> tuple[list[Change], int]:
    """The next ``count`` changes after ``after`` via subscribe, and the cursor reached."""
    seen: list[Change] = []
    subscription = node.subscribe(after=after)
    async for change in subscription:
        seen.append(change)
        if len(seen) == count:
            break
    return seen, subscription.cursor


async def arrival(node: Node, key: str) -> Change:
    """Wait for the first change of ``key`` to reach ``node`` (its blob may be pending)."""
    async for change in node.subscribe(after=0):
        if change.key == key:
            return change
    raise AssertionError("unreachable: subscribe never ends")


def assert_exactly_once(changes: list[Change]) -> None:
    cursors = [c.cursor for c in changes]
    assert cursors == sorted(set(cursors)), "cursors must rise strictly: no repeats, in order"
    ids = [(c.author, c.seq) for c in changes]
    assert len(ids) == len(set(ids)), "an entry was delivered twice"


def peer_of(node: Node) -> StaticPeer:
    return StaticPeer(node.node_id, ("127.0.0.1", node.endpoint.local_address[1]))


async def test_put_get_every_source_and_meta(tmp_path: Path) -> None:
    home = p2psync.init(tmp_path / "a", name="a")
    p2psync.create_group(home)
    source = tmp_path / "report.txt"
    source.write_bytes(b"quarterly numbers\n")
    big = os.urandom(3 * defaults.CHUNK_SIZE + 17)
    with trio.fail_after(30):
        async with p2psync.open_node(home, NodeOptions(listen=LOOPBACK)) as node:
            note = await node.put(b"buy milk", key="notes/today", meta={"pinned": True, "n": 2})
            assert (note.kind, note.key, note.size, note.pending) == (
                "put",
                "notes/today",
                8,
                False,
            )
            assert dict(note.meta) == {"pinned": True, "n": 2}
            from_path = await node.put(source)  # a path: key defaults to the file name
            assert (from_path.key, from_path.name, from_path.content_type) == (
                "report.txt",
                "report.txt",
                "text/plain",
            )
            done: list[int] = []
            streamed = await node.put(io.BytesIO(big), key="big.bin", progress=done.append)
            assert streamed.size == len(big) and done[-1] == len(big) and len(done) == 4

            assert await node.get("notes/today") == b"buy milk"
            assert await node.get(str(streamed.blob)) == big  # by blob id too
            chunks = [chunk async for chunk in node.get_stream("big.bin")]
            assert b"".join(chunks) == big and len(chunks) == 4
            out = tmp_path / "copy.bin"
            assert await node.get_to_path("big.bin", out) == len(big)
            assert out.read_bytes() == big

            with pytest.raises(LocalProtocolError, match="needs a key"):
                await node.put(b"no key")
            with pytest.raises(LocalProtocolError, match="values are"):
                await node.put(b"x", key="k", meta={"bad": 1.5})  # type: ignore[dict-item]
            with pytest.raises(NotFound):
                await node.get("no/such/key")
            with pytest.raises(NotFound):
                [c async for c in node.get_stream("no/such/key")]

            page = await node.pull(after=0, limit=2)
            assert [c.kind for c in page] == ["member", "put"] and page.more
            rest = await node.pull(after=page.cursor)
            assert [c.key for c in rest] == ["report.txt", "big.bin"] and not rest.more
            assert (await node.pull(after=rest.cursor)).changes == ()
            with pytest.raises(LocalProtocolError):
                await node.pull(after=0, limit=defaults.PULL_MAX_LIMIT + 1)


async def test_pull_then_subscribe_misses_nothing_while_writes_race(tmp_path: Path) -> None:
    home = p2psync.init(tmp_path / "a")
    p2psync.create_group(home)
    writes = 300
    with trio.fail_after(60):
        async with p2psync.open_node(home, NodeOptions(listen=LOOPBACK)) as node:

            async def writer() -> None:
                for i in range(writes):
                    await node.put(b"%d" % i, key=f"race/{i}")
                    if i % 7 == 0:
                        await trio.lowlevel.checkpoint()

            seen: list[Change] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                cursor = 0
                for _ in range(3):  # a few pages while the writer runs
                    page = await node.pull(after=cursor, limit=20)
                    seen.extend(page)
                    cursor = page.cursor
                more, _ = await collect(node, cursor, writes + 1 - len(seen))
                seen.extend(more)
            assert_exactly_once(seen)
            assert {c.key for c in seen if c.kind == "put"} == {f"race/{i}" for i in range(writes)}


async def test_subscribe_follows_a_peer_across_a_restart(
    make_home: Callable[..., Home],
) -> None:
    """Entries from B reach A's app once each: before, during and after A restarts."""
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    first, during, after = 40, 30, 20
    total = first + during + after
    with trio.fail_after(120):
        async with (
            p2psync.open_node(b_home, NodeOptions(listen=LOOPBACK)) as b,
            b.events() as events,
        ):
            a_options = NodeOptions(listen=LOOPBACK, peers=(peer_of(b),))
            async with p2psync.open_node(a_home, a_options) as a:
                connected = await events.__anext__()
                assert isinstance(connected, PeerConnected)
                assert connected.node_id == str(a.node_id) and connected.path == "direct"
                for i in range(first):
                    await b.put(b"b%d" % i, key=f"b/{i}")
                # The app processes only half of them before A stops.
                seen, saved = await collect(a, 0, first // 2)
            # A is down: B keeps writing (local first).
            for i in range(first, first + during):
                await b.put(b"b%d" % i, key=f"b/{i}")
            async with p2psync.open_node(a_home, a_options) as a2:
                for i in range(first + during, total):
                    await b.put(b"b%d" % i, key=f"b/{i}")
                rest, _ = await collect(a2, saved, total - len(seen))
                seen.extend(rest)
                assert await a2.get(f"b/{total - 1}", wait=True) == b"b%d" % (total - 1)
    assert_exactly_once(seen)
    puts = [c for c in seen if c.kind == "put"]
    assert [c.key for c in puts] == [f"b/{i}" for i in range(total)]  # B's order is kept
    assert {c.author for c in puts} == {str(b.node_id)}


async def test_delete_is_a_tombstone_that_syncs(make_home: Callable[..., Home]) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(60):
        async with p2psync.open_node(a_home, NodeOptions(listen=LOOPBACK)) as a:
            b_options = NodeOptions(listen=LOOPBACK, peers=(peer_of(a),))
            async with p2psync.open_node(b_home, b_options) as b:
                start = (await b.pull(after=0)).cursor
                big = os.urandom(2 * defaults.CHUNK_SIZE)
                put = await a.put(big, key="doomed")
                objects_before = a.store.stats()["objects"]
                await arrival(b, "doomed")
                assert await b.get("doomed", wait=True) == big

                tombstone = await a.delete("doomed")
                assert (tombstone.kind, tombstone.seq) == ("delete", put.seq + 1)
                assert a.store.stats()["objects"] < objects_before  # chunks freed at once
                with pytest.raises(NotFound, match="was deleted"):
                    await a.get("doomed")
                with pytest.raises(NotFound, match="no key named"):
                    await a.delete("doomed")  # nothing live to delete
                with pytest.raises(NotFound, match="no key named"):
                    await a.delete("never-existed")
                assert all(row["key"] != "doomed" for row in await a.ls())

                # B's app sees the put, then the tombstone, in order.
                changes, _ = await collect(b, start, 2)
                assert [(c.kind, c.key, c.deleted) for c in changes] == [
                    ("put", "doomed", False),
                    ("delete", "doomed", True),
                ]
                assert changes[1].blob is None and changes[1].size == 0
                with pytest.raises(NotFound, match="was deleted"):
                    await b.get("doomed")

                # A write after the delete brings the key back, everywhere.
                await b.put(b"back again", key="doomed")
                revived, _ = await collect(a, tombstone.cursor, 1)
                assert revived[0].kind == "put" and not revived[0].deleted
                assert await a.get("doomed", wait=True) == b"back again"


async def test_events_report_peers_and_transfer_progress(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(defaults, "PROGRESS_INTERVAL", 0.05)  # sample often: see progress
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    big = os.urandom(24 * defaults.CHUNK_SIZE)
    with trio.fail_after(90):
        async with (
            p2psync.open_node(a_home, NodeOptions(listen=LOOPBACK)) as a,
            a.events() as events,
        ):
            b_options = NodeOptions(listen=LOOPBACK, peers=(peer_of(a),))
            async with p2psync.open_node(b_home, b_options) as b:
                put = await b.put(big, key="video.bin")
                await arrival(a, "video.bin")
                assert await a.get("video.bin", wait=True) == big
                [peer] = a.peers()
                assert peer.node_id == str(b.node_id) and peer.connected
                assert peer.path == "direct" and peer.bytes_in > len(big)
                assert a.status()["peers"][0]["node_id"] == str(b.node_id)
            received = []
            with trio.move_on_after(10):  # until B is gone and progress reported
                async for event in events:
                    received.append(event)
                    gone = any(isinstance(e, PeerDisconnected) for e in received)
                    if gone and not a.transfers():
                        break
    kinds = [type(e) for e in received]
    assert kinds[0] is PeerConnected and kinds[-1] is PeerDisconnected
    progress = [e.transfer for e in received if isinstance(e, SyncProgress)]
    # How many samples land inside the transfer depends on the machine (24
    # chunks, sampled every 50 ms: at least one); what is reported must be
    # sane: for this blob, rising, and ending complete.
    assert progress, "no sync-progress event for a 24 MiB transfer"
    assert all(t.blob == put.blob and t.key == "video.bin" for t in progress)
    assert all(t.bytes_total == len(big) and t.rate >= 0 for t in progress)
    assert [t.bytes_done for t in progress] == sorted(t.bytes_done for t in progress)
    assert progress[-1].complete and progress[-1].bytes_done == len(big)
    assert a.transfers() == []


def test_transfer_tracker_reports_progress_rate_and_completion() -> None:
    tracker = TransferTracker(chunk_size=100)
    blob, other = b"\x01" * 32, b"\x02" * 32
    tracker.track(blob, "k", 450)
    tracker.track(other, "gone", 100)
    assert tracker.update({blob: (0, 5), other: (0, 1)}, now=10.0) == []
    [moved] = tracker.update({blob: (2, 5), other: None}, now=11.0)  # other: overwritten
    assert (moved.bytes_done, moved.bytes_total, moved.complete) == (200, 450, False)
    assert moved.rate == pytest.approx(100.0)  # (200 - 0) B / 1 s, half-weighted
    assert other not in tracker
    [last] = tracker.update({blob: (5, 5)}, now=12.0)
    assert (last.bytes_done, last.complete) == (450, True)
    assert len(tracker) == 0 and tracker.transfers() == []


def test_progress_meter_knows_done_total_and_rate() -> None:
    now = [100.0]
    seen: list[p2psync.TransferProgress] = []
    meter = p2psync.ProgressMeter(total=3000, on_update=seen.append, clock=lambda: now[0])
    assert meter.progress == p2psync.TransferProgress(0, 3000, 0.0)
    now[0] = 102.0
    meter(1000)
    now[0] = 104.0
    meter(3000)
    assert seen == [
        p2psync.TransferProgress(1000, 3000, 500.0),
        p2psync.TransferProgress(3000, 3000, 750.0),  # since the meter began
    ]
    assert meter.progress.to_json() == {"bytes_done": 3000, "bytes_total": 3000, "rate": 750.0}
    unknown = p2psync.ProgressMeter(clock=lambda: 5.0)
    unknown(10)  # no time has passed: no rate yet, and no division by zero
    assert unknown.progress == p2psync.TransferProgress(10, None, 0.0)


async def test_put_and_get_report_progress_through_a_meter(tmp_path: Path) -> None:
    home = p2psync.init(tmp_path / "a")
    p2psync.create_group(home)
    big = os.urandom(3 * defaults.CHUNK_SIZE + 5)
    with trio.fail_after(30):
        async with p2psync.open_node(home, NodeOptions(listen=LOOPBACK)) as node:
            puts: list[p2psync.TransferProgress] = []
            meter = p2psync.ProgressMeter(len(big), on_update=puts.append)
            await node.put(io.BytesIO(big), key="big", progress=meter)
            gets = p2psync.ProgressMeter(len(big))
            await node.get_to_path("big", tmp_path / "out", progress=gets)
    assert [p.bytes_done for p in puts] == [(i + 1) * defaults.CHUNK_SIZE for i in range(3)] + [
        len(big)
    ]
    assert all(p.bytes_total == len(big) for p in puts) and puts[-1].rate > 0
    assert gets.progress.bytes_done == len(big) and gets.progress.rate > 0


def test_rate_meter_smooths_and_survives_counter_resets() -> None:
    meter = RateMeter(smoothing=0.5)
    assert meter.sample("x", 0, 0.0) == 0.0
    assert meter.sample("x", 1000, 1.0) == 500.0
    assert meter.sample("x", 2000, 2.0) == 750.0
    assert meter.sample("x", 10, 3.0) == 0.0  # a new connection: counters restart
    assert meter.rate("x") == 0.0 and meter.rate("never") == 0.0


async def test_get_wait_false_says_pending(make_home: Callable[..., Home]) -> None:
    """A change from a peer whose blob cannot arrive (the peer is gone) is pending."""
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(60):
        async with p2psync.open_node(b_home, NodeOptions(listen=LOOPBACK)) as b:
            put = await b.put(os.urandom(defaults.CHUNK_SIZE + 1), key="half")
            raw = b.store.entries_after(b.node_id, 0, 100)
        async with p2psync.open_node(a_home, NodeOptions(listen=LOOPBACK)) as a:
            # The entry arrives (as if B vanished right after announcing it).
            await a.locked(a.store.insert_entries, raw, now_ms=put.time_ms)
            changes, _ = await collect(a, 0, len(raw))
            [pending] = [c for c in changes if c.key == "half"]
            assert pending.pending and pending.blob == put.blob
            with pytest.raises(BlobPending):
                await a.get("half")
            with trio.move_on_after(1.5) as waited:
                await a.get("half", wait=True)
            assert waited.cancelled_caught


async def test_join_group_with_a_short_code_through_the_relay(tmp_path: Path) -> None:
    """The library's join_group passes relay= and lan= on: a short code found on relayd."""
    laptop = p2psync.init(tmp_path / "laptop", name="laptop")
    p2psync.create_group(laptop)
    phone = p2psync.init(tmp_path / "phone", name="phone")
    relay_config = RelaydConfig(listen=HostPort("127.0.0.1", 0), http=HostPort("127.0.0.1", 0))
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            relay: RelaydAddresses = await nursery.start(partial(relayd_serve, relay_config))
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            options = NodeOptions(listen=LOOPBACK, relay=relay_text)
            async with p2psync.open_node(laptop, options) as node:
                offer = await node.create_short_invite(600, lan=False)
                assert offer.relay == relay_text and offer.lan == "off"
                # No relay given, none configured, LAN search off: nowhere to look.
                with pytest.raises(JoinRefused) as nowhere:
                    await p2psync.join_group(phone, offer.code, lan=False)
                assert nowhere.value.code == "no-relay"
                joined = await p2psync.join_group(phone, offer.code, relay=relay_text, lan=False)
                assert joined.inviter == str(node.node_id)
                assert joined.relay == relay_text and joined.via in ("direct", "relay")
                assert phone.load_config().relay == relay_text  # the daemon will use it
                revocable = await node.create_short_invite(600, lan=False)
                assert node.revoke_short_invite(revocable.code)
                assert not node.revoke_short_invite(revocable.code)  # closed already
            nursery.cancel_scope.cancel()


async def test_delete_frees_only_its_own_value(tmp_path: Path) -> None:
    """A delete or an overwrite costs its value's objects, not a store-wide collection;
    shared chunks stay."""
    home = p2psync.init(tmp_path / "a")
    p2psync.create_group(home)
    chunk = defaults.CHUNK_SIZE
    shared = os.urandom(chunk)
    with trio.fail_after(60):
        async with p2psync.open_node(home, NodeOptions(listen=LOOPBACK)) as node:
            keep = await node.put(shared + b"keep", key="keep")  # 2 chunks + manifest
            await node.put(shared + b"drop", key="drop")  # shares the first chunk
            same = await node.put(shared + b"keep", key="same-as-keep")  # the same blob
            old = await node.put(os.urandom(2 * chunk), key="overwritten")
            objects = node.store.stats()["objects"]
            await node.put(b"new", key="overwritten")  # the old value's 3 objects go at once
            assert not node.store.has_object(bytes.fromhex(str(old.blob)))
            assert node.store.stats()["objects"] == objects - 3 + 1
            objects -= 2

            await node.delete("drop")  # its manifest and its own last chunk go
            assert node.store.stats()["objects"] == objects - 2
            assert await node.get("keep") == shared + b"keep"

            await node.delete("same-as-keep")  # "keep" still holds that blob: nothing goes
            assert node.store.stats()["objects"] == objects - 2
            assert same.blob == keep.blob and await node.get(str(keep.blob)) == shared + b"keep"

            # Nothing was left behind for a full collection (`p2psync gc`) to find.
            collected = await node.locked(node.store.gc)
            assert collected.objects_removed == 0
            assert await node.get("keep") == shared + b"keep"


async def test_get_wait_returns_when_the_value_lands_not_at_the_next_status_sample(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The status sampler never ticks in this test: only the arrival itself may wake get().
    monkeypatch.setattr(defaults, "PROGRESS_INTERVAL", 3600.0)
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    big = os.urandom(64 * defaults.CHUNK_SIZE)  # seconds on loopback: pending when asked
    with trio.fail_after(90):
        async with p2psync.open_node(a_home, NodeOptions(listen=LOOPBACK)) as a:
            b_options = NodeOptions(listen=LOOPBACK, peers=(peer_of(a),))
            async with p2psync.open_node(b_home, b_options) as b:
                await b.put(big, key="late.bin")
                await arrival(a, "late.bin")  # the entry is here, its chunks are not
                with pytest.raises(BlobPending):
                    await a.get("late.bin")
                assert await a.get("late.bin", wait=True) == big  # not after 3600 s


@pytest.mark.parametrize("change", ["overwrite", "delete"])
async def test_a_reader_finishes_the_value_it_started_while_the_key_changes(
    tmp_path: Path, change: str
) -> None:
    """get_stream pins its blob: an overwrite or delete mid-read frees it only after the read."""
    home = p2psync.init(tmp_path / "a")
    p2psync.create_group(home)
    original = os.urandom(3 * defaults.CHUNK_SIZE + 17)  # 4 chunks + a manifest
    with trio.fail_after(60):
        async with p2psync.open_node(home, NodeOptions(listen=LOOPBACK)) as node:
            old = await node.put(original, key="k")
            old_blob = bytes.fromhex(str(old.blob))
            objects = node.store.stats()["objects"]
            async with node.get_stream("k") as reader:
                chunks = [await reader.__anext__()]
                if change == "overwrite":
                    await node.put(b"new", key="k")
                    added = 1
                else:
                    await node.delete("k")
                    added = 0
                # Still pinned: nothing of the old value went.
                assert node.store.has_object(old_blob)
                assert node.store.stats()["objects"] == objects + added
                chunks += [chunk async for chunk in reader]
            assert b"".join(chunks) == original
            # The reader was the last to hold it: the value's 5 objects are gone now.
            assert not node.store.has_object(old_blob)
            assert node.store.stats()["objects"] == objects + added - 5
            assert (await node.locked(node.store.gc)).objects_removed == 0


async def test_a_reader_closed_early_frees_the_value_and_other_store_handles_pin_too(
    tmp_path: Path,
) -> None:
    """A reader stopped early unpins on close; a second Store on the home (as the CLI
    opens one beside a daemon) pins through the database, which the node respects."""
    home = p2psync.init(tmp_path / "a")
    p2psync.create_group(home)
    original = os.urandom(2 * defaults.CHUNK_SIZE + 1)  # 3 chunks + a manifest
    with trio.fail_after(60):
        async with p2psync.open_node(home, NodeOptions(listen=LOOPBACK)) as node:
            old = await node.put(original, key="k")
            old_blob = bytes.fromhex(str(old.blob))

            reader = node.get_stream("k")
            assert len(await reader.__anext__()) == defaults.CHUNK_SIZE
            await node.put(b"v2", key="k")
            assert node.store.has_object(old_blob)
            await reader.aclose()  # stopped after one chunk
            assert not node.store.has_object(old_blob)

            again = await node.put(original, key="k")
            with home.open_store() as cli_store:  # another handle, as `p2psync get` has
                chunks = cli_store.iter_blob(bytes.fromhex(str(again.blob)))
                first = await trio.to_thread.run_sync(next, chunks)
                await node.delete("k")  # the node's own store honours the other's pin
                rest = await trio.to_thread.run_sync(lambda: b"".join(chunks))
                assert first + rest == original
                # The reader that unpinned last (the other handle) freed the value.
                assert not node.store.has_object(bytes.fromhex(str(again.blob)))


async def test_an_event_stream_narrowed_to_some_types_counts_only_those_as_dropped() -> None:
    hub = EventHub(limit=2)
    progress = SyncProgress(Transfer("ab" * 32, "k", 1, 2, 0.0, False))
    async with hub.open() as everything, hub.open() as peers_only:
        peers_only.only({"peer-connected"})
        for _ in range(5):
            hub.publish(progress)
        for n in range(3):
            hub.publish(PeerConnected(f"node-{n}", "direct", None))
        got = [await peers_only.__anext__() for _ in range(3)]
        assert got == [
            EventsDropped(1),  # the third peer-connected, not the progress events
            PeerConnected("node-0", "direct", None),
            PeerConnected("node-1", "direct", None),
        ]
        assert await everything.__anext__() == EventsDropped(6)
