"""The only module that runs ``ip``, ``nft`` and ``sysctl``.

(``tc`` is not needed: this kernel has no netem, link conditions are
emulated in userspace by :mod:`netsim.linkem`.)

It applies a :class:`~netsim.topology.NetworkPlan` and takes it down again.
Every call uses an argument list (no shell), fails with
:class:`~netsim.errors.CommandFailed` carrying the command's stderr, and
touches only namespaces whose names the plan gives: veth pairs are created
directly inside their namespaces (``ip -n A link add X type veth peer name
Y netns B``), so nothing ever appears in the root namespace, and the root
namespace's routes, interfaces and nft ruleset are never read or written.

Order of :func:`apply_plan`: create every namespace; per namespace, set
sysctls (forwarding, no ICMP redirects, bridged frames kept out of nft),
bring up ``lo``, create bridges and the veth pairs it owns; then per
namespace enslave ports, assign addresses, bring links up, add routes; then
load nft rulesets and prepare the ends of emulated links. The link
emulators themselves are processes, started by :mod:`netsim.build`.

Deleting a namespace frees everything inside it (veths, bridges, rules,
qdiscs); processes inside it would keep the network alive, so
:func:`delete_namespaces` kills them first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterable

from netsim.errors import CommandFailed
from netsim.topology import PROJECT_PREFIX, NamespacePlan, NamespaceRole, NetworkPlan

log = logging.getLogger(__name__)

TOOL_TIMEOUT_S = 30.0
"""No single ip/nft call should take long; a hung one must not hang a test run."""

REQUIRED_TOOLS = ("ip", "nft")


def run_tool(argv: list[str], *, input_text: str | None = None) -> str:
    """Run one tool, return its stdout; raise CommandFailed with its stderr."""
    log.debug("run %s", argv)
    try:
        completed = subprocess.run(
            argv,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, -1, f"timed out after {TOOL_TIMEOUT_S} s") from exc
    except FileNotFoundError as exc:
        raise CommandFailed(argv, -1, f"{argv[0]} is not installed") from exc
    if completed.returncode != 0:
        raise CommandFailed(argv, completed.returncode, completed.stderr)
    return completed.stdout


def exec_prefix(namespace: str) -> list[str]:
    """The argv prefix that runs a command inside ``namespace``."""
    return ["ip", "netns", "exec", namespace]


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    output = run_tool(["ip", "netns", "list"])
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def add_namespace(name: str) -> None:
    run_tool(["ip", "netns", "add", name])


def namespace_pids(name: str) -> list[int]:
    """PIDs of the processes whose network namespace is ``name``."""
    try:
        output = run_tool(["ip", "netns", "pids", name])
    except CommandFailed:
        return []
    return [int(token) for token in output.split() if token.isdigit()]


def delete_namespaces(names: Iterable[str]) -> list[str]:
    """Kill the processes inside, then delete each namespace; return failures.

    Never raises for one namespace, so one stuck namespace does not keep the
    others alive; the caller reports what could not be removed.
    """
    failures: list[str] = []
    for name in names:
        for pid in namespace_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            run_tool(["ip", "netns", "delete", name])
        except CommandFailed as exc:
            if name in list_namespaces():
                failures.append(f"{name}: {exc}")
    return failures


def apply_plan(plan: NetworkPlan) -> None:
    """Create every namespace, link, address, route, ruleset and qdisc of ``plan``."""
    for namespace in plan.namespaces:
        add_namespace(namespace.name)
    for namespace in plan.namespaces:
        _set_sysctls(namespace)
        _ip_batch(namespace.name, _link_commands(namespace, plan))
    for namespace in plan.namespaces:
        _ip_batch(namespace.name, _address_commands(namespace))
    for namespace in plan.namespaces:
        if namespace.nft_ruleset is not None:
            run_tool(
                [*exec_prefix(namespace.name), "nft", "-f", "-"], input_text=namespace.nft_ruleset
            )
    for emulator in plan.link_emulators:
        for end_namespace, end_interface in emulator.outer_ends:
            # The link emulator forwards frames up to the MTU: make the stack
            # segment GSO/TSO packets before they reach the emulator.
            _ip_batch(end_namespace, [f"link set dev {end_interface} gso_max_segs 1"])


def nft_ruleset(namespace: str) -> str:
    """``nft list ruleset`` inside ``namespace`` (for debugging and reports)."""
    return run_tool([*exec_prefix(namespace), "nft", "list", "ruleset"])


def missing_prerequisites() -> list[str]:
    """Why netsim cannot run here; empty when it can.

    Creates and deletes one throwaway namespace to prove that it is allowed.
    """
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("netsim needs root (network namespaces, nftables, packet sockets)")
    for tool in REQUIRED_TOOLS:
        if shutil.which(tool) is None:
            package = {"nft": "nftables", "ip": "iproute2"}[tool]
            problems.append(f"`{tool}` not found: apt-get install -y {package}")
    if problems:
        return problems
    probe = f"{PROJECT_PREFIX}{secrets.token_hex(3)}-check"
    try:
        add_namespace(probe)
        run_tool([*exec_prefix(probe), "nft", "list", "ruleset"])
    except CommandFailed as exc:
        problems.append(f"cannot use a network namespace here: {exc}")
    finally:
        leftovers = delete_namespaces([probe]) if probe in list_namespaces() else []
        problems += leftovers
    return problems


def _set_sysctls(namespace: NamespacePlan) -> None:
    settings = [
        # Routers forward; ICMP redirects would teach hosts to bypass the NAT
        # (a hairpinned packet leaves by the interface it came in on).
        f"net.ipv4.ip_forward={int(namespace.forwarding)}",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.default.send_redirects=0",
        "net.ipv4.conf.all.accept_redirects=0",
        "net.ipv4.conf.default.accept_redirects=0",
    ]
    if namespace.role is NamespaceRole.LINK:
        # A cable says nothing: no IPv6 autoconfiguration chatter from its ends.
        settings += ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
    if namespace.bridges:
        # With br_netfilter loaded, bridged LAN frames would run through the ip
        # hooks; a router's LAN switch must not NAT or filter.
        settings.append("net.bridge.bridge-nf-call-iptables=0")
    # -e: the bridge key exists only while br_netfilter is loaded.
    run_tool([*exec_prefix(namespace.name), "sysctl", "-q", "-e", "-w", *settings])


def _link_commands(namespace: NamespacePlan, plan: NetworkPlan) -> list[str]:
    commands = ["link set dev lo up"]
    for bridge in namespace.bridges:
        commands.append(f"link add name {bridge.name} type bridge")
    for veth in plan.veths:
        if veth.namespace_a == namespace.name:
            commands.append(
                f"link add name {veth.interface_a} type veth"
                f" peer name {veth.interface_b} netns {veth.namespace_b}"
            )
    return commands


def _address_commands(namespace: NamespacePlan) -> list[str]:
    commands: list[str] = []
    for interface in (*namespace.bridges, *namespace.interfaces):
        if interface.bridge is not None:
            commands.append(f"link set dev {interface.name} master {interface.bridge}")
        if interface.address is not None:
            commands.append(f"address add {interface.address} dev {interface.name}")
        if interface.promiscuous:
            commands.append(f"link set dev {interface.name} promisc on")
        commands.append(f"link set dev {interface.name} up")
    if namespace.default_gateway is not None:
        commands.append(f"route add default via {namespace.default_gateway}")
    for route in namespace.routes:
        commands.append(f"route add {route.destination} via {route.via}")
    return commands


def _ip_batch(namespace: str, commands: list[str]) -> None:
    if commands:
        run_tool(["ip", "-n", namespace, "-batch", "-"], input_text="\n".join(commands) + "\n")
