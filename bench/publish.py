"""Stored-publish throughput with acks (issue 4): one hot channel with 4 publishers on 2
gateways, and 1,000 channels; plus raw JetStream publish from one Python process as the
reference, and REST publishes with acks over 1,000 channels (issue 11).
Run: ``python -m bench.publish [--seconds 5] [--runs 3]``."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import time
import uuid
from typing import Any

import nats
import orjson

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


async def raw_jetstream(
    urls: str, seconds: float, window: int = 256, replicas: int = 1, msg_ids: bool = True
) -> float:
    """Reference: publish_async into a plain stream of ``replicas``, acks awaited in windows
    of ``window``, from one Python process (with ``Nats-Msg-Id`` headers, as the service
    stores, unless ``msg_ids`` is False). Returns acked publishes per second."""
    nc = await nats.connect(servers=urls.split(","))
    js = nc.jetstream()
    stream = f"RAW{uuid.uuid4().hex[:6]}"
    await js.add_stream(name=stream, subjects=[f"raw.{stream}.>"], num_replicas=replicas)
    payload = b"x" * 150
    pending: list[asyncio.Future[Any]] = []
    acked = 0
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < seconds:
        count += 1
        headers = {"Nats-Msg-Id": f"m{count}"} if msg_ids else None
        pending.append(
            await js.publish_async(f"raw.{stream}.c{count % 1000}", payload, headers=headers)
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


async def _rest(cluster: Cluster, seconds: float, concurrency: int = 64) -> dict[str, Any]:
    """REST publishes with acks (201 + serial) over 1,000 channels, from one Python process
    (aiohttp, keep-alive, ``concurrency`` requests in flight, both gateways)."""
    import aiohttp

    gateways = [
        cluster.a.url.replace("ws://", "http://"),
        cluster.b.url.replace("ws://", "http://"),
    ]
    authorization = "Basic " + base64.b64encode(APP_KEY.encode()).decode()
    processes = {"gateway_a": cluster.a.process.pid, "gateway_b": cluster.b.process.pid}
    before = {name: cpu_seconds(pid) for name, pid in processes.items()}
    acked = errors = 0
    run = uuid.uuid4().hex[:6]
    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker(index: int) -> None:
            nonlocal acked, errors
            count = 0
            base = gateways[index % 2]
            while time.perf_counter() - started < seconds:
                count += 1
                channel = f"rest{run}:{(index * 7919 + count) % 1000}"
                body = orjson.dumps({"name": "n", "data": "x" * 120, "id": f"{index}-{count}"})
                async with http.post(
                    f"{base}/channels/{channel}/messages",
                    data=body,
                    headers={"Authorization": authorization, "Content-Type": "application/json"},
                ) as response:
                    await response.read()
                    if response.status == 201:
                        acked += 1
                    else:
                        errors += 1

        await asyncio.gather(*(worker(index) for index in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in processes.items()}
    gateway_cpu = sum(cpu.values())
    return {
        "rate": acked / elapsed,
        "errors": errors,
        "cpu_seconds": cpu,
        "gateway_cpu_us_per_publish": round(gateway_cpu / acked * 1e6, 1) if acked else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every publish scenario ``runs`` times; print and return medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--publishers", type=int, default=4)
    arguments = parser.parse_args(argv)
    results: dict[str, list[float]] = {
        "hot": [],
        "channels_1000": [],
        "rest_channels_1000": [],
        "raw_jetstream": [],
    }
    details: dict[str, Any] = {}
    # Throughput of the service, not of the limits: no per-connection or per-key publish rate.
    environment = {"RT_LOG_LEVEL": "WARNING", "RT_PUBLISH_RATE": "0", "RT_REST_PUBLISH_RATE": "0"}
    with running_cluster(env=environment) as cluster:
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
            rest = asyncio.run(_rest(cluster, arguments.seconds))
            raw = asyncio.run(raw_jetstream(cluster.nats.url, arguments.seconds))
            results["hot"].append(hot["rate"])
            results["channels_1000"].append(spread["rate"])
            results["rest_channels_1000"].append(rest["rate"])
            results["raw_jetstream"].append(raw)
            details[f"run{run}"] = {
                "hot": hot,
                "channels_1000": spread,
                "rest_channels_1000": rest,
                "raw_jetstream": raw,
            }
            print(json.dumps(details[f"run{run}"]), flush=True)
    summary = {name: statistics.median(values) for name, values in results.items()}
    print(json.dumps({"median_per_second": summary}))
    return {"median": summary, "runs": details}


if __name__ == "__main__":
    main()
