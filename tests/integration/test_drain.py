"""Graceful drain (issue 13, item 2) with the real SDK: a gateway SIGTERMed under clients that
publish and subscribe, behind a proxy that routes new connections only to ready gateways (as
a Kubernetes Service routes to ready pods). The clients move to the other gateway and miss
nothing, presence does not flicker, the closes are spread, and the process exits 0 in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from testing.cluster import wait_for_history_worker
from tests.interop.sdk import NODE_DIR, TESTS, require_sdk
from tests.support import (
    APP_KEY,
    NatsServer,
    Service,
    pipe,
    start_nats,
    start_service,
    wait_ready,
)

DRAIN_S = 3.0
CLIENTS = 8  # behind the proxy, half WebSocket, half long-polling


class ReadyProxy:
    """A TCP proxy sending each new connection to the first gateway whose ``/readyz``
    answered 200 at its last check (every 50 ms); connections stay where they were sent."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.ready: list[int] = []
        self.routed: list[tuple[float, int]] = []  # (time.time(), gateway port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> ReadyProxy:
        await self._check()
        self._watcher = asyncio.create_task(self._watch())
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            await self._check()

    async def _check(self) -> None:
        statuses = await asyncio.gather(*(readyz(port) for port in self.ports))
        self.ready = [port for port, status in zip(self.ports, statuses, strict=True) if status]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.ready:
            writer.close()
            return
        port = self.ready[0]
        self.routed.append((time.time(), port))
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, upstream_writer))

        async def forward(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                await pipe(source, sink)
            finally:
                self._writers.discard(sink)

        await asyncio.gather(forward(reader, upstream_writer), forward(upstream_reader, writer))

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            self._server.close()


async def readyz(port: int) -> bool:
    """True when the gateway on ``port`` answers ``/readyz`` with 200."""
    try:
        async with asyncio.timeout(0.5):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            status = await reader.readline()
            writer.close()
            return status.startswith(b"HTTP/1.1 200")
    except (OSError, TimeoutError):
        return False


@pytest.fixture
def gateways() -> Iterator[tuple[Service, Service, NatsServer]]:
    """nats-server, gateways A and B (``RT_DRAIN_S``), a history worker."""
    nats = start_nats()
    env = {"RT_DRAIN_S": str(DRAIN_S)}
    services = [start_service("gateway", nats.url, env=env) for _ in range(2)]
    services.append(start_service("history-worker", nats.url))
    try:
        for gateway in services[:2]:
            wait_ready(gateway.port)
        wait_for_history_worker(nats.url)
        yield services[0], services[1], nats
    finally:
        for service in services:
            service.stop()
        nats.stop()


async def probe_while_draining(gateway: Service) -> dict[str, Any]:
    """What a draining gateway answers: readiness, REST, and new connections of both
    transports (each refused with the protocol's JSON error)."""
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.http}/readyz") as response:
            ready = response.status
        async with session.get(f"{gateway.http}/time") as response:
            rest = response.status
        async with session.get(f"{gateway.http}/", headers=upgrade) as response:
            websocket = (response.status, (await response.json())["error"]["code"])
        async with session.post(f"{gateway.http}/lp/connect", data=b"") as response:
            long_poll = (response.status, (await response.json())["error"]["code"])
    return {"ready": ready, "rest": rest, "websocket": websocket, "long_poll": long_poll}


def first_disconnect(states: list[list[Any]], after_ms: float) -> float:
    """When (ms) a client first left ``connected`` after ``after_ms``."""
    return min(at for at, state in states if at >= after_ms and state != "connected")


async def test_a_sigterm_moves_sdk_clients_to_the_other_gateway_losing_nothing(
    gateways: tuple[Service, Service, NatsServer],
) -> None:
    require_sdk()
    a, b, _ = gateways
    proxy = await ReadyProxy([a.port, b.port]).start()
    node = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "drain.mjs"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=TESTS,
        env=dict(
            os.environ,
            RT_PROXY=proxy.url,
            RT_OBSERVER=b.url,
            RT_KEY=APP_KEY,
            RT_CLIENTS=str(CLIENTS),
        ),
    )
    assert node.stdin is not None and node.stdout is not None
    try:
        async with asyncio.timeout(30):
            while (line := await node.stdout.readline()) != b"READY\n":
                assert line, (await node.communicate())[1].decode()[-3000:]
        assert {port for _, port in proxy.routed} == {a.port}  # everyone starts on A
        sigterm = time.time()
        a.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        during = await probe_while_draining(a)
        exit_code = await asyncio.to_thread(a.process.wait, DRAIN_S + 15)
        exit_s = time.time() - sigterm
        stdout, stderr = await asyncio.wait_for(node.communicate(b"DRAINED\n"), 60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            node.kill()
        await proxy.close()
    assert node.returncode == 0, stderr.decode()[-3000:]
    result = json.loads(stdout.decode().strip().splitlines()[-1])

    # /readyz failed at once while A kept serving REST and refused new connections.
    assert during == {
        "ready": 503,
        "rest": 200,
        "websocket": (503, 50001),
        "long_poll": (503, 50001),
    }
    # A exited cleanly, soon after the drain window (settle, close handshakes, NATS drain).
    assert exit_code == 0, a.log()[-3000:]
    assert DRAIN_S * 0.5 < exit_s < DRAIN_S + 3, exit_s
    assert f"drained {CLIENTS} connections" in a.log()
    # Every client came back, on B (the proxy sent nothing to A once it was unready), with
    # its connection id resumed, and no publish failed.
    assert all(port == b.port for at, port in proxy.routed if at > sigterm + 0.3)
    for client in result["clients"]:
        assert client["state"] == "connected" and client["sameConnectionId"], client["name"]
        assert client["failed"] == [], client
    # Closes were spread over the window, not made at once.
    sigterm_ms = sigterm * 1000
    websocket_closes = sorted(
        first_disconnect(client["states"], sigterm_ms)
        for client in result["clients"]
        if client["transport"] == "websocket"
    )
    all_closes = sorted(first_disconnect(c["states"], sigterm_ms) for c in result["clients"])
    assert websocket_closes[-1] - websocket_closes[0] >= 500, websocket_closes
    assert all_closes[-1] - all_closes[0] > 100, all_closes
    assert all_closes[-1] - sigterm_ms < (DRAIN_S + 1) * 1000, all_closes
    # Nothing missed: every participant saw contiguous serials, each message once, and every
    # acked publish of every client.
    expected = set(result["expected"])
    for participant in [result["observer"], *result["clients"]]:
        ids = [f"{sender}/{k}" for sender, k in participant["received"]]
        assert len(ids) == len(set(ids)), "a message was delivered twice"
        assert not expected - set(ids), sorted(expected - set(ids))[:10]
        serials = sorted(set(participant["serials"]))
        assert serials == list(range(serials[0], serials[-1] + 1)), "serials not contiguous"
    # Presence did not flicker: the observer saw no leave and no enter after the SIGTERM.
    assert result["presenceAfter"] == []
