"""Fan-out scenarios and their references (issue 6).

Subscribers live in separate processes (``bench.wsclient``, thousands of connections each),
the publisher in another; the parent only samples counters and CPU times.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

from bench.cpu import cpu_seconds
from bench.wsclient import Counter, connect_many
from realtime_protocol import binary_codec
from realtime_protocol.frames import AuthFrame, PublishFrame, SubscribeFrame

__all__ = [
    "LoadProcesses",
    "PublisherProcess",
    "SubscriberSpec",
    "measure_rate",
    "percentile",
    "settle",
]

PAYLOAD_BYTES = 150
NATS_SUBJECT = "bench.fanout"


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` percentile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def _record(frame: Any) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(frame))


@dataclass(frozen=True)
class SubscriberSpec:
    """``count`` connections of one process; connection i takes channels[(offset+i) % len]."""

    host: str
    port: int
    count: int
    channels: tuple[str, ...] = ("bench",)
    offset: int = 0
    mode: str = "realtime"
    key: str = ""
    samples: int = 0


def _opening(spec: SubscriberSpec, index: int) -> list[bytes]:
    if spec.mode == "raw":
        return []
    if spec.mode == "nats":
        return [f'CONNECT {{"verbose":false}}\r\nSUB {NATS_SUBJECT} 1\r\nPING\r\n'.encode()]
    channel = spec.channels[(spec.offset + index) % len(spec.channels)]
    return [_record(AuthFrame(key=spec.key)) + _record(SubscribeFrame(1, channel))]


def _subscriber_main(
    spec: SubscriberSpec, slot: int, counts: Any, ready: Any, stop: Any, latencies: Any
) -> None:
    import uvloop

    async def run() -> None:
        counter = Counter()
        if spec.mode == "longpoll":
            await _run_longpoll(spec, slot, counts, ready, stop, latencies, counter)
            return
        clients = await connect_many(
            spec.host,
            spec.port,
            spec.count,
            lambda i: _opening(spec, i),
            counter,
            samples=spec.samples,
            mode=spec.mode,
        )
        ready.release()
        # Keep-alive like the SDKs: gateways drop connections that stay silent.
        ping = b"\x01\x0a"
        last_ping = time.monotonic()
        while not stop.is_set():
            counts[slot] = counter.deliveries
            await asyncio.sleep(0.05)
            if spec.mode == "realtime" and time.monotonic() - last_ping > 10:
                last_ping = time.monotonic()
                for client in clients:
                    if client.transport is not None and not client.transport.is_closing():
                        client.send(ping)
        counts[slot] = counter.deliveries
        latencies.put(counter.latencies_ms)
        for client in clients:
            if client.transport is not None:
                client.transport.abort()

    uvloop.run(run())


async def _run_longpoll(
    spec: SubscriberSpec,
    slot: int,
    counts: Any,
    ready: Any,
    stop: Any,
    latencies: Any,
    counter: Counter,
) -> None:
    """The long-poll twin of the WebSocket subscribers above (``bench.lpclient``)."""
    from bench.lpclient import run_longpoll_clients

    async def publish_counts() -> None:
        while not stop.is_set():
            counts[slot] = counter.deliveries
            await asyncio.sleep(0.05)

    reporter = asyncio.create_task(publish_counts())
    await run_longpoll_clients(
        spec.host,
        spec.port,
        spec.count,
        lambda index: spec.channels[(spec.offset + index) % len(spec.channels)],
        spec.key,
        counter,
        spec.samples,
        ready.release,
        stop.is_set,
    )
    reporter.cancel()
    counts[slot] = counter.deliveries
    latencies.put(counter.latencies_ms)


class LoadProcesses:
    """Subscriber processes with shared delivery counters."""

    def __init__(self, specs: list[SubscriberSpec]) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.counts = self.context.Array("q", len(specs))
        self.ready = self.context.Semaphore(0)
        self.stop = self.context.Event()
        self.latency_queue = self.context.Queue()
        self.processes = [
            self.context.Process(
                target=_subscriber_main,
                args=(spec, slot, self.counts, self.ready, self.stop, self.latency_queue),
                daemon=True,
            )
            for slot, spec in enumerate(specs)
        ]

    def __enter__(self) -> LoadProcesses:
        for process in self.processes:
            process.start()
        for _ in self.processes:
            if not self.ready.acquire(timeout=300):
                raise TimeoutError("subscribers did not connect")
        return self

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the subscriber processes, by name."""
        return {f"clients_{n}": p.pid or 0 for n, p in enumerate(self.processes)}

    def delivered(self) -> int:
        """Deliveries counted so far by every subscriber process."""
        return int(sum(self.counts[:]))

    def finish(self) -> list[float]:
        """Stop the subscribers; return the latencies the sampled connections saw (ms)."""
        self.stop.set()
        latencies: list[float] = []
        for _ in self.processes:
            latencies += self.latency_queue.get(timeout=60)
        return latencies

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


def _payload(filler: int) -> bytes:
    return b'{"sent":' + str(time.time_ns()).encode() + b',"pad":"' + b"x" * filler + b'"}'


def _filler(payload_bytes: int = PAYLOAD_BYTES) -> int:
    return max(0, payload_bytes - len(_payload(0)))


async def _publish_realtime(
    url: str,
    key: str,
    channels: tuple[str, ...],
    rate: float,
    seconds: float,
    payload_bytes: int = PAYLOAD_BYTES,
) -> int:
    import websockets

    filler = _filler(payload_bytes)
    sent = 0
    async with websockets.connect(url, compression=None, max_queue=None) as socket:
        await socket.send(_record(AuthFrame(key=key, client_id=f"pub-{os.getpid()}")))
        await socket.recv()
        window = asyncio.Semaphore(256)

        async def reader() -> None:
            async for message in socket:
                assert isinstance(message, bytes)
                for _ in binary_codec.iter_records(message):
                    window.release()

        task = asyncio.create_task(reader())
        started = time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            if rate > 0:
                due = int(elapsed * rate) + 1
                if sent >= due:
                    await asyncio.sleep(min(0.002, (sent - due + 1) / rate))
                    continue
            await window.acquire()
            sent += 1
            channel = channels[sent % len(channels)]
            await socket.send(
                _record(
                    PublishFrame(sent, channel, "n", _payload(filler), "", f"m{os.getpid()}-{sent}")
                )
            )
        task.cancel()
    return sent


async def _publish_nats(url: str, rate: float, seconds: float) -> int:
    import nats
    import nats.errors

    nc = await nats.connect(url)
    filler = _filler()
    sent = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        if rate > 0 and sent >= int(elapsed * rate) + 1:
            await asyncio.sleep(0.001)
            continue
        await nc.publish(NATS_SUBJECT, _payload(filler))
        sent += 1
        if sent % 256 == 0:
            # An overloaded server answers flushes late; keep publishing regardless.
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await nc.flush(timeout=5)
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await nc.flush(timeout=5)
    await nc.close()
    return sent


def _publisher_main(
    kind: str,
    target: str,
    key: str,
    channels: tuple[str, ...],
    rate: float,
    seconds: float,
    result: Any,
    payload_bytes: int = PAYLOAD_BYTES,
) -> None:
    import uvloop

    if kind == "nats":
        result.put(uvloop.run(_publish_nats(target, rate, seconds)))
    else:
        result.put(
            uvloop.run(_publish_realtime(target, key, channels, rate, seconds, payload_bytes))
        )


class PublisherProcess:
    """One publishing process (through a gateway, or core NATS for the reference)."""

    def __init__(
        self,
        kind: str,
        target: str,
        key: str = "",
        channels: tuple[str, ...] = ("bench",),
        rate: float = 0.0,
        seconds: float = 5.0,
        payload_bytes: int = PAYLOAD_BYTES,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.result = context.Queue()
        self.process = context.Process(
            target=_publisher_main,
            args=(kind, target, key, channels, rate, seconds, self.result, payload_bytes),
            daemon=True,
        )

    def __enter__(self) -> PublisherProcess:
        self.process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()


def measure_rate(load: LoadProcesses, pids: dict[str, int], seconds: float) -> dict[str, Any]:
    """Deliveries per second and CPU seconds of ``pids`` over a window of ``seconds``."""
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    delivered_before = load.delivered()
    started = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - started
    delivered = load.delivered() - delivered_before
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
    return {
        "deliveries": delivered,
        "rate": delivered / elapsed,
        "cpu_seconds": cpu,
        "seconds": elapsed,
    }


def summarize_latency(latencies: list[float]) -> dict[str, float]:
    """p50/p99 in ms, rounded."""
    if not latencies:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "samples": 0}
    return {
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "samples": len(latencies),
    }


def settle(pids: dict[str, int], timeout: float = 30.0) -> None:
    """Wait until the processes are idle (a previous overload has drained)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(0.5)
        if all(cpu_seconds(pid) - before[name] < 0.05 for name, pid in pids.items()):
            return
