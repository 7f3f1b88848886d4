"""Rotating group tags and the sealed mDNS advert (p2psync.discovery.tags)."""

from __future__ import annotations

import os
import struct

import blake3
import nacl.bindings as sodium
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.crypto.group import GroupSecret, mdns_tag
from p2psync.crypto.identity import Identity, b32encode
from p2psync.discovery.tags import (
    ADVERT_AAD,
    MAX_TXT_SIZE,
    SEALED_SIZE,
    TAG_WINDOW_SECONDS,
    SealedAdvert,
    advert_label,
    advert_tag,
    current_tags,
    decode_txt_untrusted,
    open_advert,
    window_at,
)
from p2psync.errors import BadFrame, LocalProtocolError

SECRET = GroupSecret(bytes(range(32)), 1)
KEYS = SECRET.keys()
OTHER_KEYS = GroupSecret(bytes(range(1, 33)), 1).keys()
NODE = Identity.from_seed(b"\x07" * 32).node_id
W = TAG_WINDOW_SECONDS
T0 = 1_800_000_000.0  # some unix time in 2027


def fixed_random(n: int) -> bytes:
    return bytes(range(n))


def txt(*items: bytes) -> bytes:
    return b"".join(bytes([len(item)]) + item for item in items)


def sealed_text(advert: SealedAdvert) -> bytes:
    return b"s=" + b32encode(advert.sealed).encode()


# --- windows and tags ---------------------------------------------------------------


def test_window_is_floor_of_unix_time_over_15_minutes() -> None:
    assert W == 900
    assert window_at(0) == 0
    assert window_at(899.999) == 0
    assert window_at(900) == 1
    assert window_at(T0) == 2_000_000
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(LocalProtocolError):
            window_at(bad)


def test_advert_tag_is_the_group_tag_of_the_current_window() -> None:
    assert advert_tag(KEYS, T0) == mdns_tag(KEYS, 2_000_000)
    assert advert_tag(KEYS, T0 + W - 1) == advert_tag(KEYS, T0)
    assert advert_tag(KEYS, T0 + W) != advert_tag(KEYS, T0)  # rotates
    assert advert_tag(OTHER_KEYS, T0) != advert_tag(KEYS, T0)


def test_current_tags_are_current_and_previous_window_of_every_epoch() -> None:
    w = window_at(T0)
    assert current_tags([KEYS], T0) == {mdns_tag(KEYS, w), mdns_tag(KEYS, w - 1)}
    assert mdns_tag(KEYS, w - 2) not in current_tags([KEYS], T0)
    assert mdns_tag(KEYS, w + 1) not in current_tags([KEYS], T0)
    epoch2 = GroupSecret(SECRET.secret, 2).keys()
    both = current_tags([KEYS, epoch2], T0)
    assert len(both) == 4 and mdns_tag(epoch2, w - 1) in both
    assert current_tags([KEYS], 10.0) == {mdns_tag(KEYS, 0)}  # no window -1
    assert current_tags([], T0) == set()


@pytest.mark.parametrize(
    ("sealed_at", "checked_at", "accepted"),
    [
        (T0, T0, True),
        (T0, T0 + W - 0.001, True),  # same window
        (T0 + W - 0.001, T0 + W, True),  # sealed just before the boundary
        (T0, T0 + 2 * W - 0.001, True),  # previous window: still accepted
        (T0, T0 + 2 * W, False),  # two windows old: rejected
        (T0, T0 + 5 * W, False),
        (T0 + W, T0, False),  # a window ahead of our clock: not accepted
    ],
)
def test_rotation_accepts_current_and_previous_window_only(
    sealed_at: float, checked_at: float, accepted: bool
) -> None:
    advert = SealedAdvert.seal(advert_tag(KEYS, sealed_at), NODE, 47300, os.urandom)
    opened = open_advert(advert, current_tags([KEYS], checked_at))
    assert (opened is not None) is accepted
    if opened is not None:
        assert opened.tag == advert_tag(KEYS, sealed_at)


def test_another_groups_advert_does_not_open() -> None:
    advert = SealedAdvert.seal(advert_tag(OTHER_KEYS, T0), NODE, 47300, os.urandom)
    assert open_advert(advert, current_tags([KEYS], T0)) is None
    assert open_advert(advert, []) is None


# --- the sealed advert and its TXT record ---------------------------------------------


def test_txt_round_trip() -> None:
    tag = advert_tag(KEYS, T0)
    advert = SealedAdvert.seal(tag, NODE, 47301, os.urandom)
    data = advert.to_txt()
    assert len(data) == 126 and data.startswith(b"\x03v=1\x79s=")
    decoded = decode_txt_untrusted(data)
    assert decoded == advert
    opened = open_advert(decoded, current_tags([OTHER_KEYS, KEYS], T0))
    assert opened is not None
    assert (opened.node_id, opened.port, opened.tag) == (NODE, 47301, tag)


def test_sealed_format_matches_the_module_docs() -> None:
    """K = BLAKE3-derive(context, tag); box = XChaCha20-Poly1305(K, nonce, id || port)."""
    tag = advert_tag(KEYS, T0)
    advert = SealedAdvert.seal(tag, NODE, 0x1234, fixed_random)
    assert len(advert.sealed) == SEALED_SIZE == 74
    nonce, box = advert.sealed[:24], advert.sealed[24:]
    assert nonce == bytes(range(24))
    key = blake3.blake3(tag, derive_key_context="p2psync 2026 mdns advert key v1").digest()
    plaintext = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(box, ADVERT_AAD, nonce, key)
    assert plaintext == NODE.raw + struct.pack(">H", 0x1234)


def test_adverts_hide_the_node_id_and_never_repeat() -> None:
    """Same device, same group, same window: unlinkable blobs, no NodeId in clear."""
    tag = advert_tag(KEYS, T0)
    other_member = Identity.from_seed(b"\x08" * 32).node_id
    adverts = [SealedAdvert.seal(tag, n, 47300, os.urandom) for n in (NODE, NODE, other_member)]
    records = [a.to_txt() for a in adverts]
    assert len(set(records)) == 3
    for data in records:
        for node in (NODE, other_member):
            assert node.raw not in data and str(node).encode() not in data
            assert str(node).encode() not in data.lower()


def test_decode_follows_rfc6763_key_rules() -> None:
    advert = SealedAdvert.seal(advert_tag(KEYS, T0), NODE, 47300, os.urandom)
    s = sealed_text(advert)
    # Keys are case-insensitive, unknown keys and empty strings are ignored,
    # the first occurrence of a key wins, "=value" strings are ignored.
    variants = [
        txt(b"V=1", b"S" + s[1:]),
        txt(b"", b"x=future", b"v=1", b"=junk", s, b"flag"),
        txt(s, b"v=1", b"v=2", b"s=junk"),
    ]
    for data in variants:
        assert decode_txt_untrusted(data) == advert


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        txt(b"v=1"),
        txt(b"s=abc"),
        txt(b"v=2", b"s=" + b"a" * 119),
        txt(b"v", b"s=" + b"a" * 119),
        txt(b"v=1", b"s"),
        txt(b"v=1", b"s=" + b"a" * 118),
        txt(b"v=1", b"s=" + b"1" * 119),  # not base32
        txt(b"v=1", b"s=" + b"a" * 118 + b"b"),  # non-canonical final character
        txt(b"v=\xff", b"s=" + b"a" * 119),
        b"\x05v=1",  # string runs past the end
        txt(b"v=1", b"x=" + b"y" * 250, b"z=" + b"y" * 200),  # larger than MAX_TXT_SIZE
    ],
)
def test_decode_rejects_with_badframe(data: bytes) -> None:
    with pytest.raises(BadFrame):
        decode_txt_untrusted(data)


def test_max_txt_size_is_enforced_exactly() -> None:
    advert = SealedAdvert.seal(advert_tag(KEYS, T0), NODE, 47300, os.urandom)
    base = advert.to_txt()
    first = txt(b"x=" + b"y" * 150)  # unknown keys pad it to the limit exactly
    rest = MAX_TXT_SIZE - len(base) - len(first) - 1 - 2  # length byte, "z="
    fits = base + first + txt(b"z=" + b"y" * rest)
    assert len(fits) == MAX_TXT_SIZE
    assert decode_txt_untrusted(fits) == advert
    with pytest.raises(BadFrame):
        decode_txt_untrusted(fits + b"\x00")


def _seal_raw(tag: bytes, plaintext: bytes) -> SealedAdvert:
    key = blake3.blake3(tag, derive_key_context="p2psync 2026 mdns advert key v1").digest()
    nonce = os.urandom(24)
    box = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ADVERT_AAD, nonce, key)
    return SealedAdvert(nonce + box)


def test_a_member_advert_with_nonsense_inside_is_badframe() -> None:
    tag = advert_tag(KEYS, T0)
    tags = current_tags([KEYS], T0)
    not_a_point = bytes([1]) + bytes(30) + bytes([0x80])  # y >= p: not an Ed25519 point
    with pytest.raises(BadFrame):
        open_advert(_seal_raw(tag, not_a_point + struct.pack(">H", 47300)), tags)
    with pytest.raises(BadFrame):
        open_advert(_seal_raw(tag, NODE.raw + struct.pack(">H", 0)), tags)


def test_seal_rejects_bad_arguments() -> None:
    tag = advert_tag(KEYS, T0)
    for port in (0, 65536, -1, True):
        with pytest.raises(LocalProtocolError):
            SealedAdvert.seal(tag, NODE, port, os.urandom)
    with pytest.raises(LocalProtocolError):
        SealedAdvert.seal(tag[:8], NODE, 47300, os.urandom)
    with pytest.raises(LocalProtocolError):
        SealedAdvert.seal(tag, NODE, 47300, lambda n: b"short")
    with pytest.raises(BadFrame):
        SealedAdvert(b"\x00" * 73)


def test_advert_labels_are_random_dns_labels() -> None:
    labels = {advert_label(os.urandom) for _ in range(100)}
    assert len(labels) == 100
    for label in labels:
        assert label.startswith("p2ps-") and len(label) == 21
        assert label == label.lower() and label[5:].isalnum()
    assert advert_label(fixed_random) == "p2ps-" + b32encode(bytes(range(10)))


# --- any bytes -> a clean error ---------------------------------------------------------


@given(st.binary(max_size=600))
def test_any_bytes_decode_or_badframe(data: bytes) -> None:
    try:
        advert = decode_txt_untrusted(data)
    except BadFrame:
        return
    assert len(advert.sealed) == SEALED_SIZE


_txt_item = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"v=1", b"V=1", b"v=2", b"v", b"s", b"s=", b"=x"]),
    st.text("abcdefghijklmnopqrstuvwxyz234567", min_size=117, max_size=121).map(
        lambda s: b"s=" + s.encode()
    ),
)


@given(st.lists(_txt_item, max_size=6))
def test_structured_txt_decodes_or_badframe(items: list[bytes]) -> None:
    """Well-formed TXT framing with p2psync-like keys: the decoder's deeper paths."""
    try:
        advert = decode_txt_untrusted(txt(*items))
    except BadFrame:
        return
    # A random blob that decodes never opens under a real tag.
    assert open_advert(advert, current_tags([KEYS], T0)) is None


@given(st.binary(min_size=SEALED_SIZE, max_size=SEALED_SIZE))
def test_random_sealed_blobs_open_to_none(sealed: bytes) -> None:
    assert open_advert(SealedAdvert(sealed), current_tags([KEYS, OTHER_KEYS], T0)) is None
