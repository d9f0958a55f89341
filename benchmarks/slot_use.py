"""Where a fixed limit's slots go: `python -m benchmarks.slot_use [--rows N --weather W]`.

Runs the library runner in this process against the emulator (`gateway` weather at time scale
1, or `steady` at --latency) into a local folder, and samples the run's request slots every
SAMPLE_S: how many are taken (a request in flight, or a slot a 429 keeps closed) and whether
any row waits for one. A slot that stands empty while rows wait would be the runner's fault;
one empty with no row waiting means the run had nothing to send (its last rows, or rows in
backoff). Beside it, from the emulator's ledger: the time a request holds its slot beyond the
API's service time (mean client latency - mean service time) and the timeline split of
`benchmarks.weather`. Figures vary with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq

from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine import run_control
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest

from . import data
from .timeline import breakdown

SAMPLE_S = 0.02
END_BUCKET_S = 5.0


class _SeenGate(run_control.ResizableGate):
    """The run's slot gate, kept where the sampler finds it (the run makes its own)."""

    made: ClassVar[list[run_control.ResizableGate]] = []

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        _SeenGate.made.append(self)


async def _run_sampled(opts: RunOptions) -> tuple[Any, list[tuple[float, int, bool]]]:
    samples: list[tuple[float, int, bool]] = []
    t0 = time.monotonic()

    async def sample() -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            if _SeenGate.made:
                gate = _SeenGate.made[-1]
                samples.append((time.monotonic() - t0, gate.in_flight, gate.waiting > 0))

    sampler = asyncio.create_task(sample())
    try:
        return await run_manifest(opts), samples
    finally:
        sampler.cancel()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="imgedit-slots-"))
    sources = data.write_sources(work / "sources")
    manifest = data.write_manifest(work / "manifest.csv", sources, args.rows)
    run_control.ResizableGate = _SeenGate  # type: ignore[misc]
    with EmulatorProcess(EmulatorConfig()) as emu:
        emu.configure(request_log_size=max(10_000, 5 * args.rows))
        if args.weather == "gateway":
            emu.configure(weather="gateway", weather_time_scale=1.0, fault_seed=7)
        else:
            emu.configure(latency=args.latency)
        opts = RunOptions(
            manifest=str(manifest),
            output=str(work / "out"),
            api_base=emu.base_url,
            concurrency=args.concurrency,
            fixed_concurrency=True,
        )
        started = time.time()
        summary, samples = asyncio.run(_run_sampled(opts))
        ended = time.time()
        requests = emu.requests()
        stats = emu.stats()
    latencies = [
        x
        for table in (work / "out" / "runs").rglob("results.parquet")
        for x in pq.read_table(table, columns=["latency_s"]).column(0).to_pylist()
        if x is not None
    ]
    served = [r["service_s"] for r in requests if r.get("status") == 200 and r.get("service_s")]
    c = args.concurrency
    empty_waiting = [c - n for _, n, waiting in samples if waiting]
    empty_idle = [(t, c - n) for t, n, waiting in samples if not waiting]
    end_buckets: dict[float, float] = {}
    for t, empty in empty_idle:
        key = END_BUCKET_S * int(t // END_BUCKET_S)
        end_buckets[key] = end_buckets.get(key, 0.0) + empty * SAMPLE_S
    return {
        "rows": args.rows,
        "weather": args.weather,
        "by_status": summary.by_status,
        "run_s": round(ended - started, 1),
        "ideal_s": round(stats["service_seconds_total"] / c, 1),
        "timeline": breakdown(requests, c, started, ended),
        "held_beyond_service_ms": round(
            1000 * (statistics.fmean(latencies) - statistics.fmean(served)), 1
        )
        if latencies and served
        else None,
        "samples": len(samples),
        "empty_while_rows_waited": round(statistics.fmean(empty_waiting), 2)
        if empty_waiting
        else 0.0,
        "share_with_no_row_waiting": round(len(empty_idle) / max(1, len(samples)), 3),
        "empty_slot_seconds_no_row_waiting": round(sum(e for _, e in empty_idle) * SAMPLE_S, 1),
        "those_by_5s_from_start": {f"{k:g}": round(v, 1) for k, v in sorted(end_buckets.items())},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--weather", choices=("gateway", "steady"), default="gateway")
    p.add_argument("--latency", type=float, default=2.5, help="steady weather's latency, s")
    args = p.parse_args()
    for key, value in measure(args).items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
