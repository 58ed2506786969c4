"""The JSON text codec (PROTOCOL.md 2.7)."""

from __future__ import annotations

import orjson
import pytest

from shared import json_codec
from shared.binary_codec import FrameDecodeError
from shared.frames import (
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
