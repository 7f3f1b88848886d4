"""The ``p2psync`` command line.

The only module that reads environment variables, decides exit codes and
prints for humans. Every command that prints data takes ``--json``.

Exit codes: 0 success; 1 a user-facing error (one line on stderr, no
traceback); 2 bad usage (argparse); 130 interrupted.

Environment: ``P2PSYNC_HOME`` sets the home when ``--home`` is not given.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from p2psync import __version__, ops, terminal
from p2psync.control.client import ControlClient, connect_if_running
from p2psync.crypto.codes import has_prefix
from p2psync.crypto.group import group_id_text
from p2psync.defaults import NETCHECK_ALT_PORT_OFFSET
from p2psync.errors import P2PSyncError
from p2psync.home import Home, default_home
from p2psync.pairing import (
    SHORT_CODE_MAX_LIFETIME,
    TICKET_PREFIX,
    device_rows,
    devices_from_members,
)
from p2psync.proto.entry import Kind
from p2psync.store import Meta


class UserError(P2PSyncError):
    """A mistake in what the user asked for."""


def _home(args: argparse.Namespace) -> Home:
    if args.home:
        return Home(Path(args.home).expanduser())
    env = os.environ.get("P2PSYNC_HOME")
    return Home(Path(env).expanduser() if env else default_home())


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif human:
        print(human)


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --- commands ------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    home = _home(args)
    identity = home.init(os.urandom, name=args.name or "")
    _emit(
        args,
        {"node_id": str(identity.node_id), "home": str(home.path)},
        f"{identity.node_id}\n(new device in {home.path}; next: `p2psync group create` "
        "or `p2psync join CODE`)",
    )
    return 0


def cmd_group_create(args: argparse.Namespace) -> int:
    home = _home(args)
    secret = home.create_group(os.urandom)
    gid = group_id_text(secret.keys().group_id)
    with home.open_store() as store:
        name = home.load_config().name
        store.append(
            Kind.MEMBER,
            Meta(key="", content_type="device", name=name,
                 app={"node_id": str(store.identity.node_id)}),
            now_ms=ops.now_ms(),
        )  # fmt: skip
    _emit(args, {"group_id": gid, "epoch": secret.epoch}, f"created group {gid}")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    home = _home(args)
    identity = home.load_identity()
    secrets = home.load_secrets()
    group = group_id_text(secrets[0].keys().group_id) if secrets else None
    name = home.load_config().name
    _emit(
        args,
        {"node_id": str(identity.node_id), "name": name, "group_id": group, "home": str(home.path)},
        f"node   {identity.node_id}\nname   {name or '-'}\ngroup  {group or '(none)'}\n"
        f"home   {home.path}",
    )
    return 0


def _daemon(home: Home) -> ControlClient | None:
    """A client of this home's running daemon, or None to work on the store directly."""
    return connect_if_running(home.path)


def _put_stdin_via(daemon: ControlClient, home: Home, key: str, no_progress: bool) -> Any:
    """Spool stdin to an owner-only temp file in the home, let the daemon put it."""
    fd, name = tempfile.mkstemp(prefix="stdin-", dir=home.path)
    try:
        with os.fdopen(fd, "wb") as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool, length=1 << 20)
        size = Path(name).stat().st_size
        return _daemon_transfer(daemon, "put", {"path": name, "key": key, "anonymous": True},
                                f"put {key}", size, no_progress)  # fmt: skip
    finally:
        Path(name).unlink(missing_ok=True)


def _daemon_transfer(
    daemon: ControlClient,
    method: str,
    params: dict[str, Any],
    label: str,
    size: int | None,
    no_progress: bool,
) -> Any:
    """A put/get through the daemon, with a progress bar on a terminal."""
    enabled = terminal.wants_progress(size, disabled=no_progress)
    with terminal.transfer_bar(label, size, enabled=enabled) as update:

        def on_event(event: dict[str, Any]) -> None:
            update(int(event.get("bytes_done", 0)))

        return daemon.call(method, {**params, "progress": enabled}, on_event=on_event)


def cmd_put(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.path != "-" and not Path(args.path).is_file():
        raise UserError(f"{args.path} is not a readable file")
    if args.path == "-" and not args.key:
        raise UserError("reading from stdin needs --key KEY")
    size = None if args.path == "-" else Path(args.path).stat().st_size
    label = f"put {args.key or Path(args.path).name}"
    daemon = _daemon(home)
    if daemon is not None:
        with daemon:
            if args.path == "-":
                row = _put_stdin_via(daemon, home, args.key, args.no_progress)
            else:
                params = {"path": str(Path(args.path).resolve()), "key": args.key}
                row = _daemon_transfer(daemon, "put", params, label, size, args.no_progress)
        _emit(args, row, f"put {row['key']} ({_human_size(row['size'])}) blob {row['blob'][:16]}")
        return 0
    enabled = terminal.wants_progress(size, disabled=args.no_progress)
    with home.open_store() as store, terminal.transfer_bar(label, size, enabled=enabled) as bar:
        if args.path == "-":
            stored = ops.put_stream(store, sys.stdin.buffer, key=args.key, progress=bar)
        else:
            stored = ops.put_path(store, Path(args.path), key=args.key, progress=bar)
    size = stored.entry.size
    _emit(
        args,
        ops.entry_json(stored),
        f"put {stored.key} ({_human_size(size)}) blob {stored.entry.blob.hex()[:16]}",
    )
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    home = _home(args)
    with home.open_store() as store:
        size = ops.blob_size(store, args.target)
        label = f"get {args.target if size is not None else args.target[:16]}"
        enabled = terminal.wants_progress(size, disabled=args.no_progress)
        if args.output in (None, "-"):
            out = sys.stdout.buffer
            with terminal.transfer_bar(label, size, enabled=enabled) as bar:
                done = 0
                for chunk in store.iter_blob(ops.resolve_blob(store, args.target)):
                    out.write(chunk)
                    done += len(chunk)
                    bar(done)
            out.flush()
            return 0
        target = Path(args.output)
        daemon = _daemon(home)
        if daemon is not None:
            with daemon:
                params = {"target": args.target, "output": str(target.resolve())}
                reply = _daemon_transfer(daemon, "get", params, label, size, args.no_progress)
            written = int(reply["size"])
        else:
            with terminal.transfer_bar(label, size, enabled=enabled) as bar:
                written = ops.get_to_path(store, args.target, target, progress=bar)
    if args.json:
        _emit(args, {"path": str(target), "size": written}, "")
    else:
        print(f"wrote {target} ({_human_size(written)})", file=sys.stderr)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    home = _home(args)
    daemon = _daemon(home)
    if daemon is not None:
        with daemon:
            rows = daemon.call("ls")
    else:
        with home.open_store() as store:
            rows = ops.list_live(store)
    if args.json:
        _emit(args, rows, "")
        return 0
    if not rows:
        print("(empty)")
        return 0
    width = max(len(row["key"] or "") for row in rows)
    for row in rows:
        status = row["status"]
        if "progress" in row:
            status += f" {row['progress']['chunks_done']}/{row['progress']['chunks_total']}"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time_ms"] / 1000))
        print(
            f"{(row['key'] or ''):<{width}}  {_human_size(row['size']):>10}  {when}  "
            f"{row['author'][:10]}  {status}"
        )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    home = _home(args)
    daemon = _daemon(home)
    if daemon is not None:
        with daemon:
            row = daemon.call("rm", {"key": args.key})
        _emit(args, row, f"removed {args.key}")
        return 0
    with home.open_store() as store:
        stored, freed = ops.remove(store, args.key)
    _emit(args, {**ops.entry_json(stored), "objects_removed": freed}, f"removed {args.key}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    home = _home(args)
    daemon = _daemon(home)
    if daemon is None:
        identity = home.load_identity()
        state: dict[str, Any] = {
            "node_id": str(identity.node_id),
            "running": False,
            "peers": [],
        }
        _emit(args, state, f"node   {identity.node_id}\ndaemon not running "
              "(start it with `p2psync daemon`)")  # fmt: skip
        return 0
    with daemon:
        state = daemon.call("status")
        state["running"] = True
        if args.watch:
            return _watch_status(args, daemon)
    if args.json:
        _emit(args, state, "")
        return 0
    _print_status(state)
    return 0


def _watch_status(args: argparse.Namespace, daemon: ControlClient) -> int:
    """``status --watch``: redraw in place on a terminal; else one snapshot per interval."""

    def fetch() -> dict[str, Any]:
        state: dict[str, Any] = daemon.call("status")
        state["running"] = True
        return state

    try:
        if sys.stdout.isatty() and not args.json:
            terminal.watch_status(fetch, interval=args.interval)
        while True:
            state = fetch()
            if args.json:
                print(json.dumps(state, sort_keys=True), flush=True)  # one line each: JSON lines
            else:
                _print_status(state)
                print(flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0


def _print_status(state: dict[str, Any]) -> None:
    print(f"node      {state['node_id']}  {state.get('name') or ''}")
    print(f"group     {state.get('group_id') or '(none)'}")
    print(f"listening {', '.join(state['listening'])}")
    print(f"lan       {state.get('mdns', 'off')}")
    relay = state.get("relay")
    if relay:
        link = "connected" if relay["connected"] else "not connected"
        rtt = f", rtt {relay['rtt_ms']:.1f} ms" if relay.get("rtt_ms") is not None else ""
        public = (
            f", public address {relay['public_address']}" if relay.get("public_address") else ""
        )
        refused = relay.get("last_error") if not relay["connected"] else None
        why = f"  last error: {refused}" if refused else ""  # e.g. BAD_AUTH: wrong token
        fast = ", UDP fast path" if relay.get("fast_path") else ""  # relayed packets as UDP
        print(f"relay     {relay['relay'][:16]}… {link}{rtt}{public}{fast}{why}")
    nat = state.get("nat")
    if nat and nat.get("netcheck"):
        print(f"nat       {nat['nat']}: {nat['explain']}")
    mailbox = state.get("mailbox")
    if mailbox:
        head = mailbox.get("head")
        pending = mailbox.get("pending_uploads")
        line = (
            f"mailbox   {mailbox['state']} ({mailbox['mode']}), cursor {mailbox['pull_cursor']}"
            f" of {'?' if head is None else head}, {'?' if pending is None else pending} to upload"
        )
        if mailbox.get("quota_bytes") and mailbox.get("quota_used") is not None:
            line += (
                f", {_human_size(mailbox['quota_used'])} of "
                f"{_human_size(mailbox['quota_bytes'])} used"
            )
        if mailbox.get("last_error"):
            line += f"  last error: {mailbox['last_error']}"
        print(line)
    peers = state["peers"]
    print(f"peers     {len(peers)}")
    for peer in peers:
        rtt = f"{peer['rtt_ms']:.1f} ms" if peer.get("rtt_ms") is not None else "-"
        line = (
            f"  {peer['node_id'][:16]}  {peer['path']:<7} {peer.get('address') or '-':<22} "
            f"rtt {rtt:<9} in {_human_size(peer['bytes_in'])} out {_human_size(peer['bytes_out'])}"
        )
        if peer.get("path_since") and peer["path"] != "none":
            line += f"  since {time.strftime('%H:%M:%S', time.localtime(peer['path_since']))}"
        if peer.get("last_direct_failure") and peer["path"] in ("relay", "none"):
            line += f"  not direct: {peer['last_direct_failure']}"
        if peer.get("last_error"):
            line += f"  last error: {peer['last_error']}"
        print(line)
    for transfer in state.get("transfers") or []:
        total = max(1, transfer["bytes_total"])
        print(f"incoming  {transfer.get('key') or transfer['blob'][:16]}  "
              f"{_human_size(transfer['bytes_done'])} of {_human_size(transfer['bytes_total'])} "
              f"({100 * transfer['bytes_done'] // total}%), "
              f"{_human_size(int(transfer['rate']))}/s")  # fmt: skip


def cmd_netcheck(args: argparse.Namespace) -> int:
    """STUN to the relay's two ports from a fresh socket: NAT kind, public address, hairpin."""
    import trio

    from p2psync.doctor import format_netcheck
    from p2psync.net.netcheck_shell import netcheck_on_new_socket
    from p2psync.net.relay_client import parse_relay_address

    text = args.relay
    if text is None:
        text = _home(args).load_config().relay
        if text is None:
            raise UserError("no relay to ask: give --relay HOST:PORT or set relay in config.toml")
    _, server = parse_relay_address(text)
    alt = args.alt_port if args.alt_port is not None else server[1] + NETCHECK_ALT_PORT_OFFSET
    report = trio.run(netcheck_on_new_socket, server, alt)
    data = {**report.to_json(), "explain": report.explain()}
    _emit(args, data, format_netcheck(data, report.explain()))
    return 0 if report.answered else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    """Why is this peer (not) direct? Both NAT kinds, the candidates tried, a verdict."""
    from p2psync.doctor import diagnose, find_peer, format_doctor

    daemon = _daemon(_home(args))
    if daemon is None:
        raise UserError("doctor asks the running daemon: start it with `p2psync daemon`")
    with daemon:
        state = daemon.call("status")
    report = diagnose(state, find_peer(state, args.node_id))
    _emit(args, report, format_doctor(report))
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from p2psync.daemon import run_daemon

    return run_daemon(_home(args), listen=args.listen, peers=args.peer or [],
                      log_level=args.log_level, mdns=not args.no_mdns,
                      relay=args.relay, relay_token_file=args.relay_token_file,
                      mailbox=args.mailbox)  # fmt: skip


def _parse_duration(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except ValueError:
        raise UserError(f"{text!r} is not a duration like 90s, 10m or 1h") from None
    if not 10 <= seconds <= 24 * 3600:
        raise UserError("an invite lasts between 10 seconds and 24 hours")
    return seconds


def _qr(text: str) -> str:
    """``text`` as a QR code of Unicode half blocks (segno; light modules drawn, so it
    scans from a dark terminal too). Tickets are base32: upper case fits QR's
    denser alphanumeric mode, and the parser ignores case."""
    import io

    import segno

    out = io.StringIO()
    segno.make(text.upper(), error="m", micro=False).terminal(out=out, compact=True, border=2)
    return out.getvalue()


def _when(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))


def _show_invite(args: argparse.Namespace, reply: dict[str, Any], waits: bool) -> None:
    """Print a ticket or short code the way ``invite`` promises; JSON as it came."""
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True), flush=True)
        return
    text = reply.get("code") or reply["ticket"]
    if args.qr:
        print(_qr(text), flush=True)
    print(text, flush=True)
    who = "this command" if waits else "the running daemon"
    lines = [f"\nOn the new device: p2psync join {'CODE' if 'code' in reply else 'TICKET'}"
             f"  (once, until {_when(reply['expires'])}; {who} answers"
             f"{', Ctrl-C to cancel' if waits else ''})"]  # fmt: skip
    if "code" in reply:
        if reply.get("relay"):
            lines.append(f"  via relay {reply['relay'].split('@')[0][:16]}…: the joiner needs the "
                         "same relay (its config, or join --relay)")  # fmt: skip
        elif reply.get("relay_problem"):
            lines.append(f"  not on a relay: {reply['relay_problem']}")
        lines.append(f"  on this LAN: {reply.get('lan', 'off')}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def _revoke_invite(args: argparse.Namespace, home: Home) -> int:
    """``invite --revoke CODE``: close an open short code or ticket in the running daemon."""
    from p2psync.pairing import ShortCode, decode_ticket_untrusted

    text = args.revoke.strip()
    if has_prefix(text, TICKET_PREFIX):
        decode_ticket_untrusted(text)  # a typo is caught here, not by the daemon
    else:
        ShortCode.parse_untrusted(text)
    daemon = _daemon(home)
    if daemon is None:
        raise UserError(
            "no daemon is running: an invite made by `p2psync invite` without a daemon "
            "ends when that command stops (Ctrl-C it)"
        )
    with daemon:
        reply = daemon.call("revoke-invite", {"code": text})
    if not reply.get("revoked"):
        raise UserError(
            "this invite is not open (used, expired or revoked already, or a device is "
            "joining with it right now)"
        )
    _emit(args, reply, "revoked: the invite no longer works (a short code is also "
                       "withdrawn from the relay and the LAN)")  # fmt: skip
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.revoke is not None:
        return _revoke_invite(args, home)
    lifetime = _parse_duration(args.expires)
    if args.short and lifetime > SHORT_CODE_MAX_LIFETIME:
        raise UserError(f"a short code lasts at most {SHORT_CODE_MAX_LIFETIME // 60} minutes")
    daemon = _daemon(home)
    if daemon is not None:
        with daemon:
            reply = daemon.call("invite", {"lifetime": lifetime, "short": args.short})
        _show_invite(args, reply, waits=False)
        return 0
    from p2psync.daemon import invite_and_wait

    return invite_and_wait(
        home,
        lifetime=lifetime,
        listen=args.listen,
        show=lambda reply: _show_invite(args, reply, waits=True),
        short=args.short,
        lan=not args.no_mdns,
        relay=args.relay,
    )


def cmd_join(args: argparse.Namespace) -> int:
    import trio

    from p2psync.join import join_group

    home = _home(args)
    joined = trio.run(
        functools.partial(
            join_group,
            home,
            args.code,
            args.name or "",
            relay=args.relay,
            lan=not args.no_mdns,
        )
    )
    where = f"{joined.address[0]}:{joined.address[1]}" if joined.address else "the relay"
    hint = ""
    if joined.relay and home.load_config().relay == joined.relay:
        hint = f"\nhome relay: {joined.relay} (the inviter's; saved in {home.config_file})"
    _emit(
        args,
        {"group_id": joined.group_id, "inviter": joined.inviter, "via": joined.via,
         "address": where if joined.address else None, "relay": joined.relay},
        f"joined group {joined.group_id} (inviter reached at {where})\n"
        f"(the inviter is now a peer in {home.config_file}; run `p2psync daemon` to sync)"
        + hint,
    )  # fmt: skip
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    home = _home(args)
    with home.open_store() as store:
        devices = devices_from_members(store.members())
        ours = str(store.identity.node_id)
        # What the daemon wrote (at most once a minute per peer, and when it stopped).
        stored_seen = {str(n): ms / 1000 for n, ms in store.peers_seen().items()}
    seen: dict[str, Any] = {}
    running = False
    daemon = _daemon(home)
    if daemon is not None:
        with daemon:
            state = daemon.call("status")
        running = True
        for peer in state.get("peers", []):
            seen[peer["node_id"]] = peer
    rows = device_rows(devices, ours, seen, stored_seen, time.time())
    if args.json:
        _emit(args, rows, "")
        return 0
    if not rows:
        print("(no devices recorded: this device is in no group yet)")
        return 0
    width = max(len(row["name"] or "-") for row in rows)
    for row in rows:
        added_by = row["added_by"]
        origin = "created the group" if added_by is None else f"added by {added_by[:10]}"
        if row["this_device"]:
            seen_text = "this device"
        elif row["connected"]:
            seen_text = f"connected ({row['path']})"
        elif row["last_seen"]:
            seen_text = "last seen " + time.strftime(
                "%Y-%m-%d %H:%M", time.localtime(row["last_seen"])
            )
        else:
            seen_text = "never seen connected" + ("" if running else " (daemon not running)")
        added = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["added_ms"] / 1000))
        print(f"{(row['name'] or '-'):<{width}}  {row['node_id'][:16]}  {origin:<20}  "
              f"{added}  {seen_text}")  # fmt: skip
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    with _home(args).open_store() as store:
        result = store.gc()
    _emit(
        args,
        {"objects_removed": result.objects_removed, "bytes_removed": result.bytes_removed},
        f"removed {result.objects_removed} objects ({_human_size(result.bytes_removed)})",
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from p2psync.demo import run_demo

    return run_demo(keep=args.keep)


# --- parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    def common_options(default: Any) -> argparse.ArgumentParser:
        # The same options are accepted before and after the command; the
        # sub-command copies default to SUPPRESS so they don't undo the first.
        options = argparse.ArgumentParser(add_help=False)
        options.add_argument(
            "--home",
            default=default,
            help="device home directory (default: $P2PSYNC_HOME or the user data dir)",
        )
        options.add_argument(
            "--json",
            action="store_true",
            default=default or False,
            help="print machine-readable JSON",
        )
        return options

    common = common_options(argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="p2psync",
        description="Peer-to-peer, end-to-end encrypted, local-first sync for your devices.",
        parents=[common_options(None)],
    )
    parser.add_argument("--version", action="version", version=f"p2psync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> Any:
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        command.set_defaults(handler=handler)
        return command

    init = add("init", cmd_init, "create this device's identity")
    init.add_argument("--name", help="a name for this device, shown to your other devices")

    group = add("group", lambda _: 2, "manage this device's group")
    group_sub = group.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    create = group_sub.add_parser("create", help="start a new group with this device",
                                  parents=[common])  # fmt: skip
    create.set_defaults(handler=cmd_group_create)

    add("whoami", cmd_whoami, "show this device's NodeId, name and group")

    put = add("put", cmd_put, "store a file (or - for stdin) under a key")
    put.add_argument("path", help="file to store, or - to read stdin")
    put.add_argument("--key", help="the key to store it under (default: the file name)")
    put.add_argument("--no-progress", action="store_true",
                     help="no progress bar (drawn on a terminal for large files)")  # fmt: skip

    get = add("get", cmd_get, "write the current value of a key (or a blob id) out")
    get.add_argument("target", metavar="KEY|BLOB", help="a key from `ls`, or a 64-hex blob id")
    get.add_argument("-o", "--output", help="write to this file (default: stdout)")
    get.add_argument("--no-progress", action="store_true",
                     help="no progress bar (drawn on stderr only if it is a terminal)")  # fmt: skip

    add("ls", cmd_ls, "list keys and their current values")

    rm = add("rm", cmd_rm, "delete a key (a signed tombstone that syncs like any write)")
    rm.add_argument("key")

    add("gc", cmd_gc, "delete stored objects that no current value references")

    status = add("status", cmd_status, "show the running daemon's peers, paths and counters")
    status.add_argument("--watch", action="store_true",
                        help="keep showing it, with transfer progress (Ctrl-C stops)")  # fmt: skip
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="how often --watch refreshes (default 1)")  # fmt: skip

    invite = add("invite", cmd_invite, "print a one-time ticket or short code for a new device")
    invite.add_argument("--expires", default="10m", help="how long it lasts (default 10m)")
    invite.add_argument("--short", action="store_true",
                        help="a 16-character code XXXX-XXXX-XXXX-XXXX (via the relay and the "
                        "LAN; at most 10m) instead of a long ticket")  # fmt: skip
    invite.add_argument("--qr", action="store_true", help="also show it as a QR code")
    invite.add_argument("--revoke", metavar="CODE",
                        help="close an open short code or ticket of the running daemon "
                        "instead of making one")  # fmt: skip
    invite.add_argument("--listen", metavar="HOST:PORT",
                        help="without a daemon: where to wait for the joiner")  # fmt: skip
    invite.add_argument("--relay", metavar="[NODEID@]HOST:PORT",
                        help="without a daemon: the relay to use (default: config)")  # fmt: skip
    invite.add_argument(
        "--no-mdns",
        action="store_true",
        help="without a daemon: do not announce a short code on the LAN",
    )

    join = add("join", cmd_join, "join the group of the device that printed CODE")
    join.add_argument("code", metavar="CODE", help="a ticket (p2pt...) or a short code")
    join.add_argument("--name", help="a name for this device, shown to the others")
    join.add_argument(
        "--relay",
        metavar="[NODEID@]HOST:PORT",
        help="where to look a short code up (default: relay in config.toml)",
    )
    join.add_argument("--no-mdns", action="store_true",
                      help="do not look for a short code's inviter on the LAN")  # fmt: skip

    add("devices", cmd_devices, "list the devices of this group (name, NodeId, added by, seen)")

    daemon = add("daemon", cmd_daemon, "run the node in the foreground (Ctrl-C stops it)")
    daemon.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="UDP address to listen on (default: config, else 0.0.0.0:47300)",
    )
    daemon.add_argument(
        "--peer",
        action="append",
        metavar="NODEID@HOST:PORT",
        help="a device to keep connected to (repeatable; adds to config peers)",
    )
    daemon.add_argument(
        "--relay",
        metavar="[NODEID@]HOST:PORT",
        help="home relay (without NODEID: pinned on first use; default: relay in config.toml)",
    )
    daemon.add_argument(
        "--relay-token-file",
        metavar="PATH",
        type=Path,
        help="file holding the relay's access token, if it requires one (default: "
        "relay_token_file in config.toml); never the token itself: command lines are public",
    )
    daemon.add_argument(
        "--mailbox",
        metavar="MODE",
        help="the relay mailbox: auto (push while a device of the group is not connected), "
        "always, pull (never push) or off (default: mailbox in config.toml, else auto)",
    )
    daemon.add_argument(
        "--no-mdns",
        action="store_true",
        help="do not advertise or look for devices on the LAN (mDNS)",
    )
    daemon.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip

    netcheck = add("netcheck", cmd_netcheck,
                   "find this network's NAT kind and public address (STUN, relay)")  # fmt: skip
    netcheck.add_argument("--relay", metavar="HOST:PORT",
                          help="relay to ask (default: relay in config.toml)")  # fmt: skip
    netcheck.add_argument("--alt-port", type=int, metavar="PORT",
                          help="the relay's second STUN port (default: its port + 1)")  # fmt: skip
    doctor = add("doctor", cmd_doctor, "explain the path to a peer: why (not) direct")
    doctor.add_argument("node_id", metavar="NODEID", help="the peer's NodeId (a prefix will do)")

    demo = add("demo", cmd_demo, "a guided tour in a throw-away home")
    demo.add_argument("--keep", action="store_true", help="keep the demo home for exploring")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except P2PSyncError as exc:
        print(f"p2psync: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # Reader went away (e.g. `p2psync get KEY | head`); not our error.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("p2psync: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"p2psync: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
