"""Control socket over a real Unix socket: replies, errors, bounds, permissions."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from p2psync.control.client import ControlClient, DaemonError, connect_if_running
from p2psync.control.protocol import MAX_LINE, SOCKET_NAME, JsonObject
from p2psync.control.server import MAX_CLIENTS, ControlServer, EmitEvent
from p2psync.errors import ConfigError, NotFound


async def echo(params: JsonObject, emit: EmitEvent) -> Any:
    return {"echo": params}


async def missing(params: JsonObject, emit: EmitEvent) -> Any:
    raise NotFound("no key named 'x'")


async def ticks(params: JsonObject, emit: EmitEvent) -> None:
    for i in range(int(params.get("count", 3))):
        await emit({"type": "tick", "n": i})
        await trio.lowlevel.checkpoint()


class Hang:
    """A request that never finishes by itself (like `get` with wait of a blob nobody has)."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def __call__(self, params: JsonObject, emit: EmitEvent) -> Any:
        self.started += 1
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled += 1


async def slow(params: JsonObject, emit: EmitEvent) -> Any:
    await trio.sleep(float(params.get("seconds", 0.3)))
    return {"slept": True}


def server(hang: Hang | None = None) -> ControlServer:
    handlers = {"echo": echo, "missing": missing, "slow": slow, "hang": hang or Hang()}
    return ControlServer(handlers, {"ticks": ticks})


async def until(check: Callable[[], bool]) -> None:
    """Poll ``check`` (callers bound the time with fail_after)."""
    while not check():  # noqa: ASYNC110 -- server counters have no event to wait on
        await trio.sleep(0.02)


def raw_exchange(path: Path, payload: bytes, replies: int) -> list[JsonObject]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        # A refused client may find the socket closed before it writes (the
        # server answers busy at once); its answer is still there to read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        reader = sock.makefile("rb")
        return [json.loads(reader.readline()) for _ in range(replies)]


async def test_requests_errors_and_streams(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server().serve, path)
            assert oct(os.stat(path).st_mode & 0o777) == "0o600"

            def client_side() -> tuple[Any, ...]:
                client = connect_if_running(tmp_path)
                assert client is not None
                with client:
                    result = client.call("echo", {"a": 1})
                    with pytest.raises(NotFound, match="no key"):
                        client.call("missing")
                    with pytest.raises(DaemonError) as unknown:
                        client.call("nope")
                    events = list(client.stream("ticks", {"count": 2}))
                    return result, unknown.value.code, events

            result, unknown_code, events = await trio.to_thread.run_sync(client_side)
            assert result == {"echo": {"a": 1}}
            assert unknown_code == "unknown-method"
            assert [e["n"] for e in events] == [0, 1]
            nursery.cancel_scope.cancel()
    assert not path.exists()  # removed on shutdown


async def test_malformed_lines_get_errors_and_the_connection_survives(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server().serve, path)
            payload = (
                b"{not json\n"
                b"[1, 2]\n"
                b'{"id": 5, "method": 7}\n'
                b'{"id": 6, "method": "echo", "params": "x"}\n'
                b"\xff\xfe\n"
                b'{"method": "echo"}\n'
                b'{"id": null, "method": "echo"}\n'
                b'{"id": true, "method": "echo"}\n'
                b'{"id": 0, "method": 7}\n'  # falsy ids are ids: echoed, not null
                b'{"id": "", "method": "echo", "params": []}\n'
                b'{"id": 0, "method": "nope"}\n'
                b'{"id": 9, "method": "echo", "params": {"ok": true}}\n'
            )
            replies = await trio.to_thread.run_sync(raw_exchange, path, payload, 12)
            codes = [r.get("error", {}).get("code") for r in replies[:11]]
            assert codes == ["bad-request"] * 10 + ["unknown-method"]
            assert [r["id"] for r in replies[:11]] == [
                *(None, None, 5, 6, None, None, None, None),
                *(0, "", 0),
            ]
            assert "needs an 'id'" in replies[5]["error"]["message"]
            assert "needs an 'id'" in replies[6]["error"]["message"]
            assert replies[11] == {"id": 9, "result": {"echo": {"ok": True}}}
            nursery.cancel_scope.cancel()


async def test_oversized_line_is_refused_and_daemon_keeps_serving(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server().serve, path)

            def flood() -> JsonObject:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(path))
                    try:
                        sock.sendall(b"x" * (MAX_LINE + 70_000))
                    except OSError:
                        pass  # the daemon may close while we still send
                    line: JsonObject = json.loads(sock.makefile("rb").readline())
                    return line

            reply = await trio.to_thread.run_sync(flood)
            assert reply["error"]["code"] == "too-large"
            again = await trio.to_thread.run_sync(
                raw_exchange, path, b'{"id": 1, "method": "echo"}\n', 1
            )
            assert again[0]["result"] == {"echo": {}}
            nursery.cancel_scope.cancel()


async def test_client_leaving_mid_stream_does_not_hurt_the_daemon(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server().serve, path)

            def leave_early() -> None:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(str(path))
                    sock.sendall(b'{"id": 1, "method": "ticks", "params": {"count": 100000}}\n')
                    sock.recv(100)

            await trio.to_thread.run_sync(leave_early)
            reply = await trio.to_thread.run_sync(
                raw_exchange, path, b'{"id": 2, "method": "echo"}\n', 1
            )
            assert reply[0]["id"] == 2
            nursery.cancel_scope.cancel()


async def test_clients_leaving_during_a_request_are_noticed_and_free_their_slot(
    tmp_path: Path,
) -> None:
    """More clients than the limit ask a never-ending request and hang up: none stays."""
    path = tmp_path / SOCKET_NAME
    hang = Hang()
    control = server(hang)
    leavers = MAX_CLIENTS + 6
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, path)

            def ask_and_leave() -> None:
                for i in range(leavers):
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                        sock.connect(str(path))  # blocking: waits while the backlog is full
                        sock.sendall(b'{"id": %d, "method": "hang"}\n' % i)

            await trio.to_thread.run_sync(ask_and_leave)
            await until(lambda: hang.cancelled == leavers)
            await until(lambda: control.clients == 0)
            assert hang.started == leavers and control.abandoned == leavers
            again = await trio.to_thread.run_sync(
                raw_exchange, path, b'{"id": "after", "method": "echo"}\n', 1
            )
            assert again == [{"id": "after", "result": {"echo": {}}}]  # not `busy`
            nursery.cancel_scope.cancel()


async def test_too_many_clients_get_busy_until_one_leaves(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    hang = Hang()
    control = server(hang)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, path)

            def connect_all() -> list[socket.socket]:  # a thread: the server must accept
                held = []
                for i in range(MAX_CLIENTS):
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.connect(str(path))  # blocking: waits while the backlog is full
                    sock.sendall(b'{"id": %d, "method": "hang"}\n' % i)
                    held.append(sock)
                return held

            held = await trio.to_thread.run_sync(connect_all)
            await until(lambda: hang.started == MAX_CLIENTS)
            refused = await trio.to_thread.run_sync(
                raw_exchange, path, b'{"id": 1, "method": "echo"}\n', 1
            )
            assert refused[0]["id"] is None
            assert refused[0]["error"]["code"] == "busy"
            assert "too many clients" in refused[0]["error"]["message"]

            def client_call() -> object:  # the CLI's client says busy, not "broken pipe"
                client = connect_if_running(tmp_path)
                assert client is not None
                with client:
                    return client.call("echo")

            for _ in range(5):
                with pytest.raises(DaemonError, match="too many clients") as refusal:
                    await trio.to_thread.run_sync(client_call)
                assert refusal.value.code == "busy"
            held.pop().close()
            await until(lambda: control.clients == MAX_CLIENTS - 1)
            served = await trio.to_thread.run_sync(
                raw_exchange, path, b'{"id": 2, "method": "echo"}\n', 1
            )
            assert served == [{"id": 2, "result": {"echo": {}}}]
            for sock in held:
                sock.close()
            await until(lambda: control.clients == 0)
            assert hang.cancelled == MAX_CLIENTS
            nursery.cancel_scope.cancel()


async def test_a_half_closed_client_still_gets_its_answers(tmp_path: Path) -> None:
    """`echo REQUEST | socat - UNIX-CONNECT:...` shuts its sending side, then reads."""
    path = tmp_path / SOCKET_NAME
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(server().serve, path)

            def half_close(payload: bytes) -> list[JsonObject]:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(str(path))
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    reader = sock.makefile("rb")
                    replies = [json.loads(line) for line in reader]  # until the daemon closes
                    return replies

            replies = await trio.to_thread.run_sync(
                half_close,
                b'{"id": 1, "method": "slow", "params": {"seconds": 0.3}}\n'
                b'{"id": 2, "method": "echo"}\n',
            )
            assert replies == [
                {"id": 1, "result": {"slept": True}},
                {"id": 2, "result": {"echo": {}}},
            ]
            streamed = await trio.to_thread.run_sync(
                half_close, b'{"id": 3, "method": "ticks", "params": {"count": 3}}\n'
            )
            assert [r.get("event", {}).get("n") for r in streamed] == [0, 1, 2, None]
            assert streamed[-1] == {"id": 3, "result": {"done": True}}
            nursery.cancel_scope.cancel()


async def test_stale_socket_is_replaced_and_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / SOCKET_NAME
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a daemon that died left its socket file
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(server().serve, path)
            with pytest.raises(ConfigError, match="already running"):
                await ControlServer({}).serve(path)
            nursery.cancel_scope.cancel()


def test_no_daemon_means_no_client(tmp_path: Path) -> None:
    assert connect_if_running(tmp_path) is None
    assert isinstance(ControlClient, type)
