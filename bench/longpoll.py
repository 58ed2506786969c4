"""Long-polling against WebSocket, side by side in one run (issue 11): deliveries per second
to 1,000 subscribers of one channel, the gateway's CPU per delivery, and publish-to-client
latency at fixed paced rates, for both transports; plus the saturated long-poll rate.
Publishes go through gateway B, subscribers sit on gateway A.

Run: ``python -m bench.longpoll [--subscribers 1000] [--seconds 4] [--runs 3]``; prints a
Markdown table and writes ``bench/results/longpoll.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.fanout import (
    LoadProcesses,
    PublisherProcess,
    SubscriberSpec,
    measure_rate,
    settle,
    summarize_latency,
)
from testing.cluster import APP_KEY, Cluster, running_cluster

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
PROCESSES = 2
SAMPLED_PER_PROCESS = 20


def _specs(port: int, total: int, mode: str, channel: str) -> list[SubscriberSpec]:
    share = -(-total // PROCESSES)
    return [
        SubscriberSpec(
            "127.0.0.1",
            port,
            min(share, total - index * share),
            (channel,),
            index * share,
            mode,
            APP_KEY,
            SAMPLED_PER_PROCESS,
        )
        for index in range(PROCESSES)
        if total - index * share > 0
    ]


def _point(
    cluster: Cluster, mode: str, subscribers: int, rate: float, seconds: float
) -> dict[str, Any]:
    """One transport at one publish rate (0 = as fast as acks allow)."""
    channel = f"lpbench:{mode}:{time.time_ns()}"
    pids = {"gateway": cluster.a.process.pid, "gateway_b": cluster.b.process.pid}
    settle({**pids, "nats": cluster.nats.pid})
    with LoadProcesses(_specs(cluster.a.port, subscribers, mode, channel)) as load:
        with PublisherProcess("realtime", cluster.b.url, APP_KEY, (channel,), rate, seconds + 2):
            time.sleep(1.0)
            measured = measure_rate(load, {**pids, **load.pids}, seconds)
        latencies = load.finish()
    gateway_cpu = measured["cpu_seconds"]["gateway"]
    deliveries = measured["deliveries"]
    return {
        "deliveries_per_s": round(measured["rate"]),
        "gateway_cpu_s_per_million": round(gateway_cpu / deliveries * 1e6, 2)
        if deliveries
        else None,
        "gateway_cpu_share": round(gateway_cpu / measured["seconds"], 2),
        # The clients share the machine's two cores; their own delay is part of the latency.
        "load_generator_cpu_share": round(
            sum(v for k, v in measured["cpu_seconds"].items() if k.startswith("clients"))
            / measured["seconds"],
            2,
        ),
        **summarize_latency(latencies[len(latencies) // 10 :]),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; print a Markdown table; return the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rates", default="10,50", help="paced publishes/s, comma-separated")
    arguments = parser.parse_args(argv)
    subscribers = arguments.subscribers
    rates = [float(rate) for rate in arguments.rates.split(",")]
    results: dict[str, Any] = {"subscribers": subscribers, "points": []}
    # No per-connection publish limit: the saturated point publishes from one connection.
    with running_cluster({"RT_PUBLISH_RATE": "0"}) as cluster:
        for rate in [*rates, 0.0]:
            for mode, label in (("realtime", "websocket"), ("longpoll", "long-polling")):
                point = _point(cluster, mode, subscribers, rate, arguments.seconds)
                results["points"].append(
                    {"transport": label, "publish_rate": rate or "saturated", **point}
                )
                print(label, rate or "saturated", point, flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "longpoll.json").write_text(json.dumps(results, indent=1))
    print(
        "| transport | publishes/s | deliveries/s | gateway CPU-s per 1M | load generator CPU "
        "| p50 ms | p99 ms |\n|---|---|---|---|---|---|---|"
    )
    for point in results["points"]:
        print(
            f"| {point['transport']} | {point['publish_rate']} | {point['deliveries_per_s']:,} | "
            f"{point['gateway_cpu_s_per_million']} | {point['load_generator_cpu_share']} | "
            f"{point['p50_ms']} | {point['p99_ms']} |"
        )
    return results


if __name__ == "__main__":
    main()
