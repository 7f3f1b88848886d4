"""relayd's configuration: TOML file, then command-line flags, then a frozen config.

Config flows one way: :func:`load_config_file` (the only function here that
does I/O) reads TOML into a plain mapping, :func:`config_from_mapping`
checks every key and type and builds a frozen :class:`RelaydConfig`, and the
CLI applies its flags with :func:`dataclasses.replace`. Errors are
:class:`~p2psync.errors.ConfigError` naming the file, the key and what is
wrong. :func:`config_to_toml` prints the effective config (``relayd
--print-config``) in the same format the loader reads.

File format (every key optional; defaults in :mod:`relayd.defaults`)::

    listen = "0.0.0.0:3478"        # UDP: QUIC relay and STUN ("[::]:3478" for IPv6)
    http = "127.0.0.1:9478"        # TCP: /health and /metrics
    stun_alt_port = 3479           # second STUN port on the listen host (omit: off)
    data = "/var/lib/relayd"       # state directory: relay identity, group mailbox
    log_level = "info"
    allow = ["NODEID", ...]        # only these nodes may use the relay (omit: any node)
    access_token = "..."           # nodes must present this shared token (omit: none)

    [limits]
    max_connections = 10000
    ...                            # every field of RelaydLimits

    [invites]                      # the short-code invite store (relayd.invites)
    enabled = true
    max_stored = 10000
    ...                            # every field of RelaydInvites

    [mailbox]                      # store-and-forward (relayd.mailbox); runs with ``data``
    enabled = true
    retention_s = 604800
    ...                            # every field of MailboxConfig

The ``[mailbox]`` sizes must make sense together (:func:`check_mailbox_config`):
``max_item_bytes`` holds a sealed 1 MiB chunk, the group quota holds one
such item and is at most the total quota.

Port 0 means "let the OS pick" (tests use it; the bound port is reported).

Access policy: ``allow`` and ``access_token`` become the
:class:`relayd.routing.AccessPolicy` that :func:`relayd.relay.serve` enforces
(:meth:`RelaydConfig.access_policy`). A node not on the allow-list is
refused with NOT_ALLOWED, a missing or wrong token with BAD_AUTH. The token
is a secret: it is kept out of ``repr()`` and ``--print-config`` shows
``access_token = "<set>"`` instead (a value this loader refuses, so a printed
config is never silently run with the placeholder as its token). The CLI
can read it from a file (``--access-token-file``) so it stays out of the
command line and out of a world-readable config file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from p2psync.crypto.identity import NodeId
from p2psync.errors import BadFrame, ConfigError
from p2psync.proto.relay import MAX_ACCESS_TOKEN
from p2psync.store.objects import MAX_OBJECT_SIZE
from relayd import defaults as d
from relayd.routing import AccessPolicy

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# What --print-config shows instead of the access token (and what the loader
# refuses as a token, so a printed config cannot run with it by accident).
REDACTED_TOKEN = "<set>"


class HostPort(NamedTuple):
    """A numeric bind address; ``str()`` gives ``host:port`` / ``[v6]:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_host_port(text: str) -> HostPort:
    """Parse ``HOST:PORT`` or ``[V6]:PORT`` with a numeric host; ConfigError if not."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{text!r} is not HOST:PORT (e.g. 0.0.0.0:3478 or [::]:3478)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{text!r}: host must be a numeric IP address") from None
    return HostPort(str(ip), _parse_port(port_text, text))


def _parse_port(port_text: str, whole: str) -> int:
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{whole!r}: port must be a number from 0 to 65535")
    return int(port_text)


_DEFAULT_LISTEN = parse_host_port(d.LISTEN)
_DEFAULT_HTTP = parse_host_port(d.HTTP_LISTEN)


@dataclass(frozen=True, slots=True)
class RelaydLimits:
    """Every bound relayd enforces; see :mod:`relayd.defaults` for the why."""

    max_connections: int = d.MAX_CONNECTIONS
    max_connections_per_ip: int = d.MAX_CONNECTIONS_PER_IP
    handshake_timeout_s: float = d.HANDSHAKE_TIMEOUT_S
    idle_timeout_s: float = d.IDLE_TIMEOUT_S
    write_timeout_s: float = d.WRITE_TIMEOUT_S
    frames_per_second: int = d.FRAMES_PER_SECOND
    frame_burst: int = d.FRAME_BURST
    bytes_per_second: int = d.BYTES_PER_SECOND
    byte_burst: int = d.BYTE_BURST
    max_frame_size: int = d.MAX_FRAME_SIZE
    queue_per_destination: int = d.QUEUE_PER_DESTINATION
    fast_path: bool = d.FAST_PATH
    stun_per_ip_rate: float = d.STUN_PER_IP_RATE
    stun_per_ip_burst: int = d.STUN_PER_IP_BURST
    max_tracked_ips: int = d.MAX_TRACKED_IPS
    http_max_request_bytes: int = d.HTTP_MAX_REQUEST_BYTES
    http_request_timeout_s: float = d.HTTP_REQUEST_TIMEOUT_S
    http_max_connections: int = d.HTTP_MAX_CONNECTIONS
    log_interval_s: float = d.LOG_INTERVAL_S
    metrics_max_label_sets: int = d.METRICS_MAX_LABEL_SETS


@dataclass(frozen=True, slots=True)
class RelaydInvites:
    """The invite store's switch and bounds (:mod:`relayd.invites`; why: :mod:`relayd.defaults`)."""

    enabled: bool = True
    max_stored: int = d.INVITES_MAX_STORED
    max_per_ip: int = d.INVITES_MAX_PER_IP
    max_lifetime_s: int = d.INVITES_MAX_LIFETIME_S
    max_wrong_proofs: int = d.INVITES_MAX_WRONG_PROOFS
    create_per_ip_rate: float = d.INVITES_CREATE_PER_IP_RATE
    create_per_ip_burst: int = d.INVITES_CREATE_PER_IP_BURST
    lookup_per_ip_rate: float = d.INVITES_LOOKUP_PER_IP_RATE
    lookup_per_ip_burst: int = d.INVITES_LOOKUP_PER_IP_BURST
    failed_lookup_per_ip_rate: float = d.INVITES_FAILED_LOOKUP_PER_IP_RATE
    failed_lookup_per_ip_burst: int = d.INVITES_FAILED_LOOKUP_PER_IP_BURST
    max_tracked_ips: int = d.MAX_TRACKED_IPS
    ipv6_prefix: int = d.INVITES_IPV6_PREFIX  # per-IP limits count IPv6 by this prefix


# --- mailbox section ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MailboxConfig:
    """The group mailbox (:mod:`relayd.mailbox`); the why of each: :mod:`relayd.defaults`.

    It runs when ``enabled`` and relayd has a data directory to keep it in.
    """

    enabled: bool = d.MAILBOX_ENABLED
    retention_s: int = d.MAILBOX_RETENTION_S
    max_item_bytes: int = d.MAILBOX_MAX_ITEM_BYTES
    group_quota_bytes: int = d.MAILBOX_GROUP_QUOTA_BYTES
    total_quota_bytes: int = d.MAILBOX_TOTAL_QUOTA_BYTES
    min_free_bytes: int = d.MAILBOX_MIN_FREE_BYTES
    max_devices_per_group: int = d.MAILBOX_MAX_DEVICES_PER_GROUP
    cleanup_interval_s: float = d.MAILBOX_CLEANUP_INTERVAL_S
    inline_max_bytes: int = d.MAILBOX_INLINE_MAX_BYTES
    drop_delivered: bool = d.MAILBOX_DROP_DELIVERED


# --- the whole config ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelaydConfig:
    """The effective configuration; constructors take it, nothing mutates it."""

    listen: HostPort = _DEFAULT_LISTEN
    http: HostPort = _DEFAULT_HTTP
    stun_alt_port: int | None = d.STUN_ALT_PORT
    data_dir: str | None = d.DATA_DIR
    log_level: str = d.LOG_LEVEL
    limits: RelaydLimits = field(default_factory=RelaydLimits)
    invites: RelaydInvites = field(default_factory=RelaydInvites)
    mailbox: MailboxConfig = field(default_factory=MailboxConfig)
    # Access policy: None means open (any node; no token).
    allow: tuple[NodeId, ...] | None = None
    access_token: str | None = field(default=None, repr=False)  # a secret: never printed

    def access_policy(self) -> AccessPolicy:
        """The policy :func:`relayd.relay.serve` enforces for this config."""
        return AccessPolicy(
            allowed=frozenset(self.allow) if self.allow is not None else None,
            access_token=self.access_token.encode() if self.access_token is not None else None,
        )


# --- checking untrusted values ------------------------------------------------


def _describe(value: object) -> str:
    kind = {bool: "boolean", int: "integer", float: "float", str: "string"}.get(
        type(value), type(value).__name__
    )
    return f"{kind} {value!r}"


def _want_address(value: object) -> HostPort:
    if not isinstance(value, str):
        raise ConfigError(f'expected a string like "0.0.0.0:3478", got {_describe(value)}')
    return parse_host_port(value)


def _want_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"expected a port number 0-65535, got {_describe(value)}")
    return value


def _want_path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a directory path string, got {_describe(value)}")
    return value


def _want_level(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ConfigError(f"expected one of {', '.join(LOG_LEVELS)}, got {_describe(value)}")
    return value.lower()


def _want_node_ids(value: object) -> tuple[NodeId, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            f'expected a list of NodeId strings like ["NODEID", ...], got {_describe(value)}'
        )
    if not value:
        raise ConfigError(
            "an empty allow-list would refuse every node; omit the key to allow any node"
        )
    node_ids: dict[NodeId, None] = {}  # ordered, duplicates folded
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigError(f"entry {index}: expected a NodeId string, got {_describe(item)}")
        node_ids[check_node_id(item, f"entry {index}")] = None
    return tuple(node_ids)


def check_node_id(text: str, where: str) -> NodeId:
    """Parse one allow-list entry; ConfigError naming ``where`` if it is not a NodeId."""
    try:
        return NodeId.parse(text)
    except BadFrame as exc:
        raise ConfigError(f"{where}: {text!r} is not a NodeId ({exc})") from None


def check_access_token(value: object) -> str:
    """A usable shared token: non-empty printable text of at most MAX_ACCESS_TOKEN bytes.

    Surrounding whitespace is refused rather than stripped, so a token read
    from a file (which the CLI strips) and one written in TOML compare equal
    to what the operator gives the nodes. The error never quotes the value.
    """
    if not isinstance(value, str):
        kind = "boolean" if isinstance(value, bool) else type(value).__name__
        raise ConfigError(f"expected the access token as a string, got a {kind}")
    if value == REDACTED_TOKEN:
        raise ConfigError(
            f"{REDACTED_TOKEN!r} is the placeholder --print-config shows for a secret "
            "token; put the real token here or use --access-token-file"
        )
    if not value:
        raise ConfigError("the access token is empty; omit it to run without a token")
    if value != value.strip() or not value.isprintable():
        raise ConfigError("the access token must be printable text without surrounding whitespace")
    if len(value.encode()) > MAX_ACCESS_TOKEN:
        raise ConfigError(
            f"the access token is {len(value.encode())} bytes; at most {MAX_ACCESS_TOKEN}"
        )
    return value


def _want_positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"expected a positive integer, got {_describe(value)}")
    return value


def _want_positive_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"expected a positive number, got {_describe(value)}")
    return float(value)


# TOML key -> (dataclass field, checker).
_TOP_KEYS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "listen": ("listen", _want_address),
    "http": ("http", _want_address),
    "stun_alt_port": ("stun_alt_port", _want_port),
    "data": ("data_dir", _want_path),
    "log_level": ("log_level", _want_level),
    "allow": ("allow", _want_node_ids),
    "access_token": ("access_token", check_access_token),
}


def _want_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"expected true or false, got {_describe(value)}")
    return value


_LIMIT_KEYS: dict[str, Callable[[object], Any]] = {
    f.name: {"bool": _want_bool, "float": _want_positive_float}.get(str(f.type), _want_positive_int)
    for f in dataclasses.fields(RelaydLimits)
}


_INVITE_KEYS: dict[str, Callable[[object], Any]] = {
    f.name: (
        _want_bool
        if f.type in ("bool", bool)
        else _want_positive_float
        if f.type in ("float", float)
        else _want_positive_int
    )
    for f in dataclasses.fields(RelaydInvites)
}


def _want_ipv6_prefix(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
        raise ConfigError(f"expected an IPv6 prefix length 1..128, got {_describe(value)}")
    return value


_INVITE_KEYS["ipv6_prefix"] = _want_ipv6_prefix


def _want_non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"expected an integer >= 0, got {_describe(value)}")
    return value


_MAILBOX_KEYS: dict[str, Callable[[object], Any]] = {
    f.name: {"bool": _want_bool, "float": _want_positive_float}.get(str(f.type), _want_positive_int)
    for f in dataclasses.fields(MailboxConfig)
}
# 0 means something here: no free-space reserve; every item in a file.
_MAILBOX_KEYS["min_free_bytes"] = _want_non_negative_int
_MAILBOX_KEYS["inline_max_bytes"] = _want_non_negative_int


def _mailbox_from_table(source: str, value: object) -> MailboxConfig:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: key 'mailbox': expected a [mailbox] table")
    checked: dict[str, Any] = {}
    for sub, sub_value in value.items():
        check = _MAILBOX_KEYS.get(sub)
        if check is None:
            raise _unknown(source, f"mailbox.{sub}", _MAILBOX_KEYS)
        checked[sub] = _checked(source, f"mailbox.{sub}", check, sub_value)
    return check_mailbox_config(MailboxConfig(**checked), source)


def check_mailbox_config(config: MailboxConfig, source: str = "<config>") -> MailboxConfig:
    """``config`` if its sizes fit together; else a ConfigError saying which and how.

    - ``max_item_bytes`` >= a sealed full chunk (:data:`~p2psync.store.objects.MAX_OBJECT_SIZE`):
      every file over 1 MiB is made of such chunks, so a smaller limit would
      refuse each of them;
    - ``group_quota_bytes`` >= ``max_item_bytes`` plus the per-item charge:
      a group must be able to hold the largest item the relay accepts;
    - ``group_quota_bytes`` <= ``total_quota_bytes``: one group cannot have
      more than all of them.
    """
    item, group, total = config.max_item_bytes, config.group_quota_bytes, config.total_quota_bytes
    if item < MAX_OBJECT_SIZE:
        raise ConfigError(
            f"{source}: mailbox.max_item_bytes = {item} is less than one sealed 1 MiB chunk "
            f"({MAX_OBJECT_SIZE} bytes): no file over 1 MiB could be stored; "
            f"set it to at least {MAX_OBJECT_SIZE}"
        )
    if group < item + d.MAILBOX_ITEM_OVERHEAD_BYTES:
        raise ConfigError(
            f"{source}: mailbox.group_quota_bytes = {group} cannot hold one item of "
            f"max_item_bytes = {item} (plus {d.MAILBOX_ITEM_OVERHEAD_BYTES} bytes per item); "
            "raise the quota or lower max_item_bytes"
        )
    if group > total:
        raise ConfigError(
            f"{source}: mailbox.group_quota_bytes = {group} exceeds total_quota_bytes = "
            f"{total}: one group cannot have more than all of them; lower it or raise the total"
        )
    return config


def _checked(source: str, key: str, check: Callable[[object], Any], value: object) -> Any:
    try:
        return check(value)
    except ConfigError as exc:
        raise ConfigError(f"{source}: key {key!r}: {exc}") from None


def _unknown(source: str, key: str, known: Mapping[str, object]) -> ConfigError:
    return ConfigError(f"{source}: unknown key {key!r} (known keys: {', '.join(known)})")


def config_from_mapping(data: Mapping[str, object], source: str = "<config>") -> RelaydConfig:
    """Check a parsed TOML document and build the config; pure, no I/O."""
    top: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    invites: dict[str, Any] = {}
    for key, value in data.items():
        if key == "mailbox":
            top["mailbox"] = _mailbox_from_table(source, value)
            continue
        if key == "invites":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key 'invites': expected an [invites] table")
            for sub, sub_value in value.items():
                check = _INVITE_KEYS.get(sub)
                if check is None:
                    raise _unknown(source, f"invites.{sub}", _INVITE_KEYS)
                invites[sub] = _checked(source, f"invites.{sub}", check, sub_value)
            continue
        if key == "limits":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: key 'limits': expected a [limits] table")
            for sub, sub_value in value.items():
                check = _LIMIT_KEYS.get(sub)
                if check is None:
                    raise _unknown(source, f"limits.{sub}", _LIMIT_KEYS)
                limits[sub] = _checked(source, f"limits.{sub}", check, sub_value)
            continue
        spec = _TOP_KEYS.get(key)
        if spec is None:
            tables = {"limits": None, "invites": None, "mailbox": None}
            raise _unknown(source, key, {**_TOP_KEYS, **tables})
        name, check = spec
        top[name] = _checked(source, key, check, value)
    return RelaydConfig(**top, limits=RelaydLimits(**limits), invites=RelaydInvites(**invites))


def load_config_file(path: Path) -> RelaydConfig:
    """Read and check a TOML config file (the only I/O in this module)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return config_from_mapping(data, str(path))


def override_limits(config: RelaydConfig, **changes: object) -> RelaydConfig:
    """``config`` with some limits replaced, checked like file values."""
    checked = {
        key: _checked("<override>", f"limits.{key}", _LIMIT_KEYS[key], value)
        for key, value in changes.items()
    }
    return dataclasses.replace(config, limits=dataclasses.replace(config.limits, **checked))


# --- printing -------------------------------------------------------------------


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def config_to_toml(config: RelaydConfig) -> str:
    """The effective config as TOML that :func:`config_from_mapping` reads back."""
    lines = ["# relayd effective configuration"]
    for key, (name, _check) in _TOP_KEYS.items():
        value = getattr(config, name)
        if value is None:
            lines.append(f"# {key} is not set")
        elif key == "access_token":
            lines.append(f"{key} = {_toml_value(REDACTED_TOKEN)}  # the secret is not printed")
        elif key == "allow":
            lines.append(f"{key} = [")
            lines += [f"    {_toml_value(str(node_id))}," for node_id in value]
            lines.append("]")
        elif isinstance(value, HostPort):
            lines.append(f"{key} = {_toml_value(str(value))}")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    lines += ["", "[limits]"]
    for f in dataclasses.fields(RelaydLimits):
        lines.append(f"{f.name} = {_toml_value(getattr(config.limits, f.name))}")
    lines += ["", "[invites]"]
    for f in dataclasses.fields(RelaydInvites):
        lines.append(f"{f.name} = {_toml_value(getattr(config.invites, f.name))}")
    lines += ["", "[mailbox]"]
    for f in dataclasses.fields(MailboxConfig):
        lines.append(f"{f.name} = {_toml_value(getattr(config.mailbox, f.name))}")
    return "\n".join(lines) + "\n"
