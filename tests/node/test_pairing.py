"""Pairing: tickets, the join handshake over real QUIC, once-only invites."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from p2psync.crypto.group import GroupSecret, group_id_text
from p2psync.crypto.identity import Identity, NodeId
from p2psync.errors import BadFrame, ConfigError, LocalProtocolError
from p2psync.home import Home
from p2psync.join import join_group
from p2psync.net.endpoint import Endpoint, EndpointConfig, open_endpoint
from p2psync.net.relay_client import open_relay_client, parse_relay_address
from p2psync.node import Node, NodeOptions, open_node
from p2psync.pairing import (
    CHALLENGE_SIZE,
    INVITE_SECRET_SIZE,
    JOIN_CHALLENGE,
    JOIN_PROOF,
    JOIN_REFUSED,
    JOIN_REQUEST,
    JOIN_WELCOME,
    MAX_JOIN_FRAME,
    Invite,
    InviteBook,
    InviterHandshake,
    JoinRefused,
    JoinRequest,
    Ticket,
    decode_join_untrusted,
    decode_ticket_untrusted,
    join_frame,
    join_mac,
    transcript,
)
from p2psync.proto.entry import Kind
from p2psync.proto.messages import FrameDecoder
from p2psync.proto.relay import RELAY_ALPN
from p2psync.ratelimit import source_key

from .conftest import wait_until

LOOPBACK = NodeOptions(listen=("127.0.0.1", 0))


def test_ticket_round_trip_and_typos_are_caught() -> None:
    ticket = Ticket(
        inviter=GroupSecretlessId.node_id,
        addresses=(("192.0.2.7", 47300), ("127.0.0.1", 47300)),
        expires=1_900_000_000,
        invite_id=b"\x01" * 16,
        invite_secret=b"\x02" * 32,
        relay="relay.example:3478",
    )
    text = ticket.encode()
    assert decode_ticket_untrusted(text) == ticket
    assert "\x02" * 4 not in repr(ticket) and "hidden" in repr(ticket)
    for position in range(5, len(text)):
        swapped = text[:position] + ("a" if text[position] != "a" else "b") + text[position + 1 :]
        with pytest.raises(BadFrame):
            decode_ticket_untrusted(swapped)


class GroupSecretlessId:
    from p2psync.crypto.identity import Identity

    node_id = Identity.from_seed(b"\x09" * 32).node_id


# --- the invite book, sans-IO: handshakes side by side ---------------------------------

INVITER = GroupSecretlessId.node_id


def _request(invite_id: bytes, n: int = 0) -> JoinRequest:
    joiner = Identity.from_seed(bytes([0x40 + n]) * 32).node_id
    return JoinRequest(invite_id, joiner, f"joiner-{n}", bytes([n]) * CHALLENGE_SIZE)


def _begin(book: InviteBook, invite: Invite, n: int, now: float = 1000.0) -> InviterHandshake:
    return book.begin(_request(invite.invite_id, n), f"198.51.100.{n}", INVITER,
                      bytes([0x80 + n]) * CHALLENGE_SIZE, now)  # fmt: skip


def _proof(secret: bytes, handshake: InviterHandshake) -> bytes:
    """What a joiner holding ``secret`` answers (it checked our MAC the same way)."""
    return join_mac(secret, b"joiner", handshake.script)


def _events(book: InviteBook) -> list[str]:
    found = []
    while (event := book.next_event()) is not None:
        found.append(event.reason)
    return found


def test_parallel_right_proofs_only_the_first_claims_and_only_a_welcome_uses_it() -> None:
    book = InviteBook()
    invite = book.create(os.urandom, now=1000, lifetime=600)
    running = [_begin(book, invite, n) for n in range(3)]
    with pytest.raises(JoinRefused) as fourth:  # every try is in flight: no fourth
        _begin(book, invite, 3)
    assert fourth.value.code == "in-use"
    book.prove(running[0], _proof(invite.secret, running[0]), 1001.0)
    assert book.is_open(invite.invite_id, 1001.0)  # claimed, not used: no welcome yet
    with pytest.raises(JoinRefused) as second:  # checked against the book as it is now
        book.prove(running[1], _proof(invite.secret, running[1]), 1001.0)
    assert second.value.code == "in-use"
    assert not book.revoke(invite.invite_id, 1001.0)  # a device is joining with it
    book.welcomed(running[0])
    assert _events(book) == ["joined"] and len(book) == 0
    with pytest.raises(JoinRefused) as third:
        book.prove(running[2], _proof(invite.secret, running[2]), 1002.0)
    assert third.value.code == "unknown-invite"
    for handshake in running:  # the shell's `finally`: nothing more happens
        book.abandon(handshake, 1003.0)
    assert _events(book) == [] and len(book) == 0
    with pytest.raises(JoinRefused) as late:
        _begin(book, invite, 4, now=1004.0)
    assert late.value.code == "unknown-invite"


def test_parallel_wrong_proofs_burn_the_invite_once_none_is_in_flight() -> None:
    book = InviteBook()
    invite = book.create(os.urandom, now=1000, lifetime=600)
    running = [_begin(book, invite, n) for n in range(3)]
    wrong = b"\x00" * INVITE_SECRET_SIZE
    for handshake in running[:2]:
        with pytest.raises(JoinRefused, match="wrong or mistyped") as refused:
            book.prove(handshake, _proof(wrong, handshake), 1001.0)
        assert refused.value.code == "wrong-code"
    assert _events(book) == [] and len(book) == 1  # one try still in flight
    with pytest.raises(JoinRefused) as busy:
        _begin(book, invite, 3)
    assert busy.value.code == "in-use"
    with pytest.raises(JoinRefused):
        book.prove(running[2], _proof(wrong, running[2]), 1001.0)
    assert _events(book) == ["burned"] and len(book) == 0
    # Even the right secret is too late now.
    with pytest.raises(JoinRefused) as gone:
        _begin(book, invite, 4)
    assert gone.value.code == "unknown-invite"


def test_a_handshake_abandoned_after_our_mac_is_a_try() -> None:
    book = InviteBook()
    invite = book.create(os.urandom, now=1000, lifetime=600)
    for n in range(2):
        book.abandon(_begin(book, invite, n), 1001.0)  # hung up after JOIN_CHALLENGE
    assert book.is_open(invite.invite_id, 1001.0)
    book.abandon(_begin(book, invite, 2), 1001.0)
    assert _events(book) == ["burned"] and not book.is_open(invite.invite_id, 1001.0)


def test_a_lost_welcome_releases_the_claim_and_gives_its_try_back() -> None:
    book = InviteBook()
    invite = book.create(os.urandom, now=1000, lifetime=600)
    for n in range(3):  # three right proofs whose welcome never arrived
        handshake = _begin(book, invite, n)
        book.prove(handshake, _proof(invite.secret, handshake), 1001.0)
        book.abandon(handshake, 1001.0)
    assert _events(book) == [] and book.is_open(invite.invite_id, 1001.0)
    handshake = _begin(book, invite, 3)
    book.prove(handshake, _proof(invite.secret, handshake), 1002.0)
    book.welcomed(handshake)
    assert _events(book) == ["joined"]
    with pytest.raises(LocalProtocolError):  # one welcome per handshake, in order
        book.welcomed(handshake)


def test_expiry_waits_for_a_claim_and_revocation_by_invite_id() -> None:
    book = InviteBook()
    invite = book.create(os.urandom, now=1000, lifetime=60)
    handshake = _begin(book, invite, 0, now=1050.0)
    book.prove(handshake, _proof(invite.secret, handshake), 1059.0)
    assert book.is_open(invite.invite_id, 1070.0)  # past its time, but being welcomed
    book.abandon(handshake, 1070.0)  # ... and the welcome was lost
    assert _events(book) == ["expired"] and len(book) == 0
    other = book.create(os.urandom, now=2000, lifetime=60)
    with pytest.raises(JoinRefused) as expired:
        _begin(book, other, 0, now=2060.0)
    assert expired.value.code == "unknown-invite" and _events(book) == ["expired"]
    ticket_invite = book.create(os.urandom, now=3000, lifetime=600)
    assert book.revoke(ticket_invite.invite_id, 3001.0)
    assert not book.revoke(ticket_invite.invite_id, 3002.0)
    assert _events(book) == ["revoked"]
    with pytest.raises(JoinRefused):
        _begin(book, ticket_invite, 0, now=3003.0)


def test_join_requests_are_rate_limited_per_source_and_ipv6_by_prefix() -> None:
    book = InviteBook(request_rate=0.1, request_burst=2, total_rate=1.0, total_burst=5)
    invite = book.create(os.urandom, now=1000, lifetime=600)

    def ask(source: str, now: float) -> str:
        try:
            book.abandon(book.begin(_request(invite.invite_id), source, INVITER,
                                    b"\x01" * CHALLENGE_SIZE, now), now)  # fmt: skip
        except JoinRefused as exc:
            return exc.code
        return "answered"

    book.max_tries = 1000  # this test is about the requests, not the tries
    a = source_key("2001:db8:1:2::5", 64)
    assert [ask(a, 1000.0) for _ in range(3)] == ["answered", "answered", "rate-limited"]
    # Another address of the same /64 is the same source; another /64 is not.
    assert ask(source_key("2001:db8:1:2:ffff::9", 64), 1000.0) == "rate-limited"
    assert ask(source_key("2001:db8:1:3::5", 64), 1000.0) == "answered"
    assert ask(source_key("198.51.100.7", 64), 1000.0) == "answered"
    assert ask(source_key("::ffff:198.51.100.7", 64), 1000.0) == "answered"  # the same IPv4
    assert ask(source_key("198.51.100.7", 64), 1000.0) == "rate-limited"
    # The total bucket holds however many sources there are (5 answered so far).
    assert ask("203.0.113.1", 1000.0) == "rate-limited"
    assert ask(a, 1010.0) == "answered"  # refilled: 10 s per request and source


async def test_join_over_quic_then_sync(make_home: Callable[..., Home]) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home = make_home("a", secret)
    b_home = make_home("b", None)
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            ticket = a.create_invite(600)
            ticket = dataclasses.replace(
                ticket, addresses=(("127.0.0.1", a.endpoint.local_address[1]),)
            )
            joined = await join_group(b_home, ticket.encode(), name="laptop-b")
            assert joined.group_id == group_id_text(secret.keys().group_id)
            assert b_home.load_secrets()[0].keys().group_id == secret.keys().group_id
            # the inviter recorded the new device in a signed MEMBER entry
            members = a.store.members()
            assert [m.meta.name for m in members if m.meta] == ["laptop-b"]
            assert members[0].entry.kind is Kind.MEMBER
            # the joiner knows where the inviter is, and syncs from there
            config = b_home.load_config()
            assert config.peers == (f"{a.node_id}@127.0.0.1:{a.endpoint.local_address[1]}",)
            from p2psync.daemon import options_for

            options = options_for(b_home, listen="127.0.0.1:0", peers=[])
            await a.put_bytes(b"welcome", key="hello")
            async with open_node(b_home, dataclasses.replace(options, control=False)) as b:
                await wait_until(
                    b, lambda: any(s.key == "hello" and s.complete for s in b.store.live())
                )
                assert await b.get_bytes("hello") == b"welcome"

            # Once only: the same ticket is refused, and a third device gains nothing.
            c_home = make_home("c", None)
            with pytest.raises(JoinRefused) as reused:
                await join_group(c_home, ticket.encode())
            assert reused.value.code == "unknown-invite"
            assert c_home.load_secrets() == []


async def test_wrong_secret_expired_and_already_joined(make_home: Callable[..., Home]) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home = make_home("a", secret)
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            ticket = dataclasses.replace(
                a.create_invite(600),
                addresses=(("127.0.0.1", a.endpoint.local_address[1]),),
            )
            forged = dataclasses.replace(ticket, invite_secret=b"\x00" * 32)
            b_home = make_home("b", None)
            for n in (1, 2):
                with pytest.raises(JoinRefused) as wrong:
                    await join_group(b_home, forged.encode())
                # the inviter's MAC does not match a ticket with the wrong secret:
                # the joiner notices first, never sends a proof, and hangs up
                assert wrong.value.code == "impostor"
                await wait_until(a, lambda n=n: a.counters["joins_abandoned"] == n)
            assert b_home.load_secrets() == []
            # Each forged attempt got the inviter's MAC: one of the invite's three
            # tries. Two leave it open, and the real ticket works with the last.
            assert a.invites.is_open(ticket.invite_id, time.time())
            await join_group(b_home, ticket.encode())
            assert b_home.load_secrets()
            with pytest.raises(ConfigError, match="already in a group"):
                await join_group(b_home, ticket.encode())
            expired = dataclasses.replace(a.create_invite(600), expires=1)
            with pytest.raises(JoinRefused, match="expired"):
                await join_group(make_home("c", None), expired.encode())
            assert a.counters["joins_abandoned"] == 2 and a.counters["joins_refused"] == 0


async def test_three_forged_tickets_burn_the_invite(make_home: Callable[..., Home]) -> None:
    """The other half of the test above: two forged attempts leave the invite open,
    a third burns it. So each is exactly one of the invite's three tries."""
    a_home = make_home("a", GroupSecret.generate(os.urandom))
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            ticket = _loopback_ticket(a)
            forged = dataclasses.replace(ticket, invite_secret=b"\x00" * 32)
            ended = a.invite_end(ticket.invite_id)
            b_home = make_home("b", None)
            for _ in range(3):
                with pytest.raises(JoinRefused) as wrong:
                    await join_group(b_home, forged.encode())
                assert wrong.value.code == "impostor"
            await ended.wait()
            assert a.counters["joins_abandoned"] == 3 and a.counters["joins_refused"] == 0
            assert not a.invites.is_open(ticket.invite_id, time.time())
            with pytest.raises(JoinRefused) as burnt:
                await join_group(b_home, ticket.encode())
            assert burnt.value.code == "unknown-invite"
            assert b_home.load_secrets() == [] and _member_names(a) == []


# --- side by side over real QUIC -----------------------------------------------------------


def _loopback_ticket(node: Node, lifetime: int = 600) -> Ticket:
    return dataclasses.replace(
        node.create_invite(lifetime), addresses=(("127.0.0.1", node.endpoint.local_address[1]),)
    )


@asynccontextmanager
async def _raw_endpoint(identity: Identity, relay: str | None) -> AsyncIterator[Endpoint]:
    """A bare endpoint on loopback; with ``relay`` (NODEID@HOST:PORT) it reaches
    peers through that relay only."""
    config = EndpointConfig(bind_host="127.0.0.1", bind_port=0)
    if relay is None:
        async with open_endpoint(identity, config) as endpoint:
            yield endpoint
        return
    relay_node_id, relay_address = parse_relay_address(relay)
    config = dataclasses.replace(config, alpn=(*config.alpn, RELAY_ALPN), hole_punching=False)
    async with (
        open_endpoint(identity, config) as endpoint,
        open_relay_client(
            endpoint, identity, relay_address, relay_node_id, deliver=endpoint.receive_relayed_batch
        ) as client,
    ):
        await client.wait_connected()
        endpoint.set_relay(client.try_send, relay_node_id=client.relay_node_id)
        yield endpoint


async def _raw_join(
    ticket: Ticket,
    *,
    secret: bytes | None = None,
    invite_id: bytes | None = None,
    until: str = "welcome",
    identity: Identity | None = None,
    claim: NodeId | None = None,
    relay: str | None = None,
) -> dict[str, Any]:
    """Speak the joiner's side by hand, as an attacker or a broken joiner would.

    ``secret`` keys our proof (default the ticket's); ``until`` is where we
    stop: ``"challenge"`` (hang up after the inviter's MAC), ``"welcome"``
    (take the welcome and hang up without acknowledging it), ``"ack"``
    (behave). ``identity`` is ours (default a new one), ``claim`` the NodeId
    our JOIN_REQUEST names (default ours); with ``relay`` we dial the inviter
    through that relay, by NodeId only. Returns what the inviter sent.
    """
    identity = Identity.generate(os.urandom) if identity is None else identity
    claim = identity.node_id if claim is None else claim
    secret = ticket.invite_secret if secret is None else secret
    invite_id = ticket.invite_id if invite_id is None else invite_id
    seen: dict[str, Any] = {}
    async with _raw_endpoint(identity, relay) as endpoint:
        address = None if relay is not None else ticket.addresses[0]
        conn = await endpoint.connect(ticket.inviter, address)
        stream = await conn.open_stream()
        decoder = FrameDecoder(MAX_JOIN_FRAME)

        async def receive() -> tuple[int, list[object]]:
            while (body := decoder.next_frame()) is None:
                data = await stream.receive_some(MAX_JOIN_FRAME)
                assert data, "the inviter ended the stream without a message"
                decoder.feed(data)
            return decode_join_untrusted(body)

        challenge_j = os.urandom(CHALLENGE_SIZE)
        await stream.send_all(join_frame(JOIN_REQUEST, invite_id, claim.raw, "raw", challenge_j))
        kind, fields = await receive()
        seen["first"] = kind
        if kind == JOIN_REFUSED:
            seen["refused"] = fields[0]
        elif until != "challenge":
            assert kind == JOIN_CHALLENGE
            challenge_i, mac_i = fields
            assert isinstance(challenge_i, bytes)
            script = transcript(invite_id, ticket.inviter, claim, challenge_j,
                                challenge_i)  # fmt: skip
            seen["mac_i"], seen["script"] = mac_i, script
            await stream.send_all(join_frame(JOIN_PROOF, join_mac(secret, b"joiner", script)))
            kind, fields = await receive()
            seen["second"] = kind
            if kind == JOIN_REFUSED:
                seen["refused"] = fields[0]
            elif kind == JOIN_WELCOME and until == "ack":
                await stream.send_eof()
                with trio.move_on_after(5):
                    seen["acked"] = await stream.receive_some(MAX_JOIN_FRAME) == b""
        await conn.aclose()
    return seen


def _member_names(node: Node) -> list[str]:
    return [m.meta.name for m in node.store.members() if m.meta]


async def test_parallel_joiners_with_one_ticket_exactly_one_joins(
    make_home: Callable[..., Home],
) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home = make_home("a", secret)
    homes = [make_home(f"j{n}", None) for n in range(4)]
    outcome: dict[int, str] = {}
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            ticket = _loopback_ticket(a)

            async def join(n: int) -> None:
                try:
                    await join_group(homes[n], ticket.encode(), name=f"j{n}")
                    outcome[n] = "joined"
                except JoinRefused as exc:
                    outcome[n] = exc.code
                    assert "ask for a new one" in str(exc)  # says what to do

            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(join, n)
            assert sorted(outcome.values()).count("joined") == 1, outcome
            assert set(outcome.values()) <= {"joined", "in-use", "unknown-invite"}, outcome
            winner = next(n for n, code in outcome.items() if code == "joined")
            assert _member_names(a) == [f"j{winner}"]  # exactly one MEMBER entry
            for n, home in enumerate(homes):
                assert bool(home.load_secrets()) == (n == winner)
            assert len(a.invites) == 0


async def test_parallel_wrong_proofs_burn_the_ticket_and_nothing_is_recorded(
    make_home: Callable[..., Home],
) -> None:
    a_home = make_home("a", GroupSecret.generate(os.urandom))
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            ticket = _loopback_ticket(a)
            wrong = os.urandom(INVITE_SECRET_SIZE)
            seen: list[dict[str, Any]] = []

            async def attack() -> None:
                seen.append(await _raw_join(ticket, secret=wrong))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(attack)
            refusals = sorted(str(s["refused"]) for s in seen)
            # Three handshakes hold the three tries; the fourth is turned away
            # at once; no WELCOME anywhere.
            assert refusals == ["in-use", "wrong-code", "wrong-code", "wrong-code"], seen
            assert not any(s.get("second") == JOIN_WELCOME for s in seen)
            assert len(a.invites) == 0 and _member_names(a) == []
            # Burnt: the real ticket is refused too, with a clear reason.
            with pytest.raises(JoinRefused) as burnt:
                await join_group(make_home("b", None), ticket.encode())
            assert burnt.value.code == "unknown-invite"
            assert _member_names(a) == []


async def test_a_lost_welcome_records_nothing_and_the_invite_still_works(
    make_home: Callable[..., Home],
) -> None:
    a_home = make_home("a", GroupSecret.generate(os.urandom))
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            ticket = _loopback_ticket(a)
            dropped = await _raw_join(ticket, until="welcome")  # hangs up, no ack
            assert dropped["second"] == JOIN_WELCOME
            await wait_until(a, lambda: a.counters["joins_abandoned"] == 1)
            assert _member_names(a) == [] and len(a.invites) == 1
            # Hung up after the inviter's MAC: a try. Two of them and the lost
            # welcome (given back) leave one try, for the real joiner.
            for _ in range(2):
                assert (await _raw_join(ticket, until="challenge"))["first"] == JOIN_CHALLENGE
            await wait_until(a, lambda: a.counters["joins_abandoned"] == 3)
            assert len(a.invites) == 1
            b_home = make_home("b", None)
            await join_group(b_home, ticket.encode(), name="b")
            assert b_home.load_secrets() and _member_names(a) == ["b"]


async def test_handshakes_abandoned_after_the_mac_burn_the_invite(
    make_home: Callable[..., Home],
) -> None:
    a_home = make_home("a", GroupSecret.generate(os.urandom))
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            ticket = _loopback_ticket(a)
            ended = a.invite_end(ticket.invite_id)
            for _ in range(3):
                await _raw_join(ticket, until="challenge")
            await ended.wait()
            assert len(a.invites) == 0
            assert (await _raw_join(ticket))["refused"] == "unknown-invite"


async def test_join_requests_are_rate_limited_at_the_inviter(
    make_home: Callable[..., Home],
) -> None:
    a_home = make_home("a", GroupSecret.generate(os.urandom))
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            a.invites = InviteBook(request_burst=2, request_rate=0.001)
            ticket = _loopback_ticket(a)
            unknown = os.urandom(16)
            assert (await _raw_join(ticket, invite_id=unknown))["refused"] == "unknown-invite"
            assert (await _raw_join(ticket, invite_id=unknown))["refused"] == "unknown-invite"
            # The third request from 127.0.0.1 is not even looked up: the real
            # invite is refused too, and stays open, untried.
            assert (await _raw_join(ticket))["refused"] == "rate-limited"
            assert len(a.invites) == 1 and a.counters["joins_refused"] == 3


async def test_a_join_request_must_name_the_node_its_connection_is_from(
    make_home: Callable[..., Home],
) -> None:
    """Directly (the NodeId of the joiner's disco PING) and through the relay (the
    NodeId relayd authenticated): a JOIN_REQUEST naming another node is refused
    before it costs the invite a try, and relayed limits count per real NodeId."""
    from .test_short_codes import running_relay

    a_home = make_home("a", GroupSecret.generate(os.urandom))
    victim = Identity.generate(os.urandom).node_id
    with trio.fail_after(60):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            options = NodeOptions(listen=("127.0.0.1", 0), relay=relay_text,
                                  endpoint=EndpointConfig(hole_punching=False))  # fmt: skip
            async with open_node(a_home, options) as a:
                ticket = _loopback_ticket(a)
                for via in (None, relay_text, None):
                    seen = await _raw_join(ticket, claim=victim, relay=via)
                    assert seen == {"first": JOIN_REFUSED, "refused": "node-mismatch"}, seen
                assert a.counters["joins_node_mismatch"] == a.counters["joins_refused"] == 3
                # No try taken: two hang-ups after the inviter's MAC leave the last one.
                for _ in range(2):
                    assert (await _raw_join(ticket, until="challenge"))["first"] == JOIN_CHALLENGE
                b_home = make_home("b", None)
                await join_group(b_home, ticket.encode(), name="b")
                assert _member_names(a) == ["b"]

                # Relayed requests are limited per authenticated NodeId.
                a.invites = InviteBook(request_burst=1, request_rate=0.001)
                x, y = Identity.generate(os.urandom), Identity.generate(os.urandom)
                unknown = os.urandom(16)

                async def relayed(who: Identity, claim: NodeId | None = None) -> object:
                    seen = await _raw_join(ticket, invite_id=unknown, identity=who,
                                           claim=claim, relay=relay_text)  # fmt: skip
                    return seen.get("refused")

                assert await relayed(x, claim=y.node_id) == "node-mismatch"  # spends nothing
                assert await relayed(y) == "unknown-invite"  # y's own request: answered
                assert await relayed(x) == "unknown-invite"
                assert await relayed(x) == "rate-limited"
                assert a.counters["joins_node_mismatch"] == 4


async def test_invite_revoke_closes_tickets_and_short_codes_through_the_daemon(
    make_home: Callable[..., Home], capsys: pytest.CaptureFixture[str]
) -> None:
    from p2psync.cli import main

    from .test_short_codes import running_relay

    a_home = make_home("a", GroupSecret.generate(os.urandom))

    async def cli(*argv: str) -> int:
        code: int = await trio.to_thread.run_sync(main, ["--home", str(a_home.path), *argv])
        return code

    assert await cli("invite", "--revoke", "ABCD-EFGH-JKMN-PQRS") == 1
    assert "no daemon is running" in capsys.readouterr().err
    with trio.fail_after(60):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            options = NodeOptions(listen=("127.0.0.1", 0), relay=relay_text, control=True)
            async with open_node(a_home, options) as a:
                ticket = _loopback_ticket(a)
                short = await a.create_short_invite(600, lan=False)
                assert len(a.invites) == 2
                assert await cli("invite", "--revoke", ticket.encode()) == 0
                assert "revoked" in capsys.readouterr().out
                assert len(a.invites) == 1
                with pytest.raises(JoinRefused) as gone:
                    await join_group(make_home("b", None), ticket.encode())
                assert gone.value.code == "unknown-invite"
                assert await cli("invite", "--revoke", ticket.encode(), "--json") == 1
                assert "not open" in capsys.readouterr().err
                assert await cli("invite", "--revoke", short.code, "--json") == 0
                assert json.loads(capsys.readouterr().out) == {"revoked": True}
                assert len(a.invites) == 0
                # A mistyped code is caught before the daemon is asked.
                assert await cli("invite", "--revoke", short.code[:-1] + "U") == 1
                assert "'U'" in capsys.readouterr().err


async def test_devices_shows_last_seen_from_the_store_after_the_daemon_stopped(
    make_home: Callable[..., Home],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from p2psync.cli import main
    from p2psync.daemon import options_for
    from p2psync.store import Store

    monkeypatch.setattr("p2psync.defaults.PEER_SEEN_WRITE_INTERVAL", 0.3)
    writes: list[dict[NodeId, int]] = []
    save = Store.save_peers_seen

    def counted(self: Store, seen: Mapping[NodeId, int], keep: int) -> None:
        writes.append(dict(seen))
        save(self, seen, keep)

    monkeypatch.setattr(Store, "save_peers_seen", counted)
    a_home, b_home = make_home("a", GroupSecret.generate(os.urandom)), make_home("b", None)
    b_id = b_home.load_identity().node_id
    with trio.fail_after(60):
        async with open_node(a_home, LOOPBACK) as a:
            await join_group(b_home, _loopback_ticket(a).encode(), name="laptop-b")
            b_options = dataclasses.replace(
                options_for(b_home, listen="127.0.0.1:0", peers=[]), control=False
            )
            async with open_node(b_home, b_options):
                await wait_until(a, lambda: b_id in a.active)
                connected_at = time.time()
                await trio.sleep(1.5)  # about five write intervals while connected
            left_at = time.time()
            await wait_until(a, lambda: b_id not in a.active)
            writes_while_connected = len(writes)
            await trio.sleep(0.7)  # no peer seen since the last write: nothing to write
            assert len(writes) <= writes_while_connected + 1
    # At most one row per peer per interval (plus the write when a stopped).
    b_writes = [w[b_id] for w in writes if b_id in w]
    assert 2 <= len(b_writes) <= 1.5 / 0.3 + 3, b_writes
    assert all(len(w) == 1 for w in writes)
    assert b_writes == sorted(b_writes)
    # No daemon now: `devices` reads the last seen that a wrote.
    assert main(["--home", str(a_home.path), "devices", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    seen = rows["laptop-b"]["last_seen"]
    assert seen is not None and connected_at - 1 <= seen <= left_at + 1, (seen, left_at)
    assert main(["--home", str(a_home.path), "devices"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("laptop-b"))
    assert "last seen " + time.strftime("%Y-%m-%d", time.localtime(seen)) in line


def test_stored_last_seen_never_moves_back_and_is_bounded(make_home: Callable[..., Home]) -> None:
    peers = [Identity.from_seed(bytes([0x60 + n]) * 32).node_id for n in range(3)]
    with make_home("a", GroupSecret.generate(os.urandom)).open_store() as store:
        store.save_peers_seen({peers[0]: 1_000, peers[1]: 2_000}, keep=10)
        store.save_peers_seen({peers[0]: 500}, keep=10)  # an older report loses
        assert store.peers_seen() == {peers[0]: 1_000, peers[1]: 2_000}
        store.save_peers_seen({peers[2]: 3_000}, keep=2)  # the oldest goes
        assert store.peers_seen() == {peers[1]: 2_000, peers[2]: 3_000}
