"""Short codes: parsing and typos, the split token's halves, and pairing through a real relayd.

The loopback tests block every direct path (the inviter's ticket lists a
dead loopback port and the path table never learns a candidate), so the
joiner reaches the inviter through relayd only, as two devices behind
NATs that cannot punch through would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2psync import pairing as wire_join
from p2psync.crypto.codes import BadCode, format_short_code, has_prefix
from p2psync.crypto.group import GroupSecret, group_id_text
from p2psync.crypto.identity import Identity
from p2psync.discovery.invites import (
    InviteAdvert,
    WrongSecretHalf,
    decode_invite_txt_untrusted,
    open_invite_advert,
)
from p2psync.errors import BadFrame, IntegrityError
from p2psync.home import Home
from p2psync.join import ShortInvite, invites_request, join_group
from p2psync.net.endpoint import Endpoint, EndpointConfig
from p2psync.node import Node, NodeOptions, StaticPeer, open_node
from p2psync.pairing import (
    JoinRefused,
    LookupHalf,
    ShortCode,
    Ticket,
    devices_from_members,
    open_ticket_untrusted,
    seal_ticket,
)
from p2psync.proto import invites as wire
from relayd.config import HostPort, RelaydConfig
from relayd.relay import RelaydAddresses, serve

from .conftest import wait_until

LOOPBACK = ("127.0.0.1", 0)
CHEAP = {"time_cost": 1, "memory_kib": 64}  # unit tests only: both sides must agree
CODE = ShortCode(bytes(range(10)))


# --- parsing and typos ------------------------------------------------------------------


def test_short_code_text_round_trip_and_forgiving_input() -> None:
    text = CODE.text
    assert len(text) == 19 and text.count("-") == 3
    assert ShortCode.parse_untrusted(text) == CODE
    assert ShortCode.parse_untrusted(text.lower().replace("-", " ")) == CODE
    # I, L read as 1 and O as 0: a code read aloud or copied by hand still parses.
    ones = ShortCode(bytes([0x08, 0x42, 0x10, 0x84, 0x21] * 2))  # every character is "1"
    assert ones.text == "1111-1111-1111-1111"
    assert ShortCode.parse_untrusted("IiLl-1111-lLiI-1111") == ones
    assert repr(CODE).endswith("****-****)") and CODE.text[10:] not in repr(CODE)


@pytest.mark.parametrize(
    ("typed", "complaint"),
    [
        ("ABCD-EFGH-JKMN-PQR", "16 characters"),  # one missing
        ("ABCD-EFGH-JKMN-PQRST", "16 characters"),  # one extra
        ("ABCD-EFGH-JKMN-PQRU", "'U' at position 19"),  # U is not in the alphabet
        ("ABCD-EFGH-JKMN-PQR!", "'!' at position 19"),
        ("", "16 characters"),
    ],
)
def test_short_code_typos_of_form_are_caught_locally(typed: str, complaint: str) -> None:
    with pytest.raises(BadCode, match=complaint):
        ShortCode.parse_untrusted(typed)


def test_ticket_or_short_code_is_told_apart() -> None:
    ticket = Ticket(Identity.from_seed(b"\x07" * 32).node_id, (), 1, b"\x01" * 16, b"\x02" * 32)
    assert has_prefix(ticket.encode(), "p2pt")
    assert has_prefix("  P2PT" + ticket.encode()[4:], "p2pt")
    assert not has_prefix(CODE.text, "p2pt")
    assert not has_prefix("x" * 10_000, "p2pt")


# --- the split token ------------------------------------------------------------------------


def _typo(code: ShortCode, position: int) -> ShortCode:
    """``code`` with the character at ``position`` (0..15) changed."""
    chars = list(code.text.replace("-", ""))
    chars[position] = "0" if chars[position] != "0" else "1"
    return ShortCode.parse_untrusted("".join(chars))


def test_halves_what_the_first_half_gives_and_what_it_does_not() -> None:
    same_lookup = _typo(CODE, 12)  # the second half differs
    assert same_lookup.lookup == CODE.lookup
    assert same_lookup.lookup.lookup_id == CODE.lookup.lookup_id
    keys = CODE.derive_keys(**CHEAP)
    other = same_lookup.derive_keys(**CHEAP)
    assert keys == CODE.derive_keys(**CHEAP)  # deterministic: both sides agree
    for name in ("invite_secret", "ticket_key", "fetch_proof", "advert_tag"):
        assert getattr(keys, name) != getattr(other, name), name
    assert keys.verifier != other.verifier
    assert keys.invite_id == other.invite_id == CODE.lookup.invite_id
    # Nothing derived from the first half alone is a key of the second.
    public = {CODE.lookup.lookup_id, CODE.lookup.lan_tag, CODE.lookup.invite_id}
    assert not public & {keys.invite_secret, keys.ticket_key, keys.fetch_proof, keys.advert_tag}
    assert "hidden" in repr(keys)
    # The salt is per code: another first half, same second half, other keys.
    moved = _typo(CODE, 2)
    assert moved.lookup != CODE.lookup
    assert moved.derive_keys(**CHEAP).invite_secret != keys.invite_secret


def _ticket(keys_invite_id: bytes, secret: bytes) -> Ticket:
    return Ticket(
        Identity.from_seed(b"\x05" * 32).node_id,
        (("192.0.2.1", 47300),),
        1_900_000_000,
        keys_invite_id,
        secret,
        relay="relaynode@relay.example:3478",
    )


def test_sealed_ticket_opens_only_with_the_whole_code() -> None:
    keys = CODE.derive_keys(**CHEAP)
    ticket = _ticket(keys.invite_id, keys.invite_secret)
    sealed = seal_ticket(keys, CODE.lookup, ticket, os.urandom)
    assert open_ticket_untrusted(keys, CODE.lookup, sealed) == ticket
    assert ticket.invite_secret not in sealed and ticket.inviter.raw not in sealed
    wrong = _typo(CODE, 15)
    with pytest.raises(IntegrityError, match="wrong or mistyped"):
        open_ticket_untrusted(wrong.derive_keys(**CHEAP), wrong.lookup, sealed)
    # Bound to its lookup id: the same blob under another first half does not open.
    with pytest.raises(IntegrityError):
        open_ticket_untrusted(keys, LookupHalf(b"\x00" * 5), sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(IntegrityError):
        open_ticket_untrusted(keys, CODE.lookup, tampered)


def test_an_eavesdropper_with_only_the_lookup_half_gets_nothing_usable() -> None:
    """Holding L (and so the relay's lookup id, the LAN tag, the invite id), every
    guess of the second half needs an Argon2id, and wrong guesses open nothing."""
    keys = CODE.derive_keys(**CHEAP)
    node_id = Identity.from_seed(b"\x06" * 32).node_id
    advert = InviteAdvert.seal(CODE.lookup.lan_tag, keys.advert_tag, node_id, 47300, os.urandom)
    txt = advert.to_txt()
    assert node_id.raw not in txt and str(node_id).encode() not in txt
    sealed = seal_ticket(keys, CODE.lookup, _ticket(keys.invite_id, keys.invite_secret), os.urandom)
    seen = decode_invite_txt_untrusted(txt)
    assert seen.lan_tag == CODE.lookup.lan_tag  # the onlooker can match the advert ...
    for _ in range(20):  # ... but no guessed second half opens anything
        guess = ShortCode(CODE.lookup.raw + os.urandom(5))
        guessed = guess.derive_keys(**CHEAP)
        with pytest.raises(WrongSecretHalf):
            open_invite_advert(seen, CODE.lookup.lan_tag, guessed.advert_tag)
        with pytest.raises(IntegrityError):
            open_ticket_untrusted(guessed, CODE.lookup, sealed)
        assert guessed.verifier != keys.verifier
    opened = open_invite_advert(seen, CODE.lookup.lan_tag, keys.advert_tag)
    assert opened is not None and opened.node_id == node_id and opened.port == 47300
    assert open_invite_advert(seen, b"\x00" * 16, keys.advert_tag) is None  # another code


# --- pairing through relayd ------------------------------------------------------------------


@asynccontextmanager
async def running_relay() -> AsyncIterator[RelaydAddresses]:
    config = RelaydConfig(listen=HostPort("127.0.0.1", 0), http=HostPort("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        addresses: RelaydAddresses = await nursery.start(partial(serve, config))
        yield addresses
        nursery.cancel_scope.cancel()


def _dead_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def relay_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tickets list a dead loopback port and no direct candidate is ever learnt."""
    dead = (("127.0.0.1", _dead_port()),)
    monkeypatch.setattr(Node, "ticket_addresses", lambda self: dead)
    monkeypatch.setattr(Endpoint, "add_candidate", lambda self, *args, **kwargs: None)
    if "hole_punching" in {f.name for f in dataclasses.fields(EndpointConfig)}:
        # Endpoints that punch holes by themselves (CALL_ME_MAYBE) are told not to.
        relay_only = partial(EndpointConfig, hole_punching=False)
        monkeypatch.setattr("p2psync.node.EndpointConfig", relay_only)
        monkeypatch.setattr("p2psync.join.EndpointConfig", relay_only)


def complete_keys(node: Node) -> set[str]:
    return {s.key or "" for s in node.store.live() if s.complete}


async def _offer(node: Node) -> ShortInvite:
    offered = await node.create_short_invite(600, lan=False)
    assert offered.relay == node.options.relay and offered.lan == "off"
    return offered


@pytest.mark.usefixtures("relay_only")
async def test_pair_through_relayd_with_a_short_code_then_sync_both_ways(
    make_home: Callable[..., Home],
) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home, c_home = make_home("a", secret), make_home("b", None), make_home("c", None)
    with trio.fail_after(180):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            a_options = NodeOptions(listen=LOOPBACK, relay=relay_text)
            async with open_node(a_home, a_options) as a:
                offered = await _offer(a)
                joined = await join_group(b_home, offered.code, "laptop-b", relay=relay_text,
                                          lan=False)  # fmt: skip
                assert joined.via == "relay" and joined.address is None
                assert joined.group_id == group_id_text(secret.keys().group_id)
                assert b_home.load_config().peers == (str(a.node_id),)
                # The inviter's home relay became ours: the daemon can reach a there.
                assert b_home.load_config().relay == relay_text
                # Single use: the code is gone from the relay and from a's book.
                with pytest.raises(JoinRefused) as again:
                    await join_group(c_home, offered.code, relay=relay_text, lan=False)
                assert again.value.code == "used"
                assert c_home.load_secrets() == []
                assert len(a.invites) == 0

                b_options = NodeOptions(
                    listen=LOOPBACK, relay=relay_text, peers=(StaticPeer(a.node_id, None),)
                )
                async with open_node(b_home, b_options) as b:
                    await a.put_bytes(b"from a", key="a/note")
                    await b.put_bytes(b"from b", key="b/note")
                    await wait_until(a, lambda: "b/note" in complete_keys(a))
                    await wait_until(b, lambda: "a/note" in complete_keys(b))
                    assert await b.get_bytes("a/note") == b"from a"
                    assert await a.get_bytes("b/note") == b"from b"
                    assert [p["path"] for p in b.status()["peers"]] == ["relay"]

                    # A third device joins through b, the device that just joined.
                    third = await _offer(b)
                    joined_c = await join_group(c_home, third.code, "phone-c", relay=relay_text,
                                                lan=False)  # fmt: skip
                    assert joined_c.inviter == str(b.node_id) and joined_c.via == "relay"
                    assert joined_c.group_id == joined.group_id
                    # a learns of c from b's signed MEMBER entry (a's own home was
                    # made without `group create`, so a has no record of itself).
                    await wait_until(a, lambda: len(devices_from_members(a.store.members())) == 2)
                    devices = {d.name: d for d in devices_from_members(a.store.members())}
                    assert devices["laptop-b"].added_by == str(a.node_id)
                    assert devices["phone-c"].added_by == str(b.node_id)
                    assert devices["phone-c"].node_id == str(c_home.load_identity().node_id)


@pytest.mark.usefixtures("relay_only")
async def test_typos_expiry_revocation_and_nothing_changes_on_the_inviter(
    make_home: Callable[..., Home],
) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home = make_home("a", secret)
    with trio.fail_after(180):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            async with open_node(a_home, NodeOptions(listen=LOOPBACK, relay=relay_text)) as a:
                members_before = len(a.store.members())
                offered = await _offer(a)
                code = ShortCode.parse_untrusted(offered.code)
                b_home = make_home("b", None)

                # A typo in the second half: the relay refuses the proof, the
                # invite survives it, and a never hears of it.
                with pytest.raises(JoinRefused) as wrong:
                    await join_group(b_home, _typo(code, 14).text, relay=relay_text, lan=False)
                assert wrong.value.code == "wrong-code"
                assert "2 more tries" in str(wrong.value)
                # A typo in the first half finds nothing.
                with pytest.raises(JoinRefused) as missing:
                    await join_group(b_home, _typo(code, 1).text, relay=relay_text, lan=False)
                assert missing.value.code == "not-found"
                assert "first 8 characters" in str(missing.value)
                assert len(a.store.members()) == members_before and len(a.invites) == 1
                assert a.counters["joins_refused"] == 0
                # The right code still works afterwards.
                await join_group(b_home, offered.code, relay=relay_text, lan=False)
                assert b_home.load_secrets()

                # Revoked by its creator: gone from the relay at once.
                revoked = await _offer(a)
                assert a.revoke_short_invite(revoked.code)
                c_home = make_home("c", None)
                with trio.fail_after(10):
                    while True:
                        try:
                            await join_group(c_home, revoked.code, relay=relay_text, lan=False)
                        except JoinRefused as exc:
                            if exc.code == "revoked":
                                break
                            assert exc.code == "not-found" or exc.code == "rate-limited", exc
                        await trio.sleep(0.2)
                assert not a.revoke_short_invite(revoked.code)

                # Expired: a short lifetime on the relay and in a's book.
                short_lived = await a.create_short_invite(1, lan=False)
                await trio.sleep(1.5)
                with pytest.raises(JoinRefused) as expired:
                    await join_group(c_home, short_lived.code, relay=relay_text, lan=False)
                assert expired.value.code == "expired"
                assert c_home.load_secrets() == []
                assert len(a.store.members()) == members_before + 1  # only b was added


@pytest.mark.usefixtures("relay_only")
async def test_ticket_carries_the_relay_and_join_falls_back_to_it(
    make_home: Callable[..., Home],
) -> None:
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", None)
    with trio.fail_after(120):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            async with open_node(a_home, NodeOptions(listen=LOOPBACK, relay=relay_text)) as a:
                await a.relay.wait_connected()  # type: ignore[union-attr]
                ticket = a.create_invite(600)
                assert ticket.relay == relay_text
                assert ticket.addresses == Node.ticket_addresses(a)  # the dead port only
                # b has no relay of its own: the ticket's is enough.
                joined = await join_group(b_home, ticket.encode(), "b")
                assert joined.via == "relay" and joined.relay == relay_text
                assert b_home.load_secrets()[0].keys().group_id == secret.keys().group_id


async def test_an_mdns_lan_address_moves_a_relayed_pair_off_the_relay_without_punching(
    make_home: Callable[..., Home],
) -> None:
    """mDNS's LAN addresses are direct candidates, not hole punching: they reach the
    path table with ``hole_punching=False`` too, and the pair leaves the relay."""
    from p2psync.discovery.mdns import DiscoveredPeer

    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", secret)
    no_punching = EndpointConfig(hole_punching=False)
    with trio.fail_after(60):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            a_options = NodeOptions(listen=LOOPBACK, relay=relay_text, endpoint=no_punching)
            async with open_node(a_home, a_options) as a:
                b_options = dataclasses.replace(a_options, peers=(StaticPeer(a.node_id, None),))
                async with open_node(b_home, b_options) as b:

                    def path() -> str:
                        return next(p.path for p in b.peers() if p.node_id == str(a.node_id))

                    await wait_until(b, lambda: a.node_id in b.active)
                    assert path() == "relay"  # b knows a by NodeId only: through the relay
                    here = (("127.0.0.1", a.endpoint.local_address[1]),)
                    b._mdns_peer(DiscoveredPeer(a.node_id, here, b"", "lo"))  # as run_mdns does
                    with trio.fail_after(10):
                        await wait_until(b, lambda: path() != "relay")
                    assert path() in ("lan", "direct")
                    await a.put_bytes(b"over the LAN", key="note")
                    await wait_until(b, lambda: "note" in complete_keys(b))


async def test_relayd_invites_service_round_trip(make_home: Callable[..., Home]) -> None:
    """CREATE, FETCH once, REVOKE by the owner only: the wire as a client sees it."""
    a_home = make_home("a", GroupSecret.generate(os.urandom))
    b_home = make_home("b", GroupSecret.generate(os.urandom))
    keys = CODE.derive_keys(**CHEAP)
    with trio.fail_after(60):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            options = NodeOptions(listen=LOOPBACK, relay=relay_text)
            async with open_node(a_home, options) as a, open_node(b_home, options) as b:
                for node in (a, b):
                    await node.relay.wait_connected()  # type: ignore[union-attr]
                assert a.relay is not None and b.relay is not None
                lookup_id = CODE.lookup.lookup_id
                create = wire.Create(lookup_id, keys.verifier, b"sealed", 9999)
                created = await invites_request(a.relay, create)
                assert created == wire.Created(600)  # capped at the relay's maximum
                again = await invites_request(a.relay, create)
                assert isinstance(again, wire.Failed) and again.code == wire.InviteFailure.EXISTS
                refused = await invites_request(b.relay, wire.Revoke(lookup_id))
                assert isinstance(refused, wire.Failed)
                assert refused.code == wire.InviteFailure.NOT_FOUND  # not b's to revoke
                got = await invites_request(b.relay, wire.Fetch(lookup_id, keys.fetch_proof))
                assert got == wire.TicketFound(b"sealed")
                used = await invites_request(b.relay, wire.Fetch(lookup_id, keys.fetch_proof))
                assert isinstance(used, wire.Failed) and used.code == wire.InviteFailure.USED


def test_short_code_format_is_crockford() -> None:
    assert format_short_code(bytes(10)) == "0000-0000-0000-0000"
    assert dataclasses.replace(CODE).text == CODE.text


def test_devices_lists_members_with_who_added_them(tmp_path: Path, capsys: Any) -> None:
    """`p2psync devices` on a group's founder, then with a second (recorded) member."""
    from p2psync.cli import main

    home = str(tmp_path / "founder")
    assert main(["--home", home, "init", "--name", "desk"]) == 0
    assert main(["--home", home, "group", "create"]) == 0
    capsys.readouterr()
    assert main(["--home", home, "devices", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    assert rows[0]["name"] == "desk" and rows[0]["added_by"] is None
    assert rows[0]["this_device"] is True and rows[0]["last_seen"] is not None
    founder = Home(Path(home))
    newcomer = Identity.generate(os.urandom).node_id
    with founder.open_store() as store:
        from p2psync.proto.entry import Kind
        from p2psync.store import Meta

        store.append(
            Kind.MEMBER,
            Meta(key="", content_type="device", name="tablet",
                 app={"node_id": str(newcomer), "added_by": str(store.identity.node_id)}),
            now_ms=1_700_000_000_000,
        )  # fmt: skip
    assert main(["--home", home, "devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("desk") and "created the group" in lines[0]
    assert "this device" in lines[0]
    founder_id = str(founder.load_identity().node_id)
    assert lines[1].startswith("tablet") and f"added by {founder_id[:10]}" in lines[1]
    assert str(newcomer)[:16] in lines[1] and "daemon not running" in lines[1]


def test_invite_qr_is_a_terminal_drawing_of_the_upper_case_ticket() -> None:
    import segno

    from p2psync.cli import _qr

    ticket = _ticket(b"\x01" * 16, b"\x02" * 32).encode()
    drawing = _qr(ticket)
    symbol = segno.make(ticket.upper(), error="m", micro=False)
    width, _ = symbol.symbol_size(border=2)
    rows = drawing.splitlines()
    assert len(rows) == (width + 1) // 2  # two modules per text row
    assert {len(row) for row in rows} == {width}
    assert set(drawing) <= {"█", "▀", "▄", " ", "\n"}
    # Base32 in upper case fits QR's alphanumeric mode: a smaller, easier symbol.
    assert symbol.mode == "alphanumeric" and symbol.version <= 10
    assert has_prefix(ticket.upper(), "p2pt")  # and join reads it back either way


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=500))
def test_untrusted_adverts_and_sealed_tickets_fail_cleanly(data: bytes) -> None:
    keys = CODE.derive_keys(**CHEAP)
    try:
        decode_invite_txt_untrusted(data)
    except BadFrame:
        pass
    try:
        open_ticket_untrusted(keys, CODE.lookup, data)
    except (BadFrame, IntegrityError):
        pass


@pytest.mark.usefixtures("relay_only")
async def test_a_lan_mismatch_stops_before_the_relay_spends_a_try(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With LAN and relay: the LAN advert shows the second half is wrong, so the
    joiner says so and never shows the relay a proof made from it."""
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", None)
    lan_calls: list[bytes] = []

    async def lan_with_a_typo(*args: Any, **kwargs: Any) -> Any:
        lan_calls.append(args[1])
        # The inviter's advert, as a joiner with the wrong second half sees it.
        kwargs["mismatches"].append(_lan_mismatch())
        kwargs["on_mismatch"]()
        await trio.sleep_forever()

    monkeypatch.setattr("p2psync.discovery.mdns.find_invite", lan_with_a_typo)
    with trio.fail_after(120):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            async with open_node(a_home, NodeOptions(listen=LOOPBACK, relay=relay_text)) as a:
                offered = await _offer(a)
                typo = _typo(ShortCode.parse_untrusted(offered.code), 13).text
                started = trio.current_time()
                with pytest.raises(JoinRefused) as wrong:
                    await join_group(b_home, typo, relay=relay_text)
                assert trio.current_time() - started < 5  # the grace, not the 10 s search
                assert wrong.value.code == "wrong-code" and lan_calls
                assert "check the last 8 characters" in str(wrong.value)
                # The relay's record still has all three tries: this typo, sent to
                # the relay, is its first.
                with pytest.raises(JoinRefused) as at_relay:
                    await join_group(b_home, typo, relay=relay_text, lan=False)
                assert "2 more tries" in str(at_relay.value)
                assert len(a.invites) == 1 and a.counters["joins_refused"] == 0
                await join_group(b_home, offered.code, relay=relay_text, lan=False)
                assert b_home.load_secrets()


def _lan_mismatch() -> WrongSecretHalf:
    """What opening an inviter's advert with a mistyped second half raises."""
    keys = CODE.derive_keys(**CHEAP)
    node_id = Identity.generate(os.urandom).node_id
    advert = InviteAdvert.seal(CODE.lookup.lan_tag, keys.advert_tag, node_id, 1, os.urandom)
    typo = _typo(CODE, 12).derive_keys(**CHEAP)
    with pytest.raises(WrongSecretHalf) as mismatch:
        open_invite_advert(advert, CODE.lookup.lan_tag, typo.advert_tag)
    return mismatch.value


@pytest.mark.usefixtures("relay_only")
async def test_a_ticket_fetched_from_the_relay_is_checked_like_a_typed_one(
    make_home: Callable[..., Home], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An expired ticket from the relay is refused before the inviter is dialed."""
    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", None)
    ticket_for = Node.ticket_for
    monkeypatch.setattr(
        Node,
        "ticket_for",
        lambda self, invite: dataclasses.replace(ticket_for(self, invite), expires=1),
    )
    with trio.fail_after(120):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            async with open_node(a_home, NodeOptions(listen=LOOPBACK, relay=relay_text)) as a:
                offered = await _offer(a)
                with pytest.raises(JoinRefused) as expired:
                    await join_group(b_home, offered.code, relay=relay_text, lan=False)
                assert expired.value.code == "expired" and "expired" in str(expired.value)
                assert b_home.load_secrets() == []
                # Nothing reached the inviter: its invite is open and untried.
                assert len(a.invites) == 1
                assert a.counters["joins_refused"] == a.counters["joins_abandoned"] == 0


async def test_an_attacker_with_only_the_lookup_half_gets_nothing_from_relay_or_inviter(
    make_home: Callable[..., Home],
) -> None:
    """Knowing the first 8 characters (say, inverted from the LAN tag), and even the
    inviter's address: the relay hands out nothing without the second half, and the
    inviter's handshake yields a MAC no guess can be checked against without Argon2id
    and a refusal; the invite survives for its real joiner."""
    from .test_pairing import _raw_join

    secret = GroupSecret.generate(os.urandom)
    a_home, b_home = make_home("a", secret), make_home("b", None)
    with trio.fail_after(120):
        async with running_relay() as relay:
            relay_text = f"{relay.node_id}@{relay.udp.host}:{relay.udp.port}"
            async with open_node(a_home, NodeOptions(listen=LOOPBACK, relay=relay_text)) as a:
                offered = await _offer(a)
                lookup = ShortCode.parse_untrusted(offered.code).lookup
                guesses = [ShortCode(lookup.raw + os.urandom(5)).derive_keys() for _ in range(2)]
                assert a.relay is not None
                for left, guess in zip((2, 1), guesses, strict=True):
                    fetch = wire.Fetch(lookup.lookup_id, guess.fetch_proof)
                    reply = await invites_request(a.relay, fetch)  # any client of the relay
                    assert isinstance(reply, wire.Failed), reply  # never a TicketFound
                    assert reply.code == wire.InviteFailure.WRONG_CODE
                    assert reply.tries_left == left
                # The inviter, dialed directly with the invite id derived from L alone.
                port = a.endpoint.local_address[1]
                target = Ticket(a.node_id, (("127.0.0.1", port),), 0, lookup.invite_id, b"")
                seen = await _raw_join(target, secret=guesses[0].invite_secret)
                assert seen["first"] == wire_join.JOIN_CHALLENGE
                assert seen["refused"] == "wrong-code" and "second" in seen
                assert seen["second"] == wire_join.JOIN_REFUSED  # no JOIN_WELCOME
                for guess in guesses:  # the MAC it got opens to no guess
                    expected = wire_join.join_mac(guess.invite_secret, b"inviter", seen["script"])
                    assert expected != seen["mac_i"]
                assert devices_from_members(a.store.members()) == []
                # The real joiner still gets in: one try left on the relay, two at a.
                await join_group(b_home, offered.code, "b", relay=relay_text, lan=False)
                assert b_home.load_secrets()[0].keys().group_id == secret.keys().group_id
                assert [d.name for d in devices_from_members(a.store.members())] == ["b"]
