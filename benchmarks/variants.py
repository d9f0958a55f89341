"""One measured variant in its own process: `python -m benchmarks.variants NAME JSON`.

The process prints one line `BENCH-RESULT {...}` with what only it can see: when its run
started and ended (so the parent can split start-up from the run), the CPU its run used
(its own threads plus live children, e.g. Prefect's server), and what the run reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from .proc import cpu_seconds, descendants, tree_cpu_seconds

RESULT_PREFIX = "BENCH-RESULT "
IMPORTED_AT = time.time()


def _emit(result: dict[str, Any]) -> None:
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)


async def _timed(run: Callable[[], Awaitable[Any]]) -> tuple[Any, dict[str, Any]]:
    pid = os.getpid()
    t0, c0, k0 = time.time(), cpu_seconds(pid), tree_cpu_seconds(pid) - cpu_seconds(pid)
    value = await run()
    t1, c1, k1 = time.time(), cpu_seconds(pid), tree_cpu_seconds(pid) - cpu_seconds(pid)
    return value, {
        "run_started": t0,
        "run_ended": t1,
        "run_s": t1 - t0,
        "run_cpu_s": c1 - c0,
        "run_children_cpu_s": k1 - k0,
        "children": len(descendants(pid)),
    }


async def baseline(args: dict[str, Any]) -> dict[str, Any]:
    from .baseline import main

    stored, timing = await _timed(
        lambda: main(
            args["manifest"],
            args["api_base"],
            args["bucket"],
            args["prefix"],
            args["concurrency"],
            args["s3_endpoint_url"],
        )
    )
    return {**timing, "succeeded": stored}


async def runner(args: dict[str, Any]) -> dict[str, Any]:
    from pipeline.engine.options import RunOptions
    from pipeline.engine.run import run_manifest

    opts = RunOptions(
        manifest=args["manifest"],
        output=args["output"],
        api_base=args["api_base"],
        concurrency=args["concurrency"],
        s3_endpoint_url=args["s3_endpoint_url"],
        # The edit benchmark compares fixed concurrency; the weather one sets it.
        fixed_concurrency=args.get("fixed_concurrency", True),
    )
    summary, timing = await _timed(lambda: run_manifest(opts))
    return {**timing, **_summary_fields(summary.to_dict())}


async def runner_noclaims(args: dict[str, Any]) -> dict[str, Any]:
    """The runner with claims off (as on a store without conditional writes, with
    --exclusive-output): beside `runner`, what claiming each job costs."""
    import pipeline.engine.run

    pipeline.engine.run.claims_probe = lambda storage: False  # type: ignore[assignment]
    from pipeline.engine.options import RunOptions
    from pipeline.engine.run import run_manifest

    opts = RunOptions(
        manifest=args["manifest"],
        output=args["output"],
        api_base=args["api_base"],
        concurrency=args["concurrency"],
        s3_endpoint_url=args["s3_endpoint_url"],
        exclusive_output=True,
    )
    summary, timing = await _timed(lambda: run_manifest(opts))
    return {**timing, **_summary_fields(summary.to_dict())}


async def flow(args: dict[str, Any]) -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    from flows.edit_manifest import edit_manifest

    imported = time.time()
    # The ephemeral API server starts on the first client call: start it before the clock
    # runs, so the run's time is the flow's (with Prefect's per-run calls), not the start-up.
    async with get_client() as client:
        await client.hello()
    server_ready = time.time()
    summary, timing = await _timed(
        lambda: edit_manifest(
            manifest=args["manifest"],
            output=args["output"],
            api_base=args["api_base"],
            concurrency=args["concurrency"],
            s3_endpoint_url=args["s3_endpoint_url"],
            fixed_concurrency=args.get("fixed_concurrency", True),
        )
    )
    return {
        **timing,
        **_summary_fields(summary),
        "import_s": imported - IMPORTED_AT,
        "server_start_s": server_ready - imported,
    }


async def prefect_start(args: dict[str, Any]) -> dict[str, Any]:
    """Start Prefect's ephemeral server once (a fresh PREFECT_HOME creates its database)."""
    from prefect.client.orchestration import get_client

    async def hello() -> None:
        async with get_client() as client:
            await client.hello()

    _, timing = await _timed(hello)
    return timing


async def validate(args: dict[str, Any]) -> dict[str, Any]:
    from pipeline.manifest.open import validate_manifest

    async def check() -> Any:
        return validate_manifest(args["manifest"], endpoint_url=args.get("s3_endpoint_url"))

    report, timing = await _timed(check)
    return {
        **timing,
        "rows": report.rows,
        "valid": report.valid,
        "estimated_cost_usd": report.estimated_cost_usd,
    }


def _summary_fields(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "by_status": summary["by_status"],
        "skipped_by_reason": summary["skipped_by_reason"],
        "succeeded": summary["by_status"].get("succeeded", 0),
        "elapsed_s": summary["elapsed_s"],
        "latency_p50_s": summary["latency_p50_s"],
        "latency_p95_s": summary["latency_p95_s"],
        "possible_double_charges": summary.get("possible_double_charges", 0),
        "concurrency": summary.get("concurrency"),
    }


VARIANTS: dict[str, Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]] = {
    "baseline": baseline,
    "runner": runner,
    "runner-noclaims": runner_noclaims,
    "flow": flow,
    "prefect-start": prefect_start,
    "validate": validate,
}


def main() -> None:
    name, raw = sys.argv[1], sys.argv[2]
    result = asyncio.run(VARIANTS[name](json.loads(raw)))
    result["exiting"] = time.time()
    _emit(result)


if __name__ == "__main__":
    main()
