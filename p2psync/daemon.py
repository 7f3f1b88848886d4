"""``p2psync daemon``: run a node in the foreground until SIGINT or SIGTERM.

Logs go to stderr (one line each, no keys or payloads). Listening address,
static peers, relay and mailbox mode come from ``config.toml``; flags
override ``listen``, ``relay`` and ``mailbox`` and add to ``peers``. A
``ready`` log line names the NodeId and the bound address, so scripts (and
netsim) can wait for it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from p2psync import defaults
from p2psync.home import Home
from p2psync.mailbox_sync import check_mode
from p2psync.node import NodeOptions, StaticPeer, open_node, parse_host_port
from p2psync.pairing import JoinRefused

log = logging.getLogger("p2psync.daemon")


def options_for(
    home: Home,
    *,
    listen: str | None,
    peers: list[str],
    mdns: bool = True,
    relay: str | None = None,
    relay_token_file: Path | None = None,
    mailbox: str | None = None,
) -> NodeOptions:
    config = home.load_config()
    listen_text = listen or config.listen or f"0.0.0.0:{defaults.NODE_PORT}"
    static = [StaticPeer.parse(text) for text in (*config.peers, *peers)]
    unique = {peer.node_id: peer for peer in static}  # a flag wins over config
    options = NodeOptions(
        listen=parse_host_port(listen_text),
        peers=tuple(unique.values()),
        control=True,
        mdns=mdns,
        relay=relay or config.relay,
        relay_token=home.relay_token(relay_token_file),  # the flag's file, else config's
    )
    mode = mailbox or config.mailbox  # the flag, else config's, else the node's default
    if mode is not None:
        check_mode(mode)
        options = dataclasses.replace(options, mailbox=mode)
    return options


async def serve(home: Home, options: NodeOptions) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(home, options) as node:
            host, port = node.endpoint.local_address
            log.info("ready: node %s listening on %s:%d, %d static peer(s)",
                     node.node_id, host, port, len(options.peers))  # fmt: skip
            async for signum in signals:
                log.info("stopping on %s", signal.Signals(signum).name)
                break


async def _invite(
    home: Home,
    options: NodeOptions,
    lifetime: int,
    show: Callable[[dict[str, Any]], None],
    *,
    short: bool,
    lan: bool,
) -> int:
    async with open_node(home, options) as node:
        if short:
            try:
                offered = await node.create_short_invite(lifetime, lan=lan)
            except JoinRefused as exc:  # raised here, not out of the node's nursery
                print(f"p2psync: error: {exc}", file=sys.stderr)
                return 1
            lifetime = offered.expires - int(time.time())
            show(offered.to_json())
        else:
            ticket = node.create_invite(lifetime)
            show({"ticket": ticket.encode(), "expires": ticket.expires})
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


def invite_and_wait(
    home: Home,
    *,
    lifetime: int,
    listen: str | None,
    show: Callable[[dict[str, Any]], None],
    short: bool = False,
    lan: bool = True,
    relay: str | None = None,
) -> int:
    """``p2psync invite`` with no daemon: listen until one device joins or time runs out.

    ``show`` prints the invite (``{ticket, expires}``, or a short code's
    :meth:`~p2psync.join.ShortInvite.to_json`) once it is open. A short code
    uses the home relay (config or ``relay``) and, with ``lan``, mDNS.
    """
    options = options_for(home, listen=listen, peers=[], mdns=False, relay=relay)
    options = dataclasses.replace(options, peers=(), control=False)
    code: int = trio.run(
        functools.partial(_invite, home, options, lifetime, show, short=short, lan=lan)
    )
    return code


def run_daemon(
    home: Home,
    *,
    listen: str | None,
    peers: list[str],
    log_level: str,
    mdns: bool = True,
    relay: str | None = None,
    relay_token_file: Path | None = None,
    mailbox: str | None = None,
) -> int:
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aioquic logs every handshake at INFO; ours already say what matters.
    logging.getLogger("quic").setLevel(max(logging.WARNING, logging.root.level))
    options = options_for(
        home, listen=listen, peers=peers, mdns=mdns, relay=relay,
        relay_token_file=relay_token_file, mailbox=mailbox,
    )  # fmt: skip
    trio.run(serve, home, options)
    log.info("stopped")
    return 0
