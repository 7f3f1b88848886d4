"""Framed QUIC streams, and opening a relay service stream (the trio side of proto.services).

:class:`FramedStream` reads and writes ``u32 length || body`` frames
(:mod:`p2psync.proto.framing`) on one :class:`~p2psync.net.endpoint.Stream`,
with a bounded decoder: a peer can make it buffer at most one read plus one
frame of ``max_frame`` bytes. :func:`open_service` opens a service stream on
an authenticated relay connection (see :mod:`p2psync.proto.services`) and
returns it once the relay has accepted it.
"""

from __future__ import annotations

from collections.abc import Iterable

import trio

from p2psync import defaults, errors
from p2psync.net.endpoint import Connection, Stream
from p2psync.proto.framing import FrameDecoder, frame
from p2psync.proto.services import (
    MAX_OPEN_FRAME,
    Open,
    Refuse,
    ServiceRefusal,
    decode_reply_untrusted,
    encode_open,
)

_READ_SIZE = 1 << 16


class ServiceRefused(errors.RemoteProtocolError):
    """The relay refused to open a service stream."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class FramedStream:
    """Whole frames over a QUIC stream; ``receive`` returns None at the peer's EOF."""

    __slots__ = ("_decoder", "stream")

    def __init__(self, stream: Stream, max_frame: int) -> None:
        self.stream = stream
        self._decoder = FrameDecoder(max_frame)

    @property
    def max_frame(self) -> int:
        return self._decoder.max_frame

    @max_frame.setter
    def max_frame(self, value: int) -> None:
        self._decoder.max_frame = value

    async def receive(self) -> bytes | None:
        """The next frame body, or None once the peer has finished its side.

        Raises :class:`~p2psync.errors.BadFrame` for a frame over the limit
        and for a stream that ends inside a frame.
        """
        decoder = self._decoder
        while (body := decoder.next_frame()) is None:
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                if decoder.buffered:
                    raise errors.BadFrame("stream ended inside a frame")
                return None
            decoder.feed(data)
        return body

    async def send(self, body: bytes) -> None:
        await self.stream.send_all(frame(body))

    async def send_many(self, bodies: Iterable[bytes]) -> None:
        await self.stream.send_all(b"".join([frame(body) for body in bodies]))

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_service(
    conn: Connection,
    service: str,
    version: int,
    max_frame: int,
) -> FramedStream:
    """Open ``service`` on the relay behind ``conn``; :class:`ServiceRefused` if it says no.

    The relay connection must already be authenticated (WELCOME received).
    """
    stream = await conn.open_stream()
    framed = FramedStream(stream, MAX_OPEN_FRAME)
    try:
        with trio.fail_after(defaults.RELAY_SERVICE_OPEN_TIMEOUT):
            await framed.send(encode_open(Open(service, version)))
            body = await framed.receive()
        if body is None:
            raise errors.RemoteProtocolError(f"relay ended the {service} stream before replying")
        reply = decode_reply_untrusted(body)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    if isinstance(reply, Refuse):
        with trio.CancelScope(shield=True):
            await stream.aclose()
        known = reply.known_code
        name = known.name if known is not None else str(reply.code)
        raise ServiceRefused(f"relay refused {service}: {name}: {reply.message}", reply.code)
    framed.max_frame = max_frame
    return framed


__all__ = ["FramedStream", "ServiceRefusal", "ServiceRefused", "open_service"]
