"""The daemon's control methods: what a running node answers on its socket.

The same operations as the library API (:class:`p2psync.node.Node`), as
JSON. docs/control-api.md is the reference with examples; in short
(params -> result)::

    put        {key?, path | text | base64, content_type?, meta?, anonymous?, progress?}
                                           -> entry
    get        {target, output?, wait?, progress?}
                                           -> {path, size} | {size, base64, text?}
    ls         {}                          -> [entry, ...]      live keys (pending ones
                                                                with "progress")
    rm         {key}                       -> entry             the tombstone
    pull       {after?, limit?}            -> {changes: [entry, ...], cursor, more}
    status     {}                          -> node status (peers, transfers, relay, counters)
    peers      {}                          -> [peer, ...]
    devices    {}                          -> [device, ...]   the group's members: name,
                                                                NodeId, added by/when, last seen
    whoami     {}                          -> {node_id, name, group_id, home}
    invite     {lifetime?, short?}         -> {ticket, expires}, or with short: true
                                           {code, expires, relay, lan, relay_problem}
    revoke-invite {code}                   -> {revoked}        close an open short code
    subscribe  {after?, events?}           -> stream of events until cancel/EOF:
        entry-added {entry}   every entry after cursor ``after`` (backlog, then live)
        peer-connected {node_id, path, address}  peer-disconnected {node_id, reason}
        path-changed {node_id, path, previous}
        sync-progress {blob, key, bytes_done, bytes_total, rate, complete}
        events-dropped {count}  (this reader fell behind on the status events it asked for)

A client that hangs up cancels what it asked (the server watches every
connection). Writes (``put``, ``rm``) are shielded from that: their store
work runs in a worker thread that finishes anyway, and the shield makes sure
the node also announces the write to peers, so a client that leaves never
leaves a committed but unannounced value behind.

``entry`` is :meth:`p2psync.api.Change.to_json`. Paths are resolved by the
daemon, which runs as the same user (the socket is 0600). ``progress: true``
on put/get sends ``{"type": "progress", "bytes_done", "bytes_total", "rate"}``
events before the result.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from p2psync import defaults, ops
from p2psync.api import ProgressMeter, event_json
from p2psync.control.protocol import (
    SOCKET_NAME,
    ControlError,
    ErrorCode,
    JsonObject,
    param_bool,
    param_int,
    param_optional_str,
    param_str,
    param_str_list,
)
from p2psync.control.server import ControlServer, EmitEvent
from p2psync.pairing import (
    SHORT_CODE_MAX_LIFETIME,
    Device,
    JoinRefused,
    device_rows,
    devices_from_members,
)

if TYPE_CHECKING:
    from p2psync.node import Node

T = TypeVar("T")

EVENT_TYPES = (
    "entry-added",
    "peer-connected",
    "peer-disconnected",
    "path-changed",
    "sync-progress",
)


def _path(params: JsonObject, name: str) -> Path:
    return Path(param_str(params, name)).expanduser()


async def with_progress(
    emit: EmitEvent,
    enabled: bool,
    total: int | None,
    work: Callable[[ops.Progress | None], Awaitable[T]],
) -> T:
    """Run ``work(progress)``; if enabled, emit ``progress`` events while it runs.

    Each event is a :class:`~p2psync.api.TransferProgress` snapshot (bytes
    done, total, rate), at most every PROGRESS_EVENT_INTERVAL and only when
    it moved; a last one with ``finished: true`` follows the work.
    """
    if not enabled:
        return await work(None)
    meter = ProgressMeter(total)

    async def report() -> None:
        sent = -1
        while True:
            current = meter.progress
            if current.bytes_done != sent:
                sent = current.bytes_done
                await emit({"type": "progress", **current.to_json()})
            await trio.sleep(defaults.PROGRESS_EVENT_INTERVAL)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report)
        result = await work(meter)
        nursery.cancel_scope.cancel()
    await emit({"type": "progress", **meter.progress.to_json(), "finished": True})
    return result


def control_server_for(node: Node) -> ControlServer:
    async def put(params: JsonObject, emit: EmitEvent) -> Any:
        key = param_optional_str(params, "key")
        content_type = param_optional_str(params, "content_type")
        meta = params.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise ControlError(ErrorCode.BAD_PARAMS, "parameter 'meta' must be an object")
        sources = [name for name in ("path", "text", "base64") if params.get(name) is not None]
        if len(sources) != 1:
            raise ControlError(ErrorCode.BAD_PARAMS, "put needs exactly one of path, text, base64")
        source: ops.Source
        total: int | None
        if sources[0] == "path":
            path = _path(params, "path")
            total = path.stat().st_size if path.is_file() else None
            source = path
            if param_bool(params, "anonymous"):  # spooled stdin: the file name means nothing
                if key is None:
                    raise ControlError(ErrorCode.BAD_PARAMS, "an anonymous put needs a key")
                anonymous_key = key

                async def put_spool(progress: ops.Progress | None) -> Any:
                    with trio.CancelScope(shield=True):  # a write, once begun, completes
                        stored = await node.put_stream_from(
                            path, key=anonymous_key, progress=progress
                        )
                    return ops.entry_json(stored)

                return await with_progress(emit, param_bool(params, "progress"), total, put_spool)
        elif sources[0] == "text":
            source = param_str(params, "text").encode()
            total = len(source)
        else:
            try:
                source = base64.b64decode(param_str(params, "base64"), validate=True)
            except binascii.Error as exc:
                raise ControlError(ErrorCode.BAD_PARAMS, f"'base64' is not base64: {exc}") from None
            total = len(source)

        async def put_source(progress: ops.Progress | None) -> Any:
            with trio.CancelScope(shield=True):  # a write, once begun, completes
                change = await node.put(
                    source, key=key, meta=meta, content_type=content_type, progress=progress
                )
            return change.to_json()

        return await with_progress(emit, param_bool(params, "progress"), total, put_source)

    async def get(params: JsonObject, emit: EmitEvent) -> Any:
        target = param_str(params, "target")
        wait = param_bool(params, "wait")
        size = await node.locked(ops.value_size, node.store, target)  # a key or a blob id
        if params.get("output") is None:
            if size is not None and size > defaults.CONTROL_INLINE_MAX:  # checked before reading
                raise ControlError(
                    ErrorCode.TOO_LARGE,
                    f"{target} is {size} bytes; inline values are at most "
                    f"{defaults.CONTROL_INLINE_MAX}: pass 'output' (a path) instead",
                )
            data = await node.get(target, wait=wait)
            reply: JsonObject = {"size": len(data), "base64": base64.b64encode(data).decode()}
            with contextlib.suppress(UnicodeDecodeError):
                reply["text"] = data.decode()
            return reply
        output = _path(params, "output")

        async def write(progress: ops.Progress | None) -> int:
            return await node.get_to_path(target, output, wait=wait, progress=progress)

        written = await with_progress(emit, param_bool(params, "progress"), size, write)
        return {"path": str(output), "size": written}

    async def ls(params: JsonObject, emit: EmitEvent) -> Any:
        return await node.ls()

    async def rm(params: JsonObject, emit: EmitEvent) -> Any:
        with trio.CancelScope(shield=True):  # a write, once begun, completes
            return (await node.delete(param_str(params, "key"))).to_json()

    async def pull(params: JsonObject, emit: EmitEvent) -> Any:
        after = param_int(params, "after", 0)
        limit = param_int(
            params, "limit", defaults.PULL_DEFAULT_LIMIT, lo=1, hi=defaults.PULL_MAX_LIMIT
        )
        return (await node.pull(after=after, limit=limit)).to_json()

    async def invite(params: JsonObject, emit: EmitEvent) -> Any:
        lifetime = param_int(params, "lifetime", defaults.INVITE_LIFETIME, lo=10, hi=86_400)
        if param_bool(params, "short"):
            try:
                offered = await node.create_short_invite(min(lifetime, SHORT_CODE_MAX_LIFETIME))
            except JoinRefused as exc:
                raise ControlError(ErrorCode.BAD_PARAMS, str(exc)) from None
            return offered.to_json()
        ticket = node.create_invite(lifetime)
        return {"ticket": ticket.encode(), "expires": ticket.expires}

    async def revoke_invite(params: JsonObject, emit: EmitEvent) -> Any:
        return {"revoked": node.revoke_short_invite(param_str(params, "code"))}

    async def status(params: JsonObject, emit: EmitEvent) -> Any:
        return node.status()

    async def peers(params: JsonObject, emit: EmitEvent) -> Any:
        return [peer.to_json() for peer in node.peers()]

    async def devices(params: JsonObject, emit: EmitEvent) -> Any:
        def read() -> tuple[list[Device], dict[str, float]]:
            seen = {str(n): ms / 1000 for n, ms in node.store.peers_seen().items()}
            return devices_from_members(node.store.members()), seen

        members, stored_seen = await node.locked(read)
        peers = {peer.node_id: peer.to_json() for peer in node.peers()}
        return device_rows(members, str(node.node_id), peers, stored_seen, time.time())

    async def whoami(params: JsonObject, emit: EmitEvent) -> Any:
        state = node.status()
        return {
            "node_id": state["node_id"],
            "name": state["name"],
            "group_id": state["group_id"],
            "home": str(node.home.path),
        }

    async def subscribe(params: JsonObject, emit: EmitEvent) -> None:
        after = param_int(params, "after", 0)
        wanted = param_str_list(params, "events")
        types = set(EVENT_TYPES if wanted is None else wanted)
        unknown = sorted(types - set(EVENT_TYPES))
        if unknown or not types:
            raise ControlError(
                ErrorCode.BAD_PARAMS,
                f"unknown event type(s) {', '.join(unknown) or '(none given)'}; "
                f"known: {', '.join(EVENT_TYPES)}",
            )

        async def entries() -> None:
            async for change in node.subscribe(after=after):
                await emit({"type": "entry-added", "entry": change.to_json()})

        # The status stream is opened before anything is sent, so no event
        # between the start of the request and the first read is lost. It
        # queues only the types asked for: events-dropped counts only those,
        # and a client of entry-added alone never gets one.
        async with node.events() as events, trio.open_nursery() as nursery:
            events.only(types - {"entry-added"})
            if "entry-added" in types:
                nursery.start_soon(entries)
            async for event in events:
                await emit(event_json(event))

    return ControlServer(
        {
            "put": put,
            "get": get,
            "ls": ls,
            "rm": rm,
            "pull": pull,
            "status": status,
            "peers": peers,
            "devices": devices,
            "whoami": whoami,
            "invite": invite,
            "revoke-invite": revoke_invite,
        },
        {"subscribe": subscribe},
    )


async def serve_control_for(
    node: Node, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED
) -> None:
    await control_server_for(node).serve(node.home.path / SOCKET_NAME, task_status=task_status)
