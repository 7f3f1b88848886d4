"""Shared fixtures: throw-away devices and groups."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.store import Store


@pytest.fixture
def group_secret() -> GroupSecret:
    return GroupSecret.generate(os.urandom)


@pytest.fixture
def make_store(tmp_path: Path, group_secret: GroupSecret) -> Iterator[object]:
    """Factory: ``make_store(name)`` opens a new device's store in the shared group."""
    opened: list[Store] = []

    def make(name: str = "a", secret: GroupSecret | None = None) -> Store:
        store = Store(tmp_path / name, Identity.generate(os.urandom), [secret or group_secret])
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()
