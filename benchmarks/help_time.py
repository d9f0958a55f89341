"""How long `imgedit --help` and each command's `--help` take: `python -m benchmarks.help_time`.

Each is a fresh process (what a person waits for at a terminal), repeated; prints the median
and the worst. The target is under a second: `--help` must not import Prefect or the
emulator's app (tests/test_first_hour.py checks the imports; this measures the time).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (
    [],
    ["run"],
    ["validate"],
    ["reindex"],
    ["setup"],
    ["emulator"],
    ["runs"],
    ["show"],
    ["status"],
    ["serve"],
)
REPEATS = 5
TARGET_S = 1.0


def measure(args: list[str]) -> list[float]:
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "flows.cli", *args, "--help"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        times.append(time.perf_counter() - started)
    return times


def main() -> int:
    worst_median = 0.0
    for args in COMMANDS:
        times = measure(args)
        median = statistics.median(times)
        worst_median = max(worst_median, median)
        name = " ".join(["imgedit", *args, "--help"])
        print(f"{name:34s} median {median:.3f} s  max {max(times):.3f} s")
    print(f"slowest median {worst_median:.3f} s (target < {TARGET_S:g} s)")
    return 0 if worst_median < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
