"""Blocking control-socket client, for the CLI and scripts.

``connect_if_running(home_path)`` returns a client when a daemon listens on
the home's socket, else ``None`` — the CLI then works on the store directly.
"""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any

from p2psync.control.protocol import (
    MAX_LINE,
    SOCKET_NAME,
    ErrorCode,
    JsonObject,
    decode_reply_untrusted,
    encode_line,
)
from p2psync.errors import BadFrame, BrokenResourceError, NotFound, P2PSyncError


class DaemonError(P2PSyncError):
    """The daemon answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        line = self._reader.readline(MAX_LINE + 1)
        if not line:
            raise BrokenResourceError("the daemon closed the control connection")
        return decode_reply_untrusted(line)

    def call(self, method: str, params: JsonObject | None = None) -> Any:
        request_id = next(self._ids)
        self._sock.sendall(encode_line({"id": request_id, "method": method,
                                        "params": params or {}}))  # fmt: skip
        reply = self._read_reply()
        if reply.get("id") not in (request_id, None):
            raise BadFrame("daemon answered a different request")
        if "error" in reply:
            error = reply["error"]
            code = str(error.get("code", ErrorCode.INTERNAL))
            message = str(error.get("message", "unknown error"))
            if code == ErrorCode.NOT_FOUND:
                raise NotFound(message)
            raise DaemonError(code, message)
        return reply.get("result")

    def stream(self, method: str, params: JsonObject | None = None) -> Any:
        """Start a streaming request; iterate the returned generator for events."""
        request_id = next(self._ids)
        self._sock.sendall(encode_line({"id": request_id, "method": method,
                                        "params": params or {}}))  # fmt: skip
        while True:
            reply = self._read_reply()
            if "error" in reply:
                error = reply["error"]
                raise DaemonError(str(error.get("code")), str(error.get("message")))
            if "event" in reply:
                yield reply["event"]
            else:
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
