"""Events a :class:`~p2psync.sync.session.SyncSession` reports to its shell.

Frozen, slotted, past tense (like aioquic's ``events.py``). The shell drains
them with ``session.next_event()`` after every input and acts:

=====================  ==========================================================
event                  what the shell does
=====================  ==========================================================
PeerVerified           register the session with gossip (after the duplicate
                       connection rule, :func:`p2psync.sync.rules.keep_connection`)
EntriesReceived        ``gossip.entries_received(peer, accepted)``; wake pullers
ObjectWanted           open an object stream, WANT it, then call
                       ``object_received`` or ``object_failed``
ObjectStored           (informational) progress; a blob may now be complete
ProtocolViolation      (informational) log/metric; SessionClosed follows
SessionClosed          send what ``data_to_send()`` still holds, close the QUIC
                       connection with ``code``, unregister from gossip
=====================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from p2psync.crypto.identity import NodeId


@dataclass(frozen=True, slots=True)
class PeerVerified:
    """The handshake finished: the peer holds ``their_node``'s key and is in our group."""

    their_node: NodeId
    epoch: int


@dataclass(frozen=True, slots=True)
class EntriesReceived:
    """The peer sent entries; ``accepted`` are the raw entries new to our store."""

    their_node: NodeId
    accepted: tuple[bytes, ...]
    duplicates: int
    rejected: int

    def __repr__(self) -> str:
        return (
            f"EntriesReceived({self.their_node.short()}, accepted={len(self.accepted)}, "
            f"duplicates={self.duplicates}, rejected={self.rejected})"
        )


@dataclass(frozen=True, slots=True)
class ObjectWanted:
    """Fetch object ``oid`` from this peer on a new object stream."""

    oid: bytes


@dataclass(frozen=True, slots=True)
class ObjectStored:
    """Object ``oid`` arrived, matched its id and is stored."""

    oid: bytes


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke the protocol; the session closes with ``code``."""

    code: int
    detail: str


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The session is over. ``by_peer``: the peer sent BYE (or the connection broke)."""

    code: int
    reason: str
    by_peer: bool


Event = (
    PeerVerified | EntriesReceived | ObjectWanted | ObjectStored | ProtocolViolation | SessionClosed
)
