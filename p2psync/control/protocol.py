"""Control protocol: JSON lines over the daemon's owner-only Unix socket.

Theory
------
Any program of the device's owner (the CLI, a shell script, an app in any
language) drives a running daemon through ``HOME/control.sock``. The
socket file is mode 0600 inside a 0700 home: the kernel's permission check
*is* the authentication, as with ssh-agent.

Wire format: one JSON object per line (UTF-8, ``\\n``-terminated; a request
at most :data:`MAX_LINE` bytes)::

    -> {"id": 7, "method": "put", "params": {"key": "notes/a", "text": "hi"}}
    <- {"id": 7, "result": {...}}
    <- {"id": 7, "error": {"code": "not-found", "message": "no key named 'x'"}}

    -> {"id": 8, "method": "subscribe", "params": {"after": 0}}
    <- {"id": 8, "event": {"type": "entry-added", "entry": {...}}}   (any number)
    -> {"id": 9, "method": "cancel"}                                  (optional)
    <- {"id": 8, "result": {"done": true, "cancelled": true}}

``id`` is required: any JSON string or integer chosen by the client and
echoed back; every reply and event carries the id of its request. Requests on one
connection are answered in order (a client may pipeline them). Some
requests also send events before their result (``put``/``get`` with
``"progress": true``). A *stream* (``subscribe``) runs until the client
sends ``cancel`` or closes the connection; other requests sent meanwhile get
a ``busy`` error. Error codes are stable strings (:class:`ErrorCode`);
messages are for humans. A malformed line gets a ``bad-request`` error (with
``id`` null if none could be read) and the connection stays usable; a line
over the limit closes the connection after a ``too-large`` error, because
its end cannot be found safely. docs/control-api.md is the reference.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from p2psync import defaults
from p2psync.errors import BadFrame

MAX_LINE = defaults.CONTROL_MAX_REQUEST
SOCKET_NAME = "control.sock"

JsonObject = dict[str, Any]
RequestId = str | int | None  # None only in replies to a request whose id is unreadable


class ErrorCode(enum.StrEnum):
    """Stable error codes; docs/control-api.md says when each is sent."""

    BAD_REQUEST = "bad-request"
    UNKNOWN_METHOD = "unknown-method"
    BAD_PARAMS = "bad-params"
    NOT_FOUND = "not-found"
    PENDING = "pending"
    TOO_LARGE = "too-large"
    BUSY = "busy"
    CONFIG = "config"  # the device's setup or config forbids it (ConfigError); fix, then retry
    INTEGRITY = "integrity"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Request:
    id: str | int
    method: str
    params: JsonObject = field(default_factory=dict)


class ControlError(Exception):
    """A request failed; carried back to the client as ``{"error": ...}``."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def decode_request_untrusted(line: bytes) -> Request:
    """Parse one request line; :class:`ControlError` (bad-request) on any fault."""
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ControlError(ErrorCode.BAD_REQUEST, f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "a request is a JSON object")
    request_id = value.get("id")
    if request_id is None:  # missing or null: nothing to echo, so nothing to match replies to
        raise ControlError(
            ErrorCode.BAD_REQUEST, "every request needs an 'id' (a string or an integer)"
        )
    if isinstance(request_id, bool) or not isinstance(request_id, str | int):
        raise ControlError(ErrorCode.BAD_REQUEST, "'id' must be a string or an integer")
    method = value.get("method")
    if not isinstance(method, str):
        raise ControlError(ErrorCode.BAD_REQUEST, "'method' must be a string", request_id)
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "'params' must be an object", request_id)
    return Request(request_id, method, params)


def encode_line(message: JsonObject) -> bytes:
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def result_line(request_id: RequestId, result: Any) -> bytes:
    return encode_line({"id": request_id, "result": result})


def error_line(request_id: RequestId, code: ErrorCode, message: str) -> bytes:
    return encode_line({"id": request_id, "error": {"code": str(code), "message": message}})


def event_line(request_id: RequestId, event: JsonObject) -> bytes:
    return encode_line({"id": request_id, "event": event})


def decode_reply_untrusted(line: bytes) -> JsonObject:
    """Client side: parse one reply line (result, error or event)."""
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadFrame(f"daemon sent invalid JSON: {exc}") from exc
    if not isinstance(value, dict) or not ({"result", "error", "event"} & set(value)):
        raise BadFrame("daemon sent something that is not a reply")
    return value


# --- parameter helpers: one clear bad-params message per mistake -------------


def param_str(params: JsonObject, name: str) -> str:
    value = params.get(name)
    if value is None:
        raise ControlError(ErrorCode.BAD_PARAMS, f"missing parameter '{name}'")
    if not isinstance(value, str):
        raise ControlError(ErrorCode.BAD_PARAMS, f"parameter '{name}' must be a string")
    return value


def param_optional_str(params: JsonObject, name: str) -> str | None:
    return None if params.get(name) is None else param_str(params, name)


def param_int(params: JsonObject, name: str, default: int, *, lo: int = 0, hi: int = 2**62) -> int:
    value = params.get(name)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ControlError(
            ErrorCode.BAD_PARAMS, f"parameter '{name}' must be an integer {lo}..{hi}"
        )
    return value


def param_bool(params: JsonObject, name: str, default: bool = False) -> bool:
    value = params.get(name, default)
    if not isinstance(value, bool):
        raise ControlError(ErrorCode.BAD_PARAMS, f"parameter '{name}' must be true or false")
    return value


def param_str_list(params: JsonObject, name: str) -> list[str] | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ControlError(ErrorCode.BAD_PARAMS, f"parameter '{name}' must be a list of strings")
    return value
