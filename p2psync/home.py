"""A device's home directory: its keys, its config and its store.

Layout (directory mode 0700, key files 0600)::

    HOME/
      identity.key   msgpack [1, seed bin32]          the device's Ed25519 seed
      group.key      msgpack [1, [secret bytes, ...]]  group secrets, one per epoch
      config.toml    user-editable settings (name, listen, peers, relay,
                     relay_token_file, mailbox)
      store.sqlite   entries, objects and blob index (WAL mode)
      objects/       sealed objects, named by BLAKE3 of their bytes

Rules: ``init`` never overwrites an identity; secrets are written to a temp
file with mode 0600, fsynced and renamed, so a crash leaves the old file or
the new one, never half of either; any file that does not parse is reported
with its path and what to do, never silently replaced.

The relay's access token (if the relay requires one) is never in
config.toml or on a command line (``ps`` shows those to every local user):
``relay_token_file`` names a file holding it — relative paths are relative
to HOME — and :func:`read_relay_token` reads it as relayd reads its own
``--access-token-file``: UTF-8 text, surrounding whitespace stripped.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity, RandomBytes
from p2psync.errors import BadFrame, ConfigError
from p2psync.proto.codec import as_bytes, as_int, as_list, pack, unpack_untrusted
from p2psync.proto.relay import MAX_ACCESS_TOKEN
from p2psync.store.store import Store

_KEYFILE_VERSION = 1
_MAX_KEYFILE = 64 * 1024
_MAX_NAME = 64


def default_home() -> Path:
    """The platform's per-user data directory (e.g. ``~/.local/share/p2psync``)."""
    return platformdirs.user_data_path("p2psync", appauthor=False)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Settings from ``config.toml``; flags given to the daemon override them.

    ``listen`` is ``HOST:PORT`` and each of ``peers`` ``NODEID@HOST:PORT``;
    they are checked when the daemon parses them (:mod:`p2psync.node`).
    ``relay_token_file`` is a path to the file holding the relay's access
    token, as written (see :meth:`Home.resolve`). ``mailbox`` is the push
    mode of the relay's mailbox (``auto``, ``always``, ``pull``, ``off``:
    :mod:`p2psync.mailbox_sync`); None leaves the node's default.
    """

    name: str = ""
    listen: str | None = None
    peers: tuple[str, ...] = ()
    relay: str | None = None
    relay_token_file: str | None = None
    mailbox: str | None = None


def _check_name(name: str) -> str:
    name = name.strip()
    if len(name) > _MAX_NAME or any(ord(c) < 32 for c in name):
        raise ConfigError(f"a device name is at most {_MAX_NAME} printable characters")
    return name


def parse_config_untrusted(text: str, source: str) -> NodeConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    known = {"name", "listen", "peers", "relay", "relay_token_file", "mailbox"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    name = data.get("name", "")
    if not isinstance(name, str):
        raise ConfigError(f"{source}: 'name' must be a string")
    listen = data.get("listen")
    if listen is not None and not isinstance(listen, str):
        raise ConfigError(f"{source}: 'listen' must be a string like \"0.0.0.0:47300\"")
    peers = data.get("peers", [])
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise ConfigError(f"{source}: 'peers' must be a list of \"NODEID@HOST:PORT\" strings")
    relay = data.get("relay")
    if relay is not None and not isinstance(relay, str):
        raise ConfigError(
            f"{source}: 'relay' must be a string like \"relay.example:3478\" "
            '(or "NODEID@relay.example:3478")'
        )
    token_file = data.get("relay_token_file")
    if token_file is not None and (not isinstance(token_file, str) or not token_file.strip()):
        raise ConfigError(
            f"{source}: 'relay_token_file' must be the path of a file holding the relay's "
            'access token, like "relay.token" (relative to the home directory)'
        )
    mailbox = data.get("mailbox")
    if mailbox is not None:
        from p2psync.mailbox_sync import MODES, check_mode

        if not isinstance(mailbox, str):
            raise ConfigError(f"{source}: 'mailbox' must be one of {', '.join(MODES)}")
        try:
            check_mode(mailbox)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return NodeConfig(
        name=_check_name(name),
        listen=listen,
        peers=tuple(peers),
        relay=relay,
        relay_token_file=token_file,
        mailbox=mailbox,
    )


def read_relay_token(path: Path, source: str) -> bytes:
    """The relay access token held in ``path``; ``source`` names where the path came from.

    The file's UTF-8 text without surrounding whitespace (a trailing newline,
    say): non-empty, printable, at most MAX_ACCESS_TOKEN bytes — what relayd
    accepts as a token. Errors say which file and what to do, never the token.
    """
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{source}: {path}: cannot read the relay token file: {exc.strerror}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: {path}: the relay token file is not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{source}: {path}: the relay token file is empty")
    if not text.isprintable():
        raise ConfigError(f"{source}: {path}: the relay token must be printable text on one line")
    token = text.encode()
    if len(token) > MAX_ACCESS_TOKEN:
        raise ConfigError(
            f"{source}: {path}: the relay token is {len(token)} bytes; at most {MAX_ACCESS_TOKEN}"
        )
    return token


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class Home:
    """Paths and key files of one device. Creating it does no I/O."""

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def identity_file(self) -> Path:
        return self.path / "identity.key"

    @property
    def group_file(self) -> Path:
        return self.path / "group.key"

    @property
    def config_file(self) -> Path:
        return self.path / "config.toml"

    def exists(self) -> bool:
        return self.identity_file.exists()

    def resolve(self, path: str) -> Path:
        """A path from config.toml: ``~`` expanded, relative ones relative to the home."""
        return self.path / Path(path).expanduser()

    def relay_token(self, flag_path: Path | None = None) -> bytes | None:
        """The relay access token: from ``flag_path`` if given, else config's file, else None."""
        if flag_path is not None:
            return read_relay_token(flag_path, "--relay-token-file")
        configured = self.load_config().relay_token_file
        if configured is None:
            return None
        return read_relay_token(self.resolve(configured), f"{self.config_file} relay_token_file")

    # --- identity -------------------------------------------------------------

    def init(self, random_bytes: RandomBytes, name: str = "") -> Identity:
        """Create a new device identity; refuse if one exists."""
        if self.exists():
            existing = self.load_identity()
            raise ConfigError(
                f"{self.path} already holds device {existing.node_id}; "
                "refusing to overwrite it (use another --home)"
            )
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        identity = Identity.generate(random_bytes)
        _write_private(self.identity_file, pack([_KEYFILE_VERSION, identity.seed]))
        _write_private(self.config_file, f"name = {_toml_string(_check_name(name))}\n".encode())
        return identity

    def load_identity(self) -> Identity:
        if not self.exists():
            raise ConfigError(f"no device at {self.path}: run `p2psync init` first")
        try:
            items = self._read_keyfile(self.identity_file)
            return Identity.from_seed(as_bytes(items[1], "seed", size=32))
        except BadFrame as exc:
            raise ConfigError(f"{self.identity_file} is damaged: {exc}") from exc

    def _read_keyfile(self, path: Path) -> list[object]:
        data = path.read_bytes()
        items = as_list(unpack_untrusted(data, max_size=_MAX_KEYFILE), path.name, length=2)
        as_int(items[0], f"{path.name} version", lo=_KEYFILE_VERSION, hi=_KEYFILE_VERSION)
        return items

    # --- group ----------------------------------------------------------------

    def load_secrets(self) -> list[GroupSecret]:
        if not self.group_file.exists():
            return []
        try:
            items = self._read_keyfile(self.group_file)
            return [
                GroupSecret.from_bytes_untrusted(as_bytes(s, "secret", max_size=64))
                for s in as_list(items[1], "secrets")
            ]
        except BadFrame as exc:
            raise ConfigError(f"{self.group_file} is damaged: {exc}") from exc

    def save_secret(self, secret: GroupSecret) -> None:
        """Add ``secret`` to the keyring file (same group only)."""
        secrets = {s.epoch: s for s in self.load_secrets()}
        if secrets:
            ours = next(iter(secrets.values())).keys().group_id
            if secret.keys().group_id != ours:
                raise ConfigError("this device already belongs to another group")
        secrets[secret.epoch] = secret
        payload = pack([_KEYFILE_VERSION, [s.to_bytes() for s in secrets.values()]])
        _write_private(self.group_file, payload)

    def create_group(self, random_bytes: RandomBytes) -> GroupSecret:
        self.load_identity()
        if self.load_secrets():
            raise ConfigError(
                "this device is already in a group; a device belongs to one group at a time"
            )
        secret = GroupSecret.generate(random_bytes)
        self.save_secret(secret)
        return secret

    # --- config and store -----------------------------------------------------

    def load_config(self) -> NodeConfig:
        if not self.config_file.exists():
            return NodeConfig()
        return parse_config_untrusted(self.config_file.read_text(), str(self.config_file))

    def add_peer(self, peer: str) -> None:
        """Append a ``NODEID@HOST:PORT`` static peer to config.toml (if new)."""
        config = self.load_config()
        if peer not in config.peers:
            self._save_config(dataclasses.replace(config, peers=(*config.peers, peer)))

    def set_relay(self, relay: str) -> None:
        """Make ``NODEID@HOST:PORT`` the home relay in config.toml."""
        from p2psync.net.relay_client import parse_relay_address

        parse_relay_address(relay)  # refuse what the daemon could not use
        config = self.load_config()
        if config.relay != relay:
            self._save_config(dataclasses.replace(config, relay=relay))

    def _save_config(self, config: NodeConfig) -> None:
        lines = [f"name = {_toml_string(config.name)}"]
        if config.listen:
            lines.append(f"listen = {_toml_string(config.listen)}")
        if config.relay:
            lines.append(f"relay = {_toml_string(config.relay)}")
        if config.relay_token_file:
            lines.append(f"relay_token_file = {_toml_string(config.relay_token_file)}")
        if config.mailbox:
            lines.append(f"mailbox = {_toml_string(config.mailbox)}")
        peers = ", ".join(_toml_string(p) for p in config.peers)
        lines.append(f"peers = [{peers}]")
        _write_private(self.config_file, ("\n".join(lines) + "\n").encode())

    def open_store(self, random_bytes: RandomBytes = os.urandom) -> Store:
        return Store(
            self.path, self.load_identity(), self.load_secrets(), random_bytes=random_bytes
        )


def _write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, owner-only from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
