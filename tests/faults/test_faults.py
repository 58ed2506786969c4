"""Faults under a publish storm on a 3-node NATS cluster (issue 14, docs/GUARANTEES.md).

Each test injects one fault while SDK-like clients publish, follow and watch presence on
two gateways, then checks the whole history (``testing.history_checker``): no acked
publish lost, none stored twice, serials contiguous from 1, each publisher's messages stored
in the order sent, deliveries in serial order with none missing for a subscriber that
resumed, and every presence watcher's view equal to the true membership. The short
versions run in ``make test``; ``make test-faults`` (RT_FAULTS_LONG=1) runs longer storms
with the faults held longer. Each test prints its row of the fault table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator

import pytest
import websockets

from testing.cluster import http_status, start_service, wait_for_history_worker
from testing.nats_cluster import NatsNode, running_nats_cluster
from testing.netns import namespace_network, unavailable
from tests.faults.clients import Subscriber, now
from tests.faults.harness import (
    GATEWAY_ENV,
    LONG,
    STREAM,
    FaultCluster,
    Outcome,
    Storm,
    fault_cluster,
)
from tests.interop.sdk import NODE_DIR, require_sdk
from tests.support import APP_KEY, json_client

pytestmark = pytest.mark.timeout(600 if LONG else 240)

# How long a killed node stays down, and a paused or partitioned one stays stalled.
DOWN_S = 10.0 if LONG else 4.0
STALL_S = 10.0  # the "long GC pause" and partition, in both versions
# How long the whole NATS cluster is unreachable mid-run.
OUTAGE_S = 30.0 if LONG else 10.0
# SDK clients (real @foony/realtime, one node process) among the killed gateway's clients.
SDK_CROWD = 100 if LONG else 40


@pytest.fixture
def cluster() -> Iterator[FaultCluster]:
    """A fresh cluster per fault: a fault leaves nothing behind for the next."""
    with fault_cluster() as running:
        yield running


def assert_kept_promises(outcome: Outcome) -> None:
    """Print the fault table's row, then require a clean report."""
    print(f"\n{outcome.row()}  ({outcome.duration_s:.0f} s)")
    report = outcome.report
    assert report.acked > 100, f"the storm did not get going: {report.summary()}"
    assert report.ok, report.summary()


async def in_thread(function: object, *arguments: object) -> object:
    """Run a blocking process operation without stalling the clients' event loop."""
    assert callable(function)
    return await asyncio.to_thread(function, *arguments)


def gateway_node(cluster: FaultCluster) -> NatsNode:
    """The node most gateway connections use."""
    counts = {
        node.name: sum(name == "realtime-gateway" for name in node.client_names())
        for node in cluster.nats.nodes
        if node.running
    }
    return cluster.nats.node(max(counts, key=lambda name: counts[name]))


async def kill_and_restart(node: NatsNode) -> None:
    """SIGKILL ``node``, leave it down for ``DOWN_S``, restart it on the same store."""
    await in_thread(node.kill)
    await asyncio.sleep(DOWN_S)
    await in_thread(node.start)


async def test_sigkill_of_the_stream_leader(cluster: FaultCluster) -> None:
    storm = Storm(cluster)

    async def fault() -> None:
        leader = await in_thread(cluster.nats.stream_leader, STREAM)
        assert isinstance(leader, NatsNode)
        await kill_and_restart(leader)

    assert_kept_promises(await storm.run("SIGKILL stream leader", fault))


async def test_sigkill_of_a_follower(cluster: FaultCluster) -> None:
    storm = Storm(cluster)

    async def fault() -> None:
        leader = await in_thread(cluster.nats.stream_leader, STREAM)
        follower = next(node for node in cluster.nats.nodes if node is not leader)
        await kill_and_restart(follower)

    assert_kept_promises(await storm.run("SIGKILL follower", fault))


async def test_sigkill_of_the_node_the_gateways_use(cluster: FaultCluster) -> None:
    storm = Storm(cluster)

    async def fault() -> None:
        node = await in_thread(gateway_node, cluster)
        assert isinstance(node, NatsNode)
        await kill_and_restart(node)

    assert_kept_promises(await storm.run("SIGKILL gateways' node", fault))


async def test_sigstop_of_the_stream_leader_for_ten_seconds(cluster: FaultCluster) -> None:
    storm = Storm(cluster)

    async def fault() -> None:
        leader = await in_thread(cluster.nats.stream_leader, STREAM)
        assert isinstance(leader, NatsNode)
        leader.pause()
        try:
            await asyncio.sleep(STALL_S)
        finally:
            leader.resume()

    assert_kept_promises(await storm.run("SIGSTOP stream leader 10 s", fault))


async def test_rolling_restart_of_all_three_nodes(cluster: FaultCluster) -> None:
    storm = Storm(cluster)

    async def fault() -> None:
        for node in cluster.nats.nodes:
            await in_thread(node.stop)  # SIGTERM: a planned restart
            await asyncio.sleep(1.0)
            await in_thread(node.start)
            await asyncio.sleep(3.0 if LONG else 2.0)  # let it catch up before the next

    assert_kept_promises(await storm.run("rolling restart", fault))


async def test_partition_isolating_the_stream_leader() -> None:
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be built here: {reason}")
    with namespace_network() as network, fault_cluster(network=network) as cluster:
        storm = Storm(cluster)

        async def fault() -> None:
            leader = await in_thread(cluster.nats.stream_leader, STREAM)
            assert isinstance(leader, NatsNode)
            index = cluster.nats.nodes.index(leader) + 1
            await in_thread(network.isolate, index)
            try:
                await asyncio.sleep(STALL_S)
            finally:
                await in_thread(network.heal, index)

        assert_kept_promises(await storm.run("partition of stream leader 10 s", fault))


async def test_sigkill_of_a_gateway_with_hundreds_of_clients(cluster: FaultCluster) -> None:
    """Every client of the killed gateway comes back and resumes: the Python crowd on the
    other gateway, the SDK crowd on the same address once the gateway is back."""
    require_sdk()
    storm = Storm(cluster)
    crowd_channel = storm.channels[0]
    crowd = [
        Subscriber(f"crowd{i}", cluster.urls, storm.history, [crowd_channel], start=0)
        for i in range(500 if LONG else 200)
    ]
    stop_crowd = asyncio.Event()
    crowd_tasks = [asyncio.create_task(c.run(stop_crowd)) for c in crowd]
    await asyncio.wait_for(asyncio.gather(*(c.subscribed.wait() for c in crowd)), 60)
    # The real SDK too: its clients reconnect to the same address (the gateway comes back
    # on its port, as behind a load balancer) and resume by serial by themselves.
    sdk = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "crowd.mjs"),
        cwd=NODE_DIR.parent,
        env={
            **os.environ,
            "RT_URL": cluster.urls[0],
            "RT_KEY": APP_KEY,
            "RT_CHANNEL": crowd_channel,
            "RT_COUNT": str(SDK_CROWD),
        },
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert sdk.stdin is not None and sdk.stdout is not None
    ready = await asyncio.wait_for(sdk.stdout.readline(), 60)
    assert ready.strip() == b"ready", ready
    victim = cluster.gateways[0]
    recovered_after: list[float] = []

    async def fault() -> None:
        killed_at = now()
        for client in crowd:
            client.subscribed.clear()
        await in_thread(victim.stop, True)  # SIGKILL
        await asyncio.wait_for(asyncio.gather(*(c.subscribed.wait() for c in crowd)), 30)
        recovered_after.append(now() - killed_at)
        # Back on its port for the rest of the storm (clients that move there still work).
        cluster.gateways[0] = cluster.start_gateway(victim.port)
        await in_thread(cluster.wait_ready, cluster.gateways[0])

    try:
        outcome = await storm.run(f"SIGKILL gateway ({len(crowd)} + {SDK_CROWD} SDK)", fault)
    finally:
        stop_crowd.set()
        for task in crowd_tasks:
            task.cancel()
        await asyncio.gather(*crowd_tasks, return_exceptions=True)
        sdk.stdin.write(b"stop\n")
        await sdk.stdin.drain()
        output, _ = await asyncio.wait_for(sdk.communicate(), 30)
    sdk_clients = json.loads(output.decode().strip().splitlines()[-1])
    newest = max(serial for serial, _ in storm.history.history[crowd_channel])
    for record in sdk_clients:
        serials = record["serials"]
        assert serials == list(range(serials[0], newest + 1)), (
            f"an SDK client missed or repeated serials: {record['states']}"
        )
        assert record["state"] == "connected"
        reattached = [s for s in record["states"] if s["current"] == "attached"][1:]
        assert reattached and all(s["resumed"] for s in reattached), record["states"]
    print(f"\n{len(crowd)} clients of the killed gateway resumed in {recovered_after[0]:.2f} s")
    assert recovered_after[0] < 15
    resumed_flags = [
        s.resumed for c in crowd for s in storm.history.subscriptions[(c.name, crowd_channel)][1:]
    ]
    assert resumed_flags and all(flag is True for flag in resumed_flags)
    assert_kept_promises(outcome)


async def test_sigkill_of_a_history_worker_mid_request(cluster: FaultCluster) -> None:
    """Requests in flight on the killed worker fail with 50000 within the request timeout
    (never hang); the surviving worker answers everything after."""
    storm = Storm(cluster)
    outcomes: list[tuple[float, str]] = []  # (answered at, "ok" | error code)
    stop_reading = asyncio.Event()

    async def reader(index: int) -> None:
        client = await json_client(cluster.urls[index % 2])
        channel = storm.channels[index % len(storm.channels)]
        try:
            while not stop_reading.is_set():
                started = now()
                answer = await client.request("hist", channel=channel, limit=100)
                assert now() - started < 5, "a history request hung"
                outcomes.append(
                    (now(), "ok" if answer["t"] == "histRes" else str(answer.get("code")))
                )
        finally:
            await client.close()

    killed_at: list[float] = []

    async def fault() -> None:
        readers = [asyncio.create_task(reader(i)) for i in range(8)]
        await asyncio.sleep(1.0)
        killed_at.append(now())
        await in_thread(cluster.workers[0].stop, True)
        await asyncio.sleep(4.0)
        stop_reading.set()
        await asyncio.gather(*readers)

    outcome = await storm.run("SIGKILL history worker", fault)
    errors = {code for _, code in outcomes if code != "ok"}
    assert errors <= {"50000"}, errors
    before = [o for o in outcomes if o[0] < killed_at[0]]
    late = [o for o in outcomes if o[0] > killed_at[0] + 2.5]  # request timeout + margin
    assert before and late
    assert all(code == "ok" for _, code in late), "the surviving worker answers everything"
    print(f"\nhistory reads: {len(outcomes)}, failed {sum(c != 'ok' for _, c in outcomes)}")
    assert_kept_promises(outcome)


async def test_nats_unreachable_at_start_then_up() -> None:
    """A gateway started before NATS is not ready, refuses connections with 50001 and
    becomes ready by itself when NATS comes up."""
    with running_nats_cluster(start=False) as nats_cluster:
        cluster = FaultCluster(nats_cluster, env=dict(GATEWAY_ENV))
        gateway = cluster.start_gateway()
        cluster.gateways.append(gateway)
        try:
            await asyncio.sleep(2.0)
            assert http_status(f"{gateway.http}/readyz") == 503
            async with websockets.connect(gateway.url) as socket:
                await socket.send('{"t":"auth","key":"app1.main:secret-one"}')
                refused = await asyncio.wait_for(socket.recv(), 5)
            assert '"code":50001' in str(refused), refused
            await in_thread(nats_cluster.start_all)
            cluster.workers.append(
                start_service("history-worker", nats_cluster.urls, env=cluster.env)
            )
            await in_thread(cluster.wait_ready, gateway, 60.0)
            await in_thread(wait_for_history_worker, nats_cluster.urls)
            client = await json_client(gateway.url)
            ack = await client.request("pub", channel="after-start", name="n", data=1)
            assert ack["t"] == "ack" and ack["seq"] == 1
            await client.close()
            assert "Traceback" not in gateway.log()
        finally:
            cluster.stop()


async def test_nats_unreachable_mid_run(cluster: FaultCluster) -> None:
    """All three nodes stopped for OUTAGE_S under the storm: gateways go unready, answer
    50001/50000 instead of hanging, and recover by themselves; nothing acked is lost."""
    storm = Storm(cluster)
    readiness: list[int] = []
    refusals: list[str] = []

    async def fault() -> None:
        for node in cluster.nats.nodes:
            await in_thread(node.stop)
        deadline = time.monotonic() + OUTAGE_S
        while time.monotonic() < deadline:
            status = await in_thread(http_status, f"{cluster.gateways[0].http}/readyz")
            assert isinstance(status, int)
            readiness.append(status)
            with contextlib.suppress(Exception):
                async with websockets.connect(cluster.urls[1], open_timeout=2) as socket:
                    await socket.send('{"t":"auth","key":"app1.main:secret-one"}')
                    refusals.append(str(await asyncio.wait_for(socket.recv(), 5)))
            await asyncio.sleep(1.0)
        await in_thread(cluster.nats.start_all)

    outcome = await storm.run(f"NATS unreachable {OUTAGE_S:.0f} s", fault, settle_s=90)
    assert 503 in readiness, "readiness must turn false while NATS is unreachable"
    assert any('"code":50001' in text for text in refusals), refusals[:3]
    for gateway in cluster.gateways:
        assert http_status(f"{gateway.http}/readyz") == 200
    assert_kept_promises(outcome)
