"""Runs one measured variant (`benchmarks.variants`) in its own process; reads its result."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

from .proc import Measured, run_measured
from .servers import PROJECT_ROOT
from .variants import RESULT_PREFIX


def run_variant(
    name: str, args: Mapping[str, Any], env: Mapping[str, str], timeout: float
) -> tuple[dict[str, Any], Measured]:
    """The variant's `BENCH-RESULT` and how its process ran; exits naming it if it failed."""
    cmd = [sys.executable, "-m", "benchmarks.variants", name, json.dumps(dict(args))]
    m = run_measured(cmd, env=env, cwd=PROJECT_ROOT, timeout=timeout)
    lines = [ln for ln in m.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if m.returncode != 0 or not lines:
        tail = "\n".join(m.stderr.strip().splitlines()[-20:])
        raise SystemExit(f"variant {name} failed ({m.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_PREFIX) :])
    return result, m
