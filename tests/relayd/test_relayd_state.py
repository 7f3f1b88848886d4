"""relayd.state: token buckets, bounded tables and log gates, with stepped time."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.errors import LocalProtocolError
from relayd.state import (
    ConnectionCounter,
    LogGate,
    LruTable,
    PerIpRateLimiter,
    Refusal,
    TokenBucket,
)


def test_bucket_starts_full_then_refills_at_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.4)  # 0.8 tokens
    assert bucket.take(100.5)  # 1.0 token
    assert not bucket.take(100.5)
    assert bucket.take(110.0, 3)  # refilled, capped at burst
    assert not bucket.take(110.0)


def test_bucket_ignores_time_going_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=1.0, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.5)  # the step back did not reset the origin
    assert bucket.take(11.0)


def test_bucket_refuses_more_than_burst_at_once() -> None:
    bucket = TokenBucket(rate=100.0, burst=10.0)
    assert not bucket.take(0.0, 11)
    assert bucket.available(0.0) == 10.0


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(LocalProtocolError):
        TokenBucket(rate=-1, burst=1)
    with pytest.raises(LocalProtocolError):
        TokenBucket(rate=1, burst=0)


@given(
    rate=st.floats(0.0, 100.0),
    burst=st.integers(1, 50),
    steps=st.lists(st.floats(0.0, 0.5), min_size=1, max_size=200),
)
def test_bucket_grants_at_most_burst_plus_rate_times_t(
    rate: float, burst: int, steps: list[float]
) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    granted = 0
    for step in steps:
        now += step
        granted += bucket.take(now)
    assert granted <= burst + rate * now + 1e-9


def test_lru_table_evicts_least_recently_used() -> None:
    made: list[str] = []

    def make(key: str) -> list[str]:
        made.append(key)
        return [key]

    table: LruTable[str, list[str]] = LruTable(2, make)
    table.get_or_create("a")
    table.get_or_create("b")
    table.get_or_create("a")  # refresh a: b is now the oldest
    table.get_or_create("c")
    assert list(table) == ["a", "c"]
    assert "b" not in table
    assert table.evictions == 1
    assert made == ["a", "b", "c"]
    assert table.get("zzz") is None
    assert len(table) == 2


def test_per_ip_limiter_is_per_ip_and_bounded() -> None:
    limiter = PerIpRateLimiter(rate=1.0, burst=2.0, capacity=3)
    assert [limiter.allow("10.0.0.1", 0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("10.0.0.2", 0.0)  # its own bucket
    for i in range(100):  # a spoofing flood
        limiter.allow(f"192.0.2.{i}", 0.0)
    assert len(limiter.table) == 3
    assert limiter.table.evictions >= 99


def test_connection_counter_limits_total_and_per_ip() -> None:
    counter = ConnectionCounter(max_total=3, max_per_ip=2)
    assert counter.try_add("a") is None
    assert counter.try_add("a") is None
    assert counter.try_add("a") is Refusal.PER_IP
    assert counter.try_add("b") is None
    assert counter.try_add("c") is Refusal.TOTAL
    counter.remove("a")
    assert counter.count("a") == 1
    assert counter.try_add("c") is None
    assert (counter.total, counter.ips) == (3, 3)
    counter.remove("c")
    assert counter.ips == 2
    with pytest.raises(LocalProtocolError):
        counter.remove("c")


def test_log_gate_once_per_interval_counts_suppressed() -> None:
    gate = LogGate(interval=10.0)
    assert gate.check("flood", 0.0) == 0
    assert gate.check("flood", 1.0) is None
    assert gate.check("flood", 9.9) is None
    assert gate.check("other", 9.9) == 0  # per reason
    assert gate.check("flood", 10.0) == 2
    assert gate.check("flood", 10.1) is None
    assert gate.suppressed_total == 3


def test_log_gate_reasons_are_bounded() -> None:
    gate = LogGate(interval=10.0, capacity=4)
    for i in range(1000):
        gate.check(f"reason-{i}", 0.0)
    assert len(gate._entries) == 4
