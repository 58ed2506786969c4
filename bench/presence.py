"""Presence at scale (issue 17): what idle members cost, how fast a gateway turns enters and
leaves into events, and how long a 5,000-member snapshot takes.

- **Idle cost.** Two gateways and one nats-server; members are connections entered in
  presence (``--channels-per-connection`` channels each, spread over 100 channels), held
  idle for ``--seconds``. The same connections, only subscribed to the same channels, are
  the baseline: the difference, divided by the members, is the cost of presence alone, as
  % of one core per 1,000 members (gateways summed, and nats-server). Keep-alive pings go
  out every 10 s in both phases.
- **Events/s.** ``--churners`` connections on gateway a enter and leave (each waiting for
  its ack) for ``--seconds``, while one ``presSub`` watcher per channel on gateway b counts
  the events it receives; gateway a's CPU per acked change is reported.
- **Snapshot.** 5,000 members in one channel (on gateways a and b); a third gateway that
  does not follow the channel answers a ``presSub`` (cold: it reads the members from the
  bucket) and then another (warm: from memory); the time from request to ack.

``--root DIR`` runs the gateways from another checkout of this repository (e.g. the code
before a change, extracted with ``git archive``), with this checkout's load generators.

Run: ``python -m bench.presence [--members 5000 50000] [--seconds 20] [--root DIR]``
(about 4 minutes). Prints one JSON object per point and writes
``bench/results/presence.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import websockets

from bench.cpu import cpu_seconds
from bench.wsclient import Counter, connect_many
from realtime_protocol import binary_codec
from realtime_protocol.frames import (
    AuthFrame,
    PingFrame,
    PresenceAction,
    PresenceFrame,
    PresenceSubscribeFrame,
    SubscribeFrame,
)
from testing.cluster import (
    APP_KEY,
    ROOT,
    NatsServer,
    Service,
    free_port,
    start_nats,
    wait_ready,
)

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
CHANNELS = 100
# A process of the load generator holds at most this many connections (the machine's
# descriptor limit is 20,000 per process).
PER_PROCESS = 5_000
ENVIRONMENT = {
    "RT_LOG_LEVEL": "WARNING",
    "RT_MAX_CONNECTIONS_PER_ADDRESS": "0",
    "RT_PRESENCE_MAX_MEMBERS": "5000",
    "RT_DRAIN_S": "0",
}
_PING_S = 10.0


def _record(frame: Any) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(frame))


# ---- processes ----


def _start_gateway(nats_url: str, root: Path) -> Service:
    """A gateway running the code in ``root`` (``testing.cluster.start_service`` runs this
    checkout's)."""
    environment = dict(os.environ)
    environment.update(ENVIRONMENT)
    environment.update(RT_NATS_URL=nats_url, RT_API_KEYS=APP_KEY, PYTHONUNBUFFERED="1")
    environment["PYTHONPATH"] = str(root)
    port = free_port()
    descriptor, log_path = tempfile.mkstemp(prefix="rt-bench-presence-", suffix=".log")
    with os.fdopen(descriptor, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "realtime", "gateway", "--port", str(port)],
            cwd=root,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    return Service(process, port, log_path)


@dataclass
class _Cluster:
    nats: NatsServer
    gateways: list[Service]

    def pids(self) -> dict[str, int]:
        named = {f"gateway_{chr(ord('a') + i)}": g.process.pid for i, g in enumerate(self.gateways)}
        return {**named, "nats": self.nats.pid}


@contextlib.contextmanager
def _cluster(root: Path, gateways: int = 2) -> Iterator[_Cluster]:
    nats = start_nats()
    started: list[Service] = []
    try:
        for _ in range(gateways):
            started.append(_start_gateway(nats.url, root))
        for gateway in started:
            wait_ready(gateway.port, timeout=60)
        yield _Cluster(nats, started)
    finally:
        for gateway in started:
            gateway.stop()
        nats.stop()


def _members_main(
    port: int,
    first: int,
    count: int,
    channels: list[str],
    per_connection: int,
    enter: bool,
    ready: Any,
    stop: Any,
) -> None:
    """Hold ``count`` connections, each subscribed to (and, if ``enter``, a member of)
    ``per_connection`` of ``channels``, until ``stop`` is set; ping every 10 s."""
    import uvloop

    async def run() -> None:
        counter = Counter()
        stride = max(1, len(channels) // per_connection)

        def opening(index: int) -> list[bytes]:
            number = first + index
            frames = [_record(AuthFrame(key=APP_KEY, client_id=f"m{number}"))]
            for slot in range(per_connection):
                channel = channels[(number + slot * stride) % len(channels)]
                frames.append(_record(SubscribeFrame(len(frames), channel)))
                if enter:
                    frames.append(
                        _record(
                            PresenceFrame(len(frames), channel, PresenceAction.ENTER, b'"idle"')
                        )
                    )
            return frames

        try:
            clients = await connect_many(
                "127.0.0.1", port, count, opening, counter, concurrency=200
            )
        except Exception as error:  # reported, so the parent does not wait forever
            ready.put({"error": repr(error)})
            return
        ready.put({"connected": len(clients)})
        ping = _record(PingFrame())
        loop = asyncio.get_running_loop()
        while not await loop.run_in_executor(None, stop.wait, _PING_S):
            for client in clients:
                if client.transport is not None and not client.transport.is_closing():
                    client.send(ping)
        for client in clients:
            if client.transport is not None:
                client.transport.abort()

    uvloop.run(run())


@contextlib.contextmanager
def _members(
    ports: list[int], total: int, channels: list[str], per_connection: int, enter: bool
) -> Iterator[float]:
    """``total`` connections spread evenly over the gateways on ``ports``; yields the
    seconds it took to open them (and enter)."""
    context = multiprocessing.get_context("spawn")
    ready = context.Queue()
    stop = context.Event()
    processes = []
    first = 0
    per_gateway = -(-total // len(ports))
    started = time.perf_counter()
    for position, port in enumerate(ports):
        count_here = min(per_gateway, total - position * per_gateway)
        while count_here > 0:
            count = min(PER_PROCESS, count_here)
            process = context.Process(
                target=_members_main,
                args=(port, first, count, channels, per_connection, enter, ready, stop),
            )
            process.start()
            processes.append(process)
            first += count
            count_here -= count
    try:
        reports = [ready.get(timeout=300) for _ in processes]
        failures = [report["error"] for report in reports if "error" in report]
        if failures:
            raise RuntimeError(f"load generator failed: {failures}")
        yield time.perf_counter() - started
    finally:
        stop.set()
        for process in processes:
            process.join(15)
            if process.is_alive():
                process.kill()


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def _idle_cpu(cluster: _Cluster, seconds: float) -> dict[str, float]:
    """% of one core each process used over ``seconds`` of idleness (after a settle)."""
    time.sleep(3.0)
    pids = cluster.pids()
    before, started = _cpu(pids), time.perf_counter()
    time.sleep(seconds)
    after, elapsed = _cpu(pids), time.perf_counter() - started
    return {name: 100 * (after[name] - before[name]) / elapsed for name in pids}


# ---- the measurements ----


def idle_cost(root: Path, members: int, seconds: float, per_connection: int) -> dict[str, Any]:
    """Idle CPU with ``members`` members against the same connections only subscribed."""
    connections = members // per_connection
    channels = [f"idle:{index}" for index in range(CHANNELS)]
    phases: dict[str, dict[str, float]] = {}
    opened: dict[str, float] = {}
    for phase, enter in (("subscribed", False), ("present", True)):
        # A fresh cluster per phase: the bucket and the processes start from nothing.
        with _cluster(root) as cluster:
            ports = [gateway.port for gateway in cluster.gateways]
            with _members(ports, connections, channels, per_connection, enter) as took:
                opened[phase] = took
                phases[phase] = _idle_cpu(cluster, seconds)
    subscribed, present = phases["subscribed"], phases["present"]
    gateways = sum(present[n] - subscribed[n] for n in present if n.startswith("gateway"))
    nats = present["nats"] - subscribed["nats"]
    point = {
        "members": members,
        "connections": connections,
        "per_connection": per_connection,
        "cpu_pct_subscribed": {k: round(v, 2) for k, v in subscribed.items()},
        "cpu_pct_present": {k: round(v, 2) for k, v in present.items()},
        "gateways_pct_per_1000_members": round(gateways / members * 1000, 3),
        "nats_pct_per_1000_members": round(nats / members * 1000, 3),
        "enter_seconds": round(opened["present"], 1),
        "enters_per_s": round(members / opened["present"]),
    }
    return point


def _churn_main(port: int, count: int, seconds: float, report: Any) -> None:
    """``count`` connections, each entering and leaving its channel in turn (one request in
    flight each) for ``seconds``; reports the acked changes."""
    import uvloop

    async def one(index: int, deadline: float) -> int:
        async with websockets.connect(f"ws://127.0.0.1:{port}", compression=None) as socket:
            await socket.send(_record(AuthFrame(key=APP_KEY, client_id=f"c{index}")))
            await socket.recv()
            channel = f"churn:{index % CHANNELS}"
            done = 0
            request = 0
            while time.perf_counter() < deadline:
                action = PresenceAction.ENTER if request % 2 == 0 else PresenceAction.LEAVE
                request += 1
                await socket.send(_record(PresenceFrame(request, channel, action, b'"c"')))
                reply = await socket.recv()
                assert isinstance(reply, bytes)
                for record in binary_codec.iter_records(reply):
                    done += record[0] == binary_codec.Opcode.ACK
            if request % 2:  # end as a non-member
                await socket.send(
                    _record(PresenceFrame(request + 1, channel, PresenceAction.LEAVE))
                )
                await socket.recv()
            return done

    async def run() -> None:
        deadline = time.perf_counter() + 1.0 + seconds
        counts = await asyncio.gather(*(one(index, deadline) for index in range(count)))
        report.put(sum(counts))

    uvloop.run(run())


def _watch_main(port: int, seconds: float, ready: Any, report: Any) -> None:
    """One ``presSub`` watcher per churn channel; reports the events received."""
    import uvloop

    async def run() -> None:
        counter = Counter()

        def opening(index: int) -> list[bytes]:
            return [
                _record(AuthFrame(key=APP_KEY, client_id=f"w{index}")),
                _record(PresenceSubscribeFrame(1, f"churn:{index}")),
            ]

        clients = await connect_many(
            "127.0.0.1", port, CHANNELS, opening, counter, samples=CHANNELS
        )
        ready.put(True)
        before = sum(client.replies for client in clients)
        await asyncio.sleep(seconds + 4.0)
        report.put(sum(client.replies for client in clients) - before)
        for client in clients:
            if client.transport is not None:
                client.transport.abort()

    uvloop.run(run())


def event_rate(root: Path, churners: int, seconds: float) -> dict[str, Any]:
    """Enter/leave changes per second one gateway acks, and what a watcher gateway sends."""
    context = multiprocessing.get_context("spawn")
    with _cluster(root) as cluster:
        a, b = cluster.gateways
        ready, watched, acked = context.Queue(), context.Queue(), context.Queue()
        watcher = context.Process(target=_watch_main, args=(b.port, seconds, ready, watched))
        watcher.start()
        ready.get(timeout=60)
        churn = context.Process(target=_churn_main, args=(a.port, churners, seconds, acked))
        pids = cluster.pids()
        churn.start()
        time.sleep(1.0)  # connected; the churn starts a second after launch
        before, started = _cpu(pids), time.perf_counter()
        changes = acked.get(timeout=seconds + 60)
        after, elapsed = _cpu(pids), time.perf_counter() - started
        events = watched.get(timeout=60)
        churn.join(10)
        watcher.join(10)
    return {
        "churners": churners,
        "changes_per_s": round(changes / seconds),
        "events_delivered_per_s": round(events / seconds),
        "gateway_a_us_per_change": round(
            (after["gateway_a"] - before["gateway_a"]) / changes * 1e6
        ),
        "gateway_b_us_per_change": round(
            (after["gateway_b"] - before["gateway_b"]) / changes * 1e6
        ),
        "nats_us_per_change": round((after["nats"] - before["nats"]) / changes * 1e6),
        "cpu_pct": {k: round(100 * (after[k] - before[k]) / elapsed, 1) for k in pids},
    }


async def _presence_snapshot(port: int, channel: str) -> tuple[float, int]:
    async with websockets.connect(f"ws://127.0.0.1:{port}", compression=None) as socket:
        await socket.send(orjson.dumps({"t": "auth", "key": APP_KEY, "clientId": "snap"}).decode())
        await socket.recv()
        started = time.perf_counter()
        await socket.send(orjson.dumps({"t": "presSub", "id": 1, "channel": channel}).decode())
        enters = 0
        while True:
            frame = orjson.loads(await socket.recv())
            if frame["t"] == "presEvt":
                enters += 1
            elif frame["t"] == "ack":
                return time.perf_counter() - started, enters
            else:
                raise RuntimeError(f"presSub failed: {frame}")


def snapshot_time(root: Path, members: int) -> dict[str, Any]:
    """presSub time for a ``members``-member channel on a gateway that does not follow it
    (cold) and then on the same gateway again (warm)."""
    with _cluster(root, gateways=3) as cluster:
        a, b, c = cluster.gateways
        with _members([a.port, b.port], members, ["snap:one"], 1, True):
            time.sleep(1.0)
            cold, cold_count = asyncio.run(_presence_snapshot(c.port, "snap:one"))
            warm, warm_count = asyncio.run(_presence_snapshot(c.port, "snap:one"))
    return {
        "members": members,
        "cold_ms": round(cold * 1000, 1),
        "cold_enters": cold_count,
        "warm_ms": round(warm * 1000, 1),
        "warm_enters": warm_count,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every point; print and write them."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, nargs="*", default=[5_000, 50_000])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--churners", type=int, default=100)
    parser.add_argument("--snapshot-members", type=int, default=5_000)
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout to run gateways from")
    parser.add_argument("--output", type=Path, default=RESULTS / "presence.json")
    arguments = parser.parse_args(argv)
    root = arguments.root.resolve()
    results: dict[str, Any] = {"root": str(root), "idle": []}
    for members in arguments.members:
        # Up to 5,000 members one channel per connection (as the issue measured); beyond,
        # 5 channels per connection keeps each gateway's sockets under the file limit.
        per_connection = 1 if members <= 5_000 else 5
        point = idle_cost(root, members, arguments.seconds, per_connection)
        results["idle"].append(point)
        print("idle", json.dumps(point), flush=True)
    results["events"] = event_rate(root, arguments.churners, min(arguments.seconds, 10.0))
    print("events", json.dumps(results["events"]), flush=True)
    results["snapshot"] = snapshot_time(root, arguments.snapshot_members)
    print("snapshot", json.dumps(results["snapshot"]), flush=True)
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
