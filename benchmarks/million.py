"""Validation of a million-row manifest: `python -m benchmarks.million [--rows N] [--resume]`.

Writes the benchmark manifest (`benchmarks.data`: id, image, prompt, seed, size,
output_format) with N rows (default 1,000,000) as CSV and as Parquet (seed an int64 column),
then measures, each in its own process (wall time, CPU, peak RSS from wait4):

- `imgedit validate --no-sources MANIFEST`, the whole command (interpreter start, imports,
  the validation pass, the report), for the CSV and the Parquet manifest;
- `validate_manifest` alone (`benchmarks.variants validate`), its in-process time too.

`--resume` also measures a resume of N done rows through the done index (the scale part of
`benchmarks.bench` at N rows: moto's S3 pre-populated with N sidecars and index segments,
then the library runner and the flow, `--resume-variants`); the flow's with what Prefect
recorded of its planning (task runs, events, logs from its own database) and the CPU of its
API server. At a million rows that takes minutes and gigabytes of moto's memory.

Prints a table (and writes JSON with `--json PATH`). Figures are noisy on a shared machine:
compare them within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from . import data
from .endtoend import prefect_records
from .proc import Measured, run_measured
from .servers import PROJECT_ROOT, S3Server, child_env
from .variants import RESULT_PREFIX

DEFAULT_ROWS = 1_000_000
TIMEOUT_S = 900.0
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "imgedit-million"
# The targets for `imgedit validate` of a million rows without sources.
TARGET_WALL_S = 10.0
TARGET_RSS_MB = 300.0


def write_inputs(workdir: Path, rows: int) -> tuple[list[Path], Path, Path]:
    """The sources, and the CSV and Parquet manifests of `rows` rows (kept between runs)."""
    sources = data.write_sources(workdir / "sources")
    csv_path = workdir / f"manifest-{rows}.csv"
    if not csv_path.exists():
        partial = csv_path.with_suffix(".csv.part")
        data.write_manifest(partial, sources, rows)
        partial.rename(csv_path)
    parquet_path = workdir / f"manifest-{rows}.parquet"
    if not parquet_path.exists():
        columns = {name: pa.string() for name in data.MANIFEST_COLUMNS}
        columns["seed"] = pa.int64()
        table = pacsv.read_csv(csv_path, convert_options=pacsv.ConvertOptions(column_types=columns))
        partial = parquet_path.with_suffix(".parquet.part")
        pq.write_table(table, partial)
        partial.rename(parquet_path)
    return sources, csv_path, parquet_path


def _measure(cmd: list[str], env: dict[str, str], *, ok_codes: tuple[int, ...] = (0,)) -> Measured:
    m = run_measured(cmd, env=env, cwd=PROJECT_ROOT, timeout=TIMEOUT_S)
    if m.timed_out or m.returncode not in ok_codes:
        why = "timed out" if m.timed_out else f"exited with {m.returncode}"
        raise RuntimeError(f"{' '.join(cmd[:4])} ... {why}:\n{m.stderr[-3000:]}")
    return m


def _result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            parsed: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return parsed
    raise RuntimeError(f"no result line in:\n{stdout[-2000:]}")


def measure_validate(manifest: Path, rows: int, env: dict[str, str]) -> list[dict[str, Any]]:
    """The CLI command and the library call on one manifest."""
    records = []
    cli = [sys.executable, "-m", "flows.cli", "validate", "--no-sources", str(manifest)]
    m = _measure(cli, env)
    if f"{rows} rows, {rows} valid" not in " ".join(m.stdout.split()):
        raise RuntimeError(f"unexpected report:\n{m.stdout[:2000]}")
    records.append(
        {
            "case": f"imgedit validate --no-sources ({manifest.suffix[1:]})",
            "rows": rows,
            "wall_s": m.wall_s,
            "cpu_s": m.cpu_s,
            "max_rss_mb": m.max_rss_mb,
        }
    )
    lib = [sys.executable, "-m", "benchmarks.variants", "validate"]
    m = _measure([*lib, json.dumps({"manifest": str(manifest)})], env)
    result = _result(m.stdout)
    if result["rows"] != rows or result["valid"] != rows:
        raise RuntimeError(f"validate_manifest: {result}")
    records.append(
        {
            "case": f"validate_manifest ({manifest.suffix[1:]})",
            "rows": rows,
            "wall_s": m.wall_s,
            "run_s": result["run_s"],
            "cpu_s": m.cpu_s,
            "max_rss_mb": m.max_rss_mb,
        }
    )
    return records


def measure_resume(
    csv_path: Path,
    sources: list[Path],
    rows: int,
    env: dict[str, str],
    log: Any,
    variants: list[str],
    workdir: Path,
) -> list[dict[str, Any]]:
    """Resume of `rows` done rows through the done index, by each variant (the library
    runner, the flow); the flow's with what Prefect recorded, from its own fresh database."""
    case = f"resume-{rows}"
    t0 = time.perf_counter()
    records = []
    with S3Server(env, populate=[f"{case}/out={rows}"], sources=sources[0].parent) as s3:
        log(f"  populated in {time.perf_counter() - t0:.0f} s: {s3.populate_report}")
        for name in variants:
            home = workdir / f"prefect-resume-{name}-{rows}"
            shutil.rmtree(home, ignore_errors=True)
            args = {
                "manifest": str(csv_path),
                "api_base": "http://127.0.0.1:9/v1",  # never called: every job is done
                "concurrency": 64,
                "s3_endpoint_url": s3.endpoint_url,
                "output": f"s3://{case}/out",
            }
            cmd = [sys.executable, "-m", "benchmarks.variants", name, json.dumps(args)]
            m = _measure(cmd, {**env, **child_env(home)})
            result = _result(m.stdout)
            skipped = result.get("by_status", {}).get("skipped", 0)
            if skipped != rows:
                raise RuntimeError(f"resume: {skipped} rows skipped, expected {rows}: {result}")
            record: dict[str, Any] = {
                "case": f"resume through the done index ({name})",
                "rows": rows,
                "wall_s": m.wall_s,
                "run_s": result["run_s"],
                "cpu_s": m.cpu_s,
                "max_rss_mb": m.max_rss_mb,
            }
            if name == "flow":
                # The API server runs in a child process of the flow's (see flows/local_api).
                record["server_cpu_s"] = result["run_children_cpu_s"]
                record["prefect"] = prefect_records(home)
            log(f"  {record['case']}: {record['wall_s']:.2f} s, {record['max_rss_mb']:.0f} MB")
            records.append(record)
    return records


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| case | rows | wall s | run s | CPU s | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        run = f"{r['run_s']:.2f}" if "run_s" in r else "-"
        lines.append(
            f"| {r['case']} | {r['rows']:,} | {r['wall_s']:.2f} | {run} | {r['cpu_s']:.2f} "
            f"| {r['max_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="inputs kept here")
    parser.add_argument("--formats", default="csv,parquet", help="csv, parquet or both")
    parser.add_argument("--resume", action="store_true", help="also measure a resume of N rows")
    parser.add_argument(
        "--resume-variants", default="runner,flow", help="who resumes: runner, flow or both"
    )
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--inputs-only", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.inputs_only:
        write_inputs(a.workdir, a.rows)
        return 0

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    a.workdir.mkdir(parents=True, exist_ok=True)
    env = child_env(a.workdir / "prefect-home")
    t0 = time.perf_counter()
    # In a child: Linux carries a process's peak RSS across fork and exec, so every command
    # measured after a parent grew to hundreds of MB (writing the Parquet copy) would report
    # at least that much.
    prepare = [sys.executable, "-m", "benchmarks.million", "--inputs-only"]
    prepare += ["--rows", str(a.rows), "--workdir", str(a.workdir)]
    subprocess.run(prepare, cwd=PROJECT_ROOT, env=env, check=True)
    sources, csv_path, parquet_path = write_inputs(a.workdir, a.rows)
    log(f"inputs ready in {time.perf_counter() - t0:.1f} s ({a.rows:,} rows in {a.workdir})")
    manifests = {"csv": csv_path, "parquet": parquet_path}
    records: list[dict[str, Any]] = []
    for fmt in [f.strip() for f in a.formats.split(",") if f.strip()]:
        for record in measure_validate(manifests[fmt], a.rows, env):
            log(f"  {record['case']}: {record['wall_s']:.2f} s, {record['max_rss_mb']:.0f} MB")
            records.append(record)
    if a.resume:
        variants = [v.strip() for v in a.resume_variants.split(",") if v.strip()]
        records += measure_resume(csv_path, sources, a.rows, env, log, variants, a.workdir)
    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"Python {platform.python_version()}, {a.rows:,} rows"
    )
    print(table(records))
    for r in records:
        if "prefect" in r:
            p = r["prefect"]
            print(
                f"{r['case']}: Prefect recorded {p.get('task_run', 0):,} task runs, "
                f"{p.get('events', 0):,} events, {p.get('log', 0):,} logs; its API server "
                f"used {r['server_cpu_s']:.1f} s of CPU"
            )
    targets = [r for r in records if r["case"].startswith("imgedit validate")]
    for r in targets:
        met = r["wall_s"] < TARGET_WALL_S and r["max_rss_mb"] < TARGET_RSS_MB
        print(
            f"target {r['case']}: < {TARGET_WALL_S:.0f} s and < {TARGET_RSS_MB:.0f} MB: "
            + ("met" if met else "MISSED")
        )
    if a.json:
        a.json.write_text(json.dumps({"rows": a.rows, "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
