"""Shared pieces of the CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def demo_workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make ``p2psync demo`` work in a known directory instead of a fresh temp one."""
    workdir = tmp_path / "demo"

    def mkdtemp(prefix: str = "") -> str:
        workdir.mkdir()
        return str(workdir)

    monkeypatch.setattr("p2psync.demo.tempfile.mkdtemp", mkdtemp)
    return workdir
