"""The WebSocket frame codec, against RFC 6455's own examples and the websockets library's
sans-I/O parser (an independent implementation)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from shared.websocket_frames import (
    OPCODE_BINARY,
    OPCODE_TEXT,
    client_frame,
    frame_header,
    parse_header,
    server_frame,
)


def parse_with_websockets(data: bytes, masked: bool) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=masked)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("incomplete frame")


def test_rfc_6455_section_5_7_examples() -> None:
    # A single-frame unmasked text message containing "Hello".
    assert server_frame(b"Hello", OPCODE_TEXT) == bytes.fromhex("810548656c6c6f")
    # A single-frame masked text message containing "Hello" (key 37 fa 21 3d).
    masked = client_frame(b"Hello", OPCODE_TEXT, mask=bytes.fromhex("37fa213d"))
    assert masked == bytes.fromhex("818537fa213d7f9f4d5158")
    # 256 bytes binary message in a single unmasked frame: 0x82 0x7E 0x0100.
    assert frame_header(256, OPCODE_BINARY) == bytes.fromhex("827e0100")
    # 64 KiB binary message in a single unmasked frame: 0x82 0x7F 0x0000000000010000.
    assert frame_header(65536, OPCODE_BINARY) == bytes.fromhex("827f0000000000010000")


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_lengths_at_every_boundary_parse_back(length: int) -> None:
    payload = bytes(range(256)) * (length // 256) + bytes(range(length % 256))
    data = server_frame(payload, OPCODE_BINARY)
    assert parse_header(data) == (OPCODE_BINARY, len(data) - length, len(data))
    frame = parse_with_websockets(data, masked=False)
    assert frame.opcode is Opcode.BINARY and frame.data == payload and frame.fin


@settings(max_examples=100, deadline=None)
@given(payload=st.binary(max_size=70_000), mask=st.binary(min_size=4, max_size=4))
def test_client_frames_unmask_to_the_payload(payload: bytes, mask: bytes) -> None:
    frame = parse_with_websockets(client_frame(payload, OPCODE_BINARY, mask), masked=True)
    assert frame.data == payload and frame.opcode is Opcode.BINARY


def test_parse_header_waits_for_a_whole_header() -> None:
    data = server_frame(b"x" * 300, OPCODE_TEXT)
    assert parse_header(data[:1]) is None
    assert parse_header(data[:3]) is None
    assert parse_header(data[:4]) == (OPCODE_TEXT, 4, 304)
    two = data + server_frame(b"yz", OPCODE_BINARY)
    assert parse_header(two, 304) == (OPCODE_BINARY, 306, 308)
