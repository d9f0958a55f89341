"""The `edit-manifest` Prefect flow: coarse chunk tasks over the async engine in `pipeline`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.runtime import deployment as deployment_runtime
from prefect.runtime import flow_run as flow_run_runtime
from prefect.states import Cancelled
from prefect.utilities.annotations import quote
from pydantic import Field

from flows.artifacts import publish_contact_sheet
from flows.limits import api_slots, rate_permits
from flows.shards import ShardOutcome, finished_earlier, run_shard
from pipeline.constants import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CHUNKS_IN_FLIGHT,
    DEFAULT_CONCURRENCY,
    DEFAULT_HTTP_TIMEOUT_S,
    DEFAULT_LEASE_S,
    DEFAULT_LIMIT_NAME,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RETRY_SECONDS,
    DEFAULT_TIMEOUT_S,
)
from pipeline.engine import layout
from pipeline.engine.chunk import ChunkStats, process_chunk, skip_chunk
from pipeline.engine.context import RunContext
from pipeline.engine.options import RunOptions
from pipeline.engine.plan import RunPlan, check_run_inputs, describe_plan, new_run_id, plan_run
from pipeline.engine.results import utcnow
from pipeline.engine.run import (
    OutputState,
    RunHooks,
    RunParts,
    execute,
    finalize_run,
    plan_reading_output,
)
from pipeline.engine.run_control import INTERRUPTED
from pipeline.engine.run_log import run_log
from pipeline.engine.summary import (
    RunSummary,
    describe_concurrency,
    merge_results,
    write_summary,
)
from pipeline.errors import ConfigError, ImgEditError
from pipeline.io.storage import open_storage
from pipeline.manifest.types import ParsedRow

SUMMARY_ARTIFACT_KEY = "imgedit-run-summary"
PROGRESS_ARTIFACT_KEY = "imgedit-run-progress"
EDIT_MANIFEST_FLOW = "edit-manifest"
# The deployment prefect.yaml creates; shards run there unless told otherwise.
DEFAULT_SHARD_DEPLOYMENT = "edit-manifest/edit-manifest"
SHARD_OWN_OPTIONS = frozenset(
    {"run_id", "row_start", "row_end", "max_cost_usd", "strict", "dry_run_estimate", "limit"}
)


class RunAborted(ImgEditError):
    """The run stopped on a run-fatal API error; its results table says which rows are left."""


# Tasks carry live objects (the run context) and large row lists: nothing to cache or persist.
@task(name="plan-run", cache_policy=NO_CACHE, persist_result=False)
def plan_task(opts: RunOptions, run_id: str) -> RunPlan:
    return plan_run(opts, run_id)


@task(
    name="edit-chunk",
    task_run_name="chunk-{chunk}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def edit_chunk_task(ctx: RunContext, chunk: int, rows: Sequence[ParsedRow]) -> ChunkStats:
    return await process_chunk(ctx, chunk, rows)


@task(name="finalize-run", cache_policy=NO_CACHE, persist_result=False)
def finalize_task(
    ctx: RunContext, plan: RunPlan, stats: list[ChunkStats], started_at: Any, started: float
) -> RunSummary:
    return finalize_run(ctx, plan, stats, started_at=started_at, started=started)


@flow(name=EDIT_MANIFEST_FLOW, persist_result=False, validate_parameters=True)
async def edit_manifest(
    manifest: str,
    output: str,
    run_id: str | None = None,
    api_base: str | None = None,
    model: str | None = None,
    concurrency: Annotated[int, Field(ge=1, le=1024)] = DEFAULT_CONCURRENCY,
    fixed_concurrency: bool = False,
    max_attempts: Annotated[int, Field(ge=1, le=50)] = DEFAULT_MAX_ATTEMPTS,
    max_retry_seconds: Annotated[float, Field(gt=0)] = DEFAULT_MAX_RETRY_SECONDS,
    request_timeout: Annotated[float, Field(gt=0)] = DEFAULT_TIMEOUT_S,
    source_timeout: Annotated[float, Field(gt=0)] = DEFAULT_HTTP_TIMEOUT_S,
    chunk_size: Annotated[int, Field(ge=1, le=100000)] = DEFAULT_CHUNK_SIZE,
    chunks_in_flight: Annotated[int, Field(ge=1, le=16)] = DEFAULT_CHUNKS_IN_FLIGHT,
    response_format: Literal["b64_json", "url"] = "b64_json",
    overwrite: bool = False,
    strict: bool = False,
    s3_endpoint_url: str | None = None,
    max_cost_usd: Annotated[float | None, Field(ge=0)] = None,
    dry_run_estimate: bool = False,
    retry_failed_of: str | None = None,
    select_ids: list[str] | None = None,
    select_where: str | None = None,
    manifest_version: Annotated[str | None, Field(max_length=256)] = None,
    row_start: Annotated[int, Field(ge=1)] = 1,
    row_end: Annotated[int | None, Field(ge=1)] = None,
    limit: Annotated[int | None, Field(ge=1)] = None,
    allow_private_sources: bool = False,
    exclusive_output: bool = False,
    lease_seconds: Annotated[float, Field(gt=0)] = DEFAULT_LEASE_S,
    api_limit: str | None = DEFAULT_LIMIT_NAME,
    shards: Annotated[int, Field(ge=1, le=1000)] = 1,
    shard_deployment: str | None = None,
) -> dict[str, Any] | State[Any]:
    """Edit every row of a manifest and store results, sidecars and a results table.

    Args:
        manifest: Manifest: local path or s3://, CSV or Parquet
        output: Output root: a local folder or s3://bucket/prefix
        run_id: Name of this run's folder under runs/ (default: a new id)
        api_base: API base URL; empty: IMGEDIT_API_BASE, else the Lumenfall gateway
        model: Model name sent to the API; empty: IMGEDIT_MODEL, else p-image-edit
        concurrency: Most edit requests in flight at once (the adaptive limit's ceiling)
        fixed_concurrency: Keep `concurrency` requests in flight instead of adapting: by default the
            limit starts low, backs off on 429s and climbs while the API keeps up
        max_attempts: Attempts per row, the first one included
        max_retry_seconds: Seconds one row may spend retrying
        request_timeout: Seconds before an attempt counts as lost
        source_timeout: Seconds to fetch one http(s) source before its row fails
        chunk_size: Rows per Prefect task
        chunks_in_flight: Chunk tasks running at once, sharing one limit
        response_format: How results travel: inline base64, or a URL fetched at once
        overwrite: Redo rows whose results already exist
        strict: Fail before any API call if any row or source is invalid
        s3_endpoint_url: S3 endpoint (MinIO, R2, moto); empty: AWS_ENDPOINT_URL_S3, else AWS
        max_cost_usd: Budget in USD: no request starts once it could be passed
        dry_run_estimate: Price the run with the API's dry run of its first row
        retry_failed_of: Only redo the rows that failed in this earlier run id
        select_ids: Only the rows with these ids (a backfill)
        select_where: Only rows where this expression holds, e.g. seed > 10 and size == "1:1"
            (comparisons, and/or/not, in [...], contains/startswith/isnull...; not Python)
        manifest_version: The version (S3 ETag) of the manifest to read: a scaled-out run gives
            its shards the one its plan read; a manifest changed since is an error
        row_start: First manifest row of this run (shards set it)
        row_end: Row after the last one of this run (shards)
        limit: Only the first N rows the run would edit (after any selection): try a few first
        allow_private_sources: Also fetch http(s) sources from loopback and private networks
            (ignored on workers with IMGEDIT_ALLOWED_ROOTS)
        exclusive_output: No other run writes to this output now: lets a run start on a store that
            ignores conditional writes, where jobs cannot be claimed
        lease_seconds: Seconds a claim or open marker of this run lives without renewal
        api_limit: Prefect global concurrency limit shared by every run and worker (its '-rpm' twin,
            if any, limits requests per minute); none: local limit only
        shards: Split the manifest into this many child flow runs of `shard_deployment`, for several
            workers to share (manifest and output must be on storage every worker reaches, e.g.
            s3://)
        shard_deployment: 'flow/deployment' the shards run as (default: this deployment, else edit-
            manifest/edit-manifest)
    """
    # The parameters as Prefect passed them, before any other local name exists.
    given = dict(locals())
    logger = get_run_logger()
    started, started_at = time.perf_counter(), utcnow()
    opts = RunOptions.model_validate({name: given[name] for name in RunOptions.model_fields})
    if shards > 1 and limit is not None:
        raise ConfigError("limit is for trying a few rows first: run it without shards")
    rid = run_id or new_run_id(started_at)
    check_run_inputs(opts)
    storage = open_storage(output, endpoint_url=s3_endpoint_url)
    read: Future[OutputState] | None = None
    # The run's log, captured from the plan on, is stored beside its results once the plan
    # has passed (a run whose plan fails leaves the output untouched).
    with run_log(storage, rid, kept=False) as captured:
        if shards > 1:  # each shard reads the output itself
            plan = plan_task(opts, rid)
        else:
            plan, read = plan_reading_output(opts, storage, lambda: plan_task(opts, rid))
        captured.keep()
        logger.info(describe_plan(plan))
        if shards > 1:
            if plan.opened is not None:
                plan.opened.close()  # each shard opens the manifest itself
            summary = await fan_out(
                opts, rid, plan, shards, shard_deployment, api_limit, started_at, started
            )
        else:
            summary = await execute(
                opts,
                plan,
                hooks=FlowHooks(api_limit),
                parts=RunParts(storage=storage, output=read),
                started_at=started_at,
                started=started,
            )
        await asyncio.gather(
            publish_contact_sheet(
                summary.results_uri, output, summary.run_id, s3_endpoint_url, allow_private_sources
            ),
            acreate_table_artifact(
                key=SUMMARY_ARTIFACT_KEY,
                table=summary.table(),
                description=f"imgedit run {summary.run_id}: {manifest} -> {output}",
            ),
        )
        logger.info(
            "run %s done: %s; cost %s %.4f;%s results %s",
            summary.run_id,
            ", ".join(f"{k} {v}" for k, v in summary.by_status.items() if v),
            summary.currency,
            summary.cost_usd,
            f" concurrency {describe_concurrency(summary.concurrency)};"
            if summary.concurrency
            else "",
            summary.results_uri,
        )
    if summary.stop_kind == INTERRUPTED:
        # Not a failure of the run: a person or a supervisor stopped it, and what was paid is
        # stored. Cancelled carries the summary, so the caller still gets its numbers.
        left = summary.skipped_by_reason.get(INTERRUPTED, 0)
        return Cancelled(
            message=f"run {summary.run_id} {summary.stopped_by}: {left} rows left; run the "
            f"same command again to continue. Results: {summary.results_uri}",
            data=summary.to_dict(),
        )
    if summary.stopped_by:
        raise RunAborted(
            f"run {summary.run_id} stopped: {summary.stopped_by}. "
            f"{summary.skipped_by_reason.get('stopped', 0)} rows were not attempted; fix the "
            f"cause and run the same command again to continue. Results: {summary.results_uri}"
        )
    return summary.to_dict()


async def edit_subflow(**params: Any) -> dict[str, Any] | State[Any]:
    """`edit-manifest` as a subflow of another flow: its summary, or, when it was
    interrupted, its Cancelled state, for the calling flow to end with too."""
    state: State[Any] = await edit_manifest(**params, return_state=True)
    if state.is_cancelled():
        return state
    summary: dict[str, Any] = await state.aresult()
    return summary


class FlowHooks(RunHooks):
    """The engine's run sequence as the flow runs it: chunks as Prefect tasks, the shared API
    limit leased for the edit phase, a progress artifact updated as chunks end."""

    def __init__(self, api_limit: str | None) -> None:
        self.api_limit = api_limit
        self.log = get_run_logger()
        self.tracker: ProgressTracker | None = None

    @contextlib.asynccontextmanager
    async def limits(self, ctx: RunContext, plan: RunPlan) -> AsyncIterator[None]:
        async with api_slots(self.api_limit, ctx.config.concurrency, self.log) as slots:
            ctx.set_concurrency(slots)
            ctx.permits = await rate_permits(self.api_limit, slots)
            self.tracker = await ProgressTracker.start(plan.run_id, plan.rows)
            yield

    async def chunk(self, ctx: RunContext, index: int, rows: Sequence[ParsedRow]) -> ChunkStats:
        assert self.tracker is not None
        # quote: else Prefect walks every row of every chunk, twice, looking for futures
        # among the task's arguments (~0.15 s a chunk of 1000 rows).
        return await self.tracker.after(edit_chunk_task(ctx, index, quote(rows)))

    async def skip(self, ctx: RunContext, index: int, rows: Sequence[ParsedRow]) -> ChunkStats:
        assert self.tracker is not None
        return await self.tracker.after(skip_chunk(ctx, index, rows))

    def finalize(
        self,
        ctx: RunContext,
        plan: RunPlan,
        stats: list[ChunkStats],
        started_at: datetime,
        started: float,
    ) -> RunSummary:
        return finalize_task(ctx, plan, stats, started_at, started)


class ProgressTracker:
    """The run's progress artifact, updated as each chunk ends (not per row: one API call)."""

    def __init__(self, artifact_id: UUID, total: int) -> None:
        self.artifact_id = artifact_id
        self.total = max(total, 1)
        self.done = 0
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, run_id: str, total: int) -> ProgressTracker:
        artifact_id = await acreate_progress_artifact(
            progress=0.0, key=PROGRESS_ARTIFACT_KEY, description=f"imgedit run {run_id}: rows done"
        )
        return cls(artifact_id, total)

    async def after(self, chunk: Awaitable[ChunkStats]) -> ChunkStats:
        stats = await chunk
        self.done += stats.rows
        # One update at a time, each sending the latest count: concurrent chunks' updates
        # could otherwise reach the server out of order and leave an old value standing.
        async with self._lock:
            await aupdate_progress_artifact(
                self.artifact_id, progress=min(100.0, 100.0 * self.done / self.total)
            )
        return stats


def shard_parameters(opts: RunOptions) -> dict[str, Any]:
    """The parameters every shard of a scaled-out run gets: every option of the run but those
    that make it a shard (its id and rows), its budget (shared out by `fan_out`) and what only
    the parent does (the strict plan, the dry run, a limit)."""
    return opts.model_dump(mode="json", exclude=set(SHARD_OWN_OPTIONS))


def shard_ranges(first: int, rows: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal row ranges [start, end) covering `rows` rows from `first`."""
    shards = max(1, min(shards, rows))
    size, extra = divmod(rows, shards)
    ranges, start = [], first
    for i in range(shards):
        end = start + size + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


async def fan_out(
    opts: RunOptions,
    rid: str,
    plan: RunPlan,
    shards: int,
    shard_deployment: str | None,
    api_limit: str | None,
    started_at: datetime,
    started: float,
) -> RunSummary:
    """Send contiguous row ranges to child flow runs on the work pool; merge their results."""
    logger = get_run_logger()
    deployment = shard_deployment or _this_deployment()
    ranges = shard_ranges(opts.row_start, plan.rows, shards)
    base = shard_parameters(opts)
    if plan.opened is not None:
        # Every shard reads the version of the manifest this plan read (and counted).
        base["manifest_version"] = plan.opened.file.etag
    if opts.max_cost_usd is not None:
        # Each shard gets its share of the budget, so together they cannot pass it.
        base["max_cost_usd"] = opts.max_cost_usd / len(ranges)
    shard_ids = [layout.shard_run_id(rid, i) for i in range(len(ranges))]
    logger.info("run %s: %d shards on %r", rid, len(ranges), deployment)
    storage = open_storage(opts.output, endpoint_url=opts.s3_endpoint_url)
    # Stable across retries of this flow run (they find their children again); a new run
    # with the same run id starts new children for the shards that did not finish.
    parent_key = str(flow_run_runtime.id or rid)

    async def shard(i: int, shard_id: str, start: int, end: int) -> ShardOutcome:
        if await asyncio.to_thread(finished_earlier, storage, shard_id):
            logger.info("shard %s of run %s went through earlier: not started again", i, rid)
            return ShardOutcome(shard_id, None, "Completed earlier", 0, completed=True)
        return await run_shard(
            deployment,
            {
                **base,
                "api_limit": api_limit,
                "run_id": shard_id,
                "row_start": start,
                "row_end": end,
            },
            shard_id=shard_id,
            name=f"{rid}-shard-{i}",
            parent_key=parent_key,
            logger=logger,
        )

    outcomes = await asyncio.gather(
        *(
            shard(i, shard_id, start, end)
            for i, (shard_id, (start, end)) in enumerate(zip(shard_ids, ranges, strict=True))
        )
    )
    failed = [f"{o.flow_run} ({o.state or 'no state'})" for o in outcomes if not o.completed]
    present = [sid for sid in shard_ids if storage.exists(layout.results_key(sid))]
    results_uri, totals = merge_results(storage, [layout.results_key(sid) for sid in present], rid)
    stopped = "; ".join(failed) if failed else None
    shard_report = [
        {"run_id": o.run_id, "flow_run": o.flow_run, "state": o.state, "attempts": o.attempts}
        for o in outcomes
    ]
    return write_summary(
        storage,
        rid,
        plan,
        results_uri,
        totals,
        started_at=started_at,
        started=started,
        stopped_by=f"shards did not complete: {stopped}" if stopped else None,
        extra={"shards": shard_report},
    )


def _this_deployment() -> str:
    """This flow run's deployment, or (for a subflow or a local run) the one prefect.yaml makes."""
    name = deployment_runtime.name
    flow_name = flow_run_runtime.flow_name
    if name and flow_name == EDIT_MANIFEST_FLOW:
        return f"{flow_name}/{name}"
    return DEFAULT_SHARD_DEPLOYMENT
