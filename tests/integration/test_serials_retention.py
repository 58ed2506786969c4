"""Serials survive retention (issue 10 item 7): when every message of a channel has aged
out, the next publish continues from the last serial instead of restarting at 1, so a client
holding an old cursor is never told about a different message with the same serial."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from tests.support import Cluster, JsonClient, json_client, running_cluster

MAX_AGE_S = 2.0


@pytest.fixture(scope="module")
def aging() -> Iterator[Cluster]:
    with running_cluster({"RT_RETENTION_MAX_AGE_S": str(MAX_AGE_S)}) as running:
        yield running


async def publish(client: JsonClient, channel: str, data: int) -> int:
    ack = await client.request(
        "pub", channel=channel, name="n", data=data, messageId=uuid.uuid4().hex
    )
    assert ack["t"] == "ack", ack
    return int(ack["seq"])


async def test_serials_continue_after_every_message_aged_out(aging: Cluster) -> None:
    channel = f"aging:{uuid.uuid4().hex[:8]}"
    publisher = await json_client(aging.a.url)
    assert [await publish(publisher, channel, n) for n in range(5)] == [1, 2, 3, 4, 5]
    await asyncio.sleep(MAX_AGE_S + 1.5)  # all five are gone from the stream
    history = await publisher.request("hist", channel=channel)
    assert history["t"] == "histRes" and history["messages"] == []
    # Another gateway, with nothing cached about the channel, publishes next.
    other = await json_client(aging.b.url)
    assert await publish(other, channel, 5) == 6
    assert await publish(publisher, channel, 6) == 7
    # A client whose cursor is 5 resumes cleanly onto 6 and 7 ...
    resumer = await json_client(aging.a.url)
    await resumer.send({"t": "sub", "id": 1, "channel": channel, "lastSerial": 5})
    replayed = [await resumer.receive_until("msg") for _ in range(2)]
    assert [message["seq"] for message in replayed] == [6, 7]
    ack = await resumer.receive_until("ack", id=1)
    assert ack["resumed"] is True
    # ... and one whose cursor is 3 is told that it missed messages that are gone.
    stale = await json_client(aging.b.url)
    answer = await stale.request("sub", channel=channel, lastSerial=3)
    assert answer["t"] == "ack" and answer["resumed"] is False
    for client in (publisher, other, resumer, stale):
        await client.close()
