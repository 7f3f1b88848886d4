"""relayd's access policy from config and flags: ``allow``, ``access_token``, --access-token-file.

Parsing and printing are pure; the loopback tests run :func:`relayd.relay.serve`
with only a config (no explicit policy), so they prove the config reaches the
router, and one test starts ``python -m relayd`` with the flags.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from p2psync.crypto.identity import Identity, NodeId
from p2psync.errors import ConfigError
from p2psync.net.endpoint import EndpointConfig, open_endpoint
from p2psync.net.relay_client import RelayClient, RelayClientConfig, open_relay_client
from p2psync.proto.relay import MAX_ACCESS_TOKEN, RELAY_ALPN, Address, RelayErrorCode
from relayd.cli import build_parser, config_from_args, main
from relayd.config import (
    REDACTED_TOKEN,
    HostPort,
    RelaydConfig,
    config_from_mapping,
    config_to_toml,
    load_config_file,
)
from relayd.relay import RelaydAddresses, serve
from relayd.routing import AccessPolicy

# --- minimal bits from tests/relay/test_relay_loopback.py -------------------------------------

LOOPBACK = HostPort("127.0.0.1", 0)
NODE_ENDPOINT = EndpointConfig(bind_host="127.0.0.1", alpn=("p2psync/1", RELAY_ALPN))
FAST = RelayClientConfig(backoff_initial=0.05, backoff_max=0.2, ping_interval=0.5)
TOKEN = "correct horse battery staple"


def new_id() -> Identity:
    return Identity.generate(os.urandom)


@asynccontextmanager
async def running_relay(config: RelaydConfig) -> AsyncIterator[RelaydAddresses]:
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(
    udp: Address, relay_id: NodeId, identity: Identity, token: str | None
) -> AsyncIterator[RelayClient]:
    config = RelayClientConfig(
        backoff_initial=FAST.backoff_initial,
        backoff_max=FAST.backoff_max,
        ping_interval=FAST.ping_interval,
        access_token=token.encode() if token is not None else None,
    )
    async with (
        open_endpoint(identity, NODE_ENDPOINT) as endpoint,
        open_relay_client(
            endpoint, identity, udp, relay_id, config=config, rng=random.Random(1)
        ) as client,
    ):
        yield client


async def eventually(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (state of another task) until true; callers bound the wait."""
    while not condition():  # noqa: ASYNC110 -- no event to wait on for arbitrary state
        await trio.sleep(0.01)


async def refusal(client: RelayClient) -> int:
    """The fatal ERROR code the relay gave ``client`` (which never got connected)."""
    with trio.fail_after(5):
        await eventually(lambda: client.last_error is not None)
    assert not client.connected and client.stats.connects == 0
    assert client.last_error is not None
    return client.last_error.code


async def metrics(server: HostPort) -> dict[str, float]:
    stream = await trio.open_tcp_stream(server.host, server.port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        data = bytearray()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    samples = {}
    for line in bytes(data).partition(b"\r\n\r\n")[2].decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


# --- parsing ----------------------------------------------------------------------------------


def test_defaults_are_open() -> None:
    config = RelaydConfig()
    assert config.allow is None and config.access_token is None
    assert config.access_policy() == AccessPolicy()


def test_file_keys_become_the_policy(tmp_path: Path) -> None:
    a, b = new_id().node_id, new_id().node_id
    path = tmp_path / "relayd.toml"
    path.write_text(f'allow = ["{a}", "{b}", " {a} "]\naccess_token = "{TOKEN}"\n')
    config = load_config_file(path)
    assert config.allow == (a, b)  # order kept, duplicates folded
    assert config.access_token == TOKEN
    assert config.access_policy() == AccessPolicy(frozenset({a, b}), TOKEN.encode())
    assert TOKEN not in repr(config)


@pytest.mark.parametrize(
    ("toml", "fragments"),
    [
        ('allow = "NODEID"', ["'allow'", "list of NodeId"]),
        ("allow = []", ["'allow'", "refuse every node"]),
        ("allow = [1]", ["'allow'", "entry 0", "integer 1"]),
        ('allow = ["nope"]', ["'allow'", "entry 0", "'nope' is not a NodeId"]),
        ("access_token = 42", ["'access_token'", "string"]),
        ('access_token = ""', ["'access_token'", "empty"]),
        ('access_token = " padded "', ["'access_token'", "whitespace"]),
        ('access_token = "tab\\there"', ["'access_token'", "printable"]),
        (f'access_token = "{"x" * (MAX_ACCESS_TOKEN + 1)}"', ["'access_token'", "at most 256"]),
        (f'access_token = "{REDACTED_TOKEN}"', ["'access_token'", "placeholder"]),
    ],
)
def test_bad_policy_values_name_file_and_key(
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


def test_token_errors_do_not_echo_the_token() -> None:
    secret = "s3cret " * 40  # too long, and ends in whitespace
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"access_token": secret})
    assert "s3cret" not in str(caught.value)


# --- printing ---------------------------------------------------------------------------------


def test_print_config_hides_the_token_and_round_trips_the_rest() -> None:
    allowed = (new_id().node_id, new_id().node_id)
    config = RelaydConfig(allow=allowed, access_token=TOKEN)
    text = config_to_toml(config)
    assert TOKEN not in text
    assert f'access_token = "{REDACTED_TOKEN}"' in text
    document = tomllib.loads(text)
    assert document["access_token"] == REDACTED_TOKEN
    # Everything but the token reads back; the placeholder itself is refused.
    with pytest.raises(ConfigError, match="placeholder"):
        config_from_mapping(document)
    del document["access_token"]
    assert config_from_mapping(document) == RelaydConfig(allow=allowed)
    # Unset: commented out, and the defaults read back.
    plain = config_to_toml(RelaydConfig())
    assert "# allow is not set" in plain and "# access_token is not set" in plain


# --- flags ------------------------------------------------------------------------------------


def test_cli_flags_replace_the_file_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    in_file, on_flag = new_id().node_id, new_id().node_id
    path = tmp_path / "relayd.toml"
    path.write_text(f'allow = ["{in_file}"]\naccess_token = "from-the-file"\n')
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")  # surrounding whitespace is not part of it
    argv = ["--config", str(path), "--allow", str(on_flag), "--allow", str(on_flag)]
    assert main([*argv, "--access-token-file", str(token_file), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert TOKEN not in out and "from-the-file" not in out
    assert f'access_token = "{REDACTED_TOKEN}"' in out
    document = tomllib.loads(out)
    assert document["allow"] == [str(on_flag)]


def test_cli_token_file_is_read(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    args = build_parser().parse_args(["--access-token-file", str(token_file)])
    assert config_from_args(args).access_token == TOKEN


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda p: None, "cannot read the token file"),
        (lambda p: p.write_text("\n"), "empty"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "not UTF-8"),
        (lambda p: p.write_text("two\nlines\n"), "printable"),
    ],
)
def test_cli_bad_token_file_is_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setup: Callable[[Path], object],
    fragment: str,
) -> None:
    token_file = tmp_path / "token"
    setup(token_file)
    assert main(["--access-token-file", str(token_file), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relayd: --access-token-file: ")
    assert fragment in err
    assert err.count("\n") == 1


def test_cli_bad_allow_flag_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--allow", "not-a-node", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relayd: --allow: 'not-a-node' is not a NodeId")


# --- enforced over loopback -------------------------------------------------------------------


async def test_config_policy_refuses_wrong_or_missing_token_and_strangers() -> None:
    allowed, other_allowed, stranger = new_id(), new_id(), new_id()
    config = RelaydConfig(
        listen=LOOPBACK,
        http=LOOPBACK,
        allow=(allowed.node_id, other_allowed.node_id),
        access_token=TOKEN,
    )
    async with running_relay(config) as relay:
        udp, relay_id = relay.udp, relay.node_id
        async with client_of(udp, relay_id, allowed, None) as missing:
            assert await refusal(missing) == RelayErrorCode.BAD_AUTH
        async with client_of(udp, relay_id, allowed, "wrong token") as wrong:
            assert await refusal(wrong) == RelayErrorCode.BAD_AUTH
        async with client_of(udp, relay_id, stranger, TOKEN) as outsider:
            assert await refusal(outsider) == RelayErrorCode.NOT_ALLOWED
        async with (
            client_of(udp, relay_id, allowed, TOKEN) as a,
            client_of(udp, relay_id, other_allowed, TOKEN) as b,
        ):
            with trio.fail_after(5):
                await a.wait_connected()
                await b.wait_connected()
                await a.send(other_allowed.node_id, b"members only")
                assert await b.received.receive() == (allowed.node_id, b"members only")
        samples = await metrics(relay.http)
        assert samples['relayd_auths_total{result="bad-token"}'] >= 2
        assert samples['relayd_auths_total{result="not-allowed"}'] >= 1
        assert samples['relayd_auths_total{result="ok"}'] == 2


async def test_token_alone_admits_any_node_presenting_it() -> None:
    config = RelaydConfig(listen=LOOPBACK, http=LOOPBACK, access_token=TOKEN)
    async with running_relay(config) as relay:
        async with client_of(relay.udp, relay.node_id, new_id(), "guess") as guesser:
            assert await refusal(guesser) == RelayErrorCode.BAD_AUTH
        async with client_of(relay.udp, relay.node_id, new_id(), TOKEN) as member:
            with trio.fail_after(5):
                await member.wait_connected()


async def test_relayd_process_takes_policy_from_flags(tmp_path: Path) -> None:
    """``python -m relayd --allow ... --access-token-file ...``: the flags reach the relay."""
    allowed, stranger = new_id(), new_id()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    log_path = tmp_path / "relayd.log"
    argv = [sys.executable, "-m", "relayd", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]
    argv += ["--allow", str(allowed.node_id), "--access-token-file", str(token_file)]
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            argv, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL
        )
    try:
        ready = re.compile(r"relayd ready: udp=([\d.]+):(\d+) .* relay=(\S+)")
        with trio.fail_after(30):
            while (match := ready.search(log_path.read_text())) is None:
                assert process.poll() is None, log_path.read_text()
                await trio.sleep(0.05)
        udp = (match[1], int(match[2]))
        relay_id = NodeId.parse(match[3])
        async with client_of(udp, relay_id, stranger, TOKEN) as outsider:
            assert await refusal(outsider) == RelayErrorCode.NOT_ALLOWED
        async with client_of(udp, relay_id, allowed, "wrong") as wrong:
            assert await refusal(wrong) == RelayErrorCode.BAD_AUTH
        async with client_of(udp, relay_id, allowed, TOKEN) as member:
            with trio.fail_after(5):
                await member.wait_connected()
    finally:
        process.terminate()
        with trio.move_on_after(10):
            await process.wait()
        if process.poll() is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    text = log_path.read_text()
    assert TOKEN not in text
    assert "allow-list of 1 node(s), shared access token required" in text
