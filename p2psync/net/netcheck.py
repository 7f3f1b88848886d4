"""Netcheck: what kind of NAT is this node behind, seen from the relay (sans-IO probe plan).

Theory
------
A STUN Binding request (RFC 8489) tells us the address our NAT gave the
socket we sent it from, as the server saw it (the *reflexive* address).
relayd answers STUN on its UDP port and, with ``--stun-alt-port``, on a
second port of the same host. Two destinations are enough to tell the two
mapping behaviours of RFC 4787 §4.1 apart::

    mapped(main) == our own address:port      -> NONE  (no translation; maybe a firewall)
    mapped(main) == mapped(alt)               -> EASY  (endpoint-independent mapping)
    mapped(main) != mapped(alt)               -> HARD  (endpoint-dependent: per destination)
    only one port answered                    -> UNKNOWN (the relay has no second port)
    no answer at all within the timeout       -> UDP_BLOCKED (or the relay is down)

Hairpinning (RFC 4787 §6): once we know our public address we send a
Binding request *to it* from the same socket; if that request comes back to
us, our NAT hairpins (two devices behind it could reach each other through
its public address - which p2psync avoids anyway when a LAN path exists).

The plan is what the daemon runs in the background (on its one UDP socket,
so the mapping measured is the one its peers see) and what ``p2psync
netcheck`` runs on a fresh socket. :class:`NetcheckProbe` sends nothing and
reads no clock: the shell asks :meth:`~NetcheckProbe.datagrams_to_send`,
feeds :meth:`~NetcheckProbe.receive`, sleeps until
:meth:`~NetcheckProbe.next_deadline`, and reads :meth:`~NetcheckProbe.report`
once :meth:`~NetcheckProbe.done`.

Wire (all RFC 8489 Binding, FINGERPRINT included)::

    -> Binding request (txid t1) to relay:main     <- success, XOR-MAPPED-ADDRESS m1
    -> Binding request (txid t2) to relay:alt      <- success, XOR-MAPPED-ADDRESS m2
    -> Binding request (txid t3) to m1 (ourselves) <- the request itself, if hairpinning works

Each request is re-sent with a fresh transaction id every ``resend`` s, at
most ``attempts`` times (the RTT is measured on the one answered); the
whole probe ends after ``timeout`` s.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from p2psync.defaults import (
    NETCHECK_ATTEMPTS,
    NETCHECK_RESEND_INTERVAL,
    NETCHECK_TIMEOUT,
)
from p2psync.net.stun import (
    BINDING,
    BadStunMessage,
    StunClass,
    StunMessage,
    binding_request,
    decode_stun_untrusted,
    is_stun,
    parse_binding_response,
)

Address = tuple[str, int]
RandomBytes = Callable[[int], bytes]
_Probe = Literal["main", "alt", "hairpin"]


class NatKind(enum.StrEnum):
    """How our NAT maps and filters, as far as STUN to two ports can tell."""

    UNKNOWN = "unknown"  # not measured (yet), or only one STUN port answered
    NONE = "none"  # the relay sees our own interface address: no translation
    EASY = "easy"  # endpoint-independent mapping: one public port for every destination
    HARD = "hard"  # endpoint-dependent mapping: a new public port per destination
    UDP_BLOCKED = "udp-blocked"  # no STUN answer at all: UDP does not get out


@dataclass(frozen=True, slots=True)
class NetcheckReport:
    """What one probe found. ``public``: our reflexive address(es), main port's first."""

    server: Address
    alt_port: int | None
    nat: NatKind
    public: tuple[Address, ...]
    rtt_ms: float | None  # to the relay's main port
    hairpin: bool | None  # None: not measured (no public address, or no NAT)
    answered: tuple[str, ...]  # which probes got an answer: "main", "alt"

    def to_json(self) -> dict[str, Any]:
        return {
            "server": f"{self.server[0]}:{self.server[1]}",
            "alt_port": self.alt_port,
            "nat": str(self.nat),
            "public": [f"{host}:{port}" for host, port in self.public],
            "rtt_ms": self.rtt_ms,
            "hairpin": self.hairpin,
            "answered": list(self.answered),
        }

    def explain(self) -> str:
        """One line a person can act on."""
        if self.nat is NatKind.UDP_BLOCKED:
            return (
                "no STUN answer from the relay: UDP seems blocked here (or the relay is "
                "down); only a TCP relay transport could get through"
            )
        if self.nat is NatKind.NONE:
            return "no NAT: peers can reach this address directly (unless a firewall filters)"
        if self.nat is NatKind.EASY:
            return "easy NAT (one public port for every destination): hole punching works"
        if self.nat is NatKind.HARD:
            return (
                "hard NAT (a new public port per destination): direct only with a peer "
                "that is not behind a hard NAT too (birthday search)"
            )
        return (
            "NAT kind unknown: the relay answered on one port only "
            "(relayd --stun-alt-port gives a second)"
        )


class NetcheckProbe:
    """One run of the plan in the module docstring (sans-IO)."""

    def __init__(
        self,
        server: Address,
        alt_port: int | None,
        *,
        local: Address,
        local_ips: Iterable[str],
        random_bytes: RandomBytes,
        now: float,
        attempts: int = NETCHECK_ATTEMPTS,
        resend: float = NETCHECK_RESEND_INTERVAL,
        timeout: float = NETCHECK_TIMEOUT,
    ) -> None:
        self._server = server
        self._alt_port = alt_port
        self._local = local
        self._local_ips = {str(ipaddress.ip_address(ip)) for ip in local_ips}
        self._random_bytes = random_bytes
        self._attempts = max(1, attempts)
        self._resend = resend
        self._deadline = now + timeout
        # txid -> (probe, sent at)
        self._outstanding: dict[bytes, tuple[_Probe, float]] = {}
        self._sent: dict[_Probe, int] = {"main": 0, "alt": 0, "hairpin": 0}
        self._last_sent: dict[_Probe, float] = {}
        self._mapped: dict[_Probe, Address] = {}
        self._rtt: float | None = None
        self._hairpin: bool | None = None
        self._wanted: list[_Probe] = ["main", "alt"] if alt_port is not None else ["main"]

    # -- outputs -------------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Requests due now (first sends and re-sends)."""
        if self.done(now):
            return []
        out: list[tuple[bytes, Address]] = []
        for probe in self._pending_probes(now):
            destination = self._destination(probe)
            if destination is None:
                continue
            last = self._last_sent.get(probe)
            if self._sent[probe] >= self._attempts or (
                last is not None and now < last + self._resend
            ):
                continue
            txid = self._random_bytes(12)
            self._outstanding[txid] = (probe, now)
            self._sent[probe] += 1
            self._last_sent[probe] = now
            out.append((binding_request(txid, fingerprint=True), destination))
        return out

    def next_deadline(self, now: float) -> float | None:
        if self.done(now):
            return None
        times = [self._deadline]
        for probe in self._pending_probes(now):
            last = self._last_sent.get(probe)
            if last is None:
                times.append(now)
            elif self._sent[probe] < self._attempts:
                times.append(last + self._resend)
            elif last + 2 * self._resend > now:
                times.append(last + 2 * self._resend)  # when it is given up
        return max(now, min(times))

    def done(self, now: float) -> bool:
        return now >= self._deadline or not self._pending_probes(now)

    def report(self) -> NetcheckReport:
        main, alt = self._mapped.get("main"), self._mapped.get("alt")
        first = main or alt
        if first is None:
            nat = NatKind.UDP_BLOCKED
        elif first[1] == self._local[1] and first[0] in self._local_ips:
            nat = NatKind.NONE
        elif main is not None and alt is not None:
            nat = NatKind.EASY if main == alt else NatKind.HARD
        else:
            nat = NatKind.UNKNOWN
        public = tuple(dict.fromkeys(a for a in (main, alt) if a is not None))
        hairpin = self._hairpin
        if nat in (NatKind.NONE, NatKind.UDP_BLOCKED):
            hairpin = None
        elif hairpin is None and self._sent["hairpin"]:
            hairpin = False  # asked, never came back
        return NetcheckReport(
            server=self._server,
            alt_port=self._alt_port,
            nat=nat,
            public=public,
            rtt_ms=None if self._rtt is None else round(self._rtt * 1000, 2),
            hairpin=hairpin,
            answered=tuple(p for p in ("main", "alt") if p in self._mapped),
        )

    # -- input -------------------------------------------------------------------

    def receive(self, data: bytes, source: Address, now: float) -> bool:
        """A datagram from ``source``; True if it was ours (an answer or the hairpin request)."""
        if not is_stun(data):
            return False
        try:
            message = decode_stun_untrusted(data)
        except BadStunMessage:
            return False
        entry = self._outstanding.get(message.transaction_id)
        if entry is None:
            return False
        probe, sent_at = entry
        if probe == "hairpin":
            if _is_binding_request(message):
                self._hairpin = True
                del self._outstanding[message.transaction_id]
                return True
            return False
        try:
            mapped = parse_binding_response(data, message.transaction_id)
        except BadStunMessage:  # an error response, or junk with our txid
            return False
        del self._outstanding[message.transaction_id]
        if probe not in self._mapped:
            self._mapped[probe] = (str(ipaddress.ip_address(mapped[0])), mapped[1])
            if probe == "main":
                self._rtt = max(0.0, now - sent_at)
                self._maybe_want_hairpin()
        return True

    # -- internals ---------------------------------------------------------------

    def _pending_probes(self, now: float) -> list[_Probe]:
        """Probes still worth waiting for at ``now``.

        main: until answered (or the timeout). alt and hairpin: also given
        up once every attempt went out and the last had ``2 * resend`` to
        come back (a relay without a second port, a NAT that does not
        hairpin) - so a probe of a healthy network ends in about a second.
        """
        pending: list[_Probe] = []
        for probe in self._wanted:
            if probe in self._mapped or (probe == "hairpin" and self._hairpin is not None):
                continue
            last = self._last_sent.get(probe)
            exhausted = (
                probe != "main"
                and self._sent[probe] >= self._attempts
                and last is not None
                and now >= last + 2 * self._resend
                and "main" in self._mapped
            )
            if not exhausted:
                pending.append(probe)
        return pending

    def _destination(self, probe: _Probe) -> Address | None:
        host = self._server[0]
        if probe == "main":
            return self._server
        if probe == "alt":
            return None if self._alt_port is None else (host, self._alt_port)
        return self._mapped.get("main")

    def _maybe_want_hairpin(self) -> None:
        main = self._mapped["main"]
        behind_nat = not (main[1] == self._local[1] and main[0] in self._local_ips)
        if behind_nat and "hairpin" not in self._wanted:
            self._wanted.append("hairpin")


def _is_binding_request(message: StunMessage) -> bool:
    return message.method == BINDING and message.message_class is StunClass.REQUEST
