"""The daemon's control methods: what a running node answers on its socket.

Methods (params -> result; errors carry the codes of
:class:`p2psync.control.protocol.ErrorCode`)::

    put        {path, key?, anonymous?}  -> entry         store a file the caller can read
                                            (anonymous: keep no file name, key required)
    get        {target, output}          -> {path, size}  write a key's value (or a blob) out
    ls         {}                        -> [entry, ...]  current value of every key
    rm         {key}                     -> entry         tombstone a key
    status     {}                        -> node status (peers, paths, counters)
    invite     {lifetime?}               -> {ticket, expires}  a one-time join ticket
    whoami     {}                        -> {node_id, name, group_id, home}
    subscribe  {after?}                  -> events {type: "entry-added", entry} for every
                                            entry after cursor ``after``, then live ones

``entry`` is the JSON shape of :func:`p2psync.ops.entry_json`. Paths are
resolved by the daemon, which runs as the same user (the socket is 0600).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from p2psync import defaults, ops
from p2psync.control.protocol import (
    SOCKET_NAME,
    ControlError,
    ErrorCode,
    JsonObject,
    param_int,
    param_optional_str,
    param_str,
)
from p2psync.control.server import ControlServer, EmitEvent

if TYPE_CHECKING:
    from p2psync.node import Node


def _path(params: JsonObject, name: str) -> Path:
    return Path(param_str(params, name)).expanduser()


def control_server_for(node: Node) -> ControlServer:
    async def put(params: JsonObject) -> Any:
        key = param_optional_str(params, "key")
        path = _path(params, "path")
        if params.get("anonymous") is True:  # spooled stdin: the file name means nothing
            if key is None:
                raise ControlError(ErrorCode.BAD_PARAMS, "an anonymous put needs a key")
            stored = await node.put_stream_from(path, key=key)
        else:
            stored = await node.put_path(path, key=key)
        return ops.entry_json(stored)

    async def get(params: JsonObject) -> Any:
        output = _path(params, "output")
        size = await node.get_to_path(param_str(params, "target"), output)
        return {"path": str(output), "size": size}

    async def ls(params: JsonObject) -> Any:
        return await node.ls()

    async def rm(params: JsonObject) -> Any:
        return ops.entry_json(await node.delete(param_str(params, "key")))

    async def invite(params: JsonObject) -> Any:
        lifetime = param_int(params, "lifetime", defaults.INVITE_LIFETIME, lo=10, hi=86_400)
        ticket = node.create_invite(lifetime)
        return {"ticket": ticket.encode(), "expires": ticket.expires}

    async def status(params: JsonObject) -> Any:
        return node.status()

    async def whoami(params: JsonObject) -> Any:
        state = node.status()
        return {
            "node_id": state["node_id"],
            "name": state["name"],
            "group_id": state["group_id"],
            "home": str(node.home.path),
        }

    async def subscribe(params: JsonObject, emit: EmitEvent) -> None:
        cursor = param_int(params, "after", 0)
        while True:
            changed = node.changes()  # taken before pulling: no change slips between
            page, cursor = await node.locked(node.store.pull, cursor, 256)
            for stored in page:
                await emit({"type": "entry-added", "entry": ops.entry_json(stored)})
            if not page:
                await changed.wait()

    return ControlServer(
        {
            "put": put,
            "get": get,
            "ls": ls,
            "rm": rm,
            "status": status,
            "whoami": whoami,
            "invite": invite,
        },
        {"subscribe": subscribe},
    )


async def serve_control_for(
    node: Node, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    await control_server_for(node).serve(node.home.path / SOCKET_NAME, task_status=task_status)
