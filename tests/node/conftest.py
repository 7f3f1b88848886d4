"""Helpers for node tests: devices of one group on loopback."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from p2psync.crypto.group import GroupSecret
from p2psync.home import Home
from p2psync.node import Node


@pytest.fixture
def make_home(tmp_path: Path) -> Callable[..., Home]:
    """``make_home(name, secret)``: a device home; same secret = same group."""

    def make(name: str, secret: GroupSecret | None) -> Home:
        home = Home(tmp_path / name)
        home.init(os.urandom, name=name)
        if secret is not None:
            home.save_secret(secret)
        return home

    return make


async def wait_until(node: Node, predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds, re-checking on every change.

    Unbounded by itself: callers wrap tests in ``trio.fail_after``.
    """
    while not predicate():
        with trio.move_on_after(0.05):
            await node.changes().wait()
