"""Service streams on a real relayd over loopback: OPEN, ACCEPT/REFUSE, the proven NodeId."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from p2psync import defaults
from p2psync.crypto.identity import Identity
from p2psync.errors import BadFrame
from p2psync.net.endpoint import EndpointConfig, open_endpoint
from p2psync.net.relay_client import RelayClient, RelayClientConfig, open_relay_client
from p2psync.net.service_stream import ServiceRefused, open_service
from p2psync.proto.relay import RELAY_ALPN, Hello, encode_frame
from p2psync.proto.services import ServiceRefusal
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses, serve
from relayd.services import Service, ServiceCall

LOOPBACK = HostPort("127.0.0.1", 0)
FAST = RelayClientConfig(backoff_initial=0.05, backoff_max=0.2, ping_interval=0.5)


async def echo(call: ServiceCall) -> None:
    """Answer each frame with the caller's NodeId and the frame."""
    while (body := await call.receive()) is not None:
        await call.send(call.node_id.raw + body)


async def broken(call: ServiceCall) -> None:
    raise RuntimeError("service bug")


ECHO = Service("echo", frozenset({1}), echo, 1024)
BROKEN = Service("broken", frozenset({1}), broken, 1024)


@asynccontextmanager
async def relay_with(*services: Service) -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(listen=LOOPBACK, http=LOOPBACK)
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config, services=services))
        yield addresses
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(relay: RelaydAddresses) -> AsyncIterator[tuple[Identity, RelayClient]]:
    identity = Identity.generate(os.urandom)
    config = EndpointConfig(bind_host="127.0.0.1", alpn=(RELAY_ALPN,))
    async with (
        open_endpoint(identity, config) as endpoint,
        open_relay_client(
            endpoint, identity, relay.udp, relay.node_id, (), config=FAST, rng=random.Random(1)
        ) as client,
    ):
        with trio.fail_after(10):
            await client.wait_connected()
        yield identity, client


async def test_service_gets_the_proven_node_id() -> None:
    async with relay_with(ECHO) as relay, client_of(relay) as (identity, client):
        with trio.fail_after(10):
            stream = await client.open_service("echo", 1, 1024)
            await stream.send(b"hello")
            assert await stream.receive() == identity.node_id.raw + b"hello"
            await stream.send_eof()
            assert await stream.receive() is None


async def test_unknown_service_and_version_are_refused_with_a_code() -> None:
    async with relay_with(ECHO) as relay, client_of(relay) as (_, client):
        with trio.fail_after(10):
            with pytest.raises(ServiceRefused) as unknown:
                await client.open_service("nope", 1, 1024)
            assert unknown.value.code == ServiceRefusal.UNKNOWN_SERVICE
            with pytest.raises(ServiceRefused) as version:
                await client.open_service("echo", 2, 1024)
            assert version.value.code == ServiceRefusal.UNSUPPORTED_VERSION
            # The connection is still fine afterwards.
            stream = await client.open_service("echo", 1, 1024)
            await stream.send(b"x")
            assert (await stream.receive() or b"").endswith(b"x")


async def test_stream_cap_per_connection() -> None:
    async with relay_with(ECHO) as relay, client_of(relay) as (_, client):
        with trio.fail_after(20):
            held = [
                await client.open_service("echo", 1, 1024)
                for _ in range(defaults.RELAY_MAX_SERVICE_STREAMS)
            ]
            with pytest.raises(ServiceRefused) as refused:
                await client.open_service("echo", 1, 1024)
            assert refused.value.code == ServiceRefusal.TOO_MANY_STREAMS
            await held[0].aclose()
            # A freed slot can be used again once the relay saw the close.
            for _ in range(50):
                try:
                    again = await client.open_service("echo", 1, 1024)
                    break
                except ServiceRefused:
                    await trio.sleep(0.05)
            else:
                pytest.fail("closed service stream never freed its slot")
            await again.send(b"y")
            assert (await again.receive() or b"").endswith(b"y")


async def test_oversized_service_frame_ends_that_stream_only() -> None:
    async with relay_with(ECHO) as relay, client_of(relay) as (_, client):
        with trio.fail_after(10):
            bad = await client.open_service("echo", 1, 1024)
            await bad.send(b"z" * 2000)  # over the service's 1024-byte frame limit
            with pytest.raises((BadFrame, trio.BrokenResourceError)):
                while await bad.receive() is not None:
                    pass
                raise BadFrame("stream ended")
            good = await client.open_service("echo", 1, 1024)
            await good.send(b"ok")
            assert (await good.receive() or b"").endswith(b"ok")
            assert client.connected


async def test_a_failing_service_does_not_take_the_relay_down() -> None:
    async with relay_with(ECHO, BROKEN) as relay, client_of(relay) as (_, client):
        with trio.fail_after(10):
            stream = await client.open_service("broken", 1, 1024)
            assert await stream.receive() is None
            good = await client.open_service("echo", 1, 1024)
            await good.send(b"still here")
            assert (await good.receive() or b"").endswith(b"still here")


async def test_open_before_authentication_is_refused() -> None:
    """A raw connection that never sends AUTH cannot reach a service."""
    async with relay_with(ECHO) as relay:
        identity = Identity.generate(os.urandom)
        config = EndpointConfig(bind_host="127.0.0.1", alpn=(RELAY_ALPN,))
        async with open_endpoint(identity, config) as endpoint:
            with trio.fail_after(10):
                conn = await endpoint.connect(relay.node_id, relay.udp)
                relay_stream = await conn.open_stream()
                await relay_stream.send_all(encode_frame(Hello()))  # never AUTH
                with pytest.raises(ServiceRefused) as refused:
                    await open_service(conn, "echo", 1, 1024)
                assert refused.value.code == ServiceRefusal.NOT_AUTHENTICATED
                await conn.aclose()
