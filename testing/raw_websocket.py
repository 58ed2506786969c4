"""A blocking, hand-driven WebSocket client for hostile-client tests and benchmarks (tests and
``bench.slow_consumer``): it reads only when told to, so the gateway's writes back up."""

from __future__ import annotations

import base64
import os
import socket
import struct
from typing import Any

import orjson

from shared.websocket_frames import OPCODE_TEXT, client_frame, parse_header

__all__ = ["RawWebSocket"]


class RawWebSocket:
    """A blocking, hand-driven WebSocket client for hostile-client tests: it reads only when
    told to (a tiny receive buffer makes the server's writes back up quickly), sends frames
    as fast as the kernel accepts them, and can drop the connection with a TCP reset."""

    def __init__(
        self, port: int, receive_buffer: int = 4096, handshake: bool = True, timeout: float = 5.0
    ) -> None:
        self.sock = socket.socket()
        # Set before connect so the advertised window stays small.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        if handshake:
            self.handshake(port)

    def handshake(self, port: int) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head[:80].decode(errors="replace"))

    @staticmethod
    def frame(payload: bytes, opcode: int = OPCODE_TEXT) -> bytes:
        """One masked client frame with a random key, as a browser sends it."""
        return client_frame(payload, opcode, mask=os.urandom(4))

    def send_json(self, frame: dict[str, Any]) -> None:
        self.sock.sendall(self.frame(orjson.dumps(frame)))

    def receive_frame(self) -> tuple[int, bytes]:
        """Read one unmasked server frame: (opcode, payload)."""
        header = self._exactly(2)
        while (parsed := parse_header(header)) is None:
            header += self._exactly(1)
        opcode, start, end = parsed
        return opcode, self._exactly(end - start)

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def reset(self) -> None:
        """Drop the connection abruptly (RST, as when a client's network dies)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
