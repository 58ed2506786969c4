"""The binary codec against PROTOCOL.md's conformance vectors, plus round trips and fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_protocol import binary_codec
from realtime_protocol.binary_codec import FrameDecodeError
from realtime_protocol.frames import (
    AckFrame,
    AuthFrame,
    BatchMember,
    BundleFrame,
    ConnectedFrame,
    ErrorFrame,
    FetchResponseFrame,
    HistoryResponseFrame,
    Message,
    MessageFrame,
    PingFrame,
    PongFrame,
    PresenceAction,
    PresenceEventFrame,
    PublishFrame,
    SubscribeFrame,
)

# (PROTOCOL.md 2.8) complete WebSocket messages: length prefix included.
SERVER_VECTORS = {
    "msg-single": (
        "540d0101f0d6a183f23306726f6f6d3a310463686174157b226869223a227468657265222c226e223a34327d"
        "1c313738323935353134323030303030303030302d316132623363346408636c69656e742d3700b960"
    ),
    "bundle": (
        "3a0d02006406726f6f6d3a310161077b2269223a317d0469642d310263310005016506726f6f6d3a310162"
        "052274776f220469642d320263320006"
    ),
    "batch": (
        "361301f0d6a183f23306726f6f6d3a310362617408636c69656e742d37b960020161077b2269223a317d00"
        "0162052274776f2203656e63"
    ),
    "bundle-with-batch": (
        "420d02000006726f6f6d3a310161077b2269223a317d0469642d310263310005026406726f6f6d3a310362"
        "6174026332060201780131000179052274776f2203656e63"
    ),
    "connected": "100b06636f6e6e2d31987505616c696365",
    "ack-resumed": "040c030300",
    "ack-seq": "040c00052a",
    "err": "0f0f00a5b9020962616420746f6b656e",
    "presEvt": ("270e0180d095ffbc3106636861743a3105616c69636506636f6e6e2d31097b226e223a2241227d00"),
    "histRes": (
        "2a11010406636861743a31010080d095ffbc3106636861743a31016d01310469642d3105616c6963650007"
    ),
    "pong": "0110",
}


def _single_record(hex_text: str) -> bytes:
    records = list(binary_codec.iter_records(bytes.fromhex(hex_text)))
    assert len(records) == 1
    return records[0]


@pytest.mark.parametrize("name", sorted(SERVER_VECTORS))
def test_server_vectors_round_trip_byte_for_byte(name: str) -> None:
    message = bytes.fromhex(SERVER_VECTORS[name])
    frame = binary_codec.decode_server_record(_single_record(SERVER_VECTORS[name]))
    assert binary_codec.frame_record(binary_codec.encode_server_frame(frame)) == message


def test_server_vector_contents() -> None:
    frame = binary_codec.decode_server_record(_single_record(SERVER_VECTORS["msg-single"]))
    assert frame == MessageFrame(
        Message(
            channel="room:1",
            name="chat",
            data=b'{"hi":"there","n":42}',
            message_id="1782955142000000000-1a2b3c4d",
            client_id="client-7",
            timestamp=1782955142000,
            serial=12345,
            ephemeral=True,
        )
    )
    batch = binary_codec.decode_server_record(_single_record(SERVER_VECTORS["batch"]))
    assert isinstance(batch, MessageFrame) and batch.message.members == (
        BatchMember("a", b'{"i":1}'),
        BatchMember("b", b'"two"', "enc"),
    )
    bundle = binary_codec.decode_server_record(_single_record(SERVER_VECTORS["bundle"]))
    assert isinstance(bundle, BundleFrame) and [m.serial for m in bundle.messages] == [5, 6]
    assert binary_codec.decode_server_record(
        _single_record(SERVER_VECTORS["connected"])
    ) == ConnectedFrame("conn-1", 15000, "alice")
    assert binary_codec.decode_server_record(
        _single_record(SERVER_VECTORS["ack-resumed"])
    ) == AckFrame(3, 0, True)
    assert binary_codec.decode_server_record(_single_record(SERVER_VECTORS["err"])) == ErrorFrame(
        40101, "bad token", 0
    )
    assert binary_codec.decode_server_record(
        _single_record(SERVER_VECTORS["presEvt"])
    ) == PresenceEventFrame(
        PresenceAction.ENTER, 1700000000000, "chat:1", "alice", "conn-1", b'{"n":"A"}'
    )
    history = binary_codec.decode_server_record(_single_record(SERVER_VECTORS["histRes"]))
    assert isinstance(history, HistoryResponseFrame) and history.more
    assert binary_codec.decode_server_record(_single_record(SERVER_VECTORS["pong"])) == PongFrame()


def test_two_records_in_one_message() -> None:
    twice = bytes.fromhex(SERVER_VECTORS["msg-single"] * 2)
    records = list(binary_codec.iter_records(twice))
    assert len(records) == 2 and records[0] == records[1]


CLIENT_VECTORS = {
    # Bare record payloads (no length prefix) from PROTOCOL.md 2.8.
    "pub-single": "04010706726f6f6d3a3104636861740e7b226869223a227468657265227d00036d2d310000",
    "pub-batch": (
        "04000906726f6f6d3a3100046e756c6c00036d2d3200020161077b2269223a317d000162052274776f2203656e63"
    ),
}


def test_client_vectors() -> None:
    single = binary_codec.decode_client_record(bytes.fromhex(CLIENT_VECTORS["pub-single"]))
    assert single == PublishFrame(7, "room:1", "chat", b'{"hi":"there"}', "", "m-1", ephemeral=True)
    batch = binary_codec.decode_client_record(bytes.fromhex(CLIENT_VECTORS["pub-batch"]))
    assert isinstance(batch, PublishFrame) and batch.message_id == "m-2" and batch.id == 9
    assert batch.members == (BatchMember("a", b'{"i":1}'), BatchMember("b", b'"two"', "enc"))
    for frame, hex_text in ((single, "pub-single"), (batch, "pub-batch")):
        assert binary_codec.encode_client_frame(frame) == bytes.fromhex(CLIENT_VECTORS[hex_text])
    auth = _single_record("180100000d6170702e6b313a73656372657405616c69636500")
    assert binary_codec.decode_client_record(auth) == AuthFrame("", "app.k1:secret", "alice", "")
    sub = _single_record("0a02032906636861743a31")
    assert binary_codec.decode_client_record(sub) == SubscribeFrame(3, "chat:1", 41)
    assert binary_codec.decode_client_record(_single_record("010a")) == PingFrame()


def test_reserved_publish_field_is_ignored_whatever_its_value() -> None:
    record = bytearray(bytes.fromhex(CLIENT_VECTORS["pub-single"]))
    record[-2] = 0x05  # the reserved uvarint (old ttlMs)
    frame = binary_codec.decode_client_record(bytes(record))
    assert isinstance(frame, PublishFrame) and frame.message_id == "m-1"


@pytest.mark.parametrize(
    ("hex_text", "needle", "request_id"),
    [
        ("", "truncated", 0),
        ("63", "unknown client opcode", 0),
        ("0203", "truncated", 3),
        ("0203007f", "exceeds", 3),
        ("020300", "truncated", 3),
        ("02ffffffffffffffffffff01", "varint", 0),
        ("02030002c328", "UTF-8", 3),
        ("050907016102", "presence action", 0),
        ("040007016100027b7b0000000000", "JSON", 7),
    ],
)
def test_bad_records_raise_one_typed_error(hex_text: str, needle: str, request_id: int) -> None:
    with pytest.raises(FrameDecodeError) as caught:
        binary_codec.decode_client_record(bytes.fromhex(hex_text))
    assert needle in caught.value.message
    assert caught.value.code == 40001 and caught.value.request_id == request_id


def test_invalid_json_payload_is_refused() -> None:
    record = binary_codec.encode_client_frame(PublishFrame(5, "c", "n", b"{nope", "", "id"))
    with pytest.raises(FrameDecodeError, match="JSON") as caught:
        binary_codec.decode_client_record(record)
    assert caught.value.request_id == 5


texts = st.text(max_size=40)
payloads = st.one_of(
    st.none(),
    st.sampled_from([b"null", b"1", b'"x"', b'{"a":[1,2,{"b":null}]}', '"é✓"'.encode()]),
)
serials = st.integers(min_value=0, max_value=2**53 - 1)
members = st.lists(st.builds(BatchMember, texts, payloads, texts), max_size=4)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    batch = draw(members)
    return Message(
        channel=draw(texts),
        name="" if batch else draw(texts),
        data=None if batch else draw(payloads),
        message_id=draw(texts),
        client_id=draw(texts),
        timestamp=draw(serials),
        encoding="" if batch else draw(texts),
        serial=draw(serials),
        ephemeral=draw(st.booleans()),
        members=tuple(batch),
    )


@given(messages())
def test_message_round_trip(message: Message) -> None:
    record = binary_codec.encode_message_record(message)
    assert binary_codec.decode_server_record(record) == MessageFrame(message)
    assert binary_codec.decode_member(binary_codec.encode_member(message)) == message


@given(st.lists(messages(), min_size=2, max_size=4))
def test_bundle_round_trip(bundle: list[Message]) -> None:
    frame = BundleFrame(tuple(bundle))
    assert binary_codec.decode_server_record(binary_codec.encode_server_frame(frame)) == frame


@given(
    st.builds(
        PublishFrame,
        serials,
        texts,
        texts,
        payloads,
        texts,
        texts,
        st.booleans(),
        members.map(tuple),
    )
)
def test_publish_round_trip(frame: PublishFrame) -> None:
    assert binary_codec.decode_client_record(binary_codec.encode_client_frame(frame)) == frame


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_uvarint_round_trip(value: int) -> None:
    frame = SubscribeFrame(1, "c", value)
    assert binary_codec.decode_client_record(binary_codec.encode_client_frame(frame)) == frame


@settings(max_examples=2000)
@given(st.binary(max_size=64))
def test_decoder_fuzz_random_bytes(data: bytes) -> None:
    try:
        for record in binary_codec.iter_records(data):
            binary_codec.decode_client_record(record)
    except FrameDecodeError:
        pass


@settings(max_examples=2000)
@given(st.data())
def test_decoder_fuzz_mutated_valid_records(data: st.DataObject) -> None:
    record = bytearray(bytes.fromhex(data.draw(st.sampled_from(list(CLIENT_VECTORS.values())))))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(record) - 1))
        record[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(record)))
    with contextlib.suppress(FrameDecodeError):
        binary_codec.decode_client_record(bytes(record[:cut]))


@given(messages(), serials)
def test_member_with_serial_matches_a_full_encode(message: Message, serial: int) -> None:
    stored = binary_codec.encode_member(message.with_serial(0))
    assert binary_codec.member_with_serial(stored, serial) == binary_codec.encode_member(
        message.with_serial(serial)
    )


@given(st.lists(messages(), max_size=4), st.booleans(), serials, texts)
def test_spliced_responses_match_encoded_frames(
    batch: list[Message], flag: bool, request_id: int, channel: str
) -> None:
    members = [binary_codec.encode_member(m) for m in batch]
    assert binary_codec.encode_response_members(
        True, flag, request_id, channel, members
    ) == binary_codec.encode_server_frame(
        HistoryResponseFrame(request_id, channel, tuple(batch), flag)
    )
    assert binary_codec.encode_response_members(
        False, flag, request_id, channel, members
    ) == binary_codec.encode_server_frame(
        FetchResponseFrame(request_id, channel, tuple(batch), flag)
    )
    for message, member in zip(batch, members, strict=True):
        record = binary_codec.message_record_from_member(member)
        assert binary_codec.decode_server_record(record) == MessageFrame(message)


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(min_value=0, max_value=3000))
def test_binary_payload_nesting_decodes_or_is_refused_with_40001(depth: int) -> None:
    data = b"[" * depth + b"1" + b"]" * depth
    record = binary_codec.encode_client_frame(PublishFrame(9, "c", "n", data, "", "m"))
    try:
        frame = binary_codec.decode_client_record(record)
    except FrameDecodeError as error:
        assert int(error.code) == 40001 and depth > 254
    else:
        assert isinstance(frame, PublishFrame) and frame.data == data
