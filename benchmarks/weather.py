"""Runs under API weather: `python -m benchmarks.weather [--rows N --time-scale S ...]`.

Two parts, each variant in its own process against the emulator and moto's S3 on loopback:

a. `gateway` weather (lognormal latency, p50 ~2.5 s and p95 ~6 s at time scale 1, failures
   and 429s in bursts) at concurrency C, fixed (a `-adaptive` variant: C as the ceiling): the
   runner and the flow. Efficiency is the ideal wall time from the emulator's ledger (the sum
   of every request's service time / C) over the run's own wall time (start-up excluded);
   beside it the bound (`timeline.greedy_makespan`: what no client beats without sending a
   request twice) and where the rest went (`timeline.breakdown`).
b. `overloaded` weather (K requests admitted at once, a 429 with Retry-After above K):
   adaptive concurrency with a ceiling of 2K against fixed concurrency 2K, by the runner:
   wall time, the ideal, rows through and out of attempts, 429s, possible double charges and
   the limit it ended at.

`--time-scale` divides every latency and wait of the weather, so the shape of a real gateway
fits in minutes. Figures vary with the machine's load: compare variants of one run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.process import EmulatorProcess

from . import data
from .servers import S3Server, child_env
from .spawn import run_variant
from .timeline import breakdown

BUCKET = "imgedit-weather"
TIMEOUT_S = 1200.0
TARGET_EFFICIENCY = 0.97


def _variant(name: str, args: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    return run_variant(name, args, env, TIMEOUT_S)[0]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="imgedit-weather-"))
    env = child_env(work / "prefect-home")
    sources = data.write_sources(work / "sources")
    manifest = data.write_manifest(work / "manifest.csv", sources, args.rows)
    # New jobs for a second run on the same output (`-learned`): other prompts.
    again_manifest = work / "manifest-again.csv"
    with manifest.open(newline="") as src, again_manifest.open("w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=list(reader.fieldnames or ()))
        writer.writeheader()
        writer.writerows({**row, "prompt": row["prompt"] + ", again"} for row in reader)
    out: dict[str, Any] = {"gateway": [], "overloaded": []}
    with EmulatorProcess(EmulatorConfig()) as emu, S3Server(env) as s3:

        def run(
            name: str, prefix: str, concurrency: int, fixed: bool, again: bool = False
        ) -> dict[str, Any]:
            if not again:
                s3.reset([BUCKET])
            emu.reset()
            result = _variant(
                name,
                {
                    "manifest": str(again_manifest if again else manifest),
                    "api_base": emu.base_url,
                    "concurrency": concurrency,
                    "fixed_concurrency": fixed,
                    "s3_endpoint_url": s3.endpoint_url,
                    "output": f"s3://{BUCKET}/{prefix}",
                },
                env,
            )
            stats = emu.stats()
            split = breakdown(
                emu.requests(), concurrency, result["run_started"], result["run_ended"]
            )
            return {**result, "emulator": stats, "timeline": split}

        # Every request in the log: the timeline needs them all.
        emu.configure(request_log_size=max(10_000, 5 * args.rows))
        emu.configure(weather="gateway", weather_time_scale=args.time_scale, fault_seed=7)
        for name in args.variants.split(",") if "gateway" in args.parts else ():
            # "runner-adaptive": the same against an adaptive limit with C as its ceiling;
            # "runner-learned": adaptive again, on the output a "-adaptive" variant just ran
            # on (so starting where it ended), with new jobs.
            program, _, mode = name.partition("-")
            if mode == "learned":
                r = run(program, f"gateway-{program}-adaptive", args.concurrency, False, True)
            else:
                r = run(program, f"gateway-{name}", args.concurrency, mode != "adaptive")
            ideal = r["emulator"]["service_seconds_total"] / args.concurrency
            out["gateway"].append(
                {
                    "variant": name,
                    "run_s": round(r["run_s"], 2),
                    "ideal_s": round(ideal, 2),
                    "efficiency": round(ideal / r["run_s"], 3),
                    "bound_efficiency": round(ideal / r["timeline"]["bound_s"], 3),
                    "requests": r["emulator"]["requests"],
                    "timeline": r["timeline"],
                    "by_status": r["by_status"],
                    "concurrency": r.get("concurrency"),
                }
            )
        k = args.capacity
        if "overloaded" not in args.parts:
            return _result(args, out)
        emu.configure(
            weather="overloaded",
            weather_capacity=k,
            weather_time_scale=args.time_scale,
            latency=args.overloaded_latency,
            retry_after=1.0,
        )
        for label, fixed in (("adaptive", False), ("fixed", True)):
            r = run("runner", f"overloaded-{label}", 2 * k, fixed)
            concurrency = r.get("concurrency") or {}
            out["overloaded"].append(
                {
                    "variant": f"{label} (ceiling {2 * k})" if not fixed else f"fixed {2 * k}",
                    "run_s": round(r["run_s"], 2),
                    "429s": r["emulator"]["rate_limited_overload"],
                    "requests": r["emulator"]["requests"],
                    "possible_double_charges": r["possible_double_charges"],
                    "final_limit": concurrency.get("final"),
                    "succeeded": r["succeeded"],
                    "failed": r["by_status"].get("failed", 0),
                    "ideal_s": round(r["emulator"]["service_seconds_total"] / k, 2),
                }
            )
    return _result(args, out)


def _result(args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "settings": vars(args),
        **out,
    }


def report(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"{s['rows']} rows, time scale {s['time_scale']:g}, {result['cpus']} CPUs, "
        f"load {result['loadavg'][0]:.1f}, {result['date']}",
        f"a. gateway weather, concurrency {s['concurrency']} fixed "
        f"(target efficiency >= {TARGET_EFFICIENCY})",
        "   variant   run s   ideal s   efficiency   requests   bound s   bound eff."
        "   lead s   idle slots   tail s   trail s",
    ]
    for r in result["gateway"]:
        t = r["timeline"]
        conc = r.get("concurrency") or {}
        if conc.get("mode") == "adaptive":
            lines.append(
                f"   ({r['variant']}: started at {conc.get('start')}, ended at "
                f"{conc.get('final')}, {conc.get('cuts')} cuts, {conc.get('storms')} storms)"
            )
        lines.append(
            f"   {r['variant']:8s} {r['run_s']:7.1f} {r['ideal_s']:9.1f} "
            f"{r['efficiency']:12.3f} {r['requests']:10d} {t['bound_s']:9.1f} "
            f"{r['bound_efficiency']:12.3f} {t['lead_s']:8.1f} {t['idle_slots']:12.1f} "
            f"{t['tail_s']:8.1f} {t['trail_s']:9.1f}"
        )
    lines.append(
        "   (bound: the ledger's requests in arrival order, each started as a slot frees: "
        "the best a client does without sending any twice)"
    )
    lines += [
        f"b. overloaded weather, K = {s['capacity']} admitted at once",
        "   variant              run s  ideal s  succeeded  failed    429s   requests"
        "   double charges   final limit",
    ]
    for r in result["overloaded"]:
        lines.append(
            f"   {r['variant']:20s} {r['run_s']:6.1f} {r['ideal_s']:8.1f} {r['succeeded']:10d} "
            f"{r['failed']:7d} {r['429s']:7d} {r['requests']:10d} "
            f"{r['possible_double_charges']:16d} {r['final_limit']!s:>13s}"
        )
    lines.append(
        "   (ideal: the admitted requests' service time / K; failed rows ran out of attempts "
        "and a later run sends them again)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1500)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--time-scale", type=float, default=10.0)
    p.add_argument("--capacity", type=int, default=16, help="K of the overloaded weather")
    p.add_argument("--overloaded-latency", type=float, default=0.2)
    p.add_argument("--parts", default="gateway,overloaded", help="gateway,overloaded")
    p.add_argument(
        "--variants",
        default="runner,flow",
        help="of part a: runner,flow (-adaptive: not fixed; -learned: adaptive again after it)",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = p.parse_args(argv)
    result = measure(args)
    print(json.dumps(result) if args.json else report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
