"""WebSocket frame encoding and header parsing (RFC 6455 section 5.2), without I/O.

The gateway writes server frames itself on its fan-out path (one final, unmasked frame per
message; no fragmentation, no extensions: compression is off), and the benchmark's load
generator and hostile-client tests write client frames and read server frames with the same
functions, so the bytes on both sides come from one tested place.
"""

from __future__ import annotations

import struct

__all__ = [
    "OPCODE_BINARY",
    "OPCODE_CLOSE",
    "OPCODE_TEXT",
    "client_frame",
    "frame_header",
    "parse_header",
    "server_frame",
]

OPCODE_TEXT = 0x1
OPCODE_BINARY = 0x2
OPCODE_CLOSE = 0x8

_FINAL = 0x80
_MASKED = 0x80
_ZERO_MASK = b"\x00\x00\x00\x00"


def frame_header(length: int, opcode: int, masked: bool = False) -> bytes:
    """The header of one final frame carrying ``length`` payload bytes (the mask key, if
    any, follows it and is not included)."""
    mask_bit = _MASKED if masked else 0
    if length < 126:
        return bytes((_FINAL | opcode, mask_bit | length))
    if length < 65536:
        return struct.pack("!BBH", _FINAL | opcode, mask_bit | 126, length)
    return struct.pack("!BBQ", _FINAL | opcode, mask_bit | 127, length)


def server_frame(payload: bytes, opcode: int) -> bytes:
    """One final, unmasked frame as a server sends it."""
    return frame_header(len(payload), opcode) + payload


def client_frame(payload: bytes, opcode: int = OPCODE_BINARY, mask: bytes = _ZERO_MASK) -> bytes:
    """One final, masked frame as a client sends it. The default all-zero key leaves the
    payload unchanged (XOR with 0), which costs no copy: what load generators want. A test
    that must look like a browser passes a random key."""
    if len(mask) != 4:
        raise ValueError("a mask key is 4 bytes")
    header = frame_header(len(payload), opcode, masked=True)
    if mask == _ZERO_MASK:
        return header + mask + payload
    # XOR four bytes at a time through one big integer: fast enough for test payloads.
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return header + mask + masked.to_bytes(len(payload), "big")


def parse_header(buffer: bytes | bytearray, offset: int = 0) -> tuple[int, int, int] | None:
    """Read the header of an unmasked frame at ``offset``: ``(opcode, payload start, payload
    end)``, or ``None`` while the buffer does not hold the whole header yet (the payload may
    still be incomplete: compare its end with the buffer's length)."""
    available = len(buffer) - offset
    if available < 2:
        return None
    opcode = buffer[offset] & 0x0F
    length = buffer[offset + 1] & 0x7F
    start = offset + 2
    if length == 126:
        if available < 4:
            return None
        (length,) = struct.unpack_from("!H", buffer, offset + 2)
        start = offset + 4
    elif length == 127:
        if available < 10:
            return None
        (length,) = struct.unpack_from("!Q", buffer, offset + 2)
        start = offset + 10
    return opcode, start, start + length
