"""relayd.metrics: Prometheus text exposition and bounded label sets; the relay's series."""

from __future__ import annotations

import os

import pytest

from p2psync.crypto.identity import Identity
from p2psync.net.endpoint import EndpointConfig, open_endpoint
from relayd.config import HostPort, RelaydConfig
from relayd.metrics import OVERFLOW, Registry
from relayd.relay import QuicRelay
from relayd.routing import DatagramDrop


def test_render_counters_and_gauges() -> None:
    registry = Registry()
    hits = registry.counter("t_hits_total", "Hits.", ("path",))
    plain = registry.counter("t_plain_total", "Plain.")
    level = registry.gauge("t_level", "Level.")
    computed = registry.gauge("t_computed", "Computed.")
    computed.set_function(lambda: 2.5)
    hits.inc(path="/a")
    hits.inc(2, path="/b")
    plain.inc()
    level.set(7)
    level.inc(-2)
    assert registry.render() == (
        "# HELP t_hits_total Hits.\n"
        "# TYPE t_hits_total counter\n"
        't_hits_total{path="/a"} 1\n'
        't_hits_total{path="/b"} 2\n'
        "# HELP t_plain_total Plain.\n"
        "# TYPE t_plain_total counter\n"
        "t_plain_total 1\n"
        "# HELP t_level Level.\n"
        "# TYPE t_level gauge\n"
        "t_level 5\n"
        "# HELP t_computed Computed.\n"
        "# TYPE t_computed gauge\n"
        "t_computed 2.5\n"
    )
    assert hits.value(path="/b") == 2


def test_label_values_are_escaped() -> None:
    registry = Registry()
    registry.counter("t_total", "T.", ("v",)).inc(v='a"b\\c\nd')
    assert 't_total{v="a\\"b\\\\c\\nd"} 1' in registry.render()


def test_label_sets_are_bounded() -> None:
    registry = Registry(max_label_sets=3)
    counter = registry.counter("t_total", "T.", ("ip",))
    for i in range(100):
        counter.inc(ip=f"10.0.0.{i}")
    lines = [line for line in registry.render().splitlines() if line.startswith("t_total")]
    assert len(lines) == 4  # 3 real series + the overflow series
    assert counter.value(ip=OVERFLOW) == 97


def test_misuse_is_refused() -> None:
    registry = Registry()
    counter = registry.counter("t_total", "T.", ("a",))
    with pytest.raises(ValueError):
        counter.inc(b="x")
    with pytest.raises(ValueError):
        counter.inc(-1, a="x")
    with pytest.raises(ValueError):
        registry.counter("t_total", "again")
    with pytest.raises(ValueError):
        registry.gauge("t_g", "G.", ("a",)).set_function(lambda: 1.0)


async def test_the_relay_exports_its_fast_path_counters() -> None:
    identity = Identity.generate(os.urandom)
    config = RelaydConfig(listen=HostPort("127.0.0.1", 0), http=HostPort("127.0.0.1", 0))
    async with open_endpoint(identity, EndpointConfig(bind_host="127.0.0.1")) as endpoint:
        relay = QuicRelay(config, endpoint, identity)
        text = relay.registry.render()
        # Every drop reason is a series from the start (at 0), so rates work at once.
        for drop in DatagramDrop:
            assert f'relayd_fast_path_dropped_total{{reason="{drop.value}"}} 0' in text
        counters = relay.router.counters
        counters.datagrams_forwarded = 3
        counters.datagram_bytes_forwarded = 4200
        counters.datagrams_to_stream = 2
        counters.datagram_drops[DatagramDrop.UNKNOWN_SOURCE] = 5
        counters.rebinds = 1
        relay.refresh_metrics()
        text = relay.registry.render()
        assert "relayd_fast_path_datagrams_forwarded_total 3\n" in text
        assert "relayd_fast_path_bytes_forwarded_total 4200\n" in text
        assert "relayd_fast_path_datagrams_to_stream_total 2\n" in text
        assert 'relayd_fast_path_dropped_total{reason="unknown-source"} 5\n' in text
        assert "relayd_relay_rebinds_total 1\n" in text
        assert "relayd_fast_path_nodes 0\n" in text
