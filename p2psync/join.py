"""The joiner's side of pairing (trio shell over :mod:`p2psync.pairing`).

``join_group(home, ticket_text)`` dials the inviter at each address of the
ticket in turn (TLS proves the inviter's NodeId), runs the join handshake,
stores the group secrets it receives, and records the inviter as a static
peer in ``config.toml`` so that ``p2psync daemon`` connects to it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import trio

from p2psync.crypto.group import group_id_text
from p2psync.errors import BadFrame, ConfigError, IntegrityError, P2PSyncError
from p2psync.home import Home
from p2psync.net.endpoint import Connection, Endpoint, EndpointConfig, open_endpoint
from p2psync.pairing import (
    CHALLENGE_SIZE,
    JOIN_CHALLENGE,
    JOIN_PROOF,
    JOIN_REFUSED,
    JOIN_REQUEST,
    JOIN_WELCOME,
    MAX_JOIN_FRAME,
    Address,
    JoinRefused,
    Ticket,
    check_mac,
    decode_join_untrusted,
    decode_ticket_untrusted,
    join_frame,
    join_mac,
    open_secrets,
    transcript,
)
from p2psync.proto.codec import as_bytes, as_str
from p2psync.proto.messages import FrameDecoder

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Joined:
    group_id: str
    inviter: str
    address: Address


async def _dial(ticket: Ticket, endpoint: Endpoint) -> tuple[Connection, Address]:
    errors = []
    for address in ticket.addresses:
        with trio.move_on_after(CONNECT_TIMEOUT):
            try:
                conn = await endpoint.connect(ticket.inviter, address)
                return conn, address
            except (P2PSyncError, trio.BrokenResourceError, OSError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
        errors.append(f"{address[0]}:{address[1]}: no answer in {CONNECT_TIMEOUT:.0f}s")
    raise JoinRefused("unreachable", "could not reach the inviter: " + "; ".join(errors))


async def join_group(home: Home, ticket_text: str, name: str = "") -> Joined:
    ticket = decode_ticket_untrusted(ticket_text)
    identity = home.load_identity()
    if home.load_secrets():
        raise ConfigError("this device is already in a group; use a fresh --home to join another")
    if ticket.expires <= time.time():
        raise JoinRefused("expired", "this ticket has expired; ask for a new one")
    if ticket.inviter == identity.node_id:
        raise JoinRefused("self", "this is our own ticket; run join on the other device")
    config = EndpointConfig(bind_host="0.0.0.0", bind_port=0)
    async with open_endpoint(identity, config) as endpoint:
        with trio.fail_after(CONNECT_TIMEOUT * max(1, len(ticket.addresses)) + 30):
            conn, address = await _dial(ticket, endpoint)
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
                join_frame(
                    JOIN_REQUEST,
                    ticket.invite_id,
                    identity.node_id.raw,
                    name or home.load_config().name,
                    challenge_j,
                )
            )
            kind, fields = await next_message()
            if kind != JOIN_CHALLENGE or len(fields) != 2:
                raise BadFrame("expected JOIN_CHALLENGE from the inviter")
            challenge_i = as_bytes(fields[0], "challenge", size=CHALLENGE_SIZE)
            script = transcript(
                ticket.invite_id, ticket.inviter, identity.node_id, challenge_j, challenge_i
            )
            try:
                check_mac(join_mac(ticket.invite_secret, b"inviter", script), fields[1], "inviter")
            except IntegrityError:
                raise JoinRefused("impostor", "the inviter could not prove the invite") from None
            proof = join_mac(ticket.invite_secret, b"joiner", script)
            await stream.send_all(join_frame(JOIN_PROOF, proof))
            kind, fields = await next_message()
            if kind != JOIN_WELCOME or len(fields) != 1:
                raise BadFrame("expected JOIN_WELCOME from the inviter")
            secrets = open_secrets(identity, as_bytes(fields[0], "sealed", max_size=MAX_JOIN_FRAME))
            await conn.aclose()
    for secret in secrets:
        home.save_secret(secret)
    home.add_peer(f"{ticket.inviter}@{address[0]}:{address[1]}")
    gid = group_id_text(secrets[0].keys().group_id)
    log.info("joined group %s through %s", gid, ticket.inviter.short())
    return Joined(gid, str(ticket.inviter), address)


__all__ = ["Joined", "join_group"]
