"""Pairing's trio shells: the joiner's side, the inviter's short codes, relayd's invite store.

``join_group(home, code)`` takes what the user typed - a **ticket**
(``p2pt…``, checksummed: a typo is caught before anything is sent) or a
**short code** ``XXXX-XXXX-XXXX-XXXX`` - finds the inviter, runs the join
handshake of :mod:`p2psync.pairing`, stores the group secrets it receives
and records the inviter as a static peer in ``config.toml`` so that
``p2psync daemon`` connects to it.

Finding the inviter
-------------------
- **Ticket**: dial each address it lists. When it names the inviter's home
  relay, the joiner connects to that relay first; a dial whose direct path
  gets no answer then goes through the relay (the endpoint's path table
  decides per datagram), so two devices behind NATs that cannot reach each
  other still pair.
- **Short code**: derive the code's keys (Argon2id, ~0.3 s, in a worker
  thread), then look on the LAN (mDNS, :func:`p2psync.discovery.mdns.find_invite`)
  and on the relay (the home's configured relay or ``--relay``) at once. The
  LAN gets a head start of :data:`LAN_HEAD_START`: an inviter next to us
  answers in well under that, and then the relay copy is never fetched (the
  inviter revokes it). An advert of our first half that our second half does
  not open means a typo: after :data:`~p2psync.defaults.JOIN_LAN_MISMATCH_GRACE`
  the search stops with ``wrong-code`` and the relay is not asked (a proof
  from a wrong second half would spend one of its tries). Otherwise the
  relay's sealed ticket (fetched with the proof from the second half,
  :mod:`p2psync.proto.invites`) says whom to dial, as a ticket does, once it
  passes the checks a typed ticket does (not expired, not our own).

Offering a short code
---------------------
:func:`keep_short_invite` (what :meth:`p2psync.node.Node.create_short_invite`
runs) draws a code, opens its invite in the node's
:class:`~p2psync.pairing.InviteBook`, stores the sealed ticket on the home
relay (``CREATE``) and announces the code on the LAN
(:func:`p2psync.discovery.mdns.advertise_invite`); it needs at least one of
the two. It keeps both up until the invite is used up (a device joined, or
it was burnt by wrong proofs, or revoked), or expires, then withdraws the
LAN advert and revokes the relay copy (``REVOKE``; a copy already fetched
is gone anyway).

The handshake itself is :mod:`p2psync.pairing`'s; the joiner ends its
stream once it has opened the group secrets (the inviter records it only
then) and waits up to :data:`~p2psync.defaults.JOIN_ACK_WAIT` for the
inviter's end of stream before it closes the connection.

Errors are :class:`~p2psync.pairing.JoinRefused` with a stable ``code``:
``wrong-code`` (the second half does not fit: found out before the inviter
is contacted, so nothing changes there), ``not-found``, ``used``,
``expired``, ``revoked``, ``burned``, ``rate-limited``, ``unreachable``,
``no-relay``, ``self``, ``impostor`` (the inviter could not prove the
invite), or the inviter's own refusal codes (``unknown-invite``,
``in-use``, ``rate-limited``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import trio

from p2psync import defaults, errors
from p2psync.crypto.codes import has_prefix
from p2psync.crypto.group import GroupSecret, group_id_text
from p2psync.crypto.identity import Identity, NodeId
from p2psync.discovery.invites import WrongSecretHalf
from p2psync.errors import BadFrame, ConfigError, IntegrityError, P2PSyncError
from p2psync.home import Home
from p2psync.known_relays import KnownRelays, resolve_relay
from p2psync.net.endpoint import ConnectFailed, Connection, Endpoint, EndpointConfig, open_endpoint
from p2psync.net.relay_client import (
    RelayClient,
    RelayUnavailable,
    open_relay_client,
    parse_relay_address,
)
from p2psync.net.service_stream import ServiceRefused
from p2psync.net.tls import PeerIdentityMismatch
from p2psync.pairing import (
    CHALLENGE_SIZE,
    JOIN_CHALLENGE,
    JOIN_PROOF,
    JOIN_REFUSED,
    JOIN_REQUEST,
    JOIN_WELCOME,
    MAX_JOIN_FRAME,
    SHORT_CODE_MAX_LIFETIME,
    TICKET_PREFIX,
    Address,
    CodeKeys,
    JoinRefused,
    ShortCode,
    Ticket,
    check_mac,
    decode_join_untrusted,
    decode_ticket_untrusted,
    join_frame,
    join_mac,
    open_secrets,
    open_ticket_untrusted,
    seal_ticket,
    transcript,
)
from p2psync.proto import invites as invites_wire
from p2psync.proto.codec import as_bytes, as_str
from p2psync.proto.messages import FrameDecoder
from p2psync.proto.relay import RELAY_ALPN

if TYPE_CHECKING:
    from p2psync.node import Node

log = logging.getLogger(__name__)

# --- defaults (candidates for p2psync/defaults.py) -------------------------------------
# A direct address answers within a few RTTs or not at all.
CONNECT_TIMEOUT: Final = 5.0
# Through a relay: the disco wait for a direct pong, then QUIC over the relay.
RELAYED_CONNECT_TIMEOUT: Final = 20.0
# Connecting and authenticating to a relay: a QUIC handshake and one RTT.
RELAY_CONNECT_TIMEOUT: Final = 10.0
# One request on the relay's invites service.
INVITES_REQUEST_TIMEOUT: Final = 10.0
# mDNS answers on a LAN arrive within a second or two; the relay waits this long.
LAN_HEAD_START: Final = 2.0
# With no relay answer (none configured, or "not found") keep browsing this long.
LAN_FIND_TIMEOUT: Final = 10.0
# Withdrawing a code from the relay when it ends (also on shutdown: keep it short).
REVOKE_TIMEOUT: Final = 3.0
# The whole handshake once connected.
HANDSHAKE_TIMEOUT: Final = 30.0


@dataclass(frozen=True, slots=True)
class Joined:
    group_id: str
    inviter: str
    address: Address | None  # where the inviter answered directly; None through the relay
    via: str  # "direct" or "relay"
    relay: str | None = None  # the relay the inviter uses (the daemon needs it to reach it)


@dataclass(frozen=True, slots=True)
class _Target:
    inviter: NodeId
    addresses: tuple[Address, ...]
    relay: str | None


# --- the relay's invite store ----------------------------------------------------------


async def invites_request(client: RelayClient, request: invites_wire.Request) -> invites_wire.Reply:
    """Send one request to the relay's ``invites`` service and return its reply.

    Raises :class:`~p2psync.net.relay_client.RelayUnavailable` when not
    connected, :class:`~p2psync.net.service_stream.ServiceRefused` when the
    relay runs no invite store, :class:`~p2psync.errors.BadFrame` for a
    malformed reply, :class:`trio.TooSlowError` after
    :data:`INVITES_REQUEST_TIMEOUT`.
    """
    stream = await client.open_service(
        invites_wire.SERVICE, invites_wire.VERSION, invites_wire.MAX_FRAME
    )
    try:
        with trio.fail_after(INVITES_REQUEST_TIMEOUT):
            await stream.send(invites_wire.encode_request(request))
            body = await stream.receive()
        if body is None:
            raise errors.RemoteProtocolError("the relay ended the invites stream without a reply")
        return invites_wire.decode_reply_untrusted(body)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


def _refusal(failed: invites_wire.Failed) -> JoinRefused:
    known = failed.known_code
    code = known.label if known is not None else "relay-refused"
    message = failed.message or "the relay refused"
    if known is invites_wire.InviteFailure.WRONG_CODE and failed.tries_left is not None:
        message += f" ({failed.tries_left} more tries before the code is burnt)"
    return JoinRefused(code, message)


async def _fetch_ticket(client: RelayClient, code: ShortCode, keys: CodeKeys) -> Ticket:
    lookup = code.lookup
    try:
        reply = await invites_request(
            client, invites_wire.Fetch(lookup.lookup_id, keys.fetch_proof)
        )
    except ServiceRefused as exc:
        raise JoinRefused("no-relay", f"the relay cannot hold invite codes: {exc}") from None
    except (trio.TooSlowError, trio.BrokenResourceError, errors.BrokenResourceError) as exc:
        raise JoinRefused("unreachable", f"the relay did not answer: {exc}") from None
    if isinstance(reply, invites_wire.Failed):
        raise _refusal(reply)
    if not isinstance(reply, invites_wire.TicketFound):
        raise BadFrame("the relay answered FETCH with something other than a ticket")
    try:
        return open_ticket_untrusted(keys, lookup, reply.sealed)
    except IntegrityError as exc:
        # The relay checked our proof, so this is a relay (or inviter) fault.
        raise JoinRefused("wrong-code", str(exc)) from None


# --- endpoint and relay ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _joiner_endpoint(
    home: Home, identity: Identity, relay_text: str | None
) -> AsyncIterator[tuple[Endpoint, RelayClient | None, str | None]]:
    """An endpoint on an ephemeral port, with ``relay_text`` as its relay when it answers.

    Yields ``(endpoint, relay client or None, why the relay is missing)``. A
    relay named by ``HOST:PORT`` alone is identified and pinned first
    (:mod:`p2psync.known_relays`).
    """
    config = EndpointConfig(bind_host="0.0.0.0", bind_port=0)
    if relay_text is None:
        async with open_endpoint(identity, config) as endpoint:
            yield endpoint, None, "no relay configured"
        return
    relay_node_id, relay_address = parse_relay_address(relay_text)
    config = dataclasses.replace(config, alpn=(*config.alpn, RELAY_ALPN))
    async with open_endpoint(identity, config) as endpoint:
        if relay_node_id is None:
            try:
                relay_node_id = await resolve_relay(endpoint, KnownRelays(home.path), relay_address)
            except (ConnectFailed, RelayUnavailable, PeerIdentityMismatch) as exc:
                why = f"relay {relay_address[0]}:{relay_address[1]}: {exc}"
                log.warning("%s; going on without it", why)
                yield endpoint, None, why
                return
        async with open_relay_client(endpoint, identity, relay_address, relay_node_id) as client:
            with trio.move_on_after(RELAY_CONNECT_TIMEOUT):
                await client.wait_connected()
            if not client.connected:
                why = f"relay {relay_address[0]}:{relay_address[1]} did not answer"
                if client.last_error is not None:
                    why += f" ({client.last_error})"
                log.warning("%s; going on without it", why)
                yield endpoint, None, why
                return
            endpoint.set_relay(client.try_send, relay_node_id=client.relay_node_id)

            async def pump() -> None:
                async for src, payload in client.received:
                    endpoint.receive_relayed(src, payload)

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump)
                    try:
                        yield endpoint, client, None
                    finally:
                        endpoint.set_relay(None)
                        nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The caller's error, raised as itself (the pump only ends by cancellation).
                if len(group.exceptions) == 1:
                    raise group.exceptions[0] from None
                raise


async def _dial(
    endpoint: Endpoint, target: _Target, relay: RelayClient | None
) -> tuple[Connection, str]:
    """Connect to the inviter: its addresses, and through the relay when we have one."""
    addresses = target.addresses
    if relay is not None:
        # Every address is probed at once; the first pong moves the path to it,
        # no pong keeps it on the relay.
        for address in addresses[1:]:
            endpoint.add_candidate(target.inviter, address)
        with trio.move_on_after(RELAYED_CONNECT_TIMEOUT):
            try:
                conn = await endpoint.connect(target.inviter, addresses[0] if addresses else None)
            except (P2PSyncError, trio.BrokenResourceError, OSError) as exc:
                raise JoinRefused("unreachable", f"could not reach the inviter: {exc}") from None
            return conn, conn.path
        raise JoinRefused(
            "unreachable",
            f"the inviter did not answer directly or through the relay in "
            f"{RELAYED_CONNECT_TIMEOUT:.0f}s",
        )
    problems = []
    for address in addresses:
        with trio.move_on_after(CONNECT_TIMEOUT):
            try:
                return await endpoint.connect(target.inviter, address), "direct"
            except (P2PSyncError, trio.BrokenResourceError, OSError) as exc:
                problems.append(f"{address[0]}:{address[1]}: {exc}")
                continue
        problems.append(f"{address[0]}:{address[1]}: no answer in {CONNECT_TIMEOUT:.0f}s")
    if not problems:
        problems.append("the invite lists no address and no relay answered")
    raise JoinRefused("unreachable", "could not reach the inviter: " + "; ".join(problems))


# --- the handshake --------------------------------------------------------------------------


async def _handshake(
    conn: Connection,
    identity: Identity,
    inviter: NodeId,
    invite_id: bytes,
    invite_secret: bytes,
    name: str,
) -> list[GroupSecret]:
    stream = await conn.open_stream()
    decoder = FrameDecoder(MAX_JOIN_FRAME)

    async def next_message() -> tuple[int, list[object]]:
        while (body := decoder.next_frame()) is None:
            data = await stream.receive_some(MAX_JOIN_FRAME)
            if not data:
                raise JoinRefused("closed", "the inviter closed the connection")
            decoder.feed(data)
        kind, fields = decode_join_untrusted(body)
        if kind == JOIN_REFUSED and len(fields) == 2:
            raise JoinRefused(as_str(fields[0], "code", max_size=64),
                              as_str(fields[1], "reason", max_size=512))  # fmt: skip
        return kind, fields

    challenge_j = os.urandom(CHALLENGE_SIZE)
    await stream.send_all(
        join_frame(JOIN_REQUEST, invite_id, identity.node_id.raw, name, challenge_j)
    )
    kind, fields = await next_message()
    if kind != JOIN_CHALLENGE or len(fields) != 2:
        raise BadFrame("expected JOIN_CHALLENGE from the inviter")
    challenge_i = as_bytes(fields[0], "challenge", size=CHALLENGE_SIZE)
    script = transcript(invite_id, inviter, identity.node_id, challenge_j, challenge_i)
    try:
        check_mac(join_mac(invite_secret, b"inviter", script), fields[1], "inviter")
    except IntegrityError:
        raise JoinRefused("impostor", "the inviter could not prove the invite") from None
    await stream.send_all(join_frame(JOIN_PROOF, join_mac(invite_secret, b"joiner", script)))
    kind, fields = await next_message()
    if kind != JOIN_WELCOME or len(fields) != 1:
        raise BadFrame("expected JOIN_WELCOME from the inviter")
    secrets = open_secrets(identity, as_bytes(fields[0], "sealed", max_size=MAX_JOIN_FRAME))
    # Our end of stream tells the inviter we hold the secrets (only then does it
    # use up the invite and record us); its own end of stream, or its hanging up,
    # says ours arrived. We have the secrets either way.
    await stream.send_eof()
    with (
        trio.move_on_after(defaults.JOIN_ACK_WAIT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        while await stream.receive_some(MAX_JOIN_FRAME):
            pass
    return secrets


async def _pair(
    endpoint: Endpoint,
    relay: RelayClient | None,
    target: _Target,
    identity: Identity,
    invite_id: bytes,
    invite_secret: bytes,
    name: str,
) -> tuple[list[GroupSecret], Address | None, str]:
    conn, via = await _dial(endpoint, target, relay)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            secrets = await _handshake(
                conn, identity, target.inviter, invite_id, invite_secret, name
            )
        address: Address | None = None
        if via == "direct":
            remote = conn.remote_address
            address = (str(remote[0]), int(remote[1])) if remote is not None else None
        return secrets, address, via
    finally:
        with trio.CancelScope(shield=True), contextlib.suppress(P2PSyncError):
            await conn.aclose()


# --- short codes: finding the inviter ---------------------------------------------------


async def _find_by_code(
    code: ShortCode,
    keys: CodeKeys,
    relay: RelayClient | None,
    relay_missing: str | None,
    lan: bool,
    our_node_id: NodeId,
) -> _Target:
    found: list[_Target] = []
    relay_failure: list[JoinRefused] = []
    lan_problem: list[str] = []
    mismatches: list[WrongSecretHalf] = []
    lan_done = trio.Event()
    mismatched = trio.Event()
    fetching = False

    async with trio.open_nursery() as nursery:

        async def stop_after_mismatch() -> None:
            # Our first half's advert does not open with our second half. The
            # right advert (if a stranger planted that one) shows up about as
            # fast; after a grace stop looking, unless the relay is answering.
            await mismatched.wait()
            await trio.sleep(defaults.JOIN_LAN_MISMATCH_GRACE)
            if not fetching:
                nursery.cancel_scope.cancel()

        async def look_on_lan() -> None:
            from p2psync.discovery.mdns import MdnsConfig, MdnsStats, MdnsUnavailable, find_invite

            stats = MdnsStats()
            try:
                with trio.move_on_after(LAN_FIND_TIMEOUT) as searched:
                    invite = await find_invite(
                        MdnsConfig(),
                        code.lookup.lan_tag,
                        keys.advert_tag,
                        our_node_id=our_node_id,
                        stats=stats,
                        mismatches=mismatches,
                        on_mismatch=mismatched.set,
                    )
                    found.append(_Target(invite.node_id, invite.addresses, None))
                    nursery.cancel_scope.cancel()
                if searched.cancelled_caught and not stats.heard_elsewhere:
                    lan_problem.append(
                        f"no mDNS heard from any other device in {LAN_FIND_TIMEOUT:.0f}s: "
                        "this network may block multicast (try --relay)"
                    )
            except MdnsUnavailable as exc:
                lan_problem.append(f"LAN search unavailable: {exc}")
            finally:
                lan_done.set()

        if lan:
            nursery.start_soon(look_on_lan)
            nursery.start_soon(stop_after_mismatch)
        else:
            lan_problem.append("LAN search off")
            lan_done.set()
        if relay is not None:
            with trio.move_on_after(LAN_HEAD_START):
                await lan_done.wait()
            if not found and mismatches:
                # The inviter is on this LAN and our second half does not open its
                # advert: asking the relay with that half would only spend one of
                # the record's tries.
                nursery.cancel_scope.cancel()
            elif not found:
                fetching = True
                try:
                    ticket = await _fetch_ticket(relay, code, keys)
                    _check_ticket(ticket, our_node_id)
                except JoinRefused as exc:
                    relay_failure.append(exc)
                    if exc.code != "not-found":
                        nursery.cancel_scope.cancel()  # the relay knows this code: final
                else:
                    found.append(_Target(ticket.inviter, ticket.addresses, ticket.relay))
                    nursery.cancel_scope.cancel()
                fetching = False
        await lan_done.wait()
        nursery.cancel_scope.cancel()
    if found:
        return found[0]
    final = [failure for failure in relay_failure if failure.code != "not-found"]
    if final:
        raise final[0]  # the relay was asked and knows the code: its word is the last
    if mismatches:
        raise JoinRefused("wrong-code", str(mismatches[0]))
    reasons = [str(failure) for failure in relay_failure]
    if relay is None:
        reasons.append(f"no relay asked ({relay_missing}; use --relay NODEID@HOST:PORT)")
    if lan:
        reasons.append(lan_problem[0] if lan_problem else "no inviter of this code on this LAN")
    else:
        reasons.extend(lan_problem)
    raise JoinRefused("not-found", "no invite found for this code: " + "; ".join(reasons))


# --- the command ------------------------------------------------------------------------------


def _check_joinable(home: Home) -> Identity:
    identity = home.load_identity()
    if home.load_secrets():
        raise ConfigError("this device is already in a group; use a fresh --home to join another")
    return identity


def _check_ticket(ticket: Ticket, our_node_id: NodeId) -> None:
    """A ticket typed in, or fetched from the relay for a short code: still good, not ours."""
    if ticket.expires <= time.time():
        raise JoinRefused("expired", "this invite has expired; ask for a new one")
    if ticket.inviter == our_node_id:
        raise JoinRefused("self", "this is our own invite; run join on the other device")


def _finish(
    home: Home,
    secrets: Sequence[GroupSecret],
    inviter: NodeId,
    address: Address | None,
    via: str,
    relay: str | None,
) -> Joined:
    for secret in secrets:
        home.save_secret(secret)
    home.add_peer(f"{inviter}@{address[0]}:{address[1]}" if address is not None else str(inviter))
    if relay is not None and home.load_config().relay is None:
        home.set_relay(relay)  # the inviter's home relay becomes ours: it can reach us there
    gid = group_id_text(secrets[0].keys().group_id)
    log.info("joined group %s through %s (%s)", gid, inviter.short(), via)
    return Joined(gid, str(inviter), address, via, relay)


async def join_group(
    home: Home,
    code_text: str,
    name: str = "",
    *,
    relay: str | None = None,
    lan: bool = True,
) -> Joined:
    """Join the group of whoever made ``code_text`` (a ticket or a short code).

    ``relay`` (``NODEID@HOST:PORT``) is where to look a short code up, and
    how to reach the inviter when its addresses fail; default: the ticket's
    relay for a ticket, the home's configured relay for a short code.
    ``lan=False`` skips the mDNS search for a short code.
    """
    identity = _check_joinable(home)
    name = name or home.load_config().name
    if has_prefix(code_text, TICKET_PREFIX):
        ticket = decode_ticket_untrusted(code_text)
        _check_ticket(ticket, identity.node_id)
        target = _Target(ticket.inviter, ticket.addresses, ticket.relay)
        relay_text = ticket.relay or relay
        async with _joiner_endpoint(home, identity, relay_text) as (endpoint, client, _why):
            secrets, address, via = await _pair(
                endpoint, client, target, identity, ticket.invite_id, ticket.invite_secret, name
            )
        return _finish(home, secrets, ticket.inviter, address, via, relay_text)
    code = ShortCode.parse_untrusted(code_text)
    relay_text = relay or home.load_config().relay
    if relay_text is None and not lan:
        raise JoinRefused(
            "no-relay",
            "a short code is found on the LAN or through a relay: give --relay NODEID@HOST:PORT",
        )
    keys = await trio.to_thread.run_sync(code.derive_keys)
    async with _joiner_endpoint(home, identity, relay_text) as (endpoint, client, why):
        target = await _find_by_code(code, keys, client, why, lan, identity.node_id)
        if target.inviter == identity.node_id:
            raise JoinRefused("self", "this is our own invite; run join on the other device")
        secrets, address, via = await _pair(
            endpoint, client, target, identity, keys.invite_id, keys.invite_secret, name
        )
    return _finish(home, secrets, target.inviter, address, via, target.relay or relay_text)


# --- the inviter's short codes --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShortInvite:
    """An offered short code: the code, when it ends, and where joiners can find it."""

    code: str
    expires: int  # unix seconds
    relay: str | None  # the relay holding the sealed ticket; None if not stored there
    lan: str  # the LAN advert's status line ("off", "mDNS active on ...", "mDNS unavailable: ...")
    relay_problem: str | None = None  # why the relay copy is missing, if it is

    def __repr__(self) -> str:
        return f"ShortInvite({self.code[:9]}****-****, relay={self.relay!r}, lan={self.lan!r})"

    def to_json(self) -> dict[str, object]:
        return {
            "code": self.code,
            "expires": self.expires,
            "relay": self.relay,
            "lan": self.lan,
            "relay_problem": self.relay_problem,
        }


async def _store_on_relay(
    node: Node, code: ShortCode, keys: CodeKeys, ticket: Ticket, lifetime: int
) -> tuple[str | None, str | None]:
    """(relay the sealed ticket is on, or None; why not)."""
    client = node.relay
    if client is None:
        return None, "no relay configured"
    with trio.move_on_after(RELAY_CONNECT_TIMEOUT):
        await client.wait_connected()
    sealed = seal_ticket(keys, code.lookup, ticket, os.urandom)
    request = invites_wire.Create(code.lookup.lookup_id, keys.verifier, sealed, lifetime)
    try:
        reply = await invites_request(client, request)
    except (
        ServiceRefused,
        BadFrame,
        trio.TooSlowError,
        trio.BrokenResourceError,
        errors.BrokenResourceError,
        errors.RemoteProtocolError,
    ) as exc:
        return None, f"the relay did not take the code: {exc}"
    if isinstance(reply, invites_wire.Failed):
        return None, f"the relay did not take the code: {reply.message}"
    return node.options.relay, None


async def _revoke_on_relay(node: Node, code: ShortCode) -> None:
    client = node.relay
    if client is None or not client.connected:
        return
    with trio.move_on_after(REVOKE_TIMEOUT):
        try:
            reply = await invites_request(client, invites_wire.Revoke(code.lookup.lookup_id))
        except (P2PSyncError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.info("could not withdraw the short code from the relay: %s", exc)
            return
        if isinstance(reply, invites_wire.Revoked):
            log.info("short code withdrawn from the relay")


async def keep_short_invite(
    node: Node,
    lifetime: int,
    lan: bool,
    *,
    task_status: trio.TaskStatus[ShortInvite] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Offer a fresh short code until it is used up or expires (module docstring).

    ``task_status.started`` gets the :class:`ShortInvite`; raises
    :class:`~p2psync.pairing.JoinRefused` (``no-way``) before that when
    neither the relay nor the LAN can carry the code.
    """
    lifetime = max(1, min(lifetime, SHORT_CODE_MAX_LIFETIME))
    code = ShortCode.generate(os.urandom)
    keys = await trio.to_thread.run_sync(code.derive_keys)
    invite = node.invites.add(keys.invite_id, keys.invite_secret, time.time(), lifetime)
    ended = node.invite_end(invite.invite_id)
    stored_on: str | None = None
    try:
        stored_on, relay_problem = await _store_on_relay(
            node, code, keys, node.ticket_for(invite), lifetime
        )
        unreachable: str | None = None
        async with trio.open_nursery() as nursery:
            lan_status = "off"
            if lan:
                from p2psync.discovery.invites import InviteAdvert
                from p2psync.discovery.mdns import MdnsConfig, advertise_invite

                port = node.endpoint.local_address[1]

                def advert() -> InviteAdvert:
                    return InviteAdvert.seal(
                        code.lookup.lan_tag, keys.advert_tag, node.node_id, port, os.urandom
                    )

                lan_status = await nursery.start(advertise_invite, MdnsConfig(), advert, port)
            if stored_on is None and not lan_status.startswith("mDNS active"):
                unreachable = f"{relay_problem}; LAN: {lan_status}"
                nursery.cancel_scope.cancel()
            else:
                task_status.started(
                    ShortInvite(code.text, invite.expires, stored_on, lan_status, relay_problem)
                )
                with trio.move_on_after(lifetime):
                    await ended.wait()
                nursery.cancel_scope.cancel()
        if unreachable is not None:
            raise JoinRefused("no-way", f"no joiner could find this code: {unreachable}")
    finally:
        node.invites.revoke(invite.invite_id, time.time())  # False: used, or a join finishing
        node.invite_closed(invite.invite_id)
        if stored_on is not None:
            with trio.CancelScope(shield=True):
                await _revoke_on_relay(node, code)


__all__ = ["Joined", "ShortInvite", "invites_request", "join_group", "keep_short_invite"]
