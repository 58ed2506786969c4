"""client/examples/chat_bot.py, run as a program against the cluster and talked to."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from realtime_client import Message, PresenceMessage
from tests.client.conftest import ClientFactory, channel_name, until
from tests.support import APP_KEY, Cluster

BOT = Path(__file__).resolve().parents[2] / "client" / "examples" / "chat_bot.py"


async def test_chat_bot_greets_answers_and_leaves(
    cluster: Cluster, make_client: ClientFactory
) -> None:
    room = channel_name("chat")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BOT),
        "--endpoint",
        cluster.b.url,
        "--key",
        APP_KEY,
        "--room",
        room,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        started = await asyncio.wait_for(process.stdout.readline(), 20)
        assert b"chat-bot is in" in started
        alice = make_client(client_id="alice")
        channel = alice.channels.get(room)
        said: list[Message] = []
        events: list[PresenceMessage] = []
        await channel.subscribe(lambda m: said.append(m) if m.client_id == "chat-bot" else None)
        await channel.presence.subscribe(events.append)
        await channel.presence.enter()
        await until(lambda: [m.data["text"] for m in said] == ["welcome, alice"], "welcome")
        await channel.publish("chat", {"text": "!who"})
        await channel.publish("chat", {"text": "!echo hi there"})
        await until(lambda: len(said) == 3, "two answers")
        assert [m.data["text"] for m in said[1:]] == ["here: alice, chat-bot", "hi there"]
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        await until(
            lambda: any(e.action == "leave" and e.client_id == "chat-bot" for e in events),
            "the bot's leave",
        )
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
