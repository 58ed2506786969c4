"""Reconnect storms (issue 15, item 4): how fast one gateway process takes back clients
that all arrive at once, as after another gateway crashed or drained.

Each client opens a WebSocket, authenticates with a key, and subscribes with a resume
cursor (``lastSerial``) ``--behind`` messages back on one of 100 channels, so every
``sub`` is a resume: a history query, a replay of the missed messages, then ``ack
resumed:true``. The load comes from ``--processes`` processes that are started and
imported before the clock starts, and then open their connections together (at most 500
handshakes in flight each). The rate is clients fully resumed per second of wall time,
and gateway CPU is divided by the client count.

Run: ``python -m bench.reconnect [--clients 10000] [--runs 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from typing import Any

import orjson
import websockets

from bench.cpu import cpu_seconds
from bench.wsclient import Counter, connect_many
from realtime_protocol import binary_codec
from realtime_protocol.frames import AuthFrame, SubscribeFrame
from testing.cluster import APP_KEY, Cluster, running_cluster

__all__ = ["main"]

CHANNELS = 100
PUBLISHED = 20  # messages per channel before the storm


def _record(frame: Any) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(frame))


def _client_main(
    port: int, first: int, count: int, behind: int, tag: str, start: Any, done: Any
) -> None:
    import uvloop

    async def run() -> None:
        counter = Counter()

        def opening(index: int) -> list[bytes]:
            channel = f"{tag}:{(first + index) % CHANNELS}"
            cursor = PUBLISHED - behind
            return [
                _record(AuthFrame(key=APP_KEY, client_id=f"r{first + index}")),
                _record(SubscribeFrame(1, channel, last_serial=cursor)),
            ]

        start.wait()
        began = time.time()
        clients = await connect_many("127.0.0.1", port, count, opening, counter, concurrency=500)
        done.put({"began": began, "ended": time.time(), "replayed": counter.deliveries})
        for client in clients:
            if client.transport is not None:
                client.transport.abort()

    uvloop.run(run())


async def _seed(cluster: Cluster, tag: str) -> None:
    """``PUBLISHED`` messages on each channel, so every resume has something to replay."""
    async with websockets.connect(cluster.a.url, compression=None) as publisher:
        await publisher.send(orjson.dumps({"t": "auth", "key": APP_KEY}).decode())
        await publisher.recv()
        for channel in range(CHANNELS):
            for index in range(PUBLISHED):
                frame = {
                    "t": "pub",
                    "id": channel * PUBLISHED + index + 1,
                    "channel": f"{tag}:{channel}",
                    "name": "n",
                    "data": index,
                }
                await publisher.send(orjson.dumps(frame).decode())
        for _ in range(CHANNELS * PUBLISHED):
            answer = orjson.loads(await asyncio.wait_for(publisher.recv(), 30))
            assert answer["t"] == "ack", answer


def storm(cluster: Cluster, clients: int, processes: int, behind: int) -> dict[str, Any]:
    """One storm of ``clients`` resuming clients against gateway A."""
    tag = f"storm{time.monotonic_ns()}"
    asyncio.run(_seed(cluster, tag))
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    done = context.Queue()
    share = -(-clients // processes)
    workers = [
        context.Process(
            target=_client_main,
            args=(
                cluster.a.port,
                n * share,
                min(share, clients - n * share),
                behind,
                tag,
                start,
                done,
            ),
            daemon=True,
        )
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    time.sleep(2.0)  # spawned and imported: the clock measures the gateway, not imports
    pids = {"gateway": cluster.a.process.pid, "worker": cluster.worker.process.pid}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start.set()
    reports = [done.get(timeout=120) for _ in workers]
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    for worker in workers:
        worker.join(10)
    seconds = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
    replayed = sum(r["replayed"] for r in reports)
    assert replayed == clients * behind, f"replayed {replayed}, expected {clients * behind}"
    return {
        "clients": clients,
        "seconds": round(seconds, 2),
        "rate": round(clients / seconds),
        "gateway_us_per_client": round(cpu["gateway"] / clients * 1e6),
        "worker_us_per_client": round(cpu["worker"] / clients * 1e6),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run ``runs`` storms; print each and the median."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--behind", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--env", nargs="*", default=[], help="extra NAME=value for the services")
    arguments = parser.parse_args(argv)
    environment = {
        "RT_LOG_LEVEL": "WARNING",
        "RT_MAX_CONNECTIONS_PER_ADDRESS": "0",
        "RT_PUBLISH_RATE": "0",
        **dict(item.split("=", 1) for item in arguments.env),
    }
    runs = []
    with running_cluster(env=environment) as cluster:
        for _ in range(arguments.runs):
            result = storm(cluster, arguments.clients, arguments.processes, arguments.behind)
            print(json.dumps(result), flush=True)
            runs.append(result)
            time.sleep(3.0)  # the previous storm's connections are gone
    summary = {
        "rate": statistics.median(r["rate"] for r in runs),
        "gateway_us_per_client": statistics.median(r["gateway_us_per_client"] for r in runs),
        "worker_us_per_client": statistics.median(r["worker_us_per_client"] for r in runs),
    }
    print(json.dumps({"median": summary}))
    return {"median": summary, "runs": runs}


if __name__ == "__main__":
    main()
