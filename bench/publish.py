"""Stored-publish throughput with acks (issue 4): one hot channel with 4 publishers on 2
gateways, and 1,000 channels; plus raw JetStream publish from one Python process as the
reference. Run: ``python -m bench.publish [--seconds 5] [--runs 3]``."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from typing import Any

import nats

from bench.cpu import cpu_seconds
from bench.loadgen import PublisherSpec, run_processes, shuffled
from testing.cluster import APP_KEY, Cluster, running_cluster

__all__ = ["main"]


def _scenario(
    cluster: Cluster, channels: tuple[str, ...], seconds: float, publishers: int
) -> dict[str, Any]:
    gateways = [cluster.a.url, cluster.b.url]
    specs = [
        PublisherSpec(
            gateways[index % 2], APP_KEY, shuffled(list(channels), index), seconds, name=f"p{index}"
        )
        for index in range(publishers)
    ]
    processes = {
        "gateway_a": cluster.a.process.pid,
        "gateway_b": cluster.b.process.pid,
        "nats": cluster.nats.pid,
    }
    before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    reports = run_processes(specs)
    cpu = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in processes.items()}
    acked = sum(r["acked"] for r in reports)
    seconds_taken = max(r["seconds"] for r in reports)
    result = {
        "acked": acked,
        "errors": sum(r["errors"] for r in reports),
        "rate": acked / seconds_taken,
        "cpu_seconds": cpu,
        "acked_per_publisher": [r["acked"] for r in reports],
    }
    if len(channels) == 1:
        # Contiguous serials: the highest serial acked equals the number of messages.
        result["max_serial"] = max(r["max_serial"] for r in reports)
    return result


async def _raw_jetstream(url: str, seconds: float, window: int = 256) -> float:
    """Reference: publish_async into a plain stream, acks awaited, from one Python process."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream = f"RAW{uuid.uuid4().hex[:6]}"
    await js.add_stream(name=stream, subjects=[f"raw.{stream}.>"])
    payload = b"x" * 150
    pending: list[asyncio.Future[Any]] = []
    acked = 0
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < seconds:
        count += 1
        pending.append(
            await js.publish_async(
                f"raw.{stream}.c{count % 1000}", payload, headers={"Nats-Msg-Id": f"m{count}"}
            )
        )
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every publish scenario ``runs`` times; print and return medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=4)
    arguments = parser.parse_args(argv)
    results: dict[str, list[float]] = {"hot": [], "channels_1000": [], "raw_jetstream": []}
    details: dict[str, Any] = {}
    with running_cluster(env={"RT_LOG_LEVEL": "WARNING"}) as cluster:
        for run in range(arguments.runs):
            hot = _scenario(
                cluster,
                (f"hot:{run}:{uuid.uuid4().hex[:6]}",),
                arguments.seconds,
                arguments.publishers,
            )
            assert hot["max_serial"] == hot["acked"], f"serials not contiguous: {hot}"
            spread = _scenario(
                cluster,
                tuple(f"c{run}:{index}" for index in range(1000)),
                arguments.seconds,
                arguments.publishers,
            )
            raw = asyncio.run(_raw_jetstream(cluster.nats.url, arguments.seconds))
            results["hot"].append(hot["rate"])
            results["channels_1000"].append(spread["rate"])
            results["raw_jetstream"].append(raw)
            details[f"run{run}"] = {"hot": hot, "channels_1000": spread, "raw_jetstream": raw}
            print(json.dumps(details[f"run{run}"]), flush=True)
    summary = {name: statistics.median(values) for name, values in results.items()}
    print(json.dumps({"median_per_second": summary}))
    return {"median": summary, "runs": details}


if __name__ == "__main__":
    main()
