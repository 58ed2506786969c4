"""The JSON text codec (PROTOCOL.md 2.7)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime_protocol import json_codec
from realtime_protocol.binary_codec import FrameDecodeError
from realtime_protocol.frames import (
    AckFrame,
    BatchMember,
    ErrorFrame,
    FetchResponseFrame,
    HistoryFrame,
    Message,
    MessageFrame,
    PresenceAction,
    PresenceEventFrame,
    PresenceFrame,
    PublishFrame,
    SubscribeFrame,
)


def test_decode_publish_keeps_payload_as_json_bytes() -> None:
    frame = json_codec.decode_client_text(
        '{"t":"pub","id":3,"channel":"c","name":"n","data":{"a":[1,"é"]},"messageId":"m"}'
    )
    assert frame == PublishFrame(3, "c", "n", orjson.dumps({"a": [1, "é"]}), "", "m")


def test_decode_legacy_fields() -> None:
    assert json_codec.decode_client_text(
        '{"t":"sub","id":1,"channel":"c","lastMessageId":"x:3"}'
    ) == SubscribeFrame(1, "c", 0, "x:3")
    assert json_codec.decode_client_text(
        '{"t":"hist","id":1,"channel":"c","start":"abc"}'
    ) == HistoryFrame(1, "c", 0, 0, "abc")
    publish = json_codec.decode_client_text('{"t":"pub","id":1,"channel":"c","ttlMs":5}')
    assert isinstance(publish, PublishFrame) and publish.message_id == "" and publish.data is None


def test_decode_presence_and_batch() -> None:
    assert json_codec.decode_client_text(
        '{"t":"pres","id":2,"channel":"c","action":"update","data":null}'
    ) == PresenceFrame(2, "c", PresenceAction.UPDATE, b"null")
    frame = json_codec.decode_client_text(
        '{"t":"pub","id":2,"channel":"c","messageId":"b","messages":'
        '[{"name":"a","data":1},{"name":"b","data":"x","encoding":"e"}]}'
    )
    assert isinstance(frame, PublishFrame)
    assert frame.members == (BatchMember("a", b"1"), BatchMember("b", b'"x"', "e"))


@pytest.mark.parametrize(
    ("text", "needle", "request_id"),
    [
        ("nope", "invalid JSON", 0),
        ("[]", "JSON object", 0),
        ('{"t":1}', "'t'", 0),
        ('{"t":"sub","id":true,"channel":"c"}', "'id'", 0),
        ('{"t":"sub","id":-1,"channel":"c"}', "'id'", 0),
        ('{"t":"sub","id":2}', "'channel'", 2),
        ('{"t":"pub","id":2,"channel":"c","messages":[1]}', "messages[0]", 2),
        ('{"t":"what","id":2}', "unknown frame type", 2),
    ],
)
def test_decode_errors(text: str, needle: str, request_id: int) -> None:
    with pytest.raises(FrameDecodeError) as caught:
        json_codec.decode_client_text(text)
    assert needle in caught.value.message and caught.value.request_id == request_id


def test_encode_omits_absent_optionals_never_null() -> None:
    assert orjson.loads(json_codec.encode_server_text(AckFrame(4))) == {"t": "ack", "id": 4}
    assert orjson.loads(json_codec.encode_server_text(AckFrame(4, 9, False))) == {
        "t": "ack",
        "id": 4,
        "seq": 9,
        "resumed": False,
    }
    assert orjson.loads(json_codec.encode_server_text(ErrorFrame(40001, "bad"))) == {
        "t": "err",
        "code": 40001,
        "message": "bad",
    }
    event = PresenceEventFrame(PresenceAction.LEAVE, 5, "c", "u", "k")
    assert orjson.loads(json_codec.encode_server_text(event)) == {
        "t": "presEvt",
        "channel": "c",
        "action": "leave",
        "clientId": "u",
        "connectionId": "k",
        "timestamp": 5,
    }


def test_encode_message_splices_payload_verbatim() -> None:
    message = Message("c", "n", b'{"z":1,"a":2}', "id", "", 7, serial=3)
    text = json_codec.encode_server_text(MessageFrame(message))
    assert b'"data":{"z":1,"a":2}' in text
    assert orjson.loads(text) == {
        "t": "msg",
        "channel": "c",
        "name": "n",
        "data": {"z": 1, "a": 2},
        "timestamp": 7,
        "messageId": "id",
        "seq": 3,
    }
    absent = orjson.loads(json_codec.encode_message_text(Message("c", "n", None, "i", "u", 1)))
    assert absent["data"] is None and absent["clientId"] == "u"


def test_encode_batch_and_fetch_response() -> None:
    batch = Message("c", "", None, "b", "u", 1, serial=2, members=(BatchMember("a", b"1", "enc"),))
    response = FetchResponseFrame(7, "c", (batch,), resumed=True)
    assert orjson.loads(json_codec.encode_server_text(response)) == {
        "t": "fetchRes",
        "id": 7,
        "channel": "c",
        "resumed": True,
        "messages": [
            {
                "t": "msg",
                "channel": "c",
                "name": "",
                "data": None,
                "timestamp": 1,
                "messageId": "b",
                "clientId": "u",
                "seq": 2,
                "messages": [{"name": "a", "data": 1, "encoding": "enc"}],
            }
        ],
    }


def _nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("field", ["data", "messages"])
def test_deeply_nested_data_is_a_bad_frame_with_the_request_id(field: str) -> None:
    deep = _nested(500, "array")
    if field == "data":
        text = '{"t":"pub","id":7,"channel":"c","data":' + deep + "}"
    else:
        text = '{"t":"pub","id":7,"channel":"c","messages":[{"name":"n","data":' + deep + "}]}"
    with pytest.raises(FrameDecodeError) as raised:
        json_codec.decode_client_text(text)
    assert raised.value.request_id == 7 and "nested deeper" in raised.value.message


@settings(max_examples=80, deadline=None)
@given(
    depth=st.integers(min_value=0, max_value=2000),
    kind=st.sampled_from(["array", "object"]),
    frame=st.sampled_from(["pub", "pres"]),
)
def test_any_nesting_depth_decodes_or_is_refused_with_40001(
    depth: int, kind: str, frame: str
) -> None:
    extra = ',"action":"enter"' if frame == "pres" else ""
    text = f'{{"t":"{frame}","id":3,"channel":"c"{extra},"data":{_nested(depth, kind)}}}'
    try:
        decoded = json_codec.decode_client_text(text)
    except FrameDecodeError as error:
        assert depth > json_codec.MAX_DATA_DEPTH - 1
        assert int(error.code) == 40001
    else:
        assert depth <= json_codec.MAX_DATA_DEPTH
        assert orjson.loads(decoded.data or b"null") == orjson.loads(_nested(depth, kind))
