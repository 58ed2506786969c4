"""Load-generating clients for the benchmarks: each runs in its own process so that the
client side is not the bottleneck, speaks the binary protocol with pre-encoded frames, and
reports counts and latencies back over a multiprocessing queue."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import websockets

from realtime_protocol import binary_codec
from realtime_protocol.frames import AuthFrame, PublishFrame

__all__ = ["PublisherSpec", "run_processes"]

_ACK = binary_codec.Opcode.ACK
_ERR = binary_codec.Opcode.ERR


@dataclass(frozen=True)
class PublisherSpec:
    """One publishing process: where, what and for how long."""

    url: str
    key: str
    channels: tuple[str, ...]
    seconds: float
    window: int = 64
    payload_bytes: int = 150
    name: str = "p"


def _record(frame: Any) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(frame))


async def _publish(spec: PublisherSpec, start_at: float) -> dict[str, Any]:
    async with websockets.connect(spec.url, compression=None, max_queue=None) as socket:
        await socket.send(_record(AuthFrame(key=spec.key, client_id=f"{spec.name}-{os.getpid()}")))
        await socket.recv()
        data = b'"' + b"x" * (spec.payload_bytes - 2) + b'"'
        in_flight = asyncio.Semaphore(spec.window)
        acked = 0
        errors = 0
        max_serial = 0
        stop = False

        async def reader() -> None:
            nonlocal acked, errors, max_serial
            async for message in socket:
                assert isinstance(message, bytes)
                for record in binary_codec.iter_records(message):
                    if record[0] == _ACK:
                        frame = binary_codec.decode_server_record(record)
                        acked += 1
                        max_serial = max(max_serial, getattr(frame, "seq", 0))
                        in_flight.release()
                    elif record[0] == _ERR:
                        errors += 1
                        in_flight.release()
                if stop and acked + errors >= sent:
                    return

        await asyncio.sleep(max(0.0, start_at - time.time()))
        task = asyncio.create_task(reader())
        sent = 0
        started = time.perf_counter()
        deadline = started + spec.seconds
        prefix = f"{spec.name}{os.getpid()}-"
        channels = spec.channels
        while time.perf_counter() < deadline:
            await in_flight.acquire()
            sent += 1
            channel = channels[sent % len(channels)] if len(channels) > 1 else channels[0]
            await socket.send(
                _record(PublishFrame(sent, channel, "n", data, "", f"{prefix}{sent}"))
            )
        stop = True
        await asyncio.wait_for(task, 30)
        elapsed = time.perf_counter() - started
        return {"acked": acked, "errors": errors, "seconds": elapsed, "max_serial": max_serial}


def _publisher_main(spec: PublisherSpec, start_at: float, results: Any) -> None:
    try:
        import uvloop

        results.put(uvloop.run(_publish(spec, start_at)))
    except Exception as error:  # report, so the parent does not wait forever
        results.put({"error": repr(error)})


def run_processes(specs: list[PublisherSpec], warmup: float = 1.0) -> list[dict[str, Any]]:
    """Run one process per spec, all starting at the same instant; return their reports."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + warmup + 0.5 * len(specs)
    processes = [
        context.Process(target=_publisher_main, args=(spec, start_at, results)) for spec in specs
    ]
    for process in processes:
        process.start()
    reports = [results.get(timeout=120 + spec.seconds) for spec in specs]
    for process in processes:
        process.join(10)
    failures = [report["error"] for report in reports if "error" in report]
    if failures:
        raise RuntimeError(f"load generator failed: {failures}")
    return reports


def shuffled(values: list[str], seed: int = 7) -> tuple[str, ...]:
    """A reproducible shuffle."""
    copy = list(values)
    random.Random(seed).shuffle(copy)
    return tuple(copy)
