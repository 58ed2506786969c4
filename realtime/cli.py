"""The ``realtime`` command line: ``dev``, ``gateway``, ``history-worker`` and ``keys``.

Every flag has an ``RT_*`` environment variable (see ``shared.settings``); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from realtime.keys import add_key_commands, run_keys
from shared.logs import configure_logging
from shared.settings import LOG_FORMATS, Settings

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realtime", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="NATS + one gateway + one history worker, locally")
    dev.add_argument("--port", type=int, help="gateway port (RT_PORT, default 8080)")
    dev.add_argument("--key", help="API key appSlug.keyId:secret (RT_API_KEYS)")
    dev.add_argument("--nats-port", type=int, default=4222, help="embedded NATS port")
    dev.add_argument("--data-dir", default=".realtime", help="where JetStream keeps data")

    gateway = commands.add_parser("gateway", help="run a WebSocket gateway")
    gateway.add_argument("--host", help="bind address (RT_HOST, default 127.0.0.1)")
    gateway.add_argument("--port", type=int, help="port (RT_PORT, default 8080)")
    gateway.add_argument("--nats", help="NATS URL (RT_NATS_URL)")

    worker = commands.add_parser("history-worker", help="run a history worker")
    worker.add_argument("--nats", help="NATS URL (RT_NATS_URL)")
    worker.add_argument(
        "--host", help="bind address of /metrics, /healthz, /readyz (RT_HOST, default 127.0.0.1)"
    )
    worker.add_argument(
        "--metrics-port", type=int, help="port of /metrics (RT_METRICS_PORT, default 9091, 0 = off)"
    )

    add_key_commands(commands)

    for command in (dev, gateway, worker):
        command.add_argument("--log-level", help="RT_LOG_LEVEL, default INFO")
        command.add_argument(
            "--log-format", choices=LOG_FORMATS, help="RT_LOG_FORMAT, default text"
        )
    return parser


def _run(entry: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await entry(stop)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(runner())
    else:
        uvloop.run(runner())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``realtime`` console script."""
    arguments = _parser().parse_args(argv)
    try:
        if arguments.command == "dev":
            settings = Settings.load(
                port=arguments.port,
                api_keys=arguments.key,
                log_level=arguments.log_level,
                log_format=arguments.log_format,
            )
        elif arguments.command == "gateway":
            settings = Settings.load(
                host=arguments.host,
                port=arguments.port,
                nats_url=arguments.nats,
                log_level=arguments.log_level,
                log_format=arguments.log_format,
            )
        elif arguments.command == "keys":
            settings = Settings.load(nats_url=arguments.nats)
            return asyncio.run(run_keys(arguments, settings))
        else:
            settings = Settings.load(
                nats_url=arguments.nats,
                host=arguments.host,
                metrics_port=arguments.metrics_port,
                log_level=arguments.log_level,
                log_format=arguments.log_format,
            )
        settings.keys()
    except ValueError as error:
        print(f"realtime: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)

    if arguments.command == "dev":
        from realtime.dev import run_dev

        _run(lambda stop: run_dev(settings, stop, arguments.nats_port, arguments.data_dir))
    elif arguments.command == "gateway":
        if not settings.keys() and not settings.keys_secret:
            print(
                "realtime gateway: no API key configured. Set RT_API_KEYS to a comma-separated\n"
                "list of appSlug.keyId:secret keys, RT_KEYS_FILE, or RT_KEYS_SECRET to use the\n"
                "key registry (`realtime keys create`); or use `realtime dev` for a local key.",
                file=sys.stderr,
            )
            return 2
        from gateway.main import run_gateway

        _run(lambda stop: run_gateway(settings, stop))
    else:
        from history_worker.worker import run_history_worker

        _run(lambda stop: run_history_worker(settings, stop))
    return 0
