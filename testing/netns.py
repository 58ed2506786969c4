"""A private network of Linux network namespaces for the partition fault (issue 14).

Layout (one /24 of 10.213.0.0/16 per test process, so two runs on one machine never share
addresses or names)::

    root namespace (test, gateways, workers)  10.213.X.254
        | veth
    hub namespace: bridge ---- veth ---- node namespace 1  10.213.X.1  (nats-server n1)
                          ---- veth ---- node namespace 2  10.213.X.2  (nats-server n2)
                          ---- veth ---- node namespace 3  10.213.X.3  (nats-server n3)

Every node is on one L2 segment with the root namespace, so each node reaches the others
(routes) and the gateways reach every node. Nothing is routed anywhere else: no addresses
outside 10.213.X.0/24, no forwarding, no NAT, so the traffic stays inside these namespaces
(and loopback). ``isolate`` drops every packet that enters or leaves a node's namespace
except on its loopback (iptables in that namespace only; the host's tables are untouched):
a silent partition, where TCP connections hang rather than reset, as when a switch dies.
``heal`` removes the rules; established connections carry on from where they stalled.

Needs root (or CAP_NET_ADMIN) and the ``ip`` and ``iptables`` commands: ``unavailable``
says why when they are missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

__all__ = ["NamespaceNetwork", "namespace_network", "unavailable"]


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=20)


def unavailable() -> str | None:
    """Why namespaces cannot be built here, or None when they can (checked by making one)."""
    if shutil.which("ip") is None or shutil.which("iptables") is None:
        return "the ip and iptables commands are missing"
    name = f"rtprobe{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as error:
        stderr = getattr(error, "stderr", b"") or b""
        return f"ip netns add failed (root or CAP_NET_ADMIN needed): {stderr.decode().strip()}"
    try:
        _run("ip", "netns", "exec", name, "iptables", "-L", "-n")
    except (subprocess.CalledProcessError, OSError) as error:
        stderr = getattr(error, "stderr", b"") or b""
        return f"iptables does not work in a namespace: {stderr.decode().strip()}"
    finally:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _run("ip", "netns", "del", name)
    return None


class NamespaceNetwork:
    """The namespaces, bridge and veth pairs of one run (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.subnet = 1 + os.getpid() % 250
        self.tag = f"rt{self.subnet}"
        self.hub = f"{self.tag}hub"
        self._isolated: set[int] = set()

    def namespace(self, index: int) -> str:
        """The namespace of node ``index`` (1-based)."""
        return f"{self.tag}n{index}"

    def address(self, index: int) -> str:
        """The address of node ``index`` (1-based)."""
        return f"10.213.{self.subnet}.{index}"

    @property
    def root_address(self) -> str:
        """The root namespace's address on the segment."""
        return f"10.213.{self.subnet}.254"

    def build(self) -> None:
        """Create everything (after removing leftovers of a crashed run with our names)."""
        self.destroy()
        _run("ip", "netns", "add", self.hub)
        hub = ("ip", "netns", "exec", self.hub)
        _run(*hub, "ip", "link", "add", "br0", "type", "bridge")
        _run(*hub, "ip", "link", "set", "br0", "up")
        _run(*hub, "ip", "link", "set", "lo", "up")
        for index in range(1, self.size + 1):
            namespace = self.namespace(index)
            outer, inner = f"{self.tag}n{index}a", f"{self.tag}n{index}b"
            _run("ip", "netns", "add", namespace)
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", outer, "netns", self.hub)
            _run("ip", "link", "set", inner, "netns", namespace)
            _run(*hub, "ip", "link", "set", outer, "master", "br0")
            _run(*hub, "ip", "link", "set", outer, "up")
            node = ("ip", "netns", "exec", namespace)
            _run(*node, "ip", "addr", "add", f"{self.address(index)}/24", "dev", inner)
            _run(*node, "ip", "link", "set", inner, "up")
            _run(*node, "ip", "link", "set", "lo", "up")
        root, hub_side = f"{self.tag}ra", f"{self.tag}rb"
        _run("ip", "link", "add", root, "type", "veth", "peer", "name", hub_side)
        _run("ip", "link", "set", hub_side, "netns", self.hub)
        _run(*hub, "ip", "link", "set", hub_side, "master", "br0")
        _run(*hub, "ip", "link", "set", hub_side, "up")
        _run("ip", "addr", "add", f"{self.root_address}/24", "dev", root)
        _run("ip", "link", "set", root, "up")

    def isolate(self, index: int) -> None:
        """Drop everything into and out of node ``index`` but its loopback."""
        node = ("ip", "netns", "exec", self.namespace(index), "iptables")
        _run(*node, "-A", "INPUT", "!", "-i", "lo", "-j", "DROP")
        _run(*node, "-A", "OUTPUT", "!", "-o", "lo", "-j", "DROP")
        self._isolated.add(index)

    def heal(self, index: int) -> None:
        """Let node ``index`` talk again."""
        _run("ip", "netns", "exec", self.namespace(index), "iptables", "-F")
        self._isolated.discard(index)

    def command(self, index: int) -> list[str]:
        """The prefix that runs a command inside node ``index``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(index)]

    def destroy(self) -> None:
        """Remove the namespaces (their veth ends go with them) and the root veth."""
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            _run("ip", "link", "del", f"{self.tag}ra")
        for name in [self.hub, *(self.namespace(i) for i in range(1, self.size + 1))]:
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                _run("ip", "netns", "del", name)


@contextlib.contextmanager
def namespace_network(size: int = 3) -> Iterator[NamespaceNetwork]:
    """A built network of ``size`` node namespaces, destroyed on exit."""
    network = NamespaceNetwork(size)
    try:
        network.build()
        yield network
    finally:
        network.destroy()
