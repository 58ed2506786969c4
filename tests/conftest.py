"""Session fixtures: one real cluster (nats-server, two gateways, a history worker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import Cluster, running_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """NATS + gateways A and B + one history worker, shared by the integration tests."""
    with running_cluster() as running:
        yield running
