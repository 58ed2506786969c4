"""``realtime dev`` as a user runs it (issue 9): it stops, loudly and with a failure code,
when its nats-server child dies, and still stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import free_port, wait_for_port


@dataclass
class Dev:
    """A running ``realtime dev`` and where its output goes."""

    process: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    def nats_server_pid(self) -> int:
        """The pid of the dev process's nats-server child."""
        for pid in children(self.process.pid):
            if b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        raise AssertionError(f"no nats-server among the children of {self.process.pid}")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"realtime dev still running after {timeout}s:\n{self.stderr.read_text()[-2000:]}"
            ) from None


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (from /proc; empty once it is gone)."""
    try:
        return [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()
        ]
    except FileNotFoundError:
        return []


def realtime_command() -> list[str]:
    """The installed ``realtime`` console script (as a user runs it), else the module."""
    script = Path(sys.executable).parent / "realtime"
    return [str(script)] if script.exists() else [sys.executable, "-m", "realtime"]


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    """``realtime dev`` on free ports, in an empty working directory (its data goes to
    ``.realtime/`` there), in a session of its own so the test can Ctrl-C its group as a
    terminal would."""
    port = free_port()
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RT_")}
    environment["PYTHONUNBUFFERED"] = "1"
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            [*realtime_command(), "dev", "--port", str(port), "--nats-port", str(free_port())],
            cwd=tmp_path,
            env=environment,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    running = Dev(process, port, stdout, stderr)
    try:
        wait_for_port(port, timeout=20)
        yield running
    finally:
        if process.poll() is None:
            # nats-server runs in a session of its own: kill it by pid, then the group.
            for pid in children(process.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def test_dev_stops_with_an_error_when_nats_server_dies(dev: Dev) -> None:
    nats_pid = dev.nats_server_pid()
    os.kill(nats_pid, signal.SIGKILL)
    started = time.monotonic()
    code = dev.wait(timeout=10)
    stderr = dev.stderr.read_text()
    assert code != 0, stderr
    assert "realtime dev: nats-server exited with code -9" in stderr
    assert "stopping" in stderr
    assert time.monotonic() - started < 10
    # The gateway is gone with it.
    with pytest.raises(TimeoutError):
        wait_for_port(dev.port, timeout=0.3)


def test_ctrl_c_stops_everything_cleanly(dev: Dev) -> None:
    nats_pid = dev.nats_server_pid()
    # A terminal's Ctrl-C signals its whole foreground process group.
    os.killpg(dev.process.pid, signal.SIGINT)
    started = time.monotonic()
    code = dev.wait(timeout=10)
    stderr = dev.stderr.read_text()
    assert code == 0, stderr
    assert "nats-server exited" not in stderr
    assert "Traceback" not in stderr
    # The gateway and worker drain while NATS is still up: no waiting on a dead server.
    assert time.monotonic() - started < 3, stderr
    assert not Path(f"/proc/{nats_pid}").exists() or "Z" in _state(nats_pid)


def _state(pid: int) -> str:
    """The process state letter (Z = exited, not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"
