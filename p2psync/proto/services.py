"""Service streams on the relay connection: how relayd offers more than relaying, sans-IO.

Theory
------
The relay protocol (:mod:`p2psync.proto.relay`) lives on the **first**
bidirectional stream of a node's connection to its home relay, and proves
the node's NodeId. Everything else relayd offers (the short-code invite
store, the group mailbox) is a **service**: once the relay has sent WELCOME,
the node may open further bidirectional streams, each naming one service in
its first frame. The relay hands the stream to that service together with
the NodeId proven on the relay stream, so no service repeats the
authentication and no service can be reached unauthenticated.

Why streams and not more relay message types: a service's messages never
queue behind relayed packets (each QUIC stream has its own flow control), a
slow service cannot stall relaying, each service owns its wire format in
its own module, and a new service is added without touching the relay
router. A stream is cheap in QUIC; the relay caps how many a connection may
hold open (:data:`p2psync.defaults.RELAY_MAX_SERVICE_STREAMS`).

Wire format (frames as in :mod:`p2psync.proto.framing`; bodies are msgpack
arrays; ``->`` node to relay, ``<-`` relay to node)::

    -> OPEN      [0, service str, version u16]       first frame of the stream
    <- ACCEPT    [1, version u16]                    the service's frames follow
    <- REFUSE    [2, code u16, message str]          then the relay ends the stream

After ACCEPT the stream belongs to the service; its frames are whatever that
service's module defines, each at most the service's own frame limit.
REFUSE codes are :class:`ServiceRefusal`. An unknown service, a version the
relay does not speak, a stream opened before WELCOME or over the cap: each
is refused with a code, never silently dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from p2psync.errors import BadFrame
from p2psync.proto.codec import pack, unpack_untrusted

# A service name is short ASCII; the open frame is tiny.
MAX_SERVICE_NAME: Final = 32
MAX_OPEN_FRAME: Final = 128
MAX_REFUSE_MESSAGE: Final = 200

_OPEN: Final = 0
_ACCEPT: Final = 1
_REFUSE: Final = 2


class ServiceRefusal(enum.IntEnum):
    """Why the relay refused a service stream."""

    UNKNOWN_SERVICE = 1
    """No service of that name runs on this relay."""
    UNSUPPORTED_VERSION = 2
    """The service runs, but not in that version."""
    NOT_AUTHENTICATED = 3
    """The stream was opened before the relay stream's WELCOME."""
    TOO_MANY_STREAMS = 4
    """The connection already holds the maximum number of service streams."""
    BAD_OPEN = 5
    """The first frame was not a well-formed OPEN."""
    UNAVAILABLE = 6
    """The service exists but cannot serve now (shutting down, storage error)."""


@dataclass(frozen=True, slots=True)
class Open:
    service: str
    version: int


@dataclass(frozen=True, slots=True)
class Accept:
    version: int


@dataclass(frozen=True, slots=True)
class Refuse:
    code: int
    message: str

    @property
    def known_code(self) -> ServiceRefusal | None:
        try:
            return ServiceRefusal(self.code)
        except ValueError:
            return None


def encode_open(message: Open) -> bytes:
    if not 0 < len(message.service) <= MAX_SERVICE_NAME or not message.service.isascii():
        raise ValueError(f"bad service name {message.service!r}")
    return pack([_OPEN, message.service, message.version])


def encode_reply(message: Accept | Refuse) -> bytes:
    if isinstance(message, Accept):
        return pack([_ACCEPT, message.version])
    return pack([_REFUSE, message.code, message.message[:MAX_REFUSE_MESSAGE]])


def _array(body: bytes) -> list[object]:
    if len(body) > MAX_OPEN_FRAME:
        raise BadFrame(f"service frame of {len(body)} bytes exceeds {MAX_OPEN_FRAME}")
    items = unpack_untrusted(body, max_size=MAX_OPEN_FRAME)
    if not isinstance(items, list) or not items or not isinstance(items[0], int):
        raise BadFrame("service frame is not [type, ...]")
    return items


def _u16(value: object, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
        raise BadFrame(f"{field} is not a u16")
    return value


def decode_open_untrusted(body: bytes) -> Open:
    """Parse a node's OPEN frame; :class:`BadFrame` for anything else."""
    items = _array(body)
    if items[0] != _OPEN or len(items) != 3:
        raise BadFrame("first frame of a service stream is not OPEN")
    service = items[1]
    if (
        not isinstance(service, str)
        or not 0 < len(service) <= MAX_SERVICE_NAME
        or not service.isascii()
        or not service.isprintable()
    ):
        raise BadFrame("service name is not short printable ASCII")
    return Open(service, _u16(items[2], "version"))


def decode_reply_untrusted(body: bytes) -> Accept | Refuse:
    """Parse the relay's ACCEPT or REFUSE; :class:`BadFrame` for anything else."""
    items = _array(body)
    if items[0] == _ACCEPT and len(items) == 2:
        return Accept(_u16(items[1], "version"))
    if items[0] == _REFUSE and len(items) == 3:
        message = items[2]
        if not isinstance(message, str):
            raise BadFrame("REFUSE message is not a string")
        return Refuse(_u16(items[1], "code"), message[:MAX_REFUSE_MESSAGE])
    raise BadFrame("reply to OPEN is neither ACCEPT nor REFUSE")
