"""The Python client's own throughput and CPU cost (issue 16): how many messages per second
one ``realtime_client.Realtime`` can receive and publish (acked), and the client's CPU per
message.

- **receive**: one client subscribes on gateway A; a separate process (raw binary frames,
  so its cost is not the client's) publishes ``--messages`` single messages, pipelined, on
  gateway B. Rate = messages over the time from the first to the last delivery; CPU = this
  process's CPU (the client is all it runs) over the same span. On a small machine the
  server (one publisher, JetStream, fan-out) is the limit here, not the client.
- **receive, batches of 100**: the same messages published as batches of 100 (one stored
  record and one frame per 100 messages), so the server does a hundredth of the work and the
  client's own per-message cost shows.
- **publish, auto-batched**: one client publishes ``--messages`` single messages at once
  (``channel.publish(name, data)`` each, as an application would); they leave as batches of
  up to 200 and the rate counts until the last ack.
- **publish, one frame each**: the same with ``batch_max_messages=1``: every message its own
  ``pub`` frame and ack (at most ``--window`` in flight), the cost of exactly-once tracking
  per message.
- **publish, awaited one by one**: one publish at a time, each awaited (latency-bound).
  With the SDK's default 10 ms batch throttle each waits up to 10 ms for company; with
  ``batch_interval=0`` (``..._interval_0``) a publish goes out on the next loop turn.

The cluster runs with ``RT_PUBLISH_RATE=0`` (no per-connection publish limit). Run:
``python -m bench.client [--messages 20000] [--runs 3] [--uvloop]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import time
from typing import Any

import websockets

from realtime_client import Message, Realtime
from realtime_protocol import binary_codec
from realtime_protocol.frames import AuthFrame, BatchMember, PublishFrame
from testing.cluster import APP_KEY, Cluster, running_cluster

__all__ = ["main"]


def _record(frame: Any) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(frame))


def _publisher_main(url: str, channel: str, count: int, batch: int, ready: Any, go: Any) -> None:
    """Publish ``count`` messages on ``channel`` (single ones, or batches of ``batch``
    members) with at most 500 publishes unacked."""

    async def run() -> None:
        async with websockets.connect(url, compression=None, max_size=None) as socket:
            await socket.send(_record(AuthFrame(key=APP_KEY, client_id="load")))
            await socket.recv()
            ready.set()
            go.wait()
            payload = b'{"text":"a message of some ordinary size","n":12345}'
            window = asyncio.Semaphore(500)

            publishes = count // batch

            async def acks() -> None:
                acked = 0
                while acked < publishes:
                    for record in binary_codec.iter_records(await socket.recv()):  # type: ignore[arg-type]
                        if record[0] == binary_codec.Opcode.ACK:
                            acked += 1
                            window.release()

            reader = asyncio.create_task(acks())
            members = tuple(BatchMember("m", payload) for _ in range(batch)) if batch > 1 else ()
            for index in range(publishes):
                await window.acquire()
                frame = PublishFrame(
                    index + 1,
                    channel,
                    "m",
                    payload,
                    message_id=f"load-{channel}-{index}",
                    members=members,
                )
                await socket.send(_record(frame))
            await reader

    asyncio.run(run())


async def receive(cluster: Cluster, count: int, batch: int) -> dict[str, Any]:
    """Messages per second one client receives, and its CPU per message."""
    channel_name = f"bench:receive:{time.monotonic_ns()}"
    context = multiprocessing.get_context("spawn")
    ready, go = context.Event(), context.Event()
    publisher = context.Process(
        target=_publisher_main,
        args=(cluster.b.url, channel_name, count, batch, ready, go),
        daemon=True,
    )
    publisher.start()
    done = asyncio.Event()
    marks: dict[str, float] = {}
    received = 0

    def on_message(message: Message) -> None:
        nonlocal received
        received += 1
        if received == 1:
            marks["first"], marks["first_cpu"] = time.perf_counter(), time.process_time()
        if received == count:
            marks["last"], marks["last_cpu"] = time.perf_counter(), time.process_time()
            done.set()

    async with Realtime(key=APP_KEY, endpoint=cluster.a.url, client_id="reader") as client:
        await client.channels.get(channel_name).subscribe(on_message)
        await asyncio.to_thread(ready.wait, 30)
        go.set()
        await asyncio.wait_for(done.wait(), 120)
    publisher.join(10)
    seconds = marks["last"] - marks["first"]
    cpu = marks["last_cpu"] - marks["first_cpu"]
    # The first delivery starts the clock, so count the messages after it.
    return {
        "messages": count,
        "rate": round((count - 1) / seconds),
        "cpu_us_per_message": round(cpu / (count - 1) * 1e6, 1),
    }


async def publish(cluster: Cluster, count: int, mode: str, window: int) -> dict[str, Any]:
    """Messages per second one client publishes until acked, and its CPU per message."""
    channel_name = f"bench:publish:{mode}:{time.monotonic_ns()}"
    options: dict[str, Any] = {"key": APP_KEY, "endpoint": cluster.a.url, "client_id": "writer"}
    if mode == "unbatched":
        options.update(batch_max_messages=1, max_outstanding_publishes=window)
    elif mode == "sequential_interval_0":
        options.update(batch_interval=0.0)
    data = {"text": "a message of some ordinary size", "n": 12345}
    async with Realtime(**options) as client:
        channel = client.channels.get(channel_name)
        await channel.publish("warm-up", data)
        started, started_cpu = time.perf_counter(), time.process_time()
        if mode.startswith("sequential"):
            for _ in range(count):
                await channel.publish("m", data)
        else:
            await asyncio.gather(*(channel.publish("m", data) for _ in range(count)))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - started_cpu
        page = await channel.history(limit=1)
    assert page.messages, "nothing stored"
    return {
        "messages": count,
        "rate": round(count / seconds),
        "cpu_us_per_message": round(cpu / count * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run each measurement ``--runs`` times; print every run and the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--sequential-messages", type=int, default=2_000)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--uvloop", action="store_true", help="run the client on uvloop")
    arguments = parser.parse_args(argv)
    environment = {"RT_LOG_LEVEL": "WARNING", "RT_PUBLISH_RATE": "0"}
    results: dict[str, list[dict[str, Any]]] = {}

    async def measure(cluster: Cluster) -> None:
        for _ in range(arguments.runs):
            runs = {
                "receive": await receive(cluster, arguments.messages, 1),
                "receive_batches_of_100": await receive(cluster, arguments.messages, 100),
                "publish_batched": await publish(cluster, arguments.messages, "batched", 0),
                "publish_unbatched": await publish(
                    cluster, arguments.messages, "unbatched", arguments.window
                ),
                "publish_sequential": await publish(
                    cluster, arguments.sequential_messages, "sequential", 0
                ),
                "publish_sequential_interval_0": await publish(
                    cluster, arguments.sequential_messages, "sequential_interval_0", 0
                ),
            }
            print(json.dumps(runs), flush=True)
            for name, result in runs.items():
                results.setdefault(name, []).append(result)

    with running_cluster(env=environment) as cluster:
        if arguments.uvloop:
            import uvloop

            uvloop.run(measure(cluster))
        else:
            asyncio.run(measure(cluster))
    summary = {
        name: {
            "rate": statistics.median(run["rate"] for run in runs),
            "cpu_us_per_message": statistics.median(run["cpu_us_per_message"] for run in runs),
        }
        for name, runs in results.items()
    }
    print(json.dumps({"median": summary, "loop": "uvloop" if arguments.uvloop else "asyncio"}))
    return {"median": summary, "runs": results}


if __name__ == "__main__":
    main()
