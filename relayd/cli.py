"""``relayd`` command line: flags and TOML in, a running relay out.

The only place in relayd that reads files, sets up logging, installs signal
handlers and picks exit codes. Precedence: built-in defaults < ``--config``
file < flags. SIGTERM and SIGINT shut down gracefully (exit 0).

Access policy flags: ``--allow NODEID`` (repeatable; replaces the file's
``allow`` list) and ``--access-token-file PATH`` (the token is the file's
content without surrounding whitespace; replaces the file's
``access_token``). There is deliberately no flag taking the token itself:
command lines are visible to every local user (``ps``, /proc).

Exit codes: 0 clean shutdown or ``--print-config``; 2 bad flags or config
(one line on stderr saying which file/key/flag and what is wrong), or an
address that cannot be bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

import trio

from p2psync.errors import ConfigError
from relayd.config import (
    LOG_LEVELS,
    HostPort,
    RelaydConfig,
    check_access_token,
    check_node_id,
    config_to_toml,
    load_config_file,
    parse_host_port,
)
from relayd.relay import serve

log = logging.getLogger("relayd")

EXIT_OK = 0
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relayd",
        description="p2psync relay: STUN and QUIC relay on one UDP port, /health and /metrics.",
    )
    parser.add_argument("--config", metavar="FILE", type=Path, help="TOML config file")
    parser.add_argument("--listen", metavar="HOST:PORT", help="UDP address (QUIC + STUN)")
    parser.add_argument("--http", metavar="HOST:PORT", help="HTTP address (/health, /metrics)")
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="state directory: the relay identity and the group mailbox (without: ephemeral "
        "identity, no mailbox)",
    )
    parser.add_argument(
        "--no-mailbox",
        action="store_true",
        help="do not offer the group mailbox (store-and-forward), even with --data",
    )
    parser.add_argument(
        "--stun-alt-port", metavar="PORT", help="second UDP port answering STUN only"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective config as TOML, exit"
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="logging threshold")
    parser.add_argument(
        "--allow",
        metavar="NODEID",
        action="append",
        help="only this node may use the relay (repeat for more; replaces the file's allow)",
    )
    parser.add_argument(
        "--access-token-file",
        metavar="FILE",
        type=Path,
        help="file holding the shared token nodes must present (replaces access_token)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> RelaydConfig:
    """Defaults, then the file, then the flags; raises ConfigError."""
    config = load_config_file(args.config) if args.config is not None else RelaydConfig()
    if args.listen is not None:
        config = dataclasses.replace(config, listen=_flag_address("--listen", args.listen))
    if args.http is not None:
        config = dataclasses.replace(config, http=_flag_address("--http", args.http))
    if args.stun_alt_port is not None:
        text = args.stun_alt_port
        if not text.isdigit() or not 0 <= int(text) <= 65535:
            raise ConfigError(f"--stun-alt-port: {text!r} is not a port number 0-65535")
        config = dataclasses.replace(config, stun_alt_port=int(text))
    if args.data is not None:
        if not args.data:
            raise ConfigError("--data: empty directory path")
        config = dataclasses.replace(config, data_dir=args.data)
    if args.no_mailbox:
        config = dataclasses.replace(
            config, mailbox=dataclasses.replace(config.mailbox, enabled=False)
        )
    if args.log_level is not None:
        config = dataclasses.replace(config, log_level=args.log_level)
    if args.allow is not None:
        allow = {check_node_id(text, "--allow"): None for text in args.allow}
        config = dataclasses.replace(config, allow=tuple(allow))
    if args.access_token_file is not None:
        token = _read_token_file(args.access_token_file)
        config = dataclasses.replace(config, access_token=token)
    return config


def _read_token_file(path: Path) -> str:
    """The token in ``path`` without surrounding whitespace (a trailing newline, say)."""
    flag = "--access-token-file"
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{flag}: {path}: cannot read the token file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path}: the token file is not UTF-8 text") from None
    try:
        return check_access_token(text)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {path}: {exc}") from None


def _flag_address(flag: str, text: str) -> HostPort:
    try:
        return parse_host_port(text)
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


async def run(config: RelaydConfig) -> None:
    """Serve until SIGTERM or SIGINT (then tell relay clients and close, gracefully)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            async for signum in signals:
                log.info("%s received, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _find_config_error(exc: BaseException) -> ConfigError | None:
    if isinstance(exc, ConfigError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find_config_error(inner)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"relayd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        sys.stdout.write(config_to_toml(config))
        return EXIT_OK
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        trio.run(run, config)
    except BaseException as exc:
        found = _find_config_error(exc)
        if found is None:
            raise
        print(f"relayd: {found}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK
