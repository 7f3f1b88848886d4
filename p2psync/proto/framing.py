"""Length-prefixed framing: the one home of ``u32be length || body``.

Every stream protocol of p2psync (the sync control stream, object streams,
the join handshake, the relay stream) puts msgpack bodies on a QUIC stream
as frames::

    u32 big-endian body length || body

:class:`FrameDecoder` splits a byte stream into bodies whatever the delivery
boundaries. Buffered bytes of an incomplete frame never exceed
``4 + max_frame``: a length header over ``max_frame`` raises
:class:`FrameTooLarge` as soon as its four bytes are seen, without buffering
the body, and the decoder stays broken (the stream has lost its framing).
Complete frames queue until taken, so a caller that feeds one bounded read
at a time and drains before the next bounds memory.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Final

from p2psync.errors import BadFrame

_LENGTH: Final = struct.Struct(">I")
FRAME_HEADER_SIZE: Final = _LENGTH.size


class FrameTooLarge(BadFrame):
    """A length header announced a frame over the limit (the stream is unusable)."""


def frame(body: bytes) -> bytes:
    """``u32be len(body) || body``. Callers check their own size limits first."""
    return _LENGTH.pack(len(body)) + body


class FrameDecoder:
    """Split a byte stream into frame bodies; see the module docstring."""

    __slots__ = ("_broken", "_buffer", "_frames", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._frames: deque[bytes] = deque()
        self._broken = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._broken:
            raise FrameTooLarge("the stream already lost its framing")
        self._buffer += data
        buffer = self._buffer
        start = 0
        end_of_data = len(buffer)
        while end_of_data - start >= FRAME_HEADER_SIZE:
            (length,) = _LENGTH.unpack_from(buffer, start)
            if length > self.max_frame:
                self._broken = True
                buffer.clear()
                raise FrameTooLarge(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame}"
                )
            end = start + FRAME_HEADER_SIZE + length
            if end > end_of_data:
                break
            self._frames.append(bytes(buffer[start + FRAME_HEADER_SIZE : end]))
            start = end
        if start:
            del buffer[:start]  # one move for every frame taken from this feed

    def next_frame(self) -> bytes | None:
        return self._frames.popleft() if self._frames else None

    @property
    def buffered(self) -> int:
        """Bytes of a frame not yet complete."""
        return len(self._buffer)
