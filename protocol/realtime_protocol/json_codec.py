"""The JSON text protocol (PROTOCOL.md section 2.7): one JSON object per text message.

Sans-I/O like ``binary_codec``. Decoding raises ``FrameDecodeError`` (40001) naming the
problem; payloads become raw JSON bytes so both codecs share one frame model, and encoding
splices stored payload bytes back in with ``orjson.Fragment`` instead of re-parsing them.
Optional fields are omitted, never ``null`` (old clients crash on ``null``).
"""

from __future__ import annotations

from typing import Any

import orjson

from realtime_protocol.binary_codec import FrameDecodeError
from realtime_protocol.frames import (
    AckFrame,
    AuthFrame,
    BatchMember,
    BundleFrame,
    ClientFrame,
    ConnectedFrame,
    ErrorFrame,
    FetchFrame,
    FetchResponseFrame,
    HistoryFrame,
    HistoryResponseFrame,
    Message,
    MessageFrame,
    PingFrame,
    PongFrame,
    PresenceAction,
    PresenceEventFrame,
    PresenceFrame,
    PresenceSubscribeFrame,
    PresenceUnsubscribeFrame,
    PublishFrame,
    ServerFrame,
    SubscribeFrame,
    UnsubscribeFrame,
)

__all__ = [
    "MAX_DATA_DEPTH",
    "decode_client_text",
    "encode_message_text",
    "encode_server_text",
    "message_object",
]

_ACTIONS = {
    "enter": PresenceAction.ENTER,
    "leave": PresenceAction.LEAVE,
    "update": PresenceAction.UPDATE,
}
_ACTION_NAMES = {value: name for name, value in _ACTIONS.items()}
_MISSING = object()

MAX_DATA_DEPTH = 254
"""Deepest nesting of a JSON connection's ``data`` (orjson's own limit when re-encoding);
deeper payloads get 40001 and the connection stays."""


class _Fields:
    """Typed access to one decoded JSON object; errors name the field and carry the id."""

    __slots__ = ("_object", "request_id")

    def __init__(self, value: dict[str, Any]) -> None:
        self._object = value
        self.request_id = 0

    def error(self, message: str) -> FrameDecodeError:
        return FrameDecodeError(message, self.request_id)

    def integer(self, name: str, default: int | None = None) -> int:
        value = self._object.get(name, _MISSING)
        if value is _MISSING or (value is None and default is not None):
            if default is None:
                raise self.error(f"missing field {name!r}")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(f"field {name!r} must be a non-negative integer")
        return value

    def request(self) -> int:
        self.request_id = self.integer("id")
        return self.request_id

    def string(self, name: str, default: str | None = None) -> str:
        value = self._object.get(name, _MISSING)
        if value is _MISSING or (value is None and default is not None):
            if default is None:
                raise self.error(f"missing field {name!r}")
            return default
        if not isinstance(value, str):
            raise self.error(f"field {name!r} must be a string")
        return value

    def boolean(self, name: str) -> bool:
        value = self._object.get(name, False)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.error(f"field {name!r} must be a boolean")
        return value

    def data(self, name: str = "data", value: Any = _MISSING) -> bytes | None:
        if value is _MISSING:
            value = self._object.get(name, _MISSING)
        if value is _MISSING:
            return None
        try:
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            # orjson refuses to nest deeper than MAX_DATA_DEPTH; before this was caught the
            # connection closed with no err and the SDK resent the same publish forever.
            raise self.error(
                f"field {name!r} is nested deeper than {MAX_DATA_DEPTH} levels"
            ) from None

    def members(self) -> tuple[BatchMember, ...]:
        value = self._object.get("messages")
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.error("field 'messages' must be an array")
        members = []
        for index, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.error(f"messages[{index}] must be an object")
            member = _Fields(item)
            member.request_id = self.request_id
            members.append(
                BatchMember(member.string("name", ""), member.data(), member.string("encoding", ""))
            )
        return tuple(members)


def decode_client_text(text: str | bytes) -> ClientFrame:
    """Decode one JSON text message from a client into its frame."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise FrameDecodeError(f"invalid JSON: {error}") from None
    if not isinstance(value, dict):
        raise FrameDecodeError("a frame must be a JSON object")
    fields = _Fields(value)
    kind = value.get("t")
    if not isinstance(kind, str):
        # A readable id still lets the client's pending request fail instead of hang.
        if isinstance(value.get("id"), int):
            fields.request()
        raise fields.error("missing or non-string field 't'")
    frame: ClientFrame
    if kind == "pub":
        request_id = fields.request()
        frame = PublishFrame(
            request_id,
            fields.string("channel"),
            fields.string("name", ""),
            fields.data(),
            fields.string("encoding", ""),
            fields.string("messageId", ""),
            fields.boolean("ephemeral"),
            fields.members(),
        )
    elif kind == "ping":
        frame = PingFrame()
    elif kind == "sub":
        request_id = fields.request()
        frame = SubscribeFrame(
            request_id,
            fields.string("channel"),
            fields.integer("lastSerial", 0),
            fields.string("lastMessageId", ""),
        )
    elif kind == "auth":
        frame = AuthFrame(
            fields.string("token", ""),
            fields.string("key", ""),
            fields.string("clientId", ""),
            fields.string("resumeConnectionId", ""),
        )
    elif kind in ("unsub", "presSub", "presUnsub"):
        request_id = fields.request()
        channel = fields.string("channel")
        if kind == "unsub":
            frame = UnsubscribeFrame(request_id, channel)
        elif kind == "presSub":
            frame = PresenceSubscribeFrame(request_id, channel)
        else:
            frame = PresenceUnsubscribeFrame(request_id, channel)
    elif kind == "pres":
        request_id = fields.request()
        channel = fields.string("channel")
        action = _ACTIONS.get(fields.string("action"))
        if action is None:
            raise fields.error("field 'action' must be 'enter', 'update' or 'leave'")
        frame = PresenceFrame(
            request_id, channel, action, fields.data(), fields.string("encoding", "")
        )
    elif kind == "hist":
        request_id = fields.request()
        frame = HistoryFrame(
            request_id,
            fields.string("channel"),
            fields.integer("limit", 0),
            fields.integer("before", 0),
            fields.string("start", ""),
        )
    elif kind == "fetch":
        request_id = fields.request()
        frame = FetchFrame(request_id, fields.string("channel"), fields.integer("fromSerial", 0))
    else:
        if isinstance(value.get("id"), int):
            fields.request()
        raise fields.error(f"unknown frame type {kind[:32]!r}")
    return frame


def _payload(data: bytes | None) -> orjson.Fragment | None:
    return None if data is None else orjson.Fragment(data)


def message_object(message: Message) -> dict[str, Any]:
    """The JSON ``msg`` object for ``message`` (also the item of history responses)."""
    value: dict[str, Any] = {
        "t": "msg",
        "channel": message.channel,
        "name": message.name,
        "data": _payload(message.data),
        "timestamp": message.timestamp,
        "messageId": message.message_id,
    }
    if message.client_id:
        value["clientId"] = message.client_id
    if message.encoding and not message.members:
        value["encoding"] = message.encoding
    if message.serial:
        value["seq"] = message.serial
    if message.ephemeral:
        value["ephemeral"] = True
    if message.members:
        value["name"] = ""
        value["data"] = None
        items = []
        for member in message.members:
            item: dict[str, Any] = {"name": member.name, "data": _payload(member.data)}
            if member.encoding:
                item["encoding"] = member.encoding
            items.append(item)
        value["messages"] = items
    return value


def encode_message_text(message: Message) -> bytes:
    """Encode one live message as the UTF-8 bytes of a JSON text message."""
    return orjson.dumps(message_object(message))


def encode_server_text(frame: ServerFrame) -> bytes:
    """Encode a server frame as the UTF-8 bytes of one JSON text message.

    A ``BundleFrame`` must not reach a JSON connection (old clients predate bundles); callers
    send its messages one by one instead.
    """
    value: dict[str, Any]
    if isinstance(frame, MessageFrame):
        value = message_object(frame.message)
    elif isinstance(frame, AckFrame):
        value = {"t": "ack", "id": frame.id}
        if frame.resumed is not None:
            value["resumed"] = frame.resumed
        if frame.seq:
            value["seq"] = frame.seq
    elif isinstance(frame, PongFrame):
        value = {"t": "pong"}
    elif isinstance(frame, ErrorFrame):
        value = {"t": "err", "code": frame.code, "message": frame.message}
        if frame.id:
            value["id"] = frame.id
    elif isinstance(frame, ConnectedFrame):
        value = {
            "t": "connected",
            "connectionId": frame.connection_id,
            "keepAliveMs": frame.keep_alive_ms,
            "clientId": frame.client_id,
        }
    elif isinstance(frame, PresenceEventFrame):
        value = {
            "t": "presEvt",
            "channel": frame.channel,
            "action": _ACTION_NAMES[frame.action],
            "clientId": frame.client_id,
            "connectionId": frame.connection_id,
            "timestamp": frame.timestamp,
        }
        if frame.data is not None:
            value["data"] = orjson.Fragment(frame.data)
        if frame.encoding:
            value["encoding"] = frame.encoding
    elif isinstance(frame, HistoryResponseFrame):
        value = {
            "t": "histRes",
            "id": frame.id,
            "channel": frame.channel,
            "messages": [message_object(message) for message in frame.messages],
        }
        if frame.more:
            value["more"] = True
    elif isinstance(frame, FetchResponseFrame):
        value = {
            "t": "fetchRes",
            "id": frame.id,
            "channel": frame.channel,
            "messages": [message_object(message) for message in frame.messages],
            "resumed": frame.resumed,
        }
    elif isinstance(frame, BundleFrame):
        raise TypeError("bundles are never sent to JSON connections")
    return orjson.dumps(value)
