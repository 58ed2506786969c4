"""The binary opcode protocol (PROTOCOL.md section 2): records in, frames out, and back.

Sans-I/O: pure functions over ``bytes`` and the dataclasses of ``realtime_protocol.frames``.
Decoding untrusted input raises ``FrameDecodeError`` (a ``ProtocolError`` with code 40001)
and nothing else. Encoders return one record payload (opcode + fields) without its length prefix;
``frame_record`` adds the prefix so that records can be concatenated into one WebSocket message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import orjson

from realtime_protocol.errors import ErrorCode, ProtocolError
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
    "FrameDecodeError",
    "Opcode",
    "decode_client_record",
    "decode_member",
    "decode_server_record",
    "encode_client_frame",
    "encode_member",
    "encode_message_record",
    "encode_response_members",
    "encode_server_frame",
    "frame_record",
    "iter_records",
    "member_with_serial",
    "message_record_from_member",
    "uvarint",
]


class Opcode:
    """Record opcodes (PROTOCOL.md 2.3)."""

    AUTH = 1
    SUB = 2
    UNSUB = 3
    PUB = 4
    PRES = 5
    PRES_SUB = 6
    PRES_UNSUB = 7
    HIST = 8
    FETCH = 9
    PING = 10
    CONNECTED = 11
    ACK = 12
    MSG = 13
    PRES_EVT = 14
    ERR = 15
    PONG = 16
    HIST_RES = 17
    FETCH_RES = 18
    BATCH = 19


FLAG_EPHEMERAL = 0x01
FLAG_BATCH = 0x02
FLAG_RESPONSE_SET = 0x01
ACK_HAS_RESUMED = 0x01
ACK_RESUMED = 0x02

# The TS SDK decodes varints with float arithmetic; 64 bits is the most any peer may send.
_MAX_UVARINT_BYTES = 10


class FrameDecodeError(ProtocolError):
    """Bytes that are not a valid record. ``request_id`` is set when the id was readable."""

    def __init__(self, message: str, request_id: int = 0) -> None:
        super().__init__(ErrorCode.BAD_FRAME, message, request_id)


# ---- primitives ----

_SMALL_UVARINTS = [bytes([value]) for value in range(128)]


def uvarint(value: int) -> bytes:
    """Encode ``value`` (>= 0) as an unsigned LEB128 varint."""
    if value < 128:
        return _SMALL_UVARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _put_bytes(out: bytearray, value: bytes) -> None:
    out += uvarint(len(value))
    out += value


def _put_str(out: bytearray, value: str) -> None:
    _put_bytes(out, value.encode())


def _put_json(out: bytearray, value: bytes | None) -> None:
    _put_bytes(out, value or b"")


def frame_record(record: bytes) -> bytes:
    """Prefix ``record`` with its length, ready to be concatenated with other records."""
    return uvarint(len(record)) + record


class _Reader:
    """A forward cursor over one record; every failure becomes ``FrameDecodeError``."""

    __slots__ = ("_data", "_offset", "request_id")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0
        self.request_id = 0

    @property
    def done(self) -> bool:
        return self._offset >= len(self._data)

    def error(self, message: str) -> FrameDecodeError:
        return FrameDecodeError(message, self.request_id)

    def byte(self) -> int:
        if self._offset >= len(self._data):
            raise self.error("truncated record")
        value = self._data[self._offset]
        self._offset += 1
        return value

    def uvarint(self) -> int:
        result = 0
        shift = 0
        data = self._data
        for _ in range(_MAX_UVARINT_BYTES):
            if self._offset >= len(data):
                raise self.error("truncated varint")
            byte = data[self._offset]
            self._offset += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if result >= 1 << 64:
                    raise self.error("varint exceeds 64 bits")
                return result
            shift += 7
        raise self.error("varint longer than 10 bytes")

    def request(self) -> int:
        self.request_id = self.uvarint()
        return self.request_id

    def slice(self) -> bytes:
        length = self.uvarint()
        end = self._offset + length
        if end > len(self._data):
            raise self.error("field length exceeds record")
        value = self._data[self._offset : end]
        self._offset = end
        return value

    def str(self) -> str:
        try:
            return self.slice().decode()
        except UnicodeDecodeError:
            raise self.error("string field is not valid UTF-8") from None

    def json(self) -> bytes | None:
        value = self.slice()
        if not value:
            return None
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError:
            raise self.error("data is not valid JSON") from None
        return value


def iter_records(message: bytes) -> Iterator[bytes]:
    """Split one WebSocket message (or long-poll body) into its records.

    Raises ``FrameDecodeError`` at a malformed length prefix, after yielding the records
    before it.
    """
    reader = _Reader(message)
    while not reader.done:
        yield reader.slice()


# ---- client frames ----


def _presence_action(reader: _Reader) -> PresenceAction:
    value = reader.byte()
    try:
        return PresenceAction(value)
    except ValueError:
        raise reader.error(f"invalid presence action {value}") from None


def _batch_members(reader: _Reader) -> tuple[BatchMember, ...]:
    count = reader.uvarint()
    members = []
    for _ in range(count):
        members.append(BatchMember(reader.str(), reader.json(), reader.str()))
    return tuple(members)


def decode_client_record(record: bytes) -> ClientFrame:
    """Decode one client record (no length prefix) into its frame."""
    reader = _Reader(record)
    opcode = reader.byte()
    frame: ClientFrame
    if opcode == Opcode.PUB:
        flags = reader.byte()
        request_id = reader.request()
        channel = reader.str()
        name = reader.str()
        data = reader.json()
        encoding = reader.str()
        message_id = reader.str()
        reader.uvarint()  # reserved (was ttlMs before 0.14.0): read and ignored
        members = _batch_members(reader)
        frame = PublishFrame(
            request_id,
            channel,
            name,
            data,
            encoding,
            message_id,
            bool(flags & FLAG_EPHEMERAL),
            members,
        )
    elif opcode == Opcode.SUB:
        request_id = reader.request()
        last_serial = reader.uvarint()
        frame = SubscribeFrame(request_id, reader.str(), last_serial)
    elif opcode == Opcode.PING:
        frame = PingFrame()
    elif opcode == Opcode.AUTH:
        version = reader.byte()
        frame = AuthFrame(reader.str(), reader.str(), reader.str(), reader.str(), version)
    elif opcode == Opcode.UNSUB:
        frame = UnsubscribeFrame(reader.request(), reader.str())
    elif opcode == Opcode.PRES:
        action = _presence_action(reader)
        request_id = reader.request()
        frame = PresenceFrame(request_id, reader.str(), action, reader.json(), reader.str())
    elif opcode == Opcode.PRES_SUB:
        frame = PresenceSubscribeFrame(reader.request(), reader.str())
    elif opcode == Opcode.PRES_UNSUB:
        frame = PresenceUnsubscribeFrame(reader.request(), reader.str())
    elif opcode == Opcode.HIST:
        request_id = reader.request()
        limit = reader.uvarint()
        channel = reader.str()
        frame = HistoryFrame(request_id, channel, limit, reader.uvarint())
    elif opcode == Opcode.FETCH:
        request_id = reader.request()
        from_serial = reader.uvarint()
        frame = FetchFrame(request_id, reader.str(), from_serial)
    else:
        raise reader.error(f"unknown client opcode {opcode}")
    return frame


def encode_client_frame(frame: ClientFrame) -> bytes:
    """Encode a client frame as a record payload (used by tools, tests and benchmarks)."""
    out = bytearray()
    if isinstance(frame, AuthFrame):
        out += bytes([Opcode.AUTH, frame.version])
        for text in (frame.token, frame.key, frame.client_id, frame.resume_connection_id):
            _put_str(out, text)
    elif isinstance(frame, SubscribeFrame):
        out.append(Opcode.SUB)
        out += uvarint(frame.id) + uvarint(frame.last_serial)
        _put_str(out, frame.channel)
    elif isinstance(frame, UnsubscribeFrame | PresenceSubscribeFrame | PresenceUnsubscribeFrame):
        opcode = {
            UnsubscribeFrame: Opcode.UNSUB,
            PresenceSubscribeFrame: Opcode.PRES_SUB,
            PresenceUnsubscribeFrame: Opcode.PRES_UNSUB,
        }[type(frame)]
        out.append(opcode)
        out += uvarint(frame.id)
        _put_str(out, frame.channel)
    elif isinstance(frame, PublishFrame):
        out += bytes([Opcode.PUB, FLAG_EPHEMERAL if frame.ephemeral else 0])
        out += uvarint(frame.id)
        _put_str(out, frame.channel)
        _put_str(out, frame.name)
        _put_json(out, frame.data)
        _put_str(out, frame.encoding)
        _put_str(out, frame.message_id)
        out += uvarint(0)
        out += uvarint(len(frame.members))
        for member in frame.members:
            _put_str(out, member.name)
            _put_json(out, member.data)
            _put_str(out, member.encoding)
    elif isinstance(frame, PresenceFrame):
        out += bytes([Opcode.PRES, frame.action])
        out += uvarint(frame.id)
        _put_str(out, frame.channel)
        _put_json(out, frame.data)
        _put_str(out, frame.encoding)
    elif isinstance(frame, HistoryFrame):
        out.append(Opcode.HIST)
        out += uvarint(frame.id) + uvarint(frame.limit)
        _put_str(out, frame.channel)
        out += uvarint(frame.before)
    elif isinstance(frame, FetchFrame):
        out.append(Opcode.FETCH)
        out += uvarint(frame.id) + uvarint(frame.from_serial)
        _put_str(out, frame.channel)
    else:
        out.append(Opcode.PING)
    return bytes(out)


# ---- server frames ----


def _put_member(out: bytearray, message: Message) -> None:
    flags = FLAG_EPHEMERAL if message.ephemeral else 0
    if message.members:
        out.append(flags | FLAG_BATCH)
        _put_batch_fields(out, message)
        return
    out.append(flags)
    out += uvarint(message.timestamp)
    _put_str(out, message.channel)
    _put_str(out, message.name)
    _put_json(out, message.data)
    _put_str(out, message.message_id)
    _put_str(out, message.client_id)
    _put_str(out, message.encoding)
    out += uvarint(message.serial)


def _put_batch_fields(out: bytearray, message: Message) -> None:
    out += uvarint(message.timestamp)
    _put_str(out, message.channel)
    _put_str(out, message.message_id)
    _put_str(out, message.client_id)
    out += uvarint(message.serial)
    out += uvarint(len(message.members))
    for member in message.members:
        _put_str(out, member.name)
        _put_json(out, member.data)
        _put_str(out, member.encoding)


def encode_message_record(message: Message) -> bytes:
    """Encode one live message: opcode 19 for a batch, else ``msg`` with one member."""
    out = bytearray()
    if message.members:
        out += bytes([Opcode.BATCH, FLAG_EPHEMERAL if message.ephemeral else 0])
        _put_batch_fields(out, message)
    else:
        out += b"\x0d\x01"
        _put_member(out, message)
    return bytes(out)


def encode_server_frame(frame: ServerFrame) -> bytes:
    """Encode a server frame as a record payload (no length prefix)."""
    out = bytearray()
    if isinstance(frame, MessageFrame):
        return encode_message_record(frame.message)
    if isinstance(frame, AckFrame):
        flags = 0
        if frame.resumed is not None:
            flags = ACK_HAS_RESUMED | (ACK_RESUMED if frame.resumed else 0)
        out += bytes([Opcode.ACK, flags])
        out += uvarint(frame.id) + uvarint(frame.seq)
    elif isinstance(frame, PongFrame):
        out.append(Opcode.PONG)
    elif isinstance(frame, ErrorFrame):
        out.append(Opcode.ERR)
        out += uvarint(frame.id) + uvarint(frame.code)
        _put_str(out, frame.message)
    elif isinstance(frame, ConnectedFrame):
        out.append(Opcode.CONNECTED)
        _put_str(out, frame.connection_id)
        out += uvarint(frame.keep_alive_ms)
        _put_str(out, frame.client_id)
    elif isinstance(frame, BundleFrame):
        out.append(Opcode.MSG)
        out += uvarint(len(frame.messages))
        for message in frame.messages:
            _put_member(out, message)
    elif isinstance(frame, PresenceEventFrame):
        out += bytes([Opcode.PRES_EVT, frame.action])
        out += uvarint(frame.timestamp)
        _put_str(out, frame.channel)
        _put_str(out, frame.client_id)
        _put_str(out, frame.connection_id)
        _put_json(out, frame.data)
        _put_str(out, frame.encoding)
    else:
        if isinstance(frame, HistoryResponseFrame):
            out += bytes([Opcode.HIST_RES, FLAG_RESPONSE_SET if frame.more else 0])
        else:
            out += bytes([Opcode.FETCH_RES, FLAG_RESPONSE_SET if frame.resumed else 0])
        out += uvarint(frame.id)
        _put_str(out, frame.channel)
        out += uvarint(len(frame.messages))
        for message in frame.messages:
            _put_member(out, message)
    return bytes(out)


def _read_member(reader: _Reader) -> Message:
    flags = reader.byte()
    ephemeral = bool(flags & FLAG_EPHEMERAL)
    if flags & FLAG_BATCH:
        return _read_batch_fields(reader, ephemeral)
    timestamp = reader.uvarint()
    channel = reader.str()
    name = reader.str()
    data = reader.json()
    message_id = reader.str()
    client_id = reader.str()
    encoding = reader.str()
    serial = reader.uvarint()
    return Message(
        channel, name, data, message_id, client_id, timestamp, encoding, serial, ephemeral
    )


def _read_batch_fields(reader: _Reader, ephemeral: bool) -> Message:
    timestamp = reader.uvarint()
    channel = reader.str()
    message_id = reader.str()
    client_id = reader.str()
    serial = reader.uvarint()
    members = _batch_members(reader)
    return Message(
        channel, "", None, message_id, client_id, timestamp, "", serial, ephemeral, members
    )


def decode_server_record(record: bytes) -> ServerFrame:
    """Decode one server record (for clients, tools and tests)."""
    reader = _Reader(record)
    opcode = reader.byte()
    if opcode == Opcode.CONNECTED:
        return ConnectedFrame(reader.str(), reader.uvarint(), reader.str())
    if opcode == Opcode.ACK:
        flags = reader.byte()
        request_id = reader.request()
        resumed = bool(flags & ACK_RESUMED) if flags & ACK_HAS_RESUMED else None
        return AckFrame(request_id, reader.uvarint(), resumed)
    if opcode == Opcode.MSG:
        count = reader.uvarint()
        if count == 0:
            raise reader.error("msg record with no members")
        messages = tuple(_read_member(reader) for _ in range(count))
        return MessageFrame(messages[0]) if count == 1 else BundleFrame(messages)
    if opcode == Opcode.BATCH:
        ephemeral = bool(reader.byte() & FLAG_EPHEMERAL)
        return MessageFrame(_read_batch_fields(reader, ephemeral))
    if opcode == Opcode.PRES_EVT:
        action = _presence_action(reader)
        timestamp = reader.uvarint()
        return PresenceEventFrame(
            action, timestamp, reader.str(), reader.str(), reader.str(), reader.json(), reader.str()
        )
    if opcode == Opcode.ERR:
        request_id = reader.request()
        return ErrorFrame(reader.uvarint(), reader.str(), request_id)
    if opcode == Opcode.PONG:
        return PongFrame()
    if opcode in (Opcode.HIST_RES, Opcode.FETCH_RES):
        flag = bool(reader.byte() & FLAG_RESPONSE_SET)
        request_id = reader.request()
        channel = reader.str()
        count = reader.uvarint()
        messages = tuple(_read_member(reader) for _ in range(count))
        if opcode == Opcode.HIST_RES:
            return HistoryResponseFrame(request_id, channel, messages, flag)
        return FetchResponseFrame(request_id, channel, messages, flag)
    raise reader.error(f"unknown server opcode {opcode}")


def encode_member(message: Message) -> bytes:
    """Encode ``message`` as one message member (PROTOCOL.md 2.6), the stored form."""
    out = bytearray()
    _put_member(out, message)
    return bytes(out)


def decode_member(data: bytes) -> Message:
    """Decode one message member, as written by ``encode_member``."""
    return _read_member(_Reader(data))


def member_with_serial(member: bytes, serial: int) -> bytes:
    """A stored member (serial 0) with its serial filled in, without decoding its payload."""
    reader = _Reader(member)
    flags = reader.byte()
    reader.uvarint()  # timestamp
    reader.slice()  # channel
    if flags & FLAG_BATCH:
        reader.slice()  # messageId
        reader.slice()  # clientId
    else:
        reader.slice()  # name
        reader.slice()  # data
        reader.slice()  # messageId
        reader.slice()  # clientId
        reader.slice()  # encoding
    position = reader._offset
    reader.uvarint()  # the stored serial
    return member[:position] + uvarint(serial) + member[reader._offset :]


def encode_response_members(
    history: bool, flag: bool, request_id: int, channel: str, members: Sequence[bytes]
) -> bytes:
    """A ``histRes`` (``history``) or ``fetchRes`` record around already encoded members."""
    out = bytearray(
        (Opcode.HIST_RES if history else Opcode.FETCH_RES, FLAG_RESPONSE_SET if flag else 0)
    )
    out += uvarint(request_id)
    _put_str(out, channel)
    out += uvarint(len(members))
    return bytes(out) + b"".join(members)


def message_record_from_member(member: bytes) -> bytes:
    """A live ``msg`` record (one member, single or batch) around an encoded member."""
    return b"\x0d\x01" + member
