"""relayd's invite store: sealed short-code tickets, single use, bounded, rate-limited.

Theory
------
A short code is a split token (:mod:`p2psync.pairing`): the inviter stores a
**sealed ticket** here under a ``lookup_id`` derived from the code's first
half, with a **verifier** derived (through Argon2id) from the second half.
A joiner presents the ``proof`` whose BLAKE3 is the verifier; the first
correct proof takes the ticket and the record is deleted. relayd never sees
the second half and cannot open the ticket; whoever holds a record (the
operator, a memory dump) must still pay one Argon2id per guess of a 40-bit
secret, which cannot finish within the record's 10-minute life
(``docs/pairing-codes.md``).

Wire format: :mod:`p2psync.proto.invites` (service ``"invites"`` v1).

Rules it keeps
--------------
- :class:`InviteStore` is pure: every method takes ``now`` (monotonic
  seconds); nothing here reads a clock or touches a socket. The service
  handler at the bottom (:func:`invites_service`) is the thin trio shell.
- **Single use**: a record is deleted the moment its ticket is handed out.
  **Expiry**: at most ``max_lifetime_s`` after creation, whatever was asked.
  **Revocation**: only the NodeId that created a record may revoke it (others
  get NOT_FOUND, which tells them nothing). **Wrong proofs**: a record
  survives ``max_wrong_proofs - 1`` of them, then it is burnt.
- **Bounded**: at most ``max_stored`` records, at most ``max_per_ip`` per
  creating address; ended records leave a small tombstone (reason only, for
  clear errors: "used", "expired", "revoked") that lives ``max_lifetime_s``
  and is bounded by ``max_stored`` too (oldest dropped first). Rate-limit
  state per source lives in LRU tables of ``max_tracked_ips``.
- **A source** is an IPv4 address, or an IPv6 address's ``/ipv6_prefix``
  (64 by default, :func:`p2psync.ratelimit.source_key`): a host handed a
  /64 could otherwise take fresh limits with every address it picks.
  ``max_per_ip`` and every rate limit count per source.
- **Rate limits per source**: creations (``create_*``), lookups
  (``lookup_*``) and, stricter, failed lookups (``failed_lookup_*``: an
  unknown lookup id, a wrong proof, an ended record). A lookup is refused
  up front while the failure bucket is empty, so a guesser gets at most
  ``failed_lookup_burst + failed_lookup_rate * t`` answers that can be
  wrong, whatever it sends.
"""

from __future__ import annotations

import heapq
import hmac
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import blake3
import trio

from p2psync.crypto.identity import NodeId
from p2psync.proto.invites import (
    MAX_FRAME,
    SERVICE,
    VERSION,
    Create,
    Created,
    Failed,
    Fetch,
    InviteFailure,
    Reply,
    Revoke,
    Revoked,
    TicketFound,
    decode_request_untrusted,
    encode_reply,
)
from p2psync.ratelimit import source_key
from relayd import defaults as d
from relayd.config import RelaydInvites
from relayd.metrics import Registry
from relayd.services import Service, ServiceCall
from relayd.state import LogGate, LruTable, TokenBucket

__all__ = ["InviteStore", "Outcome", "invites_service"]

log = logging.getLogger(__name__)

# Rate-limit kinds (metric labels).
LIMIT_CREATE: Final = "create"
LIMIT_LOOKUP: Final = "lookup"
LIMIT_FAILED_LOOKUP: Final = "failed-lookup"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A reply, and what to count: ``result`` (ok or a failure label), ``limit`` hit if any."""

    reply: Reply
    result: str
    limit: str | None = None


@dataclass(slots=True)
class _Record:
    owner: NodeId
    ip: str
    verifier: bytes
    sealed: bytes
    expires: float
    wrong_proofs: int = 0


@dataclass(slots=True)
class _Tombstone:
    reason: InviteFailure
    owner: NodeId
    until: float


class _Buckets:
    """A token bucket per IP in a bounded LRU table (new IPs start full)."""

    def __init__(self, rate: float, burst: float, capacity: int) -> None:
        self.rate = rate
        self._now = 0.0
        self.table: LruTable[str, TokenBucket] = LruTable(
            capacity, lambda _ip: TokenBucket(rate, burst, self._now)
        )

    def bucket(self, ip: str, now: float) -> TokenBucket:
        self._now = now
        return self.table.get_or_create(ip)

    def retry_after(self, bucket: TokenBucket, now: float) -> int:
        missing = 1.0 - bucket.available(now)
        if self.rate <= 0:
            return 0
        return max(1, math.ceil(missing / self.rate))


def _failed(code: InviteFailure, message: str, **extra: int | None) -> Outcome:
    return Outcome(Failed(int(code), message, **extra), code.label)


class InviteStore:
    """The records, their expiry and the per-IP limits (pure; see the module docstring)."""

    def __init__(self, limits: RelaydInvites) -> None:
        self.limits = limits
        self._records: dict[bytes, _Record] = {}
        self._expiries: list[tuple[float, bytes]] = []  # heap; stale entries skipped
        self._tombstones: OrderedDict[bytes, _Tombstone] = OrderedDict()
        self._per_ip: dict[str, int] = {}
        capacity = limits.max_tracked_ips
        self._creates = _Buckets(limits.create_per_ip_rate, limits.create_per_ip_burst, capacity)
        self._lookups = _Buckets(limits.lookup_per_ip_rate, limits.lookup_per_ip_burst, capacity)
        self._failures = _Buckets(
            limits.failed_lookup_per_ip_rate, limits.failed_lookup_per_ip_burst, capacity
        )

    def __len__(self) -> int:
        return len(self._records)

    @property
    def tracked_ips(self) -> int:
        return len(self._lookups.table) + len(self._creates.table)

    def open_from(self, ip: str) -> int:
        return self._per_ip.get(self.source(ip), 0)

    # --- requests -------------------------------------------------------------------

    def source(self, ip: str) -> str:
        """What the per-IP limits count ``ip`` as (IPv6: its prefix)."""
        return source_key(ip, self.limits.ipv6_prefix)

    def create(self, owner: NodeId, ip: str, request: Create, now: float) -> Outcome:
        limits = self.limits
        ip = self.source(ip)
        bucket = self._creates.bucket(ip, now)
        if not bucket.take(now):
            retry = self._creates.retry_after(bucket, now)
            outcome = _failed(
                InviteFailure.RATE_LIMITED,
                f"too many invites created from your address; retry in {retry} s",
                retry_after=retry,
            )
            return Outcome(outcome.reply, outcome.result, LIMIT_CREATE)
        self.expire(now)
        if request.lookup_id in self._records or request.lookup_id in self._tombstones:
            return _failed(InviteFailure.EXISTS, "this code is taken; make a new one")
        if len(self._records) >= limits.max_stored:
            return _failed(InviteFailure.FULL, "the relay holds as many invites as it may")
        if self._per_ip.get(ip, 0) >= limits.max_per_ip:
            return _failed(
                InviteFailure.FULL, f"your address already has {limits.max_per_ip} open invites"
            )
        lifetime = min(request.lifetime, limits.max_lifetime_s)
        expires = now + lifetime
        self._records[request.lookup_id] = _Record(
            owner, ip, request.verifier, request.sealed, expires
        )
        heapq.heappush(self._expiries, (expires, request.lookup_id))
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        return Outcome(Created(lifetime), "ok")

    def fetch(self, ip: str, request: Fetch, now: float) -> Outcome:
        ip = self.source(ip)
        lookups = self._lookups.bucket(ip, now)
        failures = self._failures.bucket(ip, now)
        if failures.available(now) < 1.0:
            retry = self._failures.retry_after(failures, now)
            outcome = _failed(
                InviteFailure.RATE_LIMITED,
                f"too many failed lookups from your address; retry in {retry} s",
                retry_after=retry,
            )
            return Outcome(outcome.reply, outcome.result, LIMIT_FAILED_LOOKUP)
        if not lookups.take(now):
            retry = self._lookups.retry_after(lookups, now)
            outcome = _failed(
                InviteFailure.RATE_LIMITED,
                f"too many lookups from your address; retry in {retry} s",
                retry_after=retry,
            )
            return Outcome(outcome.reply, outcome.result, LIMIT_LOOKUP)
        self.expire(now)
        record = self._records.get(request.lookup_id)
        if record is None:
            failures.take(now)
            return self._ended(request.lookup_id)
        proof_hash = blake3.blake3(request.proof).digest()
        if not hmac.compare_digest(proof_hash, record.verifier):
            failures.take(now)
            record.wrong_proofs += 1
            left = self.limits.max_wrong_proofs - record.wrong_proofs
            if left <= 0:
                self._end(request.lookup_id, InviteFailure.BURNED, now)
                return _failed(
                    InviteFailure.BURNED,
                    "wrong code too many times: this invite is gone; ask for a new code",
                )
            return _failed(
                InviteFailure.WRONG_CODE,
                "wrong or mistyped code (check the last 8 characters)",
                tries_left=left,
            )
        sealed = record.sealed
        self._end(request.lookup_id, InviteFailure.USED, now)
        return Outcome(TicketFound(sealed), "ok")

    def revoke(self, owner: NodeId, request: Revoke, now: float) -> Outcome:
        self.expire(now)
        record = self._records.get(request.lookup_id)
        if record is not None and record.owner == owner:
            self._end(request.lookup_id, InviteFailure.REVOKED, now)
            return Outcome(Revoked(), "ok")
        tombstone = self._tombstones.get(request.lookup_id)
        if record is None and tombstone is not None and tombstone.owner == owner:
            return self._ended(request.lookup_id)
        return _failed(InviteFailure.NOT_FOUND, "no invite of yours under this code")

    # --- bookkeeping ----------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Drop records and tombstones whose time is up."""
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires, lookup_id = heapq.heappop(heap)
            record = self._records.get(lookup_id)
            if record is not None and record.expires == expires:
                self._end(lookup_id, InviteFailure.EXPIRED, now)
        tombstones = self._tombstones
        while tombstones:
            lookup_id, tombstone = next(iter(tombstones.items()))
            if tombstone.until > now:
                break
            del tombstones[lookup_id]

    def _end(self, lookup_id: bytes, reason: InviteFailure, now: float) -> None:
        record = self._records.pop(lookup_id)
        count = self._per_ip.get(record.ip, 0) - 1
        if count > 0:
            self._per_ip[record.ip] = count
        else:
            self._per_ip.pop(record.ip, None)
        self._tombstones[lookup_id] = _Tombstone(
            reason, record.owner, now + self.limits.max_lifetime_s
        )
        self._tombstones.move_to_end(lookup_id)
        while len(self._tombstones) > self.limits.max_stored:
            self._tombstones.popitem(last=False)

    def _ended(self, lookup_id: bytes) -> Outcome:
        tombstone = self._tombstones.get(lookup_id)
        if tombstone is None:
            return _failed(
                InviteFailure.NOT_FOUND,
                "no invite under this code here: check the first 8 characters, "
                "and that both devices use the same relay",
            )
        messages = {
            InviteFailure.USED: "this code was already used (codes work once); ask for a new one",
            InviteFailure.EXPIRED: "this code has expired; ask for a new one",
            InviteFailure.REVOKED: "the inviter cancelled this code; ask for a new one",
            InviteFailure.BURNED: "wrong code too many times: this invite is gone",
        }
        reason = tombstone.reason
        return _failed(reason, messages.get(reason, "this code no longer works"))


# --- the trio shell ---------------------------------------------------------------------


def invites_service(
    store: InviteStore,
    registry: Registry,
    *,
    log_interval: float = d.LOG_INTERVAL_S,
) -> Service:
    """The ``invites`` v1 service over ``store``, counting into ``registry``.

    Metrics: ``relayd_invites_requests_total{op,result}``,
    ``relayd_invites_rate_limited_total{kind}``, gauge ``relayd_invites_stored``.
    """
    requests = registry.counter(
        "relayd_invites_requests_total",
        "Invite store requests, by operation and result.",
        ("op", "result"),
    )
    rate_limited = registry.counter(
        "relayd_invites_rate_limited_total",
        "Invite requests refused by a per-IP rate limit (failed-lookup: the stricter one).",
        ("kind",),
    )
    stored = registry.gauge("relayd_invites_stored", "Invites stored now.")
    stored.set_function(lambda: len(store))
    for kind in (LIMIT_CREATE, LIMIT_LOOKUP, LIMIT_FAILED_LOOKUP):
        rate_limited.inc(0, kind=kind)
    for op in ("create", "fetch", "revoke"):
        requests.inc(0, op=op, result="ok")
    gate = LogGate(log_interval)

    async def handle(call: ServiceCall) -> None:
        while (body := await call.receive()) is not None:
            request = decode_request_untrusted(body)  # BadFrame: the relay ends the stream
            now = trio.current_time()
            if isinstance(request, Create):
                op, outcome = "create", store.create(call.node_id, call.ip, request, now)
            elif isinstance(request, Fetch):
                op, outcome = "fetch", store.fetch(call.ip, request, now)
            else:
                op, outcome = "revoke", store.revoke(call.node_id, request, now)
            requests.inc(op=op, result=outcome.result)
            if outcome.limit is not None:
                rate_limited.inc(kind=outcome.limit)
                suppressed = gate.check(outcome.limit, now)
                if suppressed is not None:
                    log.warning(
                        "invites: %s rate limit hit by %s (%d similar suppressed)",
                        outcome.limit,
                        call.ip,
                        suppressed,
                    )
            await call.send(encode_reply(outcome.reply))

    return Service(SERVICE, frozenset({VERSION}), handle, MAX_FRAME)
