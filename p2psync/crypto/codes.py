"""Text encodings people copy, paste and type: checksummed codes and short codes.

Theory
------
Tickets and other codes travel through chat, e-mail and fingers. A typo
must be *detected*, never mis-parsed into a different but valid value.

**Checksummed codes** (:func:`encode_code`)::

    text     = prefix || base32(payload || checksum)     (lowercase, no padding)
    checksum = BLAKE3(b"p2psync code v1\\0" || prefix || b"\\0" || payload)[0:5]

The prefix (a short lowercase word such as ``p2pt`` for tickets) says what
the text is, and is covered by the checksum, so a valid code of one kind
never parses as another kind. The 40-bit checksum is a hash, not an
error-correcting code: *any* corruption (substitution, transposition,
deletion, insertion, truncation, or pasting the wrong thing) passes with
probability 2^-40 (about 1 in 10^12), whatever its shape. Decoding also
refuses a non-canonical last character (base32's unused low bits must be
zero), so one payload has exactly one spelling.

**Short codes** (:func:`format_short_code`): 80 bits as 16 characters of
Crockford's base32 (``0-9 A-Z`` without ``I L O U``), shown as
``XXXX-XXXX-XXXX-XXXX``. On input, ``i``/``l`` read as ``1`` and ``o`` as
``0``, case is ignored. There is no room for a checksum: every bit is
needed for the two 40-bit halves of the split token (see
:mod:`p2psync.pairing`). A short code's integrity comes from what it
unlocks: a typo in the first half finds no invite, a typo in the second
half fails relayd's fetch proof or the sealed LAN advert *before* anything
is consumed, so a typo yields "wrong or mistyped code", never a wrong group
and never a burnt invite.

Rules
-----
- Parsers are ``*_untrusted``, raise only :class:`BadCode` (a
  :class:`BadFrame`), and say what is wrong and where (1-based position in
  the text as given).
- Input longer than ``defaults.MAX_CODE_LENGTH`` is refused before any work.
- Whitespace (any Unicode space or line break) and dashes are ignored
  wherever they appear, and so is case: they never carry data, so skipping
  them cannot turn one code into another.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from typing import Final

import blake3

from p2psync import defaults
from p2psync.crypto.identity import b32encode
from p2psync.errors import BadFrame, LocalProtocolError

CHECKSUM_SIZE: Final = 5
SHORT_CODE_SIZE: Final = 10  # bytes: 80 bits
SHORT_CODE_CHARS: Final = 16  # 80 bits / 5 bits per character
SHORT_CODE_GROUP: Final = 4
MAX_PREFIX_LENGTH: Final = 16

_CHECKSUM_DOMAIN: Final = b"p2psync code v1\0"
_PREFIX_RE: Final = re.compile(r"[a-z][a-z0-9]*")
_B32_ALPHABET: Final = frozenset("abcdefghijklmnopqrstuvwxyz234567")
# Ignored anywhere in typed or pasted text, besides whitespace: dashes
# (including the typographic ones chat apps substitute for "-") and the
# invisible zero-width space and byte order mark that pasting picks up.
_SEPARATORS: Final = frozenset("-\u2010\u2011\u2012\u2013\u2014\u2212\u200b\ufeff")
# Crockford's base32: no I, L, O (confusable with 1, 1, 0) and no U.
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_VALUE: Final = {
    **{char: value for value, char in enumerate(_CROCKFORD)},
    "I": 1,
    "L": 1,
    "O": 0,
}
# What a code of a known prefix is, for error messages.
_KINDS: Final = {"p2pt": "ticket"}


class BadCode(BadFrame):
    """Text that is not a valid code: mistyped, truncated, or another kind."""


def _check_prefix(prefix: str) -> None:
    if not (0 < len(prefix) <= MAX_PREFIX_LENGTH and _PREFIX_RE.fullmatch(prefix)):
        raise LocalProtocolError(
            f"a code prefix is 1 to {MAX_PREFIX_LENGTH} lowercase ascii letters and digits, "
            f"starting with a letter; got {prefix!r}"
        )


def _checksum(prefix: str, payload: bytes) -> bytes:
    hasher = blake3.blake3(_CHECKSUM_DOMAIN)
    hasher.update(prefix.encode("ascii"))
    hasher.update(b"\0")
    hasher.update(payload)
    return hasher.digest(CHECKSUM_SIZE)


def _clean(text: str) -> tuple[str, list[int]]:
    """Drop separators and lowercase ASCII; keep each kept char's 1-based position."""
    if not isinstance(text, str):
        raise BadCode(f"a code is text, got {type(text).__name__}")
    if len(text) > defaults.MAX_CODE_LENGTH:
        raise BadCode(
            f"this is too long to be a code ({len(text)} characters, "
            f"at most {defaults.MAX_CODE_LENGTH})"
        )
    chars: list[str] = []
    positions: list[int] = []
    for index, char in enumerate(text):
        if char in _SEPARATORS or char.isspace():
            continue
        # Only ASCII is case-folded: str.lower() of some non-ASCII letters
        # changes length, and no non-ASCII character is valid anyway.
        chars.append(char.lower() if char.isascii() else char)
        positions.append(index + 1)
    return "".join(chars), positions


def encode_code(prefix: str, payload: bytes) -> str:
    """``prefix`` followed by base32 of ``payload`` and a 40-bit checksum."""
    _check_prefix(prefix)
    payload = bytes(payload)
    return prefix + b32encode(payload + _checksum(prefix, payload))


def decode_code_untrusted(text: str, prefix: str) -> bytes:
    """Inverse of :func:`encode_code`; :class:`BadCode` says exactly what is wrong."""
    _check_prefix(prefix)
    cleaned, positions = _clean(text)
    kind = _KINDS.get(prefix, "code")
    if not cleaned.startswith(prefix):
        raise BadCode(f"this is not a p2psync {kind} (expected it to start with {prefix!r})")
    body = cleaned[len(prefix) :]
    for offset, char in enumerate(body):
        if char not in _B32_ALPHABET:
            position = positions[len(prefix) + offset]
            raise BadCode(
                f"character {text[position - 1]!r} at position {position} cannot appear "
                f"in a {kind} (only letters a-z and digits 2-7)"
            )
    min_chars = len(b32encode(bytes(CHECKSUM_SIZE)))
    if len(body) < min_chars:
        raise BadCode(
            f"this {kind} is too short ({len(body)} characters after {prefix!r}, "
            f"at least {min_chars}): part of it is missing"
        )
    try:
        raw = base64.b32decode(body.upper() + "=" * (-len(body) % 8))
    except binascii.Error as exc:
        # Lengths of 1, 3 or 6 characters mod 8 cannot come from whole bytes.
        raise BadCode(
            f"this {kind} has an impossible length: a character is missing or extra"
        ) from exc
    if b32encode(raw) != body:
        raise BadCode(f"the last character of this {kind} is mistyped or something is missing")
    payload, checksum = raw[:-CHECKSUM_SIZE], raw[-CHECKSUM_SIZE:]
    if not hmac.compare_digest(checksum, _checksum(prefix, payload)):
        raise BadCode("checksum does not match: a character is mistyped or missing")
    return payload


def has_prefix(text: str, prefix: str) -> bool:
    """Whether pasted ``text`` starts with ``prefix`` once cleaned: which parser to use.

    Never raises for any ``str``; too-long text is "no" (its parser says why).
    """
    if not isinstance(text, str) or len(text) > defaults.MAX_CODE_LENGTH:
        return False
    return _clean(text)[0].startswith(prefix)


def format_short_code(raw: bytes) -> str:
    """80 bits as ``XXXX-XXXX-XXXX-XXXX`` in Crockford's base32."""
    if len(raw) != SHORT_CODE_SIZE:
        raise LocalProtocolError(f"a short code holds {SHORT_CODE_SIZE} bytes, got {len(raw)}")
    number = int.from_bytes(raw, "big")
    chars = [
        _CROCKFORD[(number >> (5 * (SHORT_CODE_CHARS - 1 - index))) & 0x1F]
        for index in range(SHORT_CODE_CHARS)
    ]
    groups = (
        "".join(chars[start : start + SHORT_CODE_GROUP])
        for start in range(0, SHORT_CODE_CHARS, SHORT_CODE_GROUP)
    )
    return "-".join(groups)


def parse_short_code_untrusted(text: str) -> bytes:
    """Inverse of :func:`format_short_code`, forgiving case, separators and I/L/O.

    There is no checksum: a typo gives other bytes, which fail the MAC or
    decryption the code unlocks ("wrong or mistyped code").
    """
    cleaned, positions = _clean(text)
    number = 0
    for index, char in enumerate(cleaned):
        value = _CROCKFORD_VALUE.get(char.upper() if char.isascii() else char)
        if value is None:
            raise BadCode(
                f"character {text[positions[index] - 1]!r} at position {positions[index]} "
                "cannot appear in a short code (digits and letters other than U)"
            )
        number = (number << 5) | value
    if len(cleaned) != SHORT_CODE_CHARS:
        raise BadCode(
            f"a short code has {SHORT_CODE_CHARS} characters (XXXX-XXXX-XXXX-XXXX), "
            f"got {len(cleaned)}"
        )
    return number.to_bytes(SHORT_CODE_SIZE, "big")
