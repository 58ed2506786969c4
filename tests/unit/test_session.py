"""The session state machine, without sockets or NATS."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_protocol import binary_codec
from realtime_protocol.errors import ProtocolError
from realtime_protocol.frames import (
    AuthFrame,
    ErrorFrame,
    HistoryResponseFrame,
    Message,
    PingFrame,
    PongFrame,
    PublishFrame,
    SubscribeFrame,
)
from shared.auth import Keyring, parse_api_key
from shared.history import HistoryOp, HistoryQuery, HistoryResult
from shared.session import (
    Authenticate,
    Close,
    Codec,
    Limits,
    Publish,
    ReadHistory,
    Reply,
    Session,
    SessionState,
    Subscribe,
    Unsubscribe,
    UnwatchPresence,
    UpdatePresence,
    WatchPresence,
)

# Every command a request frame becomes.
Request = (Subscribe, Unsubscribe, ReadHistory, UpdatePresence, WatchPresence, UnwatchPresence)

KEYRING = Keyring([parse_api_key("app.k:secret")])


def connected_session(codec: Codec = Codec.JSON, **limits: int) -> Session:
    session = Session(KEYRING, Limits(**limits), clock_ms=lambda: 1234)
    if codec is Codec.JSON:
        commands = session.receive_message(b'{"t":"auth","key":"app.k:secret"}', is_text=True)
    else:
        record = binary_codec.encode_client_frame(AuthFrame(key="app.k:secret", client_id="c1"))
        commands = session.receive_message(binary_codec.frame_record(record), is_text=False)
    assert len(commands) == 1 and isinstance(commands[0], Authenticate)
    session.authenticate(commands[0].frame, assign_client_id="assigned")
    session.accept("conn-1")
    return session


def binary(*frames: object) -> bytes:
    return b"".join(
        binary_codec.frame_record(binary_codec.encode_client_frame(f))  # type: ignore[arg-type]
        for f in frames
    )


def test_first_message_opcode_picks_codec() -> None:
    assert connected_session(Codec.JSON).codec is Codec.JSON
    session = connected_session(Codec.BINARY)
    assert session.codec is Codec.BINARY and session.identity is not None
    assert session.identity.client_id == "c1"


def test_first_frame_must_be_auth() -> None:
    session = Session(KEYRING, Limits())
    commands = session.receive_message(b'{"t":"ping"}', is_text=True)
    assert isinstance(commands[0], Reply) and isinstance(commands[0].frame, ErrorFrame)
    assert commands[0].frame.code == 40001 and isinstance(commands[1], Close)
    assert session.state is SessionState.CLOSING
    assert session.receive_message(b'{"t":"ping"}', is_text=True) == []


def test_nonzero_auth_version_is_refused() -> None:
    session = Session(KEYRING, Limits())
    record = binary_codec.encode_client_frame(AuthFrame(key="app.k:secret", version=1))
    commands = session.receive_message(binary_codec.frame_record(record), is_text=False)
    assert isinstance(commands[0], Reply) and isinstance(commands[1], Close)


def test_binary_message_with_several_records_and_one_bad() -> None:
    session = connected_session(Codec.BINARY)
    data = binary(PingFrame()) + binary_codec.frame_record(b"\x63") + binary(PingFrame())
    commands = session.receive_message(data, is_text=False)
    assert [type(c) for c in commands] == [Reply, Reply, Reply]
    assert isinstance(commands[0], Reply) and commands[0].frame == PongFrame()
    assert isinstance(commands[1], Reply) and isinstance(commands[1].frame, ErrorFrame)


def test_publish_is_stamped_with_identity_and_time() -> None:
    session = connected_session(Codec.BINARY)
    commands = session.receive_message(
        binary(PublishFrame(5, "chat", "n", b"1", "", "m-1")), is_text=False
    )
    assert len(commands) == 1 and isinstance(commands[0], Publish)
    message = commands[0].message
    assert (message.client_id, message.timestamp, message.message_id) == ("c1", 1234, "m-1")


def test_publish_without_message_id_gets_one() -> None:
    session = connected_session()
    commands = session.receive_message(b'{"t":"pub","id":1,"channel":"c","data":1}', True)
    assert isinstance(commands[0], Publish) and commands[0].message.message_id


def test_batch_limit() -> None:
    session = connected_session(max_batch_members=2)
    members = [{"name": "a", "data": 1}] * 3
    text = orjson.dumps({"t": "pub", "id": 8, "channel": "c", "messages": members})
    commands = session.receive_message(text, is_text=True)
    assert isinstance(commands[0], Reply) and isinstance(commands[0].frame, ErrorFrame)
    assert commands[0].frame.code == 40001 and commands[0].frame.id == 8


def test_subscription_set_and_quota() -> None:
    session = connected_session(max_channels=2)
    for channel in ("a", "b", "a"):
        commands = session.receive_message(
            orjson.dumps({"t": "sub", "id": 1, "channel": channel}), True
        )
        assert isinstance(commands[0], Request)
    assert session.subscriptions == {"a", "b"}
    commands = session.receive_message(b'{"t":"sub","id":9,"channel":"c"}', True)
    assert isinstance(commands[0], Reply) and isinstance(commands[0].frame, ErrorFrame)
    assert commands[0].frame.code == 42900 and commands[0].frame.id == 9
    session.receive_message(b'{"t":"unsub","id":2,"channel":"a"}', True)
    assert session.subscriptions == {"b"}


def test_oversized_message_names_the_limit_and_request() -> None:
    session = connected_session(Codec.BINARY, max_frame_bytes=100)
    commands = session.receive_message(
        binary(SubscribeFrame(4, "c"), PublishFrame(6, "c", "n", b'"' + b"x" * 200 + b'"')), False
    )
    frames = [c.frame for c in commands if isinstance(c, Reply)]
    assert [f.id for f in frames if isinstance(f, ErrorFrame)] == [4, 6]
    assert all(isinstance(f, ErrorFrame) and "100-byte" in f.message for f in frames)


def test_wrong_message_type_after_codec_choice() -> None:
    session = connected_session(Codec.JSON)
    commands = session.receive_message(binary(PingFrame()), is_text=False)
    assert isinstance(commands[0], Reply) and isinstance(commands[0].frame, ErrorFrame)
    assert session.state is SessionState.CONNECTED


def test_encode_depends_on_codec() -> None:
    assert connected_session(Codec.JSON).encode(PongFrame()) == b'{"t":"pong"}'
    assert connected_session(Codec.BINARY).encode(PongFrame()) == b"\x01\x10"


def test_records_after_auth_in_the_same_message_wait_for_the_handshake() -> None:
    session = Session(KEYRING, Limits())
    data = binary(AuthFrame(key="app.k:secret"), SubscribeFrame(1, "chan"), PingFrame())
    commands = session.receive_message(data, is_text=False)
    assert len(commands) == 1 and isinstance(commands[0], Authenticate)
    session.authenticate(commands[0].frame, assign_client_id="x")
    session.accept("conn")
    later = session.after_handshake()
    assert isinstance(later[0], Request) and isinstance(later[1], Reply)
    assert later[1].frame == PongFrame()
    assert session.after_handshake() == []


def test_presence_subscriptions_count_against_the_channel_limit() -> None:
    session = connected_session(max_channels=3)
    for index, text in enumerate(
        (
            b'{"t":"sub","id":1,"channel":"a"}',
            b'{"t":"presSub","id":2,"channel":"a"}',  # same channel: no new slot
            b'{"t":"presSub","id":3,"channel":"b"}',
            b'{"t":"presSub","id":4,"channel":"c"}',
        )
    ):
        commands = session.receive_message(text, True)
        assert isinstance(commands[0], Request), (index, commands)
    commands = session.receive_message(b'{"t":"presSub","id":5,"channel":"d"}', True)
    assert isinstance(commands[0], Reply) and isinstance(commands[0].frame, ErrorFrame)
    assert commands[0].frame.code == 42900 and commands[0].frame.id == 5
    commands = session.receive_message(b'{"t":"sub","id":6,"channel":"d"}', True)
    assert isinstance(commands[0], Reply) and isinstance(commands[0].frame, ErrorFrame)
    session.receive_message(b'{"t":"presUnsub","id":7,"channel":"c"}', True)
    commands = session.receive_message(b'{"t":"sub","id":8,"channel":"d"}', True)
    assert isinstance(commands[0], Request)


def test_a_failed_subscribe_gives_its_slot_back() -> None:
    session = connected_session(max_channels=1)
    session.receive_message(b'{"t":"sub","id":1,"channel":"a"}', True)
    session.forget_channel("a")
    commands = session.receive_message(b'{"t":"sub","id":2,"channel":"b"}', True)
    assert isinstance(commands[0], Request) and session.subscriptions == {"b"}


def test_before_auth_only_one_small_message_is_read() -> None:
    session = Session(KEYRING, Limits(max_auth_message_bytes=1024))
    # An auth frame followed by thousands of records: refused before decoding any of them.
    data = binary(AuthFrame(key="app.k:secret")) + binary(SubscribeFrame(1, "c")) * 500
    commands = session.receive_message(data, is_text=False)
    assert [type(c) for c in commands] == [Reply, Close]
    assert isinstance(commands[0], Reply) and isinstance(commands[0].frame, ErrorFrame)
    assert commands[0].frame.code == 40001 and "1024 bytes" in commands[0].frame.message
    assert session.state is SessionState.CLOSING


def test_a_message_with_too_many_records_is_answered_once() -> None:
    session = connected_session(Codec.BINARY, max_records_per_message=10)
    commands = session.receive_message(binary(SubscribeFrame(1, "c")) * 11, is_text=False)
    assert len(commands) == 1 and isinstance(commands[0], Reply)
    assert isinstance(commands[0].frame, ErrorFrame) and commands[0].frame.code == 40001
    assert session.subscriptions == set() and session.state is SessionState.CONNECTED
    commands = session.receive_message(binary(SubscribeFrame(1, "c")) * 10, is_text=False)
    assert len(commands) == 10 and session.subscriptions == {"c"}


@settings(max_examples=60, deadline=None)
@given(count=st.integers(min_value=0, max_value=3000), limit=st.integers(1, 300))
def test_records_decoded_per_message_never_exceed_the_limit(count: int, limit: int) -> None:
    session = connected_session(Codec.BINARY, max_records_per_message=limit)
    commands = session.receive_message(binary(PingFrame()) * count, is_text=False)
    if count <= limit:
        assert len(commands) == count
    else:
        assert len(commands) == 1 and isinstance(commands[0], Reply)
        assert isinstance(commands[0].frame, ErrorFrame)


def test_history_requests_carry_the_protocol_limits() -> None:
    session = connected_session()
    [default] = session.receive_message(b'{"t":"hist","id":1,"channel":"c"}', True)
    assert isinstance(default, ReadHistory) and default.query.limit == 100
    [capped] = session.receive_message(b'{"t":"hist","id":2,"channel":"c","limit":5000}', True)
    assert isinstance(capped, ReadHistory) and capped.query.limit == 1000
    [fetch] = session.receive_message(b'{"t":"fetch","id":3,"channel":"c","fromSerial":7}', True)
    assert isinstance(fetch, ReadHistory) and fetch.query.op is HistoryOp.FETCH
    assert (fetch.query.from_serial, fetch.query.limit, fetch.query.app) == (7, 1000, "app")


def test_subscribe_commands_say_whether_they_resume_and_are_new() -> None:
    session = connected_session()
    [first] = session.receive_message(b'{"t":"sub","id":1,"channel":"c","lastSerial":4}', True)
    assert isinstance(first, Subscribe) and first.resumes and first.fresh
    [again] = session.receive_message(b'{"t":"sub","id":2,"channel":"c"}', True)
    assert isinstance(again, Subscribe) and not again.resumes and not again.fresh


def test_the_session_picks_the_codec_of_history_answers() -> None:
    member = binary_codec.member_with_serial(
        binary_codec.encode_member(Message("c", "n", b"1", "m1", "x", 5)), 3
    )
    result = HistoryResult((member,), True, 3)
    for codec in (Codec.JSON, Codec.BINARY):
        session = connected_session(codec)
        command = ReadHistory(9, HistoryQuery(HistoryOp.HISTORY, "app", "c"))
        data = session.encode_history_response(command, result)
        if codec is Codec.JSON:
            answer = orjson.loads(data)
            assert (answer["t"], answer["id"], answer["messages"][0]["seq"]) == ("histRes", 9, 3)
            assert orjson.loads(session.encode_replay(result)[0])["seq"] == 3
        else:
            [record] = binary_codec.iter_records(data)
            frame = binary_codec.decode_server_record(record)
            assert isinstance(frame, HistoryResponseFrame) and frame.messages[0].serial == 3
            [replayed] = binary_codec.iter_records(session.encode_replay(result)[0])
            assert binary_codec.decode_server_record(replayed).message.serial == 3  # type: ignore[union-attr]


def test_one_state_first_close_decides_the_code_and_end_runs_once() -> None:
    session = connected_session()
    assert session.close(1013, "slow consumer") is True
    assert session.state is SessionState.CLOSING and session.is_closed
    # A later close (the client going away, shutdown) does not overwrite the first reason.
    assert session.close(1001, "server shutting down") is False
    assert (session.close_code, session.close_reason) == (1013, "slow consumer")
    assert session.receive_message(b'{"t":"ping"}', is_text=True) == []
    assert session.end() is True and session.state is SessionState.ENDED
    assert session.end() is False  # teardown runs once
    assert session.close(1000, "") is False


def test_handshake_failure_records_policy_close_in_the_session() -> None:
    session = Session(KEYRING, Limits())
    commands = session.receive_message(b'{"t":"auth","key":"app.k:wrong"}', is_text=True)
    assert isinstance(commands[0], Authenticate)
    rejected: list[object] = []
    try:
        session.authenticate(commands[0].frame, "assigned")
    except ProtocolError as error:
        rejected = list(session.reject(error))
    assert isinstance(rejected[-1], Close) and rejected[-1].code == 1008
    assert (session.state, session.close_code) == (SessionState.CLOSING, 1008)


def test_handshake_while_the_backend_is_not_ready_is_refused_with_50001() -> None:
    session = Session(KEYRING, Limits())
    commands = session.receive_message(b'{"t":"auth","key":"app.k:secret"}', is_text=True)
    assert isinstance(commands[0], Authenticate)
    error: ProtocolError | None = None
    try:
        session.authenticate(commands[0].frame, "assigned", backend_ready=False)
    except ProtocolError as raised:
        error = raised
    assert error is not None and int(error.code) == 50001
    assert session.identity is None and session.state is SessionState.AWAITING_AUTH
