"""The atheris harness of the client-frame decoders (tests/fuzz/fuzz_codecs.py), run for a
bounded number of inputs in a subprocess: libFuzzer owns the process it runs in and exits
it on the first failing input. Skipped where atheris is not installed (it ships wheels for
Linux x86_64 only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

ROOT = Path(__file__).resolve().parents[2]
RUNS = 30_000


def test_client_decoders_raise_only_their_typed_error(tmp_path: Path) -> None:
    """30,000 coverage-guided inputs from a seed corpus of valid frames: each decodes (and a
    binary one survives a re-encode) or raises ``FrameDecodeError``; no crash file."""
    corpus = tmp_path / "corpus"
    module = [sys.executable, "-m", "tests.fuzz.fuzz_codecs"]
    subprocess.run([*module, "--write-seeds", str(corpus)], cwd=ROOT, check=True, timeout=60)
    result = subprocess.run(
        [
            *module,
            f"-runs={RUNS}",
            # A fixed seed: the same inputs every run, so CI is reproducible (a longer,
            # random run: python -m tests.fuzz.fuzz_codecs -runs=N).
            "-seed=1",
            "-max_total_time=90",  # a backstop: 30,000 runs take ~2 s on this 2-core machine
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    output = result.stdout + result.stderr
    crashes = sorted(path.name for path in tmp_path.glob("crash-*"))
    assert result.returncode == 0 and not crashes, (crashes, output[-4000:])
    assert f"Done {RUNS} runs" in output, output[-2000:]
