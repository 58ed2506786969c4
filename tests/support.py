"""Test clients (JSON and binary) over ``websockets``; the cluster helpers live in
``testing.cluster``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import websockets

from realtime_protocol import binary_codec
from realtime_protocol.frames import ClientFrame, ServerFrame
from testing.cluster import (  # noqa: F401 - re-exported for the tests
    APP_KEY,
    OTHER_APP_KEY,
    RESTRICTED_KEY,
    Cluster,
    NatsServer,
    Service,
    free_port,
    http_status,
    running_cluster,
    start_nats,
    start_service,
    wait_for_log,
    wait_for_port,
    wait_ready,
)
from testing.raw_websocket import RawWebSocket  # noqa: F401 - re-exported for the tests

# ---- a cluster with the key registry on (issue 12) ----

KEYS_SECRET = "test-keys-secret"
SIGNING_KEY = "test-legacy-signing-key"
_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class KeyedCluster:
    """nats-server and two gateways with the key registry (``RT_KEYS_SECRET``) and legacy
    development tokens (``RT_TOKEN_SIGNING_KEY``) on; keys are made with the real CLI."""

    nats: NatsServer
    a: Service
    b: Service

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[KeyedCluster]:
        nats_server = start_nats()
        env = {"RT_KEYS_SECRET": KEYS_SECRET, "RT_TOKEN_SIGNING_KEY": SIGNING_KEY}
        gateways = [start_service("gateway", nats_server.url, env=env) for _ in range(2)]
        try:
            for gateway in gateways:
                wait_ready(gateway.port)
            yield cls(nats_server, *gateways)
        finally:
            for gateway in gateways:
                gateway.stop()
            nats_server.stop()

    def keys_command(self, *arguments: str) -> list[str]:
        """The ``realtime keys ...`` command line, as an operator would type it."""
        return [sys.executable, "-m", "realtime", "keys", "--nats", self.nats.url, *arguments]

    def keys(self, *arguments: str, secret: str = KEYS_SECRET) -> subprocess.CompletedProcess[str]:
        """Run ``realtime keys ...``."""
        return subprocess.run(
            self.keys_command(*arguments),
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, RT_KEYS_SECRET=secret),
            cwd=_ROOT,
        )

    def create(self, *arguments: str) -> str:
        """``realtime keys create ...``; the new key (its output's last line)."""
        result = self.keys("create", *arguments)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]


# ---- clients ----


_RESPONSES = ("ack", "err", "histRes", "fetchRes")


class JsonClient:
    """A JSON text-protocol client over ``websockets``."""

    def __init__(self, socket: websockets.ClientConnection) -> None:
        self.socket = socket
        self._next_id = 0
        # Frames that arrived while a request waited for its response, in arrival order.
        self.backlog: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, url: str) -> JsonClient:
        return cls(await websockets.connect(url, compression=None))

    def next_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.socket.send(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.pop(0)
        return await self._receive_new(timeout)

    async def _receive_new(self, timeout: float) -> dict[str, Any]:
        message = await asyncio.wait_for(self.socket.recv(), timeout)
        assert isinstance(message, str), "a JSON connection must only receive text messages"
        value = orjson.loads(message)
        assert isinstance(value, dict)
        return value

    async def receive_until(self, kind: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        """Skip frames until one of type ``kind`` matching ``match`` arrives."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            frame = await self.receive(max(0.01, remaining))
            if frame.get("t") == kind and all(frame.get(k) == v for k, v in match.items()):
                return frame

    async def auth(self, **fields: Any) -> dict[str, Any]:
        await self.send({"t": "auth", **fields})
        return await self.receive()

    async def request(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Send a request with a fresh id; return its ack/err/histRes/fetchRes."""
        request_id = self.next_id()
        await self.send({"t": kind, "id": request_id, **fields})
        while True:
            frame = await self._receive_new(5.0)
            if frame.get("id") == request_id and frame["t"] in _RESPONSES:
                return frame
            self.backlog.append(frame)

    async def close(self) -> None:
        await self.socket.close()


async def json_client(url: str, key: str = APP_KEY, **auth: Any) -> JsonClient:
    """An authenticated JSON client."""
    client = await JsonClient.connect(url)
    connected = await client.auth(key=key, **auth)
    assert connected["t"] == "connected", connected
    return client


class BinaryClient:
    """A binary-protocol client over ``websockets`` (records in, frames out)."""

    def __init__(self, socket: websockets.ClientConnection) -> None:
        self.socket = socket
        self.pending: list[ServerFrame] = []

    @classmethod
    async def connect(cls, url: str) -> BinaryClient:
        return cls(await websockets.connect(url, compression=None))

    async def send(self, *frames: ClientFrame) -> None:
        await self.socket.send(
            b"".join(binary_codec.frame_record(binary_codec.encode_client_frame(f)) for f in frames)
        )

    async def receive(self, timeout: float = 5.0) -> ServerFrame:
        while not self.pending:
            message = await asyncio.wait_for(self.socket.recv(), timeout)
            assert isinstance(message, bytes), "a binary connection must only get binary"
            self.pending += [
                binary_codec.decode_server_record(r) for r in binary_codec.iter_records(message)
            ]
        return self.pending.pop(0)

    async def close(self) -> None:
        await self.socket.close()


async def pipe(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    dropping: Callable[[], bool] | None = None,
) -> None:
    """Copy ``source`` into ``sink`` until either end goes away, then close ``sink``: one
    direction of a loopback proxy. While ``dropping()`` is true, what arrives is dropped."""
    try:
        while data := await source.read(65536):
            if dropping is not None and dropping():
                continue
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        sink.close()


class TcpProxy:
    """A loopback TCP proxy whose live connections can be cut (both directions dropped at
    once, as when a network path dies), while new connections keep working. With ``hold``
    set, what the server sends is dropped while the client's bytes still reach it, as when
    a path dies one way first."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.hold = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(
            pipe(reader, upstream_writer), pipe(upstream_reader, writer, lambda: self.hold)
        )

    def cut(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


def gateway_rss_bytes(service: Service) -> int:
    """Resident memory of a service process."""
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def metric_value(service: Service, name: str) -> float:
    """Sum of the samples of ``name`` on a gateway's ``/metrics``."""
    with urllib.request.urlopen(f"{service.http}/metrics", timeout=2) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total
