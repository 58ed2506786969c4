"""The SDK's golden server vectors (tests/node/vectors.mjs, made by @foony/realtime's own
codec) through the Python client: what a channel delivers for each ``msg``/batch/bundle
record, and what history and fetch responses expand to, equals what the SDK's channel.ts
delivers for the frame the SDK itself decodes (``deliverMessage`` / ``expandBatch``)."""

from __future__ import annotations

from typing import Any

import pytest

from realtime_client.channel import Channel, expand_message
from realtime_client.connection import _decode
from realtime_client.messages import Message
from realtime_protocol.binary_codec import frame_record
from realtime_protocol.frames import (
    BundleFrame,
    FetchResponseFrame,
    HistoryResponseFrame,
    MessageFrame,
    PresenceEventFrame,
)
from tests.interop.sdk import run_node

VECTORS: list[dict[str, Any]] = [
    vector for vector in run_node("vectors.mjs") if vector["direction"] == "server"
]


def sdk_member(base: dict[str, Any], member: dict[str, Any], index: int) -> dict[str, Any]:
    """channel.ts ``memberFrame``: one message of a batch."""
    return {
        "name": member["name"],
        "data": member.get("data"),
        "timestamp": base["timestamp"],
        "messageId": f"{base['messageId']}:{index}",
        "clientId": base.get("clientId", ""),
        "encoding": member.get("encoding", ""),
        "seq": 0,
        "ephemeral": base.get("ephemeral", False),
    }


def sdk_delivered(frame: dict[str, Any]) -> list[dict[str, Any]]:
    """channel.ts ``deliverMessage``: what listeners get for one decoded ``msg`` frame."""
    if frame.get("bundle"):
        return [
            item
            for member in frame["bundle"]
            for item in sdk_delivered({"channel": frame["channel"], **member})
        ]
    if frame.get("messages"):
        return [sdk_member(frame, member, i) for i, member in enumerate(frame["messages"])]
    return [
        {
            "name": frame["name"],
            "data": frame.get("data"),
            "timestamp": frame["timestamp"],
            "messageId": frame["messageId"],
            "clientId": frame.get("clientId", ""),
            "encoding": frame.get("encoding", ""),
            "seq": frame.get("seq", 0),
            "ephemeral": frame.get("ephemeral", False),
        }
    ]


def view(message: Message) -> dict[str, Any]:
    return {
        "name": message.name,
        "data": message.data,
        "timestamp": message.timestamp,
        "messageId": message.message_id,
        "clientId": message.client_id,
        "encoding": message.encoding,
        "seq": message.serial,
        "ephemeral": message.ephemeral,
    }


class StubConnection:
    """Just enough of a connection for a channel that only receives."""

    def _register_channel(self, name: str, channel: Any) -> None:
        pass

    def on(self, listener: Any) -> Any:
        return lambda: None


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v["frame"]["t"] == "msg"], ids=lambda v: v["name"]
)
def test_live_messages_deliver_as_in_the_sdk(vector: dict[str, Any]) -> None:
    frames = _decode(frame_record(bytes.fromhex(vector["hex"])))
    assert len(frames) == 1 and isinstance(frames[0], MessageFrame | BundleFrame)
    channel = Channel(StubConnection(), vector["frame"]["channel"])  # type: ignore[arg-type]
    delivered: list[Message] = []
    channel.add_listener(delivered.append)
    channel._on_message(frames[0])
    assert [view(message) for message in delivered] == sdk_delivered(vector["frame"])


@pytest.mark.parametrize(
    "vector",
    [v for v in VECTORS if v["frame"]["t"] in ("histRes", "fetchRes")],
    ids=lambda v: v["name"],
)
def test_history_and_fetch_expand_as_in_the_sdk(vector: dict[str, Any]) -> None:
    (frame,) = _decode(frame_record(bytes.fromhex(vector["hex"])))
    assert isinstance(frame, HistoryResponseFrame | FetchResponseFrame)
    expanded = [view(m) for stored in frame.messages for m in expand_message(stored)]
    sdk = [item for message in vector["frame"]["messages"] for item in sdk_delivered(message)]
    assert expanded == sdk


@pytest.mark.parametrize(
    "vector", [v for v in VECTORS if v["frame"]["t"] == "presEvt"], ids=lambda v: v["name"]
)
def test_presence_events_match_the_sdk(vector: dict[str, Any]) -> None:
    (frame,) = _decode(frame_record(bytes.fromhex(vector["hex"])))
    assert isinstance(frame, PresenceEventFrame)
    channel = Channel(StubConnection(), frame.channel)  # type: ignore[arg-type]
    events: list[Any] = []
    channel.presence.on(events.append)
    channel._on_presence(frame)
    sdk = vector["frame"]
    (event,) = events
    assert (event.action, event.client_id, event.connection_id, event.timestamp) == (
        sdk["action"],
        sdk["clientId"],
        sdk["connectionId"],
        sdk["timestamp"],
    )
    assert (event.data, event.encoding) == (sdk.get("data"), sdk.get("encoding", ""))
