"""Disco: authenticated PING, PONG and CALL_ME_MAYBE on the node's one UDP socket (sans-IO).

Theory
------
Before QUIC may use a direct UDP path to a peer, the path is probed with a
disco PING; a PONG back proves that packets flow both ways and tells the
pinger the address the peer saw it from (its reflexive address). The PING
also teaches the receiver "this source address is that NodeId", so when the
dialer's QUIC Initial arrives from the same address the acceptor already
knows which peer it is (and its virtual address, see :mod:`.paths`).

CALL_ME_MAYBE is the hole punching trigger (see :mod:`.paths`): sent over
the relay to a peer we reach only through the relay, it lists the
sender's candidate addresses (interface addresses and the public address a
STUN server or the relay saw) and its NAT kind from netcheck, and asks the
peer to ping all of them now, while the sender pings the peer's. Both
sides' first probes open their own NAT for the other's.

Every message is a ``crypto_box`` (X25519 + XSalsa20-Poly1305, libsodium)
from the sender's key to the receiver's key, both derived from the NodeIds.
Opening it proves the sender holds the private key of the NodeId in the
clear header. Replays are dropped by a bounded LRU of recent nonces, so a
recorded PING replayed within the window teaches nothing. (Older replays
can re-map an address; the mapping is a routing hint, the HELLO signature
on the node protocol is the authentication.)

Wire format (one UDP datagram)
------------------------------
::

    -> MAGIC(6) | sender NodeId(32) | nonce(24) | box(plaintext)      box = 16-byte MAC + body
    plaintext PING:  0x01 | tx_id(12)
    plaintext PONG:  0x02 | tx_id(12) | family(1: 4 or 6) | ip(4 or 16) | port(2, big endian)
    plaintext CALL_ME_MAYBE:
                     0x03 | tx_id(12) | nat(1) | count(1) | count x candidate
        candidate  = kind(1: 1 local, 2 reflexive) | family(1) | ip(4 or 16) | port(2)
        nat        = 0 unknown, 1 none, 2 easy, 3 hard, 4 udp-blocked  (netcheck.NatKind)
        count     <= MAX_CANDIDATES (16); the tx id only makes each message unique

MAGIC is ``8d 70 32 70 64 01`` (0x8d, "p2pd", version 1). Demultiplexing rule
on the shared socket, first byte ``b0``:

- ``b0 & 0xC0 == 0x00`` -> STUN (RFC 8489 §5: top two bits zero; then the
  magic cookie 0x2112A442 at bytes 4..8);
- ``b0 & 0x40 == 0x40`` -> QUIC: every QUIC v1 long (0xC0..0xFF) and short
  (0x40..0x7F) header has the Fixed Bit set (RFC 9000 §17.2, §17.3.1); we
  never negotiate greasing it away (RFC 9287);
- ``b0 & 0xC0 == 0x80`` -> disco **iff** bytes 0..6 equal MAGIC. The only QUIC
  packet that may look like this is Version Negotiation (RFC 9000 §17.2.1,
  Fixed Bit arbitrary), and its bytes 1..5 are the version 0x00000000,
  which MAGIC's bytes 1..5 are not;
- ``b0 & 0xC0 == 0x80`` -> the relay's UDP fast path **iff** bytes 0..5 equal
  ``8e 70 32 70 72`` (0x8e, "p2pr"; byte 5 is the direction: 01 node to
  relay, 02 relay to node; :mod:`p2psync.proto.relay`). Neither disco
  (first byte 0x8d) nor Version Negotiation (bytes 1..5 zero) starts so;
- anything else with ``b0 & 0xC0 == 0x80`` -> QUIC (Version Negotiation).

In a table (``b0`` = first byte)::

    b0 & 0xC0   bytes             what
    0x00        4..8 = cookie     STUN (RFC 8489)
    0x40, 0xC0  -                 QUIC v1 short / long header (Fixed Bit)
    0x80        0..6 = 8d"p2pd"01 disco (this module)
    0x80        0..5 = 8e"p2pr"   relay fast path (p2psync.proto.relay)
    0x80        other             QUIC Version Negotiation (version 0)

Over the relay the same datagram bytes travel as a relay payload (see
:mod:`.endpoint`); the shell drops one whose sealed sender is not the
relay's authenticated source. A PONG to a relayed PING carries the pinger's
relay pseudo-address (its virtual address, port 0) as the observed address:
it validates no direct path and says nothing about our public address.

Limits: PING and PONG are tiny and fixed size per type; CALL_ME_MAYBE holds
at most :data:`MAX_CANDIDATES` candidates; anything else is dropped and
counted (:class:`DiscoCounters`). Shared keys (``crypto_box_beforenm``)
are cached per peer in a bounded LRU so a flood of PINGs from one peer costs
one X25519 each time only for new peers.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import nacl.bindings as sodium
import nacl.exceptions

from p2psync.crypto.identity import NODE_ID_SIZE, Identity, NodeId
from p2psync.defaults import DISCO_MAX_SHARED_KEYS, DISCO_REPLAY_WINDOW
from p2psync.errors import BadFrame, LocalProtocolError
from p2psync.net.netcheck import NatKind

RandomBytes = Callable[[int], bytes]
Address = tuple[str, int]

MAGIC: Final = b"\x8dp2pd\x01"
NONCE_SIZE: Final = 24
TX_ID_SIZE: Final = 12
MAC_SIZE: Final = 16
HEADER_SIZE: Final = len(MAGIC) + NODE_ID_SIZE + NONCE_SIZE

TYPE_PING: Final = 0x01
TYPE_PONG: Final = 0x02
TYPE_CALL_ME_MAYBE: Final = 0x03

# Candidates in one CALL_ME_MAYBE: a few interfaces, IPv4 and IPv6, and the
# public address(es); matches the path table's addresses per peer.
MAX_CANDIDATES: Final = 16
_MAX_ADDRESS_SIZE: Final = 1 + 16 + 2
# Largest legal datagram: header + MAC + a CALL_ME_MAYBE of MAX_CANDIDATES IPv6 candidates.
MAX_DISCO_SIZE: Final = (
    HEADER_SIZE + MAC_SIZE + 1 + TX_ID_SIZE + 2 + MAX_CANDIDATES * (1 + _MAX_ADDRESS_SIZE)
)

# NAT kinds on the wire (CALL_ME_MAYBE's nat byte).
_NAT_CODES: Final = {
    NatKind.UNKNOWN: 0,
    NatKind.NONE: 1,
    NatKind.EASY: 2,
    NatKind.HARD: 3,
    NatKind.UDP_BLOCKED: 4,
}
_NAT_BY_CODE: Final = {code: kind for kind, code in _NAT_CODES.items()}


class BadDisco(BadFrame):
    """A datagram that looked like disco but is not a valid message for us."""


@dataclass(frozen=True, slots=True)
class Ping:
    sender: NodeId
    tx_id: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    sender: NodeId
    tx_id: bytes
    observed: Address  # where the pong's sender saw our ping come from


class CandidateKind(enum.IntEnum):
    """Where a CALL_ME_MAYBE candidate address comes from (its wire code)."""

    LOCAL = 1  # an address of one of the sender's interfaces
    REFLEXIVE = 2  # the sender's public address, as a STUN server or the relay saw it


@dataclass(frozen=True, slots=True)
class Candidate:
    address: Address
    kind: CandidateKind


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    sender: NodeId
    tx_id: bytes
    nat: NatKind
    candidates: tuple[Candidate, ...]


DiscoMessage = Ping | Pong | CallMeMaybe


@dataclass(slots=True)
class DiscoCounters:
    """Why datagrams were dropped; exported as metrics by the shell."""

    opened: int = 0
    malformed: int = 0
    bad_box: int = 0
    replayed: int = 0
    unknown_type: int = 0
    from_self: int = 0


def is_disco(datagram: bytes) -> bool:
    """Cheap demultiplexing test (see the module docstring for the rule)."""
    return datagram[:6] == MAGIC


def encode_address(address: Address) -> bytes:
    ip = ipaddress.ip_address(address[0])
    family = 4 if ip.version == 4 else 6
    return bytes([family]) + ip.packed + address[1].to_bytes(2, "big")


def decode_address_untrusted(data: bytes) -> Address:
    """Inverse of :func:`encode_address`; the whole of ``data`` must be used."""
    if not data:
        raise BadDisco("address is empty")
    family = data[0]
    size = {4: 4, 6: 16}.get(family)
    if size is None:
        raise BadDisco(f"unknown address family {family}")
    if len(data) != 1 + size + 2:
        raise BadDisco(f"address of family {family} is {len(data)} bytes")
    ip = ipaddress.ip_address(data[1 : 1 + size])
    return (str(ip), int.from_bytes(data[1 + size :], "big"))


def _decode_candidates_untrusted(data: bytes) -> tuple[NatKind, tuple[Candidate, ...]]:
    """``nat | count | count x (kind | address)`` of a CALL_ME_MAYBE; all of ``data`` is used."""
    if len(data) < 2:
        raise BadDisco("CALL_ME_MAYBE without NAT kind and count")
    nat = _NAT_BY_CODE.get(data[0], NatKind.UNKNOWN)  # a newer kind we do not know yet
    count = data[1]
    if count > MAX_CANDIDATES:
        raise BadDisco(f"CALL_ME_MAYBE with {count} candidates (at most {MAX_CANDIDATES})")
    candidates: list[Candidate] = []
    offset = 2
    for _ in range(count):
        if offset + 2 > len(data):
            raise BadDisco("CALL_ME_MAYBE candidate list is truncated")
        try:
            kind = CandidateKind(data[offset])
        except ValueError:
            raise BadDisco(f"unknown candidate kind {data[offset]}") from None
        size = {4: 4, 6: 16}.get(data[offset + 1])
        if size is None:
            raise BadDisco(f"unknown address family {data[offset + 1]}")
        end = offset + 1 + 1 + size + 2
        if end > len(data):
            raise BadDisco("CALL_ME_MAYBE candidate list is truncated")
        candidates.append(Candidate(decode_address_untrusted(data[offset + 1 : end]), kind))
        offset = end
    if offset != len(data):
        raise BadDisco(f"{len(data) - offset} stray bytes after the CALL_ME_MAYBE candidates")
    return nat, tuple(candidates)


class Disco:
    """Seals and opens disco messages for one identity.

    Inputs: :meth:`open_untrusted` (a received datagram). Outputs: the bytes
    of :meth:`seal_ping` / :meth:`seal_pong` / :meth:`seal_call_me_maybe`. No
    I/O, no clock; randomness (nonces, tx ids) comes from the injected
    ``random_bytes``.
    """

    def __init__(
        self,
        identity: Identity,
        random_bytes: RandomBytes,
        *,
        replay_window: int = DISCO_REPLAY_WINDOW,
        max_shared_keys: int = DISCO_MAX_SHARED_KEYS,
    ) -> None:
        self._our_id = identity.node_id
        self._our_x25519_private = identity.x25519_private()
        self._random_bytes = random_bytes
        self._replay_window = replay_window
        self._max_shared_keys = max_shared_keys
        self._seen_nonces: OrderedDict[bytes, None] = OrderedDict()
        self._shared_keys: OrderedDict[NodeId, bytes] = OrderedDict()
        self.counters = DiscoCounters()

    @property
    def our_node_id(self) -> NodeId:
        return self._our_id

    def new_tx_id(self) -> bytes:
        return self._random_bytes(TX_ID_SIZE)

    def seal_ping(self, to: NodeId, tx_id: bytes) -> bytes:
        """-> PING(tx_id) boxed to ``to``."""
        self._check_tx_id(tx_id)
        return self._seal(to, bytes([TYPE_PING]) + tx_id)

    def seal_pong(self, to: NodeId, tx_id: bytes, observed: Address) -> bytes:
        """-> PONG(tx_id, observed source address of the PING) boxed to ``to``."""
        self._check_tx_id(tx_id)
        return self._seal(to, bytes([TYPE_PONG]) + tx_id + encode_address(observed))

    def seal_call_me_maybe(
        self, to: NodeId, nat: NatKind, candidates: tuple[Candidate, ...] | list[Candidate]
    ) -> bytes:
        """-> CALL_ME_MAYBE(our NAT kind, our candidates) boxed to ``to``.

        Raises :class:`LocalProtocolError` for more than :data:`MAX_CANDIDATES`.
        """
        if len(candidates) > MAX_CANDIDATES:
            raise LocalProtocolError(
                f"a CALL_ME_MAYBE carries at most {MAX_CANDIDATES} candidates, "
                f"got {len(candidates)}"
            )
        body = b"".join(bytes([c.kind]) + encode_address(c.address) for c in candidates)
        header = bytes([TYPE_CALL_ME_MAYBE]) + self.new_tx_id()
        return self._seal(to, header + bytes([_NAT_CODES[nat], len(candidates)]) + body)

    def open_untrusted(self, datagram: bytes) -> DiscoMessage:
        """Open a datagram; raise :class:`BadDisco` (and count why) if it is not valid."""
        try:
            return self._open(datagram)
        except BadDisco:
            raise
        except BadFrame as exc:  # e.g. the sender's NodeId is not a valid point
            self.counters.malformed += 1
            raise BadDisco(str(exc)) from exc

    # -- internals -------------------------------------------------------

    def _open(self, datagram: bytes) -> DiscoMessage:
        if (
            len(datagram) < HEADER_SIZE + MAC_SIZE + 1 + TX_ID_SIZE
            or len(datagram) > MAX_DISCO_SIZE
            or not is_disco(datagram)
        ):
            self.counters.malformed += 1
            raise BadDisco(f"not a disco message ({len(datagram)} bytes)")
        sender = NodeId(datagram[len(MAGIC) : len(MAGIC) + NODE_ID_SIZE])
        if sender == self._our_id:
            self.counters.from_self += 1
            raise BadDisco("disco message claims to come from ourselves")
        nonce = datagram[len(MAGIC) + NODE_ID_SIZE : HEADER_SIZE]
        try:
            plaintext: bytes = sodium.crypto_box_open_afternm(
                datagram[HEADER_SIZE:], nonce, self._shared_key(sender)
            )
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            self.counters.bad_box += 1
            raise BadDisco(f"disco box from {sender.short()} did not open") from exc
        # Only authentic messages enter the replay window, so forgeries
        # cannot flush it.
        if nonce in self._seen_nonces:
            self.counters.replayed += 1
            raise BadDisco(f"replayed disco message from {sender.short()}")
        self._seen_nonces[nonce] = None
        if len(self._seen_nonces) > self._replay_window:
            self._seen_nonces.popitem(last=False)
        kind, tx_id, rest = plaintext[0], plaintext[1 : 1 + TX_ID_SIZE], plaintext[1 + TX_ID_SIZE :]
        if kind == TYPE_PING and not rest:
            self.counters.opened += 1
            return Ping(sender, tx_id)
        try:
            if kind == TYPE_PONG:
                observed = decode_address_untrusted(rest)
                self.counters.opened += 1
                return Pong(sender, tx_id, observed)
            if kind == TYPE_CALL_ME_MAYBE:
                nat, candidates = _decode_candidates_untrusted(rest)
                self.counters.opened += 1
                return CallMeMaybe(sender, tx_id, nat, candidates)
        except BadDisco:
            self.counters.malformed += 1
            raise
        self.counters.unknown_type += 1
        raise BadDisco(f"unknown disco message type {kind} from {sender.short()}")

    def _seal(self, to: NodeId, plaintext: bytes) -> bytes:
        nonce = self._random_bytes(NONCE_SIZE)
        boxed: bytes = sodium.crypto_box_afternm(plaintext, nonce, self._shared_key(to))
        return MAGIC + self._our_id.raw + nonce + boxed

    def _shared_key(self, peer: NodeId) -> bytes:
        key = self._shared_keys.get(peer)
        if key is None:
            key = bytes(sodium.crypto_box_beforenm(peer.x25519_public(), self._our_x25519_private))
            self._shared_keys[peer] = key
            if len(self._shared_keys) > self._max_shared_keys:
                self._shared_keys.popitem(last=False)
        else:
            self._shared_keys.move_to_end(peer)
        return key

    @staticmethod
    def _check_tx_id(tx_id: bytes) -> None:
        if len(tx_id) != TX_ID_SIZE:
            raise LocalProtocolError(f"a disco tx id is {TX_ID_SIZE} bytes, got {len(tx_id)}")
