"""The relay's "invites" service, version 1: short-code tickets stored on relayd (sans-IO).

Theory
------
A short code ``XXXX-XXXX-XXXX-XXXX`` is a split token (:mod:`p2psync.pairing`):
its first half finds the invite, its second half unlocks it. The inviter
stores on its home relay a **sealed ticket** under ``lookup_id`` (derived from
the first half) together with a **verifier**; the joiner fetches it with a
**proof** (both derived from the second half through Argon2id). relayd never
sees the second half: it checks ``BLAKE3(proof) == verifier`` and hands the
sealed ticket over once, to the first correct proof, then forgets it.

The service runs on a relay service stream (:mod:`p2psync.proto.services`,
service ``"invites"``, version 1), so every request comes from a node whose
NodeId the relay has proven; the creator's NodeId is the only one that may
revoke. Rate limits (per source IP, failed lookups stricter) and the store's
bounds are relayd's (:mod:`relayd.invites`).

Wire format (frames as in :mod:`p2psync.proto.framing`, bodies msgpack
arrays, ``->`` node to relay, ``<-`` relay to node); any number of
request/reply pairs on one stream, one reply per request, in order::

    -> CREATE  [1, lookup_id bin16, verifier bin32, sealed bin, lifetime u32]
    <- CREATED [10, lifetime u32]              the lifetime granted (may be shorter)
    -> FETCH   [2, lookup_id bin16, proof bin32]
    <- TICKET  [11, sealed bin]                the record is deleted as this is sent
    -> REVOKE  [3, lookup_id bin16]
    <- REVOKED [12]
    <- FAILED  [13, code u16, message str, tries_left u8|nil, retry_after u32|nil]

``FAILED`` codes are :class:`InviteFailure`; ``tries_left`` (after
WRONG_CODE) says how many more wrong proofs the record survives,
``retry_after`` (after RATE_LIMITED) how many seconds to wait. Decoders are
``*_untrusted`` and raise only :class:`~p2psync.errors.BadFrame`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from p2psync.errors import BadFrame
from p2psync.proto.codec import as_bytes, as_int, as_list, as_str, pack, unpack_untrusted

SERVICE: Final = "invites"
VERSION: Final = 1

LOOKUP_ID_SIZE: Final = 16
VERIFIER_SIZE: Final = 32
PROOF_SIZE: Final = 32
# A sealed ticket: a 4 KiB ticket payload at most, plus a 24-byte nonce and a
# 16-byte tag (rounded up). Opaque to the relay.
MAX_SEALED_SIZE: Final = 4096 + 64
MAX_MESSAGE: Final = 200
MAX_LIFETIME: Final = 24 * 3600
# The largest frame either side sends: CREATE with a full sealed ticket.
MAX_FRAME: Final = MAX_SEALED_SIZE + 128

_CREATE: Final = 1
_FETCH: Final = 2
_REVOKE: Final = 3
_CREATED: Final = 10
_TICKET: Final = 11
_REVOKED: Final = 12
_FAILED: Final = 13


class InviteFailure(enum.IntEnum):
    """Why the relay did not do what was asked (also a metric label)."""

    NOT_FOUND = 1
    """No invite under this lookup id: mistyped first half, or never created here."""
    EXPIRED = 2
    """The invite existed and expired."""
    USED = 3
    """The invite was already fetched (single use)."""
    REVOKED = 4
    """Its creator revoked it."""
    WRONG_CODE = 5
    """The proof does not match: the second half is wrong or mistyped."""
    BURNED = 6
    """Too many wrong proofs: the invite is gone."""
    RATE_LIMITED = 7
    """Too many requests (or failed lookups) from this address; wait ``retry_after``."""
    FULL = 8
    """The relay (or this address's share of it) holds as many invites as it may."""
    EXISTS = 9
    """An invite with this lookup id is already stored (make a new code)."""
    BAD_REQUEST = 10
    """The request broke a rule (lifetime 0, ...)."""

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


# --- node to relay -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Create:
    lookup_id: bytes
    verifier: bytes
    sealed: bytes
    lifetime: int

    def __repr__(self) -> str:
        return f"Create({self.lookup_id.hex()[:8]}, {len(self.sealed)} bytes, {self.lifetime}s)"


@dataclass(frozen=True, slots=True)
class Fetch:
    lookup_id: bytes
    proof: bytes

    def __repr__(self) -> str:
        return f"Fetch({self.lookup_id.hex()[:8]}, proof=<hidden>)"


@dataclass(frozen=True, slots=True)
class Revoke:
    lookup_id: bytes


Request = Create | Fetch | Revoke

# --- relay to node -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Created:
    lifetime: int


@dataclass(frozen=True, slots=True)
class TicketFound:
    sealed: bytes


@dataclass(frozen=True, slots=True)
class Revoked:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    code: int
    message: str
    tries_left: int | None = None
    retry_after: int | None = None

    @property
    def known_code(self) -> InviteFailure | None:
        try:
            return InviteFailure(self.code)
        except ValueError:
            return None


Reply = Created | TicketFound | Revoked | Failed


def encode_request(message: Request) -> bytes:
    if isinstance(message, Create):
        return pack(
            [_CREATE, message.lookup_id, message.verifier, message.sealed, message.lifetime]
        )
    if isinstance(message, Fetch):
        return pack([_FETCH, message.lookup_id, message.proof])
    return pack([_REVOKE, message.lookup_id])


def encode_reply(message: Reply) -> bytes:
    if isinstance(message, Created):
        return pack([_CREATED, message.lifetime])
    if isinstance(message, TicketFound):
        return pack([_TICKET, message.sealed])
    if isinstance(message, Revoked):
        return pack([_REVOKED])
    return pack(
        [
            _FAILED,
            message.code,
            message.message[:MAX_MESSAGE],
            message.tries_left,
            message.retry_after,
        ]
    )


def _items(body: bytes) -> tuple[int, list[object]]:
    if len(body) > MAX_FRAME:
        raise BadFrame(f"invites frame of {len(body)} bytes exceeds {MAX_FRAME}")
    items = as_list(unpack_untrusted(body, max_size=MAX_FRAME), "invites message")
    if not items:
        raise BadFrame("invites message is empty")
    return as_int(items[0], "invites message type", lo=0, hi=255), items[1:]


def _fields(fields: list[object], count: int, name: str) -> list[object]:
    if len(fields) != count:
        raise BadFrame(f"{name} has {count} fields, got {len(fields)}")
    return fields


def decode_request_untrusted(body: bytes) -> Request:
    """A node's request; :class:`BadFrame` for anything else."""
    kind, fields = _items(body)
    if kind == _CREATE:
        lookup_id, verifier, sealed, lifetime = _fields(fields, 4, "CREATE")
        return Create(
            as_bytes(lookup_id, "lookup id", size=LOOKUP_ID_SIZE),
            as_bytes(verifier, "verifier", size=VERIFIER_SIZE),
            as_bytes(sealed, "sealed ticket", max_size=MAX_SEALED_SIZE),
            as_int(lifetime, "lifetime", lo=1, hi=MAX_LIFETIME),
        )
    if kind == _FETCH:
        lookup_id, proof = _fields(fields, 2, "FETCH")
        return Fetch(
            as_bytes(lookup_id, "lookup id", size=LOOKUP_ID_SIZE),
            as_bytes(proof, "proof", size=PROOF_SIZE),
        )
    if kind == _REVOKE:
        (lookup_id,) = _fields(fields, 1, "REVOKE")
        return Revoke(as_bytes(lookup_id, "lookup id", size=LOOKUP_ID_SIZE))
    raise BadFrame(f"invites request type {kind} is unknown")


def _optional_int(value: object, field: str, hi: int) -> int | None:
    return None if value is None else as_int(value, field, lo=0, hi=hi)


def decode_reply_untrusted(body: bytes) -> Reply:
    """The relay's reply; :class:`BadFrame` for anything else."""
    kind, fields = _items(body)
    if kind == _CREATED:
        (lifetime,) = _fields(fields, 1, "CREATED")
        return Created(as_int(lifetime, "lifetime", lo=1, hi=MAX_LIFETIME))
    if kind == _TICKET:
        (sealed,) = _fields(fields, 1, "TICKET")
        return TicketFound(as_bytes(sealed, "sealed ticket", max_size=MAX_SEALED_SIZE))
    if kind == _REVOKED:
        _fields(fields, 0, "REVOKED")
        return Revoked()
    if kind == _FAILED:
        code, message, tries_left, retry_after = _fields(fields, 4, "FAILED")
        return Failed(
            as_int(code, "failure code", lo=0, hi=0xFFFF),
            as_str(message, "failure message", max_size=4 * MAX_MESSAGE)[:MAX_MESSAGE],
            _optional_int(tries_left, "tries left", 255),
            _optional_int(retry_after, "retry after", MAX_LIFETIME),
        )
    raise BadFrame(f"invites reply type {kind} is unknown")
