"""Running the real @foony/realtime SDK (installed by `make test` from tests/package.json)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent
NODE_DIR = TESTS / "node"
SDK_DIR = TESTS / "node_modules" / "@foony" / "realtime"


def require_sdk() -> None:
    """Fail (not skip) when the SDK is missing: the interop tests are not optional."""
    if not (SDK_DIR / "lib" / "binary.js").exists():
        raise RuntimeError("the SDK is not installed: run `make test` (npm ci in tests/)")


def run_node(script: str, *arguments: str, timeout: float = 60.0, **env: str) -> Any:
    """Run ``tests/node/<script>``; return the JSON it prints on its last stdout line."""
    require_sdk()
    environment = dict(os.environ, **env)
    result = subprocess.run(
        ["node", str(NODE_DIR / script), *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
        cwd=TESTS,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"node {script} {' '.join(arguments)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])
