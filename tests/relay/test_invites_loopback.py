"""The invites service on a real relayd over loopback: brute force is held, /metrics says so."""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import blake3
import trio

from p2psync.crypto.identity import Identity
from p2psync.net.endpoint import EndpointConfig, open_endpoint
from p2psync.net.relay_client import RelayClient, RelayClientConfig, open_relay_client
from p2psync.proto import invites as wire
from p2psync.proto.invites import InviteFailure
from p2psync.proto.relay import RELAY_ALPN
from relayd.config import HostPort, RelaydConfig, RelaydInvites
from relayd.relay import RelaydAddresses, serve

LOOPBACK = HostPort("127.0.0.1", 0)
FAST = RelayClientConfig(backoff_initial=0.05, backoff_max=0.2, ping_interval=0.5)
# Strict enough that the test sees the limit bite within a few requests.
STRICT = dataclasses.replace(
    RelaydInvites(), failed_lookup_per_ip_burst=3, failed_lookup_per_ip_rate=0.01
)


@asynccontextmanager
async def relay_with(invites: RelaydInvites) -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(listen=LOOPBACK, http=LOOPBACK, invites=invites)
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(relay: RelaydAddresses) -> AsyncIterator[RelayClient]:
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
        yield client


async def request(client: RelayClient, message: wire.Request) -> wire.Reply:
    from p2psync.join import invites_request

    return await invites_request(client, message)


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


async def test_brute_force_through_the_service_is_rate_limited_and_counted() -> None:
    proof = os.urandom(32)
    verifier = blake3.blake3(proof).digest()
    async with relay_with(STRICT) as relay, client_of(relay) as inviter, client_of(relay) as thief:
        with trio.fail_after(60):
            lookup_id = os.urandom(16)
            created = await request(inviter, wire.Create(lookup_id, verifier, b"sealed", 600))
            assert created == wire.Created(600)
            # The thief guesses lookup ids (and proofs): 3 answers, then only refusals.
            answers: list[wire.Reply] = []
            for _ in range(30):
                answers.append(await request(thief, wire.Fetch(os.urandom(16), os.urandom(32))))
            codes = [InviteFailure(a.code) for a in answers if isinstance(a, wire.Failed)]
            assert codes[:3] == [InviteFailure.NOT_FOUND] * 3
            assert codes[3:] == [InviteFailure.RATE_LIMITED] * 27
            # Even the right lookup id gets nothing from the thief's address now.
            blocked = await request(thief, wire.Fetch(lookup_id, os.urandom(32)))
            assert isinstance(blocked, wire.Failed)
            assert blocked.code == InviteFailure.RATE_LIMITED and blocked.retry_after
            # Another address (here: the inviter's; on loopback every client is
            # 127.0.0.1, so this is the same IP!) - the limit is per IP, so it is
            # blocked too: the thief cannot be told apart from its neighbours.
            same_ip = await request(inviter, wire.Fetch(lookup_id, proof))
            assert isinstance(same_ip, wire.Failed) and same_ip.code == InviteFailure.RATE_LIMITED
            # The owner can still withdraw it (revocation is not a lookup).
            assert await request(inviter, wire.Revoke(lookup_id)) == wire.Revoked()
            samples = await metrics(relay.http)
    assert samples['relayd_invites_rate_limited_total{kind="failed-lookup"}'] == 29
    assert samples['relayd_invites_requests_total{op="fetch",result="not-found"}'] == 3
    assert samples['relayd_invites_requests_total{op="fetch",result="rate-limited"}'] == 29
    assert samples['relayd_invites_requests_total{op="create",result="ok"}'] == 1
    assert samples['relayd_invites_requests_total{op="revoke",result="ok"}'] == 1
    assert samples["relayd_invites_stored"] == 0
    assert samples['relayd_service_streams_total{service="invites",result="ok"}'] >= 33


async def test_a_relay_without_the_store_refuses_the_service() -> None:
    from p2psync.net.service_stream import ServiceRefused
    from p2psync.proto.services import ServiceRefusal

    disabled = dataclasses.replace(RelaydInvites(), enabled=False)
    async with relay_with(disabled) as relay, client_of(relay) as client:
        with trio.fail_after(20):
            try:
                await request(client, wire.Fetch(os.urandom(16), os.urandom(32)))
            except ServiceRefused as exc:
                assert exc.code == ServiceRefusal.UNKNOWN_SERVICE
            else:
                raise AssertionError("a disabled invite store answered")
