"""Golden vectors made by the SDK's own codec: we decode each and re-encode it byte for byte,
and what we decode matches what the SDK itself decodes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from realtime_protocol import binary_codec
from realtime_protocol.frames import (
    AckFrame,
    BundleFrame,
    ConnectedFrame,
    ErrorFrame,
    FetchResponseFrame,
    HistoryResponseFrame,
    Message,
    MessageFrame,
    PongFrame,
    PresenceAction,
    PresenceEventFrame,
    ServerFrame,
)
from tests.interop.sdk import run_node

VECTORS: list[dict[str, Any]] = run_node("vectors.mjs")
ACTIONS = {
    PresenceAction.ENTER: "enter",
    PresenceAction.LEAVE: "leave",
    PresenceAction.UPDATE: "update",
}


def _data(data: bytes | None) -> dict[str, Any]:
    return {} if data is None else {"data": orjson.loads(data)}


def _optional(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value}


def _members(message: Message) -> list[dict[str, Any]]:
    return [
        {"name": m.name, **_data(m.data), **_optional(encoding=m.encoding)} for m in message.members
    ]


def _message(message: Message) -> dict[str, Any]:
    """Our message as the SDK's memberToMessageFrame shapes it."""
    view: dict[str, Any] = {"t": "msg", "channel": message.channel}
    if message.members:
        view.update(name="", timestamp=message.timestamp, messageId=message.message_id)
        view.update(
            _optional(clientId=message.client_id, seq=message.serial, ephemeral=message.ephemeral)
        )
        view["messages"] = _members(message)
        return view
    view.update(name=message.name, **_data(message.data), timestamp=message.timestamp)
    view["messageId"] = message.message_id
    view.update(
        _optional(
            clientId=message.client_id,
            encoding=message.encoding,
            seq=message.serial,
            ephemeral=message.ephemeral,
        )
    )
    return view


def _bundled(message: Message) -> dict[str, Any]:
    view = {
        "name": message.name,
        **_data(message.data),
        "timestamp": message.timestamp,
        "messageId": message.message_id,
    }
    view.update(
        _optional(
            clientId=message.client_id,
            encoding=message.encoding,
            seq=message.serial,
            ephemeral=message.ephemeral,
        )
    )
    if message.members:
        view["messages"] = _members(message)
    return view


def sdk_view(frame: ServerFrame) -> dict[str, Any]:
    """Our decoded frame in the shape the SDK's decoder gives (JSON-serialised)."""
    if isinstance(frame, ConnectedFrame):
        return {
            "t": "connected",
            "connectionId": frame.connection_id,
            "keepAliveMs": frame.keep_alive_ms,
            "clientId": frame.client_id,
        }
    if isinstance(frame, AckFrame):
        view: dict[str, Any] = {"t": "ack", "id": frame.id, **_optional(seq=frame.seq)}
        if frame.resumed is not None:
            view["resumed"] = frame.resumed
        return view
    if isinstance(frame, MessageFrame):
        return _message(frame.message)
    if isinstance(frame, BundleFrame):
        return {
            "t": "msg",
            "channel": frame.messages[-1].channel,
            "name": "",
            "timestamp": 0,
            "messageId": "",
            "bundle": [_bundled(m) for m in frame.messages],
        }
    if isinstance(frame, PresenceEventFrame):
        return {
            "t": "presEvt",
            "action": ACTIONS[frame.action],
            "timestamp": frame.timestamp,
            "channel": frame.channel,
            "clientId": frame.client_id,
            "connectionId": frame.connection_id,
            **_data(frame.data),
            **_optional(encoding=frame.encoding),
        }
    if isinstance(frame, ErrorFrame):
        return {"t": "err", "id": frame.id, "code": frame.code, "message": frame.message}
    if isinstance(frame, PongFrame):
        return {"t": "pong"}
    if isinstance(frame, HistoryResponseFrame):
        return {
            "t": "histRes",
            "id": frame.id,
            "channel": frame.channel,
            "messages": [_message(m) for m in frame.messages],
            **_optional(more=frame.more),
        }
    assert isinstance(frame, FetchResponseFrame)
    return {
        "t": "fetchRes",
        "id": frame.id,
        "channel": frame.channel,
        "messages": [_message(m) for m in frame.messages],
        "resumed": frame.resumed,
    }


def test_vectors_cover_every_frame_type() -> None:
    client_types = {v["frame"]["t"] for v in VECTORS if v["direction"] == "client"}
    server_names = {v["name"] for v in VECTORS if v["direction"] == "server"}
    assert client_types == {
        "auth",
        "sub",
        "unsub",
        "pub",
        "pres",
        "presSub",
        "presUnsub",
        "hist",
        "fetch",
        "ping",
    }
    assert {
        "connected",
        "ack",
        "msg",
        "batch",
        "bundle",
        "err-unscoped",
        "pong",
        "histRes-more",
        "fetchRes-resumed",
        "presEvt-enter",
    } <= server_names


@pytest.mark.parametrize("vector", VECTORS, ids=[f"{v['direction']}-{v['name']}" for v in VECTORS])
def test_decode_then_encode_is_byte_exact(vector: dict[str, Any]) -> None:
    record = bytes.fromhex(vector["hex"])
    if vector["direction"] == "client":
        frame = binary_codec.decode_client_record(record)
        assert binary_codec.encode_client_frame(frame) == record
        expected = vector["frame"]
        for field, attribute in (("id", "id"), ("channel", "channel")):
            if field in expected:
                assert getattr(frame, attribute) == expected[field]
    else:
        server_frame = binary_codec.decode_server_record(record)
        assert binary_codec.encode_server_frame(server_frame) == record
        assert sdk_view(server_frame) == vector["frame"]
