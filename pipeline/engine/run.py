"""A whole run without an orchestrator: plan the manifest, edit it chunk by chunk, merge results."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import spec
from pipeline.constants import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CHUNKS_IN_FLIGHT,
    DEFAULT_CONCURRENCY,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RETRY_SECONDS,
)
from pipeline.engine import done_index, layout, progress
from pipeline.engine.chunk import ChunkStats, process_chunk, run_windowed, skip_chunk
from pipeline.engine.claims import Claims
from pipeline.engine.claims import probe as claims_probe
from pipeline.engine.client import EditClient, ResponseFormat, check_credentials
from pipeline.engine.interrupts import stop_on_signals
from pipeline.engine.results import (
    STATUSES,
    failed_rows_of,
    merge_tables_to_file,
    read_parquet_bytes,
    rows_done_before,
    temp_parquet_path,
    utcnow,
)
from pipeline.engine.retry import RetryPolicy
from pipeline.engine.run_control import RunStop
from pipeline.engine.run_log import run_log
from pipeline.engine.runner import RunConfig, RunContext, io_thread_pool, request_for
from pipeline.engine.source_check import validate_with_sources
from pipeline.engine.sources import DEFAULT_HTTP_TIMEOUT, SourceLoader
from pipeline.errors import APIError, ConfigError, ManifestError, SourceError
from pipeline.io.allowed_roots import AllowedRoots, check_allowed
from pipeline.io.netguard import source_policy
from pipeline.io.storage import Storage, open_storage
from pipeline.manifest.open import (
    Manifest,
    RowRange,
    ValidationReport,
    format_report,
    open_manifest,
    validate_manifest,
)
from pipeline.manifest.select import check_ids, select_rows
from pipeline.manifest.types import ManifestRow, ParsedRow
from pipeline.manifest.where import parse_where

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides credentials (those come from the environment)."""

    manifest: str
    output: str
    run_id: str | None = None
    api_base: str | None = None
    model: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_retry_seconds: float = DEFAULT_MAX_RETRY_SECONDS
    request_timeout: float = 120.0
    # Seconds to fetch one http(s) source image before its row fails.
    source_timeout: float = DEFAULT_HTTP_TIMEOUT
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunks_in_flight: int = DEFAULT_CHUNKS_IN_FLIGHT
    response_format: ResponseFormat = "b64_json"
    overwrite: bool = False
    strict: bool = False
    s3_endpoint_url: str | None = None
    # Stop starting requests once spent plus in flight could pass this (USD).
    max_cost_usd: float | None = None
    # Price the run with the API's dry run on its first valid row instead of the list price.
    dry_run_estimate: bool = False
    # A selection (a backfill): only rows that pass every criterion given are edited; the
    # others end `skipped` (not selected). See pipeline.manifest.select.
    retry_failed_of: str | None = None  # the rows that ended `failed` in this earlier run
    select_ids: tuple[str, ...] = ()
    select_where: str | None = None  # a pandas expression over the manifest's columns
    # Only rows `row_start <= row < row_end` (a shard of a scaled-out run); others are absent.
    row_start: int = 1
    row_end: int | None = None
    # Only the first `limit` rows the run may edit (after any selection): try a few first.
    limit: int | None = None
    # Fetch http(s) sources from loopback, private and link-local addresses too (see
    # pipeline.io.netguard); a worker with IMGEDIT_ALLOWED_ROOTS ignores it.
    allow_private_sources: bool = False
    # No other run writes to the output: lets a run start on a store that ignores
    # conditional writes (no claims there); see pipeline.engine.claims.
    exclusive_output: bool = False
    # How long a claim or open marker of this run lives without renewal (see claims).
    lease_seconds: float = DEFAULT_LEASE_S

    @property
    def row_range(self) -> RowRange | None:
        return (
            None
            if self.row_start <= 1 and self.row_end is None
            else (
                self.row_start,
                self.row_end,
            )
        )

    def run_config(self) -> RunConfig:
        return RunConfig(
            concurrency=self.concurrency,
            retry=RetryPolicy(max_attempts=self.max_attempts, max_seconds=self.max_retry_seconds),
            response_format=self.response_format,
            overwrite=self.overwrite,
            max_cost_usd=self.max_cost_usd,
        )


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    manifest: str
    output: str
    rows: int
    valid: int
    invalid: int
    images: int  # output images the rows left ask for
    estimated_cost_usd: float
    report: ValidationReport
    rows_left: int = 0  # valid rows in the selection not finished by earlier runs
    rows_done: int = 0  # rows earlier runs of this manifest on this output finished
    only_rows: set[int] | None = None  # the selection (see selected_rows); None: every row


@dataclass
class RunSummary:
    run_id: str
    manifest: str
    output: str
    results_uri: str
    summary_uri: str
    rows: int
    by_status: dict[str, int]
    skipped_by_reason: dict[str, int]
    images: int
    cost_usd: float
    currency: str
    possible_double_charges: int
    possible_double_charge_usd: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    elapsed_s: float
    started_at: str
    finished_at: str
    stopped_by: str | None = None
    estimated_cost_usd: float | None = None
    # "stopped" (a run-fatal API error, storage that cannot take results) or "interrupted"
    # (Ctrl-C, SIGTERM); None when the run went through.
    stop_kind: str | None = None
    # Answers without a trusted cost (missing, negative, NaN, absurd...): their images at the
    # run's price, which is what the budget counted them at.
    cost_assumed_usd: float = 0.0
    distrusted_costs: int = 0
    # Rows that waited on another run's claim of their job; requests abandoned unanswered
    # when an interrupted run stopped waiting (each may have been charged).
    claims_waited: int = 0
    abandoned: int = 0
    storage_failures: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> list[dict[str, Any]]:
        """The summary as metric/value rows, for a table artifact or a terminal."""
        rows: list[dict[str, Any]] = [{"metric": "rows", "value": self.rows}]
        rows += [{"metric": s, "value": self.by_status.get(s, 0)} for s in STATUSES]
        rows += [
            {"metric": f"skipped: {reason}", "value": n}
            for reason, n in sorted(self.skipped_by_reason.items())
        ]
        rows += [
            {"metric": "images", "value": self.images},
            {"metric": f"cost ({self.currency})", "value": round(self.cost_usd, 4)},
            {"metric": "possible double charges", "value": self.possible_double_charges},
            {
                "metric": f"possible double charge ({self.currency})",
                "value": round(self.possible_double_charge_usd, 4),
            },
            {
                "metric": f"cost assumed, not reported ({self.currency})",
                "value": round(self.cost_assumed_usd, 4),
            },
            {"metric": "costs not trusted", "value": self.distrusted_costs},
            {"metric": "rows that waited on another run", "value": self.claims_waited},
            {"metric": "requests abandoned unanswered", "value": self.abandoned},
            {"metric": "latency p50 (s)", "value": _round(self.latency_p50_s)},
            {"metric": "latency p95 (s)", "value": _round(self.latency_p95_s)},
            {"metric": "elapsed (s)", "value": round(self.elapsed_s, 2)},
            {"metric": "results", "value": self.results_uri},
        ]
        if self.stopped_by:
            rows.append({"metric": "stopped by", "value": self.stopped_by})
        return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def new_run_id(now: datetime | None = None) -> str:
    now = now or utcnow()
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_flow_inputs(
    *,
    manifest: str | None,
    output: str,
    where: str | None = None,
    ids: Sequence[str] = (),
    source_prefix: str | None = None,
) -> None:
    """Refuse, before any row is read, what no row can fix: a manifest, catalogue prefix or
    output outside the worker's allowed roots, a `where` that is not the safe expression
    language, an id list no form should hold."""
    roots = AllowedRoots.from_env()
    if manifest is not None:
        check_allowed(manifest, "manifest", roots)
    if source_prefix is not None:
        check_allowed(source_prefix, "source_prefix", roots)
    check_allowed(output, "output", roots)
    if where is not None:
        parse_where(where)
    check_ids(ids)


def check_run_inputs(opts: RunOptions) -> None:
    check_flow_inputs(
        manifest=opts.manifest, output=opts.output, where=opts.select_where, ids=opts.select_ids
    )
    check_credentials(opts.api_base)


def plan_run(opts: RunOptions, run_id: str, storage: Storage | None = None) -> RunPlan:
    """Validate the whole manifest (streaming, no API call); with `strict`, refuse invalid rows.

    The estimate counts only what is left: rows in the run's selection that earlier runs of
    this manifest on this output did not finish (see run_history.rows_done_before; the run
    itself checks each job, so a changed source is still edited).
    """
    check_run_inputs(opts)
    storage = storage or open_storage(opts.output, endpoint_url=opts.s3_endpoint_url)
    only = selected_rows(opts, storage)
    done = set() if opts.overwrite else rows_done_before(storage, opts.manifest)

    def left(row: int) -> bool:
        return (only is None or row in only) and row not in done

    if opts.strict:
        # Strict: what the run would fail on (a missing, unusable or refused source or mask)
        # refuses the run too, before any API call.
        report = validate_with_sources(
            opts.manifest,
            endpoint_url=opts.s3_endpoint_url,
            row_range=opts.row_range,
            concurrency=opts.concurrency,
            source_timeout=opts.source_timeout,
            policy=source_policy(opts.allow_private_sources),
            left=left,
        )
    else:
        report = validate_manifest(
            opts.manifest, endpoint_url=opts.s3_endpoint_url, row_range=opts.row_range, left=left
        )
    if opts.strict and report.invalid:
        raise ManifestError(
            f"--strict: {report.invalid} of {report.rows} rows are invalid; nothing was sent.\n"
            + format_report(report)
        )
    images_left = report.images if report.images_left is None else report.images_left
    return RunPlan(
        run_id=run_id,
        manifest=opts.manifest,
        output=opts.output,
        rows=report.rows,
        valid=report.valid,
        invalid=report.invalid,
        images=images_left,
        estimated_cost_usd=round(images_left * spec.PRICE_PER_IMAGE_USD, 6),
        report=report,
        rows_left=report.valid if report.rows_left is None else report.rows_left,
        rows_done=len(done),
        only_rows=only,
    )


def describe_plan(plan: RunPlan) -> str:
    """The plan in one line for the run's log: what is left, and what it should cost."""
    done = f"; {plan.rows_done} done in earlier runs" if plan.rows_done else ""
    return (
        f"run {plan.run_id}: {plan.rows} rows ({plan.invalid} invalid{done}); "
        f"{plan.rows_left} rows left to edit, about {plan.images} images, estimated cost "
        f"{spec.CURRENCY} {plan.estimated_cost_usd:.2f}"
    )


def iter_chunks(
    manifest: Manifest, chunk_size: int, row_range: RowRange | None = None
) -> Iterator[tuple[int, Sequence[ParsedRow]]]:
    yield from enumerate(manifest.batches(chunk_size, row_range))


@dataclass(frozen=True)
class RunParts:
    """What a run would otherwise build itself: given here by tests and embedders."""

    storage: Storage | None = None
    api_transport: httpx.AsyncBaseTransport | None = None


def open_context(
    opts: RunOptions, run_id: str, parts: RunParts | None = None, plan: RunPlan | None = None
) -> RunContext:
    """Storage, API client and source loader for a run, and the set of jobs already done."""
    parts = parts or RunParts()
    storage = parts.storage or open_storage(opts.output, endpoint_url=opts.s3_endpoint_url)
    config = opts.run_config()
    client = EditClient(
        transport=parts.api_transport,
        base_url=opts.api_base,
        model=opts.model,
        timeout=opts.request_timeout,
        # The limiter keeps at most `concurrency` requests (and their downloads) in flight;
        # idle connections beyond that only cost CPU (see client.CONNECTIONS_PER_POOL).
        max_connections=opts.concurrency,
        price_per_image_usd=config.price_per_image_usd,
    )
    io_executor = io_thread_pool(config.concurrency)
    claims = Claims(
        storage,
        run_id,
        partial(_in_thread, io_executor),
        lease_s=opts.lease_seconds,
        enabled=claims_supported(storage, opts),
    )
    done = (
        done_index.DoneJobs(set())
        if opts.overwrite
        else done_index.load_done(storage, claims=claims.enabled)
    )
    if done.keys:
        log.info("%d jobs already done under %s", len(done.keys), storage.root_uri)
    if done.recovered:
        log.info("%d jobs of killed runs were found done and indexed", done.recovered)
    if done.check_unindexed:
        log.warning(
            "%d chunks of other runs under %s are open without a lease (an older version, or "
            "a store without conditional writes): each row still to edit is first checked for "
            "a stored result (`imgedit reindex` clears the markers of killed runs)",
            done.open_chunks,
            storage.root_uri,
        )
    return RunContext(
        run_id=run_id,
        storage=storage,
        client=client,
        loader=SourceLoader(
            endpoint_url=opts.s3_endpoint_url,
            http_timeout=opts.source_timeout,
            executor=io_executor,
            roots=AllowedRoots.from_env(),
            policy=source_policy(opts.allow_private_sources),
        ),
        config=config,
        done_keys=done.keys,
        check_unindexed=done.check_unindexed,
        io_executor=io_executor,
        only_rows=plan.only_rows if plan is not None else selected_rows(opts, storage),
        claims=claims,
    )


async def _in_thread(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, partial(fn, *args))


def claims_supported(storage: Storage, opts: RunOptions) -> bool:
    """Whether the run claims its jobs: the store honours conditional writes (probed once).

    Where it does not, the run refuses to start unless `exclusive_output` says no other run
    writes to the output, and then runs without claims (a warning says so).
    """
    if claims_probe(storage):
        return True
    if not opts.exclusive_output:
        raise ConfigError(
            f"the store of {storage.root_uri} ignores conditional writes (If-None-Match), so "
            "two runs on this output could pay for the same edits twice and nothing could "
            "stop them. Run with --exclusive-output (flow: exclusive_output) if no other run "
            "writes to this output while this one runs; nothing was sent"
        )
    log.warning(
        "the store of %s ignores conditional writes: running without claims, on your word "
        "that no other run writes to this output now",
        storage.root_uri,
    )
    return False


def selected_rows(opts: RunOptions, storage: Storage) -> set[int] | None:
    """The rows this run may edit when it is a selection (a backfill), else None (all)."""
    if not (opts.select_ids or opts.select_where or opts.retry_failed_of):
        if opts.limit is None:
            return None
        first = max(opts.row_start, 1)
        last = first + opts.limit
        return set(range(first, last if opts.row_end is None else min(last, opts.row_end)))
    rows = select_rows(
        opts.manifest,
        ids=opts.select_ids or None,
        where=opts.select_where,
        failed_rows=failed_rows_of(storage, opts.retry_failed_of) if opts.retry_failed_of else None,
        endpoint_url=opts.s3_endpoint_url,
    )
    if opts.limit is not None:
        rows = set(sorted(rows)[: opts.limit])
    return rows


async def preflight(ctx: RunContext, opts: RunOptions, plan: RunPlan) -> RunPlan:
    """With `dry_run_estimate`, price the run by the API's dry run of its first valid row.

    The dry run also proves the key and model before any paid request: a 401/402/404 here
    stops the run with nothing spent.
    """
    if not opts.dry_run_estimate or not plan.valid:
        return plan
    with open_manifest(opts.manifest, endpoint_url=opts.s3_endpoint_url) as manifest:
        first = next(r for r in manifest.rows() if isinstance(r, ManifestRow))
    try:
        estimate = await ctx.client.estimate(await request_for(ctx, first))
    except APIError as exc:
        if exc.run_fatal:
            ctx.stop.trip(exc)
            raise
        log.warning("dry-run estimate failed (%s); using the list price", exc)
        return plan
    except SourceError as exc:
        log.warning("dry-run estimate skipped: row %d cannot be loaded (%s)", first.row, exc)
        return plan
    unit = estimate.total_cost_usd / first.params.image_count()
    ctx.config = replace(ctx.config, price_per_image_usd=unit)
    log.info("dry run: USD %.4f per image", unit)
    return replace(plan, estimated_cost_usd=round(plan.images * unit, 6))


async def close_context(ctx: RunContext) -> None:
    if ctx.claims is not None:
        await ctx.claims.stop()
        # A stopped run gives back what it still holds: the next run need not wait for it.
        await ctx.claims.release(list(ctx.claims.held))
    await ctx.client.aclose()
    await ctx.loader.aclose()
    ctx.close()


SUMMARY_COLUMNS = [
    "status",
    "reason",
    "cost",
    "currency",
    "n_outputs",
    "latency_s",
    "possible_double_charges",
    "possible_double_charge_usd",
    "error_code",
    "claim_wait_s",
    "cost_raw",
]


def merge_results(
    storage: Storage,
    table_keys: Sequence[str],
    run_id: str,
    in_memory: Mapping[str, bytes] | None = None,
) -> tuple[str, pa.Table]:
    """Stream result tables (chunk parts, or shards' tables) into the run's results table.

    `in_memory` holds parts that could not be written when their rows finished: they are
    merged from memory. Returns the table's URI and the columns a summary needs.
    """
    held = in_memory or {}
    path = temp_parquet_path()
    try:
        tables = (
            read_parquet_bytes(held[key] if key in held else storage.get_bytes(key))
            for key in table_keys
        )
        merge_tables_to_file(tables, path)
        uri = storage.put_file(layout.results_key(run_id), path)
        return uri, pq.read_table(path, columns=SUMMARY_COLUMNS)
    finally:
        path.unlink(missing_ok=True)


def write_summary(
    storage: Storage,
    run_id: str,
    plan: RunPlan,
    results_uri: str,
    table: pa.Table,
    *,
    started_at: datetime,
    started: float,
    stop: RunStop | None = None,
    stopped_by: str | None = None,
    price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD,
) -> RunSummary:
    summary = RunSummary(
        **summarize(table, price_per_image_usd),
        run_id=run_id,
        manifest=plan.manifest,
        output=plan.output,
        results_uri=results_uri,
        summary_uri=storage.uri_for(layout.summary_key(run_id)),
        elapsed_s=time.perf_counter() - started,
        started_at=started_at.isoformat(),
        finished_at=utcnow().isoformat(),
        stopped_by=stop.reason if stop is not None and stop.stopped else stopped_by,
        stop_kind=stop.kind if stop is not None else ("stopped" if stopped_by else None),
        estimated_cost_usd=plan.estimated_cost_usd,
    )
    storage.put_bytes(
        layout.summary_key(run_id),
        json.dumps(summary.to_dict(), indent=2).encode(),
        "application/json",
    )
    return summary


def finalize_run(
    ctx: RunContext,
    plan: RunPlan,
    stats: Sequence[ChunkStats],
    *,
    started_at: datetime,
    started: float,
) -> RunSummary:
    """Merge the chunk parts into the run's results table and write its summary."""
    keys = [key for s in stats for key in s.part_keys]
    results_uri, table = merge_results(ctx.storage, keys, ctx.run_id, ctx.unwritten_parts)
    return write_summary(
        ctx.storage,
        ctx.run_id,
        plan,
        results_uri,
        table,
        started_at=started_at,
        started=started,
        stop=ctx.stop,
        price_per_image_usd=ctx.config.price_per_image_usd,
    )


def summarize(
    table: pa.Table, price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD
) -> dict[str, Any]:
    """Counts, cost and latency percentiles from a results table (or its SUMMARY_COLUMNS)."""
    status = table.column("status")
    by_status = {s: int(pc.sum(pc.equal(status, s)).as_py() or 0) for s in STATUSES}
    skipped = table.filter(pc.equal(status, "skipped"))
    reasons = pc.value_counts(skipped.column("reason").fill_null("unknown")).to_pylist()
    succeeded = table.filter(pc.equal(status, "succeeded"))
    latency = succeeded.column("latency_s").drop_null()
    p50 = p95 = None
    if len(latency):
        q = pc.quantile(latency, q=[0.5, 0.95]).to_pylist()
        p50, p95 = q[0], q[1]
    currencies = [c for c in pc.unique(table.column("currency").drop_null()).to_pylist() if c]
    answered = table.filter(pc.is_valid(table.column("n_outputs")))
    unpriced = answered.filter(pc.is_null(answered.column("cost")))
    codes = table.column("error_code")
    return {
        "rows": table.num_rows,
        "by_status": by_status,
        "skipped_by_reason": {r["values"]: int(r["counts"]) for r in reasons},
        "images": _sum(succeeded.column("n_outputs")),
        "cost_usd": round(float(pc.sum(table.column("cost")).as_py() or 0.0), 6),
        "currency": currencies[0]
        if len(currencies) == 1
        else "/".join(currencies) or spec.CURRENCY,
        "possible_double_charges": _sum(table.column("possible_double_charges")),
        "possible_double_charge_usd": round(
            float(pc.sum(table.column("possible_double_charge_usd")).as_py() or 0.0), 6
        ),
        "latency_p50_s": p50,
        "latency_p95_s": p95,
        "cost_assumed_usd": round(_sum(unpriced.column("n_outputs")) * price_per_image_usd, 6),
        "distrusted_costs": int(pc.sum(pc.is_valid(table.column("cost_raw"))).as_py() or 0),
        "claims_waited": int(pc.sum(pc.is_valid(table.column("claim_wait_s"))).as_py() or 0),
        "abandoned": int(pc.sum(pc.equal(codes, "abandoned")).as_py() or 0),
        "storage_failures": int(pc.sum(pc.equal(codes, "storage_error")).as_py() or 0),
    }


def _sum(column: pa.ChunkedArray) -> int:
    return int(pc.sum(column).as_py() or 0)


async def run_manifest(opts: RunOptions, parts: RunParts | None = None) -> RunSummary:
    """Plan, edit and finalize a whole manifest in this process (the engine without Prefect)."""
    started, started_at = time.perf_counter(), utcnow()
    run_id = opts.run_id or new_run_id(started_at)
    plan = plan_run(opts, run_id, parts.storage if parts else None)
    log.info(describe_plan(plan))
    progress.publish_plan(run_id, plan.rows, plan.estimated_cost_usd)
    ctx = open_context(opts, run_id, parts, plan)
    try:
        with run_log(ctx.storage, run_id), stop_on_signals(ctx.stop):
            plan = await preflight(ctx, opts, plan)
            ctx.start()
            with open_manifest(opts.manifest, endpoint_url=opts.s3_endpoint_url) as manifest:
                stats = await run_windowed(
                    iter_chunks(manifest, opts.chunk_size, opts.row_range),
                    lambda i, rows: process_chunk(ctx, i, rows),
                    window=opts.chunks_in_flight,
                    stopped=lambda: ctx.stop.stopped,
                    skip=lambda i, rows: skip_chunk(ctx, i, rows),
                )
            return finalize_run(ctx, plan, stats, started_at=started_at, started=started)
    finally:
        await close_context(ctx)


__all__ = [
    "RunOptions",
    "RunParts",
    "RunPlan",
    "RunSummary",
    "close_context",
    "describe_plan",
    "finalize_run",
    "iter_chunks",
    "merge_results",
    "new_run_id",
    "open_context",
    "plan_run",
    "preflight",
    "run_manifest",
]
