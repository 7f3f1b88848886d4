"""Rotating group tags and the sealed mDNS advert (sans-IO).

Theory
------
Every daemon announces itself on its LAN with DNS-SD over mDNS (RFC 6762,
RFC 6763; the I/O is in :mod:`p2psync.discovery.mdns`). The announcement must
let a **group member** find the device (its NodeId, to dial and
authenticate, and its UDP port), while telling an **outsider** on the same
LAN as little as possible. Three properties are wanted (issue 7):

1. outsiders cannot tell which devices share a group;
2. outsiders cannot link a device across time windows by its advert;
3. members recognise each other with no server and no pairing traffic.

**The window tag.** Time is cut into windows of :data:`TAG_WINDOW_SECONDS`
(15 minutes); window ``w = floor(unix_time / 900)``. A group's tag for window
``w`` is :func:`p2psync.crypto.group.mdns_tag` (keyed BLAKE3 under the
group's ``mdns_tag_key``, 16 bytes). Only members can compute it. Receivers
accept the current and the previous window (:func:`current_tags`), so an
advert made just before a window boundary - or by a peer whose clock is up
to one window behind - still counts; anything older is rejected.

**Why the tag is not published.** The obvious design puts the tag in the
TXT record in clear. But a window tag is the same for *every* member during
the window, so an onlooker learns "these three devices are one group" every
15 minutes (breaking property 1), and the NodeId beside it - a 32-byte
public key that never changes, on every network the laptop visits - links
the device across windows, networks and months (breaking property 2) no
matter how the tag rotates.

**The design chosen: a sealed advert.** The tag is used as a *key* and
never leaves the device::

    K_w   = BLAKE3-derive("p2psync 2026 mdns advert key v1", tag_w)     (32 bytes)
    nonce = 24 fresh random bytes (per advert)
    box   = XChaCha20-Poly1305(K_w, nonce, node_id(32) || u16be port, aad=ADVERT_AAD)

A receiver trial-opens ``box`` with each accepted tag (current and previous
window for each key epoch it holds: two to a handful of AEAD opens of 50
bytes, microseconds). An outsider sees only a random-looking 74-byte blob
that differs between members and between windows, under a random instance
and host name that are drawn afresh for every advert (:func:`advert_label`).
Whoever opens it has proved to itself that the sender knows a group key of
this window: that is the "tag matches" test, with no tag on the wire.

What is still visible, and why it is acceptable:

- The IPv4 address (A record) and MAC address: every packet the device
  sends shows them anyway; MAC randomisation is the OS's job.
- The SRV port: the default port (47300) is shared by every node and says
  nothing; a custom ``--port`` is a stable identifier, the user's choice.
- Timing: a goodbye for the old name and a new name from the same address
  at a window boundary link the two on one LAN; across networks (new
  address, randomised MAC) nothing in the advert links them.
- **Active probing**: whoever connects to the QUIC port receives the
  server's certificate, whose key *is* the NodeId (:mod:`p2psync.net.tls`),
  and disco PINGs carry the sender's NodeId in clear. Sealing the NodeId
  keeps it off the *passive* record - mDNS browsers, network inventories,
  reflectors logging every announcement - and off every network where no
  member ever dials; it does not stop an outsider who actively dials every
  LAN host. Hiding the NodeId from active probes would need the server to
  authenticate the client before sending its certificate, which QUIC/TLS
  1.3 does not do.

Adverts are hints, not authentication. An outsider can replay a member's
advert (within its two windows) beside its own addresses; the dial that
follows checks the peer's certificate against the sealed NodeId and fails.

Wire format
-----------
TXT record data (RFC 6763 §6: a sequence of ``u8 length | "key=value"``
strings; keys are case-insensitive, only the first occurrence of a key
counts, unknown keys are ignored so later versions can add some)::

    -> "v=1"
    -> "s=" base32(nonce(24) || box(50))      (119 lowercase base32 characters)

126 bytes in all: well under the 200 bytes RFC 6763 §6.2 recommends.
Instance name ``p2ps-<16 base32 chars>._p2psync._udp.local.``, host name
``p2ps-<same>.local.``, both random per advert.

Rules
-----
- Sans-IO: ``now`` and ``random_bytes`` are injected; no sockets, no clock.
- :func:`decode_txt_untrusted` raises only :class:`BadFrame`;
  :func:`open_advert` returns ``None`` for an advert of another group (the
  normal case for an outsider's advert, not an error) and raises
  :class:`BadFrame` only for an advert that opens but holds nonsense.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import blake3

from p2psync.crypto.aead import (
    NONCE_SIZE,
    TAG_SIZE,
    DecryptionFailed,
    random_nonce,
    xchacha_decrypt,
    xchacha_encrypt,
)
from p2psync.crypto.group import MDNS_TAG_SIZE, GroupKeys, mdns_tag
from p2psync.crypto.identity import (
    NODE_ID_SIZE,
    NodeId,
    RandomBytes,
    b32decode_untrusted,
    b32encode,
)
from p2psync.errors import BadFrame, LocalProtocolError

# --- defaults (candidates for p2psync/defaults.py) -------------------------
# 15-minute tag windows: an advert is linkable for at most two windows, and
# accepting the previous window tolerates clocks up to 15 minutes behind.
TAG_WINDOW_SECONDS: Final = 900
# Largest TXT record we parse: RFC 6763 §6.2 says 400 bytes fits one
# Ethernet packet with the other records; ours is 126. Bounds work per advert.
MAX_TXT_SIZE: Final = 400

ADVERT_VERSION: Final = 1
ADVERT_AAD: Final = b"p2psync mdns advert v1"
# BLAKE3 derive_key context: the tag becomes an AEAD key (never edit it).
_ADVERT_KEY_CONTEXT: Final = "p2psync 2026 mdns advert key v1"
_PLAINTEXT: Final = struct.Struct(f">{NODE_ID_SIZE}sH")
SEALED_SIZE: Final = NONCE_SIZE + _PLAINTEXT.size + TAG_SIZE  # 74 bytes
_SEALED_TEXT_LENGTH: Final = math.ceil(SEALED_SIZE * 8 / 5)  # 119 base32 characters
_LABEL_RANDOM_BYTES: Final = 10  # 80 bits: collisions never happen, names never repeat
LABEL_PREFIX: Final = "p2ps-"


def window_at(now: float) -> int:
    """The tag window of unix time ``now``: ``floor(now / TAG_WINDOW_SECONDS)``."""
    if not math.isfinite(now) or now < 0:
        raise LocalProtocolError(f"unix time must be finite and >= 0, got {now!r}")
    return math.floor(now / TAG_WINDOW_SECONDS)


def advert_tag(keys: GroupKeys, now: float) -> bytes:
    """The tag to seal our own advert under at ``now`` (current window)."""
    return mdns_tag(keys, window_at(now))


def current_tags(keyring: Iterable[GroupKeys], now: float) -> set[bytes]:
    """Every tag an advert may be sealed under at ``now`` to be accepted.

    The current and the previous window, for every key epoch in ``keyring``
    (a member that has not rotated yet still seals under its older epoch).
    """
    window = window_at(now)
    windows = (window, window - 1) if window > 0 else (window,)
    return {mdns_tag(keys, w) for keys in keyring for w in windows}


def _advert_key(tag: bytes) -> bytes:
    return blake3.blake3(tag, derive_key_context=_ADVERT_KEY_CONTEXT).digest()


def _check_tag(tag: bytes) -> None:
    if len(tag) != MDNS_TAG_SIZE:
        raise LocalProtocolError(f"an mDNS tag is {MDNS_TAG_SIZE} bytes, got {len(tag)}")


@dataclass(frozen=True, slots=True)
class SealedAdvert:
    """What a TXT record carries: ``nonce(24) || box(50)``, still sealed."""

    sealed: bytes

    def __post_init__(self) -> None:
        if len(self.sealed) != SEALED_SIZE:
            raise BadFrame(f"a sealed advert is {SEALED_SIZE} bytes, got {len(self.sealed)}")

    @classmethod
    def seal(
        cls, tag: bytes, node_id: NodeId, port: int, random_bytes: RandomBytes
    ) -> SealedAdvert:
        """Seal ``node_id`` and ``port`` under ``tag`` with a fresh random nonce."""
        _check_tag(tag)
        if isinstance(port, bool) or not 1 <= port <= 0xFFFF:
            raise LocalProtocolError(f"a UDP port is 1..65535, got {port!r}")
        nonce = random_nonce(random_bytes)
        plaintext = _PLAINTEXT.pack(node_id.raw, port)
        return cls(nonce + xchacha_encrypt(_advert_key(tag), nonce, plaintext, ADVERT_AAD))

    def to_txt(self) -> bytes:
        """The TXT record data (RFC 6763 §6), see the module docs."""
        return _txt_string(f"v={ADVERT_VERSION}".encode()) + _txt_string(
            b"s=" + b32encode(self.sealed).encode("ascii")
        )


def _txt_string(item: bytes) -> bytes:
    return bytes([len(item)]) + item


@dataclass(frozen=True, slots=True)
class OpenedAdvert:
    """A member's advert, opened: who it is, its UDP port, and the tag that opened it."""

    node_id: NodeId
    port: int
    tag: bytes


def _txt_items_untrusted(data: bytes) -> dict[bytes, bytes | None]:
    """RFC 6763 §6 strings to ``{lowercase key: value}``, first occurrence wins."""
    items: dict[bytes, bytes | None] = {}
    offset = 0
    while offset < len(data):
        length = data[offset]
        end = offset + 1 + length
        if end > len(data):
            raise BadFrame(
                f"TXT string at byte {offset} claims {length} bytes, {len(data) - offset - 1} left"
            )
        item = data[offset + 1 : end]
        offset = end
        if not item:
            continue  # an empty string is allowed (an empty TXT is one zero byte)
        key, equals, value = item.partition(b"=")
        if not key:
            continue  # §6.4: a string starting with '=' is silently ignored
        items.setdefault(key.lower(), value if equals else None)
    return items


def _ascii_value_untrusted(items: dict[bytes, bytes | None], key: bytes) -> str:
    if key not in items:
        raise BadFrame(f"TXT record has no {key.decode()!r} key: not a p2psync advert")
    value = items[key]
    if value is None:
        raise BadFrame(f"TXT key {key.decode()!r} has no value")
    try:
        return value.decode("ascii")
    except UnicodeDecodeError as exc:
        raise BadFrame(f"TXT key {key.decode()!r} is not ASCII") from exc


def decode_txt_untrusted(data: bytes) -> SealedAdvert:
    """Parse TXT record data into a :class:`SealedAdvert`; only :class:`BadFrame` escapes."""
    if not isinstance(data, bytes):
        raise BadFrame(f"TXT record data is bytes, got {type(data).__name__}")
    if len(data) > MAX_TXT_SIZE:
        raise BadFrame(f"TXT record is {len(data)} bytes, more than {MAX_TXT_SIZE}")
    items = _txt_items_untrusted(data)
    version = _ascii_value_untrusted(items, b"v")
    if version != str(ADVERT_VERSION):
        raise BadFrame(
            f"advert version {version[:8]!r} is not supported (expected {ADVERT_VERSION})"
        )
    text = _ascii_value_untrusted(items, b"s")
    if len(text) != _SEALED_TEXT_LENGTH:
        raise BadFrame(f"sealed advert is {_SEALED_TEXT_LENGTH} base32 characters, got {len(text)}")
    sealed = b32decode_untrusted(text)
    if b32encode(sealed) != text.lower():
        raise BadFrame("sealed advert is not canonical base32")
    return SealedAdvert(sealed)


def open_advert(advert: SealedAdvert, tags: Iterable[bytes]) -> OpenedAdvert | None:
    """Trial-open ``advert`` under each accepted tag.

    Returns ``None`` when no tag opens it (another group's advert, or one
    sealed in a window no longer accepted). Raises :class:`BadFrame` when it
    opens but its contents are invalid (a member's bug: not a valid NodeId,
    or port 0).
    """
    nonce, box = advert.sealed[:NONCE_SIZE], advert.sealed[NONCE_SIZE:]
    for tag in tags:
        _check_tag(tag)
        try:
            plaintext = xchacha_decrypt(_advert_key(tag), nonce, box, ADVERT_AAD)
        except DecryptionFailed:
            continue
        raw_node_id, port = _PLAINTEXT.unpack(plaintext)
        if port == 0:
            raise BadFrame("a member's advert names UDP port 0")
        return OpenedAdvert(NodeId(raw_node_id), port, tag)
    return None


def advert_label(random_bytes: RandomBytes) -> str:
    """A fresh random DNS label for one advert's instance and host name.

    ``p2ps-`` and 16 base32 characters (80 bits): never repeats, so names
    link nothing; DNS labels are case-insensitive, base32 is lowercase.
    """
    raw = random_bytes(_LABEL_RANDOM_BYTES)
    if len(raw) != _LABEL_RANDOM_BYTES:
        raise LocalProtocolError(f"random_bytes({_LABEL_RANDOM_BYTES}) returned {len(raw)} bytes")
    return LABEL_PREFIX + b32encode(raw)
