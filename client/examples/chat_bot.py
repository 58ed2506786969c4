"""A presence-aware chat bot on the Realtime Python client.

It enters the room's presence as ``chat-bot``, welcomes everyone who enters, says goodbye to
everyone who leaves, and answers two commands published as ``chat`` messages:

- ``!who``: the names of the members present now;
- ``!echo <text>``: the text back.

Against ``make dev`` (in another terminal)::

    .venv/bin/python client/examples/chat_bot.py --room chat:lobby

then talk to it from any client on ``chat:lobby``. Ctrl-C (or SIGTERM) leaves and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from realtime_client import Message, PresenceMessage, Realtime

BOT_NAME = "chat-bot"


async def answer(client: Realtime, room: str, message: Message) -> str | None:
    """The bot's reply to ``message``, or ``None`` when it has nothing to say."""
    text = message.data.get("text", "") if isinstance(message.data, dict) else ""
    if text == "!who":
        members = await client.channels.get(room).presence.get()
        return "here: " + ", ".join(sorted({member.client_id for member in members}))
    if text.startswith("!echo "):
        return text.removeprefix("!echo ")
    return None


async def run(endpoint: str, key: str, room: str, stop: asyncio.Event) -> None:
    """Serve ``room`` until ``stop`` is set, then leave and close."""
    async with Realtime(endpoint=endpoint, key=key, client_id=BOT_NAME) as client:
        channel = client.channels.get(room)
        replies: asyncio.Queue[str] = asyncio.Queue(maxsize=100)

        def greet(event: PresenceMessage) -> None:
            if event.client_id == BOT_NAME:
                return
            verb = "welcome" if event.action == "enter" else "goodbye"
            with contextlib.suppress(asyncio.QueueFull):  # a flood of joins is not answered
                replies.put_nowait(f"{verb}, {event.client_id}")

        await channel.presence.subscribe(greet, "enter")
        await channel.presence.subscribe(greet, "leave")
        await channel.presence.enter({"bot": True})

        async def publish_replies() -> None:
            while True:
                await channel.publish("chat", {"text": await replies.get(), "from": BOT_NAME})

        async def read_commands() -> None:
            # The stream's bounded queue keeps a slow bot from holding unbounded memory.
            async with await channel.stream("chat") as messages:
                async for message in messages:
                    if message.client_id == BOT_NAME:
                        continue
                    reply = await answer(client, room, message)
                    if reply is not None:
                        await replies.put(reply)

        workers = [asyncio.create_task(publish_replies()), asyncio.create_task(read_commands())]
        print(f"{BOT_NAME} is in {room} as connection {client.connection_id}", flush=True)
        await stop.wait()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        await channel.presence.leave()


def main() -> None:
    """Parse the command line and run the bot until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", default="ws://127.0.0.1:8080")
    parser.add_argument("--key", default="dev.root:dev-secret")
    parser.add_argument("--room", default="chat:lobby")
    arguments = parser.parse_args()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stop.set)
        await run(arguments.endpoint, arguments.key, arguments.room, stop)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
