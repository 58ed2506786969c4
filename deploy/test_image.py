"""The image, built and run for real (issue 13 item 6; ``make test-image``, also run by
``.ci/run``): gateway and history-worker containers from ``realtime:latest`` against a
nats-server on loopback, ``--network host`` only. Checks readiness, a publish delivered
through the container, history through the worker container, the non-root user, the
healthcheck, and a SIGTERM drain that exits 0 in time.

Needs ``DOCKER_HOST`` pointing at a running engine with the image built
(``deploy/image-env.sh`` and the Makefile's ``test-image`` target prepare both).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator

import orjson
import pytest
import websockets

from testing.cluster import APP_KEY, NatsServer, free_port, start_nats

IMAGE = "realtime:latest"
DOCKER = "/usr/bin/docker"
DRAIN_S = 2


def docker(*arguments: str, timeout: float = 60) -> str:
    result = subprocess.run(
        [DOCKER, *arguments], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"docker {' '.join(arguments)}: {result.stderr}"
    return result.stdout.strip()


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_until(check: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(check) and check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


class Containers:
    """The containers this module started, removed at the end whatever happens."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def run(self, role: str, **env: str) -> str:
        name = f"rt-test-{role}-{uuid.uuid4().hex[:6]}"
        options = [arg for key, value in env.items() for arg in ("-e", f"{key}={value}")]
        docker("run", "-d", "--name", name, "--network", "host", *options, IMAGE, role)
        self.names.append(name)
        return name

    def remove_all(self) -> None:
        for name in self.names:
            subprocess.run([DOCKER, "rm", "-f", name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def nats() -> Iterator[NatsServer]:
    server = start_nats()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def containers() -> Iterator[Containers]:
    running = Containers()
    try:
        yield running
    finally:
        running.remove_all()


@pytest.fixture(scope="module")
def deployment(nats: NatsServer, containers: Containers) -> dict[str, object]:
    gateway_port, metrics_port = free_port(), free_port()
    common = {"RT_NATS_URL": nats.url, "RT_API_KEYS": APP_KEY, "RT_DRAIN_S": str(DRAIN_S)}
    gateway = containers.run("gateway", RT_PORT=str(gateway_port), **common)
    worker = containers.run("history-worker", RT_METRICS_PORT=str(metrics_port), **common)
    wait_until(lambda: http_ok(f"http://127.0.0.1:{gateway_port}/readyz"), "gateway ready")
    return {"gateway": gateway, "worker": worker, "port": gateway_port, "metrics": metrics_port}


def test_the_image_runs_as_a_non_root_user(deployment: dict[str, object]) -> None:
    user = docker("exec", str(deployment["gateway"]), "id", "-u")
    assert user != "0" and int(user) == 10001
    config = json.loads(docker("image", "inspect", IMAGE))[0]["Config"]
    assert config["User"].startswith("10001")
    assert config["Healthcheck"]["Test"][0] == "CMD"
    # No compiler or pip caches in the final image.
    assert docker("run", "--rm", "--entrypoint", "sh", IMAGE, "-c", "command -v gcc || true") == ""


async def test_a_publish_is_delivered_and_stored_through_the_containers(
    deployment: dict[str, object],
) -> None:
    url = f"ws://127.0.0.1:{deployment['port']}"
    channel = f"image:{uuid.uuid4().hex[:8]}"
    async with websockets.connect(url) as subscriber, websockets.connect(url) as publisher:
        for socket in (subscriber, publisher):
            await socket.send(orjson.dumps({"t": "auth", "key": APP_KEY}).decode())
            assert orjson.loads(await socket.recv())["t"] == "connected"
        await subscriber.send(orjson.dumps({"t": "sub", "id": 1, "channel": channel}).decode())
        assert orjson.loads(await subscriber.recv()) == {"t": "ack", "id": 1}
        publish = {"t": "pub", "id": 1, "channel": channel, "name": "n", "data": {"x": 1}}
        await publisher.send(orjson.dumps({**publish, "messageId": "m1"}).decode())
        assert orjson.loads(await publisher.recv()) == {"t": "ack", "id": 1, "seq": 1}
        message = orjson.loads(await subscriber.recv())
        assert (message["t"], message["data"], message["seq"]) == ("msg", {"x": 1}, 1)
        # History goes through the history-worker container.
        await publisher.send(orjson.dumps({"t": "hist", "id": 2, "channel": channel}).decode())
        history = orjson.loads(await publisher.recv())
        assert history["t"] == "histRes" and [m["seq"] for m in history["messages"]] == [1]
    assert http_ok(f"http://127.0.0.1:{deployment['metrics']}/metrics")


def test_the_healthcheck_reports_healthy_for_both_roles(deployment: dict[str, object]) -> None:
    for name in (deployment["gateway"], deployment["worker"]):

        def healthy(container: str = str(name)) -> bool:
            state = docker("inspect", "--format", "{{.State.Health.Status}}", container)
            return state == "healthy"

        wait_until(healthy, f"{name} healthy", timeout=40)


def test_sigterm_drains_and_exits_0_in_time(deployment: dict[str, object]) -> None:
    started = time.monotonic()
    docker("stop", "--time", "30", str(deployment["gateway"]), timeout=60)
    elapsed = time.monotonic() - started
    exit_code = docker("inspect", "--format", "{{.State.ExitCode}}", str(deployment["gateway"]))
    assert exit_code == "0"
    assert elapsed < DRAIN_S + 8, f"took {elapsed:.1f} s to stop"
