"""Control socket server: the trio shell around :mod:`p2psync.control.protocol`.

Reads request lines, dispatches each to a handler, writes reply lines. The
daemon supplies the handlers; this module knows nothing of stores or peers.
Bounded: line length, concurrent clients, and an event stream that a client
does not read is dropped (the client is told with a ``too-large``-style
``lagged`` event rather than the daemon buffering without limit).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from p2psync.control.protocol import (
    MAX_LINE,
    ControlError,
    ErrorCode,
    JsonObject,
    RequestId,
    decode_request_untrusted,
    error_line,
    event_line,
    result_line,
)
from p2psync.errors import (
    BadFrame,
    ConfigError,
    IntegrityError,
    LocalProtocolError,
    NotFound,
    P2PSyncError,
)

log = logging.getLogger(__name__)

MAX_CLIENTS = 64

Handler = Callable[[JsonObject], Awaitable[Any]]
EmitEvent = Callable[[JsonObject], Awaitable[None]]
StreamHandler = Callable[[JsonObject, EmitEvent], Awaitable[None]]


def _code_for(exc: P2PSyncError) -> ErrorCode:
    from p2psync.store.store import BlobPending

    if isinstance(exc, BlobPending):
        return ErrorCode.PENDING
    if isinstance(exc, NotFound):
        return ErrorCode.NOT_FOUND
    if isinstance(exc, ConfigError):
        return ErrorCode.NO_GROUP
    if isinstance(exc, IntegrityError):
        return ErrorCode.INTEGRITY
    if isinstance(exc, LocalProtocolError | BadFrame):
        return ErrorCode.BAD_PARAMS
    return ErrorCode.INTERNAL


def _unlink(path: Path) -> None:
    path.unlink(missing_ok=True)


class ControlServer:
    def __init__(
        self,
        handlers: Mapping[str, Handler],
        streams: Mapping[str, StreamHandler] | None = None,
    ) -> None:
        self._handlers = dict(handlers)
        self._streams = dict(streams or {})
        self._clients = 0
        self.errors = 0

    async def serve(
        self, socket_path: Path, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listener = await _bind_owner_only(socket_path)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(socket_path)
                with listener:
                    while True:
                        sock, _ = await listener.accept()
                        stream = trio.SocketStream(sock)
                        if self._clients >= MAX_CLIENTS:
                            await _send_and_close(
                                stream, error_line(None, ErrorCode.TOO_LARGE, "too many clients")
                            )
                            continue
                        nursery.start_soon(self._client, stream)
        finally:
            _unlink(socket_path)

    async def _client(self, stream: trio.SocketStream) -> None:
        self._clients += 1
        buffer = bytearray()
        try:
            async with stream:
                while True:
                    newline = buffer.find(b"\n")
                    if newline < 0:
                        if len(buffer) > MAX_LINE:
                            self.errors += 1
                            await stream.send_all(
                                error_line(None, ErrorCode.TOO_LARGE, "request line too long")
                            )
                            return
                        data = await stream.receive_some(65536)
                        if not data:
                            return
                        buffer += data
                        continue
                    line = bytes(buffer[:newline])
                    del buffer[: newline + 1]
                    if line.strip():
                        await self._answer(stream, line)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            log.debug("control client went away")
        finally:
            self._clients -= 1

    async def _answer(self, stream: trio.SocketStream, line: bytes) -> None:
        request_id: RequestId = None
        try:
            request = decode_request_untrusted(line)
            request_id = request.id
            if request.method in self._streams:

                async def emit(event: JsonObject) -> None:
                    await stream.send_all(event_line(request_id, event))

                await self._streams[request.method](request.params, emit)
                await stream.send_all(result_line(request_id, {"done": True}))
                return
            handler = self._handlers.get(request.method)
            if handler is None:
                known = ", ".join(sorted({*self._handlers, *self._streams}))
                raise ControlError(
                    ErrorCode.UNKNOWN_METHOD, f"unknown method {request.method!r}; known: {known}"
                )
            result = await handler(request.params)
            reply = result_line(request_id, result)
        except ControlError as exc:
            self.errors += 1
            reply = error_line(exc.request_id or request_id, exc.code, exc.message)
        except P2PSyncError as exc:
            reply = error_line(request_id, _code_for(exc), str(exc))
        except OSError as exc:
            reply = error_line(request_id, ErrorCode.BAD_PARAMS, f"{exc.strerror}: {exc.filename}")
        await stream.send_all(reply)


def _clear_stale_socket(socket_path: Path) -> None:
    """Remove the socket of a daemon that died; refuse if one still answers.

    Synchronous on purpose: a stat and a connect to a Unix socket return at
    once, and this runs once at start-up.
    """
    if not (socket_path.exists() or socket_path.is_symlink()):
        return
    if not stat.S_ISSOCK(socket_path.lstat().st_mode):
        raise ConfigError(f"{socket_path} exists and is not a socket; remove it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket_path))
        except OSError:
            socket_path.unlink()
            return
    raise ConfigError(f"a daemon is already running on {socket_path}")


async def _bind_owner_only(socket_path: Path) -> trio.socket.SocketType:
    _clear_stale_socket(socket_path)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is born 0600
    try:
        await sock.bind(str(socket_path))
    finally:
        os.umask(old_umask)
    os.chmod(socket_path, 0o600)
    sock.listen(16)
    return sock


async def _send_and_close(stream: trio.SocketStream, data: bytes) -> None:
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)
