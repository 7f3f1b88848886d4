"""An in-memory network of sans-IO sync sessions over real stores.

``Network`` plays the trio shell: it moves control bytes between the two
sessions of each link, serves object wants through the real object-stream
codec (want_frame -> answer_want_untrusted -> decode_object_response_untrusted),
routes gossip, and steps ``now`` by hand. Hooks let a test split, duplicate
or tamper with the bytes on the way.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from p2psync import defaults
from p2psync.crypto.identity import NodeId
from p2psync.proto.entry import Kind
from p2psync.proto.messages import ErrorCode, FrameDecoder, Role
from p2psync.store import Meta, Store
from p2psync.sync.events import (
    EntriesReceived,
    Event,
    ObjectWanted,
    PeerVerified,
    SessionClosed,
)
from p2psync.sync.gossip import Gossip
from p2psync.sync.object_stream import (
    answer_want_untrusted,
    decode_object_response_untrusted,
    want_frame,
)
from p2psync.sync.rules import keep_connection
from p2psync.sync.session import ChallengeCache, ObjectClaims, SyncConfig, SyncSession

WALL_MS = 1_800_000_000_000  # a fixed wall clock for entries and their checks

Splitter = Callable[[bytes], list[bytes]]
Tamper = Callable[[bytes], bytes]


@dataclass
class Node:
    name: str
    store: Store
    replay: ChallengeCache = field(default_factory=ChallengeCache)
    claims: ObjectClaims = field(default_factory=ObjectClaims)
    sessions: dict[NodeId, SyncSession] = field(default_factory=dict)  # verified, kept
    gossip: Gossip = field(default_factory=Gossip)

    @property
    def node_id(self) -> NodeId:
        return self.store.identity.node_id

    def put(self, key: str, data: bytes) -> bytes:
        """Store a blob and its PUT entry; return the raw entry."""
        blob_id, size = self.store.put_blob(io.BytesIO(data))
        stored = self.store.append(Kind.PUT, Meta(key), now_ms=WALL_MS, blob=blob_id, size=size)
        return stored.entry.encode()

    def put_many(self, count: int, prefix: str = "k") -> list[bytes]:
        return [self.put(f"{prefix}{i}", f"{self.name}-{i}".encode()) for i in range(count)]


@dataclass
class Link:
    """One connection: ``dialer`` is ``a``'s session, ``acceptor`` is ``b``'s."""

    a: Node
    b: Node
    dialer: SyncSession
    acceptor: SyncSession
    events: dict[str, list[Event]] = field(default_factory=lambda: {"a": [], "b": []})
    wanted: dict[str, list[bytes]] = field(default_factory=lambda: {"a": [], "b": []})
    pending: list[tuple[str, bytes]] = field(default_factory=list)  # (side, oid)
    objects_served: int = 0
    hold_objects: bool = False  # leave wants unanswered (a stalled object stream)
    split: Splitter | None = None
    tamper: dict[str, Tamper] = field(default_factory=dict)  # side -> its outgoing bytes

    def session(self, side: str) -> SyncSession:
        return self.dialer if side == "a" else self.acceptor

    def node(self, side: str) -> Node:
        return self.a if side == "a" else self.b

    def other(self, side: str) -> str:
        return "b" if side == "a" else "a"

    def closed_codes(self) -> tuple[int | None, int | None]:
        return (self.dialer.close_code, self.acceptor.close_code)


class Network:
    def __init__(self, config: SyncConfig | None = None, seed: int = 1) -> None:
        self.now = 1000.0
        self.links: list[Link] = []
        self.config = config
        self.rng = random.Random(seed)

    def _session(
        self, node: Node, role: Role, expected: NodeId | None, config: SyncConfig | None
    ) -> SyncSession:
        return SyncSession(
            identity=node.store.identity,
            keyring=node.store.keyring,
            store=node.store,
            role=role,
            random_bytes=os.urandom,
            wall_clock_ms=lambda: WALL_MS,
            expected_their_node=expected,
            replay_cache=node.replay,
            object_claims=node.claims,
            config=config or self.config,
        )

    def connect(
        self,
        a: Node,
        b: Node,
        *,
        expected: NodeId | None = None,
        split: Splitter | None = None,
        start: bool = True,
        pump: bool = True,
    ) -> Link:
        """``a`` dials ``b`` (believing it is ``expected``, default b's real id)."""
        link = Link(
            a,
            b,
            self._session(a, Role.DIALER, expected or b.node_id, None),
            self._session(b, Role.ACCEPTOR, None, None),
            split=split,
        )
        self.links.append(link)
        if start:
            link.dialer.start(self.now)
            link.acceptor.start(self.now)
            if pump:
                self.pump()
        return link

    def disconnect(self, link: Link) -> None:
        """Drop a link without a BYE (a pulled cable); the shells see the QUIC close."""
        self.links.remove(link)
        for session in (link.dialer, link.acceptor):
            session.connection_lost(ErrorCode.INTERNAL, "connection lost")
        for side in ("a", "b"):
            node = link.node(side)
            peer = link.node(link.other(side)).node_id
            if node.sessions.get(peer) is link.session(side):
                del node.sessions[peer]
                node.gossip.remove_peer(peer)

    def deliver(self, link: Link, side: str, data: bytes) -> None:
        """Bytes written by ``side`` arrive at the other side."""
        tamper = link.tamper.get(side)
        if tamper is not None:
            data = tamper(data)
        receiver = link.session(link.other(side))
        pieces = link.split(data) if link.split else [data]
        for piece in pieces:
            receiver.receive_control(piece, self.now)

    def _drain_events(self, link: Link, side: str) -> None:
        session = link.session(side)
        node = link.node(side)
        while (event := session.next_event()) is not None:
            link.events[side].append(event)
            match event:
                case PeerVerified(their_node):
                    self._verified(node, their_node, session)
                case EntriesReceived(their_node, accepted):
                    node.gossip.entries_received(their_node, accepted)
                case ObjectWanted(oid):
                    link.wanted[side].append(oid)
                    link.pending.append((side, oid))
                case SessionClosed():
                    peer = link.node(link.other(side)).node_id
                    if node.sessions.get(peer) is session:
                        del node.sessions[peer]
                        node.gossip.remove_peer(peer)

    def _verified(self, node: Node, their_node: NodeId, session: SyncSession) -> None:
        """What a shell does on PeerVerified: the duplicate rule, then gossip."""
        old = node.sessions.get(their_node)
        if old is not None:
            outgoing = session.role is Role.DIALER
            if not keep_connection(node.node_id, their_node, ours_is_outgoing=outgoing):
                session.close(ErrorCode.DUPLICATE_CONNECTION, "duplicate connection")
                return
            del node.sessions[their_node]
            node.gossip.remove_peer(their_node)
            old.close(ErrorCode.DUPLICATE_CONNECTION, "duplicate connection")
        node.sessions[their_node] = session
        node.gossip.add_peer(their_node, session)

    def _serve_one(self, link: Link) -> None:
        side, oid = link.pending.pop(0)
        session = link.session(side)
        server = link.node(link.other(side)).store
        request = FrameDecoder(64)
        request.feed(want_frame(oid))
        body = request.next_frame()
        assert body is not None
        reply = FrameDecoder(defaults.SYNC_MAX_OBJECT_FRAME)
        reply.feed(answer_want_untrusted(server, body))
        reply_body = reply.next_frame()
        assert reply_body is not None
        sealed = decode_object_response_untrusted(oid, reply_body)
        link.objects_served += 1
        if sealed is None:
            session.object_failed(oid, self.now)
        else:
            session.object_received(oid, sealed, self.now)

    def pump(self, *, max_objects: int | None = None, max_rounds: int = 100_000) -> None:
        """Move bytes and serve objects until nothing moves (or the object budget ends)."""
        served = 0
        for _ in range(max_rounds):
            moved = False
            for link in list(self.links):
                for side in ("a", "b"):
                    self._drain_events(link, side)
                for side in ("a", "b"):
                    data = link.session(side).data_to_send()
                    if data:
                        moved = True
                        self.deliver(link, side, data)
                for side in ("a", "b"):
                    self._drain_events(link, side)
                if (
                    link.pending
                    and not link.hold_objects
                    and (max_objects is None or served < max_objects)
                ):
                    self._serve_one(link)
                    served += 1
                    moved = True
            if not moved:
                return
        raise AssertionError("network did not settle")

    def advance(self, seconds: float) -> None:
        """Let time pass: fire due timers, then settle."""
        self.now += seconds
        for link in self.links:
            for side in ("a", "b"):
                session = link.session(side)
                timer = session.get_timer()
                if timer is not None and timer <= self.now:
                    session.handle_timer(self.now)
        self.pump()


def random_splitter(rng: random.Random) -> Splitter:
    def split(data: bytes) -> list[bytes]:
        pieces = []
        i = 0
        while i < len(data):
            n = rng.randint(1, 64)
            pieces.append(data[i : i + n])
            i += n
        return pieces

    return split


def byte_splitter(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def contents(store: Store) -> dict[str, bytes]:
    """key -> plaintext of every live, complete entry."""
    result = {}
    for stored in store.live():
        assert stored.key is not None
        result[stored.key] = b"".join(store.iter_blob(stored.entry.blob))
    return result


@pytest.fixture
def make_node(make_store: Callable[..., Store]) -> Callable[..., Node]:
    def make(name: str, secret: object = None) -> Node:
        store = make_store(name) if secret is None else make_store(name, secret)
        return Node(name, store)

    return make


@pytest.fixture
def network() -> Network:
    return Network()


@pytest.fixture
def kit() -> SimpleNamespace:
    """The harness for tests (conftest modules are not importable by name)."""
    return SimpleNamespace(
        Network=Network,
        WALL_MS=WALL_MS,
        random_splitter=random_splitter,
        byte_splitter=byte_splitter,
        contents=contents,
    )
