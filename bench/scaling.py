"""How cost grows (issue 15, item 5), for docs/CAPACITY.md: gateway CPU per delivery against
subscribers per channel and against message size, gateway RSS against idle connections,
and the cost of a stored publish against the number of channels. Writes
``bench/results/scaling.json`` and ``bench/results/scaling.png``.

Run: ``python -m bench.scaling [--seconds 4]`` (about 5 minutes). Every point is one
saturated run on this machine's two shared cores (medians of several runs would take
longer than the trend needs; ``make bench`` has the medians of the headline points).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.publish import _scenario
from bench.run import connections, fanout
from testing.cluster import running_cluster

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
SUBSCRIBERS = (10, 100, 1_000, 10_000)
SIZES = (50, 1_024, 16_384, 60_000)  # the frame limit (64 KiB) caps the largest
CONNECTIONS = (1_000, 5_000, 10_000, 15_000)
CHANNELS = (1, 100, 1_000, 10_000, 100_000)
ENVIRONMENT = {
    "RT_LOG_LEVEL": "WARNING",
    "RT_PUBLISH_RATE": "0",
    "RT_MAX_CONNECTIONS_PER_ADDRESS": "0",
    "RT_MAX_CHANNELS": "200000",
}


def _fanout_point(result: dict[str, Any]) -> dict[str, Any]:
    saturated = result["saturated"]
    return {
        "deliveries_per_s": saturated["deliveries_per_s"],
        "gateway_us_per_delivery": None
        if saturated["gateway_cpu_s_per_million"] is None
        else round(saturated["gateway_cpu_s_per_million"], 3),
    }


def measure(seconds: float) -> dict[str, Any]:
    """Every series; one cluster for the CPU series, a fresh one per RSS point."""
    results: dict[str, Any] = {"subscribers": {}, "sizes": {}, "connections": {}, "channels": {}}
    with running_cluster(ENVIRONMENT) as cluster:
        for count in SUBSCRIBERS:
            point = _fanout_point(fanout(cluster, count, seconds, 1, ()))
            results["subscribers"][str(count)] = point
            print("subscribers", count, json.dumps(point), flush=True)
        for size in SIZES:
            point = _fanout_point(fanout(cluster, 1_000, seconds, 1, (), payload_bytes=size))
            results["sizes"][str(size)] = point
            print("size", size, json.dumps(point), flush=True)
        for count in CHANNELS:
            names = tuple(f"scale{count}:{index}" for index in range(count))
            run = _scenario(cluster, names, seconds, 4)
            cpu = run["cpu_seconds"]
            point = {
                "stored_per_s": round(run["rate"]),
                "gateways_us_per_publish": round(
                    (cpu["gateway_a"] + cpu["gateway_b"]) / run["acked"] * 1e6, 1
                ),
                "nats_us_per_publish": round(cpu["nats"] / run["acked"] * 1e6, 1),
                "errors": run["errors"],
            }
            results["channels"][str(count)] = point
            print("channels", count, json.dumps(point), flush=True)
    for count in CONNECTIONS:
        # A fresh gateway per point: memory freed by closed connections is not returned to
        # the OS, so points measured one after another on one process would understate.
        with running_cluster(ENVIRONMENT) as cluster:
            point = connections(cluster, count)
        results["connections"][str(count)] = point
        print("connections", count, json.dumps(point), flush=True)
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    """Four panels, one per series (log-scaled x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    series = [
        (
            axes[0][0],
            "subscribers",
            "gateway_us_per_delivery",
            "subscribers per channel",
            "gateway CPU us per delivery",
        ),
        (
            axes[0][1],
            "sizes",
            "gateway_us_per_delivery",
            "message bytes (1,000 subscribers)",
            "gateway CPU us per delivery",
        ),
        (
            axes[1][0],
            "connections",
            "rss_kb_per_connection",
            "idle connections on one gateway",
            "RSS KB per connection",
        ),
        (
            axes[1][1],
            "channels",
            "gateways_us_per_publish",
            "channels (4 publishers, 2 gateways)",
            "CPU us per stored publish",
        ),
    ]
    for axis, name, key, xlabel, ylabel in series:
        points = [(int(x), p[key]) for x, p in results[name].items() if p.get(key) is not None]
        axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label="gateways")
        if name == "channels":
            nats = [(int(x), p["nats_us_per_publish"]) for x, p in results[name].items()]
            axis.plot([x for x, _ in nats], [y for _, y in nats], marker="s", label="nats-server")
            axis.legend()
        axis.set_xscale("log")
        axis.set_ylim(bottom=0)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure, then write the JSON and the plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    arguments = parser.parse_args(argv)
    started = time.time()
    results = measure(arguments.seconds)
    results["seconds"] = round(time.time() - started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(results, indent=1))
    plot(results, RESULTS / "scaling.png")
    print(f"done in {results['seconds']} s: bench/results/scaling.json, scaling.png")
    return results


if __name__ == "__main__":
    main()
