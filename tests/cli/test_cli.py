"""The command line as a user drives it: exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from p2psync.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path: Path) -> str:
    return str(tmp_path / "home")


def test_full_local_cycle(capsys: pytest.CaptureFixture[str], home: str, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "--home", home, "init", "--name", "laptop", "--json")
    assert code == 0
    node_id = json.loads(out)["node_id"]
    assert re.fullmatch(r"[a-z2-7]{52}", node_id)
    assert oct(os.stat(home).st_mode & 0o777) == "0o700"
    assert oct(os.stat(Path(home) / "identity.key").st_mode & 0o777) == "0o600"

    assert run(capsys, "group", "create", "--home", home)[0] == 0
    source = tmp_path / "report.pdf"
    data = os.urandom(2_500_000)
    source.write_bytes(data)
    code, out, _ = run(capsys, "put", str(source), "--home", home, "--json")
    assert code == 0
    assert json.loads(out)["key"] == "report.pdf"

    code, out, _ = run(capsys, "ls", "--home", home, "--json")
    listed = json.loads(out)
    assert [(e["key"], e["size"], e["status"]) for e in listed] == [("report.pdf", 2_500_000, "ok")]
    assert listed[0]["content_type"] == "application/pdf"

    target = tmp_path / "copy.pdf"
    assert run(capsys, "get", "report.pdf", "-o", str(target), "--home", home)[0] == 0
    assert target.read_bytes() == data
    # by blob id too
    blob = listed[0]["blob"]
    target.unlink()
    assert run(capsys, "get", blob, "-o", str(target), "--home", home)[0] == 0
    assert target.read_bytes() == data

    code, out, _ = run(capsys, "rm", "report.pdf", "--home", home, "--json")
    assert code == 0 and json.loads(out)["kind"] == "delete"
    code, out, _ = run(capsys, "ls", "--home", home, "--json")
    assert json.loads(out) == []
    code, _, err = run(capsys, "get", "report.pdf", "--home", home)
    assert code == 1 and "was deleted" in err

    code, out, _ = run(capsys, "whoami", "--home", home, "--json")
    assert json.loads(out)["node_id"] == node_id
    assert json.loads(out)["name"] == "laptop"


def test_stdin_put_and_stdout_get(
    capsys: pytest.CaptureFixture[str], home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    run(capsys, "init", "--home", home)
    run(capsys, "group", "create", "--home", home)

    class FakeStdin:
        buffer = io.BytesIO(b"from a pipe\n")

    monkeypatch.setattr(sys, "stdin", FakeStdin())
    assert run(capsys, "put", "-", "--key", "notes/pipe", "--home", home)[0] == 0
    assert main(["get", "notes/pipe", "--home", home]) == 0
    assert "from a pipe" in capsys.readouterr().out


def test_second_init_refuses_and_keeps_identity(
    capsys: pytest.CaptureFixture[str], home: str
) -> None:
    code, out, _ = run(capsys, "init", "--home", home, "--json")
    first = json.loads(out)["node_id"]
    code, _, err = run(capsys, "init", "--home", home)
    assert code == 1
    assert "refusing to overwrite" in err and first in err
    assert len(err.strip().splitlines()) == 1
    code, out, _ = run(capsys, "whoami", "--home", home, "--json")
    assert json.loads(out)["node_id"] == first


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ls"], "run `p2psync init` first"),
        (["put", "/nonexistent/file"], "is not a readable file"),
    ],
)
def test_user_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], home: str, argv: list[str], message: str
) -> None:
    code, _, err = run(capsys, *argv, "--home", home)
    assert code == 1
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_put_without_group_says_what_to_do(
    capsys: pytest.CaptureFixture[str], home: str, tmp_path: Path
) -> None:
    run(capsys, "init", "--home", home)
    file = tmp_path / "f"
    file.write_bytes(b"x")
    code, _, err = run(capsys, "put", str(file), "--home", home)
    assert code == 1 and "group create" in err


def test_env_home(
    capsys: pytest.CaptureFixture[str], home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P2PSYNC_HOME", home)
    assert run(capsys, "init")[0] == 0
    assert (Path(home) / "identity.key").exists()


def test_demo_exits_zero_and_finds_no_plaintext(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo")
    assert code == 0, out
    assert "found in 0 files" in out
    assert "byte-identical: True" in out
    assert "path to laptop: direct" in out


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_line = next(b for b in blocks if "pytest" in b and "\n" not in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_line in ci.splitlines()
