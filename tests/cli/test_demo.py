"""``p2psync demo`` when a step goes wrong: a clear FAILED line and exit 1, no traceback.

(The tour that succeeds is tests/cli/test_cli.py::test_demo_exits_zero_and_finds_no_plaintext.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from p2psync import demo


def test_a_step_that_times_out_is_one_line_and_exit_1(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    demo_workdir: Path,
) -> None:
    # Pairing takes seconds, so it is given its usual time; syncing then gets none.
    pair = demo._Tour.pair

    async def pair_then_hurry(self: demo._Tour, *args: object) -> None:
        await pair(self, *args)  # type: ignore[arg-type]
        monkeypatch.setattr(demo, "STEP_TIMEOUT", 0.001)

    monkeypatch.setattr(demo._Tour, "pair", pair_then_hurry)
    code = demo.run_demo()
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in out + err
    failed = [line for line in out.splitlines() if line.startswith("FAILED")]
    assert failed == [
        "FAILED: syncing notes/today.txt did not finish within 0.001s "
        "(a slow or overloaded machine?); the tour stopped there"
    ]
    assert not demo_workdir.exists()  # still cleaned up


def test_a_pair_that_never_connects_is_a_failure(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    demo_workdir: Path,
) -> None:
    monkeypatch.setattr(demo, "CONNECT_TIMEOUT", 0.5)
    peer = demo._Tour._peer

    def laptop_and_tablet_apart(
        self: demo._Tour, name: str, other: str
    ) -> tuple[bool, str, str | None, str | None]:
        if {name, other} == {"laptop", "tablet"}:  # as if no path between them ever worked
            return False, "none", None, "no path"
        return peer(self, name, other)

    monkeypatch.setattr(demo._Tour, "_peer", laptop_and_tablet_apart)
    code = demo.run_demo()
    out = capsys.readouterr().out
    assert code == 1, out
    assert "  laptop <-> tablet not connected after 0s: no path" in out
    assert "FAILED: laptop and tablet never connected" in out
    assert "Some step FAILED (see above)." in out
    assert out.count("byte-identical: True") == 4  # the rest still ran, through the phone
    assert not demo_workdir.exists()  # cleaned up after a failure too
