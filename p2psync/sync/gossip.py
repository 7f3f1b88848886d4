"""Gossip: push every new entry to every connected group peer, once.

Theory
------
Entries are small (at most MAX_ENTRY_SIZE, usually a few hundred bytes), so
gossip pushes them whole (ANNOUNCE carries raw entries) instead of
announcing ids and waiting for a pull: one message instead of three round
trips, and no per-peer "who has what" table.

Rules
-----
- A new local entry goes to every connected peer.
- An entry received from peer P goes to every connected peer except P —
  but only if our store accepted it as new (the session reports exactly
  those in :class:`~p2psync.sync.events.EntriesReceived`), so a flood dies
  out after one hop past the nodes that already have it.
- A bounded LRU of entry ids (SYNC_GOSSIP_SEEN_CACHE) drops anything
  forwarded before, whatever path it comes back on.
- Gossip is best effort. A peer that was away, a message lost with a
  broken connection, an entry that overtook its predecessor: the periodic
  frontier exchange (anti-entropy, in :mod:`p2psync.sync.session`) repairs
  all of them.

Every peer receives every entry here: fine for a user's handful of devices.
Larger groups would switch to a PlumTree-style tree (Leitão et al. 2007):
eager push along a spanning tree, lazy IHAVE of ids to the other peers, and
tree repair by GRAFT/PRUNE when an IHAVE beats the eager copy.

Sans-IO: :class:`Gossip` only calls ``announce`` on its peers (sessions),
and tells the shell which peers now have data to send.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import blake3

from p2psync import defaults
from p2psync.crypto.identity import NodeId
from p2psync.errors import LocalProtocolError


class Announcer(Protocol):
    """A connected peer (a :class:`~p2psync.sync.session.SyncSession`)."""

    def announce(self, raws: Sequence[bytes]) -> None: ...


def entry_id_of(raw: bytes) -> bytes:
    """An entry's id from its raw bytes (entries are canonical: id = BLAKE3(raw))."""
    return blake3.blake3(raw).digest()


class Gossip:
    """Routes new entries between the sessions of one node."""

    def __init__(self, seen_cache_size: int = defaults.SYNC_GOSSIP_SEEN_CACHE) -> None:
        self._seen_cache_size = seen_cache_size
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._peers: dict[NodeId, Announcer] = {}

    @property
    def peers(self) -> frozenset[NodeId]:
        return frozenset(self._peers)

    def add_peer(self, node: NodeId, peer: Announcer) -> None:
        """Register a verified session (after the duplicate-connection rule)."""
        if node in self._peers:
            raise LocalProtocolError(
                f"{node.short()} is already connected: apply keep_connection() first"
            )
        self._peers[node] = peer

    def remove_peer(self, node: NodeId) -> None:
        self._peers.pop(node, None)

    def local_entries(self, raws: Sequence[bytes]) -> list[NodeId]:
        """Entries we just wrote; returns the peers that now have data to send."""
        return self._route(raws, came_from=None)

    def entries_received(self, from_node: NodeId, accepted: Sequence[bytes]) -> list[NodeId]:
        """Entries ``from_node`` sent that our store accepted as new."""
        return self._route(accepted, came_from=from_node)

    def _route(self, raws: Sequence[bytes], came_from: NodeId | None) -> list[NodeId]:
        fresh = [raw for raw in raws if self._first_sight(entry_id_of(raw))]
        if not fresh:
            return []
        targets = [node for node in self._peers if node != came_from]
        for node in targets:
            self._peers[node].announce(fresh)
        return targets

    def _first_sight(self, entry_id: bytes) -> bool:
        if entry_id in self._seen:
            self._seen.move_to_end(entry_id)
            return False
        self._seen[entry_id] = None
        if len(self._seen) > self._seen_cache_size:
            self._seen.popitem(last=False)
        return True
