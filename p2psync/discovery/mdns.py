"""LAN discovery over mDNS / DNS-SD: the one module that imports zeroconf.

Theory
------
Each daemon registers one DNS-SD service (RFC 6763) of type
:data:`SERVICE_TYPE` on every up, multicast-capable IPv4 interface, and
browses for the same type. What the records carry, and why an outsider
learns neither the NodeId nor who shares a group, is in
:mod:`p2psync.discovery.tags` (the sans-IO half)::

    PTR  _p2psync._udp.local.                   -> p2ps-<random>._p2psync._udp.local.
    SRV  p2ps-<random>._p2psync._udp.local.     -> p2ps-<random>.local. : <udp port>
    TXT  p2ps-<random>._p2psync._udp.local.     -> "v=1" "s=<sealed advert>"
    A    p2ps-<random>.local.                   -> each interface address

A resolved service whose sealed advert opens under one of the group's
accepted tags (current and previous window) and is not our own becomes a
:class:`DiscoveredPeer`, handed to ``on_peer`` in the trio thread: a LAN
candidate for the path table and a reason to dial. Adverts are hints; the
QUIC handshake against the sealed NodeId is the authentication.

Short-code invites
------------------
:func:`advertise_invite` announces an open short code as a service of its
own type (``_p2psync-invite._udp.local.``, TXT in
:mod:`p2psync.discovery.invites`) for the invite's few minutes, on the
interfaces of the moment; :func:`find_invite` browses for it and returns the
first advert our code opens. Both use one zeroconf instance of their own and
close it on exit, as :func:`run_mdns` does.

Threads
-------
python-zeroconf runs its own asyncio loop in its own thread
(``Zeroconf(use_asyncio=False)``); its ``ServiceBrowser`` calls our handler
in one more thread of its own. Nothing of zeroconf runs on the trio thread:

- blocking zeroconf calls (open, register, unregister, resolve, close) go
  through ``trio.to_thread.run_sync``;
- browse events cross into trio through :class:`_BrowseInbox`: the handler
  records ``name -> latest state change`` under a lock (coalescing bursts
  for one name, at most ``max_pending`` names, the rest dropped and counted)
  and schedules one delivery per new name with the run's
  ``TrioToken.run_sync_soon`` (never blocks zeroconf's thread); deliveries
  go into a memory channel of the same capacity, which ``resolvers`` trio
  tasks drain;
- on exit (cancellation, error, restart) the browser is cancelled and
  zeroconf closed (goodbye packets, RFC 6762 §10.1) in a shielded,
  time-bounded scope, so no zeroconf thread outlives :func:`run_mdns`
  except one stuck longer than ``close_timeout`` (logged).

Interfaces
----------
zeroconf binds the interfaces it is given when it starts. :func:`run_mdns`
takes a snapshot of the up, multicast-capable, non-loopback IPv4 interfaces
(name, address, prefix), starts zeroconf on exactly those, and re-reads the
snapshot every ``interface_poll`` seconds; on **any** change (an interface
up or down, an address added, removed or renumbered) it closes zeroconf and
starts afresh - a new advert with new addresses, a new browse - rather than
patching sockets and records in place. A restart costs about a second of
mDNS traffic and happens only when the network changed, and one code path
covers every case, including "no interface yet" at boot.

Failure and status
------------------
When no interface qualifies, or zeroconf cannot open its sockets (no
multicast route, permission denied, port 5353 unusable), :func:`run_mdns`
reports ``"mDNS unavailable: <why> (relay discovery only)"`` and keeps
waiting: it retries when the interfaces change or after
``retry_interval``.

Open sockets do not mean multicast flows: a host firewall that drops
UDP 5353, or a Wi-Fi access point that filters multicast between clients,
is silent. So each session listens to every mDNS record that arrives
(zeroconf's record updates, whatever the service type) and sorts out our
own by the random label of our adverts (:func:`heard_from_elsewhere`);
until a record of **another host** has arrived, nothing shows multicast
works. After ``silence_timeout`` with none (:class:`MulticastCheck`) the
status becomes ``"mDNS unavailable: no multicast heard (relay discovery
only)"``; the advert and the browse go on, and the first record heard
turns it back to ``"mDNS active on ..."`` for the rest of the session.
Our own records do not count: the kernel loops multicast back to the
sender whatever the network does with it. A device alone on a LAN where
nothing else speaks mDNS is reported the same way - rightly, as there is
no one to find there. Status lines go to ``on_status`` (and the log) only when
they change, so a failure is said once; the first one is also the value of
``await nursery.start(run_mdns, ...)``. Turning mDNS off (``--no-mdns``) is
the caller's business: it just does not start :func:`run_mdns`.

Bounds
------
Pending browse events (``max_pending``), concurrent resolutions
(``resolvers``, each at most ``resolve_timeout``), tracked service
instances (``max_services``, LRU), peers remembered for rate limiting
(``max_peers``, LRU), TXT size (:data:`p2psync.discovery.tags.MAX_TXT_SIZE`)
and addresses per peer (``max_addresses``). ``on_peer`` fires for a peer
when it is new, when its addresses change, and otherwise at most once per
``report_interval`` (:class:`PeerReports`; the table starts empty after
each restart, so a network change re-reports every member). zeroconf's own
record cache is zeroconf's: it expires records by TTL (ours are
``record_ttl``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Final

import ifaddr
import trio
from zeroconf import Error as ZeroconfError
from zeroconf import (
    IPVersion,
    RecordUpdate,
    RecordUpdateListener,
    ServiceBrowser,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)

from p2psync import defaults
from p2psync.crypto.identity import NodeId, RandomBytes
from p2psync.discovery.invites import (
    INVITE_SERVICE_TYPE,
    InviteAdvert,
    WrongSecretHalf,
    decode_invite_txt_untrusted,
    open_invite_advert,
)
from p2psync.discovery.tags import (
    SealedAdvert,
    advert_label,
    decode_txt_untrusted,
    open_advert,
)
from p2psync.errors import BadFrame, P2PSyncError

logger = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_p2psync._udp.local."
UNAVAILABLE_SUFFIX: Final = "(relay discovery only)"

# --- defaults (candidates for p2psync/defaults.py) -------------------------
# Interfaces are re-read this often: a new Wi-Fi address is used within 5 s,
# and one getifaddrs() per 5 s costs nothing.
MDNS_INTERFACE_POLL: Final = 5.0
# Our tag is re-read this often; a new window re-seals the advert within 5 s
# (receivers accept the previous window meanwhile).
MDNS_TAG_CHECK_INTERVAL: Final = 5.0
# After a failure with unchanged interfaces, try zeroconf again this often.
MDNS_RETRY_INTERVAL: Final = 60.0
# TTL of all our records: RFC 6762 §10's 120 s for host-related records, used
# for PTR/TXT too, so a crashed or rotated advert leaves caches in 2 minutes.
MDNS_RECORD_TTL: Final = 120
# Same peer, same addresses: report it at most once a minute (a re-dial
# hint), however often its records are refreshed or re-announced.
MDNS_REPORT_INTERVAL: Final = 60.0
# Service instances tracked (LRU): a LAN has tens of devices; a flood of
# fake services evicts old entries instead of growing memory.
MDNS_MAX_SERVICES: Final = 256
# Peers remembered for report rate limiting (LRU).
MDNS_MAX_PEERS: Final = 256
# Browse events waiting for a resolver; beyond, new names are dropped and
# show up again when zeroconf refreshes them.
MDNS_MAX_PENDING: Final = 64
# Concurrent resolutions: a silent fake service ties up one for at most
# MDNS_RESOLVE_TIMEOUT without starving the others.
MDNS_RESOLVERS: Final = 4
MDNS_RESOLVE_TIMEOUT: Final = 2.0
# zeroconf's close (goodbyes, thread joins) takes about a second; waiting
# longer would stall shutdown, so a stuck close is abandoned after this.
MDNS_CLOSE_TIMEOUT: Final = 5.0

_TYPE_PTR: Final = 12  # RFC 1035 §3.2.2
_SIOCGIFFLAGS: Final = 0x8913
_IFF_UP: Final = 0x1
_IFF_LOOPBACK: Final = 0x8
_IFF_MULTICAST: Final = 0x1000


class MdnsUnavailable(P2PSyncError):
    """zeroconf could not start on this host's interfaces (the message says why)."""


@dataclass(frozen=True, slots=True)
class MdnsConfig:
    """Knobs of :func:`run_mdns`; every default is a named constant above or in
    :mod:`p2psync.defaults`.

    ``interfaces``: interface names to use (``None``: every up,
    multicast-capable, non-loopback interface with an IPv4 address).
    """

    interfaces: tuple[str, ...] | None = None
    interface_poll: float = MDNS_INTERFACE_POLL
    tag_check_interval: float = MDNS_TAG_CHECK_INTERVAL
    retry_interval: float = MDNS_RETRY_INTERVAL
    record_ttl: int = MDNS_RECORD_TTL
    report_interval: float = MDNS_REPORT_INTERVAL
    max_services: int = MDNS_MAX_SERVICES
    max_peers: int = MDNS_MAX_PEERS
    max_pending: int = MDNS_MAX_PENDING
    max_addresses: int = defaults.PATHS_MAX_ADDRESSES_PER_PEER
    resolvers: int = MDNS_RESOLVERS
    resolve_timeout: float = MDNS_RESOLVE_TIMEOUT
    close_timeout: float = MDNS_CLOSE_TIMEOUT
    silence_timeout: float = defaults.MDNS_SILENCE_TIMEOUT


@dataclass(frozen=True, slots=True)
class Advert:
    """What we announce: our NodeId and UDP port, sealed under ``tag()``.

    ``tag`` returns the current window tag
    (:func:`p2psync.discovery.tags.advert_tag`); it is re-read every
    ``tag_check_interval`` and a new value re-advertises.
    """

    node_id: NodeId
    port: int
    tag: Callable[[], bytes]


@dataclass(frozen=True, slots=True)
class DiscoveredPeer:
    """A group member seen on the LAN.

    ``addresses``: ``(ipv4, port)`` candidates, those on one of our
    interfaces' subnets first. ``tag``: the accepted tag that opened the
    advert (names group, epoch and window). ``interface``: our interface
    whose subnet holds the first address, ``None`` if none does.
    """

    node_id: NodeId
    addresses: tuple[tuple[str, int], ...]
    tag: bytes
    interface: str | None


@dataclass(slots=True)
class MdnsStats:
    """Counters a caller may pass in to watch :func:`run_mdns` (status pages, tests)."""

    resolved: int = 0
    """Services resolved (TXT fetched), ours included."""
    members: int = 0
    """Adverts that opened under an accepted tag (ours excluded)."""
    foreign: int = 0
    """Adverts that opened under no accepted tag: another group, or too old."""
    invalid: int = 0
    """Services whose TXT is no p2psync advert, or that gave no usable address."""
    reports: int = 0
    """Calls of ``on_peer``."""
    dropped_events: int = 0
    """Browse events dropped because ``max_pending`` were waiting."""
    restarts: int = 0
    """zeroconf (re)starts, the first included."""
    heard_elsewhere: bool = False
    """:func:`find_invite` only, set when it ends: any mDNS record of another host arrived
    (False after a while: this network likely drops multicast)."""
    seen_txt: collections.deque[bytes] = field(default_factory=lambda: collections.deque(maxlen=16))
    """The last few TXT records resolved (for privacy checks: no NodeId in clear)."""


# --- sans-IO pieces ---------------------------------------------------------


class MulticastCheck:
    """Has multicast from another host reached us since ``started``? (pure; ``now`` injected)

    :meth:`silent` is True once ``timeout`` has passed with nothing heard;
    one record heard settles it for the rest of the session (a peer's
    records come only every few minutes once caches are warm, so a
    sliding window would flap).
    """

    def __init__(self, started: float, timeout: float) -> None:
        self._started = started
        self._timeout = timeout
        self.heard_at: float | None = None

    def heard(self, now: float) -> None:
        if self.heard_at is None:
            self.heard_at = now

    def silent(self, now: float) -> bool:
        return self.heard_at is None and now - self._started >= self._timeout


def heard_from_elsewhere(owners: Collection[str], our_labels: Collection[str]) -> bool:
    """Whether any record named by ``owners`` is another host's.

    A record's owner is its name, or a PTR's target (the PTR's own name is
    the service type, the same for everyone). Ours all start with one of
    ``our_labels`` (the random labels of our adverts: instance and host
    names, also after zeroconf appends " (2)" to a name it found taken).
    """
    ours = tuple(label.lower() for label in our_labels)
    return any(not owner.lower().startswith(ours) for owner in owners) if ours else bool(owners)


class PeerReports:
    """When to tell the caller about a peer again (pure; ``now`` is injected).

    A peer is reported when first seen, when its address list changes, and
    otherwise at most once per ``interval``. At most ``max_peers`` are
    remembered (least recently reported evicted first).
    """

    def __init__(self, interval: float, max_peers: int) -> None:
        self._interval = interval
        self._max_peers = max_peers
        self._last: collections.OrderedDict[NodeId, tuple[tuple[tuple[str, int], ...], float]] = (
            collections.OrderedDict()
        )

    def should_report(
        self, node_id: NodeId, addresses: tuple[tuple[str, int], ...], now: float
    ) -> bool:
        previous = self._last.get(node_id)
        if previous is not None:
            their_addresses, when = previous
            if their_addresses == addresses and now - when < self._interval:
                return False
        self._last[node_id] = (addresses, now)
        self._last.move_to_end(node_id)
        while len(self._last) > self._max_peers:
            self._last.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._last)


@dataclass(frozen=True, slots=True, order=True)
class Interface:
    """One IPv4 address of one of our interfaces."""

    name: str
    address: str
    network: ipaddress.IPv4Network


def order_addresses(
    their_addresses: Collection[str], port: int, ours: Collection[Interface], limit: int
) -> tuple[tuple[tuple[str, int], ...], str | None]:
    """Usable candidates from an advert's A records, on-link first; and that interface.

    Drops loopback, unspecified, multicast and unparsable addresses (a peer
    must never make us dial ourselves or a group), keeps at most ``limit``.
    """
    on_link: list[tuple[str, int]] = []
    other: list[tuple[str, int]] = []
    interface: str | None = None
    for text in their_addresses:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        if address.is_loopback or address.is_unspecified or address.is_multicast:
            continue
        candidate = (str(address), port)
        if candidate in on_link or candidate in other:
            continue
        link = next((i for i in ours if address in i.network), None)
        if link is None:
            other.append(candidate)
            continue
        on_link.append(candidate)
        if interface is None:
            interface = link.name
    return tuple((on_link + other)[:limit]), interface


# --- interfaces ---------------------------------------------------------------


def _interface_flags(name: str) -> int | None:
    """SIOCGIFFLAGS (Linux, netdevice(7)); ``None`` where the ioctl is unknown."""
    request = struct.pack("16sH22x", name.encode()[:15], 0)  # struct ifreq, 40 bytes
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request)
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            return 0  # vanished between listing and asking: treat as down
        return None
    flags: int = struct.unpack_from("16sH", reply)[1]
    return flags


def interface_snapshot(names: tuple[str, ...] | None) -> frozenset[Interface]:
    """Up, multicast-capable, non-loopback IPv4 interface addresses (filtered by ``names``)."""
    found: set[Interface] = set()
    for adapter in ifaddr.get_adapters():
        name = adapter.nice_name
        if names is not None and name not in names:
            continue
        flags = _interface_flags(name)
        if flags is not None and (
            not flags & _IFF_UP or not flags & _IFF_MULTICAST or flags & _IFF_LOOPBACK
        ):
            continue
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6 comes as a tuple; we advertise IPv4 only
            network = ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}").network
            if ipaddress.IPv4Address(ip.ip).is_loopback:
                continue
            found.add(Interface(name, ip.ip, network))
    return frozenset(found)


def _describe(snapshot: frozenset[Interface]) -> str:
    return ", ".join(f"{i.name} {i.address}" for i in sorted(snapshot))


# --- the bridge from zeroconf's browser thread into trio -------------------------


class _BrowseInbox:
    """Browse events from zeroconf's thread, coalesced per name, bounded, into trio."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        limit: int,
        stats: MdnsStats,
        service_type: str = SERVICE_TYPE,
    ) -> None:
        self._token = token
        self._service_type = service_type
        self._limit = limit
        self._stats = stats
        self._lock = threading.Lock()
        self._pending: dict[str, ServiceStateChange] = {}
        self._closed = False
        self._send, self.receive = trio.open_memory_channel[str](limit)

    def on_state_change(
        self,
        zeroconf: object,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """zeroconf's ServiceBrowser handler (its thread): must not block."""
        del zeroconf
        if service_type != self._service_type:
            return
        with self._lock:
            if self._closed:
                return
            if name in self._pending:
                self._pending[name] = state_change  # coalesce: the newest change wins
                return
            if len(self._pending) >= self._limit:
                self._stats.dropped_events += 1
                return
            self._pending[name] = state_change
        with contextlib.suppress(trio.RunFinishedError):  # the run is over: nobody listens
            self._token.run_sync_soon(self._deliver, name)

    def _deliver(self, name: str) -> None:
        # Trio thread. Never full: one send per pending name, at most limit.
        try:
            self._send.send_nowait(name)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            with self._lock:
                self._pending.pop(name, None)

    def take(self, name: str) -> ServiceStateChange | None:
        with self._lock:
            return self._pending.pop(name, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pending.clear()
        self._send.close()


# --- zeroconf, typed and at arm's length -------------------------------------------


def _owner(record: object) -> str:
    """A zeroconf DNSRecord's owner name: its own, or a PTR's target (a PTR's own name is
    the service type). zeroconf does not export DNSRecord: read it as an object."""
    if getattr(record, "type", None) == _TYPE_PTR:
        return str(getattr(record, "alias", ""))
    return str(getattr(record, "name", ""))


class _HeardListener(RecordUpdateListener):
    """Notes (in zeroconf's thread) that a record of another host arrived.

    Never blocks: a label check per record and an Event set. ``labels`` is
    replaced whole by the trio side when we advertise under a new label.
    """

    def __init__(self) -> None:
        super().__init__()
        self.labels: tuple[str, ...] = ()
        self.heard = threading.Event()

    def async_update_records(self, zc: object, now: float, records: list[RecordUpdate]) -> None:
        del zc, now
        if self.heard.is_set():
            return
        owners = [_owner(update.new) for update in records]
        if heard_from_elsewhere(owners, self.labels):
            self.heard.set()


@dataclass(frozen=True, slots=True)
class _Resolved:
    txt: bytes
    addresses: tuple[str, ...]
    port: int | None


def _open_zeroconf_blocking(snapshot: frozenset[Interface]) -> Zeroconf:
    addresses: list[str | int] = sorted({i.address for i in snapshot})
    try:
        return Zeroconf(interfaces=addresses, ip_version=IPVersion.V4Only, use_asyncio=False)
    except (OSError, ZeroconfError) as exc:
        raise MdnsUnavailable(f"cannot open multicast sockets: {exc}") from exc


def _resolve_blocking(
    zc: Zeroconf, name: str, timeout: float, service_type: str = SERVICE_TYPE
) -> _Resolved | None:
    info = zc.get_service_info(service_type, name, timeout=int(timeout * 1000))
    if info is None or info.text is None:
        return None
    return _Resolved(
        txt=bytes(info.text),
        addresses=tuple(info.parsed_addresses(IPVersion.V4Only)),
        port=info.port,
    )


def _service_info(
    our: Advert, tag: bytes, snapshot: frozenset[Interface], ttl: int, random_bytes: RandomBytes
) -> ServiceInfo:
    label = advert_label(random_bytes)
    txt = SealedAdvert.seal(tag, our.node_id, our.port, random_bytes).to_txt()
    return ServiceInfo(
        SERVICE_TYPE,
        f"{label}.{SERVICE_TYPE}",
        port=our.port,
        properties=txt,
        server=f"{label}.local.",
        host_ttl=ttl,
        other_ttl=ttl,
        parsed_addresses=sorted({i.address for i in snapshot}),
    )


# --- the service ----------------------------------------------------------------


class _Status:
    def __init__(self, on_status: Callable[[str], None] | None) -> None:
        self._on_status = on_status
        self.current: str | None = None

    def set(self, text: str) -> None:
        if text == self.current:
            return
        self.current = text
        if text.startswith("mDNS unavailable"):
            logger.warning("%s", text)
        else:
            logger.info("%s", text)
        if self._on_status is not None:
            self._on_status(text)


def _unavailable(why: str) -> str:
    return f"mDNS unavailable: {why} {UNAVAILABLE_SUFFIX}"


class _Session:
    """One zeroconf instance on one interface snapshot: advertise and browse."""

    def __init__(
        self,
        zc: Zeroconf,
        snapshot: frozenset[Interface],
        config: MdnsConfig,
        our: Advert,
        accepted_tags: Callable[[], Collection[bytes]],
        on_peer: Callable[[DiscoveredPeer], None],
        reports: PeerReports,
        stats: MdnsStats,
        random_bytes: RandomBytes,
    ) -> None:
        self._zc = zc
        self._snapshot = snapshot
        self._config = config
        self._our = our
        self._accepted_tags = accepted_tags
        self._on_peer = on_peer
        self._reports = reports
        self._stats = stats
        self._random_bytes = random_bytes
        self._services: collections.OrderedDict[str, NodeId | None] = collections.OrderedDict()
        self._labels: collections.deque[str] = collections.deque(maxlen=8)  # our adverts'
        self._heard = _HeardListener()

    async def watch_multicast(self, active: str, status: _Status) -> None:
        """Say "no multicast heard" after ``silence_timeout`` of it; ``active`` when heard."""
        self._zc.add_listener(self._heard, None)
        try:
            check = MulticastCheck(trio.current_time(), self._config.silence_timeout)
            while True:
                now = trio.current_time()
                if self._heard.heard.is_set():
                    check.heard(now)
                    status.set(active)
                    return
                if check.silent(now):
                    status.set(_unavailable("no multicast heard"))
                await trio.sleep(min(1.0, self._config.silence_timeout))
        finally:
            self._zc.remove_listener(self._heard)

    async def advertise(self) -> None:
        """Register our service; re-register under a fresh name when our tag changes."""
        current: bytes | None = None
        registered: ServiceInfo | None = None
        while True:
            tag = self._our.tag()
            if tag != current:
                info = _service_info(
                    self._our, tag, self._snapshot, self._config.record_ttl, self._random_bytes
                )
                try:
                    if registered is not None:
                        await trio.to_thread.run_sync(self._zc.unregister_service, registered)
                        registered = None
                    await trio.to_thread.run_sync(self._register_blocking, info)
                except ZeroconfError as exc:
                    logger.warning("mDNS: could not register our advert (%r); will retry", exc)
                else:
                    registered, current = info, tag
                    self._labels.append(info.name.split(".", 1)[0])
                    self._heard.labels = tuple(self._labels)
                    logger.debug("mDNS: advertising as %s", info.name)
            await trio.sleep(self._config.tag_check_interval)

    def _register_blocking(self, info: ServiceInfo) -> None:
        # Names are random, so a conflict is someone copying ours: take a new suffix.
        self._zc.register_service(info, allow_name_change=True)

    async def browse(self) -> None:
        """Browse for our service type and hand members to ``on_peer``."""
        inbox = _BrowseInbox(
            trio.lowlevel.current_trio_token(), self._config.max_pending, self._stats
        )
        browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[inbox.on_state_change])
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self._config.resolvers):
                    nursery.start_soon(self._resolve_loop, inbox, inbox.receive.clone())
        finally:
            inbox.close()
            with trio.move_on_after(self._config.close_timeout) as scope:
                scope.shield = True
                await trio.to_thread.run_sync(browser.cancel, abandon_on_cancel=True)

    async def _resolve_loop(
        self, inbox: _BrowseInbox, names: trio.MemoryReceiveChannel[str]
    ) -> None:
        async with names:
            async for name in names:
                change = inbox.take(name)
                if change is None:
                    continue
                if change is ServiceStateChange.Removed:
                    self._services.pop(name, None)
                    continue
                resolved = await trio.to_thread.run_sync(
                    _resolve_blocking, self._zc, name, self._config.resolve_timeout
                )
                if resolved is not None:
                    self._consider(name, resolved)

    def _track(self, name: str, node_id: NodeId | None) -> None:
        self._services[name] = node_id
        self._services.move_to_end(name)
        while len(self._services) > self._config.max_services:
            self._services.popitem(last=False)

    def _consider(self, name: str, resolved: _Resolved) -> None:
        stats = self._stats
        stats.resolved += 1
        stats.seen_txt.append(resolved.txt)
        try:
            advert = decode_txt_untrusted(resolved.txt)
            opened = open_advert(advert, self._accepted_tags())
        except BadFrame as exc:
            stats.invalid += 1
            self._track(name, None)
            logger.debug("mDNS: ignoring %s: %s", name, exc)
            return
        if opened is None:
            stats.foreign += 1
            self._track(name, None)
            return
        self._track(name, opened.node_id)
        if opened.node_id == self._our.node_id:
            return
        stats.members += 1
        if resolved.port is not None and resolved.port != opened.port:
            logger.debug(
                "mDNS: %s: SRV port %s, sealed port %s wins", name, resolved.port, opened.port
            )
        addresses, interface = order_addresses(
            resolved.addresses, opened.port, self._snapshot, self._config.max_addresses
        )
        if not addresses:
            stats.invalid += 1
            logger.debug("mDNS: %s has no usable IPv4 address", opened.node_id.short())
            return
        if not self._reports.should_report(opened.node_id, addresses, trio.current_time()):
            return
        stats.reports += 1
        logger.debug("mDNS: found %s at %s via %s", opened.node_id.short(), addresses, interface)
        self._on_peer(DiscoveredPeer(opened.node_id, addresses, opened.tag, interface))


async def _wait_for_change(snapshot: frozenset[Interface], config: MdnsConfig) -> None:
    while True:
        await trio.sleep(config.interface_poll)
        if interface_snapshot(config.interfaces) != snapshot:
            return


async def _close_zeroconf(zc: Zeroconf, limit: float) -> None:
    # Shielded: closing must happen even when we are being cancelled; bounded:
    # a stuck close must not hang the daemon's shutdown.
    with trio.move_on_after(limit) as scope:
        scope.shield = True
        await trio.to_thread.run_sync(zc.close, abandon_on_cancel=True)
    if scope.cancelled_caught:
        logger.warning("mDNS: zeroconf did not close within %g s; left to finish alone", limit)


async def run_mdns(
    config: MdnsConfig,
    our: Advert,
    accepted_tags: Callable[[], Collection[bytes]],
    on_peer: Callable[[DiscoveredPeer], None],
    *,
    on_status: Callable[[str], None] | None = None,
    stats: MdnsStats | None = None,
    random_bytes: RandomBytes = os.urandom,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Advertise ``our`` service and report group members on the LAN, until cancelled.

    ``accepted_tags()`` returns the tags an advert may be sealed under
    (:func:`p2psync.discovery.tags.current_tags`); it is called for every
    resolved advert, so it follows window and epoch changes. ``on_peer`` is
    called in the trio thread (rate-limited per peer, see
    :class:`PeerReports`); it must not block. ``on_status`` gets each new
    status line. ``task_status.started`` gets the first status line: it
    starts with ``"mDNS active"`` or ``"mDNS unavailable"``.
    """
    status = _Status(on_status)
    stats = stats if stats is not None else MdnsStats()
    started = False

    def report(text: str) -> None:
        nonlocal started
        status.set(text)
        if not started:
            started = True
            task_status.started(text)

    while True:
        snapshot = interface_snapshot(config.interfaces)
        if not snapshot:
            report(_unavailable("no up, multicast-capable network interface with IPv4"))
            with trio.move_on_after(config.retry_interval):
                await _wait_for_change(snapshot, config)
            continue
        try:
            zc = await trio.to_thread.run_sync(_open_zeroconf_blocking, snapshot)
        except MdnsUnavailable as exc:
            report(_unavailable(str(exc)))
            with trio.move_on_after(config.retry_interval):
                await _wait_for_change(snapshot, config)
            continue
        stats.restarts += 1
        # A fresh report table per start: after a network change every
        # member is news again (its addresses may be the only new thing).
        reports = PeerReports(config.report_interval, config.max_peers)
        try:
            session = _Session(
                zc, snapshot, config, our, accepted_tags, on_peer, reports, stats, random_bytes
            )
            active = f"mDNS active on {_describe(snapshot)}"
            report(active)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.advertise)
                nursery.start_soon(session.browse)
                nursery.start_soon(session.watch_multicast, active, status)
                await _wait_for_change(snapshot, config)
                nursery.cancel_scope.cancel()
            logger.info("mDNS: network interfaces changed; restarting")
        finally:
            await _close_zeroconf(zc, config.close_timeout)


# --- short-code invites on the LAN (p2psync.discovery.invites) ----------------------


@dataclass(frozen=True, slots=True)
class FoundInvite:
    """The inviter of our short code, seen on the LAN: whom and where to dial."""

    node_id: NodeId
    addresses: tuple[tuple[str, int], ...]
    interface: str | None


async def advertise_invite(
    config: MdnsConfig,
    advert: Callable[[], InviteAdvert],
    port: int,
    *,
    random_bytes: RandomBytes = os.urandom,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Announce an open short-code invite until cancelled.

    ``advert()`` seals a fresh :class:`~p2psync.discovery.invites.InviteAdvert`.
    ``task_status.started`` gets a status line starting with ``"mDNS active"``
    or ``"mDNS unavailable"``; when unavailable the function returns (the
    invite still works through the relay, if there is one). An invite lives
    minutes: interface changes meanwhile are not followed (the group advert,
    :func:`run_mdns`, does that).
    """
    snapshot = interface_snapshot(config.interfaces)
    if not snapshot:
        task_status.started(_unavailable("no up, multicast-capable network interface with IPv4"))
        return
    try:
        zc = await trio.to_thread.run_sync(_open_zeroconf_blocking, snapshot)
    except MdnsUnavailable as exc:
        task_status.started(_unavailable(str(exc)))
        return
    try:
        label = advert_label(random_bytes)
        info = ServiceInfo(
            INVITE_SERVICE_TYPE,
            f"{label}.{INVITE_SERVICE_TYPE}",
            port=port,
            properties=advert().to_txt(),
            server=f"{label}.local.",
            host_ttl=config.record_ttl,
            other_ttl=config.record_ttl,
            parsed_addresses=sorted({i.address for i in snapshot}),
        )
        try:
            await trio.to_thread.run_sync(
                functools.partial(zc.register_service, info, allow_name_change=True)
            )
        except ZeroconfError as exc:
            task_status.started(_unavailable(f"could not announce the invite: {exc!r}"))
            return
        logger.info("mDNS: announcing a short-code invite as %s", info.name)
        task_status.started(f"mDNS active on {_describe(snapshot)}")
        try:
            await trio.sleep_forever()
        finally:
            with trio.move_on_after(config.close_timeout) as scope:
                scope.shield = True
                await trio.to_thread.run_sync(zc.unregister_service, info, abandon_on_cancel=True)
    finally:
        await _close_zeroconf(zc, config.close_timeout)


async def find_invite(
    config: MdnsConfig,
    lan_tag: bytes,
    advert_tag: bytes,
    *,
    our_node_id: NodeId | None = None,
    stats: MdnsStats | None = None,
    mismatches: list[WrongSecretHalf] | None = None,
    on_mismatch: Callable[[], None] | None = None,
) -> FoundInvite:
    """Browse the LAN until the inviter of our code shows up (cancel to give up).

    Raises :class:`MdnsUnavailable` when there is no usable interface or
    multicast. Adverts whose tag matches but whose seal our second half does
    not open (:class:`~p2psync.discovery.invites.WrongSecretHalf`) are
    appended to ``mismatches`` (bounded) and reported to ``on_mismatch`` (in
    the trio thread), so a caller can stop early and say "mistyped" instead of
    "not found". Our own advert (``our_node_id``) is skipped.
    """
    stats = stats if stats is not None else MdnsStats()
    snapshot = interface_snapshot(config.interfaces)
    if not snapshot:
        raise MdnsUnavailable("no up, multicast-capable network interface with IPv4")
    zc = await trio.to_thread.run_sync(_open_zeroconf_blocking, snapshot)
    result: list[FoundInvite] = []
    heard = _HeardListener()  # we advertise nothing here: every record is another host's
    zc.add_listener(heard, None)
    try:
        inbox = _BrowseInbox(
            trio.lowlevel.current_trio_token(), config.max_pending, stats, INVITE_SERVICE_TYPE
        )
        browser = ServiceBrowser(zc, INVITE_SERVICE_TYPE, handlers=[inbox.on_state_change])
        try:
            async with trio.open_nursery() as nursery:

                async def resolve_loop(names: trio.MemoryReceiveChannel[str]) -> None:
                    async with names:
                        async for name in names:
                            change = inbox.take(name)
                            if change is None or change is ServiceStateChange.Removed:
                                continue
                            resolved = await trio.to_thread.run_sync(
                                _resolve_blocking,
                                zc,
                                name,
                                config.resolve_timeout,
                                INVITE_SERVICE_TYPE,
                            )
                            if resolved is None:
                                continue
                            stats.resolved += 1
                            found = _consider_invite(
                                resolved,
                                lan_tag,
                                advert_tag,
                                snapshot,
                                config,
                                stats,
                                mismatches,
                                on_mismatch,
                            )
                            if found is not None and found.node_id != our_node_id:
                                result.append(found)
                                nursery.cancel_scope.cancel()
                                return

                for _ in range(config.resolvers):
                    nursery.start_soon(resolve_loop, inbox.receive.clone())
        finally:
            inbox.close()
            with trio.move_on_after(config.close_timeout) as scope:
                scope.shield = True
                await trio.to_thread.run_sync(browser.cancel, abandon_on_cancel=True)
    finally:
        stats.heard_elsewhere = heard.heard.is_set()
        await _close_zeroconf(zc, config.close_timeout)
    if not result:
        raise MdnsUnavailable("the browse ended without finding the invite")
    return result[0]


def _consider_invite(
    resolved: _Resolved,
    lan_tag: bytes,
    advert_tag: bytes,
    snapshot: frozenset[Interface],
    config: MdnsConfig,
    stats: MdnsStats,
    mismatches: list[WrongSecretHalf] | None,
    on_mismatch: Callable[[], None] | None = None,
) -> FoundInvite | None:
    try:
        advert = decode_invite_txt_untrusted(resolved.txt)
        opened = open_invite_advert(advert, lan_tag, advert_tag)
    except WrongSecretHalf as exc:
        stats.foreign += 1
        if mismatches is not None and len(mismatches) < config.max_pending:
            mismatches.append(exc)
        if on_mismatch is not None:
            on_mismatch()
        return None
    except BadFrame as exc:
        stats.invalid += 1
        logger.debug("mDNS: ignoring an invite advert: %s", exc)
        return None
    if opened is None:
        stats.foreign += 1
        return None
    stats.members += 1
    addresses, interface = order_addresses(
        resolved.addresses, opened.port, snapshot, config.max_addresses
    )
    if not addresses:
        stats.invalid += 1
        return None
    stats.reports += 1
    return FoundInvite(opened.node_id, addresses, interface)
