"""Sealed object, manifest and metadata codecs: round trips and clean failures."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2psync import defaults
from p2psync.crypto.group import GroupSecret
from p2psync.errors import BadFrame, IntegrityError
from p2psync.store.objects import (
    ChunkRef,
    KeyEpochUnknown,
    Manifest,
    Meta,
    ObjectKind,
    decode_manifest_untrusted,
    decode_meta_untrusted,
    object_id,
    open_meta,
    open_sealed_object,
    read_header_untrusted,
    seal,
    seal_meta,
)

KEYS = GroupSecret(b"\x05" * 32, 1).keys()
KEYRING = {1: KEYS}

app_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=20),
    st.binary(max_size=20),
)  # fmt: skip
metas = st.builds(
    Meta,
    key=st.text(max_size=60),
    content_type=st.none() | st.text(max_size=30),
    name=st.none() | st.text(max_size=30),
    app=st.dictionaries(st.text(max_size=10), app_values, max_size=5),
)


@given(metas)
def test_meta_round_trip_through_sealing(meta: Meta) -> None:
    sealed = seal_meta(KEYS, meta, os.urandom)
    assert open_meta(KEYRING, sealed) == meta
    assert decode_meta_untrusted(meta.encode()) == meta


@given(st.lists(st.integers(1, defaults.CHUNK_SIZE), min_size=2, max_size=40))
def test_manifest_round_trip(sizes: list[int]) -> None:
    manifest = Manifest(sum(sizes), tuple(ChunkRef(os.urandom(32), s) for s in sizes))
    assert decode_manifest_untrusted(manifest.encode()) == manifest


def test_manifest_totals_must_add_up() -> None:
    bad = Manifest(10, (ChunkRef(b"\x01" * 32, 4), ChunkRef(b"\x02" * 32, 4)))
    with pytest.raises(BadFrame, match="add up"):
        decode_manifest_untrusted(bad.encode())


@given(st.binary(max_size=3000))
def test_sealing_is_deterministic_and_content_addressed(data: bytes) -> None:
    first = seal(KEYS, ObjectKind.CHUNK, data)
    assert seal(KEYS, ObjectKind.CHUNK, data) == first
    assert open_sealed_object(KEYRING, first, ObjectKind.CHUNK) == data
    assert read_header_untrusted(first) == (ObjectKind.CHUNK, 1)
    # Same plaintext as another kind: a different nonce, never a reused one.
    other = seal(KEYS, ObjectKind.MANIFEST, data)
    assert other[6:30] != first[6:30]
    assert object_id(other) != object_id(first)


def test_other_groups_and_epochs_cannot_open() -> None:
    sealed = seal(KEYS, ObjectKind.CHUNK, b"secret")
    stranger = GroupSecret(b"\x06" * 32, 1).keys()
    with pytest.raises(IntegrityError):
        open_sealed_object({1: stranger}, sealed, ObjectKind.CHUNK)
    with pytest.raises(KeyEpochUnknown, match="epoch 1"):
        open_sealed_object({2: GroupSecret(b"\x05" * 32, 2).keys()}, sealed, ObjectKind.CHUNK)


def test_meta_limits() -> None:
    with pytest.raises(BadFrame, match="limit"):
        Meta(key="k", app={"big": b"x" * (defaults.MAX_META_PLAINTEXT + 1)}).encode()
    with pytest.raises(BadFrame, match="the key is"):
        Meta(key="k" * (defaults.MAX_KEY_LENGTH + 1))


@given(st.binary(max_size=200))
def test_header_any_bytes(data: bytes) -> None:
    try:
        read_header_untrusted(data)
    except BadFrame:
        pass
