"""Setting a device up from code: what ``p2psync init``, ``group create`` and ``join`` do.

These are the library's counterparts of the CLI's first commands, so an app
can create and pair a device without a shell:

    home = p2psync.init("~/.local/share/myapp/p2psync", name="laptop")
    p2psync.create_group(home)                      # first device
    await p2psync.join_group(home, ticket)           # every other device (or a short code)
    async with p2psync.open_node(home, p2psync.options_from_config(home)) as node: ...

:func:`options_from_config` reads ``HOME/config.toml`` (listen address,
static peers recorded by ``join``, home relay) exactly as ``p2psync daemon``
does; :func:`p2psync.open_node` with no options uses only built-in defaults.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from p2psync import ops
from p2psync.crypto.group import group_id_text
from p2psync.errors import ConfigError
from p2psync.home import Home
from p2psync.join import Joined
from p2psync.join import join_group as _join_group
from p2psync.node import NodeOptions


def _home(home: Home | Path | str) -> Home:
    return home if isinstance(home, Home) else Home(Path(home).expanduser())


def init(home: Home | Path | str, name: str = "", *, exist_ok: bool = False) -> Home:
    """Create a device identity in ``home`` (mode 0700); return the :class:`Home`.

    Refuses to overwrite an existing identity unless ``exist_ok`` (then the
    existing device is kept and returned).
    """
    home = _home(home)
    if home.exists():
        if exist_ok:
            return home
        home.load_identity()  # a clear error naming the device that is there
    home.init(os.urandom, name=name)
    return home


def create_group(home: Home | Path | str) -> str:
    """Start a new group with this device (the first one); return the group id."""
    secret = ops.create_group(_home(home), os.urandom)
    return group_id_text(secret.keys().group_id)


async def join_group(
    home: Home | Path | str,
    ticket: str,
    name: str = "",
    *,
    relay: str | None = None,
    lan: bool = True,
) -> Joined:
    """Join the group of the device that made ``ticket``: a ticket (:meth:`Node.invite`)
    or a short code (:meth:`Node.create_short_invite`).

    The inviter's node must be running and reachable. ``relay``
    (``NODEID@HOST:PORT``) is where to look a short code up and how to reach
    the inviter when its addresses fail (default: the ticket's relay, or the
    home's configured one for a short code); ``lan=False`` skips the mDNS
    search for a short code. On success the group secret is stored in
    ``home``, the inviter is recorded as a static peer in its config.toml
    (and its relay as ours if we had none), which :func:`options_from_config`
    then uses.
    """
    return await _join_group(_home(home), ticket, name, relay=relay, lan=lan)


def options_from_config(
    home: Home | Path | str,
    *,
    listen: str | None = None,
    peers: tuple[str, ...] = (),
    relay: str | None = None,
    mdns: bool = False,
) -> NodeOptions:
    """Node options from ``HOME/config.toml``, as ``p2psync daemon`` builds them.

    Arguments override (``listen``, ``relay``) or add to (``peers``) the
    file. mDNS is off unless asked for; the control socket is never served
    (that is the daemon's job).
    """
    from p2psync.daemon import options_for

    home = _home(home)
    if not home.exists():
        raise ConfigError(f"no device at {home.path}: call p2psync.init() first")
    options = options_for(home, listen=listen, peers=list(peers), mdns=mdns, relay=relay)
    return dataclasses.replace(options, control=False)


__all__ = ["Joined", "create_group", "init", "join_group", "options_from_config"]
