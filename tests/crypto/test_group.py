"""Group secret, key derivation, membership MAC and mDNS tags."""

from __future__ import annotations

import dataclasses
import os
import struct

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync.crypto.group import (
    GROUP_SECRET_SIZE,
    GroupKeys,
    GroupSecret,
    group_id_text,
    mdns_tag,
    membership_mac,
    verify_membership_mac,
)
from p2psync.crypto.identity import b32decode_untrusted
from p2psync.errors import BadFrame, IntegrityError, LocalProtocolError

SECRET = bytes(range(GROUP_SECRET_SIZE))
KEY_FIELDS = [f.name for f in dataclasses.fields(GroupKeys) if f.name != "epoch"]


def test_derivation_is_deterministic() -> None:
    assert GroupKeys.derive(SECRET, 1) == GroupKeys.derive(SECRET, 1)
    assert GroupSecret(SECRET, 3).keys() == GroupKeys.derive(SECRET, 3)


def test_every_key_is_32_bytes_and_distinct() -> None:
    keys = GroupKeys.derive(SECRET, 1)
    values = [getattr(keys, name) for name in KEY_FIELDS]
    assert all(len(value) == 32 for value in values)
    assert len(set(values)) == len(KEY_FIELDS)
    assert SECRET not in values


def test_derivation_pins_the_format() -> None:
    # The contexts and the key material layout are part of the protocol:
    # changing them silently would orphan every existing group.
    keys = GroupKeys.derive(SECRET, 7)
    material = SECRET + struct.pack(">I", 7)
    contexts = {
        "blob_key": "blob key",
        "meta_key": "meta key",
        "index_key": "index key",
        "membership_key": "membership key",
        "mdns_tag_key": "mdns tag key",
        "dedupe_key": "dedupe key",
        "invite_key": "invite key",
    }
    for name, purpose in contexts.items():
        context = f"p2psync 2026 {purpose} v1"
        assert getattr(keys, name) == blake3.blake3(material, derive_key_context=context).digest()
    group_id_context = "p2psync 2026 group id v1"
    assert keys.group_id == blake3.blake3(SECRET, derive_key_context=group_id_context).digest()
    assert keys.epoch == 7


def test_group_id_is_stable_across_epochs_and_other_keys_are_not() -> None:
    first = GroupKeys.derive(SECRET, 1)
    second = GroupKeys.derive(SECRET, 2)
    assert first.group_id == second.group_id
    for name in KEY_FIELDS:
        if name not in ("group_id", "mailbox_seed"):  # both from the secret alone
            assert getattr(first, name) != getattr(second, name), name
    assert first.mailbox_seed == second.mailbox_seed


def test_different_secrets_give_different_groups() -> None:
    other = GroupKeys.derive(bytes(reversed(SECRET)), 1)
    keys = GroupKeys.derive(SECRET, 1)
    for name in KEY_FIELDS:
        assert getattr(keys, name) != getattr(other, name)


def test_generate_uses_injected_randomness() -> None:
    secret = GroupSecret.generate(lambda n: b"\x05" * n)
    assert secret == GroupSecret(b"\x05" * 32, 1)
    assert GroupSecret.generate(os.urandom, epoch=4).epoch == 4
    assert GroupSecret.generate(os.urandom) != GroupSecret.generate(os.urandom)


def test_group_id_text() -> None:
    keys = GroupKeys.derive(SECRET, 1)
    text = group_id_text(keys.group_id)
    assert text == text.lower()
    assert len(text) == 52
    assert b32decode_untrusted(text) == keys.group_id


def test_reprs_hide_secrets() -> None:
    secret = GroupSecret(SECRET, 2)
    keys = secret.keys()
    secret_repr = repr(secret)
    keys_repr = repr(keys)
    assert "hidden" in secret_repr
    assert "hidden" in keys_repr
    assert "epoch=2" in secret_repr
    assert "epoch=2" in keys_repr
    assert group_id_text(keys.group_id) in keys_repr
    assert group_id_text(keys.group_id)[:10] in secret_repr
    forbidden = [SECRET] + [getattr(keys, name) for name in KEY_FIELDS if name != "group_id"]
    for value in forbidden:
        for spelling in (value.hex(), repr(value), group_id_text(value)[:16]):
            assert spelling not in secret_repr
            assert spelling not in keys_repr


def test_to_bytes_layout_and_round_trip() -> None:
    secret = GroupSecret(SECRET, 0x01020304)
    data = secret.to_bytes()
    assert data == b"\x01" + b"\x01\x02\x03\x04" + SECRET
    assert GroupSecret.from_bytes_untrusted(data) == secret
    assert GroupSecret.from_bytes_untrusted(bytearray(data)) == secret


@given(st.binary(min_size=32, max_size=32), st.integers(1, 2**32 - 1))
def test_to_bytes_round_trip_any(secret: bytes, epoch: int) -> None:
    value = GroupSecret(secret, epoch)
    assert GroupSecret.from_bytes_untrusted(value.to_bytes()) == value


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "37 bytes"),
        (b"\x01\x00\x00\x00\x01" + SECRET[:-1], "37 bytes"),
        (b"\x01\x00\x00\x00\x01" + SECRET + b"\x00", "37 bytes"),
        (b"\x02\x00\x00\x00\x01" + SECRET, "version 2"),
        (b"\x00\x00\x00\x00\x01" + SECRET, "version 0"),
        (b"\x01\x00\x00\x00\x00" + SECRET, "epoch"),
    ],
)
def test_from_bytes_rejects(data: bytes, message: str) -> None:
    with pytest.raises(BadFrame, match=message):
        GroupSecret.from_bytes_untrusted(data)


@given(st.binary(max_size=80))
def test_any_bytes_give_a_value_or_bad_frame(data: bytes) -> None:
    try:
        value = GroupSecret.from_bytes_untrusted(data)
    except BadFrame:
        return
    assert value.to_bytes() == data


def test_direct_construction_is_checked() -> None:
    with pytest.raises(BadFrame):
        GroupSecret(SECRET[:16], 1)
    with pytest.raises(BadFrame):
        GroupSecret(SECRET, 0)
    with pytest.raises(BadFrame):
        GroupSecret(SECRET, 2**32)
    with pytest.raises(BadFrame):
        GroupKeys.derive(SECRET + b"x", 1)
    with pytest.raises(BadFrame):
        GroupKeys.derive(SECRET, -1)


def test_membership_mac_verifies_and_detects_tampering() -> None:
    keys = GroupKeys.derive(SECRET, 1)
    transcript = b"challenge|dialer|acceptor"
    mac = membership_mac(keys, transcript)
    assert len(mac) == 32
    assert mac == blake3.blake3(transcript, key=keys.membership_key).digest()
    verify_membership_mac(keys, transcript, mac)

    with pytest.raises(IntegrityError):
        verify_membership_mac(keys, transcript + b"x", mac)
    with pytest.raises(IntegrityError):
        verify_membership_mac(GroupKeys.derive(SECRET, 2), transcript, mac)
    with pytest.raises(IntegrityError):
        verify_membership_mac(GroupKeys.derive(bytes(32), 1), transcript, mac)
    with pytest.raises(IntegrityError):
        verify_membership_mac(keys, transcript, mac[:-1])
    with pytest.raises(IntegrityError):
        verify_membership_mac(keys, transcript, b"")
    for index in range(len(mac)):
        tampered = bytearray(mac)
        tampered[index] ^= 0x10
        with pytest.raises(IntegrityError):
            verify_membership_mac(keys, transcript, bytes(tampered))


def test_mdns_tag() -> None:
    keys = GroupKeys.derive(SECRET, 1)
    tag = mdns_tag(keys, 42)
    assert len(tag) == 16
    expected = blake3.blake3(b"mdns-tag" + struct.pack(">Q", 42), key=keys.mdns_tag_key)
    assert tag == expected.digest(16)
    assert mdns_tag(keys, 42) == tag
    assert mdns_tag(keys, 43) != tag
    assert mdns_tag(GroupKeys.derive(SECRET, 2), 42) != tag
    assert len(mdns_tag(keys, 0)) == len(mdns_tag(keys, 2**64 - 1)) == 16
    with pytest.raises(LocalProtocolError):
        mdns_tag(keys, -1)
    with pytest.raises(LocalProtocolError):
        mdns_tag(keys, 2**64)
