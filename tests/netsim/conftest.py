"""netsim test plumbing: prerequisites, a time bound, and a clean slate.

Tests marked ``@pytest.mark.netsim`` build real namespaces. Before each one
the prerequisites are checked once per session (root, ``ip``, ``nft``, a
namespace can be created): when they are missing, the test is skipped with
the reason - or, under ``CI=true``, fails with it, so a CI machine that
cannot run netsim never passes silently.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from netsim import netns
from netsim.topology import PROJECT_PREFIX


@functools.cache
def _missing_prerequisites() -> tuple[str, ...]:
    return tuple(netns.missing_prerequisites())


def require_netsim() -> None:
    """Skip (or under CI=true, fail) when this machine cannot build namespaces."""
    problems = _missing_prerequisites()
    if not problems:
        return
    reason = "netsim prerequisites missing: " + "; ".join(problems)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def netsim_available() -> None:
    """Request this from module- or session-scoped fixtures that build networks."""
    require_netsim()


@pytest.fixture(autouse=True)
def _netsim_prerequisites(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("netsim") is not None:
        request.getfixturevalue("netsim_available")


@pytest.fixture
def netsim_out(tmp_path: Path) -> Path:
    """Base folder for the process logs of the runs a test builds."""
    path = tmp_path / "netsim-out"
    path.mkdir()
    return path


@pytest.fixture
def run_namespaces() -> Callable[[str], list[str]]:
    """``run_namespaces(run_id)``: the namespaces that exist now for that run."""

    def of_run(run_id: str) -> list[str]:
        prefix = f"{PROJECT_PREFIX}{run_id}-"
        return [name for name in netns.list_namespaces() if name.startswith(prefix)]

    return of_run
