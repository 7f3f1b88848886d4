"""The ``mailbox`` scenario in real namespaces: hard NATs, never online together."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from netsim.scenarios import ScenarioOptions, run_scenario

RunNamespaces = Callable[[str], list[str]]


@pytest.mark.netsim
def test_devices_never_online_together_sync_through_the_mailbox(
    netsim_out: Path, run_namespaces: RunNamespaces
) -> None:
    result = run_scenario("mailbox", ScenarioOptions(timeout_s=90.0, output_base=netsim_out))
    assert result["synced"] is True, result["notes"]
    assert result["params"]["a"] == result["params"]["b"] == "hard"
    (pair,) = result["pairs"]
    assert pair["path"] == "mailbox" and pair["t_first_sync_s"] is not None
    assert result["relayed_bytes"] == 0  # stored and forwarded, never relayed live
    # relayd still holds what it forwarded (ciphertext, until the retention ends).
    (held,) = [
        match[1]
        for note in result["notes"]
        if (match := re.fullmatch(r"relayd_mailbox_bytes at the end: (\d+)", note))
    ]
    assert int(held) > 3 * 1024 * 1024  # at least the 3 MiB file
    assert result["run_id"] is not None
    assert run_namespaces(result["run_id"]) == []
