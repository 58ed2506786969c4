"""Reference (a): the raw aiohttp WebSocket fan-out ceiling, the same server stack with no
application logic: pre-encoded 150-byte binary messages, one per WebSocket message, to every
connected socket as fast as it can. ``python -m bench.ref_aiohttp --port P``; then
``GET /blast?seconds=S`` starts a burst."""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

PAYLOAD = b"x" * 150


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    arguments = parser.parse_args()
    sockets: set[web.WebSocketResponse] = set()

    async def websocket(request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse(compress=False)
        await socket.prepare(request)
        sockets.add(socket)
        try:
            async for _ in socket:
                pass
        finally:
            sockets.discard(socket)
        return socket

    async def blast(request: web.Request) -> web.Response:
        seconds = float(request.query.get("seconds", "5"))

        async def run() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + seconds
            while loop.time() < deadline:
                for socket in list(sockets):
                    await socket.send_bytes(PAYLOAD)

        asyncio.get_running_loop().create_task(run())
        return web.Response(text="started")

    app = web.Application()
    app.router.add_get("/", websocket)
    app.router.add_get("/blast", blast)
    import uvloop

    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=arguments.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
