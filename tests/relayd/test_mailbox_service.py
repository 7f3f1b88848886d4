"""The mailbox service of a real relayd over loopback QUIC: proof, NOTIFY, metrics."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from p2psync.crypto.group import GroupSecret, mailbox_key
from p2psync.crypto.identity import Identity
from p2psync.defaults import CHUNK_SIZE
from p2psync.mailbox_sync import MailboxClient, MailboxError
from p2psync.net.endpoint import EndpointConfig, open_endpoint
from p2psync.net.relay_client import RelayClient, RelayClientConfig, open_relay_client
from p2psync.net.service_stream import ServiceRefused
from p2psync.proto import mailbox as wire
from p2psync.proto.entry import Kind, decode_entry_untrusted, sign_entry
from p2psync.proto.mailbox import MailboxErrorCode
from p2psync.proto.relay import RELAY_ALPN
from p2psync.proto.services import ServiceRefusal
from p2psync.store.objects import Meta, ObjectKind, object_id, seal, seal_meta
from relayd import defaults as relayd_defaults
from relayd.config import HostPort, MailboxConfig, RelaydConfig
from relayd.mailbox import MailboxStore
from relayd.mailbox_service import MailboxService
from relayd.metrics import Registry
from relayd.relay import RelaydAddresses, serve

LOOPBACK = HostPort("127.0.0.1", 0)
FAST = RelayClientConfig(backoff_initial=0.05, backoff_max=0.2, ping_interval=0.5)


@asynccontextmanager
async def relay_at(data: Path | None) -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(
        listen=LOOPBACK, http=LOOPBACK, data_dir=None if data is None else str(data)
    )
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def device(relay: RelaydAddresses) -> AsyncIterator[tuple[Identity, RelayClient]]:
    identity = Identity.generate(os.urandom)
    config = EndpointConfig(bind_host="127.0.0.1", alpn=(RELAY_ALPN,))
    async with (
        open_endpoint(identity, config) as endpoint,
        open_relay_client(
            endpoint, identity, relay.udp, relay.node_id, (), config=FAST, rng=random.Random(2)
        ) as client,
    ):
        await client.wait_connected()
        yield identity, client


async def metrics(http: HostPort) -> str:
    stream = await trio.open_tcp_stream(http.host, http.port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        chunks = []
        while data := await stream.receive_some(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


def entry(
    identity: Identity,
    group_id: bytes,
    sealed_meta: bytes,
    seq: int,
    prev: bytes,
    *,
    blob: bytes = b"",
    size: int = 0,
) -> bytes:
    return sign_entry(
        identity, group_id=group_id, seq=seq, prev=prev, hlc=(time.time_ns() // 1_000_000) << 16,
        kind=Kind.PUT if blob else Kind.DELETE, blob=blob, size=size, meta=sealed_meta,
    ).encode()  # fmt: skip


async def test_notify_proof_and_metrics_over_quic(tmp_path: Path) -> None:
    keys = GroupSecret.generate(os.urandom).keys()
    key = mailbox_key(keys)
    meta = seal_meta(keys, Meta(key="k"), os.urandom)
    with trio.fail_after(30):
        async with (
            relay_at(tmp_path / "data") as relay,
            device(relay) as (a, a_relay),
            device(relay) as (b, b_relay),
        ):
            # A stranger's key does not open the group's mailbox.
            stranger = mailbox_key(GroupSecret.generate(os.urandom).keys())
            stream = await b_relay.open_service(wire.SERVICE, wire.VERSION, wire.MAX_FRAME)
            challenge = wire.decode_relay_to_node_untrusted(await stream.receive() or b"")
            assert isinstance(challenge, wire.Challenge)
            forged = wire.sign_join(stranger, keys.group_id, relay.node_id, b.node_id,
                                    challenge.nonce, notify=True)  # fmt: skip
            await stream.send(wire.encode(replace(forged, mailbox=key.node_id.raw)))
            error = wire.decode_relay_to_node_untrusted(await stream.receive() or b"")
            assert isinstance(error, wire.Error) and error.code == MailboxErrorCode.BAD_PROOF
            assert await stream.receive() is None  # fatal: the relay ended the stream
            await stream.aclose()
            # Members: B listens, A pushes; B hears of it, A (the pusher) does not.
            async with (
                MailboxClient.open(
                    b_relay, key, b.node_id, group_id=keys.group_id, notify=True
                ) as listener,
                MailboxClient.open(
                    a_relay, key, a.node_id, group_id=keys.group_id, notify=True
                ) as pusher,
            ):
                raw = entry(a, keys.group_id, meta, 1, b"")
                pushed = await pusher.request(wire.PushEntry(raw), wire.Pushed)
                assert (pushed.cursor, pushed.new) == (1, True)
                await listener.wait_notify(0)
                assert listener.notified == 1
                page = await listener.request(wire.Pull(0, 10), wire.Items)
                assert page.items == (wire.EntryItem(1, raw),) and page.head == 1
                assert pusher.notified == 0
                with pytest.raises(MailboxError) as refused:
                    await pusher.request(wire.PushEntry(b"\x93\x01\x02\x03"), wire.Pushed)
                assert refused.value.code == MailboxErrorCode.BAD_ENTRY
                # Not fatal: the stream goes on.
                again = await pusher.request(wire.PushEntry(raw), wire.Pushed)
                assert (again.cursor, again.new) == (1, False)
                # A 1 MiB chunk (a file) that rots on disk is dropped at FETCH, and counted.
                sealed = seal(keys, ObjectKind.CHUNK, os.urandom(CHUNK_SIZE))
                oid = object_id(sealed)
                put = entry(a, keys.group_id, meta, 2, decode_entry_untrusted(raw).entry_id,
                            blob=oid, size=CHUNK_SIZE)  # fmt: skip
                await pusher.request(wire.PushEntry(put), wire.Pushed)
                await pusher.request(wire.PushChunk(oid, oid, sealed), wire.Pushed)
                (file,) = (tmp_path / "data" / "mailbox" / "objects").rglob(oid.hex())
                file.write_bytes(b"rot")
                await listener.send(wire.Fetch(oid))
                gone = await listener.reply()
                assert isinstance(gone, wire.Error) and gone.code == MailboxErrorCode.NOT_FOUND
            text = await metrics(relay.http)
    assert "relayd_mailbox_groups 1" in text
    assert "relayd_mailbox_items 2" in text  # two entries; the rotten chunk is gone
    # Bytes held: those two entries, each charged its size and the per-item overhead.
    held = re.search(r"^relayd_mailbox_bytes (\S+)$", text, re.MULTILINE)
    overhead = relayd_defaults.MAILBOX_ITEM_OVERHEAD_BYTES
    assert held is not None and float(held[1]) == len(raw) + len(put) + 2 * overhead
    assert 'relayd_mailbox_evictions_total{reason="damaged"} 1' in text
    assert 'relayd_mailbox_rejections_total{reason="bad-proof"} 1' in text
    assert 'relayd_mailbox_rejections_total{reason="bad-entry"} 1' in text
    assert 'relayd_mailbox_requests_total{op="push-entry",result="duplicate"} 1' in text
    # The listener heard of pushes 1, 2 and 3 (the last two may come coalesced).
    notifies = re.search(r"^relayd_mailbox_notifies_total (\d+)$", text, re.MULTILINE)
    assert notifies is not None and int(notifies[1]) in (2, 3)
    assert 'relayd_mailbox_evictions_total{reason="expired"} 0' in text


async def test_relay_without_data_dir_offers_no_mailbox() -> None:
    key = mailbox_key(GroupSecret.generate(os.urandom).keys())
    with trio.fail_after(20):
        async with relay_at(None) as relay, device(relay) as (me, client):
            with pytest.raises(ServiceRefused) as refused:
                async with MailboxClient.open(
                    client, key, me.node_id, group_id=b"\0" * 32, notify=False
                ):
                    pass
            assert refused.value.code == ServiceRefusal.UNKNOWN_SERVICE


async def test_cleanup_steps_let_requests_in_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long cleanup pass releases the store lock between batches: a push is served meanwhile."""
    monkeypatch.setattr(relayd_defaults, "MAILBOX_CLEANUP_BATCH", 5)
    keys = GroupSecret.generate(os.urandom).keys()
    mailbox = mailbox_key(keys).node_id.raw
    meta = seal_meta(keys, Meta(key="k"), os.urandom)
    me = Identity.generate(os.urandom)
    raws, prev = [], b""
    for seq in range(1, 42):
        raws.append(entry(me, keys.group_id, meta, seq, prev))
        prev = decode_entry_untrusted(raws[-1]).entry_id
    clock = [time.time()]
    with MailboxStore.open(
        tmp_path / "mailbox", MailboxConfig(min_free_bytes=0, retention_s=60)
    ) as store:
        registry = Registry()
        service = MailboxService(store, Identity.generate(os.urandom).node_id, registry,
                                 log_interval=10.0, wall_clock=lambda: clock[0])  # fmt: skip
        store.join(mailbox, me.node_id.raw, clock[0])
        for raw in raws[:40]:
            store.push_entry(mailbox, me.node_id.raw, raw, clock[0])
        clock[0] += 61  # all 40 expired
        order: list[str] = []

        async def clean() -> None:
            result = await service.cleanup()
            order.append(f"cleanup {result.expired}")

        async def push() -> None:
            pushed = await service._run(
                store.push_entry, mailbox, me.node_id.raw, raws[40], clock[0]
            )
            order.append(f"push {pushed.cursor}")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(clean)
                while not service._lock.locked():
                    await trio.lowlevel.checkpoint()
                nursery.start_soon(push)
        assert order == ["push 41", "cleanup 40"]
        assert store.cursors(mailbox) == [41]
    assert 'relayd_mailbox_evictions_total{reason="expired"} 40' in registry.render()
