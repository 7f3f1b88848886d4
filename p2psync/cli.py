"""The ``p2psync`` command line.

The only module that reads environment variables, decides exit codes and
prints for humans. Every command that prints data takes ``--json``.

Exit codes: 0 success; 1 a user-facing error (one line on stderr, no
traceback); 2 bad usage (argparse); 130 interrupted.

Environment: ``P2PSYNC_HOME`` sets the home when ``--home`` is not given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from p2psync import __version__, ops
from p2psync.control.client import ControlClient, connect_if_running
from p2psync.crypto.group import group_id_text
from p2psync.errors import P2PSyncError
from p2psync.home import Home, default_home
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


def _put_stdin_via(daemon: ControlClient, home: Home, key: str) -> Any:
    """Spool stdin to an owner-only temp file in the home, let the daemon put it."""
    fd, name = tempfile.mkstemp(prefix="stdin-", dir=home.path)
    try:
        with os.fdopen(fd, "wb") as spool:
            shutil.copyfileobj(sys.stdin.buffer, spool, length=1 << 20)
        return daemon.call("put", {"path": name, "key": key, "anonymous": True})
    finally:
        Path(name).unlink(missing_ok=True)


def cmd_put(args: argparse.Namespace) -> int:
    home = _home(args)
    if args.path != "-" and not Path(args.path).is_file():
        raise UserError(f"{args.path} is not a readable file")
    if args.path == "-" and not args.key:
        raise UserError("reading from stdin needs --key KEY")
    daemon = _daemon(home)
    if daemon is not None:
        with daemon:
            if args.path == "-":
                row = _put_stdin_via(daemon, home, args.key)
            else:
                row = daemon.call("put", {"path": str(Path(args.path).resolve()), "key": args.key})
        _emit(args, row, f"put {row['key']} ({_human_size(row['size'])}) blob {row['blob'][:16]}")
        return 0
    with home.open_store() as store:
        if args.path == "-":
            stored = ops.put_stream(store, sys.stdin.buffer, key=args.key)
        else:
            stored = ops.put_path(store, Path(args.path), key=args.key)
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
        if args.output in (None, "-"):
            out = sys.stdout.buffer
            for chunk in store.iter_blob(ops.resolve_blob(store, args.target)):
                out.write(chunk)
            out.flush()
            return 0
        target = Path(args.output)
        daemon = _daemon(home)
        if daemon is not None:
            with daemon:
                reply = daemon.call("get", {"target": args.target, "output": str(target.resolve())})
            written = int(reply["size"])
        else:
            written = ops.get_to_path(store, args.target, target)
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
    if args.json:
        _emit(args, state, "")
        return 0
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
        print(f"relay     {relay['relay'][:16]}… {link}{rtt}{public}")
    peers = state["peers"]
    print(f"peers     {len(peers)}")
    for peer in peers:
        rtt = f"{peer['rtt_ms']:.1f} ms" if peer.get("rtt_ms") is not None else "-"
        line = (
            f"  {peer['node_id'][:16]}  {peer['path']:<7} {peer.get('address') or '-':<22} "
            f"rtt {rtt:<9} in {_human_size(peer['bytes_in'])} out {_human_size(peer['bytes_out'])}"
        )
        if peer.get("last_error"):
            line += f"  last error: {peer['last_error']}"
        print(line)
    return 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from p2psync.daemon import run_daemon

    return run_daemon(_home(args), listen=args.listen, peers=args.peer or [],
                      log_level=args.log_level, mdns=not args.no_mdns,
                      relay=args.relay)  # fmt: skip


def _parse_duration(text: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        seconds = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except ValueError:
        raise UserError(f"{text!r} is not a duration like 90s, 10m or 1h") from None
    if not 10 <= seconds <= 24 * 3600:
        raise UserError("an invite lasts between 10 seconds and 24 hours")
    return seconds


def cmd_invite(args: argparse.Namespace) -> int:
    home = _home(args)
    lifetime = _parse_duration(args.expires)
    daemon = _daemon(home)
    if daemon is not None:
        with daemon:
            reply = daemon.call("invite", {"lifetime": lifetime})
        _emit(args, reply, f"{reply['ticket']}\n\nOn the new device: p2psync join TICKET "
              f"(valid {lifetime // 60} min, once; the running daemon answers it)")  # fmt: skip
        return 0
    from p2psync.daemon import invite_and_wait

    return invite_and_wait(home, lifetime=lifetime, listen=args.listen, as_json=args.json)


def cmd_join(args: argparse.Namespace) -> int:
    import trio

    from p2psync.join import join_group

    home = _home(args)
    joined = trio.run(join_group, home, args.ticket, args.name or "")
    _emit(
        args,
        {"group_id": joined.group_id, "inviter": joined.inviter,
         "address": f"{joined.address[0]}:{joined.address[1]}"},
        f"joined group {joined.group_id}\n(the inviter is now a peer in {home.config_file}; "
        "run `p2psync daemon` to sync)",
    )  # fmt: skip
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

    get = add("get", cmd_get, "write the current value of a key (or a blob id) out")
    get.add_argument("target", metavar="KEY|BLOB", help="a key from `ls`, or a 64-hex blob id")
    get.add_argument("-o", "--output", help="write to this file (default: stdout)")

    add("ls", cmd_ls, "list keys and their current values")

    rm = add("rm", cmd_rm, "delete a key (a signed tombstone that syncs like any write)")
    rm.add_argument("key")

    add("gc", cmd_gc, "delete stored objects that no current value references")

    add("status", cmd_status, "show the running daemon's peers, paths and counters")

    invite = add("invite", cmd_invite, "print a one-time ticket that lets another device join")
    invite.add_argument("--expires", default="10m", help="how long the ticket lasts (default 10m)")
    invite.add_argument("--listen", metavar="HOST:PORT",
                        help="without a daemon: where to wait for the joiner")  # fmt: skip

    join = add("join", cmd_join, "join the group of the device that printed TICKET")
    join.add_argument("ticket", metavar="TICKET")
    join.add_argument("--name", help="a name for this device, shown to the others")

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
        metavar="NODEID@HOST:PORT",
        help="home relay (relayd prints its NodeId; default: relay in config.toml)",
    )
    daemon.add_argument(
        "--no-mdns",
        action="store_true",
        help="do not advertise or look for devices on the LAN (mDNS)",
    )
    daemon.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])  # fmt: skip

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
