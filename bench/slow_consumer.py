"""Slow consumers (issue 14, item 5): do subscribers that stop reading, on a channel being
flooded, hurt a quiet subscriber on the same gateway?

One gateway. A quiet subscriber (its own process) receives a paced stream on its channel
(``--rate`` messages/s, each payload carrying its send time, so every delivery is a latency
sample) for ``--seconds``, three times:

1. alone;
2. while a publisher floods a hot channel nobody subscribes to, as fast as its 256-publish
   window allows (the control: what the flood's own publishing costs the gateway);
3. while the same flood goes to ``--stalled`` subscribers of the hot channel that have
   stopped reading (raw sockets with a tiny receive buffer that never read after their
   ``sub`` ack).

The gateway runs with ``RT_PUBLISH_RATE=0`` so one connection can flood (the default 100/s
per connection would stop it first; ``bench.neighbours`` measures that limit).

Reported: the quiet subscriber's p50/p99 in each phase, the gateway's RSS and CPU, the
flood's rate, what the gateway did to the stalled subscribers while it lasted (live messages
dropped, slow-consumer closes, still connected?) and, after ``--linger`` more seconds
without reading (default 35: long enough for the gateway's silence timeout, 2 x 15 s + 10
s after their last frame), how each stalled socket ended when finally read: the close frame
and its code, a reset, or still open. A benchmark, not a test: nothing passes or fails.

Run: ``python -m bench.slow_consumer [--seconds 10] [--rate 200] [--stalled 50]
[--linger 35]``; prints a Markdown table and writes ``bench/results/slow_consumer.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import struct
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.cpu import cpu_seconds
from bench.fanout import LoadProcesses, PublisherProcess, SubscriberSpec, settle, summarize_latency
from realtime_protocol import binary_codec
from realtime_protocol.frames import AuthFrame, SubscribeFrame
from shared.websocket_frames import OPCODE_BINARY, parse_header
from testing.cluster import APP_KEY, Service, start_nats, start_service, wait_ready
from testing.raw_websocket import RawWebSocket

__all__ = ["StalledSubscriber", "main"]

RESULTS = Path(__file__).resolve().parent / "results"
# The flood gets this long to back the stalled subscribers up before the quiet stream starts.
_FLOOD_WARMUP_S = 2.0
_RECEIVE_BUFFER = 4096  # the smallest the kernel honours is about this: stalls fast
_CLOSE = 0x8


def _record(frame: Any) -> bytes:
    return binary_codec.frame_record(binary_codec.encode_client_frame(frame))


class StalledSubscriber:
    """A blocking raw WebSocket that authenticates, subscribes to ``channel``, reads the
    answers, then never reads again until ``finish``."""

    def __init__(self, port: int, channel: str, index: int) -> None:
        self.raw = RawWebSocket(port, receive_buffer=_RECEIVE_BUFFER, timeout=10)
        self.sock = self.raw.sock
        opening = _record(AuthFrame(key=APP_KEY, client_id=f"stalled-{index}"))
        opening += _record(SubscribeFrame(1, channel))
        self.sock.sendall(RawWebSocket.frame(opening, OPCODE_BINARY))
        replies = 0
        while replies < 2:  # connected, then the sub's ack (one message or two)
            opcode, payload = self.raw.receive_frame()
            if opcode == OPCODE_BINARY:
                replies += sum(1 for _ in binary_codec.iter_records(payload))
        self.buffer = b""

    def finish(self, seconds: float) -> str:
        """Read at last, for at most ``seconds``: how the connection ended (``close <code>``,
        ``reset``, ``EOF without a close frame``) or ``still open``, and the MiB read."""
        deadline = time.monotonic() + seconds
        # A gap this long with nothing to read: the gateway sends nothing more for now.
        self.sock.settimeout(2.0)
        received = len(self.buffer)
        outcome = "still open"
        try:
            while time.monotonic() < deadline:
                try:
                    chunk = self.sock.recv(1 << 20)
                except TimeoutError:
                    break  # nothing more is coming: the gateway kept it open
                if not chunk:
                    outcome = "EOF without a close frame"
                    break
                received += len(chunk)
                self.buffer += chunk
                code = self._close_code()
                if code is not None:
                    outcome = f"close {code}"
                    break
        except ConnectionResetError:
            outcome = "reset"
        finally:
            self.sock.close()
        return f"{outcome} after {received / 2**20:.0f} MiB read"

    def _close_code(self) -> int | None:
        """Skip the whole frames buffered so far; the code of a close frame among them."""
        offset = 0
        while (parsed := parse_header(self.buffer, offset)) is not None:
            opcode, start, end = parsed
            if end > len(self.buffer):
                break
            if opcode == _CLOSE:
                payload = self.buffer[start:end]
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            offset = end
        self.buffer = self.buffer[offset:]
        return None


def _metrics(gateway: Service) -> dict[str, float]:
    """The gateway's counters this benchmark reads (families summed over their labels)."""
    names = (
        "realtime_connections",
        "realtime_dropped_deliveries_total",
        "realtime_slow_consumer_disconnects_total",
        "realtime_messages_delivered_total",
        "realtime_messages_published_total",
    )
    with urllib.request.urlopen(f"{gateway.http}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


def _rss_mib(gateway: Service) -> float:
    for line in Path(f"/proc/{gateway.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _quiet_phase(
    gateway: Service, rate: float, seconds: float, label: str, peak: list[float]
) -> dict[str, Any]:
    """The quiet subscriber's latency over ``seconds`` of the paced stream; ``peak`` gets
    the gateway's RSS sampled meanwhile."""
    quiet = f"quiet:{time.time_ns()}"
    spec = SubscriberSpec("127.0.0.1", gateway.port, 1, (quiet,), 0, "realtime", APP_KEY, 1)
    pid = gateway.process.pid
    with LoadProcesses([spec]) as load:
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        with PublisherProcess("realtime", gateway.url, APP_KEY, (quiet,), rate, seconds) as paced:
            while paced.process.is_alive():
                peak.append(_rss_mib(gateway))
                paced.process.join(0.25)
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu_before
        latencies = load.finish()
    # The first tenth is warm-up (connections, the first fan-out through a cold path).
    return {
        "phase": label,
        **summarize_latency(latencies[len(latencies) // 10 :]),
        "gateway_cpu_share": round(cpu / elapsed, 2),
    }


def _flooded_phase(
    gateway: Service, rate: float, seconds: float, stalled: list[StalledSubscriber], hot: str
) -> dict[str, Any]:
    """``_quiet_phase`` while a publisher floods ``hot`` (which ``stalled`` subscribe to, if
    any); adds the flood's rate, what the gateway did meanwhile and its RSS."""
    before = _metrics(gateway)
    rss_before = _rss_mib(gateway)
    peak: list[float] = []
    # The quiet phase also spawns its two processes (a second or two): the flood outlasts it.
    flood_seconds = _FLOOD_WARMUP_S + seconds + 5
    label = (
        f"flood, {len(stalled)} stalled subscribers on it"
        if stalled
        else "flood, nobody subscribed to it (control)"
    )
    with PublisherProcess("realtime", gateway.url, APP_KEY, (hot,), 0.0, flood_seconds) as flood:
        time.sleep(_FLOOD_WARMUP_S)
        phase = _quiet_phase(gateway, rate, seconds, label, peak)
        sent = flood.result.get(timeout=60)
    time.sleep(1.0)  # the quiet clients and the flooder have gone: only the stalled remain
    after = _metrics(gateway)
    delta = {name: after[name] - before[name] for name in after}
    phase.update(
        flood_published_per_s=round(sent / flood_seconds),
        flood_stored_per_s=round(delta["realtime_messages_published_total"] / flood_seconds),
        dropped_deliveries=int(delta["realtime_dropped_deliveries_total"]),
        slow_consumer_closes=int(delta["realtime_slow_consumer_disconnects_total"]),
        connections_after=int(after["realtime_connections"]),
        rss_mib=(rss_before, max(peak, default=float("nan")), _rss_mib(gateway)),
    )
    print(phase, flush=True)
    return phase


def _finish_all(stalled: list[StalledSubscriber]) -> dict[str, int]:
    """Read every stalled socket at once (one thread each: reading them one after another
    would let the last ones reach the silence timeout meanwhile); how many ended each way
    (with the MiB each read, rounded)."""
    with ThreadPoolExecutor(max_workers=max(1, len(stalled))) as pool:
        endings = pool.map(lambda subscriber: subscriber.finish(15.0), stalled)
        return dict(collections.Counter(endings))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the phases on a fresh gateway; print a Markdown table; return the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=200.0, help="quiet messages per second")
    parser.add_argument("--stalled", type=int, default=50, help="subscribers that stop reading")
    parser.add_argument(
        "--linger", type=float, default=35.0, help="seconds the stalled stay unread afterwards"
    )
    arguments = parser.parse_args(argv)
    seconds, rate = arguments.seconds, arguments.rate
    nats_server = start_nats()
    gateway = start_service(
        "gateway", nats_server.url, env={"RT_LOG_LEVEL": "WARNING", "RT_PUBLISH_RATE": "0"}
    )
    try:
        wait_ready(gateway.port)
        pids = {"gateway": gateway.process.pid, "nats": nats_server.pid}
        settle(pids)
        rss_start = _rss_mib(gateway)
        peak: list[float] = []
        alone = _quiet_phase(gateway, rate, seconds, "alone", peak)
        alone["rss_mib"] = (rss_start, max(peak, default=float("nan")), _rss_mib(gateway))
        print(alone, flush=True)
        settle(pids)
        control = _flooded_phase(gateway, rate, seconds, [], f"hot:{time.time_ns()}")
        settle(pids)
        hot = f"hot:{time.time_ns()}"
        stalled = [
            StalledSubscriber(gateway.port, hot, index) for index in range(arguments.stalled)
        ]
        flooded = _flooded_phase(gateway, rate, seconds, stalled, hot)
        time.sleep(arguments.linger)
        lingered = _metrics(gateway)
        rss_after_linger = _rss_mib(gateway)
        endings = _finish_all(stalled)
        time.sleep(1.0)
        rss_end = _rss_mib(gateway)
    finally:
        gateway.stop()
        nats_server.stop()
    results: dict[str, Any] = {
        "seconds": seconds,
        "quiet_rate": rate,
        "stalled": arguments.stalled,
        "phases": [alone, control, flooded],
        "linger_s": arguments.linger,
        "stalled_connected_after_linger": int(lingered["realtime_connections"]),
        "stalled_endings": endings,
        "rss_mib_after_linger": rss_after_linger,
        "rss_mib_end": rss_end,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "slow_consumer.json").write_text(json.dumps(results, indent=1))
    _print_report(results)
    return results


def _print_report(results: dict[str, Any]) -> None:
    alone, control, flooded = results["phases"]
    print(
        f"\nOne gateway; a quiet subscriber gets {results['quiet_rate']:g} messages/s for "
        f"{results['seconds']:g} s per phase; the flood publishes as fast as one connection "
        f"can (RT_PUBLISH_RATE=0); stalled subscribers have a {_RECEIVE_BUFFER}-byte receive "
        "buffer and never read\n"
    )
    print(
        "| phase | quiet p50 ms | quiet p99 ms | samples | flood stored/s | dropped "
        "deliveries | 1013 closes | gateway CPU | gateway RSS MiB (before / peak / after) |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for phase in (alone, control, flooded):
        rss = " / ".join(f"{value:g}" for value in phase["rss_mib"])
        print(
            f"| {phase['phase']} | {phase['p50_ms']} | {phase['p99_ms']} | {phase['samples']} | "
            f"{phase.get('flood_stored_per_s', 0):,} | {phase.get('dropped_deliveries', 0):,} | "
            f"{phase.get('slow_consumer_closes', 0)} | {phase['gateway_cpu_share']} | {rss} |"
        )
    print(
        f"\nThe {results['stalled']} stalled subscribers: {flooded['connections_after']} still "
        f"connected when the flood ended; {results['stalled_connected_after_linger']} after "
        f"{results['linger_s']:g} s more unread (gateway RSS {results['rss_mib_after_linger']} "
        f"MiB); then they read everything for up to 15 s and ended: "
        f"{results['stalled_endings']}; gateway RSS {results['rss_mib_end']} MiB a second "
        "after they hung up."
    )


if __name__ == "__main__":
    main()
