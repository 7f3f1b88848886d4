"""p2psync: peer-to-peer, end-to-end encrypted, local-first sync for your own devices.

The library API (docs/library-api.md)::

    import p2psync

    home = p2psync.init("/path/to/home", name="laptop")
    p2psync.create_group(home)
    async with p2psync.open_node(home) as node:
        await node.put(b"buy milk", key="notes/today")
        page = await node.pull(after=0)
        async for change in node.subscribe(after=page.cursor):
            ...

Everything named in ``__all__`` is importable from ``p2psync`` directly; the
names load on first use, so ``import p2psync.proto`` (relayd) stays light.
(Joining is ``join_group``: ``p2psync.join`` is the module that implements it.)

Layout (dependencies point down; relayd imports only ``proto`` and ``crypto``):

- :mod:`p2psync.library`  init, create_group, join_group, options_from_config
- :mod:`p2psync.node`     open_node(): a running node; the :class:`Node` methods
- :mod:`p2psync.api`      the values a node hands out (Change, PullResult, ...)
- :mod:`p2psync.control`  the daemon's control socket (JSON lines)
- :mod:`p2psync.crypto`   identity, group keys, AEAD, passphrases, codes
- :mod:`p2psync.proto`    wire formats: msgpack codec, signed entries
- :mod:`p2psync.store`    the local store: feeds, sealed objects, index
- :mod:`p2psync.home`     a device's home directory: keys, config, store
- :mod:`p2psync.cli`      the command line (the only reader of env and exit codes)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "open_node": "p2psync.node",
    "Node": "p2psync.node",
    "NodeOptions": "p2psync.node",
    "StaticPeer": "p2psync.node",
    "init": "p2psync.library",
    "create_group": "p2psync.library",
    "join_group": "p2psync.library",
    "options_from_config": "p2psync.library",
    "Joined": "p2psync.library",
    "ShortInvite": "p2psync.join",
    "JoinRefused": "p2psync.pairing",
    "Change": "p2psync.api",
    "PullResult": "p2psync.api",
    "PeerStatus": "p2psync.api",
    "Transfer": "p2psync.api",
    "TransferProgress": "p2psync.api",
    "ProgressMeter": "p2psync.api",
    "Subscription": "p2psync.api",
    "BlobReader": "p2psync.api",
    "NodeEvent": "p2psync.api",
    "PeerConnected": "p2psync.api",
    "PeerDisconnected": "p2psync.api",
    "PathChanged": "p2psync.api",
    "SyncProgress": "p2psync.api",
    "EventsDropped": "p2psync.api",
    "Home": "p2psync.home",
    "P2PSyncError": "p2psync.errors",
    "NotFound": "p2psync.errors",
    "ConfigError": "p2psync.errors",
    "LocalProtocolError": "p2psync.errors",
    "BlobPending": "p2psync.store",
}

if TYPE_CHECKING:
    from p2psync.api import (
        BlobReader,
        Change,
        EventsDropped,
        NodeEvent,
        PathChanged,
        PeerConnected,
        PeerDisconnected,
        PeerStatus,
        ProgressMeter,
        PullResult,
        Subscription,
        SyncProgress,
        Transfer,
        TransferProgress,
    )
    from p2psync.errors import ConfigError, LocalProtocolError, NotFound, P2PSyncError
    from p2psync.home import Home
    from p2psync.join import ShortInvite
    from p2psync.library import Joined, create_group, init, join_group, options_from_config
    from p2psync.node import Node, NodeOptions, StaticPeer, open_node
    from p2psync.pairing import JoinRefused
    from p2psync.store import BlobPending


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'p2psync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "BlobPending",
    "BlobReader",
    "Change",
    "ConfigError",
    "EventsDropped",
    "Home",
    "JoinRefused",
    "Joined",
    "LocalProtocolError",
    "Node",
    "NodeEvent",
    "NodeOptions",
    "NotFound",
    "P2PSyncError",
    "PathChanged",
    "PeerConnected",
    "PeerDisconnected",
    "PeerStatus",
    "ProgressMeter",
    "PullResult",
    "ShortInvite",
    "StaticPeer",
    "Subscription",
    "SyncProgress",
    "Transfer",
    "TransferProgress",
    "__version__",
    "create_group",
    "init",
    "join_group",
    "open_node",
    "options_from_config",
]
