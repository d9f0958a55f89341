"""End to end at scale: `python -m benchmarks.endtoend [--rows 10000,100000 --variants ...]`.

N distinct jobs through the library runner and the flow, each in its own process, against
the emulator answering small images (`--output-scale`, so a disk holds 100k results) into a
local folder: wall time, CPU per image, peak RSS (is memory flat from 10k to 100k rows?) and,
for the flow, what Prefect recorded (task runs, events, logs, from its own fresh database)
and the CPU its API server used: Prefect's share of the work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.process import EmulatorProcess

from . import data
from .servers import child_env
from .spawn import run_variant

TIMEOUT_S = 3600.0
# What Prefect keeps of a run, by table of its database.
PREFECT_TABLES = ("flow_run", "task_run", "task_run_state", "events", "log", "artifact")


def prefect_records(prefect_home: Path) -> dict[str, int]:
    """Rows per table of the Prefect database under `prefect_home` (read only)."""
    db = prefect_home / "prefect.db"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {
            t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0])
            for t in PREFECT_TABLES
        }
    finally:
        conn.close()


def measure_variant(
    name: str, rows: int, manifest: Path, work: Path, emu: EmulatorProcess, args: argparse.Namespace
) -> dict[str, Any]:
    home = work / f"prefect-{name}-{rows}"
    env = child_env(home)
    out = work / f"out-{name}-{rows}"
    emu.reset()
    variant_args = {
        "manifest": str(manifest),
        "api_base": emu.base_url,
        "concurrency": args.concurrency,
        "fixed_concurrency": True,
        "s3_endpoint_url": None,
        "output": str(out),
    }
    r, m = run_variant(name, variant_args, env, TIMEOUT_S)
    stats = emu.stats()
    record = {
        "variant": name,
        "rows": rows,
        "succeeded": r["succeeded"],
        "charged_images": stats["charged_images"],
        "run_s": round(r["run_s"], 1),
        "process_s": round(m.wall_s, 1),
        "cpu_ms_per_image": round(1000 * r["run_cpu_s"] / rows, 2),
        "server_cpu_ms_per_image": round(1000 * r["run_children_cpu_s"] / rows, 2),
        "peak_rss_mb": round(m.max_rss_mb),
        "prefect": prefect_records(home) if name == "flow" else {},
    }
    # 100k results a variant: keep the disk for the next one.
    shutil.rmtree(out, ignore_errors=True)
    return record


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="imgedit-endtoend-"))
    sources = data.write_sources(work / "sources")
    runs = []
    config = EmulatorConfig(latency=args.latency, output_scale=args.output_scale)
    try:
        with EmulatorProcess(config) as emu:
            for rows in args.rows:
                manifest = data.write_manifest(work / f"manifest-{rows}.csv", sources, rows)
                for name in args.variants:
                    runs.append(measure_variant(name, rows, manifest, work, emu, args))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "settings": {**vars(args)},
        "runs": runs,
    }


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"end to end: latency {s['latency']:g} s, concurrency {s['concurrency']}, output scale "
        f"{s['output_scale']:g}, local folder; {result['cpus']} CPUs, load "
        f"{result['loadavg'][0]:.1f}, {result['date']}",
        "   variant      rows  succeeded   run s   CPU ms/image   server ms/image   peak RSS MB"
        "   task runs   events   logs",
    ]
    for r in result["runs"]:
        p = r["prefect"]
        lines.append(
            f"   {r['variant']:8s} {r['rows']:8d} {r['succeeded']:10d} {r['run_s']:7.1f} "
            f"{r['cpu_ms_per_image']:14.2f} {r['server_cpu_ms_per_image']:17.2f} "
            f"{r['peak_rss_mb']:13d} {p.get('task_run', '-')!s:>11s} {p.get('events', '-')!s:>8s} "
            f"{p.get('log', '-')!s:>6s}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--rows",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[10_000, 100_000],
        help="row counts, comma-separated",
    )
    p.add_argument(
        "--variants", type=lambda v: v.split(","), default=["runner", "flow"], help="runner,flow"
    )
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--latency", type=float, default=0.05, help="the emulator's, seconds")
    p.add_argument("--output-scale", type=float, default=0.0625, help="of the asked size")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    result = measure(args)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
