"""The fault suite's harness (issue 14, docs/GUARANTEES.md): a 3-node NATS cluster with the
stream and buckets at 3 replicas, two gateways and two history workers given every node's
URL, and a storm of SDK-like clients (``tests.faults.clients``) recorded in a ``History``
while a fault is injected. ``Storm.run`` returns the checker's ``Report`` plus what the
clients went through; the test asserts on it and prints one row of the fault table.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import nats
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from realtime_protocol import binary_codec
from shared import subjects
from testing.cluster import Service, http_status, start_service, wait_for_history_worker
from testing.history_checker import History, Report, check, presence_view
from testing.nats_cluster import NatsCluster, running_nats_cluster
from testing.netns import NamespaceNetwork
from tests.faults.clients import (
    ClientStats,
    PresenceMember,
    PresenceWatcher,
    Publisher,
    Subscriber,
    now,
)

__all__ = ["GATEWAY_ENV", "LONG", "STREAM", "FaultCluster", "Outcome", "Storm", "fault_cluster"]

APP = "app1"
STREAM = "RT_MESSAGES"
# RT_FAULTS_LONG=1 (make test-faults): longer storms, more clients, faults held longer.
LONG = os.environ.get("RT_FAULTS_LONG") == "1"

# How often the storm moves a subscriber to the other gateway.
HOP_EVERY_S = 0.5

GATEWAY_ENV = {
    "RT_STREAM_REPLICAS": "3",
    "RT_PUBLISH_RATE": "0",  # the storm measures the service, not the per-connection limit
    "RT_MAX_CONNECTIONS_PER_ADDRESS": "0",
    "RT_PRESENCE_TTL_S": "6",
    "RT_PRESENCE_GRACE_S": "2",
    "RT_LOG_LEVEL": "WARNING",
}


def _ready(service: Service) -> bool:
    with contextlib.suppress(OSError):
        return http_status(f"{service.http}/readyz") == 200
    return False


@dataclass
class FaultCluster:
    """The NATS cluster and the services on it; the faults act on these."""

    nats: NatsCluster
    gateways: list[Service] = field(default_factory=list)
    workers: list[Service] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        """The gateways' WebSocket URLs."""
        return [gateway.url for gateway in self.gateways]

    def start_gateway(self, port: int = 0) -> Service:
        """Start a gateway (on ``port`` when given: a restart keeps its address)."""
        gateway = start_service("gateway", self.nats.urls, port=port, env=self.env)
        return gateway

    def wait_ready(self, service: Service, timeout: float = 30.0) -> None:
        """Block until ``service`` answers /readyz 200."""
        deadline = time.monotonic() + timeout
        while not _ready(service):
            if time.monotonic() > deadline or service.process.poll() is not None:
                raise TimeoutError(f"gateway not ready:\n{service.log()[-3000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every service (the NATS cluster is stopped by its own context)."""
        for service in [*self.gateways, *self.workers]:
            service.stop(kill=True)


@contextlib.contextmanager
def fault_cluster(
    network: NamespaceNetwork | None = None, env: dict[str, str] | None = None
) -> Iterator[FaultCluster]:
    """3 NATS nodes (in ``network``'s namespaces when given), 2 gateways, 2 workers."""
    with running_nats_cluster(network=network) as nats_cluster:
        cluster = FaultCluster(nats_cluster, env={**GATEWAY_ENV, **(env or {})})
        try:
            cluster.gateways = [cluster.start_gateway() for _ in range(2)]
            cluster.workers = [
                start_service("history-worker", nats_cluster.urls, env=cluster.env)
                for _ in range(2)
            ]
            for gateway in cluster.gateways:
                cluster.wait_ready(gateway)
            wait_for_history_worker(nats_cluster.urls)
            yield cluster
        finally:
            cluster.stop()


@dataclass
class Outcome:
    """One fault's result: the checker's report and the clients' experience."""

    fault: str
    report: Report
    publish_errors: dict[int, int]
    redelivered: int
    resumes: int
    resumed_false: int
    reconnects: int
    duration_s: float

    def row(self) -> str:
        """The fault table's row (docs/GUARANTEES.md)."""
        report = self.report
        errors = ", ".join(f"{code}: {n}" for code, n in sorted(self.publish_errors.items()))
        return (
            f"| {self.fault} | {report.acked} | {report.lost} | {report.duplicated} | "
            f"{report.reordered} | {report.disruption_s:.2f} s | {self.resumes} "
            f"({self.resumed_false} false) | {self.redelivered} | {errors or '-'} |"
        )


def _merge(stats: list[ClientStats]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for one in stats:
        for code, count in one.errors.items():
            merged[code] = merged.get(code, 0) + count
    return merged


async def read_stored(nats_urls: str, channel: str) -> list[tuple[int, str]]:
    """A channel's whole history as the stream's leader holds it (an ephemeral consumer,
    not the service's own read path): (serial, messageId) pairs in stream order. Retried
    from scratch for up to 30 s: just after a fault the JetStream API may not answer."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await _read_stored_once(nats_urls, channel)
        except (nats.js.errors.ServiceUnavailableError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _read_stored_once(nats_urls: str, channel: str) -> list[tuple[int, str]]:
    client = await nats.connect(servers=nats_urls.split(","), connect_timeout=5)
    try:
        js = client.jetstream(timeout=10)
        subscription = await js.pull_subscribe(
            subjects.stored_subject(APP, channel),
            stream=STREAM,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, mem_storage=True
            ),
        )
        # Read up to the channel's newest message as the leader has it (its serial, from the
        # JetStream API, which only the leader answers): a consumer's num_pending, read
        # right after a cluster restart, once undercounted and cut the read short.
        try:
            last = await js.get_last_msg(STREAM, subjects.stored_subject(APP, channel))
            newest = int((last.headers or {}).get(subjects.SERIAL_HEADER, 0))
        except nats.js.errors.NotFoundError:
            newest = 0
        stored: list[tuple[int, str]] = []
        while newest and (not stored or stored[-1][0] < newest):
            for msg in await subscription.fetch(1000, timeout=5):
                serial = int((msg.headers or {}).get(subjects.SERIAL_HEADER, 0))
                stored.append((serial, binary_codec.decode_member(msg.data).message_id))
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        return stored
    finally:
        await client.close()


class Storm:
    """Publishers, subscribers and presence clients on both gateways, with a fault in the
    middle. Sizes grow with ``LONG``."""

    def __init__(
        self,
        cluster: FaultCluster,
        publishers: int = 4,
        subscribers: int = 4,
        channels: int = 2,
        members: int = 4,
        rate: float = 0.0,
    ) -> None:
        self.cluster = cluster
        self.history = History()
        tag = uuid.uuid4().hex[:6]
        self.channels = [f"storm-{tag}-{index}" for index in range(channels)]
        self.presence_channel = f"room-{tag}"
        urls = cluster.urls
        rate = rate or (150.0 if LONG else 100.0)
        self.publishers = [
            Publisher(f"pub{i}-{tag}", urls, self.history, self.channels, rate, start=i)
            for i in range(publishers)
        ]
        self.subscribers = [
            Subscriber(f"sub{i}-{tag}", urls, self.history, self.channels, start=i)
            for i in range(subscribers)
        ]
        self.members = [
            PresenceMember(f"member{i}-{tag}", urls, self.history, self.presence_channel, i)
            for i in range(members)
        ]
        self.watchers = [
            PresenceWatcher(f"watcher{i}-{tag}", urls, self.history, self.presence_channel, i)
            for i in range(2)
        ]

    async def run(
        self,
        name: str,
        fault: Callable[[], Awaitable[None]],
        before_s: float = 2.0,
        after_s: float = 0.0,
        settle_s: float = 60.0,
    ) -> Outcome:
        """Start the clients, wait ``before_s``, inject ``fault`` (it returns when the fault
        is over), storm on for ``after_s``, then stop publishing, let everything settle and
        check."""
        after_s = after_s or (10.0 if LONG else 3.0)
        started = time.monotonic()
        stop_publishing = asyncio.Event()
        give_up = asyncio.Event()
        stop_following = asyncio.Event()
        tasks = [
            *(asyncio.create_task(s.run(stop_following)) for s in self.subscribers),
            *(asyncio.create_task(m.run(stop_following)) for m in self.members),
            *(asyncio.create_task(w.run(stop_following)) for w in self.watchers),
        ]
        await _wait_all([s.subscribed for s in self.subscribers], 20, "subscribers")
        await _wait_all([w.watching for w in self.watchers], 20, "presence watchers")
        await _wait_all([m.entered for m in self.members], 20, "presence members")
        storm_start = now()
        publishing = [asyncio.create_task(p.run(stop_publishing, give_up)) for p in self.publishers]
        hopping = asyncio.create_task(self._hop(stop_publishing))
        await asyncio.sleep(before_s)
        await fault()
        await asyncio.sleep(after_s)
        storm_end = now()
        stop_publishing.set()
        await hopping
        try:
            await _wait_all([p.drained for p in self.publishers], settle_s, "publishers to drain")
        finally:
            give_up.set()
            await asyncio.gather(*publishing, return_exceptions=True)
        for channel in self.channels:
            self.history.stored(channel, await read_stored(self.cluster.nats.urls, channel))
        await self._settle(settle_s)
        stop_following.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        report = check(self.history, storm_start, storm_end)
        everyone: list[ClientStats] = [
            c.stats for c in [*self.publishers, *self.subscribers, *self.members, *self.watchers]
        ]
        followers = [s.stats for s in self.subscribers]
        return Outcome(
            fault=name,
            report=report,
            publish_errors=_merge([p.stats for p in self.publishers]),
            redelivered=sum(s.redelivered for s in followers),
            resumes=sum(s.resumes for s in followers),
            resumed_false=sum(s.resumed_false for s in followers),
            reconnects=sum(s.connects for s in everyone) - len(everyone),
            duration_s=time.monotonic() - started,
        )

    async def _hop(self, stop: asyncio.Event) -> None:
        """Move one subscriber at a time to the other gateway (it resumes there by serial)
        every ``HOP_EVERY_S`` while the storm lasts: resumes happen before, during and
        after the fault."""
        for subscriber in itertools.cycle(self.subscribers):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HOP_EVERY_S)
            if stop.is_set():
                return
            await subscriber.hop()

    async def _settle(self, timeout: float) -> None:
        """Wait until every subscriber has each channel's newest serial and every watcher
        sees the true membership (or ``timeout``: the checker then reports what is off)."""
        newest = {c: max((s for s, _ in self.history.history[c]), default=0) for c in self.channels}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            caught_up = all(
                subscriber.newest(channel) >= newest[channel]
                for subscriber in self.subscribers
                for channel in self.channels
            )
            truth = self._presence_truth()
            views_right = all(
                _view(self.history, w.name, self.presence_channel) == truth for w in self.watchers
            )
            if caught_up and views_right and all(m.entered.is_set() for m in self.members):
                break
            await asyncio.sleep(0.2)
        self.history.presence_truth(self.presence_channel, self._presence_truth())

    def _presence_truth(self) -> set[tuple[str, str]]:
        return {(m.name, m.connection_id) for m in self.members if m.entered.is_set()}


def _view(history: History, watcher: str, channel: str) -> set[tuple[str, str]]:
    return presence_view(history.presence.get((watcher, channel), []))


async def _wait_all(events: list[asyncio.Event], timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout)
    except TimeoutError:
        missing = sum(not e.is_set() for e in events)
        raise AssertionError(f"{missing} of {len(events)} {what} not done in {timeout} s") from None
