"""What a relayd service (invites, mailbox) is handed: the stream and the proven NodeId.

A service registers with :meth:`relayd.relay.QuicRelay.register_service`
under a name and the versions it speaks. When an authenticated node opens a
stream naming it (:mod:`p2psync.proto.services`), the relay accepts the
stream and awaits the service's handler with a :class:`ServiceCall`: the
framed stream, the NodeId proven on the node's relay stream and its source
IP (for per-IP rate limits). The handler owns the stream until it returns;
the relay closes the stream afterwards and cancels the handler when the
node's connection ends. A handler that raises
:class:`~p2psync.errors.BadFrame`, a broken-stream error or
:class:`trio.TooSlowError` (its write timeout) ends that stream only, and
the relay counts it; any other exception is logged and counted as an
internal error, and the relay goes on serving.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from p2psync import defaults
from p2psync.crypto.identity import NodeId
from p2psync.net.service_stream import FramedStream
from p2psync.proto.relay import Address


@dataclass(frozen=True, slots=True)
class ServiceCall:
    """One accepted service stream of one authenticated node."""

    service: str
    version: int
    node_id: NodeId
    ip: str
    observed: Address | None
    stream: FramedStream

    async def receive(self) -> bytes | None:
        """The node's next frame; None once it has finished its side."""
        return await self.stream.receive()

    async def send(self, *bodies: bytes) -> None:
        """Write ``bodies`` as frames; :class:`trio.TooSlowError` if the node stops reading."""
        with trio.fail_after(defaults.RELAY_SERVICE_WRITE_TIMEOUT):
            await self.stream.send_many(bodies)


ServiceHandler = Callable[[ServiceCall], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Service:
    """A registered service: its handler, the versions it speaks and its frame limit."""

    name: str
    versions: frozenset[int]
    handler: ServiceHandler
    max_frame: int
