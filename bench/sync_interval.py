"""What JetStream's ``sync_interval`` costs (issue 14): stored publishes per second through 2
gateways into the 3-node cluster the fault suite uses (stream at 3 replicas), with
nats-server's default (fsync every 2 minutes), every second (what deploy/ and k8s/ ship and
the fault suite runs) and before every ack (``always``); plus raw JetStream R3 publishes from
one Python process, where the gateways do not limit the rate.
Run: ``python -m bench.sync_interval [--seconds 8] [--runs 2]``."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import nats
from nats.js.api import StreamConfig

from bench.loadgen import PublisherSpec, run_processes, shuffled
from testing.cluster import APP_KEY, start_service, wait_ready
from testing.nats_cluster import running_nats_cluster

__all__ = ["main"]

SETTINGS = ("2m", "1s", "always")


async def _raw_r3(urls: str, seconds: float, window: int = 256) -> float:
    """Raw JetStream publishes (acks awaited in windows) into an R3 stream."""
    nc = await nats.connect(servers=urls.split(","))
    js = nc.jetstream()
    stream = f"RAW{uuid.uuid4().hex[:6]}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"raw.{stream}.>"], num_replicas=3))
    payload = b"x" * 150
    pending: list[asyncio.Future[Any]] = []
    acked = count = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        count += 1
        pending.append(await js.publish_async(f"raw.{stream}.c{count % 1000}", payload))
        if len(pending) >= window:
            await asyncio.gather(*pending)
            acked += len(pending)
            pending.clear()
    await asyncio.gather(*pending)
    acked += len(pending)
    elapsed = time.perf_counter() - started
    await js.delete_stream(stream)
    await nc.close()
    return acked / elapsed


def _measure(sync_interval: str, seconds: float) -> dict[str, float]:
    env = {"RT_STREAM_REPLICAS": "3", "RT_PUBLISH_RATE": "0", "RT_LOG_LEVEL": "WARNING"}
    with running_nats_cluster(sync_interval=sync_interval) as cluster:
        gateways = [start_service("gateway", cluster.urls, env=env) for _ in range(2)]
        try:
            for gateway in gateways:
                wait_ready(gateway.port, 60)
            channels = [f"sync{uuid.uuid4().hex[:6]}:{i}" for i in range(1000)]
            specs = [
                PublisherSpec(
                    gateways[index % 2].url,
                    APP_KEY,
                    shuffled(channels, index),
                    seconds,
                    name=f"p{index}",
                )
                for index in range(4)
            ]
            reports = run_processes(specs)
            gateway_rate = sum(r["acked"] for r in reports) / max(r["seconds"] for r in reports)
            raw_rate = asyncio.run(_raw_r3(cluster.urls, seconds))
        finally:
            for gateway in gateways:
                gateway.stop()
    return {"gateways": gateway_rate, "raw_r3": raw_rate}


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    """Measure each setting ``runs`` times, alternating; print and return the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=2)
    arguments = parser.parse_args(argv)
    samples: dict[str, list[dict[str, float]]] = {setting: [] for setting in SETTINGS}
    for _ in range(arguments.runs):
        for setting in SETTINGS:
            samples[setting].append(_measure(setting, arguments.seconds))
            print(setting, samples[setting][-1], flush=True)
    medians = {
        setting: {
            key: round(statistics.median(s[key] for s in runs)) for key in ("gateways", "raw_r3")
        }
        for setting, runs in samples.items()
    }
    print(medians)
    return medians


if __name__ == "__main__":
    main()
