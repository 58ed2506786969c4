"""Metrics (issue 13, item 1) without NATS: the exported families match docs/METRICS.md (the
contract the dashboards and alert rules are written against), the plain-number counters and
histograms export correctly, a fan-out is counted once with its real bytes, and connections,
handshakes and publishes move the right children."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.connection import Connection
from gateway.fanout import ChannelRouter, Delivery, _Channel
from gateway.metrics import FastHistogram, Tally
from gateway.services import GatewayServices
from history_worker.metrics import WorkerMetrics, serve_metrics
from realtime_protocol import binary_codec
from realtime_protocol.errors import ErrorCode
from realtime_protocol.frames import AuthFrame, Message
from shared.auth import Keyring, parse_api_key
from shared.resume import ReplayGate
from shared.settings import Settings
from shared.subjects import SERIAL_HEADER
from testing.memory_engines import MemoryBus, MemoryPresence

KEY = "app1.main:secret-one"
DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
_ROW = re.compile(r"^\| `(realtime_[a-z_]+)` \| (\w+) \|([^|]*)\|", re.MULTILINE)


def documented(section: str) -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) of the table under ``## <section>`` in docs/METRICS.md."""
    text = DOC.read_text()
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    table = text[start : end if end > 0 else None]
    return {
        # A label is a backticked name outside the parentheses that list its values.
        name: (kind, set(re.findall(r"`([a-z_]+)`", re.sub(r"\([^)]*\)", "", labels))))
        for name, kind, labels in _ROW.findall(table)
    }


def exported(registry: CollectorRegistry) -> dict[str, tuple[str, set[str]]]:
    """name (as queried) -> (type, label names) of the ``realtime_`` families exported."""
    families: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if not family.name.startswith("realtime_") or family.name.endswith("_created"):
            continue  # (_created: when each counter began, prometheus_client's addition)
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {
            label
            for sample in family.samples
            for label in sample.labels
            if label not in ("le", "quantile")
        }
        families[name] = (family.type, labels)
    return families


def test_the_gateway_exports_exactly_the_documented_families_types_and_labels() -> None:
    assert exported(REGISTRY) == documented("Gateway")


def test_the_history_worker_exports_exactly_the_documented_families() -> None:
    assert exported(WorkerMetrics().registry) == documented("History worker")


def test_the_names_the_dashboards_use_are_all_there() -> None:
    """The names issue 13's dashboards and alert rules are built on (a rename breaks them)."""
    gateway = set(documented("Gateway"))
    assert {
        "realtime_connections",
        "realtime_connections_opened_total",
        "realtime_auth_failures_total",
        "realtime_subscriptions",
        "realtime_channels",
        "realtime_messages_published_total",
        "realtime_publish_errors_total",
        "realtime_messages_delivered_total",
        "realtime_received_bytes_total",
        "realtime_sent_bytes_total",
        "realtime_publish_ack_seconds",
        "realtime_delivery_lag_seconds",
        "realtime_dropped_deliveries_total",
        "realtime_slow_consumer_disconnects_total",
        "realtime_rate_limited_total",
        "realtime_error_frames_total",
        "realtime_nats_connected",
        "realtime_nats_reconnects_total",
        "realtime_presence_members",
        "realtime_presence_events_total",
        "realtime_history_request_seconds",
        "realtime_history_errors_total",
        "realtime_draining",
    } <= gateway
    assert set(documented("History worker")) == {
        "realtime_history_worker_requests_total",
        "realtime_history_worker_request_seconds",
        "realtime_history_worker_errors_total",
        "realtime_nats_connected",
    }


# ---- the plain-number metrics ----


def test_a_fast_histogram_exports_cumulative_inclusive_buckets() -> None:
    histogram = FastHistogram("h_seconds", "doc", (0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        histogram.observe(value)
    [family] = text_string_to_metric_families(_exposition(histogram))
    samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert samples == {
        ("h_seconds_bucket", "0.1"): 2,  # le is inclusive: 0.1 falls in the 0.1 bucket
        ("h_seconds_bucket", "1.0"): 4,
        ("h_seconds_bucket", "+Inf"): 5,
        ("h_seconds_count", None): 5,
        ("h_seconds_sum", None): pytest.approx(4.65),
    }


def test_a_tally_is_a_counter_with_total() -> None:
    tally = Tally("t_bytes", "doc")
    tally.value += 42
    [family] = text_string_to_metric_families(_exposition(tally))
    assert family.type == "counter"
    assert [(s.name, s.value) for s in family.samples] == [("t_bytes_total", 42)]


def _exposition(source: Tally | FastHistogram) -> str:
    registry = CollectorRegistry()

    class One:
        def collect(self) -> Any:
            yield source.metric()

    registry.register(One())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


# ---- the gateway's paths, in process ----


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def histogram_count(name: str) -> float:
    return value(f"{name}_count")


def services(bus: MemoryBus | None = None) -> GatewayServices:
    bus = MemoryBus() if bus is None else bus  # (an empty bus is falsy: it has a len)
    return GatewayServices(
        settings=Settings(),
        keyring=Keyring([parse_api_key(KEY)]),
        broker=bus,
        router=bus,
        history=bus,
        presence=MemoryPresence(),
    )


async def connected(gateway: GatewayServices, binary: bool = False) -> Connection:
    connection = Connection(gateway, "websocket")
    if binary:
        auth = binary_codec.frame_record(binary_codec.encode_client_frame(AuthFrame(key=KEY)))
        await connection.receive(auth, is_text=False)
    else:
        await connection.receive(orjson.dumps({"t": "auth", "key": KEY}), is_text=True)
    assert connection.is_connected
    connection.outbox.take()
    return connection


async def test_connections_are_counted_by_transport_and_protocol_until_they_end() -> None:
    gateway = services()
    json_children = {"transport": "websocket", "protocol": "json"}
    binary_children = {"transport": "websocket", "protocol": "binary"}
    before = (
        value("realtime_connections", **json_children),
        value("realtime_connections", **binary_children),
        value("realtime_connections_opened_total", transport="websocket"),
    )
    first, second = await connected(gateway), await connected(gateway, binary=True)
    assert (
        value("realtime_connections", **json_children),
        value("realtime_connections", **binary_children),
        value("realtime_connections_opened_total", transport="websocket"),
    ) == (before[0] + 1, before[1] + 1, before[2] + 2)
    await first.finish()
    await second.finish()
    await first.finish()  # a second teardown counts nothing
    assert value("realtime_connections", **json_children) == before[0]
    assert value("realtime_connections", **binary_children) == before[1]


async def test_refused_handshakes_are_counted_by_code() -> None:
    before = value("realtime_auth_failures_total", code="40101")
    connection = Connection(services(), "long-polling")
    auth = AuthFrame(key="app1.main:wrong")
    await connection.receive_body(binary_codec.frame_record(binary_codec.encode_client_frame(auth)))
    assert not connection.is_connected
    assert value("realtime_auth_failures_total", code="40101") == before + 1
    # Never counted as an open connection.
    assert value("realtime_connections", transport="long-polling", protocol="binary") >= 0


class FailingBus(MemoryBus):
    async def publish(self, app: str, message: Message) -> int:
        raise TimeoutError("NATS did not answer")


async def test_publishes_count_messages_acks_and_errors() -> None:
    connection = await connected(services())
    stored = value("realtime_messages_published_total", kind="stored")
    ephemeral = value("realtime_messages_published_total", kind="ephemeral")
    acks = histogram_count("realtime_publish_ack_seconds")
    received = value("realtime_received_bytes_total")
    batch = {
        "t": "pub",
        "id": 1,
        "channel": "c",
        "messages": [{"name": "a", "data": 1}, {"name": "b", "data": 2}, {"name": "c"}],
    }
    text = orjson.dumps(batch)
    await connection.receive(text, is_text=True)
    await connection.receive(
        orjson.dumps({"t": "pub", "id": 2, "channel": "c", "data": 1, "ephemeral": True}),
        is_text=True,
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert value("realtime_messages_published_total", kind="stored") == stored + 3
    assert value("realtime_messages_published_total", kind="ephemeral") == ephemeral + 1
    assert histogram_count("realtime_publish_ack_seconds") == acks + 2
    assert value("realtime_received_bytes_total") > received + len(text)

    failing = await connected(services(FailingBus()))
    errors = value("realtime_publish_errors_total")
    await failing.receive(orjson.dumps({"t": "pub", "id": 1, "channel": "c"}), is_text=True)
    for _ in range(5):
        await asyncio.sleep(0)
    assert value("realtime_publish_errors_total") == errors + 1
    assert histogram_count("realtime_publish_ack_seconds") == acks + 2  # no ack, no sample


class Live:
    """A live NATS message as the router gets it."""

    def __init__(self, message: Message, serial: int) -> None:
        self.subject = "rt.live.app1.c"
        self.data = binary_codec.encode_member(message)
        self.headers = {SERIAL_HEADER: str(serial)} if serial else None


async def test_a_fan_out_is_counted_once_with_the_bytes_actually_queued() -> None:
    gateway = services()
    subscribers = [
        await connected(gateway),
        await connected(gateway, binary=True),
        await connected(gateway, binary=True),
    ]
    full = await connected(gateway, binary=True)
    full.outbox.max_bytes = 10  # its queue is full: the delivery is dropped
    entry = _Channel()
    for connection in [*subscribers, full]:
        entry.add(connection)
    assert entry.json_subscribers == 1
    on_message = ChannelRouter(None)._handler(entry)  # type: ignore[arg-type]
    delivered = value("realtime_messages_delivered_total")
    sent = value("realtime_sent_bytes_total")
    dropped = value("realtime_dropped_deliveries_total")
    lags = histogram_count("realtime_delivery_lag_seconds")
    fast = value("realtime_delivery_lag_seconds_bucket", le="0.1")
    slow = value("realtime_delivery_lag_seconds_bucket", le="0.5")
    now_ms = time.time_ns() // 1_000_000
    stored = Message("c", "n", b'{"x":1}', "m1", "pub", now_ms - 250)
    await on_message(Live(stored, 7))  # type: ignore[arg-type]
    queued = sum(len(item) for c in subscribers for item in c.outbox.take())
    assert queued > 0 and not full.outbox.take()
    assert value("realtime_messages_delivered_total") == delivered + 4
    assert value("realtime_sent_bytes_total") == sent + queued
    assert value("realtime_dropped_deliveries_total") == dropped + 1
    # One lag sample for the whole fan-out, about the 250 ms since its timestamp.
    assert histogram_count("realtime_delivery_lag_seconds") == lags + 1
    assert value("realtime_delivery_lag_seconds_bucket", le="0.1") == fast
    assert value("realtime_delivery_lag_seconds_bucket", le="0.5") == slow + 1
    # An ephemeral message has no stored timestamp to measure from.
    await on_message(Live(Message("c", "e", b"1", "m2", "pub", now_ms, ephemeral=True), 0))  # type: ignore[arg-type]
    assert histogram_count("realtime_delivery_lag_seconds") == lags + 1


async def test_a_delivery_held_for_a_replay_is_counted_when_released() -> None:
    """A subscriber resuming holds live messages until its replay is out: the fan-out does
    not count what it held, the release does (and the counter never goes down)."""
    gateway = services()
    held, live = await connected(gateway), await connected(gateway)
    entry = _Channel()
    entry.add(held)
    entry.add(live)
    held._replay_gates["c"] = ReplayGate[Delivery]()
    on_message = ChannelRouter(None)._handler(entry)  # type: ignore[arg-type]
    sent = value("realtime_sent_bytes_total")
    stored = Message("c", "n", b"1", "m1", "pub", time.time_ns() // 1_000_000)
    await on_message(Live(stored, 3))  # type: ignore[arg-type]
    queued = sum(len(item) for item in live.outbox.take())
    assert not held.outbox.pending
    assert value("realtime_sent_bytes_total") == sent + queued
    for delivery in held._replay_gates.pop("c").release(2):
        held._deliver_held(delivery)
    queued += sum(len(item) for item in held.outbox.take())
    assert value("realtime_sent_bytes_total") == sent + queued


async def test_the_history_worker_serves_its_metrics_and_probes() -> None:
    metrics = WorkerMetrics()
    metrics.requests[next(iter(metrics.requests))].inc()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    connected_now = [False]
    runner = await serve_metrics(metrics, "127.0.0.1", port, lambda: connected_now[0])
    assert runner is not None
    try:

        def get(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, ""

        status, text = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        assert 'realtime_history_worker_requests_total{op="hist"} 1.0' in text
        assert "realtime_nats_connected 0.0" in text
        assert (await asyncio.to_thread(get, "/healthz"))[0] == 200
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 503
        connected_now[0] = True
        assert (await asyncio.to_thread(get, "/readyz"))[0] == 200
        # The port is taken now: a second worker goes on without metrics, never crashes.
        assert await serve_metrics(WorkerMetrics(), "127.0.0.1", port, lambda: True) is None
    finally:
        await runner.cleanup()
    assert await serve_metrics(metrics, "127.0.0.1", 0, lambda: True) is None  # 0 = off


def test_every_error_code_is_bound_up_front() -> None:
    for code in ErrorCode:
        assert (
            REGISTRY.get_sample_value("realtime_auth_failures_total", {"code": str(int(code))})
            is not None
        )
