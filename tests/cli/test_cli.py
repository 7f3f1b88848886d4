"""The command line as a user drives it: exit codes, one-line errors, --json."""

from __future__ import annotations

import io
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


def test_demo_exits_zero_and_finds_no_plaintext(
    capsys: pytest.CaptureFixture[str],
    demo_workdir: Path,
) -> None:
    code, out, _ = run(capsys, "demo")
    assert code == 0, out
    assert not demo_workdir.exists()  # a throw-away directory, removed
    assert out.count("found in 0 files") == 3
    assert "found in 1" not in out and "FAILED" not in out
    assert "phone $ p2psync join" in out and "tablet$ p2psync join" in out
    assert "laptop$ echo 'Meet at the lighthouse" in out and "p2psync put --key notes/today" in out
    # Every pair is connected, and its path is shown: relayed at first, each
    # pair moves direct once hole punching (trivial on loopback) validated a path.
    for pair in ("laptop <-> phone ", "phone  <-> tablet", "laptop <-> tablet"):
        assert re.search(rf"  {pair} (direct 127\.0\.0\.1:\d+|relay) ", out), (pair, out)
    assert "not connected" not in out
    assert out.count("byte-identical: True") == 4  # note and file, on phone and tablet
    # The tombstone arrives as a delete change on both, and the note is gone.
    tombstones = re.findall(r"^(phone |tablet): tombstone arrived after [\d.]+s as change #\d+: "
                            r"delete notes/today.txt", out, re.M)  # fmt: skip
    assert tombstones == ["phone ", "tablet"]
    assert "tablet$ p2psync get notes/today.txt   -> error: notes/today.txt was deleted\n" in out
    assert "tablet$ p2psync ls   -> videos/clip.bin\n" in out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), "a line is printed twice"
    # Every command it shows is one the CLI accepts.
    import shlex

    from p2psync.cli import build_parser

    shown = [m.group(1) for m in re.finditer(r"^\w+ ?\$ (.*?)(?:\s+->.*|\s{2,}\(.*)?$", out, re.M)]
    assert len(shown) >= 9, shown
    for command in shown:
        argv = shlex.split(command.split("| ")[-1])  # the p2psync side of a pipe
        assert argv[0] == "p2psync", command
        build_parser().parse_args(argv[1:])  # exits (fails the test) on a wrong command
    assert "Stopped the three devices and relayd." in out


def test_demo_keep_leaves_homes_a_user_can_explore(
    capsys: pytest.CaptureFixture[str],
    demo_workdir: Path,
) -> None:
    code, out, _ = run(capsys, "demo", "--keep")
    assert code == 0, out
    assert f"Kept the demo homes in {demo_workdir}" in out
    for name in ("laptop", "phone", "tablet"):
        assert f"p2psync --home {demo_workdir / name} ls" in out
        code, listed, _ = run(capsys, "--home", str(demo_workdir / name), "ls", "--json")
        assert code == 0
        assert [row["key"] for row in json.loads(listed)] == ["videos/clip.bin"]
    code, devices, _ = run(capsys, "--home", str(demo_workdir / "tablet"), "devices", "--json")
    assert code == 0 and {d["name"] for d in json.loads(devices)} == {"laptop", "phone", "tablet"}


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    test_line = next(b for b in blocks if "pytest" in b and "\n" not in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_line in ci.splitlines()


# --- docs that run, progress, the daemon as a service ------------------------------


def python_example(doc: Path) -> str:
    """The first ```python block of a document: the example it promises runs."""
    match = re.search(r"```python\n(.*?)\n```", doc.read_text(), re.S)
    assert match is not None, f"{doc} has no python example"
    return match.group(1)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ("README.md", "put notes/today b'buy milk' {'pinned': True}"),
        ("docs/library-api.md", "after restart: #6 'notes/tomorrow' = b'call mum'"),
    ],
)
def test_documented_library_examples_run(tmp_path: Path, doc: str, expected: str) -> None:
    import subprocess
    import sys

    script = tmp_path / "example.py"
    script.write_text(python_example(ROOT / doc))
    env = {k: v for k, v in os.environ.items() if k != "P2PSYNC_HOME"}
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout.splitlines()


def test_control_api_stdlib_client_example_runs_against_a_daemon(tmp_path: Path) -> None:
    """docs/control-api.md's Python example (stdlib socket + json only) against `p2psync daemon`."""
    import subprocess
    import sys
    import time

    home = tmp_path / "home"
    env = {**os.environ, "P2PSYNC_HOME": str(home)}
    for argv in (["init", "--name", "server"], ["group", "create"]):
        subprocess.run([sys.executable, "-m", "p2psync.cli", *argv], env=env, check=True,
                       capture_output=True, timeout=60)  # fmt: skip
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "p2psync.cli", "daemon", "--no-mdns", "--listen", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while not (home / "control.sock").exists():
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        script = tmp_path / "client.py"
        script.write_text(python_example(ROOT / "docs" / "control-api.md"))
        done = subprocess.run([sys.executable, "-I", str(script)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()
    assert done.returncode == 0, done.stderr
    printed = done.stdout.splitlines()
    assert re.fullmatch(r"put notes/from-python cursor \d+", printed[0])
    assert "pulled put 'notes/from-python'" in printed
    assert printed[-4:] == [
        "error code not-found",
        "subscribed: entry-added notes/live",
        "stream ended: {'cancelled': True, 'done': True}",
        "value: written while subscribed",
    ]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal_and_only_for_large_files() -> None:
    from p2psync import defaults, terminal

    big = defaults.PROGRESS_MIN_BYTES
    assert terminal.wants_progress(big, stream=FakeTerminal())
    assert terminal.wants_progress(None, stream=FakeTerminal())  # stdin: size unknown
    assert not terminal.wants_progress(big - 1, stream=FakeTerminal())
    assert not terminal.wants_progress(big, stream=io.StringIO())  # a pipe or a log
    assert not terminal.wants_progress(big, disabled=True, stream=FakeTerminal())

    screen = FakeTerminal()
    with terminal.transfer_bar("put video.bin", 3 * 2**20, enabled=True, stream=screen) as bar:
        bar(2**20)
        bar(2 * 2**20)
    drawn = screen.getvalue()
    assert "put video.bin" in drawn and "3.0/3.0 MiB" in drawn

    quiet = io.StringIO()
    with terminal.transfer_bar("x", 10, enabled=False, stream=quiet) as bar:
        bar(5)
    assert quiet.getvalue() == ""


def test_large_put_and_get_draw_nothing_when_stderr_is_not_a_terminal(
    capsys: pytest.CaptureFixture[str], home: str, tmp_path: Path
) -> None:
    from p2psync import defaults

    run(capsys, "init", "--home", home)
    run(capsys, "group", "create", "--home", home)
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(defaults.PROGRESS_MIN_BYTES + 1))
    code, out, err = run(capsys, "put", str(source), "--home", home)
    assert code == 0 and out.startswith("put big.bin") and err == ""
    copy = tmp_path / "copy.bin"
    code, _, err = run(capsys, "get", "big.bin", "-o", str(copy), "--home", home)
    assert code == 0 and err.startswith("wrote ") and "MiB/s" not in err
    assert copy.read_bytes() == source.read_bytes()


def test_status_view_renders_peers_and_transfers() -> None:
    from rich.console import Console

    from p2psync import terminal

    peer = {"node_id": "b" * 52, "path": "relay", "address": "203.0.113.9:47300",
            "rtt_ms": 31.5, "bytes_in": 2048, "bytes_out": 10, "rx_rate": 1024.0,
            "tx_rate": 0.0, "last_error": None}  # fmt: skip
    transfer = {"blob": "c" * 64, "key": "media/video.bin", "bytes_done": 3 * 2**20,
                "bytes_total": 12 * 2**20, "rate": 2**20, "complete": False}  # fmt: skip
    state = {
        "node_id": "a" * 52,
        "name": "laptop",
        "group_id": "g" * 20,
        "listening": ["0.0.0.0:47300"],
        "relay": None,
        "peers": [peer],
        "transfers": [transfer],
    }
    console = Console(file=io.StringIO(), width=140)
    console.print(terminal.status_view(state))
    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "relay" in shown and "31.5 ms" in shown and "media/video.bin" in shown
    assert "3.0 MiB / 12.0 MiB" in shown and "1.0 MiB/s" in shown


def test_systemd_user_unit_runs_a_command_the_cli_accepts() -> None:
    import shlex

    from p2psync.cli import build_parser, cmd_daemon

    unit = (ROOT / "docs" / "systemd" / "p2psync.service").read_text()
    assert "[Install]\nWantedBy=default.target" in unit  # a user unit, not multi-user
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart=").replace("%h", "/home/u"))
    assert argv[0] == "/home/u/.local/bin/p2psync"
    args = build_parser().parse_args(argv[1:])
    assert args.handler is cmd_daemon


def test_relayd_system_unit_keeps_its_identity_and_mailbox_in_the_state_directory() -> None:
    """relayd.service and the Dockerfile: the flags parse, and --data is the kept state."""
    import shlex

    from relayd.cli import build_parser as relayd_parser
    from relayd.cli import config_from_args

    unit = (ROOT / "relayd" / "relayd.service").read_text()
    assert "[Install]\nWantedBy=multi-user.target" in unit  # a system unit
    settings = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[0].isalpha()
    )
    argv = shlex.split(settings["ExecStart"])
    assert argv[0].endswith("/relayd")
    args = relayd_parser().parse_args(argv[1:])
    assert args.data == f"/var/lib/{settings['StateDirectory']}"
    args.config = ROOT / "relayd" / "relayd.example.toml"  # what the unit tells to install
    config = config_from_args(args)
    assert config.data_dir == "/var/lib/relayd" and config.mailbox.enabled
    # The Dockerfile's entrypoint too: its --data is the image's volume.
    dockerfile = (ROOT / "relayd" / "Dockerfile").read_text()
    [entrypoint] = re.findall(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    [volume] = re.findall(r"^VOLUME (\[.*\])$", dockerfile, re.M)
    argv = json.loads(entrypoint)
    assert argv[0] == "relayd"
    assert relayd_parser().parse_args(argv[1:]).data in json.loads(volume)


def test_daemon_honours_the_home_from_env_and_its_config(tmp_path: Path) -> None:
    """`p2psync daemon` as the user unit runs it: home from P2PSYNC_HOME, listen from config."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    home = tmp_path / "home"
    env = {**os.environ, "P2PSYNC_HOME": str(home)}

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "p2psync.cli", *argv], env=env,
                              capture_output=True, text=True, timeout=60, check=True)  # fmt: skip

    cli("init", "--name", "server")
    cli("group", "create")
    with (home / "config.toml").open("a") as config:
        config.write(f'listen = "127.0.0.1:{port}"\n')
    log = tmp_path / "daemon.log"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "p2psync.cli", "daemon", "--no-mdns"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        deadline = time.monotonic() + 30
        while not (home / "control.sock").exists():
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)
        status = json.loads(cli("status", "--json").stdout)
        assert status["running"] and status["name"] == "server"
        assert status["listening"] == [f"127.0.0.1:{port}"]
        # Ctrl-C as at a terminal: a shell that started this run in the background
        # (CI, nohup-style wrappers) hands its children SIGINT ignored.
        watch = subprocess.Popen(
            [sys.executable, "-m", "p2psync.cli", "status", "--watch", "--json",
             "--interval", "0.2"],
            env=env, stdout=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )  # fmt: skip
        assert watch.stdout is not None
        snapshots = [json.loads(watch.stdout.readline()) for _ in range(2)]
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=15) == 0
        assert all(s["node_id"] == status["node_id"] for s in snapshots)
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=30)
    assert code == 0
