"""The Python client and the real JS SDK (@foony/realtime 0.16.0) on one channel, both ways:
messages (single, batch, ephemeral), encrypted payloads and presence data, presence events,
and resume by serial. The SDK side is tests/node/python_client.mjs."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson

from realtime_client import Message, PresenceMessage, generate_random_key
from tests.client.conftest import ClientFactory, channel_name, until
from tests.interop.sdk import NODE_DIR, TESTS, require_sdk
from tests.support import APP_KEY, Cluster


class NodeScript:
    """``node python_client.mjs`` with line-based coordination over stdin/stdout."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, cluster: Cluster, *arguments: str) -> NodeScript:
        require_sdk()
        process = await asyncio.create_subprocess_exec(
            "node",
            str(NODE_DIR / "python_client.mjs"),
            *arguments,
            cwd=TESTS,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ, RT_A=cluster.a.url, RT_KEY=APP_KEY),
        )
        return cls(process)

    async def read(self, timeout: float = 20.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            assert self.process.stderr is not None
            error = await self.process.stderr.read()
            raise AssertionError(f"node exited: {error.decode(errors='replace')[-3000:]}")
        value = orjson.loads(line)
        assert isinstance(value, dict)
        return value

    async def write(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def finish(self) -> None:
        if self.process.returncode is None:
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


async def test_python_client_and_js_sdk_interoperate(
    cluster: Cluster, make_client: ClientFactory
) -> None:
    name = channel_name("interop")
    key = generate_random_key()
    python = make_client(client_id="py")
    plain = python.channels.get(name)
    secret = python.channels.get(f"{name}:enc", cipher=key)
    received: list[Message] = []
    decrypted: list[Message] = []
    presence: list[PresenceMessage] = []
    await plain.subscribe(received.append)
    await secret.subscribe(decrypted.append)
    await secret.presence.subscribe(presence.append)
    resume_channel = python.channels.get(f"{name}:resume")
    serials = [await resume_channel.publish("r", index) for index in range(5)]

    node = await NodeScript.start(cluster, name, key, str(serials[1]))
    try:
        ready = await node.read()
        assert ready["ready"]
        await plain.publish("from-py", {"n": 1})
        own_batch_serial = await plain.publish([("c", 3), ("d", 4)])
        await plain.publish("py-typing", True, ephemeral=True)
        await secret.publish("py-secret", {"pin": 7})
        await secret.presence.enter({"who": "py"})
        await node.write("published")
        seen = await node.read()

        # What the SDK received from Python: names, data, ids, clientId, decrypted payloads.
        # (then its own messages, echoed)
        assert [(m["name"], m["data"], m["clientId"]) for m in seen["received"][:4]] == [
            ("from-py", {"n": 1}, "py"),
            ("c", 3, "py"),
            ("d", 4, "py"),
            ("py-typing", True, "py"),
        ]
        assert seen["received"][3]["ephemeral"]
        assert [m["messageId"].rsplit(":", 1)[1] for m in seen["received"][1:3]] == ["0", "1"]
        assert [(m["name"], m["data"], m["encoding"]) for m in seen["decrypted"][:1]] == [
            ("py-secret", {"pin": 7}, None)
        ]
        assert ["enter", "py", {"who": "py"}] in seen["presence"]
        assert ["enter", "js", {"who": "js"}] in seen["presence"]
        # The SDK resumed from a serial of messages Python published: the three after it.
        assert [m["data"] for m in seen["replayed"]] == [2, 3, 4] and seen["resumed"] is True

        # What Python received from the SDK.
        await until(lambda: len(received) == 8 and len(decrypted) == 2, "the SDK's messages")
        assert [(m.name, m.data, m.client_id) for m in received[4:]] == [
            ("from-js", {"n": 1}, "js"),
            ("a", 1, "js"),
            ("b", 2, "js"),
            ("js-typing", True, "js"),
        ]
        assert received[7].ephemeral and received[5].message_id.endswith(":0")
        assert [(m.name, m.data, m.encoding) for m in decrypted] == [
            ("py-secret", {"pin": 7}, ""),
            ("js-secret", {"pin": 42}, ""),
        ]
        members = await secret.presence.get()
        assert sorted((m.client_id, m.data) for m in members) == [
            ("js", {"who": "js"}),
            ("py", {"who": "py"}),
        ]
        js_connection = ready["connectionId"]
        assert js_connection in {m.connection_id for m in members}

        await node.write("bye")
        assert (await node.read())["closed"]
        await until(
            lambda: any(e.action == "leave" and e.client_id == "js" for e in presence),
            "the SDK's leave",
        )
        leave = next(e for e in presence if e.action == "leave")
        assert (leave.data, leave.connection_id) == ({"who": "js"}, js_connection)
    finally:
        await node.finish()

    # Python resumes from a serial on messages the SDK published.
    late = make_client(client_id="late")
    late_channel = late.channels.get(name)
    late_channel.resume_from(own_batch_serial)
    replayed: list[Message] = []
    await late_channel.subscribe(replayed.append)
    await until(lambda: len(replayed) == 3, "the replay")
    assert [(m.name, m.data) for m in replayed] == [("from-js", {"n": 1}), ("a", 1), ("b", 2)]
