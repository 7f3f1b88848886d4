"""Pairing: tickets, the join handshake over real QUIC, once-only invites."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest
import trio

from p2psync.crypto.group import GroupSecret, group_id_text
from p2psync.errors import BadFrame, ConfigError
from p2psync.home import Home
from p2psync.join import join_group
from p2psync.node import NodeOptions, open_node
from p2psync.pairing import InviteBook, JoinRefused, Ticket, decode_ticket_untrusted
from p2psync.proto.entry import Kind

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


def test_invite_book_expiry_once_and_burn() -> None:
    book = InviteBook()
    invite = book.create(os.urandom, now=1000, lifetime=60)
    assert book.find(invite.invite_id, now=1059) is invite
    with pytest.raises(JoinRefused, match="unknown, expired"):
        book.find(invite.invite_id, now=1060)
    second = book.create(os.urandom, now=2000, lifetime=60)
    for _ in range(3):
        book.failed_proof(second)
    with pytest.raises(JoinRefused):
        book.find(second.invite_id, now=2001)


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
            with pytest.raises(JoinRefused) as wrong:
                await join_group(b_home, forged.encode())
            # the inviter's MAC does not match a ticket with the wrong secret:
            # the joiner notices first and never sends a proof
            assert wrong.value.code == "impostor"
            assert b_home.load_secrets() == []
            # the real ticket still works after that
            await join_group(b_home, ticket.encode())
            assert b_home.load_secrets()
            with pytest.raises(ConfigError, match="already in a group"):
                await join_group(b_home, ticket.encode())
            expired = dataclasses.replace(a.create_invite(600), expires=1)
            with pytest.raises(JoinRefused, match="expired"):
                await join_group(make_home("c", None), expired.encode())
            assert a.counters["joins_refused"] == 0
