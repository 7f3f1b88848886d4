"""Any bytes from a peer end in a clean close, never in an exception."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2psync.crypto.group import GroupSecret
from p2psync.crypto.identity import Identity
from p2psync.errors import BadFrame
from p2psync.proto.codec import pack
from p2psync.proto.messages import (
    Bye,
    ErrorCode,
    FrameDecoder,
    Role,
    decode_message_untrusted,
    encode_frame,
)
from p2psync.store import Store
from p2psync.sync.events import (
    EntriesReceived,
    ObjectWanted,
    PeerVerified,
    ProtocolViolation,
    SessionClosed,
)
from p2psync.sync.session import SessionState, SyncSession

WALL_MS = 1_800_000_000_000
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    secret = GroupSecret.generate(os.urandom)
    root = tmp_path_factory.mktemp("fuzz")
    a = Store(root / "a", Identity.generate(os.urandom), [secret])
    b = Store(root / "b", Identity.generate(os.urandom), [secret])
    yield a, b
    a.close()
    b.close()


def session(store: Store, role: Role, expected=None) -> SyncSession:
    return SyncSession(
        identity=store.identity,
        keyring=store.keyring,
        store=store,
        role=role,
        random_bytes=os.urandom,
        wall_clock_ms=lambda: WALL_MS,
        expected_their_node=expected,
    )


def established_pair(stores) -> tuple[SyncSession, SyncSession]:
    a, b = stores
    dialer = session(a, Role.DIALER, b.identity.node_id)
    acceptor = session(b, Role.ACCEPTOR)
    dialer.start(0.0)
    acceptor.start(0.0)
    for _ in range(10):
        acceptor.receive_control(dialer.data_to_send(), 0.0)
        dialer.receive_control(acceptor.data_to_send(), 0.0)
    assert dialer.established and acceptor.established
    for s in (dialer, acceptor):
        while s.next_event() is not None:
            pass
    return dialer, acceptor


def check_clean(target: SyncSession) -> None:
    """The outcome rules: only known events; a close carries a failure code and a BYE."""
    allowed = (PeerVerified, EntriesReceived, ObjectWanted, ProtocolViolation, SessionClosed)
    events = list(iter(target.next_event, None))
    assert all(isinstance(e, allowed) for e in events)
    if target.closed:
        closed = events[-1]
        assert isinstance(closed, SessionClosed)
        if closed.by_peer:  # the garbage happened to be a well-formed BYE
            return
        assert target.close_code not in (None, ErrorCode.OK)
        assert ProtocolViolation in [type(e) for e in events]
        decoder = FrameDecoder()
        decoder.feed(target.data_to_send())
        frames = list(iter(decoder.next_frame, None))
        bye = decode_message_untrusted(frames[-1])
        assert bye == Bye(target.close_code, target.close_reason[: len(bye.reason)])
    target.handle_timer(1e9)  # timers after garbage do not raise either
    target.data_to_send()


@FUZZ
@given(data=st.binary(max_size=2000))
def test_any_bytes_before_the_handshake(stores, data):
    target = session(stores[1], Role.ACCEPTOR)
    target.start(0.0)
    target.receive_control(data, 0.0)
    check_clean(target)


@FUZZ
@given(data=st.binary(max_size=2000))
def test_any_bytes_after_the_handshake(stores, data):
    _, target = established_pair(stores)
    target.receive_control(data, 0.0)
    check_clean(target)


@FUZZ
@given(body=st.binary(max_size=500))
def test_any_framed_body_that_does_not_decode_closes_with_protocol_error(stores, body):
    _, target = established_pair(stores)
    target.receive_control(encode_frame(body), 0.0)
    try:
        decode_message_untrusted(body)
    except BadFrame:
        assert target.close_code == ErrorCode.PROTOCOL_ERROR
    check_clean(target)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=70)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


@FUZZ
@given(
    message_type=st.integers(0, 12),
    fields=st.lists(msgpack_values, max_size=5),
    established=st.booleans(),
)
def test_structured_garbage_never_raises(stores, message_type, fields, established):
    """msgpack arrays shaped like messages reach the handlers' checks."""
    if established:
        _, target = established_pair(stores)
    else:
        target = session(stores[1], Role.ACCEPTOR)
        target.start(0.0)
    target.receive_control(encode_frame(pack([message_type, *fields])), 0.0)
    check_clean(target)
    assert target.state in (SessionState.ESTABLISHED, SessionState.CLOSED, SessionState.AWAIT_HELLO)


def test_a_well_formed_bye_from_the_peer_is_a_clean_close(stores):
    target = session(stores[1], Role.ACCEPTOR)
    target.start(0.0)
    target.receive_control(encode_frame(pack([6, 0, "bye"])), 0.0)
    assert list(iter(target.next_event, None)) == [SessionClosed(0, "bye", True)]
    assert target.data_to_send() == b""
