"""Long-poll load generation: hundreds of HTTP long-poll clients per process (aiohttp),
each with the SDK's shape: one connect, one poll always outstanding, pings on the send lane.

Counts delivered message records (and, for a sample of clients, decodes them to measure
latency from the publisher's timestamp), like ``bench.wsclient`` does for WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import aiohttp

from bench.wsclient import MARKER, Counter
from realtime_protocol import binary_codec
from realtime_protocol.frames import AuthFrame, PingFrame, SubscribeFrame

__all__ = ["run_longpoll_clients"]

_HEADER = "foony-lp-session"
_MESSAGE_OPCODES = {binary_codec.Opcode.MSG, binary_codec.Opcode.BATCH}
_PING_EVERY_S = 10.0


def _record(frame: object) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(frame))  # type: ignore[arg-type]


class _LongPollClient:
    def __init__(self, http: aiohttp.ClientSession, base: str, counter: Counter, sample: bool):
        self.http = http
        self.base = base
        self.counter = counter
        self.sample = sample
        self.token = ""

    async def connect(self, key: str, channel: str) -> None:
        async with self.http.post(f"{self.base}/lp/connect", data=_record(AuthFrame(key=key))) as r:
            await r.read()
            self.token = r.headers[_HEADER]
        async with self.http.post(
            f"{self.base}/lp/send",
            data=_record(SubscribeFrame(1, channel)),
            headers={_HEADER: self.token},
        ) as response:
            await response.read()
        # The ack arrives on the first poll.
        await self.poll_once()

    async def poll_once(self) -> None:
        async with self.http.post(f"{self.base}/lp/poll", headers={_HEADER: self.token}) as r:
            body = await r.read()
            if r.status != 200:
                raise RuntimeError(f"poll answered {r.status}")
        if not body:
            return
        counter = self.counter
        if not self.sample:
            counter.deliveries += body.count(MARKER)  # at C speed, as bench.wsclient does
            return
        for record in binary_codec.iter_records(body):
            if record[0] in _MESSAGE_OPCODES:
                counter.deliveries += 1
                frame = binary_codec.decode_server_record(record)
                message = getattr(frame, "message", None)
                if message is not None and message.data and message.data.startswith(MARKER):
                    sent = int(message.data[len(MARKER) :].split(b",", 1)[0])
                    counter.latencies_ms.append((time.time_ns() - sent) / 1e6)

    async def poll_forever(self, stop: Callable[[], bool]) -> None:
        while not stop():
            await self.poll_once()

    async def ping_forever(self, stop: Callable[[], bool]) -> None:
        while not stop():
            await asyncio.sleep(_PING_EVERY_S)
            async with self.http.post(
                f"{self.base}/lp/send", data=_record(PingFrame()), headers={_HEADER: self.token}
            ) as response:
                await response.read()


async def run_longpoll_clients(
    host: str,
    port: int,
    count: int,
    channel_of: Callable[[int], str],
    key: str,
    counter: Counter,
    samples: int,
    ready: Callable[[], None],
    stop: Callable[[], bool],
) -> None:
    """Connect ``count`` long-poll clients, call ``ready``, poll until ``stop()``."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=40)
    ) as http:
        base = f"http://{host}:{port}"
        clients = [_LongPollClient(http, base, counter, index < samples) for index in range(count)]
        gate = asyncio.Semaphore(100)  # connect in waves: no accept-queue storm

        async def connect(index: int) -> None:
            async with gate:
                await clients[index].connect(key, channel_of(index))

        await asyncio.gather(*(connect(index) for index in range(count)))
        tasks = [asyncio.create_task(client.poll_forever(stop)) for client in clients]
        tasks += [asyncio.create_task(client.ping_forever(stop)) for client in clients]
        ready()
        # ``stop`` reads a multiprocessing event: there is nothing to await on this loop.
        while not stop():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
