"""relayd.config and the relayd CLI's config handling."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

import relayd
from p2psync.errors import ConfigError
from relayd import defaults
from relayd.cli import main
from relayd.config import (
    HostPort,
    RelaydConfig,
    RelaydLimits,
    config_from_mapping,
    config_to_toml,
    load_config_file,
    override_limits,
    parse_host_port,
)


def test_defaults_come_from_defaults_module() -> None:
    config = RelaydConfig()
    assert str(config.listen) == defaults.LISTEN == "0.0.0.0:3478"
    assert str(config.http) == defaults.HTTP_LISTEN
    assert config.http.host == "127.0.0.1"  # metrics stay on loopback
    assert config.stun_alt_port is None
    assert config.limits.max_frame_size == 64 * 1024
    assert config.limits.queue_per_destination == 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:3478", HostPort("0.0.0.0", 3478)),
        ("[::]:3478", HostPort("::", 3478)),
        ("[::1]:0", HostPort("::1", 0)),
    ],
)
def test_parse_host_port(text: str, expected: HostPort) -> None:
    assert parse_host_port(text) == expected
    assert str(parse_host_port(text)) == text


@pytest.mark.parametrize(
    "text", ["3478", ":3478", "example.com:3478", "1.2.3.4:x", "1.2.3.4:70000"]
)
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_host_port(text)


def test_load_file(tmp_path: Path) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text(
        'listen = "[::]:3478"\nstun_alt_port = 3479\ndata = "/var/lib/relayd"\n'
        'log_level = "DEBUG"\n[limits]\nmax_connections = 5\nidle_timeout_s = 30\n'
    )
    config = load_config_file(path)
    assert config.listen == HostPort("::", 3478)
    assert config.stun_alt_port == 3479
    assert config.data_dir == "/var/lib/relayd"
    assert config.log_level == "debug"
    assert config.limits.max_connections == 5
    assert config.limits.idle_timeout_s == 30.0
    assert isinstance(config.limits.idle_timeout_s, float)
    assert config.limits.frame_burst == defaults.FRAME_BURST


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ("lisen = '0.0.0.0:1'", ["unknown key 'lisen'", "listen"]),
        ("[limits]\nmax_conections = 1", ["unknown key 'limits.max_conections'"]),
        ("[limits]\nmax_connections = '10'", ["'limits.max_connections'", "string '10'"]),
        ("[limits]\nmax_connections = true", ["positive integer", "boolean True"]),
        ("[limits]\nmax_connections = 0", ["positive integer"]),
        ("[limits]\nidle_timeout_s = -1.0", ["positive number"]),
        ("stun_alt_port = 70000", ["'stun_alt_port'", "0-65535"]),
        ("listen = 3478", ["'listen'", "integer 3478"]),
        ("log_level = 'loud'", ["'log_level'", "debug, info"]),
        ("limits = 3", ["[limits] table"]),
    ],
)
def test_file_errors_name_file_key_and_problem(
    tmp_path: Path, toml: str, fragments: list[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)


def test_print_round_trips() -> None:
    config = override_limits(
        RelaydConfig(stun_alt_port=3479, data_dir='/srv/"quoted"'), stun_per_ip_rate=2.5
    )
    assert config_from_mapping(tomllib.loads(config_to_toml(config))) == config
    assert config_from_mapping(tomllib.loads(config_to_toml(RelaydConfig()))) == RelaydConfig()


def test_override_limits_checks_values() -> None:
    with pytest.raises(ConfigError):
        override_limits(RelaydConfig(), max_frame_size=-1)
    assert override_limits(RelaydConfig(), max_frame_size=10).limits == RelaydLimits(
        max_frame_size=10
    )


def test_cli_flags_override_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "relayd.toml"
    path.write_text('listen = "0.0.0.0:1000"\nhttp = "127.0.0.1:1001"\nstun_alt_port = 1002\n')
    argv = ["--config", str(path), "--listen", "127.0.0.1:2000", "--data", "/d"]
    assert main([*argv, "--log-level", "warning", "--print-config"]) == 0
    printed = config_from_mapping(tomllib.loads(capsys.readouterr().out))
    assert printed.listen == HostPort("127.0.0.1", 2000)  # flag wins
    assert printed.http == HostPort("127.0.0.1", 1001)  # file value kept
    assert printed.stun_alt_port == 1002
    assert printed.data_dir == "/d"
    assert printed.log_level == "warning"


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--listen", "nonsense"], "--listen"),
        (["--http", "host:80"], "--http"),
        (["--stun-alt-port", "-1"], "--stun-alt-port"),
        (["--config", "/nonexistent/relayd.toml"], "cannot read"),
    ],
)
def test_cli_errors_are_one_line_exit_2(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relayd: ")
    assert fragment in err
    assert err.count("\n") == 1


def test_shipped_example_is_the_defaults() -> None:
    example = Path(relayd.__file__).parent / "relayd.example.toml"
    assert load_config_file(example) == RelaydConfig()
