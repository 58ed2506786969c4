"""Neighbours (issue 12, item 5): does one connection flooding publishes slow a quiet
subscriber on the same gateway?

Quiet subscribers sit on gateway A; a paced publisher on gateway B publishes to their channel
(each payload carries its send time, so every delivery is a latency sample). Three points:
no flood; one connection on gateway A publishing as fast as its 256-publish window allows,
with the per-connection limit at its default (``RT_PUBLISH_RATE`` 100/s, burst 1,000); and
the same flood with the limit off (``RT_PUBLISH_RATE=0``, a second cluster), to show what
the limit buys. It is a benchmark, not a test: nothing here passes or fails.

Run: ``python -m bench.neighbours [--seconds 5] [--rate 50] [--subscribers 10]``; prints a
Markdown table and writes ``bench/results/neighbours.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.cpu import cpu_seconds
from bench.fanout import (
    LoadProcesses,
    PublisherProcess,
    SubscriberSpec,
    settle,
    summarize_latency,
)
from testing.cluster import APP_KEY, Cluster, running_cluster

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
# The flooder gets this long to reach full speed before the quiet publisher starts.
_FLOOD_WARMUP_S = 1.5


def _refused(cluster: Cluster) -> float:
    """Publishes gateway A refused for their connection's rate (its metric)."""
    with urllib.request.urlopen(f"{cluster.a.http}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = 'realtime_rate_limited_total{limit="publish_rate"} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def _point(
    cluster: Cluster, flood: bool, subscribers: int, rate: float, seconds: float
) -> dict[str, Any]:
    """Latency of the quiet subscribers over ``seconds``, with or without the flooder."""
    stamp = time.time_ns()
    quiet = f"quiet:{stamp}"
    spec = SubscriberSpec(
        "127.0.0.1", cluster.a.port, subscribers, (quiet,), 0, "realtime", APP_KEY, subscribers
    )
    gateway = cluster.a.process.pid
    settle({"gateway_a": gateway, "gateway_b": cluster.b.process.pid, "nats": cluster.nats.pid})
    refused_before = _refused(cluster)
    with LoadProcesses([spec]) as load:
        flooder: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if flood:
            flooder = PublisherProcess(
                "realtime", cluster.a.url, APP_KEY, (f"flood:{stamp}",), 0.0, seconds + 3
            )
        with flooder as flooding:
            if flood:
                time.sleep(_FLOOD_WARMUP_S)
            cpu_before = cpu_seconds(gateway)
            started = time.perf_counter()
            with PublisherProcess("realtime", cluster.b.url, APP_KEY, (quiet,), rate, seconds):
                pass  # leaving the block waits for the paced publisher to finish
            elapsed = time.perf_counter() - started
            gateway_cpu = cpu_seconds(gateway) - cpu_before
            sent = flooding.result.get(timeout=60) if flood else 0
        latencies = load.finish()
    refused = _refused(cluster) - refused_before
    return {
        **summarize_latency(latencies[len(latencies) // 10 :]),
        "flood_sent_per_s": round(sent / (seconds + 3)),
        "flood_refused_per_s": round(refused / (seconds + 3)),
        "gateway_a_cpu_share": round(gateway_cpu / elapsed, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the three points; print a Markdown table; return the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=50.0, help="quiet publishes per second")
    parser.add_argument("--subscribers", type=int, default=10, help="quiet subscribers")
    arguments = parser.parse_args(argv)
    seconds, rate, subscribers = arguments.seconds, arguments.rate, arguments.subscribers
    points: list[dict[str, Any]] = []
    quiet_env = {"RT_LOG_LEVEL": "WARNING"}
    with running_cluster(quiet_env) as cluster:
        for flood in (False, True):
            point = _point(cluster, flood, subscribers, rate, seconds)
            label = "one connection flooding, limit on (defaults)" if flood else "no flood"
            points.append({"case": label, **point})
            print(label, point, flush=True)
    with running_cluster({**quiet_env, "RT_PUBLISH_RATE": "0"}) as cluster:
        point = _point(cluster, True, subscribers, rate, seconds)
        label = "one connection flooding, limit off (RT_PUBLISH_RATE=0)"
        points.append({"case": label, **point})
        print(label, point, flush=True)
    results = {"seconds": seconds, "quiet_rate": rate, "subscribers": subscribers, "points": points}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "neighbours.json").write_text(json.dumps(results, indent=1))
    print(
        f"\n{subscribers} quiet subscribers on gateway A, {rate:g} publishes/s to them from "
        f"gateway B, {seconds:g} s per point\n"
    )
    print(
        "| case | quiet p50 ms | quiet p99 ms | samples | flood publishes/s | refused (42900)/s "
        "| gateway A CPU |\n|---|---|---|---|---|---|---|"
    )
    for point in points:
        print(
            f"| {point['case']} | {point['p50_ms']} | {point['p99_ms']} | {point['samples']} | "
            f"{point['flood_sent_per_s']:,} | {point['flood_refused_per_s']:,} | "
            f"{point['gateway_a_cpu_share']} |"
        )
    return results


if __name__ == "__main__":
    main()
