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
import uuid

from bench.loadgen import PublisherSpec, run_processes, shuffled
from bench.publish import raw_jetstream
from testing.cluster import APP_KEY, start_service, wait_ready
from testing.nats_cluster import running_nats_cluster

__all__ = ["main"]

SETTINGS = ("2m", "1s", "always")


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
            raw_rate = asyncio.run(raw_jetstream(cluster.urls, seconds, replicas=3, msg_ids=False))
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
