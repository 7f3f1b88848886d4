"""Object streams: one QUIC stream per wanted object, both ends sans-IO.

Wire format (frames as on the control stream: ``u32be length || msgpack``)::

    -> WANT       [7, object id bin32]                     (opener, then FIN)
    <- OBJECT     [8, object id bin32, sealed bytes bin]   then FIN
    <- NOT_FOUND  [9, object id bin32]                     then FIN

Serving side: the shell accepts a peer-opened stream, reads one frame (at
most :data:`WANT_MAX_FRAME` bytes), and writes :func:`answer_want_untrusted`'s
reply; the session is not involved. Requesting side: on
:class:`~p2psync.sync.events.ObjectWanted` the shell opens a stream, writes
:func:`want_frame`, reads one frame with a
``FrameDecoder(SYNC_MAX_OBJECT_FRAME)`` and passes its body to
:func:`decode_object_response_untrusted`; then it calls
``session.object_received(oid, sealed, now)`` for bytes,
``session.object_failed(oid, now)`` for NOT_FOUND or a broken stream, and
``session.object_failed(oid, now, peer_fault=str(exc))`` for a malformed
answer. The session verifies the object (hash, fit) via the store.
"""

from __future__ import annotations

from typing import Final, Protocol

from p2psync import defaults
from p2psync.errors import BadFrame, IntegrityError, NotFound
from p2psync.proto.messages import (
    OBJECT_ID_SIZE,
    ObjectData,
    ObjectNotFound,
    Want,
    decode_message_untrusted,
    encode_message_frame,
)

# A WANT is 1 + 2 + 32 bytes of msgpack; anything much larger is not a WANT.
WANT_MAX_FRAME: Final = 64


class ObjectSource(Protocol):
    """What serving needs of the store; :class:`p2psync.store.Store` fits."""

    def read_object(self, oid: bytes) -> bytes: ...


def want_frame(oid: bytes) -> bytes:
    """The request to write on a new object stream."""
    if len(oid) != OBJECT_ID_SIZE:
        raise BadFrame(f"an object id is {OBJECT_ID_SIZE} bytes, got {len(oid)}")
    return encode_message_frame(Want(oid), max_frame=WANT_MAX_FRAME)


def answer_want_untrusted(source: ObjectSource, request_body: bytes) -> bytes:
    """The reply frame to a peer's WANT body; :class:`BadFrame` if it is not one.

    A missing or corrupted object is NOT_FOUND (the store quarantines a
    corrupted file, so sync fetches it again from someone else).
    """
    request = decode_message_untrusted(request_body, max_size=WANT_MAX_FRAME)
    if not isinstance(request, Want):
        raise BadFrame(f"object stream: expected WANT, got {type(request).__name__}")
    try:
        sealed = source.read_object(request.oid)
    except (NotFound, IntegrityError):
        return encode_message_frame(ObjectNotFound(request.oid))
    return encode_message_frame(
        ObjectData(request.oid, sealed), max_frame=defaults.SYNC_MAX_OBJECT_FRAME
    )


def decode_object_response_untrusted(oid: bytes, body: bytes) -> bytes | None:
    """Sealed bytes of ``oid`` from a reply body, or None for NOT_FOUND.

    Raises :class:`BadFrame` if the reply is malformed or names another object.
    The bytes are not verified here: ``object_received`` does that.
    """
    response = decode_message_untrusted(body, max_size=defaults.SYNC_MAX_OBJECT_FRAME)
    match response:
        case ObjectData() if response.oid == oid:
            return response.sealed
        case ObjectNotFound() if response.oid == oid:
            return None
    raise BadFrame(f"object stream: unexpected answer {response!r} to WANT {oid.hex()[:16]}")
