"""Control socket server: the trio shell around :mod:`p2psync.control.protocol`.

Reads request lines, dispatches each to a handler, writes reply lines. The
daemon supplies the handlers; this module knows nothing of stores or peers.

Two kinds of method:

- **requests** (``handlers``): ``handler(params, emit) -> result``. They may
  ``emit`` events before returning (progress of a long put). Requests on one
  connection are answered one after the other; lines that arrive meanwhile
  are buffered (bounded), so a client may pipeline requests.
- **streams** (``streams``): same signature, but they may run for ever. While
  one runs the server reads the connection's requests: ``cancel`` ends the
  stream, any other request is answered ``busy``.

A client that goes away never leaves a task behind: while *any* method runs
the server watches the connection, and when the client has gone the handler
is cancelled and its client slot freed. Gone means hung up (closed, or shut
down both ways). A half close — the client shut only its sending side, as
``socat`` and ``nc -N`` do when their input ends — means "no more requests",
not "gone": what it asked is still answered. End of input is seen at once;
a hang-up after a half close within :data:`HANGUP_POLL` (``poll(2)`` reports
``POLLHUP`` only then, and trio offers no wait for it).

Bounded: request line length, buffered pipelined input, concurrent clients;
a handler that raises something unexpected is logged and answered
``internal`` — the daemon keeps serving everyone else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from p2psync import defaults
from p2psync.control.protocol import (
    MAX_LINE,
    ControlError,
    ErrorCode,
    JsonObject,
    Request,
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

MAX_CLIENTS = defaults.CONTROL_MAX_CLIENTS
HANGUP_POLL = defaults.CONTROL_HANGUP_POLL

EmitEvent = Callable[[JsonObject], Awaitable[None]]
Handler = Callable[[JsonObject, EmitEvent], Awaitable[Any]]
StreamHandler = Handler

_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


def code_for(exc: P2PSyncError) -> ErrorCode:
    """The wire error code of a library error (one mapping, used for every method)."""
    from p2psync.store.store import BlobPending

    if isinstance(exc, BlobPending):
        return ErrorCode.PENDING
    if isinstance(exc, NotFound):
        return ErrorCode.NOT_FOUND
    if isinstance(exc, ConfigError):
        return ErrorCode.CONFIG
    if isinstance(exc, IntegrityError):
        return ErrorCode.INTEGRITY
    if isinstance(exc, LocalProtocolError | BadFrame):
        return ErrorCode.BAD_PARAMS
    return ErrorCode.INTERNAL


def _unwrap(exc: BaseException) -> BaseException:
    """The one error inside (nested) single-error groups, which handler nurseries raise."""
    while isinstance(exc, BaseExceptionGroup):
        gone = [e for e in exc.exceptions if isinstance(_unwrap(e), _GONE)]
        if gone and len(gone) == len(exc.exceptions):
            return _unwrap(gone[0])
        if len(exc.exceptions) != 1:
            return exc
        exc = exc.exceptions[0]
    return exc


class _LineTooLong(Exception):
    pass


class _Lines:
    """Lines from a stream, with a bounded buffer; ``None`` at end of input."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._eof = False

    async def next(self) -> bytes | None:
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline])
                del self._buffer[: newline + 1]
                return line
            if len(self._buffer) > MAX_LINE:
                raise _LineTooLong
            if self._eof or not await self._receive():
                return None

    async def _receive(self) -> bool:
        data = await self._stream.receive_some(65536)
        if not data:
            self._eof = True
            return False
        self._buffer += data
        return True

    async def wait_gone(self) -> None:
        """Return once the client has gone; buffer what it sends meanwhile.

        Reads (so end of input is seen at once) until the buffer holds more
        than a request line — a client pipelining that much waits for its
        answers — then, or after a half close, polls for the hang-up.
        """
        while not self._eof and len(self._buffer) <= MAX_LINE:
            await self._receive()
        while not _hung_up(self._stream.socket):  # noqa: ASYNC110 -- no event for POLLHUP
            await trio.sleep(HANGUP_POLL)


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """The peer closed its end (not just its sending side): POLLHUP or POLLERR."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)  # HUP and ERR are always reported
    return any(mask & (select.POLLHUP | select.POLLERR) for _, mask in poller.poll(0))


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
        self.errors = 0  # error replies sent (bad requests, failed calls)
        self.crashes = 0  # handlers that raised something unexpected
        self.abandoned = 0  # requests and streams cancelled because their client left

    @property
    def clients(self) -> int:
        """Client connections open right now."""
        return self._clients

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
                                stream, error_line(None, ErrorCode.BUSY, "too many clients")
                            )
                            continue
                        nursery.start_soon(self._client, stream)
        finally:
            _unlink(socket_path)

    async def _client(self, stream: trio.SocketStream) -> None:
        self._clients += 1
        lines = _Lines(stream)
        try:
            async with stream:
                while True:
                    try:
                        line = await lines.next()
                    except _LineTooLong:
                        self.errors += 1
                        await stream.send_all(
                            error_line(None, ErrorCode.TOO_LARGE, "request line too long")
                        )
                        return
                    if line is None:
                        return
                    if line.strip() and not await self._answer(stream, lines, line):
                        return
        except _GONE:
            log.debug("control client went away")
        finally:
            self._clients -= 1

    async def _answer(self, stream: trio.SocketStream, lines: _Lines, line: bytes) -> bool:
        """Answer one request line; False if the connection is finished."""
        request_id: RequestId = None
        try:
            request = decode_request_untrusted(line)
            request_id = request.id
            if request.method in self._streams:
                return await self._run_stream(stream, lines, request)
            handler = self._handlers.get(request.method)
            if handler is None:
                known = ", ".join(sorted({*self._handlers, *self._streams}))
                raise ControlError(
                    ErrorCode.UNKNOWN_METHOD, f"unknown method {request.method!r}; known: {known}"
                )

            async def emit(event: JsonObject) -> None:
                await stream.send_all(event_line(request_id, event))

            answered, result = await self._while_connected(lines, handler(request.params, emit))
            if not answered:
                self.abandoned += 1
                log.debug("control client left during %s", request.method)
                return False
            reply = result_line(request_id, result)
        except Exception as caught:
            exc = _unwrap(caught)
            if isinstance(exc, _GONE):
                raise exc from None
            reply = self._error_reply(request_id, exc)
        await stream.send_all(reply)
        return True

    async def _while_connected(self, lines: _Lines, work: Awaitable[Any]) -> tuple[bool, Any]:
        """``(True, await work)``, or ``(False, None)`` if the client went away first.

        The work is cancelled when the client goes, so a request waiting for
        ever (``get`` with ``wait`` of a blob no peer has) frees its task and
        its client slot.
        """
        outcome: dict[str, Any] = {}

        async def run(cancel: trio.CancelScope) -> None:
            outcome["result"] = await work
            cancel.cancel()

        async def watch(cancel: trio.CancelScope) -> None:
            await lines.wait_gone()
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, nursery.cancel_scope)
            nursery.start_soon(watch, nursery.cancel_scope)
        if "result" not in outcome:
            return False, None
        return True, outcome["result"]

    def _error_reply(self, request_id: RequestId, exc: BaseException) -> bytes:
        self.errors += 1
        if isinstance(exc, ControlError):
            # 0 and "" are ids too: only a missing one falls back
            known = exc.request_id if exc.request_id is not None else request_id
            return error_line(known, exc.code, exc.message)
        if isinstance(exc, P2PSyncError):
            return error_line(request_id, code_for(exc), str(exc))
        if isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            return error_line(request_id, ErrorCode.BAD_PARAMS, f"{exc.strerror or exc}{where}")
        self.crashes += 1
        log.exception("control request %r failed unexpectedly", request_id)
        return error_line(request_id, ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}")

    async def _run_stream(self, stream: trio.SocketStream, lines: _Lines, request: Request) -> bool:
        """Run a stream until it ends, the client cancels it or goes away."""
        request_id = request.id
        send_lock = trio.Lock()  # the stream and the input watcher both write
        outcome: dict[str, Any] = {"reply": None, "open": True, "cancelled": False}

        async def send(data: bytes) -> None:
            async with send_lock:
                await stream.send_all(data)

        async def emit(event: JsonObject) -> None:
            await send(event_line(request_id, event))

        async def run(cancel: trio.CancelScope) -> None:
            try:
                result = await self._streams[request.method](request.params, emit)
                final = {"done": True} if result is None else result
                outcome["reply"] = result_line(request_id, final)
            except Exception as caught:
                exc = _unwrap(caught)
                if isinstance(exc, _GONE):
                    outcome["open"] = False
                else:
                    outcome["reply"] = self._error_reply(request_id, exc)
            cancel.cancel()

        async def watch_input(cancel: trio.CancelScope) -> None:
            try:
                while True:
                    line = await lines.next()
                    if line is None:  # a half close: no more requests, the stream goes on
                        await lines.wait_gone()
                        outcome["open"] = False
                        break
                    if not line.strip():
                        continue
                    try:
                        other = decode_request_untrusted(line)
                    except ControlError as exc:
                        await send(error_line(exc.request_id, exc.code, exc.message))
                        continue
                    if other.method == "cancel":
                        outcome["cancelled"] = True
                        final = {"done": True, "cancelled": True}
                        outcome["reply"] = result_line(request_id, final)
                        break
                    busy = (
                        f"request {request_id!r} is streaming on this connection: "
                        "send cancel, or use another connection"
                    )
                    await send(error_line(other.id, ErrorCode.BUSY, busy))
            except _LineTooLong:
                await send(error_line(None, ErrorCode.TOO_LARGE, "request line too long"))
                outcome["open"] = False
            except _GONE:
                outcome["open"] = False
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, nursery.cancel_scope)
            nursery.start_soon(watch_input, nursery.cancel_scope)
        if not outcome["open"]:
            self.abandoned += 1
            log.debug("control client left during %s", request.method)
            return False
        if outcome["reply"] is not None:
            await stream.send_all(outcome["reply"])
        return True


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
