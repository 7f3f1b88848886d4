"""Pure, clock-injected state of relayd: rate limits, per-IP tables, log gates.

Nothing here reads a clock, touches a socket or imports trio: every method
that depends on time takes ``now`` (seconds, any monotonic origin). The trio
shell (:mod:`relayd.server`) feeds it ``trio.current_time()``; tests step
``now`` by hand.

Rules it keeps
--------------
- Every table a remote peer can grow is bounded: :class:`LruTable` evicts the
  least recently used entry (a spoofing flood costs evictions, not memory);
  :class:`ConnectionCounter` is bounded by its own total limit.
- Time going backwards (or standing still) never creates tokens.
- Refusals are values (:class:`Refusal`), not exceptions: the shell counts
  them in metrics and maybe logs them through a :class:`LogGate`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from p2psync.errors import LocalProtocolError
from p2psync.ratelimit import TokenBucket

__all__ = [
    "ConnectionCounter",
    "LogGate",
    "LruTable",
    "PerIpRateLimiter",
    "Refusal",
    "TokenBucket",
]

K = TypeVar("K")
V = TypeVar("V")


class LruTable(Generic[K, V]):
    """A dict of at most ``capacity`` entries; the least recently used goes first.

    ``get_or_create(key)`` makes an entry with ``factory(key)`` when missing,
    evicting the oldest entry if full; ``evictions`` counts how often.
    """

    def __init__(self, capacity: int, factory: Callable[[K], V]) -> None:
        if capacity <= 0:
            raise LocalProtocolError("LRU table capacity must be positive")
        self.capacity = capacity
        self._factory = factory
        self._entries: OrderedDict[K, V] = OrderedDict()
        self.evictions = 0

    def get_or_create(self, key: K) -> V:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        if len(self._entries) >= self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1
        entry = self._factory(key)
        self._entries[key] = entry
        return entry

    def get(self, key: K) -> V | None:
        """Look up without creating or refreshing."""
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)


class PerIpRateLimiter:
    """A :class:`TokenBucket` per source IP, in a bounded :class:`LruTable`.

    An evicted IP comes back with a full bucket: eviction only happens when
    more than ``capacity`` IPs are active at once, and then each one is still
    held to ``burst + rate * t`` while it stays in the table.
    """

    def __init__(self, rate: float, burst: float, capacity: int) -> None:
        self._now = 0.0
        self.rate = rate
        self.burst = burst
        self.table: LruTable[str, TokenBucket] = LruTable(
            capacity, lambda _ip: TokenBucket(rate, burst, self._now)
        )

    def allow(self, ip: str, now: float, n: float = 1.0) -> bool:
        """True if ``ip`` may spend ``n`` more tokens at ``now``."""
        self._now = now
        return self.table.get_or_create(ip).take(now, n)


class Refusal(enum.Enum):
    """Why a new connection was refused (also its metric label)."""

    TOTAL = "too-many-connections"
    PER_IP = "too-many-connections-from-ip"


class ConnectionCounter:
    """Counts live connections, total and per IP, and refuses past the limits.

    The per-IP table holds only IPs with at least one live connection, so it
    never has more than ``max_total`` entries.
    """

    def __init__(self, max_total: int, max_per_ip: int) -> None:
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def try_add(self, ip: str) -> Refusal | None:
        """Count a new connection from ``ip``, or say why it is refused."""
        if self.total >= self.max_total:
            return Refusal.TOTAL
        current = self._per_ip.get(ip, 0)
        if current >= self.max_per_ip:
            return Refusal.PER_IP
        self._per_ip[ip] = current + 1
        self.total += 1
        return None

    def remove(self, ip: str) -> None:
        """Forget one connection from ``ip`` (one that :meth:`try_add` accepted)."""
        current = self._per_ip.get(ip, 0)
        if current <= 0:
            raise LocalProtocolError(f"no live connection counted for {ip}")
        if current == 1:
            del self._per_ip[ip]
        else:
            self._per_ip[ip] = current - 1
        self.total -= 1

    def count(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    @property
    def ips(self) -> int:
        return len(self._per_ip)


@dataclass(slots=True)
class _GateEntry:
    last: float
    suppressed: int


class LogGate:
    """Lets one log line per reason through every ``interval`` seconds.

    ``check(reason, now)`` returns None (stay quiet: counted as suppressed)
    or the number of lines suppressed since the last one let through.
    Reasons are bounded by an LRU table: a caller that (wrongly) puts peer
    data in a reason cannot grow memory.
    """

    def __init__(self, interval: float, capacity: int = 256) -> None:
        self.interval = interval
        self._entries: LruTable[str, _GateEntry] = LruTable(
            capacity, lambda _reason: _GateEntry(last=float("-inf"), suppressed=0)
        )
        self.suppressed_total = 0

    def check(self, reason: str, now: float) -> int | None:
        entry = self._entries.get_or_create(reason)
        if now - entry.last >= self.interval:
            suppressed, entry.suppressed, entry.last = entry.suppressed, 0, now
            return suppressed
        entry.suppressed += 1
        self.suppressed_total += 1
        return None
