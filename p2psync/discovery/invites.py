"""The LAN short-code advert: how a joiner finds an inviter with no relay (sans-IO).

Theory
------
A device running ``p2psync invite --short`` on a LAN announces its open
short-code invite over mDNS (the I/O is :func:`p2psync.discovery.mdns.advertise_invite`
and :func:`~p2psync.discovery.mdns.find_invite`), as a DNS-SD service of its
own type :data:`INVITE_SERVICE_TYPE` (so group daemons never resolve it).
The joiner typed the same code; it must find *that* inviter among whatever
else is announced, and learn its NodeId and UDP port. An onlooker on the
LAN must learn nothing it could use to join.

The advert shows two things (names from :mod:`p2psync.pairing`)::

    t = lan_tag  = BLAKE3-derive(..., L)[0:16]                 in clear: lets the joiner
                                                              pick this advert out
    s = SealedAdvert.seal(advert_tag, inviter NodeId, port)   advert_tag comes from
                                                              Argon2id(S): opens only
                                                              with the whole code

A joiner compares ``t`` with the tag of the first half it typed (a cheap
filter), then opens ``s`` with the key of the second half. An advert whose
``t`` matches but whose ``s`` does not open means the second half was
mistyped (:class:`WrongSecretHalf`): the joiner says so before anything is
sent to the inviter, so a typo never costs one of the invite's tries.

What an onlooker gets: ``t`` identifies the advert for its 10 minutes (it
is random per code) and, by brute force over 2^40 BLAKE3 inputs, the first
half ``L``. ``L`` alone opens nothing: relayd hands the sealed ticket only
to a proof from the second half, ``s`` and every MAC of the join handshake
need ``Argon2id(S)`` per guess (``docs/pairing-codes.md``). The NodeId is
sealed, as in the group advert (:mod:`p2psync.discovery.tags`).

Wire format (TXT record, RFC 6763 §6; unknown keys ignored)::

    -> "v=1"
    -> "t=" base32(lan_tag)           (26 characters)
    -> "s=" base32(sealed advert)     (119 characters; see p2psync.discovery.tags)

Instance and host names are random per advert (:func:`~p2psync.discovery.tags.advert_label`).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

from p2psync.crypto.identity import NodeId, RandomBytes, b32decode_untrusted, b32encode
from p2psync.discovery.tags import (
    MAX_TXT_SIZE,
    OpenedAdvert,
    SealedAdvert,
    _ascii_value_untrusted,
    _txt_items_untrusted,
    _txt_string,
    decode_txt_untrusted,
    open_advert,
)
from p2psync.errors import BadFrame, IntegrityError, LocalProtocolError

INVITE_SERVICE_TYPE: Final = "_p2psync-invite._udp.local."
INVITE_ADVERT_VERSION: Final = 1
LAN_TAG_SIZE: Final = 16
_LAN_TAG_TEXT_LENGTH: Final = 26  # ceil(128 / 5)


class WrongSecretHalf(IntegrityError):
    """An advert for this code's first half that the second half does not open."""


@dataclass(frozen=True, slots=True)
class InviteAdvert:
    """What an inviter announces: the clear tag and the sealed NodeId and port."""

    lan_tag: bytes
    sealed: SealedAdvert

    def __post_init__(self) -> None:
        if len(self.lan_tag) != LAN_TAG_SIZE:
            raise BadFrame(f"a LAN invite tag is {LAN_TAG_SIZE} bytes, got {len(self.lan_tag)}")

    @classmethod
    def seal(
        cls,
        lan_tag: bytes,
        advert_tag: bytes,
        node_id: NodeId,
        port: int,
        random_bytes: RandomBytes,
    ) -> InviteAdvert:
        if len(lan_tag) != LAN_TAG_SIZE:
            raise LocalProtocolError(f"a LAN invite tag is {LAN_TAG_SIZE} bytes")
        return cls(lan_tag, SealedAdvert.seal(advert_tag, node_id, port, random_bytes))

    def to_txt(self) -> bytes:
        return (
            _txt_string(f"v={INVITE_ADVERT_VERSION}".encode())
            + _txt_string(b"t=" + b32encode(self.lan_tag).encode("ascii"))
            + _txt_string(b"s=" + b32encode(self.sealed.sealed).encode("ascii"))
        )


def decode_invite_txt_untrusted(data: bytes) -> InviteAdvert:
    """Parse an invite advert's TXT data; only :class:`BadFrame` escapes."""
    if not isinstance(data, bytes):
        raise BadFrame(f"TXT record data is bytes, got {type(data).__name__}")
    if len(data) > MAX_TXT_SIZE:
        raise BadFrame(f"TXT record is {len(data)} bytes, more than {MAX_TXT_SIZE}")
    # The "v" and "s" keys are read exactly as in a group advert.
    sealed = decode_txt_untrusted(data)
    text = _ascii_value_untrusted(_txt_items_untrusted(data), b"t")
    if len(text) != _LAN_TAG_TEXT_LENGTH:
        raise BadFrame(f"invite tag is {_LAN_TAG_TEXT_LENGTH} base32 characters, got {len(text)}")
    lan_tag = b32decode_untrusted(text)
    if b32encode(lan_tag) != text.lower():
        raise BadFrame("invite tag is not canonical base32")
    return InviteAdvert(lan_tag, sealed)


def open_invite_advert(
    advert: InviteAdvert, lan_tag: bytes, advert_tag: bytes
) -> OpenedAdvert | None:
    """The inviter behind ``advert`` if it is for our code.

    ``None``: another code's advert (the tag differs). :class:`WrongSecretHalf`:
    our first half, but our second half does not open it (a typo, or an
    onlooker replaying the tag). :class:`BadFrame`: opens, but holds nonsense.
    """
    if not hmac.compare_digest(advert.lan_tag, lan_tag):
        return None
    opened = open_advert(advert.sealed, [advert_tag])
    if opened is None:
        raise WrongSecretHalf(
            "wrong or mistyped code: an inviter on this network offers a code with these "
            "first 8 characters, but the last 8 do not match it: check the last 8 characters "
            "(nothing was sent to the inviter or the relay; if they are right, join with "
            "--no-mdns to ask the relay only)"
        )
    return opened
