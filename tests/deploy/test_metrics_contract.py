"""The metric list of tests/deploy/manifests.py (what the alert rules, the Grafana dashboard
and the autoscaler may query) against what real processes export: a nats-server, a gateway and
a history worker started as in production (``realtime gateway``, ``realtime history-worker``
with ``RT_METRICS_PORT``), one publish and one history query through the gateway's REST API,
then both ``/metrics`` scraped. Every family the files query must be declared by the service
that the files query it from; the HTTP paths the probes use must answer 200."""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testing.cluster import (
    APP_KEY,
    NatsServer,
    Service,
    free_port,
    http_status,
    start_nats,
    start_service,
    wait_for_history_worker,
    wait_for_port,
    wait_ready,
)
from tests.deploy.manifests import (
    GATEWAY_METRICS,
    PROMETHEUS_OWN,
    SERVED_PATHS,
    WORKER_METRICS,
    alert_rules,
    dashboard,
    dashboard_queries,
    promql_metric_names,
    sample_names,
)

BASIC = "Basic " + base64.b64encode(APP_KEY.encode()).decode()
CHANNEL = "deploy%3Ametrics"


@dataclass
class Running:
    """The processes under test and the ports their HTTP is on."""

    nats: NatsServer
    gateway: Service
    worker: Service
    worker_metrics_port: int


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    """nats-server, a gateway and a history worker, after one publish and one history read."""
    nats = start_nats()
    services: list[Service] = []
    try:
        metrics_port = free_port()
        worker = start_service("history-worker", nats.url, port=metrics_port)
        services.append(worker)
        gateway = start_service("gateway", nats.url)
        services.append(gateway)
        wait_ready(gateway.port)
        wait_for_history_worker(nats.url)
        wait_for_port(metrics_port)
        published = _request(
            "POST",
            f"{gateway.http}/channels/{CHANNEL}/messages",
            {"name": "probe", "data": {"n": 1}},
        )
        assert published["serial"] >= 1, published
        history = _request("GET", f"{gateway.http}/channels/{CHANNEL}/messages?limit=10")
        assert isinstance(history, list) and history, history
        yield Running(nats, gateway, worker, metrics_port)
    finally:
        for service in services:
            service.stop()
        nats.stop()


def _request(method: str, url: str, body: object = None) -> Any:
    """One REST call with the test key; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", BASIC)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _exported(url: str) -> set[str]:
    """The sample names a ``/metrics`` endpoint declares: every family (with or without
    samples yet) by its type, so a histogram gives ``_bucket``, ``_sum`` and ``_count``."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        # The parser names a counter family without its ``_total``.
        name = f"{family.name}_total" if family.type == "counter" else family.name
        names |= sample_names(name, family.type)
        names |= {sample.name for sample in family.samples}
    return names


def _queried() -> set[str]:
    """Every metric name the alert rules and the dashboard query."""
    names: set[str] = set()
    for rule in alert_rules():
        names |= promql_metric_names(rule["expr"])
    for query in dashboard_queries(dashboard()):
        names |= promql_metric_names(query)
    return names - PROMETHEUS_OWN


def test_gateway_exports_its_listed_metrics(running: Running) -> None:
    exported = _exported(f"{running.gateway.http}/metrics")
    for family, kind in GATEWAY_METRICS.items():
        missing = sample_names(family, kind) - exported
        assert not missing, f"the gateway does not export {sorted(missing)}"


def test_history_worker_exports_its_listed_metrics(running: Running) -> None:
    exported = _exported(f"http://127.0.0.1:{running.worker_metrics_port}/metrics")
    for family, kind in WORKER_METRICS.items():
        missing = sample_names(family, kind) - exported
        assert not missing, f"the history worker does not export {sorted(missing)}"


def test_every_queried_metric_is_exported(running: Running) -> None:
    exported = _exported(f"{running.gateway.http}/metrics") | _exported(
        f"http://127.0.0.1:{running.worker_metrics_port}/metrics"
    )
    missing = _queried() - exported
    assert not missing, f"queried by alerts or the dashboard, exported by nobody: {sorted(missing)}"


def test_the_served_paths_answer(running: Running) -> None:
    """Every path a probe or a scrape may use (manifests.SERVED_PATHS) answers 200."""
    ports = {"gateway": running.gateway.port, "history-worker": running.worker_metrics_port}
    for role, paths in SERVED_PATHS.items():
        for path in sorted(paths):
            status = http_status(f"http://127.0.0.1:{ports[role]}{path}")
            assert status == 200, f"{role} {path}: {status}"
