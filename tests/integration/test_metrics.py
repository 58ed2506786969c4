"""Metrics of real processes (issue 13, item 1): a gateway and a history worker scraped after
real traffic over NATS (the in-process checks are in tests/unit/test_metrics.py)."""

from __future__ import annotations

import asyncio
import urllib.request
import uuid

from realtime_client import Realtime
from tests.support import APP_KEY, Cluster, Service, metric_value


def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics page: ``name{labels}`` -> value."""
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, number = line.rpartition(" ")
            samples[series] = float(number)
    return samples


def worker_metrics(worker: Service) -> dict[str, float]:
    return scrape(f"http://127.0.0.1:{worker.port}/metrics")


async def test_a_gateway_and_a_worker_count_real_traffic(cluster: Cluster) -> None:
    channel = f"metrics:{uuid.uuid4().hex[:8]}"
    gateway = cluster.a
    before = {
        name: metric_value(gateway, name)
        for name in (
            "realtime_messages_delivered_total",
            "realtime_messages_published_total",
            "realtime_publish_ack_seconds_count",
            "realtime_delivery_lag_seconds_count",
            "realtime_history_request_seconds_count",
            "realtime_sent_bytes_total",
            "realtime_received_bytes_total",
        )
    }
    hist_before = worker_metrics(cluster.worker).get(
        'realtime_history_worker_requests_total{op="hist"}', 0.0
    )
    # Real traffic from the Python client (binary protocol, as the SDKs speak it).
    subscribers = [Realtime(key=APP_KEY, endpoint=gateway.url) for _ in range(3)]
    publisher = Realtime(key=APP_KEY, endpoint=gateway.url)
    streams = [await subscriber.channels.get(channel).stream() for subscriber in subscribers]
    assert metric_value(gateway, "realtime_subscriptions") >= 3
    assert metric_value(gateway, "realtime_channels") >= 1
    for index in range(2):  # awaited one by one: two stored records
        assert await publisher.channels.get(channel).publish("n", index) > 0
    for stream in streams:
        assert [(await stream.get(timeout=5)).data for _ in range(2)] == [0, 1]
    assert [m.data for m in (await publisher.channels.get(channel).history()).messages] == [0, 1]

    after = {name: metric_value(gateway, name) for name in before}
    grew = {name: after[name] - before[name] for name in before}
    # (At least: the cluster is shared, other tests' traffic may land in between.)
    assert grew["realtime_messages_delivered_total"] >= 3 * 2
    assert grew["realtime_messages_published_total"] >= 2
    assert grew["realtime_publish_ack_seconds_count"] >= 2
    # One lag sample per message fanned out, not one per subscriber.
    assert 2 <= grew["realtime_delivery_lag_seconds_count"] < 3 * 2
    assert after["realtime_history_request_seconds_count"] >= (
        before["realtime_history_request_seconds_count"] + 1
    )
    assert after["realtime_sent_bytes_total"] > before["realtime_sent_bytes_total"]
    assert after["realtime_received_bytes_total"] > before["realtime_received_bytes_total"]
    assert metric_value(gateway, "realtime_nats_connected") == 1
    assert metric_value(gateway, "realtime_draining") == 0
    worker = worker_metrics(cluster.worker)
    assert worker['realtime_history_worker_requests_total{op="hist"}'] >= hist_before + 1
    assert worker["realtime_history_worker_request_seconds_count"] >= 1
    assert worker["realtime_nats_connected"] == 1
    await asyncio.gather(*(client.close() for client in [*subscribers, publisher]))
