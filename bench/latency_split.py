"""Where a paced delivery's latency goes (issue 15, item 1): publish on gateway B -> stored
-> fanned out on gateway A (the gateway's own ``realtime_delivery_lag_seconds``, from the
message's timestamp to the fan-out) -> read by the client (the load generator's sampled
connections). The difference between the two is the write to 1,000 sockets plus the load
generator's own delay, which this also shows as its CPU share: a load generator near a
full core queues messages in its own process, and that is not the gateway's latency.

Fixed paced rates (deliveries/s = messages/s x subscribers), lightest first.
Run: ``python -m bench.latency_split [--subscribers 1000] [--seconds 6]``.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from typing import Any

from bench.cpu import cpu_seconds
from bench.fanout import LoadProcesses, PublisherProcess, settle, summarize_latency
from bench.run import _specs
from testing.cluster import APP_KEY, Cluster, running_cluster

__all__ = ["main"]

RATES = (50_000, 150_000, 300_000, 600_000)
LAG = "realtime_delivery_lag_seconds_bucket"


def _lag_buckets(cluster: Cluster) -> dict[float, float]:
    """Cumulative counts of gateway A's delivery-lag histogram, by upper bound."""
    with urllib.request.urlopen(f"{cluster.a.http}/metrics", timeout=5) as response:
        text = response.read().decode()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(LAG + "{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
    return buckets


def _quantile(before: dict[float, float], after: dict[float, float], fraction: float) -> float:
    """The ``fraction`` quantile (ms) of the observations between two scrapes, linearly
    interpolated inside its bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if not total:
        return float("nan")
    wanted = fraction * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= wanted:
            if bound == float("inf"):
                return lower_bound * 1000
            share = (wanted - lower_count) / max(count - lower_count, 1e-9)
            return (lower_bound + share * (bound - lower_bound)) * 1000
        lower_bound, lower_count = bound, count
    return lower_bound * 1000


def measure(cluster: Cluster, subscribers: int, seconds: float) -> list[dict[str, Any]]:
    """One row per paced rate."""
    channel = f"split:{time.time_ns()}"
    specs = _specs(cluster.a.port, subscribers, "realtime", (channel,), samples=20)
    pids = {"gateway_a": cluster.a.process.pid, "gateway_b": cluster.b.process.pid}
    pids["nats"] = cluster.nats.pid
    rows = []
    for deliveries in RATES:
        settle(pids)
        rate = deliveries / subscribers
        with LoadProcesses(specs) as load:
            before = _lag_buckets(cluster)
            cpu_before = {name: cpu_seconds(pid) for name, pid in {**pids, **load.pids}.items()}
            started = time.perf_counter()
            with PublisherProcess("realtime", cluster.b.url, APP_KEY, (channel,), rate, seconds):
                time.sleep(seconds + 0.5)
            elapsed = time.perf_counter() - started
            cpu = {
                name: (cpu_seconds(pid) - cpu_before[name]) / elapsed
                for name, pid in {**pids, **load.pids}.items()
            }
            after = _lag_buckets(cluster)
            latencies = load.finish()
        client = summarize_latency(latencies[len(latencies) // 10 :])
        row = {
            "deliveries_per_s": deliveries,
            "publishes_per_s": round(rate, 1),
            "client_p50_ms": client["p50_ms"],
            "client_p99_ms": client["p99_ms"],
            "gateway_lag_p50_ms": round(_quantile(before, after, 0.5), 2),
            "gateway_lag_p99_ms": round(_quantile(before, after, 0.99), 2),
            "gateway_a_cpu_share": round(cpu["gateway_a"], 2),
            "load_generator_cpu_share": round(
                sum(v for k, v in cpu.items() if k.startswith("clients")), 2
            ),
            "nats_cpu_share": round(cpu["nats"], 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Measure every paced rate and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=6.0)
    arguments = parser.parse_args(argv)
    environment = {"RT_LOG_LEVEL": "WARNING", "RT_PUBLISH_RATE": "0"}
    with running_cluster(environment) as cluster:
        rows = measure(cluster, arguments.subscribers, arguments.seconds)
    print(
        "| deliveries/s | client p50 | client p99 | gateway lag p50 | gateway lag p99 "
        "| gateway A CPU | load generator CPU | nats CPU |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['deliveries_per_s']:,} | {row['client_p50_ms']} ms | {row['client_p99_ms']} ms"
            f" | {row['gateway_lag_p50_ms']} ms | {row['gateway_lag_p99_ms']} ms"
            f" | {row['gateway_a_cpu_share']} | {row['load_generator_cpu_share']}"
            f" | {row['nats_cpu_share']} |"
        )
    return rows


if __name__ == "__main__":
    main()
