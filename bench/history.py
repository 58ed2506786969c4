"""``hist`` latency (issue 4): a page of 100, p50/p99, with many messages stored across many
channels, for a busy channel and for quiet ones whose messages are spread over the whole
stream. Run: ``python -m bench.history [--messages 1000000] [--channels 10000]``.

The stream is filled straight through NATS (with the serial headers the gateway would set),
which is much faster than publishing through a gateway and stores the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from typing import Any

import nats
import orjson
import websockets

from realtime_protocol import binary_codec
from realtime_protocol.frames import AuthFrame, HistoryFrame, Message
from shared import subjects
from shared.subjects import SERIAL_HEADER
from testing.cluster import APP_KEY, running_cluster

__all__ = ["main"]

APP = APP_KEY.split(".", 1)[0]


async def fill(url: str, messages: int, channels: int, busy_share: float) -> dict[str, int]:
    """Store ``messages`` messages: ``busy_share`` of them on channel ``busy``, the rest
    round-robin over ``quiet:<n>`` channels, interleaved at random."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    serials: dict[str, int] = {}
    rng = random.Random(1)
    data = orjson.dumps({"text": "x" * 100})
    pending: list[asyncio.Future[Any]] = []
    started = time.perf_counter()
    for index in range(messages):
        channel = "busy" if rng.random() < busy_share else f"quiet:{index % channels}"
        serial = serials[channel] = serials.get(channel, 0) + 1
        message = Message(channel, "n", data, f"fill-{index}", "filler", 1_700_000_000_000 + index)
        pending.append(
            await js.publish_async(
                subjects.stored_subject(APP, channel),
                binary_codec.encode_member(message),
                headers={SERIAL_HEADER: str(serial), "Nats-Msg-Id": f"fill-{index}"},
            )
        )
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    print(f"filled {messages} messages in {time.perf_counter() - started:.1f}s", flush=True)
    await nc.close()
    return serials


async def measure(
    url: str, channels: list[str], serials: dict[str, int], queries: int
) -> dict[str, Any]:
    """Sequential ``hist`` requests of 100 through a gateway; latency percentiles in ms."""
    rng = random.Random(2)
    latencies: list[float] = []
    slowest: list[tuple[float, str, int, int]] = []
    async with websockets.connect(url, compression=None) as socket:
        await socket.send(
            binary_codec.frame_record(binary_codec.encode_client_frame(AuthFrame(key=APP_KEY)))
        )
        await socket.recv()
        for request_id in range(1, queries + 1):
            channel = rng.choice(channels)
            newest = serials[channel]
            # Half the pages are the newest, half start at a random older point.
            before = 0 if request_id % 2 else rng.randint(2, newest + 1)
            frame = HistoryFrame(request_id, channel, 100, before)
            started = time.perf_counter()
            await socket.send(binary_codec.frame_record(binary_codec.encode_client_frame(frame)))
            reply = await socket.recv()
            latencies.append((time.perf_counter() - started) * 1000)
            slowest.append((latencies[-1], channel, before, newest))
            assert isinstance(reply, bytes)
            record = next(binary_codec.iter_records(reply))
            assert record[0] == binary_codec.Opcode.HIST_RES, record[:40]
    latencies.sort()
    return {
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "queries": queries,
        "slowest": [(round(ms, 1), c, b, n) for ms, c, b, n in sorted(slowest)[-4:]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fill, then measure; print and return the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=10_000)
    parser.add_argument("--busy-share", type=float, default=0.1)
    parser.add_argument("--queries", type=int, default=400)
    arguments = parser.parse_args(argv)
    environment = {"RT_LOG_LEVEL": "WARNING", "RT_RETENTION_MAX_PER_CHANNEL": "-1"}
    with running_cluster(environment) as cluster:
        serials = asyncio.run(
            fill(cluster.nats.url, arguments.messages, arguments.channels, arguments.busy_share)
        )
        quiet = [name for name in serials if name != "busy"]
        results = {
            "messages": arguments.messages,
            "channels": len(serials),
            "busy_channel_messages": serials["busy"],
            "busy": asyncio.run(measure(cluster.a.url, ["busy"], serials, arguments.queries)),
            "quiet": asyncio.run(measure(cluster.a.url, quiet, serials, arguments.queries)),
        }
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
