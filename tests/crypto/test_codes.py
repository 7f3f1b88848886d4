"""Checksummed codes and short codes: typos are detected, never mis-parsed."""

from __future__ import annotations

import re

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync import defaults
from p2psync.crypto.codes import (
    BadCode,
    decode_code_untrusted,
    encode_code,
    format_short_code,
    parse_short_code_untrusted,
)
from p2psync.crypto.identity import b32encode
from p2psync.errors import BadFrame, LocalProtocolError

PAYLOAD = bytes(range(40))
TICKET = encode_code("p2pt", PAYLOAD)
BODY_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
SHORT_RAW = bytes.fromhex("00112233445566778899")
SEPARATORS = "-\u2010\u2011\u2012\u2013\u2014\u2212\u200b\ufeff"


def test_format_is_prefix_base32_payload_and_checksum() -> None:
    checksum = blake3.blake3(b"p2psync code v1\0p2pt\0" + PAYLOAD).digest(5)
    assert encode_code("p2pt", PAYLOAD) == "p2pt" + b32encode(PAYLOAD + checksum)
    assert decode_code_untrusted(TICKET, "p2pt") == PAYLOAD


@given(st.binary(max_size=200), st.sampled_from(["p2pt", "p2pi", "x", "code7"]))
def test_round_trip(payload: bytes, prefix: str) -> None:
    text = encode_code(prefix, payload)
    assert text.startswith(prefix)
    assert text == text.lower()
    assert decode_code_untrusted(text, prefix) == payload


def test_tolerates_whitespace_dashes_and_case() -> None:
    body = TICKET[4:]
    chunked = "-".join(body[i : i + 5] for i in range(0, len(body), 5))
    variants = [
        f"  {TICKET}\n",
        TICKET.upper(),
        f"P2PT-{chunked}",
        "p2pt " + " ".join(body[i : i + 8] for i in range(0, len(body), 8)),
        "p2pt\n" + "\n".join(body[i : i + 20] for i in range(0, len(body), 20)) + "\r\n",
        "\tp2pt\t" + body.swapcase(),
        # Pasted from chat: no-break spaces, an en dash, a zero-width space.
        "\u00a0p2pt\u2013" + body[:8] + "\u200b" + body[8:] + "\u00a0",
    ]
    for text in variants:
        assert decode_code_untrusted(text, "p2pt") == PAYLOAD, text


def test_every_single_substitution_is_rejected() -> None:
    body_start = len("p2pt")
    rejected = 0
    for index in range(body_start, len(TICKET)):
        for char in BODY_ALPHABET:
            if char == TICKET[index]:
                continue
            typo = TICKET[:index] + char + TICKET[index + 1 :]
            with pytest.raises(BadCode):
                decode_code_untrusted(typo, "p2pt")
            rejected += 1
    assert rejected == (len(TICKET) - body_start) * 31


def test_every_adjacent_transposition_is_rejected() -> None:
    for index in range(len(TICKET) - 1):
        swapped = TICKET[:index] + TICKET[index + 1] + TICKET[index] + TICKET[index + 2 :]
        if swapped == TICKET:
            continue  # two equal neighbours: not a typo
        with pytest.raises(BadCode):
            decode_code_untrusted(swapped, "p2pt")


def test_every_deletion_and_insertion_is_rejected() -> None:
    for index in range(len(TICKET)):
        with pytest.raises(BadCode):
            decode_code_untrusted(TICKET[:index] + TICKET[index + 1 :], "p2pt")
    for index in range(4, len(TICKET) + 1):
        for char in "a7q":
            with pytest.raises(BadCode):
                decode_code_untrusted(TICKET[:index] + char + TICKET[index:], "p2pt")


def test_truncation_is_rejected() -> None:
    for length in range(len(TICKET)):
        with pytest.raises(BadCode):
            decode_code_untrusted(TICKET[:length], "p2pt")


def test_checksum_mismatch_message() -> None:
    # Change one whole payload byte: the length and ending stay valid.
    other = encode_code("p2pt", b"\xff" + PAYLOAD[1:])
    forged = other[:10] + TICKET[10:]
    assert forged != TICKET
    with pytest.raises(BadCode, match="checksum does not match"):
        decode_code_untrusted(forged, "p2pt")
    typo = TICKET[:6] + ("b" if TICKET[6] != "b" else "c") + TICKET[7:]
    with pytest.raises(
        BadCode, match="checksum does not match: a character is mistyped or missing"
    ):
        decode_code_untrusted(typo, "p2pt")


def test_wrong_prefix_message() -> None:
    with pytest.raises(
        BadCode, match=re.escape("not a p2psync ticket (expected it to start with 'p2pt')")
    ):
        decode_code_untrusted("hello world", "p2pt")
    # A valid code of another kind never passes as a ticket.
    invite = encode_code("p2pi", PAYLOAD)
    with pytest.raises(BadCode):
        decode_code_untrusted(invite, "p2pt")
    # Same body under another prefix: the checksum covers the prefix.
    with pytest.raises(BadCode, match="checksum"):
        decode_code_untrusted("p2pi" + TICKET[4:], "p2pi")


def test_bad_character_message_has_position() -> None:
    typo = TICKET[:9] + "1" + TICKET[10:]
    with pytest.raises(BadCode, match="character '1' at position 10"):
        decode_code_untrusted(typo, "p2pt")
    # Positions count in the text as given, separators included.
    with pytest.raises(BadCode, match="character '!' at position 8"):
        decode_code_untrusted("  p2pt-!" + TICKET[4:], "p2pt")
    with pytest.raises(BadCode, match="character 'É' at position 6"):
        decode_code_untrusted("p2pt-É" + TICKET[4:], "p2pt")


def test_too_short_and_impossible_length_messages() -> None:
    with pytest.raises(BadCode, match="too short"):
        decode_code_untrusted("p2pt", "p2pt")
    with pytest.raises(BadCode, match="too short"):
        decode_code_untrusted(TICKET[:11], "p2pt")
    # 9 characters (1 mod 8) cannot come from whole bytes.
    with pytest.raises(BadCode, match="impossible length"):
        decode_code_untrusted("p2pt" + "a" * 9, "p2pt")


def test_non_canonical_ending_is_rejected() -> None:
    # 6 bytes = 48 bits -> 10 characters, the last with 3 unused low bits.
    text = encode_code("p2pt", b"x")
    last = BODY_ALPHABET.index(text[-1])
    other = BODY_ALPHABET[last | 1]
    assert other != text[-1]
    with pytest.raises(BadCode, match="last character"):
        decode_code_untrusted(text[:-1] + other, "p2pt")


def test_overlong_input_is_refused_before_decoding() -> None:
    text = "p2pt" + "a" * defaults.MAX_CODE_LENGTH
    with pytest.raises(BadCode, match="too long"):
        decode_code_untrusted(text, "p2pt")
    with pytest.raises(BadCode, match="too long"):
        parse_short_code_untrusted("0" * (defaults.MAX_CODE_LENGTH + 1))


def test_bad_prefix_is_a_local_error() -> None:
    for prefix in ("", "P2PT", "p2p-t", "2p", "a" * 17):
        with pytest.raises(LocalProtocolError):
            encode_code(prefix, b"x")
        with pytest.raises(LocalProtocolError):
            decode_code_untrusted(TICKET, prefix)


@given(st.text(max_size=120))
def test_any_text_gives_bytes_or_bad_code(text: str) -> None:
    try:
        payload = decode_code_untrusted(text, "p2pt")
    except BadCode:
        return
    kept = "".join(c for c in text if not (c.isspace() or c in SEPARATORS))
    assert encode_code("p2pt", payload) == kept.lower()


@given(st.text(alphabet="p2t" + BODY_ALPHABET + " -", max_size=60))
def test_near_miss_text_gives_bytes_or_bad_code(text: str) -> None:
    try:
        payload = decode_code_untrusted("p2pt" + text, "p2pt")
    except BadCode:
        return
    assert encode_code("p2pt", payload) == "p2pt" + text.replace(" ", "").replace("-", "")


# --- short codes -------------------------------------------------------------


def test_short_code_format() -> None:
    code = format_short_code(SHORT_RAW)
    assert re.fullmatch(r"[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}-[0-9A-Z]{4}", code)
    assert not set(code) & set("ILOU")
    assert parse_short_code_untrusted(code) == SHORT_RAW
    assert format_short_code(bytes(10)) == "0000-0000-0000-0000"
    assert format_short_code(b"\xff" * 10) == "ZZZZ-ZZZZ-ZZZZ-ZZZZ"
    # 0x00000000000000000001 is 1 in the last 5-bit group.
    assert format_short_code(bytes(9) + b"\x01") == "0000-0000-0000-0001"


@given(st.binary(min_size=10, max_size=10))
def test_short_code_round_trip(raw: bytes) -> None:
    code = format_short_code(raw)
    assert parse_short_code_untrusted(code) == raw
    assert parse_short_code_untrusted(code.lower()) == raw
    assert parse_short_code_untrusted(code.replace("-", "")) == raw
    assert parse_short_code_untrusted(f" {code.replace('-', ' ')}\n") == raw


def test_short_code_confusables_map_to_digits() -> None:
    code = format_short_code(bytes(9) + b"\x21")  # ends in ...0011: "1" and "1"
    assert code == "0000-0000-0000-0011"
    assert parse_short_code_untrusted("oOoo-0000-0000-00iL") == bytes(9) + b"\x21"
    assert parse_short_code_untrusted("OOOO OOOO OOOO OOli") == bytes(9) + b"\x21"


def test_short_code_errors() -> None:
    with pytest.raises(BadCode, match="character 'U' at position 3"):
        parse_short_code_untrusted("00U0-0000-0000-0000")
    with pytest.raises(BadCode, match="position 6"):
        parse_short_code_untrusted("0000-*000-0000-0000")
    with pytest.raises(BadCode, match="16 characters"):
        parse_short_code_untrusted("0000-0000-0000-000")
    with pytest.raises(BadCode, match="16 characters"):
        parse_short_code_untrusted("0000-0000-0000-00000")
    with pytest.raises(BadCode):
        parse_short_code_untrusted("")
    with pytest.raises(LocalProtocolError):
        format_short_code(bytes(9))


@given(st.text(max_size=40))
def test_any_text_gives_short_code_bytes_or_bad_code(text: str) -> None:
    try:
        raw = parse_short_code_untrusted(text)
    except BadCode:
        return
    assert len(raw) == 10
    assert parse_short_code_untrusted(format_short_code(raw)) == raw


def test_bad_code_is_a_bad_frame() -> None:
    assert issubclass(BadCode, BadFrame)
