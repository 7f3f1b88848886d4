"""Two laptops on one LAN, no relay anywhere: pair with a 16-character code, then sync.

Real processes in netsim namespaces (one site, NatKind.NONE: the hosts share
a bridge, multicast flows between them and nowhere else), driven through
the CLI as a user would:

    a$ p2psync init && p2psync group create
    a$ p2psync invite --short          (no daemon: it announces the code over
                                        mDNS and waits for the joiner)
    b$ p2psync init && p2psync join CODE   (finds a on the LAN, joins)
    a$, b$ p2psync daemon; put on each; each sees the other's file
    b$ p2psync invite --short          (b, which joined, now invites; its daemon answers)
    c$ p2psync join CODE               (a third device, through b, over the LAN)
    a$ p2psync invite --short; d$ p2psync join CODE   (a fourth, through a's daemon)

The second test takes the pairing away: two devices of one group that know
each other by NodeId only, or not at all (no address, no relay), find each
other over mDNS alone, dial the LAN address and sync on path ``lan``; the
same pair with ``--no-mdns`` stays apart.

The third test pairs two devices at two different easy-NAT sites through
relayd on a public host (short code looked up on the relay, the join
handshake reaching the inviter directly or through the relay), syncs, and
lets a third device at the second site join through the device that just
joined.

Everything is torn down at the end (the fixtures assert no namespace of the
run is left) and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netsim import NatKind, Network, Proc, Site, SiteHost, Topology, build, netns, wait_until
from netsim.procs import python_module_argv
from netsim.topology import PublicHost
from p2psync.crypto.group import GroupSecret
from p2psync.home import Home

CLI_TIMEOUT = 60.0


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Network]:
    topology = Topology(
        sites=(Site("lan", NatKind.NONE, hosts=tuple(SiteHost(h) for h in "abcd")),)
    )
    with build(topology, output_base=tmp_path) as net:
        yield net
    assert not [n for n in netns.list_namespaces() if n.startswith(net.plan.namespace_prefix)]


class _Device:
    def __init__(self, net: Network, host: str, home: Path) -> None:
        self.net = net
        self.host = host
        self.home = home

    def argv(self, *arguments: str) -> list[str]:
        return python_module_argv("p2psync.cli", "--home", str(self.home), *arguments)

    def cli(self, *arguments: str) -> Any:
        done = self.net.run(
            self.host, self.argv(*arguments, "--json"), name=f"{self.host}-{arguments[0]}",
            timeout=CLI_TIMEOUT,
        )  # fmt: skip
        return json.loads(done.stdout)

    def spawn(self, *arguments: str) -> Proc:
        return self.net.spawn(self.host, self.argv(*arguments), name=f"{self.host}-{arguments[0]}")


def _json_line(proc: Proc) -> dict[str, Any]:
    for line in proc.stdout_text().splitlines():
        if line.startswith("{"):
            value: dict[str, Any] = json.loads(line)
            return value
    raise AssertionError("no JSON line yet")


def _printed_json(proc: Proc, timeout: float) -> dict[str, Any]:
    """The JSON object a command printed (indented over several lines)."""

    def complete() -> bool:
        text = proc.stdout_text()
        if not proc.running and "}" not in text:
            raise AssertionError(f"{proc.name} exited: {proc.stderr_text()[-2000:]}")
        return text.rstrip().endswith("}")

    wait_until(complete, timeout=timeout, what=f"{proc.name} printing its invite")
    value: dict[str, Any] = json.loads(proc.stdout_text())
    return value


def _keys(device: _Device) -> set[str]:
    rows = device.cli("ls")
    return {row["key"] for row in rows if not row.get("pending")}


@pytest.mark.netsim
def test_lan_pairing_with_a_short_code_and_no_relay(lan: Network, tmp_path: Path) -> None:
    started = time.monotonic()
    a, b, c, d = (_Device(lan, host, tmp_path / f"home-{host}") for host in "abcd")
    a.cli("init", "--name", "laptop-a")
    group = a.cli("group", "create")["group_id"]
    b.cli("init", "--name", "laptop-b")
    c.cli("init", "--name", "phone-c")
    d.cli("init", "--name", "tablet-d")

    # No daemon on a: `invite --short` announces the code on the LAN and waits.
    inviter = a.spawn("invite", "--short", "--json")
    offered = _printed_json(inviter, timeout=30)
    assert offered["relay"] is None and offered["lan"].startswith("mDNS active on eth0")
    code = offered["code"]
    assert len(code) == 19 and code.count("-") == 3
    joined = b.cli("join", code)
    assert joined["group_id"] == group and joined["via"] == "direct"
    assert joined["address"] == f"{lan.address('a')}:47300"
    assert inviter.wait(timeout=30) == 0  # it saw the join and stopped
    assert "a device joined" in inviter.stderr_text()

    # Used once: the code is gone from the LAN with the invite.
    again = lan.run("c", c.argv("join", code), name="c-join-reused", timeout=CLI_TIMEOUT,
                    check=False)  # fmt: skip
    assert again.returncode == 1 and "no invite found for this code" in again.stderr

    # Both run their daemons (mDNS on: it is their LAN); a put on each arrives on the other.
    daemons = [d.spawn("daemon", "--log-level", "info") for d in (a, b)]
    for proc in daemons:
        wait_until(lambda proc=proc: "ready:" in proc.stderr_text(), timeout=30, what="ready")
    note_a, note_b = tmp_path / "from-a.txt", tmp_path / "from-b.txt"
    note_a.write_text("hello from a\n")
    note_b.write_text("hello from b\n")
    a.cli("put", str(note_a), "--key", "notes/a")
    b.cli("put", str(note_b), "--key", "notes/b")
    wait_until(lambda: {"notes/a", "notes/b"} <= _keys(a) and {"notes/a", "notes/b"} <= _keys(b),
               timeout=60, what="both puts on both devices")  # fmt: skip
    got = lan.run("b", b.argv("get", "notes/a"), name="b-get", timeout=CLI_TIMEOUT)
    assert got.stdout == "hello from a\n"

    # A third device joins through b - the device that joined - over the LAN.
    offered = b.cli("invite", "--short")
    assert offered["lan"].startswith("mDNS active") and offered["relay"] is None
    third = c.cli("join", offered["code"], "--name", "phone-c")
    assert third["group_id"] == group and third["inviter"] == b.cli("whoami")["node_id"]
    assert third["via"] == "direct" and third["address"] == f"{lan.address('b')}:47300"
    # A fourth through a's daemon, with a fresh code of a's.
    offered = a.cli("invite", "--short")
    assert offered["lan"].startswith("mDNS active")
    fourth = d.cli("join", offered["code"], "--name", "tablet-d")
    assert fourth["group_id"] == group and fourth["inviter"] == a.cli("whoami")["node_id"]
    # a learns of c from b's signed MEMBER entry, b of d from a's.
    everyone = {"laptop-a", "laptop-b", "phone-c", "tablet-d"}
    for device in (a, b):
        wait_until(lambda device=device: {r["name"] for r in device.cli("devices")} == everyone,
                   timeout=30, what=f"{device.host} listing all four devices")  # fmt: skip
    devices = {row["name"]: row for row in a.cli("devices")}
    assert devices["laptop-b"]["connected"] is True
    assert devices["phone-c"]["added_by"] == b.cli("whoami")["node_id"]
    assert devices["tablet-d"]["added_by"] == a.cli("whoami")["node_id"]
    for proc in daemons:
        proc.stop()
    assert time.monotonic() - started < 240


# How long the --no-mdns pair gets to find each other (it must not); the mDNS
# pair has to sync within the same time for the comparison to mean something.
DISCOVERY_WINDOW = 15.0


def _member(net: Network, host: str, home: Path, secret: GroupSecret) -> _Device:
    """A device of the group of ``secret`` that was never paired: no peers in its
    config, no address of anyone, no relay (as after restoring a backup)."""
    Home(home).init(os.urandom, name=f"laptop-{host}")
    Home(home).save_secret(secret)
    return _Device(net, host, home)


def _peer_row(device: _Device, node_id: str) -> dict[str, Any] | None:
    rows = [p for p in device.cli("status")["peers"] if p["node_id"] == node_id]
    return rows[0] if rows else None


def _on_lan(device: _Device, node_id: str) -> bool:
    row = _peer_row(device, node_id)
    return row is not None and row["connected"] and row["path"] == "lan"


@pytest.mark.netsim
def test_members_find_each_other_by_mdns_alone_and_not_without_it(
    lan: Network, tmp_path: Path
) -> None:
    started = time.monotonic()
    found, blind = GroupSecret.generate(os.urandom), GroupSecret.generate(os.urandom)
    a, b = (_member(lan, h, tmp_path / f"home-{h}", found) for h in "ab")
    c, d = (_member(lan, h, tmp_path / f"home-{h}", blind) for h in "cd")
    a_id, c_id = a.cli("whoami")["node_id"], c.cli("whoami")["node_id"]
    # a and c know nobody; b and d know a and c by NodeId only (no address, no relay:
    # their dial loops cannot reach anyone). a, b run with mDNS, c, d without.
    daemons = [
        a.spawn("daemon", "--log-level", "info"),
        b.spawn("daemon", "--peer", a_id, "--log-level", "info"),
        c.spawn("daemon", "--no-mdns", "--log-level", "info"),
        d.spawn("daemon", "--peer", c_id, "--no-mdns", "--log-level", "info"),
    ]
    for proc in daemons:
        wait_until(lambda proc=proc: "ready:" in proc.stderr_text(), timeout=20, what="ready")
    ready = time.monotonic()
    notes = {}
    for device in (a, b, c):
        notes[device.host] = tmp_path / f"from-{device.host}.txt"
        notes[device.host].write_text(f"hello from {device.host}\n")
        device.cli("put", str(notes[device.host]), "--key", f"notes/{device.host}")

    # mDNS on: each finds the other, dials its LAN address, and they sync.
    wait_until(lambda: {"notes/a", "notes/b"} <= _keys(a) and {"notes/a", "notes/b"} <= _keys(b),
               timeout=DISCOVERY_WINDOW, what="a's and b's puts on both")  # fmt: skip
    b_id = b.cli("whoami")["node_id"]
    wait_until(lambda: _on_lan(a, b_id) and _on_lan(b, a_id), timeout=5, what="path lan")
    row = _peer_row(b, a_id)
    assert row is not None and row["address"] == f"{lan.address('a')}:47300", row
    assert a.cli("status")["mdns"].startswith("mDNS active on eth0")

    # mDNS off: the same setup stays apart for as long as the pair above needed and more.
    time.sleep(max(0.0, ready + DISCOVERY_WINDOW - time.monotonic()))
    assert "notes/c" not in _keys(d)
    row = _peer_row(d, c_id)
    assert row is not None and not row["connected"] and row["path"] == "none", row
    assert "the relay" in (row["last_error"] or ""), row  # it tried, and had nowhere to go
    assert c.cli("status")["peers"] == []  # nobody reached c
    assert c.cli("status")["mdns"] == "off"
    for proc in daemons:
        proc.stop()
    assert time.monotonic() - started < 50


@pytest.fixture
def two_sites(tmp_path: Path) -> Iterator[Network]:
    topology = Topology(
        public_hosts=(PublicHost("relay"),),
        sites=(
            Site("home", NatKind.EASY, hosts=(SiteHost("a"),)),
            Site("office", NatKind.EASY, hosts=(SiteHost("b"), SiteHost("c"))),
        ),
    )
    with build(topology, output_base=tmp_path) as net:
        yield net
    assert not [n for n in netns.list_namespaces() if n.startswith(net.plan.namespace_prefix)]


@pytest.mark.netsim
def test_pairing_through_relayd_from_two_easy_nat_sites(two_sites: Network, tmp_path: Path) -> None:
    started = time.monotonic()
    net = two_sites
    relayd = net.spawn(
        "relay",
        python_module_argv("relayd", "--listen", "0.0.0.0:3478", "--http", "127.0.0.1:9478"),
        name="relayd",
    )
    wait_until(lambda: "relayd ready" in relayd.stderr_text(), timeout=30, what="relayd ready")
    found = re.search(r"relay=([a-z2-7]{52})", relayd.stderr_text())
    assert found, relayd.stderr_text()
    relay = f"{found.group(1)}@{net.public_address('relay')}:3478"
    a, b, c = (_Device(net, host, tmp_path / f"home-{host}") for host in "abc")
    a.cli("init", "--name", "home-pc")
    group = a.cli("group", "create")["group_id"]
    b.cli("init", "--name", "office-pc")
    c.cli("init", "--name", "office-phone")

    # a has no daemon: `invite --short` stores the sealed ticket on relayd and waits.
    inviter = a.spawn("invite", "--short", "--json", "--relay", relay, "--no-mdns")
    offered = _printed_json(inviter, timeout=60)
    assert offered["relay"] == relay and offered["lan"] == "off"
    joined = b.cli("join", offered["code"], "--relay", relay, "--no-mdns")
    # a's ticket lists only its private address at the other site: the handshake
    # goes through the relay (a hole punched meanwhile may move it to a direct path).
    assert joined["group_id"] == group and joined["via"] in ("relay", "direct")
    assert joined["relay"] == relay
    assert inviter.wait(timeout=30) == 0

    # Both daemons use the relay (the way b reached a is in its config).
    daemons = [
        d.spawn("daemon", "--relay", relay, "--no-mdns", "--log-level", "info") for d in (a, b)
    ]
    for proc in daemons:
        wait_until(lambda proc=proc: "ready:" in proc.stderr_text(), timeout=30, what="ready")
    note_a, note_b = tmp_path / "from-a.txt", tmp_path / "from-b.txt"
    note_a.write_text("from home\n")
    note_b.write_text("from the office\n")
    a.cli("put", str(note_a), "--key", "notes/a")
    b.cli("put", str(note_b), "--key", "notes/b")
    wait_until(lambda: {"notes/a", "notes/b"} <= _keys(a) and {"notes/a", "notes/b"} <= _keys(b),
               timeout=90, what="both puts on both devices")  # fmt: skip

    # A third device joins through b's daemon, finding the code on relayd.
    offered = b.cli("invite", "--short")
    assert offered["relay"] == relay
    third = c.cli("join", offered["code"], "--relay", relay, "--no-mdns")
    assert third["group_id"] == group and third["inviter"] == b.cli("whoami")["node_id"]
    assert third["via"] == "direct"  # same office LAN: the ticket's address answers
    names = {d["name"] for d in b.cli("devices")}
    assert {"office-pc", "office-phone"} <= names
    for proc in daemons:
        proc.stop()
    relayd.stop()
    assert time.monotonic() - started < 240
