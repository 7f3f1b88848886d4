"""Rate limits keyed by a peer-chosen value (sans-IO).

Theory
------
Whatever a peer can make us do per request (answer a JOIN_REQUEST, look up
an invite) is limited by a **token bucket** per source: ``rate`` tokens a second,
at most ``burst`` saved, so over any interval ``t`` a source gets at most
``burst + rate * t``. Sources are remembered in an LRU table of bounded
size: a flood of fresh sources evicts old entries (which then start full
again) instead of growing memory, so a table limit always goes together
with a **total** bucket over all sources, which no number of sources can
get around.

A **source** is an IP address, except that IPv6 addresses are grouped by
a prefix (:func:`source_key`, /64 by default): one host or household is
handed a whole /64 (RFC 6177) and can pick a fresh address per request,
so a per-address limit would be no limit at all. IPv4 stays per address
(and an IPv4-mapped IPv6 address counts as its IPv4 address).

Everything takes ``now`` (any monotonic seconds); nothing here reads a
clock. relayd's tables (:mod:`relayd.state`) build on this module's
:class:`TokenBucket` and :func:`source_key` (relayd may import p2psync,
never the reverse).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Generic, TypeVar

from p2psync.errors import LocalProtocolError

K = TypeVar("K")

__all__ = ["KeyedBuckets", "TokenBucket", "source_key"]


def source_key(ip: str, ipv6_prefix: int) -> str:
    """The rate-limit key of a source address: IPv4 as is, IPv6 by its ``/ipv6_prefix``.

    Text that is no IP address (a test's or a relayed peer's label) is its own key.
    """
    if not 1 <= ipv6_prefix <= 128:
        raise LocalProtocolError("an IPv6 prefix length is 1..128")
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])  # drop a zone index
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


class TokenBucket:
    """Classic token bucket: ``rate`` tokens per second, at most ``burst`` saved.

    Starts full. ``take(now, n)`` spends ``n`` tokens and returns True, or
    spends nothing and returns False. Over any interval of length ``t`` a
    bucket grants at most ``burst + rate * t`` tokens. Time going backwards
    (or standing still) never creates tokens. The one token bucket of the
    project: relayd's limits (:mod:`relayd.state`) use it too.
    """

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float = 0.0) -> None:
        if rate < 0 or burst <= 0:
            raise LocalProtocolError("a token bucket needs rate >= 0 and burst > 0")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = float(burst)
        self._last = now

    def available(self, now: float) -> float:
        """Tokens that could be spent at ``now``."""
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        return self._tokens

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend ``n`` tokens at time ``now`` if there are enough."""
        if n <= self.available(now):
            self._tokens -= n
            return True
        return False


class KeyedBuckets(Generic[K]):
    """A :class:`TokenBucket` per key (at most ``capacity`` keys, LRU) and one for all.

    :meth:`take` spends a token of the key's bucket and one of the total
    bucket, or neither.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        capacity: int,
        *,
        total_rate: float,
        total_burst: float,
        now: float,
    ) -> None:
        if capacity <= 0:
            raise LocalProtocolError("a keyed bucket table needs a positive capacity")
        self._rate = rate
        self._burst = burst
        self._capacity = capacity
        self._buckets: OrderedDict[K, TokenBucket] = OrderedDict()
        self._total = TokenBucket(total_rate, total_burst, now)

    def take(self, key: K, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._capacity:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        if bucket.available(now) < 1.0 or self._total.available(now) < 1.0:
            return False
        bucket.take(now)
        self._total.take(now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)
