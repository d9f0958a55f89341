"""The imgedit benchmark: `python -m benchmarks.bench [--rows N --latency L --concurrency C ...]`.

Runs on one machine against the bundled emulator and moto's S3 on loopback, each measured
variant in its own process, and prints a table (and writes JSON):

1. latency-bound: N rows at emulator latency L and concurrency C; wall time against the
   bound N*L/C for the flow, the library runner (no Prefect) and `benchmarks/baseline.py`,
   alternating, R repetitions, medians;
2. CPU-bound: the same at latency 0: CPU seconds per image and images per second;
3. scale: resuming manifests whose results all exist (planning and resume), and validating
   (with the cost estimate) the largest manifest: wall time and peak RSS;
4. Prefect's share: the flow against the runner on the same work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.process import EmulatorProcess

from . import data
from .proc import cpu_seconds, find_child, run_measured
from .servers import PROJECT_ROOT, S3Server, child_env
from .variants import RESULT_PREFIX

VARIANTS = ("baseline", "runner", "flow")
# Not run by default: `--variants runner,runner-noclaims` shows what claiming each job costs.
EXTRA_VARIANTS = ("runner-noclaims",)
PARTS = ("latency", "cpu", "scale")
BUCKET = "imgedit-bench"
VARIANT_TIMEOUT_S = 900.0
DEFAULT_PREFECT_HOME = Path(tempfile.gettempdir()) / "imgedit-bench-prefect-home"

# The targets (measured here; tests never assert times).
TARGET_EFFICIENCY = 0.95
TARGET_VS_BASELINE = 1.03  # the flow's run time within 3% of the baseline's
TARGET_CPU_RATIO = 1.2
TARGET_RSS_RATIO = 1.3
TARGET_RESUME_S = 30.0

DEFAULTS: dict[str, Any] = {
    "rows": 2000,
    "latency": 0.2,
    "concurrency": 64,
    "reps": 3,
    "cpu_reps": 1,
    "scale_rows": "10000,100000",
}
QUICK: dict[str, Any] = {
    "rows": 400,
    "latency": 0.2,
    "concurrency": 32,
    "reps": 1,
    "cpu_reps": 1,
    "scale_rows": "2000,20000",
}


class BenchError(RuntimeError):
    """A measured run failed or did not do its work: its figures would mean nothing."""


@dataclass
class Settings:
    rows: int
    latency: float
    concurrency: int
    reps: int
    cpu_reps: int
    scale_rows: list[int]
    variants: list[str]
    parts: list[str]
    quick: bool
    scale_flow: bool
    workdir: Path
    prefect_home: Path
    json_path: Path | None

    @property
    def bound_s(self) -> float:
        return self.rows * self.latency / self.concurrency


@dataclass
class Bench:
    settings: Settings
    env: dict[str, str]
    sources: list[Path]
    log: Callable[[str], None]
    runs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def variant(
        self,
        name: str,
        args: dict[str, Any],
        *,
        part: str,
        watch: dict[str, int] | None = None,
        expect_rows: int | None = None,
        expect_status: str = "succeeded",
    ) -> dict[str, Any]:
        """Run one variant process and return everything measured about it."""
        watch = watch or {}
        before = {k: cpu_seconds(pid) for k, pid in watch.items()}
        cmd = [sys.executable, "-m", "benchmarks.variants", name, json.dumps(args)]
        m = run_measured(cmd, env=self.env, cwd=PROJECT_ROOT, timeout=VARIANT_TIMEOUT_S)
        after = {k: cpu_seconds(pid) for k, pid in watch.items()}
        result = _result_line(m.stdout)
        if m.returncode != 0 or result is None:
            tail = "\n".join(m.stderr.strip().splitlines()[-25:])
            why = "timed out" if m.timed_out else f"exited with {m.returncode}"
            raise BenchError(f"variant {name} ({part}) {why}:\n{tail}")
        record: dict[str, Any] = {
            "part": part,
            "variant": name,
            "total_s": m.wall_s,
            "cpu_total_s": m.cpu_s,
            "max_rss_mb": m.max_rss_mb,
            "startup_s": result["run_started"] - m.started_at,
            "teardown_s": m.started_at + m.wall_s - result["run_ended"],
            **{f"{k}_cpu_s": after[k] - before[k] for k in watch},
            **{k: v for k, v in result.items() if k not in ("exiting",)},
        }
        if expect_rows is not None:
            got = _status_count(record, expect_status)
            if got != expect_rows:
                raise BenchError(
                    f"variant {name} ({part}): {got} rows {expect_status}, expected "
                    f"{expect_rows}: {record.get('by_status')}"
                )
        self.runs.append(record)
        self.log(
            f"  {part:8s} {name:14s} total {m.wall_s:7.2f} s  run {record['run_s']:7.2f} s  "
            f"cpu {m.cpu_s:6.2f} s  rss {m.max_rss_mb:6.0f} MB"
        )
        return record

    def command(self, label: str, cmd: Sequence[str], *, part: str) -> dict[str, Any]:
        """A whole user command (no in-process timing): wall, CPU, peak RSS."""
        m = run_measured(cmd, env=self.env, cwd=PROJECT_ROOT, timeout=VARIANT_TIMEOUT_S)
        if m.returncode != 0:
            raise BenchError(f"{label} exited with {m.returncode}:\n{m.stderr[-2000:]}")
        record = {
            "part": part,
            "variant": label,
            "total_s": m.wall_s,
            "cpu_total_s": m.cpu_s,
            "max_rss_mb": m.max_rss_mb,
        }
        self.runs.append(record)
        self.log(f"  {part:8s} {label:14s} total {m.wall_s:7.2f} s  rss {m.max_rss_mb:6.0f} MB")
        return record


def _result_line(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            parsed: dict[str, Any] = json.loads(line[len(RESULT_PREFIX) :])
            return parsed
    return None


def _status_count(record: dict[str, Any], status: str) -> int:
    if status == "succeeded":
        return int(record.get("succeeded", 0))
    return int(record.get("by_status", {}).get(status, 0))


# --- the parts -------------------------------------------------------------------------------


def edit_parts(bench: Bench, emu: EmulatorProcess, s3: S3Server, manifest: Path) -> None:
    """Parts 1 and 2: the same manifest at latency L, then at latency 0, variants alternating."""
    s = bench.settings
    watch = {"emulator": _emulator_pid(), "s3": s3.pid}
    plan = []
    if "latency" in s.parts:
        plan.append(("latency", s.latency, s.reps))
    if "cpu" in s.parts:
        plan.append(("cpu", 0.0, s.cpu_reps))
    for part, latency, reps in plan:
        emu.configure(latency=latency)
        bench.log(f"part {part}: {s.rows} rows, latency {latency:g} s, concurrency {s.concurrency}")
        for rep in range(reps):
            # Rotate the order so no variant always runs first (or right after another).
            order = s.variants[rep % len(s.variants) :] + s.variants[: rep % len(s.variants)]
            for name in order:
                s3.reset([BUCKET])
                emu.reset()
                prefix = f"{part}-{rep}-{name}"
                args = {
                    "manifest": str(manifest),
                    "api_base": emu.base_url,
                    "concurrency": s.concurrency,
                    "s3_endpoint_url": s3.endpoint_url,
                    "output": f"s3://{BUCKET}/{prefix}",
                    "bucket": BUCKET,
                    "prefix": prefix,
                }
                try:
                    record = bench.variant(name, args, part=part, watch=watch, expect_rows=s.rows)
                except BenchError as exc:
                    if name != "baseline":
                        raise
                    # The baseline has no retries by design: one dropped connection ends it.
                    # That repetition is reported as failed and left out of the medians.
                    reason = str(exc).strip().splitlines()[-1]
                    bench.failures.append(
                        {"part": part, "variant": name, "rep": rep, "error": reason}
                    )
                    bench.log(f"  {part:8s} {name:14s} FAILED (no retries): {reason}")
                    continue
                stats = emu.stats()
                record["rep"] = rep
                record["emulator_requests"] = stats["requests"]
                record["emulator_max_in_flight"] = stats["max_in_flight"]
                if stats["charged_requests"] != s.rows:
                    raise BenchError(
                        f"{name}: the emulator charged {stats['charged_requests']} requests "
                        f"for {s.rows} rows"
                    )


def scale_part(bench: Bench) -> None:
    """Part 3: resume manifests whose every job is done; validate the largest one."""
    s = bench.settings
    sizes = sorted(s.scale_rows)
    manifests = {
        n: data.write_manifest(s.workdir / f"manifest-{n}.csv", bench.sources, n) for n in sizes
    }
    largest_n = sizes[-1]
    # Done jobs with the done index (as runs leave them), and once more at the largest size
    # without it (an output from before the index: the sidecars are listed instead).
    populate = [f"resume-{n}/out={n}" for n in sizes] + [
        f"resume-{largest_n}-noindex/out={largest_n}:noindex"
    ]
    bench.log(f"part scale: pre-populating {', '.join(str(n) for n in sizes)} done jobs")
    with S3Server(bench.env, populate=populate, sources=s.workdir / "sources") as s3:
        bench.log(f"  populated: {s3.populate_report}")
        variants = ["runner"] + (["flow"] if s.scale_flow and "flow" in s.variants else [])
        cases = [(n, f"resume-{n}", name, True) for n in sizes for name in variants]
        # The listing is paid once per output (it leaves an index): one variant measures it.
        cases.append((largest_n, f"resume-{largest_n}-noindex", "runner", False))
        for n, case, name, indexed in cases:
            args = {
                "manifest": str(manifests[n]),
                "api_base": "http://127.0.0.1:9/v1",  # never called: every job is done
                "concurrency": s.concurrency,
                "s3_endpoint_url": s3.endpoint_url,
                "output": f"s3://{case}/out",
            }
            record = bench.variant(
                name,
                args,
                part="scale",
                watch={"s3": s3.pid},
                expect_rows=n,
                expect_status="skipped",
            )
            record["case"] = case
            record["rows"] = n
            record["indexed"] = indexed
    largest = manifests[sizes[-1]]
    record = bench.variant("validate", {"manifest": str(largest)}, part="scale")
    record["case"] = f"validate-{sizes[-1]}"
    record["rows"] = sizes[-1]
    record = bench.command(
        "validate-cli",
        [sys.executable, "-m", "flows.cli", "validate", str(largest)],
        part="scale",
    )
    record["case"] = f"validate-cli-{sizes[-1]}"
    record["rows"] = sizes[-1]


def _emulator_pid() -> int:
    """The emulator's pid (EmulatorProcess runs it as our child), for its CPU time."""
    pid = find_child(os.getpid(), "pipeline.emulator.process")
    if pid is None:
        raise BenchError("cannot find the emulator process")
    return pid


# --- summary ---------------------------------------------------------------------------------


def _median(records: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(s: Settings, runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lat = [r for r in runs if r["part"] == "latency"]
    if lat:
        table: dict[str, dict[str, Any]] = {}
        for name in s.variants:
            rs = [r for r in lat if r["variant"] == name]
            run_s, total_s = _median(rs, "run_s"), _median(rs, "total_s")
            table[name] = {
                "reps": len(rs),
                "total_s": total_s,
                "run_s": run_s,
                "elapsed_s": _median(rs, "elapsed_s"),
                "startup_s": _median(rs, "startup_s"),
                "efficiency_run": s.bound_s / run_s if run_s else None,
                "efficiency_total": s.bound_s / total_s if total_s else None,
                "latency_p50_s": _median(rs, "latency_p50_s"),
                "run_cpu_s": _median(rs, "run_cpu_s"),
                "emulator_cpu_s": _median(rs, "emulator_cpu_s"),
                "max_in_flight": _median(rs, "emulator_max_in_flight"),
                "runs_s": [round(r["run_s"], 3) for r in rs],
            }
        out["latency"] = {"bound_s": s.bound_s, "variants": table}
    cpu = [r for r in runs if r["part"] == "cpu"]
    if cpu:
        table = {}
        for name in s.variants:
            rs = [r for r in cpu if r["variant"] == name]
            run_cpu = _median([{"v": r["run_cpu_s"] + r["run_children_cpu_s"]} for r in rs], "v")
            total_cpu = _median(rs, "cpu_total_s")
            run_s = _median(rs, "run_s")
            table[name] = {
                "reps": len(rs),
                "run_s": run_s,
                "total_s": _median(rs, "total_s"),
                "images_per_s": s.rows / run_s if run_s else None,
                "cpu_ms_per_image_run": 1000 * run_cpu / s.rows if run_cpu is not None else None,
                "cpu_ms_per_image_total": 1000 * total_cpu / s.rows if total_cpu else None,
                "emulator_cpu_ms_per_image": _per_image(_median(rs, "emulator_cpu_s"), s.rows),
                "s3_cpu_ms_per_image": _per_image(_median(rs, "s3_cpu_s"), s.rows),
                "max_rss_mb": _median(rs, "max_rss_mb"),
            }
        base: float | None = table.get("baseline", {}).get("cpu_ms_per_image_run")
        for row in table.values():
            mine = row["cpu_ms_per_image_run"]
            row["cpu_vs_baseline"] = mine / base if base and mine is not None else None
        out["cpu"] = {"variants": table}
    scale = [r for r in runs if r["part"] == "scale"]
    if scale:
        out["scale"] = [
            {
                k: r.get(k)
                for k in (
                    "case",
                    "variant",
                    "rows",
                    "indexed",
                    "total_s",
                    "run_s",
                    "max_rss_mb",
                    "s3_cpu_s",
                )
            }
            for r in scale
        ]
    if lat and cpu:
        out["latency"]["feasibility"] = _feasibility(s, out["cpu"]["variants"])
    out["prefect_share"] = _prefect_share(out)
    out["targets"] = _targets(s, out)
    return out


def _feasibility(s: Settings, cpu: dict[str, Any]) -> dict[str, Any]:
    """Can this machine reach the latency bound at all? The bound asks for C/L images per
    second; every image costs CPU in the variant, the emulator and the S3 server (part 2)."""
    cpus = os.cpu_count() or 1
    needed = s.concurrency / s.latency if s.latency else None
    sustainable = {}
    for name, row in cpu.items():
        parts = (
            row["cpu_ms_per_image_run"],
            row["emulator_cpu_ms_per_image"],
            row["s3_cpu_ms_per_image"],
        )
        if all(p is not None for p in parts):
            sustainable[name] = 1000 * cpus / sum(parts)
    return {"needed_images_per_s": needed, "sustainable_images_per_s": sustainable, "cpus": cpus}


def _per_image(seconds: float | None, rows: int) -> float | None:
    return None if seconds is None else 1000 * seconds / rows


def _prefect_share(out: dict[str, Any]) -> dict[str, Any]:
    share: dict[str, Any] = {}
    for part in ("latency", "cpu"):
        table = out.get(part, {}).get("variants", {})
        flow, runner = table.get("flow"), table.get("runner")
        if flow and runner and flow.get("run_s") and runner.get("run_s"):
            share[part] = {
                "run_s_flow_minus_runner": flow["run_s"] - runner["run_s"],
                "total_s_flow_minus_runner": (flow.get("total_s") or 0)
                - (runner.get("total_s") or 0)
                if flow.get("total_s")
                else None,
            }
            if part == "cpu":
                share[part]["cpu_ms_per_image_flow_minus_runner"] = (
                    flow["cpu_ms_per_image_run"] - runner["cpu_ms_per_image_run"]
                )
    return share


def _targets(s: Settings, out: dict[str, Any]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, higher_is_better: bool) -> None:
        ok = None
        if value is not None:
            ok = value >= limit if higher_is_better else value <= limit
        sign = ">=" if higher_is_better else "<="
        targets.append({"target": f"{name} {sign} {limit:g}", "measured": value, "met": ok})

    lat = out.get("latency", {}).get("variants", {})
    for name in ("flow", "runner"):
        if name in lat:
            add(
                f"latency-bound efficiency, {name} (run)",
                lat[name]["efficiency_run"],
                TARGET_EFFICIENCY,
                True,
            )
    if "flow" in lat and "baseline" in lat:
        add(
            "flow run time / baseline run time",
            lat["flow"]["run_s"] / lat["baseline"]["run_s"],
            TARGET_VS_BASELINE,
            False,
        )
    if "runner" in lat and "baseline" in lat:
        add(
            "runner run time / baseline run time",
            lat["runner"]["run_s"] / lat["baseline"]["run_s"],
            TARGET_VS_BASELINE,
            False,
        )
    cpu = out.get("cpu", {}).get("variants", {})
    for name in ("flow", "runner"):
        if name in cpu:
            add(
                f"CPU per image, {name} / baseline",
                cpu[name]["cpu_vs_baseline"],
                TARGET_CPU_RATIO,
                False,
            )
    scale = out.get("scale", [])
    sizes = sorted(s.scale_rows)
    for name in ("runner", "flow"):
        by_rows = {r["rows"]: r for r in scale if r["variant"] == name and r.get("indexed", True)}
        if len(sizes) >= 2 and sizes[0] in by_rows and sizes[-1] in by_rows:
            add(
                f"peak RSS {sizes[-1]} / {sizes[0]} rows, {name}",
                by_rows[sizes[-1]]["max_rss_mb"] / by_rows[sizes[0]]["max_rss_mb"],
                TARGET_RSS_RATIO,
                False,
            )
        if sizes and sizes[-1] in by_rows:
            add(
                f"resume of {sizes[-1]} done rows, {name} (run s)",
                by_rows[sizes[-1]]["run_s"],
                TARGET_RESUME_S,
                False,
            )
    return targets


# --- output ----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    return "\n".join(lines)


def report(s: Settings, summary: dict[str, Any]) -> str:
    parts = []
    if "latency" in summary:
        lat = summary["latency"]
        parts.append(
            f"1. Latency-bound: {s.rows} rows, latency {s.latency:g} s, concurrency "
            f"{s.concurrency}, bound N*L/C = {lat['bound_s']:.2f} s, medians of {s.reps}"
        )
        parts.append(
            _table(
                [
                    "variant",
                    "total s",
                    "start-up s",
                    "run s",
                    "efficiency (run)",
                    "efficiency (total)",
                    "p50 latency s",
                    "run CPU s",
                ],
                [
                    [
                        name,
                        v["total_s"],
                        v["startup_s"],
                        v["run_s"],
                        v["efficiency_run"],
                        v["efficiency_total"],
                        v["latency_p50_s"],
                        v["run_cpu_s"],
                    ]
                    for name, v in lat["variants"].items()
                ],
            )
        )
        feas = lat.get("feasibility")
        if feas and feas["needed_images_per_s"]:
            rates = ", ".join(
                f"{name} {rate:.0f}/s" for name, rate in feas["sustainable_images_per_s"].items()
            )
            parts.append(
                f"The bound needs C/L = {feas['needed_images_per_s']:.0f} images/s. CPU per "
                f"image of variant + emulator + S3 (part 2) allows at most, on "
                f"{feas['cpus']} CPUs: {rates}. Where that is below C/L, part 1 is "
                "CPU-bound on this machine, not latency-bound."
            )
    if "cpu" in summary:
        parts.append(
            f"2. CPU-bound: {s.rows} rows, latency 0, concurrency {s.concurrency}, "
            f"medians of {s.cpu_reps}"
        )
        parts.append(
            _table(
                [
                    "variant",
                    "run s",
                    "images/s",
                    "CPU ms/image (run)",
                    "vs baseline",
                    "CPU ms/image (process)",
                    "emulator ms/image",
                    "S3 ms/image",
                ],
                [
                    [
                        name,
                        v["run_s"],
                        v["images_per_s"],
                        v["cpu_ms_per_image_run"],
                        v["cpu_vs_baseline"],
                        v["cpu_ms_per_image_total"],
                        v["emulator_cpu_ms_per_image"],
                        v["s3_cpu_ms_per_image"],
                    ]
                    for name, v in summary["cpu"]["variants"].items()
                ],
            )
        )
    if "scale" in summary:
        parts.append("3. Scale: resume of manifests whose results all exist; validation")
        parts.append(
            _table(
                ["case", "variant", "rows", "total s", "run s", "peak RSS MB", "S3 CPU s"],
                [
                    [
                        r["case"],
                        r["variant"],
                        r["rows"],
                        r["total_s"],
                        r["run_s"],
                        r["max_rss_mb"],
                        r["s3_cpu_s"],
                    ]
                    for r in summary["scale"]
                ],
            )
        )
    share = summary.get("prefect_share", {})
    if share:
        parts.append("4. Prefect's share (flow minus runner, same work)")
        parts.append(
            _table(
                ["part", "run s", "total s", "CPU ms/image"],
                [
                    [
                        part,
                        v.get("run_s_flow_minus_runner"),
                        v.get("total_s_flow_minus_runner"),
                        v.get("cpu_ms_per_image_flow_minus_runner"),
                    ]
                    for part, v in share.items()
                ],
            )
        )
    if summary.get("targets"):
        parts.append("Targets")
        parts.append(
            _table(
                ["target", "measured", "met"],
                [[t["target"], t["measured"], t["met"]] for t in summary["targets"]],
            )
        )
    return "\n\n".join(parts)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--rows", type=int, help="rows of parts 1 and 2 (default 2000)")
    parser.add_argument("--latency", type=float, help="emulator latency of part 1, s (0.2)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (64)")
    parser.add_argument("--reps", type=int, help="repetitions of part 1 (3)")
    parser.add_argument("--cpu-reps", type=int, help="repetitions of part 2 (2)")
    parser.add_argument("--scale-rows", help="resume sizes, comma-separated (10000,100000)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="baseline,runner,flow")
    parser.add_argument("--parts", default=",".join(PARTS), help="latency,cpu,scale")
    parser.add_argument(
        "--no-scale-flow", action="store_true", help="resume with the runner only (no flow)"
    )
    parser.add_argument("--workdir", type=Path, help="keep inputs here (default: a temp dir)")
    parser.add_argument(
        "--prefect-home",
        type=Path,
        default=DEFAULT_PREFECT_HOME,
        help="PREFECT_HOME of the flow runs, kept between benchmarks so its database is made "
        f"once (default {DEFAULT_PREFECT_HOME})",
    )
    parser.add_argument("--json", type=Path, dest="json_path", help="write the results here")
    a = parser.parse_args(argv)
    base = QUICK if a.quick else DEFAULTS

    def pick(name: str) -> Any:
        value = getattr(a, name)
        return base[name] if value is None else value

    variants = [v for v in a.variants.split(",") if v]
    parts = [p for p in a.parts.split(",") if p]
    for v in variants:
        if v not in VARIANTS + EXTRA_VARIANTS:
            known = ", ".join(VARIANTS + EXTRA_VARIANTS)
            parser.error(f"unknown variant {v!r}; expected some of {known}")
    for p in parts:
        if p not in PARTS:
            parser.error(f"unknown part {p!r}; expected some of {', '.join(PARTS)}")
    try:
        scale_rows = [int(x) for x in str(pick("scale_rows")).split(",") if x.strip()]
    except ValueError:
        parser.error("--scale-rows must be comma-separated integers")
    settings = Settings(
        rows=pick("rows"),
        latency=pick("latency"),
        concurrency=pick("concurrency"),
        reps=pick("reps"),
        cpu_reps=pick("cpu_reps"),
        scale_rows=scale_rows,
        variants=variants,
        parts=parts,
        quick=a.quick,
        scale_flow=not a.no_scale_flow and not a.quick,
        workdir=a.workdir or Path(tempfile.mkdtemp(prefix="imgedit-bench-")),
        prefect_home=a.prefect_home,
        json_path=a.json_path,
    )
    if settings.rows < 1 or settings.concurrency < 1 or settings.reps < 1:
        parser.error("--rows, --concurrency and --reps must be at least 1")
    if settings.latency < 0:
        parser.error("--latency must not be negative")
    return settings


def run(s: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    load_start = _loadavg()
    if load_start[0] > 0.5 * (os.cpu_count() or 1):
        log(
            f"warning: load average {load_start[0]:.1f} before starting: other processes use "
            "the CPU, figures will be noisy"
        )
    s.workdir.mkdir(parents=True, exist_ok=True)
    env = child_env(s.prefect_home)
    sources = data.write_sources(s.workdir / "sources")
    bench = Bench(s, env, sources, log)
    log(f"imgedit benchmark in {s.workdir} ({os.cpu_count()} CPUs)")
    if "flow" in s.variants:
        # A fresh PREFECT_HOME creates its database on first use: pay that here, unmeasured.
        fresh = not (s.prefect_home / "prefect.db").exists()
        first = bench.variant("prefect-start", {}, part="setup")
        what = "creating its database" if fresh else "existing database"
        log(f"  Prefect's first start ({what}): {first['total_s']:.1f} s")
    edit = [p for p in s.parts if p in ("latency", "cpu")]
    if edit:
        manifest = data.write_manifest(s.workdir / f"manifest-{s.rows}.csv", sources, s.rows)
        with (
            EmulatorProcess(EmulatorConfig(latency=s.latency)) as emu,
            S3Server(env) as s3,
        ):
            edit_parts(bench, emu, s3, manifest)
    if "scale" in s.parts:
        scale_part(bench)
    summary = summarize(s, bench.runs)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": _loadavg(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()},
        "summary": summary,
        "runs": bench.runs,
        "failed_reps": bench.failures,
        "bench_s": time.perf_counter() - started,
    }
    return result


def _loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = run(settings, log)
    except BenchError as exc:
        log(f"benchmark failed: {exc}")
        return 1
    print(report(settings, result["summary"]))
    for failure in result["failed_reps"]:
        print(
            f"{failure['variant']} failed repetition {failure['rep']} of part {failure['part']}"
            f" (left out of the medians): {failure['error']}"
        )
    print(f"\n(benchmark took {result['bench_s']:.0f} s; inputs in {settings.workdir})")
    if settings.json_path:
        settings.json_path.write_text(json.dumps(result, indent=2, default=str))
        print(f"results written to {settings.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
