"""Node <-> node sync: sans-IO protocol logic (the trio/QUIC shell lives elsewhere).

- :mod:`p2psync.sync.session`        one connection: handshake, frontiers, entries, object wants
- :mod:`p2psync.sync.events`         what a session reports to its shell
- :mod:`p2psync.sync.gossip`         routing new entries between a node's sessions
- :mod:`p2psync.sync.object_stream`  both ends of the one-object-per-stream transfer
- :mod:`p2psync.sync.rules`          pure rules (which duplicate connection to keep)

Wire format: :mod:`p2psync.proto.messages`.
"""

from p2psync.sync.events import (
    EntriesReceived,
    Event,
    ObjectStored,
    ObjectWanted,
    PeerVerified,
    ProtocolViolation,
    SessionClosed,
)
from p2psync.sync.gossip import Gossip
from p2psync.sync.rules import keep_connection
from p2psync.sync.session import (
    ChallengeCache,
    ObjectClaims,
    SessionState,
    SyncConfig,
    SyncSession,
    SyncStore,
)

__all__ = [
    "ChallengeCache",
    "EntriesReceived",
    "Event",
    "Gossip",
    "ObjectClaims",
    "ObjectStored",
    "ObjectWanted",
    "PeerVerified",
    "ProtocolViolation",
    "SessionClosed",
    "SessionState",
    "SyncConfig",
    "SyncSession",
    "SyncStore",
    "keep_connection",
]
