"""Link conditions change what packets experience, measurably."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterator
from pathlib import Path

import pytest

from netsim.build import Network, build
from netsim.nat import NatKind
from netsim.procs import python_module_argv
from netsim.topology import LinkConditions, PublicHost, Site, SiteHost, Topology

pytestmark = pytest.mark.netsim

RESPONDER_PORT = 3478
SINK_PORT = 5001
TRANSFER_BYTES = 1_000_000


@pytest.fixture(scope="module")
def conditioned_network(
    netsim_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Network]:
    topology = Topology(
        public_hosts=(
            PublicHost("echo"),
            PublicHost("lossy", link=LinkConditions(loss_percent=100)),
        ),
        sites=(
            Site("near", NatKind.EASY, hosts=(SiteHost("near-pc"),)),
            Site("far", NatKind.EASY, hosts=(SiteHost("far-pc"),), uplink=LinkConditions(50)),
            Site(
                "slow",
                NatKind.NONE,
                hosts=(SiteHost("slow-pc", link=LinkConditions(rate_mbit=4)),),
            ),
        ),
    )
    output: Path = tmp_path_factory.mktemp("netsim-out")
    with build(topology, output_base=output) as net:
        for host in ("echo", "lossy"):
            responder = net.spawn(
                host, python_module_argv("netsim.responder", "--port", str(RESPONDER_PORT))
            )
            responder.wait_for_output("ready", timeout=10)
        yield net


def _rtts(net: Network, host: str, target: str, count: int = 6) -> tuple[list[float], int]:
    completed = net.run(
        host,
        python_module_argv(
            "netsim.probe",
            "rtt",
            "--to",
            f"{net.address(target)}:{RESPONDER_PORT}",
            "--count",
            str(count),
            "--timeout",
            "1",
        ),
    )
    result = json.loads(completed.stdout)
    # The first exchange also resolves ARP on every hop: leave it out.
    return result["rtt_ms"][1:], result["lost"]


def test_a_50ms_uplink_delay_adds_about_100ms_of_round_trip(conditioned_network: Network) -> None:
    near, near_lost = _rtts(conditioned_network, "near-pc", "echo")
    far, far_lost = _rtts(conditioned_network, "far-pc", "echo")
    assert near_lost == far_lost == 0
    assert statistics.median(near) < 30, near
    assert min(far) >= 80, far
    assert statistics.median(far) < 250, far


def test_total_loss_drops_every_packet(conditioned_network: Network) -> None:
    rtts, lost = _rtts(conditioned_network, "near-pc", "lossy", count=3)
    assert (rtts, lost) == ([], 3)


def test_a_rate_limit_stretches_a_transfer(conditioned_network: Network) -> None:
    def transfer_seconds(sender: str) -> float:
        sink = conditioned_network.spawn(
            "echo", python_module_argv("netsim.probe", "tcp-sink", "--port", str(SINK_PORT))
        )
        sink.wait_for_output("listening", timeout=10)
        conditioned_network.run(
            sender,
            python_module_argv(
                "netsim.probe",
                "tcp-send",
                "--to",
                f"{conditioned_network.address('echo')}:{SINK_PORT}",
                "--bytes",
                str(TRANSFER_BYTES),
            ),
        )
        sink.wait(30)
        result = json.loads(sink.stdout_text().splitlines()[-1])
        assert result["bytes"] == TRANSFER_BYTES
        return float(result["seconds"])

    unlimited = transfer_seconds("near-pc")
    limited = transfer_seconds("slow-pc")  # 8 Mbit at 4 Mbit/s: at least 2 s
    assert unlimited < 1.0
    assert limited >= 1.8
