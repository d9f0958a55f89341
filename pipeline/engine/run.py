"""A whole run without an orchestrator: plan the manifest, edit it chunk by chunk, merge results."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any, TypeVar

import httpx

from pipeline.engine import done_index, progress, source_digests
from pipeline.engine.chunk import ChunkStats, process_chunk, run_windowed, skip_chunk
from pipeline.engine.claims import Claims
from pipeline.engine.claims import probe as claims_probe
from pipeline.engine.client import EditClient
from pipeline.engine.context import RunConfig, RunContext, io_thread_pool
from pipeline.engine.done_keys import DoneKeys
from pipeline.engine.edit import request_for
from pipeline.engine.interrupts import stop_on_signals
from pipeline.engine.learned_limit import read_learned, write_learned
from pipeline.engine.options import ResponseFormat, RunOptions
from pipeline.engine.plan import (
    RunPlan,
    check_run_inputs,
    describe_plan,
    new_run_id,
    plan_run,
    selected_rows,
)
from pipeline.engine.profiles import aload_profile, load_profile
from pipeline.engine.results import (
    utcnow,
)
from pipeline.engine.retry import RetryPolicy
from pipeline.engine.run_log import run_log
from pipeline.engine.sources import SourceLoader
from pipeline.engine.summary import RunSummary, merge_results, write_summary
from pipeline.errors import APIError, ConfigError, SourceError
from pipeline.io.allowed_roots import AllowedRoots
from pipeline.io.netguard import source_policy
from pipeline.io.storage import Storage, open_storage
from pipeline.manifest.open import (
    Manifest,
    RowRange,
    open_manifest,
)
from pipeline.manifest.types import ManifestRow, ParsedRow
from pipeline.models.profile import ModelProfile

log = logging.getLogger(__name__)

T = TypeVar("T")


def run_config(opts: RunOptions, profile: ModelProfile | None = None) -> RunConfig:
    """The run's settings; with `profile`, its list price and a response format it answers."""
    response_format = opts.response_format
    price = RunConfig.price_per_image_usd
    if profile is not None:
        price = profile.cost.price_per_image_usd
        if response_format not in profile.response_formats:
            fallback: ResponseFormat = (
                "b64_json" if "b64_json" in profile.response_formats else "url"
            )
            log.warning(
                "model %s answers only %s: results travel as %s, not %s",
                profile.model,
                ", ".join(profile.response_formats),
                fallback,
                response_format,
            )
            response_format = fallback
    return RunConfig(
        concurrency=opts.concurrency,
        fixed_concurrency=opts.fixed_concurrency,
        retry=RetryPolicy(max_attempts=opts.max_attempts, max_seconds=opts.max_retry_seconds),
        response_format=response_format,
        overwrite=opts.overwrite,
        price_per_image_usd=price,
        max_cost_usd=opts.max_cost_usd,
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
    # The retry backoff (soak tests shorten it); the options set the attempts and time limit.
    retry: RetryPolicy | None = None
    # What the run reads of its output before its rows, being read already (see read_output).
    output: Future[OutputState] | None = None


@dataclass(frozen=True)
class OutputState:
    """What a run reads of its output before its first row: whether it can claim jobs there,
    the jobs done and the sources' digests (a resume of a million rows: 1,000 index segments,
    read in seconds of I/O that `run_manifest` spends beside the plan's seconds of CPU)."""

    claims: bool
    done: done_index.DoneJobs
    digests: source_digests.SourceDigests


def plan_reading_output(
    opts: RunOptions, storage: Storage, plan: Callable[[], RunPlan]
) -> tuple[RunPlan, Future[OutputState] | None]:
    """`plan()`, the output's state read beside it (for `RunParts.output`).

    The output's state is I/O (a resume's done index: a thousand GETs), the plan is CPU: one
    beside the other. Only for an output earlier runs left an index in (and whose inputs have
    passed their checks): reading a new one writes its index, and a run whose plan fails
    must leave a folder untouched. A plan that fails waits for the read.
    """
    output: Future[OutputState] | None = None
    with ThreadPoolExecutor(1, "read-output") as reader:
        if not opts.overwrite and storage.exists(done_index.ROOT_KEY):
            output = reader.submit(read_output, storage, opts)
        planned = plan()
    return planned, output


def read_output(storage: Storage, opts: RunOptions) -> OutputState:
    claims = claims_supported(storage, opts)
    if opts.overwrite:
        return OutputState(claims, done_index.DoneJobs(DoneKeys()), source_digests.SourceDigests())
    done = done_index.load_done(storage, claims=claims, compact_later=True)
    return OutputState(claims, done, source_digests.load(storage))


def open_context(
    opts: RunOptions, run_id: str, parts: RunParts | None = None, plan: RunPlan | None = None
) -> RunContext:
    """Storage, API client and source loader for a run, and the set of jobs already done."""
    parts = parts or RunParts()
    storage = parts.storage or open_storage(opts.output, endpoint_url=opts.s3_endpoint_url)
    profile = (
        plan.profile
        if plan is not None
        else load_profile(opts.model, base_url=opts.api_base, transport=parts.api_transport)
    )
    config = run_config(opts, profile)
    if parts.retry is not None:
        config = replace(config, retry=parts.retry)
    client = EditClient(
        transport=parts.api_transport,
        base_url=opts.api_base,
        model=opts.model,
        timeout=opts.request_timeout,
        # The slots keep at most `concurrency` requests (and their downloads) in flight;
        # idle connections beyond that only cost CPU (see client.CONNECTIONS_PER_POOL).
        max_connections=opts.concurrency,
        price_per_image_usd=config.price_per_image_usd,
        profile=profile,
    )
    state = parts.output.result() if parts.output is not None else read_output(storage, opts)
    done, digests = state.done, state.digests
    io_executor = io_thread_pool(config.concurrency)
    claims = Claims(
        storage,
        run_id,
        partial(_in_thread, io_executor),
        lease_s=opts.lease_seconds,
        enabled=state.claims,
    )
    if done.keys:
        log.info("%d jobs already done under %s", len(done.keys), storage.root_uri)
    if done.recovered:
        log.info("%d jobs of killed runs were found done and indexed", done.recovered)
    if done.orphaned:
        log.warning(
            "%d jobs were claimed by killed runs and have no result: editing them counts as a "
            "possible double charge (the killed run may have paid for them)",
            len(done.orphaned),
        )
    if done.check_unindexed:
        log.warning(
            "%d chunks of other runs under %s are open without a lease (an older version, or "
            "a store without conditional writes): each row still to edit is first checked for "
            "a stored result (`imgedit reindex` clears the markers of killed runs)",
            done.open_chunks,
            storage.root_uri,
        )
    learned = (
        None if opts.fixed_concurrency else read_learned(storage, client.base_url, client.model)
    )
    if learned is not None:
        log.info(
            "adaptive concurrency starts at %d requests in flight (of at most %d), where the "
            "last run against this API and model ended",
            min(learned, opts.concurrency),
            opts.concurrency,
        )
    if len(digests):
        log.info("%d source digests known under %s", len(digests), storage.root_uri)
    ctx = RunContext(
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
        profile=profile,
        orphaned=done.orphaned,
        learned_concurrency=learned,
        source_digests=digests,
    )
    ctx.index_upkeep = _upkeep(done.merge, storage, digests)
    return ctx


def _upkeep(
    merge: Callable[[], None] | None, storage: Storage, digests: source_digests.SourceDigests
) -> Callable[[], None]:
    """The index upkeep run beside the rows: the done index's merge, the digests' too."""

    def upkeep() -> None:
        if merge is not None:
            merge()
        source_digests.compact(storage, digests)

    return upkeep


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


async def preflight(ctx: RunContext, opts: RunOptions, plan: RunPlan) -> RunPlan:
    """With `dry_run_estimate`, price the run by the API's dry run of its first valid row.

    The dry run also proves the key and model before any paid request: a 401/402/404 here
    stops the run with nothing spent.
    """
    if not opts.dry_run_estimate or not plan.valid:
        return plan
    if plan.opened is not None:
        first = next(r for r in plan.opened.rows() if isinstance(r, ManifestRow))
    else:
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
    # Parts this process wrote are merged from memory, not read back (see KeptParts); `held`
    # is left the only holder of the kept ones (stored too, so a second finalize reads them
    # back), so each is freed once merged. Unwritten parts exist nowhere else: kept.
    held = {**ctx.kept_parts.parts, **ctx.unwritten_parts}
    ctx.kept_parts.parts.clear()
    results_uri, totals = merge_results(ctx.storage, keys, ctx.run_id, held)
    if ctx.source_digests.hits:
        log.info(
            "%d rows found done from their sources' digests, without reading the sources",
            ctx.source_digests.hits,
        )
    concurrency = ctx.slots.report()
    write_learned(ctx.storage, ctx.client.base_url, ctx.client.model, concurrency, ctx.run_id)
    return write_summary(
        ctx.storage,
        ctx.run_id,
        plan,
        results_uri,
        totals,
        started_at=started_at,
        started=started,
        stop=ctx.stop,
        price_per_image_usd=ctx.config.price_per_image_usd,
        concurrency=concurrency,
    )


class RunHooks:
    """What an orchestrator adds around the engine's steps; the engine alone adds nothing.

    The `edit-manifest` flow subclasses it to run chunks as Prefect tasks, lease the shared
    API limit and publish progress (flows/edit_manifest.py); `execute` is the one sequence
    both follow, so the CLI's engine and the flow cannot drift apart.
    """

    log: logging.Logger | logging.LoggerAdapter[logging.Logger] = log

    @contextlib.asynccontextmanager
    async def limits(self, ctx: RunContext, plan: RunPlan) -> AsyncIterator[None]:
        """Around the edit phase: shared limits to lease, progress to start."""
        yield

    async def chunk(self, ctx: RunContext, index: int, rows: Sequence[ParsedRow]) -> ChunkStats:
        return await process_chunk(ctx, index, rows)

    async def skip(self, ctx: RunContext, index: int, rows: Sequence[ParsedRow]) -> ChunkStats:
        return await skip_chunk(ctx, index, rows)

    def finalize(
        self,
        ctx: RunContext,
        plan: RunPlan,
        stats: list[ChunkStats],
        started_at: datetime,
        started: float,
    ) -> RunSummary:
        return finalize_run(ctx, plan, stats, started_at=started_at, started=started)


async def execute(
    opts: RunOptions,
    plan: RunPlan,
    *,
    hooks: RunHooks | None = None,
    parts: RunParts | None = None,
    started_at: datetime,
    started: float,
) -> RunSummary:
    """The run after its plan: open, preflight, the chunks, finalize; always closed again."""
    hooks = hooks or RunHooks()
    manifest = plan.opened or open_manifest(opts.manifest, endpoint_url=opts.s3_endpoint_url)
    ctx = open_context(opts, plan.run_id, parts, plan)
    # Merging the done index's segments (a resume after many chunks) writes one and deletes
    # the rest: I/O that need not hold up the rows, so it runs beside them (and is awaited
    # before the run ends).
    upkeep = asyncio.ensure_future(ctx.io(ctx.index_upkeep)) if ctx.index_upkeep else None
    try:
        plan = await preflight(ctx, opts, plan)
        progress.publish_plan(plan.run_id, plan.rows, plan.estimated_cost_usd)
        if opts.max_cost_usd is not None and plan.estimated_cost_usd > opts.max_cost_usd:
            hooks.log.warning(
                "estimated cost USD %.2f is over the budget of USD %.2f: the run stops "
                "starting requests at the budget; later runs can continue",
                plan.estimated_cost_usd,
                opts.max_cost_usd,
            )
        if ctx.done_keys:
            hooks.log.info("%d jobs already done in %s", len(ctx.done_keys), opts.output)
        async with hooks.limits(ctx, plan):
            with stop_on_signals(ctx.stop):
                ctx.start()
                stats = await run_windowed(
                    iter_chunks(manifest, opts.chunk_size, opts.row_range),
                    lambda i, rows: hooks.chunk(ctx, i, rows),
                    window=opts.chunks_in_flight,
                    stopped=lambda: ctx.stop.stopped,
                    # Chunks a stopped run never starts: one quick part each.
                    skip=lambda i, rows: hooks.skip(ctx, i, rows),
                )
        return hooks.finalize(ctx, plan, stats, started_at, started)
    finally:
        if upkeep is not None:
            (outcome,) = await asyncio.gather(upkeep, return_exceptions=True)
            if isinstance(outcome, BaseException):
                log.error("merging the done index's segments failed: %r", outcome)
        manifest.close()
        await close_context(ctx)


async def run_manifest(opts: RunOptions, parts: RunParts | None = None) -> RunSummary:
    """Plan, edit and finalize a whole manifest in this process (the engine without Prefect)."""
    started, started_at = time.perf_counter(), utcnow()
    run_id = opts.run_id or new_run_id(started_at)
    storage = (parts.storage if parts else None) or open_storage(
        opts.output, endpoint_url=opts.s3_endpoint_url
    )
    # The model's profile, once for the run (through the run's own API transport, if any),
    # after the inputs are checked: no request goes out for a run that cannot start.
    check_run_inputs(opts)
    profile = await aload_profile(
        opts.model, base_url=opts.api_base, transport=parts.api_transport if parts else None
    )
    # Captured from the plan on (what the output's read beside it logs too, e.g. dead claims
    # cleared), stored only once the plan has passed.
    with run_log(storage, run_id, kept=False) as captured:
        plan, output = plan_reading_output(
            opts, storage, lambda: plan_run(opts, run_id, storage, profile)
        )
        captured.keep()
        parts = replace(parts or RunParts(), storage=storage, output=output)
        log.info(describe_plan(plan))
        return await execute(opts, plan, parts=parts, started_at=started_at, started=started)
