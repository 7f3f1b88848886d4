"""Links to LAN peers that mDNS found, on loopback (mDNS itself is fed by hand, as
run_mdns calls it; tests/netsim/test_lan_pairing.py runs real mDNS in namespaces)."""

from __future__ import annotations

import os
from collections.abc import Callable

import trio

from p2psync.crypto.group import GroupSecret
from p2psync.discovery.mdns import DiscoveredPeer
from p2psync.home import Home
from p2psync.node import NodeOptions, open_node

from .conftest import wait_until

LOOPBACK = ("127.0.0.1", 0)


async def test_a_lan_link_that_breaks_is_dialed_again(make_home: Callable[..., Home]) -> None:
    """b knows a only from mDNS (no static peer, no relay) and a does not dial b: when
    their link breaks, only b's LAN re-dial can bring it back, and writes flow again."""
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    options = NodeOptions(listen=LOOPBACK, reconnect_min=0.2)
    with trio.fail_after(60):
        async with open_node(a_home, options) as a, open_node(b_home, options) as b:
            here = (("127.0.0.1", a.endpoint.local_address[1]),)
            b._mdns_peer(DiscoveredPeer(a.node_id, here, b"", "lo"))  # as run_mdns does
            await wait_until(b, lambda: a.node_id in b.active and b.node_id in a.active)
            first = b.active[a.node_id]
            assert next(p.path for p in b.peers() if p.node_id == str(a.node_id)) != "none"
            # The link breaks (a network blip): a closes it; nothing on a dials b.
            await a.active[b.node_id].conn.aclose(0, "test: the link breaks")
            await wait_until(b, lambda: b.active.get(a.node_id) not in (None, first))
            await a.put_bytes(b"after the blip", key="note")
            await wait_until(b, lambda: any(s.key == "note" and s.complete for s in b.store.live()))
            assert await b.get_bytes("note") == b"after the blip"
