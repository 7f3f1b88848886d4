"""Blocking control-socket client, for the CLI and scripts.

``connect_if_running(home_path)`` returns a client when a daemon listens on
the home's socket, else ``None`` — the CLI then works on the store directly.

    with connect_if_running(home) as daemon:
        row = daemon.call("put", {"path": "/tmp/a", "progress": True}, on_event=print)
        for event in daemon.stream("subscribe", {"after": 0}):
            ...
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from p2psync import defaults
from p2psync.control.protocol import (
    SOCKET_NAME,
    ErrorCode,
    JsonObject,
    decode_reply_untrusted,
    encode_line,
)
from p2psync.errors import BadFrame, BrokenResourceError, NotFound, P2PSyncError


class DaemonError(P2PSyncError):
    """The daemon answered a request with an error; ``code`` is its stable code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _raise_for(error: Any) -> None:
    if not isinstance(error, dict):
        raise BadFrame("daemon sent a malformed error")
    code = str(error.get("code", ErrorCode.INTERNAL))
    message = str(error.get("message", "unknown error"))
    if code == ErrorCode.NOT_FOUND:
        raise NotFound(message)
    raise DaemonError(code, message)


class ControlClient:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = sock.makefile("rb")
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_reply(self) -> JsonObject:
        line = self._reader.readline(defaults.CONTROL_MAX_REPLY + 1)
        if not line:
            raise BrokenResourceError("the daemon closed the control connection")
        if not line.endswith(b"\n"):
            raise BadFrame("daemon reply line too long")
        return decode_reply_untrusted(line)

    def _send(self, method: str, params: JsonObject | None) -> int:
        request_id = next(self._ids)
        try:
            self._sock.sendall(
                encode_line({"id": request_id, "method": method, "params": params or {}})
            )
        except (BrokenPipeError, ConnectionResetError) as exc:
            # A daemon at its client limit answers ``busy`` and closes before
            # reading anything, so our write can fail while its answer waits
            # in our receive buffer: report that answer, not the broken pipe.
            try:
                reply = self._read_reply()
            except (OSError, BrokenResourceError, BadFrame):
                raise BrokenResourceError("the daemon closed the control connection") from exc
            if "error" in reply:
                _raise_for(reply["error"])
            raise BrokenResourceError("the daemon closed the control connection") from exc
        return request_id

    def call(
        self,
        method: str,
        params: JsonObject | None = None,
        *,
        on_event: Callable[[JsonObject], None] | None = None,
    ) -> Any:
        """Send one request, return its result; events before it go to ``on_event``."""
        request_id = self._send(method, params)
        while True:
            reply = self._read_reply()
            if reply.get("id") not in (request_id, None):
                raise BadFrame("daemon answered a different request")
            if "error" in reply:
                _raise_for(reply["error"])
            if "event" in reply:
                if on_event is not None:
                    on_event(reply["event"])
                continue
            return reply.get("result")

    def stream(self, method: str, params: JsonObject | None = None) -> Iterator[JsonObject]:
        """Start a stream (``subscribe``); iterate the returned generator for events.

        Closing the generator early (``break``) sends ``cancel`` and reads up
        to the stream's final reply, so the connection stays usable.
        """
        request_id = self._send(method, params)
        finished = False
        try:
            while True:
                reply = self._read_reply()
                if "error" in reply:
                    finished = True
                    _raise_for(reply["error"])
                if "event" in reply:
                    yield reply["event"]
                else:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel(request_id)

    def cancel(self, request_id: int) -> None:
        """End the stream ``request_id``; skip its remaining events."""
        self._sock.sendall(encode_line({"id": next(self._ids), "method": "cancel"}))
        while True:
            reply = self._read_reply()
            if reply.get("id") == request_id and "event" not in reply:
                return


def socket_path(home_path: Path) -> Path:
    return home_path / SOCKET_NAME


def connect_if_running(home_path: Path) -> ControlClient | None:
    path = socket_path(home_path)
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None  # a stale socket: the daemon died
    return ControlClient(sock)
