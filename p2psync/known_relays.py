"""Relays named by ``HOST:PORT`` alone: their NodeIds, pinned on first use.

Theory
------
A node dials every peer, relays included, by NodeId: the QUIC handshake
fails unless the certificate key *is* that NodeId (:mod:`p2psync.net.tls`).
An operator's instructions are friendlier as ``relay.example.org:3478``,
so a relay may be configured without its NodeId (``--relay HOST:PORT``,
``relay = "HOST:PORT"`` in config.toml). Then, like SSH's ``known_hosts``:

- the first time, :func:`resolve_relay` asks whoever answers there for its
  NodeId (:meth:`Endpoint.identify`, a full handshake: the peer proves it
  holds the key) and **pins** it in ``HOME/known_relays.json``, logging it;
- from then on the pinned NodeId is dialed, so a different key at that
  address (a reinstalled relayd, or someone in the path) is refused with
  ``PeerIdentityMismatch`` until the user removes the line (the error and
  docs/troubleshooting.md say how) or names the relay as ``NODEID@HOST:PORT``.

What trusting the first answer risks is small: relayd never sees keys or
plaintext (everything it carries is end-to-end encrypted and signed), so a
false relay can only drop or delay traffic, which the real one could too.
``NODEID@HOST:PORT`` remains the way to rule it out, and what tickets and
short codes carry (the inviter's pinned relay).

File (JSON, owner-only, written whole to a temp file and renamed)::

    {"version": 1, "relays": {"HOST:PORT": {"node_id": "...", "pinned_at": 1796290000}}}

Keys are the configured text of the address (a host name stays a name: a
relay that moves to a new IP keeps its pin). At most ``KNOWN_RELAYS_MAX``
entries (the oldest pin goes). A file that does not parse is an error that
names it: nothing is silently re-pinned.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Final

import trio

from p2psync.crypto.identity import NodeId
from p2psync.defaults import KNOWN_RELAYS_MAX, RELAY_IDENTIFY_TIMEOUT
from p2psync.errors import BadFrame, ConfigError
from p2psync.net.endpoint import ConnectFailed, Endpoint
from p2psync.net.relay_client import resolve_relay_host

log = logging.getLogger(__name__)

FILE_NAME: Final = "known_relays.json"
_VERSION: Final = 1
_MAX_FILE_BYTES: Final = 256 * 1024

Address = tuple[str, int]


def address_key(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class KnownRelays:
    """The pins of one home (``HOME/known_relays.json``)."""

    def __init__(self, home_path: Path) -> None:
        self.path = home_path / FILE_NAME

    def get(self, address: Address) -> NodeId | None:
        entry = self._load().get(address_key(address))
        return None if entry is None else NodeId.parse(str(entry["node_id"]))

    def pin(self, address: Address, node_id: NodeId, now: float) -> None:
        relays = self._load()
        relays.pop(address_key(address), None)
        relays[address_key(address)] = {"node_id": str(node_id), "pinned_at": int(now)}
        while len(relays) > KNOWN_RELAYS_MAX:
            del relays[next(iter(relays))]
        self._save(relays)

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            with self.path.open("rb") as file:
                raw = file.read(_MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror}") from None
        problem = f"{self.path} is damaged; remove it (relays are pinned again on next use)"
        if len(raw) > _MAX_FILE_BYTES:
            raise ConfigError(problem)
        try:
            document = json.loads(raw)
            relays = document["relays"]
            if document.get("version") != _VERSION or not isinstance(relays, dict):
                raise ValueError("unknown version")
            for entry in relays.values():
                NodeId.parse(str(entry["node_id"]))
        except (ValueError, KeyError, TypeError, AttributeError, BadFrame):
            raise ConfigError(problem) from None
        return dict(relays)

    def _save(self, relays: dict[str, dict[str, object]]) -> None:
        document = json.dumps({"version": _VERSION, "relays": relays}, indent=2) + "\n"
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=".known_relays.")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(document)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temp, 0o600)
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise


async def resolve_relay(endpoint: Endpoint, known: KnownRelays, address: Address) -> NodeId:
    """The relay's pinned NodeId, else ask whoever answers at ``address`` and pin it.

    Raises :class:`ConnectFailed` when nobody answers within
    ``RELAY_IDENTIFY_TIMEOUT``, :class:`~p2psync.net.relay_client.RelayUnavailable`
    when the host name does not resolve (the caller retries as it would a relay
    that is down), :class:`ConfigError` for a damaged pin file.
    """
    pinned = known.get(address)
    if pinned is not None:
        return pinned
    resolved = await resolve_relay_host(address)
    with trio.move_on_after(RELAY_IDENTIFY_TIMEOUT):
        node_id = await endpoint.identify(resolved)
        known.pin(address, node_id, time.time())
        log.info(
            "relay %s is %s: pinned on first use in %s (name it %s@%s to pin it yourself)",
            address_key(address),
            node_id,
            known.path,
            node_id,
            address_key(address),
        )
        return node_id
    raise ConnectFailed(
        f"relay {address_key(address)} did not answer within {RELAY_IDENTIFY_TIMEOUT:g} s"
    )
