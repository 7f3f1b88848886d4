"""Pairing: invite tickets and the join handshake (sans-IO).

Theory
------
A device joins a group by presenting an invite made by a member. The
**ticket** a member prints is everything the new device needs to find the
inviter and prove it was invited — never the group secret:

    ticket = encode_code("p2pt", pack([
        1,                         version
        inviter NodeId  bin32,     whom to dial (TLS proves it is them)
        [[host, port], ...],       where to dial
        expires         uint,      unix seconds
        invite_id       bin16,     which invite (lets the inviter look it up)
        invite_secret   bin32,     proof of having the ticket
        relay           str|nil    the inviter's home relay, if any
    ]))

The join handshake runs on the first QUIC stream of a connection the
joiner dials (ALPN ``p2psync/1``; the first frame's type tells it apart from
a sync HELLO). Frames are ``u32be length || msgpack`` as in
:mod:`p2psync.proto.messages`::

    J -> I  JOIN_REQUEST  [40, invite_id, joiner NodeId, name, challenge_j]
    I -> J  JOIN_CHALLENGE [41, challenge_i, mac_i]
    J -> I  JOIN_PROOF    [42, mac_j]
    I -> J  JOIN_WELCOME  [43, sealed]   sealed_box(joiner, pack([secret bytes, ...]))
    I -> J  JOIN_REFUSED  [44, code str, reason str]     (instead of any of the above)

    transcript = b"p2psync join v1\\0" || invite_id || inviter || joiner
                 || challenge_j || challenge_i
    mac_i = BLAKE3(key=invite_secret, b"inviter" || transcript)
    mac_j = BLAKE3(key=invite_secret, b"joiner"  || transcript)

Both MACs bind both NodeIds and two fresh challenges, so a relay or a LAN
eavesdropper that sees a handshake (but not the ticket) can neither answer
it nor replay it; the TLS certificate proves the inviter's NodeId to the
joiner; the group secret is sealed to the joiner's NodeId, so only the
holder of that key can open it. An invite is consumed by its first
successful proof; expired, consumed or unknown invites are refused with a
reason and change nothing; three wrong proofs burn an invite (a guessed
ticket cannot be brute-forced online).
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

import blake3

from p2psync.crypto.codes import decode_code_untrusted, encode_code
from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import BadNodeId, Identity, NodeId, RandomBytes, open_sealed, seal_to
from p2psync.errors import BadFrame, IntegrityError, P2PSyncError
from p2psync.proto.codec import (
    as_bytes,
    as_int,
    as_list,
    as_optional_str,
    as_str,
    pack,
    unpack_untrusted,
)
from p2psync.proto.framing import frame

TICKET_PREFIX = "p2pt"
TICKET_VERSION = 1
INVITE_ID_SIZE = 16
INVITE_SECRET_SIZE = 32
CHALLENGE_SIZE = 32
MAX_JOIN_FRAME = 16 * 1024
MAX_FAILED_PROOFS = 3
MAX_OPEN_INVITES = 64
_TRANSCRIPT_LABEL = b"p2psync join v1\x00"

JOIN_REQUEST, JOIN_CHALLENGE, JOIN_PROOF, JOIN_WELCOME, JOIN_REFUSED = 40, 41, 42, 43, 44
JOIN_TYPES = frozenset({JOIN_REQUEST, JOIN_CHALLENGE, JOIN_PROOF, JOIN_WELCOME, JOIN_REFUSED})

Address = tuple[str, int]


class JoinRefused(P2PSyncError):
    """The inviter refused (or the joiner gave up); ``code`` is a stable word."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# --- tickets -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ticket:
    inviter: NodeId
    addresses: tuple[Address, ...]
    expires: int
    invite_id: bytes
    invite_secret: bytes
    relay: str | None = None

    def encode(self) -> str:
        payload = pack(
            [
                TICKET_VERSION,
                self.inviter.raw,
                [[host, port] for host, port in self.addresses],
                self.expires,
                self.invite_id,
                self.invite_secret,
                self.relay,
            ]
        )
        return encode_code(TICKET_PREFIX, payload)

    def __repr__(self) -> str:
        return f"Ticket({self.inviter.short()}, {len(self.addresses)} addresses, secret=<hidden>)"


def decode_ticket_untrusted(text: str) -> Ticket:
    """Parse a typed or pasted ticket; a typo is a :class:`BadFrame` saying so."""
    payload = decode_code_untrusted(text, TICKET_PREFIX)
    items = as_list(unpack_untrusted(payload, max_size=4096), "ticket", length=7)
    as_int(items[0], "ticket version", lo=TICKET_VERSION, hi=TICKET_VERSION)
    try:
        inviter = NodeId(as_bytes(items[1], "ticket inviter", size=32))
    except BadNodeId as exc:
        raise BadFrame(f"ticket inviter: {exc}") from exc
    addresses = []
    for index, raw in enumerate(as_list(items[2], "ticket addresses")[:16]):
        pair = as_list(raw, f"ticket address {index}", length=2)
        addresses.append(
            (
                as_str(pair[0], "ticket host", max_size=255),
                as_int(pair[1], "ticket port", lo=1, hi=65535),
            )
        )
    return Ticket(
        inviter=inviter,
        addresses=tuple(addresses),
        expires=as_int(items[3], "ticket expiry"),
        invite_id=as_bytes(items[4], "ticket invite id", size=INVITE_ID_SIZE),
        invite_secret=as_bytes(items[5], "ticket secret", size=INVITE_SECRET_SIZE),
        relay=as_optional_str(items[6], "ticket relay", max_size=255),
    )


# --- frames ----------------------------------------------------------------------


def join_frame(message_type: int, *fields: object) -> bytes:
    return frame(pack([message_type, *fields]))


def decode_join_untrusted(body: bytes) -> tuple[int, list[object]]:
    """``(type, fields)`` of a join frame body; :class:`BadFrame` on any fault."""
    items = as_list(unpack_untrusted(body, max_size=MAX_JOIN_FRAME), "join message")
    if not items:
        raise BadFrame("join message: empty")
    message_type = as_int(items[0], "join message type", lo=0, hi=255)
    if message_type not in JOIN_TYPES:
        raise BadFrame(f"join message type {message_type} is unknown")
    return message_type, items[1:]


def first_frame_type(body: bytes) -> int | None:
    """The message type of a control stream's first frame, or None if unreadable."""
    try:
        items = unpack_untrusted(body, max_size=len(body) + 1)
    except BadFrame:
        return None
    if isinstance(items, list) and items and isinstance(items[0], int):
        return items[0]
    return None


def transcript(
    invite_id: bytes, inviter: NodeId, joiner: NodeId, challenge_j: bytes, challenge_i: bytes
) -> bytes:
    return _TRANSCRIPT_LABEL + invite_id + inviter.raw + joiner.raw + challenge_j + challenge_i


def join_mac(secret: bytes, role: bytes, transcript_bytes: bytes) -> bytes:
    return blake3.blake3(role + transcript_bytes, key=secret).digest()


# --- the inviter's book of open invites ---------------------------------------------


@dataclass(slots=True)
class Invite:
    invite_id: bytes
    secret: bytes
    expires: int
    failed_proofs: int = 0


class InviteBook:
    """Open invites of one node (in memory; a daemon restart drops them)."""

    def __init__(self) -> None:
        self._open: dict[bytes, Invite] = {}

    def create(self, random_bytes: RandomBytes, now: int, lifetime: int) -> Invite:
        self.expire(now)
        if len(self._open) >= MAX_OPEN_INVITES:
            raise JoinRefused("too-many-invites", "too many open invites; wait for some to expire")
        invite = Invite(random_bytes(INVITE_ID_SIZE), random_bytes(INVITE_SECRET_SIZE),
                        now + lifetime)  # fmt: skip
        self._open[invite.invite_id] = invite
        return invite

    def expire(self, now: int) -> None:
        for invite_id in [i for i, inv in self._open.items() if inv.expires <= now]:
            del self._open[invite_id]

    def find(self, invite_id: bytes, now: int) -> Invite:
        self.expire(now)
        invite = self._open.get(invite_id)
        if invite is None:
            raise JoinRefused(
                "unknown-invite",
                "this invite is unknown, expired or already used; ask for a new one",
            )
        return invite

    def consume(self, invite: Invite) -> None:
        self._open.pop(invite.invite_id, None)

    def failed_proof(self, invite: Invite) -> None:
        invite.failed_proofs += 1
        if invite.failed_proofs >= MAX_FAILED_PROOFS:
            self.consume(invite)

    def __len__(self) -> int:
        return len(self._open)


# --- the two sides, as plain functions over decoded messages --------------------------


@dataclass(frozen=True, slots=True)
class JoinRequest:
    invite_id: bytes
    joiner: NodeId
    name: str
    challenge: bytes


def decode_request_fields(fields: Sequence[object]) -> JoinRequest:
    if len(fields) != 4:
        raise BadFrame("JOIN_REQUEST has 4 fields")
    try:
        joiner = NodeId(as_bytes(fields[1], "joiner", size=32))
    except BadNodeId as exc:
        raise BadFrame(f"joiner: {exc}") from exc
    return JoinRequest(
        invite_id=as_bytes(fields[0], "invite id", size=INVITE_ID_SIZE),
        joiner=joiner,
        name=as_str(fields[2], "name", max_size=64),
        challenge=as_bytes(fields[3], "challenge", size=CHALLENGE_SIZE),
    )


def seal_secrets(joiner: NodeId, secrets: Sequence[GroupSecret]) -> bytes:
    return seal_to(joiner, pack([s.to_bytes() for s in secrets]))


def open_secrets(identity: Identity, sealed: bytes) -> list[GroupSecret]:
    items = as_list(
        unpack_untrusted(open_sealed(identity, sealed), max_size=MAX_JOIN_FRAME), "secrets"
    )
    if not items:
        raise BadFrame("the inviter sent no group secret")
    return [GroupSecret.from_bytes_untrusted(as_bytes(s, "secret", max_size=64)) for s in items]


def check_mac(expected: bytes, got: object, who: str) -> None:
    if not isinstance(got, bytes) or not hmac.compare_digest(expected, got):
        raise IntegrityError(f"the {who}'s proof does not match the invite")
