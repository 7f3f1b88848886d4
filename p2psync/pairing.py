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
    J -> I  end of stream                the joiner opened the secrets
    I -> J  end of stream                the inviter used up the invite, recorded MEMBER
    I -> J  JOIN_REFUSED  [44, code str, reason str]     (instead of any of the above)

    transcript = b"p2psync join v1\\0" || invite_id || inviter || joiner
                 || challenge_j || challenge_i
    mac_i = BLAKE3(key=invite_secret, b"inviter" || transcript)
    mac_j = BLAKE3(key=invite_secret, b"joiner"  || transcript)

Both MACs bind both NodeIds and two fresh challenges, so a relay or a LAN
eavesdropper that sees a handshake (but not the ticket) can neither answer
it nor replay it; the TLS certificate proves the inviter's NodeId to the
joiner; the group secret is sealed to the joiner's NodeId, so only the
holder of that key can open it.

An invite is accepted **once**. The inviter's :class:`InviteBook` decides
every step against its current state in one synchronous call, so
handshakes running side by side cannot share an invite: the first right
proof *claims* the invite (every other handshake is refused ``in-use``
from then on), and the invite is used up and the joiner's signed MEMBER
entry recorded only when the joiner has acknowledged the welcome (its end
of stream); a welcome that is lost releases the claim, and nothing is
recorded. Each handshake that gets the inviter's MAC is one of the invite's
:data:`~p2psync.defaults.JOIN_MAX_TRIES` tries however it ends (a wrong
proof, a joiner that hangs up), so at most that many run at once and that
many failures burn the invite: neither a guessed ticket nor a short code's
second half can be brute-forced online. JOIN_REQUESTs are rate-limited per
source. Expired, used, unknown, burnt or revoked invites are refused with a
reason and change nothing; so is a JOIN_REQUEST naming another NodeId than
the one its connection comes from (``node-mismatch``, checked by the node
before the book sees it, so it costs the invite no try).

Short codes
-----------
A **short code** ``XXXX-XXXX-XXXX-XXXX`` (80 bits, :mod:`p2psync.crypto.codes`)
is a split token: the first 8 characters (40 bits) are the **lookup half**
``L``, the last 8 the **secret half** ``S``. Everything a relay or a LAN
onlooker may see is derived from ``L`` alone; everything that unlocks the
invite is derived from ``S`` through Argon2id, salted by ``L``::

    lookup_id   = BLAKE3-derive("... short code lookup id v1", L)[0:16]   relayd's key
    lan_tag     = BLAKE3-derive("... short code lan tag v1", L)[0:16]     mDNS TXT
    invite_id   = BLAKE3-derive("... short code invite id v1", L)[0:16]   JOIN_REQUEST
    salt        = BLAKE3-derive("... short code salt v1", L)[0:16]
    K           = Argon2id(S, salt, t=3, m=64 MiB, p=1) (32 bytes; pinned)
    invite_secret = BLAKE3-derive("... join key v1", K)     keys the join MACs
    ticket_key    = BLAKE3-derive("... ticket key v1", K)   seals the ticket on relayd
    fetch_proof   = BLAKE3-derive("... relay proof v1", K)  shown to relayd to fetch
    verifier      = BLAKE3(fetch_proof)                     what relayd keeps to check it
    advert_tag    = BLAKE3-derive("... lan advert v1", K)[0:16]  seals the LAN advert

    sealed ticket = nonce(24) || XChaCha20-Poly1305(ticket_key, nonce,
                      ticket payload, aad = b"p2psync short code ticket v1" || lookup_id)

So every artifact that could test a guess of ``S`` offline (the sealed
ticket and the verifier on relayd, the sealed LAN advert, a recorded join
handshake) costs one Argon2id evaluation per guess: 2^40 of them cannot be
done within the 10-minute lifetime. The numbers, and why not a PAKE, are in
``docs/pairing-codes.md``.
"""

from __future__ import annotations

import collections
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import blake3

from p2psync import defaults
from p2psync.crypto.aead import (
    NONCE_SIZE,
    DecryptionFailed,
    random_nonce,
    xchacha_decrypt,
    xchacha_encrypt,
)
from p2psync.crypto.codes import (
    SHORT_CODE_SIZE,
    decode_code_untrusted,
    encode_code,
    format_short_code,
    parse_short_code_untrusted,
)
from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import BadNodeId, Identity, NodeId, RandomBytes, open_sealed, seal_to
from p2psync.crypto.passphrase import KdfParams, derive_key
from p2psync.errors import BadFrame, IntegrityError, LocalProtocolError, P2PSyncError
from p2psync.proto import invites as invites_wire
from p2psync.proto.codec import (
    as_bytes,
    as_int,
    as_list,
    as_optional_str,
    as_str,
    pack,
    unpack_untrusted,
)
from p2psync.proto.entry import hlc_to_ms
from p2psync.proto.framing import frame
from p2psync.ratelimit import KeyedBuckets

if TYPE_CHECKING:
    from p2psync.store import StoredEntry

TICKET_PREFIX = "p2pt"
TICKET_VERSION = 1
INVITE_ID_SIZE = 16
INVITE_SECRET_SIZE = 32
CHALLENGE_SIZE = 32
MAX_JOIN_FRAME = 16 * 1024
_TRANSCRIPT_LABEL = b"p2psync join v1\x00"

MAX_TICKET_PAYLOAD = 4096  # sealed (+ nonce and tag) it fits invites_wire.MAX_SEALED_SIZE

# --- short codes (candidates for p2psync/defaults.py) --------------------------------
# The first 8 characters (40 bits) find the invite; the last 8 (40 bits) unlock it.
SHORT_CODE_LOOKUP_SIZE: Final = 5
SHORT_CODE_SECRET_SIZE: Final = SHORT_CODE_SIZE - SHORT_CODE_LOOKUP_SIZE
# Argon2id cost of the secret half. Pinned, not taken from the passphrase
# defaults: inviter and joiner must agree with nothing but the code between
# them, so changing these is a new code version. m=64 MiB, t=3 takes ~0.2-0.4 s
# on a laptop core; docs/pairing-codes.md has the attacker's side.
SHORT_CODE_ARGON2_TIME_COST: Final = 3
SHORT_CODE_ARGON2_MEMORY_KIB: Final = 64 * 1024
SHORT_CODE_ARGON2_PARALLELISM: Final = 1
# A short code lives at most 10 minutes (the brute-force analysis assumes it).
SHORT_CODE_MAX_LIFETIME: Final = 600
# A sealed ticket (the relay's limit): a ticket payload plus nonce and tag.
MAX_SEALED_TICKET: Final = invites_wire.MAX_SEALED_SIZE
LAN_TAG_SIZE: Final = 16
LOOKUP_ID_SIZE: Final = invites_wire.LOOKUP_ID_SIZE
FETCH_PROOF_SIZE: Final = invites_wire.PROOF_SIZE

_CTX_LOOKUP_ID: Final = "p2psync 2026 short code lookup id v1"
_CTX_LAN_TAG: Final = "p2psync 2026 short code lan tag v1"
_CTX_INVITE_ID: Final = "p2psync 2026 short code invite id v1"
_CTX_SALT: Final = "p2psync 2026 short code salt v1"
_CTX_JOIN_KEY: Final = "p2psync 2026 short code join key v1"
_CTX_TICKET_KEY: Final = "p2psync 2026 short code ticket key v1"
_CTX_FETCH_PROOF: Final = "p2psync 2026 short code relay proof v1"
_CTX_ADVERT: Final = "p2psync 2026 short code lan advert v1"
_TICKET_AAD: Final = b"p2psync short code ticket v1"

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

    def payload(self) -> bytes:
        """The msgpack body: what :meth:`encode` checksums and a sealed ticket seals."""
        return pack(
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

    def encode(self) -> str:
        return encode_code(TICKET_PREFIX, self.payload())

    def __repr__(self) -> str:
        return f"Ticket({self.inviter.short()}, {len(self.addresses)} addresses, secret=<hidden>)"


def decode_ticket_untrusted(text: str) -> Ticket:
    """Parse a typed or pasted ticket; a typo is a :class:`BadFrame` saying so."""
    return decode_ticket_payload_untrusted(decode_code_untrusted(text, TICKET_PREFIX))


def decode_ticket_payload_untrusted(payload: bytes) -> Ticket:
    """Inverse of :meth:`Ticket.payload`; :class:`BadFrame` on any fault."""
    items = as_list(unpack_untrusted(payload, max_size=MAX_TICKET_PAYLOAD), "ticket", length=7)
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


# --- short codes ------------------------------------------------------------------


def _derive(context: str, material: bytes, size: int = 32) -> bytes:
    return blake3.blake3(material, derive_key_context=context).digest(length=size)


@dataclass(frozen=True, slots=True)
class LookupHalf:
    """The first 40 bits of a short code, and what may be derived from them alone.

    Whoever holds only this (relayd, a LAN onlooker who inverted the tag)
    can find the invite but not open it.
    """

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != SHORT_CODE_LOOKUP_SIZE:
            raise LocalProtocolError(f"a lookup half is {SHORT_CODE_LOOKUP_SIZE} bytes")

    @property
    def lookup_id(self) -> bytes:
        """The key relayd stores the sealed ticket under."""
        return _derive(_CTX_LOOKUP_ID, self.raw, LOOKUP_ID_SIZE)

    @property
    def lan_tag(self) -> bytes:
        """What the inviter's mDNS advert shows in clear."""
        return _derive(_CTX_LAN_TAG, self.raw, LAN_TAG_SIZE)

    @property
    def invite_id(self) -> bytes:
        """The invite id of the join handshake."""
        return _derive(_CTX_INVITE_ID, self.raw, INVITE_ID_SIZE)

    @property
    def salt(self) -> bytes:
        """Argon2id salt of the secret half: one brute force per code, no shared tables."""
        return _derive(_CTX_SALT, self.raw, 16)


@dataclass(frozen=True, slots=True)
class CodeKeys:
    """Everything the secret half unlocks (derived through Argon2id; never logged)."""

    invite_id: bytes
    invite_secret: bytes
    ticket_key: bytes
    fetch_proof: bytes
    advert_tag: bytes

    @property
    def verifier(self) -> bytes:
        """What relayd keeps to check a fetch proof (a preimage would need ``K``)."""
        return blake3.blake3(self.fetch_proof).digest()

    def __repr__(self) -> str:
        return "CodeKeys(<hidden>)"


@dataclass(frozen=True, slots=True)
class ShortCode:
    """A 16-character invite code: lookup half || secret half (see the module docstring)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != SHORT_CODE_SIZE:
            raise LocalProtocolError(f"a short code is {SHORT_CODE_SIZE} bytes")

    @classmethod
    def generate(cls, random_bytes: RandomBytes) -> ShortCode:
        return cls(random_bytes(SHORT_CODE_SIZE))

    @classmethod
    def parse_untrusted(cls, text: str) -> ShortCode:
        """A typed code; :class:`~p2psync.crypto.codes.BadCode` says what is wrong."""
        return cls(parse_short_code_untrusted(text))

    @property
    def text(self) -> str:
        return format_short_code(self.raw)

    @property
    def lookup(self) -> LookupHalf:
        return LookupHalf(self.raw[:SHORT_CODE_LOOKUP_SIZE])

    def derive_keys(
        self,
        *,
        time_cost: int = SHORT_CODE_ARGON2_TIME_COST,
        memory_kib: int = SHORT_CODE_ARGON2_MEMORY_KIB,
    ) -> CodeKeys:
        """Argon2id over the secret half (slow on purpose: run it in a worker thread).

        Tests may lower the cost; both sides of one code must use the same.
        """
        lookup = self.lookup
        params = KdfParams(
            salt=lookup.salt,
            time_cost=time_cost,
            memory_kib=memory_kib,
            parallelism=SHORT_CODE_ARGON2_PARALLELISM,
        )
        key = derive_key(self.raw[SHORT_CODE_LOOKUP_SIZE:], params)
        return CodeKeys(
            invite_id=lookup.invite_id,
            invite_secret=_derive(_CTX_JOIN_KEY, key),
            ticket_key=_derive(_CTX_TICKET_KEY, key),
            fetch_proof=_derive(_CTX_FETCH_PROOF, key, FETCH_PROOF_SIZE),
            advert_tag=_derive(_CTX_ADVERT, key, LAN_TAG_SIZE),
        )

    def __repr__(self) -> str:
        return f"ShortCode({self.text[:9]}****-****)"


def seal_ticket(
    keys: CodeKeys, lookup: LookupHalf, ticket: Ticket, random_bytes: RandomBytes
) -> bytes:
    """The ticket as relayd stores it: only the secret half opens it."""
    if ticket.invite_id != keys.invite_id or ticket.invite_secret != keys.invite_secret:
        raise LocalProtocolError("a short code's ticket carries the code's invite id and secret")
    nonce = random_nonce(random_bytes)
    aad = _TICKET_AAD + lookup.lookup_id
    return nonce + xchacha_encrypt(keys.ticket_key, nonce, ticket.payload(), aad)


def open_ticket_untrusted(keys: CodeKeys, lookup: LookupHalf, sealed: bytes) -> Ticket:
    """Open a sealed ticket from relayd: :class:`IntegrityError` if the code does not fit."""
    if not NONCE_SIZE < len(sealed) <= MAX_SEALED_TICKET:
        raise BadFrame(f"a sealed ticket is {NONCE_SIZE + 1}..{MAX_SEALED_TICKET} bytes")
    try:
        nonce, box = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:]
        payload = xchacha_decrypt(keys.ticket_key, nonce, box, _TICKET_AAD + lookup.lookup_id)
    except DecryptionFailed:
        raise IntegrityError("the code does not open this invite: wrong or mistyped code") from None
    ticket = decode_ticket_payload_untrusted(payload)
    if not (
        hmac.compare_digest(ticket.invite_id, keys.invite_id)
        and hmac.compare_digest(ticket.invite_secret, keys.invite_secret)
    ):
        raise BadFrame("the sealed ticket does not carry the code's own invite")
    return ticket


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


# --- the inviter's book of open invites ---------------------------------------------


@dataclass(slots=True)
class Invite:
    """An open invite (see :class:`InviteBook`).

    ``tries``: handshakes that got our MAC, however they ended or are going
    (:data:`~p2psync.defaults.JOIN_MAX_TRIES`); ``running``: those still in
    flight; ``claimed_by``: the handshake whose proof was right, from then
    until its welcome is acknowledged or lost.
    """

    invite_id: bytes
    secret: bytes = field(repr=False)
    expires: int
    tries: int = 0
    running: int = 0
    claimed_by: int | None = None


@dataclass(frozen=True, slots=True)
class InviteEnded:
    """An invite left the book: ``reason`` is joined, burned, revoked or expired."""

    invite_id: bytes
    reason: str


@dataclass(slots=True, eq=False)
class InviterHandshake:
    """One join handshake at the inviter, made by :meth:`InviteBook.begin`.

    ``challenge`` and ``mac`` are what JOIN_CHALLENGE carries; ``state``
    moves along :data:`HANDSHAKE_TRANSITIONS`.
    """

    number: int
    invite_id: bytes
    request: JoinRequest
    challenge: bytes
    script: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    state: str = "challenged"


# (state, what happened) -> next state. "challenged": our MAC is out, the
# proof is awaited; "proved": the proof was right and the handshake holds the
# invite's claim while the welcome is delivered; "ended": counted, nothing
# more to do. Anything else is a LocalProtocolError (a shell bug).
HANDSHAKE_TRANSITIONS: Final[dict[tuple[str, str], str]] = {
    ("challenged", "proof-right"): "proved",
    ("challenged", "proof-refused"): "ended",
    ("challenged", "abandoned"): "ended",
    ("proved", "welcomed"): "ended",
    ("proved", "abandoned"): "ended",
    ("ended", "abandoned"): "ended",  # the shell's `finally` after any end: a no-op
}


class InviteBook:
    """A node's open invites and the inviter's side of every join handshake (sans-IO).

    In memory: a daemon restart drops open invites. Every method takes
    ``now`` (unix seconds) and decides against the book's *current* state,
    in one synchronous step, so handshakes that run side by side cannot both
    use one invite:

    - :meth:`begin` (a JOIN_REQUEST): rate-limited per source
      (:mod:`p2psync.ratelimit`), then the invite must be open, unclaimed
      and have a try left; the handshake takes a try and our MAC.
    - :meth:`prove` (a JOIN_PROOF): looks the invite up again. Gone (used,
      burnt, revoked, expired) or claimed by another handshake: refused. A
      wrong proof keeps its try (three burn the invite once none is in
      flight). A right proof **claims** the invite: every other handshake is
      refused from now on, and revocation and expiry wait.
    - :meth:`welcomed` (the joiner acknowledged the welcome): the invite is
      used up; only now does the shell record the MEMBER entry.
    - :meth:`abandon` (the handshake ended any other way: the joiner hung
      up or timed out, even after our MAC, or the welcome was lost): the try
      stays counted, except that a claim is released and its try given back
      (that joiner knew the secret; it may try again).

    Ended invites come out of :meth:`next_event`, for the shell to wake
    whoever waits on them.
    """

    def __init__(
        self,
        *,
        max_open: int = defaults.INVITES_MAX_OPEN,
        max_tries: int = defaults.JOIN_MAX_TRIES,
        request_rate: float = defaults.JOIN_REQUEST_PER_SOURCE_RATE,
        request_burst: float = defaults.JOIN_REQUEST_PER_SOURCE_BURST,
        total_rate: float = defaults.JOIN_REQUEST_TOTAL_RATE,
        total_burst: float = defaults.JOIN_REQUEST_TOTAL_BURST,
        max_sources: int = defaults.JOIN_REQUEST_MAX_SOURCES,
    ) -> None:
        self._open: dict[bytes, Invite] = {}
        self._max_open = max_open
        self.max_tries = max_tries
        self._requests: KeyedBuckets[str] = KeyedBuckets(
            request_rate,
            request_burst,
            max_sources,
            total_rate=total_rate,
            total_burst=total_burst,
            now=0.0,
        )
        self._handshakes = 0
        self._events: collections.deque[InviteEnded] = collections.deque(maxlen=4 * max_open)

    # --- opening and closing ----------------------------------------------------------

    def create(self, random_bytes: RandomBytes, now: float, lifetime: int) -> Invite:
        return self.add(
            random_bytes(INVITE_ID_SIZE), random_bytes(INVITE_SECRET_SIZE), now, lifetime
        )

    def add(self, invite_id: bytes, secret: bytes, now: float, lifetime: int) -> Invite:
        """Open an invite whose id and secret were derived elsewhere (a short code's)."""
        self.expire(now)
        if len(self._open) >= self._max_open:
            raise JoinRefused("too-many-invites", "too many open invites; wait for some to expire")
        if invite_id in self._open:
            raise JoinRefused("duplicate-invite", "this invite is already open")
        invite = Invite(invite_id, secret, int(now) + lifetime)
        self._open[invite_id] = invite
        return invite

    def is_open(self, invite_id: bytes, now: float) -> bool:
        self.expire(now)
        return invite_id in self._open

    def revoke(self, invite_id: bytes, now: float) -> bool:
        """Close an open invite; False if it is not open, or a device is joining with it
        right now (its proof was right: too late to take it back)."""
        self.expire(now)
        invite = self._open.get(invite_id)
        if invite is None or invite.claimed_by is not None:
            return False
        self._end(invite, "revoked")
        return True

    def expire(self, now: float) -> None:
        """Drop invites past their time (a claimed one ends with its handshake)."""
        for invite in [i for i in self._open.values() if i.expires <= now]:
            if invite.claimed_by is None:
                self._end(invite, "expired")

    def next_event(self) -> InviteEnded | None:
        return self._events.popleft() if self._events else None

    def __len__(self) -> int:
        return len(self._open)

    # --- the handshake ----------------------------------------------------------------

    def begin(
        self, request: JoinRequest, source: str, inviter: NodeId, challenge: bytes, now: float
    ) -> InviterHandshake:
        """Answer a JOIN_REQUEST from ``source``, or raise :class:`JoinRefused`."""
        if not self._requests.take(source, now):
            raise JoinRefused(
                "rate-limited", "too many join attempts from your address; wait a minute"
            )
        self.expire(now)
        invite = self._open.get(request.invite_id)
        if invite is None:
            raise _unknown_invite()
        if invite.claimed_by is not None or invite.tries >= self.max_tries:
            raise _in_use()
        invite.tries += 1
        invite.running += 1
        self._handshakes += 1
        script = transcript(invite.invite_id, inviter, request.joiner, request.challenge, challenge)
        return InviterHandshake(
            number=self._handshakes,
            invite_id=invite.invite_id,
            request=request,
            challenge=challenge,
            script=script,
            mac=join_mac(invite.secret, b"inviter", script),
        )

    def prove(self, handshake: InviterHandshake, mac: object, now: float) -> None:
        """Check a JOIN_PROOF against the invite as it is now; raise :class:`JoinRefused`
        unless the proof is right and the invite is still there for this handshake."""
        _step(handshake, "proof-right")  # only checks that a proof is expected now
        self.expire(now)
        invite = self._open.get(handshake.invite_id)
        if invite is None:
            handshake.state = _step(handshake, "proof-refused")
            raise _unknown_invite()
        right = isinstance(mac, bytes) and hmac.compare_digest(
            join_mac(invite.secret, b"joiner", handshake.script), mac
        )
        if not right or invite.claimed_by is not None:
            handshake.state = _step(handshake, "proof-refused")
            invite.running -= 1
            self._settle(invite, now)
            if not right:
                raise JoinRefused("wrong-code", "wrong or mistyped invite code")
            raise _in_use()
        handshake.state = _step(handshake, "proof-right")
        invite.claimed_by = handshake.number

    def welcomed(self, handshake: InviterHandshake) -> None:
        """The joiner has the group secret: the invite is used up."""
        handshake.state = _step(handshake, "welcomed")
        invite = self._open[handshake.invite_id]  # a claimed invite stays until now
        self._end(invite, "joined")

    def abandon(self, handshake: InviterHandshake, now: float) -> None:
        """The handshake ended without :meth:`welcomed` (safe to call after any end)."""
        previous = handshake.state
        handshake.state = _step(handshake, "abandoned")
        if previous == "ended":
            return
        invite = self._open.get(handshake.invite_id)
        if invite is None:
            return
        invite.running -= 1
        if invite.claimed_by == handshake.number:
            invite.claimed_by = None
            invite.tries -= 1  # its proof was right: the lost welcome is not a try
        self._settle(invite, now)

    # --- internals --------------------------------------------------------------------

    def _settle(self, invite: Invite, now: float) -> None:
        if invite.claimed_by is not None:
            return
        if invite.tries >= self.max_tries and invite.running == 0:
            self._end(invite, "burned")
        elif invite.expires <= now:
            self._end(invite, "expired")

    def _end(self, invite: Invite, reason: str) -> None:
        del self._open[invite.invite_id]
        self._events.append(InviteEnded(invite.invite_id, reason))


def _step(handshake: InviterHandshake, happened: str) -> str:
    state = HANDSHAKE_TRANSITIONS.get((handshake.state, happened))
    if state is None:
        raise LocalProtocolError(f"join handshake: {happened} in state {handshake.state}")
    return state


def _unknown_invite() -> JoinRefused:
    return JoinRefused(
        "unknown-invite", "this invite is unknown, expired or already used; ask for a new one"
    )


def _in_use() -> JoinRefused:
    return JoinRefused(
        "in-use",
        "another device is joining with this invite right now (an invite works once); "
        "if that is not yours, ask for a new one",
    )


# --- devices: the group's MEMBER entries ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """A group member as its MEMBER entry records it.

    ``added_by`` is the entry's author (its signature vouches for it); None
    for the device that created the group (it recorded itself).
    """

    node_id: str
    name: str
    added_by: str | None
    added_ms: int

    def to_json(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "added_by": self.added_by,
            "added_ms": self.added_ms,
        }


def devices_from_members(members: Sequence[StoredEntry]) -> list[Device]:
    """One :class:`Device` per NodeId (its latest MEMBER entry), oldest member first.

    Entries whose metadata this device cannot open, or that name no valid
    NodeId, are skipped.
    """
    latest: dict[str, Device] = {}
    for stored in members:
        meta = stored.meta
        if meta is None:
            continue
        raw = meta.app.get("node_id")
        if not isinstance(raw, str):
            continue
        try:
            node_id = str(NodeId.parse(raw))
        except BadFrame:
            continue
        author = str(stored.entry.author)
        device = Device(
            node_id=node_id,
            name=meta.name or "",
            added_by=None if author == node_id else author,
            added_ms=hlc_to_ms(stored.entry.hlc),
        )
        latest[node_id] = device  # members() is in arrival order: the newest record wins
    return sorted(latest.values(), key=lambda device: device.added_ms)  # stable: arrival order


def device_rows(
    devices: Sequence[Device],
    ours: str,
    peers: Mapping[str, Mapping[str, Any]],
    stored_seen: Mapping[str, float],
    now: float,
) -> list[dict[str, Any]]:
    """The rows of ``devices`` (control API and ``p2psync devices --json``).

    ``peers`` are **peer** objects by NodeId (a running node's view),
    ``stored_seen`` the unix times the store recorded (``Store.peers_seen``).
    ``last_seen`` is ``now`` for this device and connected ones, else the
    latest time either source knows, or None.
    """
    rows: list[dict[str, Any]] = []
    for device in devices:
        peer = peers.get(device.node_id, {})
        this = device.node_id == ours
        connected = peer.get("path") not in (None, "none")
        if this or connected:
            last_seen: float | None = now
        else:
            times = [t for t in (peer.get("last_seen"), stored_seen.get(device.node_id)) if t]
            last_seen = max(times) if times else None
        rows.append(
            {
                **device.to_json(),
                "this_device": this,
                "connected": None if this else connected,
                "path": peer.get("path"),
                "last_seen": last_seen,
            }
        )
    return rows
