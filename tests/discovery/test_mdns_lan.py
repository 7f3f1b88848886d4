"""mDNS discovery: the pure pieces in-process, and real multicast on a netsim LAN.

The LAN tests (``@pytest.mark.netsim``) build one site with three hosts on
one bridge (NatKind.NONE: LAN traffic never reaches the router) and run this
very file as a script in each host's namespace (the driver at the bottom):
it runs :func:`run_mdns` for a while and prints one JSON object per line
(``status``, ``peer``, and a final ``done`` with the counters). Nothing is
sent on the host's own interfaces: multicast only flows inside the run's
namespaces, which are deleted on exit.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from zeroconf import DNSAddress, DNSPointer, DNSService, RecordUpdate, ServiceStateChange

from netsim import NatKind, Network, Proc, Site, SiteHost, Topology, build, netns, wait_until
from p2psync.crypto.group import GroupSecret, mdns_tag
from p2psync.crypto.identity import Identity, NodeId
from p2psync.discovery.mdns import (
    SERVICE_TYPE,
    Advert,
    DiscoveredPeer,
    Interface,
    MdnsConfig,
    MdnsStats,
    MulticastCheck,
    PeerReports,
    _BrowseInbox,
    _HeardListener,
    _owner,
    heard_from_elsewhere,
    order_addresses,
    run_mdns,
)
from p2psync.discovery.tags import (
    advert_tag,
    current_tags,
    decode_txt_untrusted,
    open_advert,
    window_at,
)

# --- pure pieces ---------------------------------------------------------------


def _node(n: int) -> NodeId:
    return Identity.from_seed(bytes([n]) * 32).node_id


def test_peer_reports_new_changed_and_rate_limited() -> None:
    reports = PeerReports(interval=60.0, max_peers=2)
    a, b, c = _node(1), _node(2), _node(3)
    here = (("10.0.0.2", 47300),)
    assert reports.should_report(a, here, now=0.0)
    assert not reports.should_report(a, here, now=1.0)  # same addresses, too soon
    assert not reports.should_report(a, here, now=59.9)
    assert reports.should_report(a, here, now=60.0)  # interval passed: a re-dial hint
    assert reports.should_report(a, (("10.0.0.9", 47300),), now=61.0)  # moved: at once
    assert reports.should_report(b, here, now=62.0)
    assert reports.should_report(c, here, now=63.0)  # evicts a (least recent)
    assert len(reports) == 2
    assert reports.should_report(a, (("10.0.0.9", 47300),), now=64.0)  # forgotten: new again


def test_order_addresses_on_link_first_and_unusable_dropped() -> None:
    ours = [
        Interface("eth0", "192.168.1.5", ipaddress.IPv4Network("192.168.1.0/24")),
        Interface("wlan0", "10.9.0.7", ipaddress.IPv4Network("10.9.0.0/16")),
    ]
    theirs = ["172.17.0.1", "127.0.0.1", "0.0.0.0", "224.0.0.251", "10.9.3.3", "192.168.1.9"]
    theirs += ["junk", "10.9.3.3"]
    addresses, interface = order_addresses(theirs, 4000, ours, limit=16)
    assert addresses == (("10.9.3.3", 4000), ("192.168.1.9", 4000), ("172.17.0.1", 4000))
    assert interface == "wlan0"
    assert order_addresses(theirs, 4000, ours, limit=1) == ((("10.9.3.3", 4000),), "wlan0")
    assert order_addresses(["172.17.0.1"], 1, ours, limit=4) == ((("172.17.0.1", 1),), None)


async def test_browse_inbox_coalesces_bounds_and_crosses_threads() -> None:
    """zeroconf's thread posts; trio receives each pending name once, newest change wins."""
    stats = MdnsStats()
    inbox = _BrowseInbox(trio.lowlevel.current_trio_token(), 4, stats)
    added, updated, removed = (
        ServiceStateChange.Added,
        ServiceStateChange.Updated,
        ServiceStateChange.Removed,
    )

    def zeroconf_thread() -> None:
        post = inbox.on_state_change
        post(zeroconf=None, service_type=SERVICE_TYPE, name="x", state_change=added)
        post(zeroconf=None, service_type=SERVICE_TYPE, name="x", state_change=updated)
        post(zeroconf=None, service_type="_other._udp.local.", name="o", state_change=added)
        for n in range(10):
            post(zeroconf=None, service_type=SERVICE_TYPE, name=f"n{n}", state_change=added)
        post(zeroconf=None, service_type=SERVICE_TYPE, name="n0", state_change=removed)

    await trio.to_thread.run_sync(zeroconf_thread)
    await trio.testing.wait_all_tasks_blocked()
    received = []
    while True:
        try:
            received.append(inbox.receive.receive_nowait())
        except trio.WouldBlock:
            break
    assert received == ["x", "n0", "n1", "n2"]  # 4 pending at most; "o" is another type
    assert stats.dropped_events == 7
    assert [inbox.take(name) for name in received] == [updated, removed, added, added]
    assert inbox.take("x") is None  # taken once
    inbox.close()
    inbox.on_state_change(zeroconf=None, service_type=SERVICE_TYPE, name="late", state_change=added)
    assert inbox.take("late") is None


async def test_no_interface_reports_unavailable_once_and_keeps_waiting() -> None:
    """No matching interface: status says so, nothing is opened, the task waits."""
    statuses: list[str] = []
    identity = Identity.generate(os.urandom)
    keys = GroupSecret.generate(os.urandom).keys()
    config = MdnsConfig(interfaces=("p2psnosuch0",), interface_poll=0.01, retry_interval=0.05)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            first = await nursery.start(
                lambda task_status: run_mdns(
                    config,
                    Advert(identity.node_id, 47300, lambda: advert_tag(keys, time.time())),
                    lambda: current_tags([keys], time.time()),
                    lambda peer: None,
                    on_status=statuses.append,
                    task_status=task_status,
                )
            )
            await trio.sleep(0.3)  # several retries: the status must not repeat
            nursery.cancel_scope.cancel()
    assert first.startswith("mDNS unavailable: no up, multicast-capable network interface")
    assert first.endswith("(relay discovery only)")
    assert statuses == [first]


def test_multicast_check_is_silent_after_the_timeout_until_something_is_heard() -> None:
    check = MulticastCheck(started=100.0, timeout=15.0)
    assert not check.silent(100.0) and not check.silent(114.9)  # too soon to tell
    assert check.silent(115.0) and check.silent(500.0)
    check.heard(501.0)
    assert not check.silent(502.0) and check.heard_at == 501.0
    check.heard(900.0)  # settled for the session: the first hearing stays
    assert check.heard_at == 501.0 and not check.silent(10_000.0)
    early = MulticastCheck(started=0.0, timeout=15.0)
    early.heard(3.0)
    assert not early.silent(60.0)


def test_only_records_of_another_host_count_as_heard() -> None:
    """Our own adverts come back to us through the kernel's multicast loop whatever
    the network does: records under our labels must not count."""
    ours = ("p2ps-aaaaaaaaaaaaaaaa", "p2ps-bbbbbbbbbbbbbbbb")  # this and a previous window

    def ptr(target: str) -> RecordUpdate:  # a PTR's own name is the service type
        return RecordUpdate(DNSPointer(SERVICE_TYPE, 12, 1, 120, f"{target}.{SERVICE_TYPE}"))

    def srv(instance: str) -> RecordUpdate:
        return RecordUpdate(DNSService(f"{instance}.{SERVICE_TYPE}", 33, 1, 120, 0, 0, 1, "h."))

    def a(host: str) -> RecordUpdate:
        return RecordUpdate(DNSAddress(f"{host}.local.", 1, 1, 120, bytes([10, 0, 0, 9])))

    own = [ptr(ours[1]), srv(ours[1]), a(ours[0].upper()), srv(f"{ours[1]} (2)")]
    assert not heard_from_elsewhere([_owner(u.new) for u in own], ours)
    member, printer = ptr("p2ps-cccccccccccccccc"), a("printer")
    assert heard_from_elsewhere([_owner(member.new)], ours)
    assert heard_from_elsewhere([_owner(printer.new)], ours)
    assert heard_from_elsewhere(["printer.local."], ())  # before our first advert
    assert not heard_from_elsewhere([], ours)
    listener = _HeardListener()
    listener.labels = ours
    listener.async_update_records(None, 0.0, own)
    assert not listener.heard.is_set()
    listener.async_update_records(None, 0.0, [*own, member])
    assert listener.heard.is_set()


# --- netsim LAN -------------------------------------------------------------------


@functools.cache
def _missing_prerequisites() -> tuple[str, ...]:
    return tuple(netns.missing_prerequisites())  # creates a throwaway namespace: once


def _require_netsim() -> None:
    """tests/netsim/conftest.py's rule: skip with the reason, but fail under CI=true."""
    problems = _missing_prerequisites()
    if not problems:
        return
    reason = "netsim prerequisites missing: " + "; ".join(problems)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Network]:
    """One site, three hosts on one bridge; everything torn down afterwards."""
    _require_netsim()
    topology = Topology(
        sites=(Site("lan", NatKind.NONE, hosts=(SiteHost("a"), SiteHost("b"), SiteHost("c"))),)
    )
    with build(topology, output_base=tmp_path) as net:
        yield net
    assert not [n for n in netns.list_namespaces() if n.startswith(net.plan.namespace_prefix)]


class _Device:
    def __init__(self, secret: GroupSecret, port: int) -> None:
        self.identity = Identity.generate(os.urandom)
        self.secret = secret
        self.port = port

    def argv(self, seconds: float, *extra: str) -> list[str]:
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--secret",
            self.secret.to_bytes().hex(),
            "--seed",
            self.identity.seed.hex(),
            "--port",
            str(self.port),
            "--seconds",
            str(seconds),
            *extra,
        ]


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _done(proc: Proc) -> dict[str, Any]:
    done = [e for e in _events(proc.stdout_text()) if e["event"] == "done"]
    assert done, f"{proc.name} printed no result; stderr: {proc.stderr_text()[-2000:]}"
    result: dict[str, Any] = done[-1]
    return result


@pytest.mark.netsim
def test_two_members_find_each_other_and_an_outsider_learns_nothing(lan: Network) -> None:
    started = time.monotonic()
    group, other_group = GroupSecret.generate(os.urandom), GroupSecret.generate(os.urandom)
    devices = {
        "a": _Device(group, 47300),
        "b": _Device(group, 47301),
        "c": _Device(other_group, 47300),
    }
    procs = {host: lan.spawn(host, d.argv(seconds=5.0)) for host, d in devices.items()}
    results = {host: (proc.wait(timeout=20), _done(proc))[1] for host, proc in procs.items()}

    def peers_of(host: str) -> dict[str, list[list[Any]]]:
        return {p["node_id"]: p["addresses"] for p in results[host]["peers"]}

    a, b = devices["a"], devices["b"]
    for host in "abc":
        assert results[host]["first_status"].startswith("mDNS active on eth0"), results[host]
    # Members: exactly each other, at the LAN address and the sealed port, via eth0.
    assert peers_of("a") == {str(b.identity.node_id): [[str(lan.address("b")), 47301]]}
    assert peers_of("b") == {str(a.identity.node_id): [[str(lan.address("a")), 47300]]}
    assert {p["interface"] for h in "ab" for p in results[h]["peers"]} == {"eth0"}
    # The outsider sees nobody and is seen by nobody...
    assert peers_of("c") == {}
    # ... although the adverts did cross: c resolved both members' adverts and
    # they resolved c's, all rejected by the tag (the test cannot pass by silence).
    assert results["c"]["stats"]["foreign"] >= 2, results["c"]
    assert results["a"]["stats"]["foreign"] >= 1 and results["b"]["stats"]["foreign"] >= 1
    assert results["c"]["stats"]["members"] == results["c"]["stats"]["reports"] == 0
    # Nothing c saw names a member in clear, and the two members' adverts
    # (same group, same window) share nothing an onlooker could match.
    seen = [bytes.fromhex(t) for t in results["c"]["seen_txt"]]
    assert len(seen) >= 2
    for member in (a, b):
        node_id = member.identity.node_id
        for txt in seen:
            assert node_id.raw not in txt and str(node_id).encode() not in txt
    own = {bytes.fromhex(t) for t in results["c"]["own_txts"]}
    assert own  # c resolved its own advert too (the classification works)
    assert len(set(seen) - own) >= 2  # a's and b's differ though group and window agree
    assert time.monotonic() - started < 30


@pytest.mark.netsim
def test_renumbering_and_link_down_up_restart_discovery(lan: Network) -> None:
    """Interface changes: a new address is re-advertised; down says unavailable; up recovers."""
    group = GroupSecret.generate(os.urandom)
    a, b = _Device(group, 47300), _Device(group, 47300)
    proc_a = lan.spawn("a", a.argv(20.0, "--interface-poll", "0.2"))
    proc_b = lan.spawn("b", b.argv(20.0, "--interface-poll", "0.2"))
    old, new = str(lan.address("a")), str(lan.address("a") + 10)
    prefix = lan.site("lan").lan_subnet.prefixlen

    def b_saw_a_at(address: str) -> bool:
        return any(
            e["event"] == "peer" and e["addresses"] == [[address, 47300]]
            for e in _events(proc_b.stdout_text())
        )

    def a_events(kind: str) -> list[dict[str, Any]]:
        return [e for e in _events(proc_a.stdout_text()) if e["event"] == kind]

    wait_until(lambda: b_saw_a_at(old) and bool(a_events("peer")), timeout=8, what="first sight")
    # Renumber as DHCP would: add the new address, drop the old one (without
    # promote_secondaries, deleting a primary address deletes the secondaries).
    lan.run("a", ["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"])
    lan.run("a", ["ip", "addr", "add", f"{new}/{prefix}", "dev", "eth0"])
    lan.run("a", ["ip", "addr", "del", f"{old}/{prefix}", "dev", "eth0"])
    wait_until(lambda: b_saw_a_at(new), timeout=8, what="b seeing a's new address")
    assert a_events("status")[-1]["status"] == f"mDNS active on eth0 {new}"
    peers_before = len(a_events("peer"))
    lan.run("a", ["ip", "link", "set", "eth0", "down"])
    wait_until(
        lambda: a_events("status")[-1]["status"].startswith("mDNS unavailable"),
        timeout=5,
        what="a reporting mDNS unavailable",
    )
    lan.run("a", ["ip", "link", "set", "eth0", "up"])
    wait_until(lambda: len(a_events("peer")) > peers_before, timeout=8, what="a finding b again")
    statuses = [e["status"] for e in a_events("status")]
    assert statuses[-1] == f"mDNS active on eth0 {new}"
    assert statuses[-2] == (
        "mDNS unavailable: no up, multicast-capable network interface with IPv4 "
        "(relay discovery only)"
    )
    assert a_events("peer")[-1]["node_id"] == str(b.identity.node_id)
    for proc in (proc_a, proc_b):
        proc.stop()


@pytest.mark.netsim
def test_adverts_are_resealed_when_the_window_rolls_over(lan: Network) -> None:
    """Windows of 2 s (a warped tag clock): a re-advertises; b keeps accepting it."""
    group = GroupSecret.generate(os.urandom)
    a, b = _Device(group, 47300), _Device(group, 47300)
    warp = ["--tag-check", "0.2", "--time-base", str(time.time()), "--time-warp", "450"]
    procs = {"a": lan.spawn("a", a.argv(7.0, *warp)), "b": lan.spawn("b", b.argv(7.0, *warp))}
    results = {host: (proc.wait(timeout=20), _done(proc))[1] for host, proc in procs.items()}
    for host, other in (("a", b), ("b", a)):
        stats = results[host]["stats"]
        # Adverts of two or more windows opened (one re-seal per 2 s window,
        # each taking about a second to probe and announce), none rejected...
        assert results[host]["member_adverts"] >= 2, results[host]
        assert stats["foreign"] == 0, results[host]
        # ... without a restart, and reported once: same peer, same address.
        assert stats["restarts"] == 1 and stats["reports"] == 1, results[host]
        assert [p["node_id"] for p in results[host]["peers"]] == [str(other.identity.node_id)]


# A host firewall that drops every mDNS packet it receives (our own, looped back
# by the kernel, included): the sockets open and sends succeed, nothing arrives.
_DROP_MDNS = """
table inet p2psync_test {
    chain input {
        type filter hook input priority 0; policy accept;
        udp dport 5353 drop
    }
}
"""


@pytest.mark.netsim
def test_a_host_that_hears_no_multicast_says_so_and_recovers(lan: Network) -> None:
    group = GroupSecret.generate(os.urandom)
    a, b = _Device(group, 47300), _Device(group, 47301)
    lan.run("a", ["nft", "-f", "-"], input_text=_DROP_MDNS)
    proc_a = lan.spawn("a", a.argv(60.0, "--silence-timeout", "3"))
    proc_b = lan.spawn("b", b.argv(60.0, "--silence-timeout", "3"))

    def events(proc: Proc, kind: str) -> list[dict[str, Any]]:
        return [e for e in _events(proc.stdout_text()) if e["event"] == kind]

    def last_status(proc: Proc) -> str:
        statuses = events(proc, "status")
        return str(statuses[-1]["status"]) if statuses else ""

    silent = "mDNS unavailable: no multicast heard (relay discovery only)"
    active = f"mDNS active on eth0 {lan.address('a')}"
    wait_until(lambda: last_status(proc_a) == silent, timeout=15, what="a saying it hears nothing")
    # It started out "active" (the sockets opened): only listening told them apart.
    assert [e["status"] for e in events(proc_a, "status")] == [active, silent]
    assert events(proc_a, "peer") == []
    # What a sends still goes out: b hears it, finds a, and says mDNS works.
    a_id = str(a.identity.node_id)
    wait_until(lambda: any(p["node_id"] == a_id for p in events(proc_b, "peer")),
               timeout=15, what="b finding a")  # fmt: skip
    assert last_status(proc_b).startswith("mDNS active on eth0")
    # The firewall opens: the next answer from b turns a back to active, and a finds b.
    lan.run("a", ["nft", "delete", "table", "inet", "p2psync_test"])
    wait_until(lambda: last_status(proc_a) == active and bool(events(proc_a, "peer")),
               timeout=45, what="a hearing b again")  # fmt: skip
    assert events(proc_a, "peer")[-1]["node_id"] == str(b.identity.node_id)
    for proc in (proc_a, proc_b):
        proc.stop()


# --- the driver: `python test_mdns_lan.py --secret HEX --seed HEX ...` --------


def _driver(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--secret", required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--interface-poll", type=float, default=1.0)
    parser.add_argument("--tag-check", type=float, default=1.0)
    parser.add_argument("--silence-timeout", type=float, default=15.0)
    # Tag clock = base + (time.time() - base) * warp: drivers given the same
    # base and warp agree on (fast) windows.
    parser.add_argument("--time-base", type=float, default=0.0)
    parser.add_argument("--time-warp", type=float, default=1.0)
    args = parser.parse_args(argv)
    identity = Identity.from_seed(bytes.fromhex(args.seed))
    keys = GroupSecret.from_bytes_untrusted(bytes.fromhex(args.secret)).keys()
    config = MdnsConfig(
        interface_poll=args.interface_poll,
        tag_check_interval=args.tag_check,
        silence_timeout=args.silence_timeout,
    )

    base: float = args.time_base
    warp: float = args.time_warp

    def tag_clock() -> float:
        return base + (time.time() - base) * warp

    stats = MdnsStats()
    peers: list[dict[str, Any]] = []

    def emit(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, "t": round(time.monotonic(), 3), **fields}), flush=True)

    def on_peer(peer: DiscoveredPeer) -> None:
        record = {
            "node_id": str(peer.node_id),
            "addresses": [list(a) for a in peer.addresses],
            "interface": peer.interface,
        }
        peers.append(record)
        emit("peer", **record)

    def tag() -> bytes:
        return advert_tag(keys, tag_clock())

    async def main() -> None:
        started_clock = tag_clock()
        async with trio.open_nursery() as nursery:
            first = await nursery.start(
                lambda task_status: run_mdns(
                    config,
                    Advert(identity.node_id, args.port, tag),
                    lambda: current_tags([keys], tag_clock()),
                    on_peer,
                    on_status=lambda text: emit("status", status=text),
                    stats=stats,
                    task_status=task_status,
                )
            )
            await trio.sleep(args.seconds)
            nursery.cancel_scope.cancel()
        # Classify the TXT records seen by opening each under every window
        # tag of the run: ours (we resolve our own service too) or a member's.
        windows = range(window_at(started_clock) - 1, window_at(tag_clock()) + 1)
        run_tags = [mdns_tag(keys, w) for w in windows]
        own_txts: set[bytes] = set()
        member_txts: set[bytes] = set()
        for txt in stats.seen_txt:
            opened = open_advert(decode_txt_untrusted(txt), run_tags)
            if opened is not None:
                (own_txts if opened.node_id == identity.node_id else member_txts).add(txt)
        counters = {
            name: getattr(stats, name)
            for name in ("resolved", "members", "foreign", "invalid", "reports", "restarts")
        }
        emit(
            "done",
            first_status=first,
            peers=peers,
            stats=counters,
            seen_txt=[t.hex() for t in stats.seen_txt],
            own_txts=sorted(t.hex() for t in own_txts),
            member_adverts=len(member_txts),
        )

    trio.run(main)


if __name__ == "__main__":
    _driver(sys.argv[1:])
