"""``p2psync daemon``: run a node in the foreground until SIGINT or SIGTERM.

Logs go to stderr (one line each, no keys or payloads). Listening address
and static peers come from ``config.toml``; flags override ``listen`` and add
to ``peers``. A ``ready`` log line names the NodeId and the bound address,
so scripts (and netsim) can wait for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys

import trio

from p2psync import defaults
from p2psync.home import Home
from p2psync.node import NodeOptions, StaticPeer, open_node, parse_host_port

log = logging.getLogger("p2psync.daemon")


def options_for(
    home: Home,
    *,
    listen: str | None,
    peers: list[str],
    mdns: bool = True,
    relay: str | None = None,
) -> NodeOptions:
    config = home.load_config()
    listen_text = listen or config.listen or f"0.0.0.0:{defaults.NODE_PORT}"
    static = [StaticPeer.parse(text) for text in (*config.peers, *peers)]
    unique = {peer.node_id: peer for peer in static}  # a flag wins over config
    return NodeOptions(
        listen=parse_host_port(listen_text),
        peers=tuple(unique.values()),
        control=True,
        mdns=mdns,
        relay=relay or config.relay,
    )


async def serve(home: Home, options: NodeOptions) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(home, options) as node:
            host, port = node.endpoint.local_address
            log.info("ready: node %s listening on %s:%d, %d static peer(s)",
                     node.node_id, host, port, len(options.peers))  # fmt: skip
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                break


async def _invite(home: Home, options: NodeOptions, lifetime: int, as_json: bool) -> int:
    async with open_node(home, options) as node:
        ticket = node.create_invite(lifetime)
        if as_json:
            print(json.dumps({"ticket": ticket.encode(), "expires": ticket.expires}), flush=True)
        else:
            print(ticket.encode(), flush=True)
            print(f"\nOn the new device: p2psync join TICKET  (waiting up to {lifetime // 60} min; "
                  "Ctrl-C to cancel)", file=sys.stderr, flush=True)  # fmt: skip
        with trio.move_on_at(trio.current_time() + lifetime) as scope:
            await node.joined.wait()
        if scope.cancelled_caught:
            print("p2psync: error: the invite expired unused", file=sys.stderr)
            return 1
        # Stay a moment so the new device's first sync finds us up.
        with trio.move_on_after(2):
            await trio.sleep_forever()
        print("a device joined", file=sys.stderr)
        return 0


def invite_and_wait(home: Home, *, lifetime: int, listen: str | None, as_json: bool) -> int:
    """``p2psync invite`` with no daemon: listen until one device joins or time runs out."""
    options = options_for(home, listen=listen, peers=[], mdns=False)
    options = dataclasses.replace(options, peers=(), control=False)
    code: int = trio.run(_invite, home, options, lifetime, as_json)
    return code


def run_daemon(
    home: Home,
    *,
    listen: str | None,
    peers: list[str],
    log_level: str,
    mdns: bool = True,
    relay: str | None = None,
) -> int:
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aioquic logs every handshake at INFO; ours already say what matters.
    logging.getLogger("quic").setLevel(max(logging.WARNING, logging.root.level))
    options = options_for(home, listen=listen, peers=peers, mdns=mdns, relay=relay)
    trio.run(serve, home, options)
    log.info("stopped")
    return 0
