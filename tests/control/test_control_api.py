"""The daemon's control API over a real Unix socket, against a real running node.

Drives the socket the way a non-Python app would: raw JSON lines. Covers
every method, the error codes, ``pull`` with cursors, the ``subscribe``
stream (backlog, live entries, peer events, cancel, busy) and clients that
vanish mid-stream without leaving anything behind in the daemon.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from p2psync import defaults, ops
from p2psync.api import PeerConnected, SyncProgress, Transfer
from p2psync.control.client import DaemonError, connect_if_running
from p2psync.control.daemon import control_server_for
from p2psync.control.protocol import SOCKET_NAME
from p2psync.control.server import ControlServer
from p2psync.crypto.group import GroupSecret
from p2psync.home import Home
from p2psync.node import Node, NodeOptions, StaticPeer, open_node
from p2psync.proto.entry import Kind
from p2psync.store.objects import Meta
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses
from relayd.relay import serve as relayd_serve

LOOPBACK = ("127.0.0.1", 0)


class Line:
    """A blocking JSON-lines connection, as a shell script or another language would hold."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))  # blocking: a timeout would fail on a full backlog
        self.sock.settimeout(20)
        self.reader = self.sock.makefile("rb")

    def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.sock.sendall(data)

    def read(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line, "daemon closed the connection"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def call(self, method: str, request_id: int = 1, **params: Any) -> dict[str, Any]:
        self.send({"id": request_id, "method": method, "params": params})
        return self.read()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return trio.to_thread.run_sync(fn, *args)


@asynccontextmanager
async def daemon(home: Home, options: NodeOptions) -> AsyncIterator[tuple[Node, ControlServer]]:
    """A node serving its control socket (what `p2psync daemon` runs)."""
    async with open_node(home, options) as node, trio.open_nursery() as nursery:
        server = control_server_for(node)
        await nursery.start(server.serve, home.path / SOCKET_NAME)
        yield node, server
        nursery.cancel_scope.cancel()


@pytest.fixture
def home(make_home: Callable[..., Home]) -> Home:
    return make_home("a", GroupSecret.generate(os.urandom))


@pytest.fixture
def make_home(tmp_path: Path) -> Callable[..., Home]:
    def make(name: str, secret: GroupSecret) -> Home:
        home = Home(tmp_path / name)
        home.init(os.urandom, name=name)
        home.save_secret(secret)
        return home

    return make


async def test_every_request_and_its_errors(home: Home, tmp_path: Path) -> None:
    source = tmp_path / "photo.jpg"
    source.write_bytes(os.urandom(3 * 1024 * 1024))
    with trio.fail_after(60):
        async with daemon(home, NodeOptions(listen=LOOPBACK)) as (node, _):
            sock = home.path / SOCKET_NAME
            assert oct(os.stat(sock).st_mode & 0o777) == "0o600"

            def script() -> dict[str, Any]:
                c = Line(sock)
                out: dict[str, Any] = {}
                out["text"] = c.call("put", 1, key="notes/a", text="héllo", meta={"pinned": True})
                data = base64.b64encode(b"\x00\xff").decode()
                out["b64"] = c.call("put", 2, key="bin", base64=data)
                out["path"] = c.call("put", 3, path=str(source), progress=True)
                progress = [out["path"]]
                while "event" in progress[-1]:
                    progress.append(c.read())
                out["progress"] = progress
                out["get_inline"] = c.call("get", 4, target="notes/a")
                out["get_file"] = c.call("get", 5, target="photo.jpg", output=str(tmp_path / "o"))
                out["ls"] = c.call("ls", 6)
                out["pull1"] = c.call("pull", 7, after=0, limit=2)
                out["pull2"] = c.call("pull", 8, after=out["pull1"]["result"]["cursor"])
                out["rm"] = c.call("rm", 9, key="bin")
                out["rm_again"] = c.call("rm", 10, key="bin")
                out["get_deleted"] = c.call("get", 11, target="bin")
                out["too_big_inline"] = c.call("get", 12, target="photo.jpg")
                photo_blob = progress[-1]["result"]["blob"]  # by blob id: refused before reading
                out["too_big_blob"] = c.call("get", 23, target=photo_blob)
                out["status"] = c.call("status", "s")
                out["peers"] = c.call("peers", 13)
                out["whoami"] = c.call("whoami", 14)
                out["invite"] = c.call("invite", 15, lifetime=60)
                out["short_nowhere"] = c.call("invite", 24, short=True)  # no relay, no LAN
                out["unknown"] = c.call("frobnicate", 16)
                out["bad_limit"] = c.call("pull", 17, limit=0)
                out["two_sources"] = c.call("put", 18, key="x", text="a", base64="YQ==")
                out["bad_meta"] = c.call("put", 19, key="x", text="a", meta={"f": 1.5})
                out["bad_file"] = c.call("put", 20, path=str(tmp_path / "missing"))
                c.send(b'{"id": 21, "method": "ls"\n')  # malformed JSON
                out["malformed"] = c.read()
                out["still_fine"] = c.call("whoami", 22)
                c.close()
                return out

            out = await in_thread(script)

    text = out["text"]["result"]
    assert (text["kind"], text["key"], text["size"], text["meta"]) == (
        "put",
        "notes/a",
        6,
        {"pinned": True},
    )
    assert out["b64"]["result"]["size"] == 2
    events = [r["event"] for r in out["progress"][:-1]]
    assert events and all(e["type"] == "progress" for e in events)
    assert all(isinstance(e["rate"], float) and e["rate"] >= 0 for e in events)
    last = events[-1]
    assert last.pop("rate") > 0  # bytes/s since the put began
    assert last == {
        "type": "progress",
        "bytes_done": 3 * 1024 * 1024,
        "bytes_total": 3 * 1024 * 1024,
        "finished": True,
    }
    assert out["progress"][-1]["result"]["key"] == "photo.jpg"
    assert out["get_inline"]["result"]["text"] == "héllo"
    assert base64.b64decode(out["get_inline"]["result"]["base64"]) == "héllo".encode()
    assert (tmp_path / "o").read_bytes() == source.read_bytes()
    assert [row["key"] for row in out["ls"]["result"]] == ["bin", "notes/a", "photo.jpg"]
    page1, page2 = out["pull1"]["result"], out["pull2"]["result"]
    assert [c["key"] for c in page1["changes"]] == ["notes/a", "bin"] and page1["more"]
    assert [c["key"] for c in page2["changes"]] == ["photo.jpg"] and not page2["more"]
    assert page2["cursor"] == page2["changes"][-1]["cursor"] > page1["cursor"]
    assert out["rm"]["result"]["kind"] == "delete" and out["rm"]["result"]["deleted"]
    assert out["rm_again"]["error"]["code"] == "not-found"
    assert out["get_deleted"]["error"]["code"] == "not-found"
    assert out["too_big_inline"]["error"]["code"] == "too-large"
    assert out["too_big_blob"]["error"]["code"] == "too-large"
    assert f"is {3 * 1024 * 1024} bytes" in out["too_big_blob"]["error"]["message"]
    status = out["status"]
    assert status["id"] == "s" and status["result"]["node_id"] == str(node.node_id)
    assert {"peers", "transfers", "counters"} <= set(status["result"])
    assert out["peers"]["result"] == []
    assert out["whoami"]["result"]["home"] == str(home.path)
    assert out["invite"]["result"]["ticket"]
    for name, code in [
        ("unknown", "unknown-method"),
        ("bad_limit", "bad-params"),
        ("two_sources", "bad-params"),
        ("bad_meta", "bad-params"),
        ("bad_file", "bad-params"),
        ("short_nowhere", "bad-params"),
    ]:
        assert out[name]["error"]["code"] == code, (name, out[name])
        assert out[name]["error"]["message"]
    assert out["unknown"]["id"] == 16
    assert out["malformed"] == {
        "id": None,
        "error": {"code": "bad-request", "message": out["malformed"]["error"]["message"]},
    }
    assert out["still_fine"]["id"] == 22 and "result" in out["still_fine"]


async def test_subscribe_backlog_live_cancel_and_busy(home: Home) -> None:
    with trio.fail_after(60):
        async with daemon(home, NodeOptions(listen=LOOPBACK)) as (node, _):
            first = await node.put(b"one", key="k/1")
            await node.put(b"two", key="k/2")
            sock = home.path / SOCKET_NAME

            def script() -> dict[str, Any]:
                c, writer = Line(sock), Line(sock)
                c.send({"id": "sub", "method": "subscribe", "params": {"after": first.cursor}})
                backlog = c.read()
                writer.call("put", 1, key="k/3", text="three")  # while subscribed
                live = c.read()
                c.send({"id": 5, "method": "ls"})
                busy = c.read()
                c.send({"id": 6, "method": "cancel"})
                done = c.read()
                after = c.call("whoami", 7)  # the connection is usable again
                c.close()
                writer.close()
                return {
                    "backlog": backlog,
                    "live": live,
                    "busy": busy,
                    "done": done,
                    "after": after,
                }

            out = await in_thread(script)
    assert out["backlog"]["id"] == "sub"
    assert out["backlog"]["event"]["type"] == "entry-added"
    assert out["backlog"]["event"]["entry"]["key"] == "k/2"  # after the cursor: not k/1
    assert out["live"]["event"]["entry"]["key"] == "k/3"
    assert out["live"]["event"]["entry"]["cursor"] > out["backlog"]["event"]["entry"]["cursor"]
    assert out["busy"] == {"id": 5, "error": out["busy"]["error"]}
    assert out["busy"]["error"]["code"] == "busy"
    assert out["done"] == {"id": "sub", "result": {"done": True, "cancelled": True}}
    assert "result" in out["after"]


async def test_subscribe_reports_peers_and_their_entries(make_home: Callable[..., Home]) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(60):
        async with daemon(a_home, NodeOptions(listen=LOOPBACK)) as (a, _):
            await a.put(b"from a", key="a/note")
            c = await in_thread(Line, a_home.path / SOCKET_NAME)
            wanted = ["peer-connected", "entry-added", "peer-disconnected"]
            c.send({"id": 1, "method": "subscribe", "params": {"events": wanted}})
            own = (await in_thread(c.read))["event"]  # the stream is open before B appears
            assert own["entry"]["key"] == "a/note"
            peer_a = StaticPeer(a.node_id, ("127.0.0.1", a.endpoint.local_address[1]))
            async with open_node(b_home, NodeOptions(listen=LOOPBACK, peers=(peer_a,))) as b:
                await b.put(b"from b", key="b/note")
                events = [(await in_thread(c.read))["event"] for _ in range(2)]
            events.append((await in_thread(c.read))["event"])
            c.close()
    by_type = {e["type"]: e for e in events}
    assert by_type["peer-connected"]["node_id"] == str(b.node_id)
    assert by_type["peer-connected"]["path"] == "direct"
    assert by_type["entry-added"]["entry"]["key"] == "b/note"
    assert by_type["entry-added"]["entry"]["author"] == str(b.node_id)
    assert events[-1]["type"] == "peer-disconnected"


async def test_clients_leaving_mid_subscribe_leave_nothing_behind(home: Home) -> None:
    """More stream clients than the connection limit come and go; the daemon still serves."""
    with trio.fail_after(90):
        async with daemon(home, NodeOptions(listen=LOOPBACK)) as (node, server):
            await node.put(b"x", key="x")
            sock = home.path / SOCKET_NAME

            def come_and_go(count: int) -> None:
                for _ in range(count):
                    c = Line(sock)
                    c.call("subscribe", 1)  # reads the first event, then vanishes
                    c.close()
                    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    raw.connect(str(sock))  # and one that subscribes and never reads
                    raw.sendall(b'{"id": 1, "method": "subscribe"}\n')
                    raw.close()

            await in_thread(come_and_go, 40)  # 80 streams > CONTROL_MAX_CLIENTS
            for _ in range(1000):  # each EOF cancels its stream; fail_after bounds this
                if not server.clients:
                    break
                await trio.sleep(0.05)
            assert server.clients == 0
            client = await in_thread(connect_if_running, home.path)
            assert client is not None
            with client:
                assert (await in_thread(client.call, "whoami"))["node_id"] == str(node.node_id)
                with pytest.raises(DaemonError) as error:
                    await in_thread(client.call, "nope")
                assert error.value.code == "unknown-method"
                events = []

                def follow() -> None:
                    for event in client.stream("subscribe", {"after": 0}):
                        events.append(event)
                        break  # closing the generator cancels the stream

                await in_thread(follow)
                assert events[0]["entry"]["key"] == "x"
                assert (await in_thread(client.call, "pull", {"after": 0}))["cursor"] >= 1
            assert server.crashes == 0


async def test_get_pending_and_clients_that_leave_while_waiting(
    make_home: Callable[..., Home],
) -> None:
    """`get` of a value still syncing: `pending`; with wait, a client that hangs up frees all."""
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    with trio.fail_after(60):
        async with open_node(b_home, NodeOptions(listen=LOOPBACK)) as b:
            put = await b.put(os.urandom(100_000), key="far/away")  # small: inline get
            raw = b.store.entries_after(b.node_id, 0, 100)
        # B is gone for good: A gets the entry (as if B vanished right after gossiping it).
        async with daemon(a_home, NodeOptions(listen=LOOPBACK)) as (a, server):
            await a.locked(a.store.insert_entries, raw, now_ms=put.time_ms)
            sock = a_home.path / SOCKET_NAME

            def ask(**params: Any) -> dict[str, Any]:
                c = Line(sock)
                try:
                    return c.call("get", 1, **params)
                finally:
                    c.close()

            pending = await in_thread(partial(ask, target="far/away"))
            by_blob = await in_thread(partial(ask, target=str(put.blob), output=None))
            waiters = 70  # more than CONTROL_MAX_CLIENTS: held slots would lock everyone out

            def wait_and_leave() -> None:
                for i in range(waiters):
                    c = Line(sock)
                    c.send(
                        {"id": i, "method": "get", "params": {"target": "far/away", "wait": True}}
                    )
                    c.close()

            await in_thread(wait_and_leave)
            while server.abandoned < waiters or server.clients:  # noqa: ASYNC110 -- counters
                await trio.sleep(0.05)
            assert server.abandoned == waiters
            served = await in_thread(Line(sock).call, "whoami", 9)
            assert served["result"]["node_id"] == str(a.node_id)
            assert server.crashes == 0
    assert pending["error"]["code"] == "pending"
    assert by_blob["error"]["code"] == "pending"


@asynccontextmanager
async def running_relay() -> AsyncIterator[str]:
    """relayd on loopback; yields its ``NODEID@HOST:PORT``."""
    config = RelaydConfig(listen=HostPort("127.0.0.1", 0), http=HostPort("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        relay: RelaydAddresses = await nursery.start(partial(relayd_serve, config))
        yield f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
        nursery.cancel_scope.cancel()


async def test_subscribe_reports_path_changes_and_sync_progress(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reaches A through relayd only; given A's address it goes direct: path-changed.
    Then a large value from A streams in: sync-progress up to complete."""
    from p2psync.net import endpoint
    from p2psync.net.paths import Origin

    # No hole punching: the pair stays relayed until the test hands B an address.
    monkeypatch.setattr(
        "p2psync.node.EndpointConfig", partial(endpoint.EndpointConfig, hole_punching=False)
    )
    monkeypatch.setattr(defaults, "PROGRESS_INTERVAL", 0.05)  # sample often
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    big = os.urandom(24 * defaults.CHUNK_SIZE)
    with trio.fail_after(120):
        async with (
            running_relay() as relay,
            open_node(a_home, NodeOptions(listen=LOOPBACK, relay=relay)) as a,
        ):
            b_options = NodeOptions(
                listen=LOOPBACK, relay=relay, peers=(StaticPeer(a.node_id, None),)
            )
            async with daemon(b_home, b_options) as (b, _):
                c = await in_thread(Line, b_home.path / SOCKET_NAME)
                wanted = ["peer-connected", "path-changed", "sync-progress"]
                c.send({"id": "s", "method": "subscribe", "params": {"events": wanted}})
                connected = (await in_thread(c.read))["event"]
                await trio.sleep(20 * defaults.PROGRESS_INTERVAL)  # sampled on the relay
                a_port = a.endpoint.local_address[1]
                b.endpoint.add_candidate(a.node_id, ("127.0.0.1", a_port), Origin.LOOKUP)
                changed = (await in_thread(c.read))["event"]
                put = await a.put(big, key="media/big.bin")
                progress = []
                while not progress or not progress[-1]["complete"]:
                    event = (await in_thread(c.read))["event"]
                    assert event["type"] == "sync-progress", event
                    progress.append(event)
                assert await b.get("media/big.bin") == big
                c.close()
    assert connected == {
        "type": "peer-connected",
        "node_id": str(a.node_id),
        "path": "relay",
        "address": None,
    }
    assert changed == {
        "type": "path-changed",
        "node_id": str(a.node_id),
        "path": "direct",
        "previous": "relay",
    }
    assert all(e["blob"] == put.blob and e["key"] == "media/big.bin" for e in progress)
    assert all(e["bytes_total"] == len(big) and e["rate"] >= 0 for e in progress)
    done = [e["bytes_done"] for e in progress]
    assert done == sorted(done) and done[-1] == len(big)


async def test_short_invites_over_the_socket(home: Home) -> None:
    """invite short:true offers a code through the relay; revoke-invite closes it."""
    with trio.fail_after(60):
        async with (
            running_relay() as relay,
            daemon(home, NodeOptions(listen=LOOPBACK, relay=relay)) as (node, _),
        ):
            sock = home.path / SOCKET_NAME

            def script() -> dict[str, Any]:
                c = Line(sock)
                out = {"offer": c.call("invite", 1, short=True, lifetime=60)}
                code = out["offer"]["result"]["code"]
                out["open_before"] = len(node.invites)
                out["revoke"] = c.call("revoke-invite", 2, code=code)
                out["revoke_again"] = c.call("revoke-invite", 3, code=code)
                out["bad_code"] = c.call("revoke-invite", 4, code="not-a-code")
                out["no_code"] = c.call("revoke-invite", 5)
                c.close()
                return out

            out = await in_thread(script)
    offer = out["offer"]["result"]
    assert re.fullmatch(r"[0-9A-Z]{4}(-[0-9A-Z]{4}){3}", offer["code"]), offer
    assert offer["relay"] == relay and offer["lan"] == "off" and offer["relay_problem"] is None
    assert offer["expires"] <= time.time() + 60 + 1
    assert out["open_before"] == 1
    assert out["revoke"] == {"id": 2, "result": {"revoked": True}}
    assert out["revoke_again"] == {"id": 3, "result": {"revoked": False}}
    assert out["bad_code"]["error"]["code"] == "bad-params"
    assert out["no_code"]["error"]["code"] == "bad-params"


async def test_a_broken_config_is_a_config_error(home: Home) -> None:
    with trio.fail_after(30):
        async with daemon(home, NodeOptions(listen=LOOPBACK)) as _:
            home.config_file.write_text("name = [unclosed\n")  # edited while the daemon runs
            reply = await in_thread(Line(home.path / SOCKET_NAME).call, "status", 1)
    assert reply["id"] == 1 and reply["error"]["code"] == "config"
    assert "config.toml" in reply["error"]["message"]
    assert "not valid TOML" in reply["error"]["message"]


async def test_devices_lists_members_who_added_them_and_when_each_was_seen(
    tmp_path: Path,
) -> None:
    """``devices``: the rows of `p2psync devices --json`, live from the daemon."""
    a_home = Home(tmp_path / "a")
    a_home.init(os.urandom, name="laptop")
    secret = ops.create_group(a_home)  # records the laptop as the first member
    b_home = Home(tmp_path / "b")
    b_home.init(os.urandom, name="phone")
    b_home.save_secret(secret)
    a_id, b_id = str(a_home.load_identity().node_id), str(b_home.load_identity().node_id)
    with a_home.open_store() as store:  # what the laptop records when the phone joins
        member = Meta(
            key="", content_type="device", name="phone", app={"node_id": b_id, "added_by": a_id}
        )
        store.append(Kind.MEMBER, member, now_ms=ops.now_ms())

    def phone(rows: list[dict[str, Any]]) -> dict[str, Any]:
        (row,) = [r for r in rows if r["node_id"] == b_id]
        return row

    with trio.fail_after(60):
        async with daemon(a_home, NodeOptions(listen=LOOPBACK)) as (a, _):
            c = await in_thread(Line, a_home.path / SOCKET_NAME)
            before = time.time()
            rows = (await in_thread(c.call, "devices"))["result"]
            assert [(r["name"], r["node_id"], r["added_by"]) for r in rows] == [
                ("laptop", a_id, None),
                ("phone", b_id, a_id),
            ]
            assert rows[0]["this_device"] and rows[0]["connected"] is None
            assert rows[0]["last_seen"] >= before
            assert all(abs(r["added_ms"] / 1000 - before) < 60 for r in rows)
            assert phone(rows)["connected"] is False and phone(rows)["last_seen"] is None

            async def devices_once(check: Callable[[dict[str, Any]], bool]) -> Any:
                """Ask ``devices`` until the phone's row passes ``check`` (no event for it)."""
                while True:
                    rows = (await in_thread(c.call, "devices"))["result"]
                    if check(phone(rows)):
                        return rows
                    await trio.sleep(0.05)

            peer_a = StaticPeer(a.node_id, ("127.0.0.1", a.endpoint.local_address[1]))
            async with open_node(b_home, NodeOptions(listen=LOOPBACK, peers=(peer_a,))):
                rows = await devices_once(lambda row: bool(row["connected"]))
                assert phone(rows)["path"] == "direct" and not phone(rows)["this_device"]
            rows = await devices_once(lambda row: not row["connected"])
            assert phone(rows)["last_seen"] >= before  # when the phone was last connected
            c.close()


async def test_subscribe_reports_drops_only_of_the_events_it_asked_for(home: Home) -> None:
    """A flood of event types the client did not ask for is never queued: no events-dropped."""
    with trio.fail_after(30):
        async with daemon(home, NodeOptions(listen=LOOPBACK)) as (node, _):
            await node.put(b"x", key="k")
            c = await in_thread(Line, home.path / SOCKET_NAME)
            wanted = ["entry-added", "peer-connected"]
            c.send({"id": 1, "method": "subscribe", "params": {"events": wanted}})
            backlog = (await in_thread(c.read))["event"]  # the status stream is open by now
            assert backlog["entry"]["key"] == "k"
            progress = SyncProgress(Transfer("ab" * 32, "k", 1, 2, 0.0, False))
            for _ in range(3 * defaults.EVENT_QUEUE_MAX):  # no checkpoint: the queue overflows
                node.events_hub.publish(progress)
            node.events_hub.publish(PeerConnected("a-peer", "direct", None))
            first = (await in_thread(c.read))["event"]
            assert first == {"type": "peer-connected", "node_id": "a-peer", "path": "direct",
                             "address": None}  # fmt: skip
            c.close()
