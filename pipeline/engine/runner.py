"""The async engine's rows: each manifest row to exactly one result, paid at most once.

A valid row's sources are loaded and hashed into a job key; a job already done is skipped;
otherwise the run claims the job (see `pipeline.engine.claims`), edits it under the run's limits
(`pipeline.engine.run_control`) with retries, stores its images and then its sidecar, and reports
it to its chunk's journal (see `pipeline.engine.chunk`), which indexes it and gives the claim back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline import __version__, spec
from pipeline.constants import DEFAULT_CHUNK_SIZE, DEFAULT_CHUNKS_IN_FLIGHT, DEFAULT_CONCURRENCY
from pipeline.engine import layout
from pipeline.engine.claims import Claims
from pipeline.engine.client import EditClient, EditRequest, EditResponse, ImagePart, ResponseFormat
from pipeline.engine.jobkey import job_key
from pipeline.engine.results import (
    SKIP_BUDGET,
    SKIP_DONE,
    SKIP_DUPLICATE,
    SKIP_INTERRUPTED,
    SKIP_NOT_SELECTED,
    SKIP_STOPPED,
    ResultRow,
    utcnow,
)
from pipeline.engine.retry import RetryPolicy, retrying
from pipeline.engine.run_control import (
    Abandoned,
    ApiHealth,
    BatchedPermits,
    Budget,
    BudgetExhausted,
    GateTimeout,
    RateGate,
    RunStop,
    RunStopped,
    StorageHealth,
)
from pipeline.engine.sources import Source, SourceLoader, redact_uri
from pipeline.errors import APIError, RateLimitError, SourceError, StorageError
from pipeline.io.storage import Storage
from pipeline.manifest.types import InvalidRow, ManifestRow, ParsedRow

if TYPE_CHECKING:
    from pipeline.engine.chunk import ChunkJournal

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rows being loaded or stored besides those waiting on the API, per unit of concurrency.
WORKERS_PER_SLOT = 2


@dataclass(frozen=True)
class RunConfig:
    concurrency: int = DEFAULT_CONCURRENCY
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    response_format: ResponseFormat = "b64_json"
    overwrite: bool = False
    price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD
    max_cost_usd: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.max_cost_usd is not None and self.max_cost_usd < 0:
            raise ValueError("max_cost_usd must not be negative")


class RunContext:
    """What the chunks of one run share in one process: clients, limits, claims, the done set."""

    def __init__(
        self,
        *,
        run_id: str,
        storage: Storage,
        client: EditClient,
        loader: SourceLoader,
        config: RunConfig,
        done_keys: set[str] | None = None,
        check_unindexed: bool = False,
        io_executor: ThreadPoolExecutor | None = None,
        only_rows: set[int] | None = None,
        claims: Claims | None = None,
    ) -> None:
        self.run_id = layout.check_run_id(run_id)
        self.storage = storage
        self.client = client
        self.loader = loader
        self.config = config
        self.done_keys: set[str] = done_keys if done_keys is not None else set()
        # The done index may miss jobs that a chunk without claims committed: check a job's
        # sidecar before editing it (see pipeline.engine.done_index).
        self.check_unindexed = check_unindexed
        self.stop = RunStop()
        self.storage_health = StorageHealth(self.stop)
        self.api_health = ApiHealth(self.stop)
        self.budget = Budget(config.max_cost_usd)
        self.gate = RateGate()
        self.limiter = asyncio.Semaphore(config.concurrency)
        self._inflight: dict[str, asyncio.Future[ResultRow]] = {}
        self.io_executor = io_executor or io_thread_pool(config.concurrency)
        # When set, rows not in it end `skipped` (not selected) without any I/O.
        self.only_rows = only_rows
        # When set, every request takes a permit first (a shared rate limit).
        self.permits: BatchedPermits | None = None
        # One claim per job edited, across runs; None: this run is the output's only writer.
        self.claims = claims
        # Results parts that could not be written: kept here, written with the final table.
        self.unwritten_parts: dict[str, bytes] = {}

    def start(self) -> None:
        """Start what runs beside the rows: the renewal of claims and open markers."""
        if self.claims is not None:
            self.claims.start()

    def set_concurrency(self, limit: int) -> None:
        """Change the request limit; only before the first request of the run."""
        self.config = replace(self.config, concurrency=limit)
        self.limiter = asyncio.Semaphore(limit)

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.io_executor, partial(fn, *args, **kwargs)
        )

    def close(self) -> None:
        self.stop.close()
        self.io_executor.shutdown(wait=True)


def io_thread_pool(concurrency: int) -> ThreadPoolExecutor:
    """Threads for blocking storage and source I/O (boto3, files), sized to the concurrency.

    asyncio's default pool has only cpu+4 threads: at concurrency 64 writes would queue.
    """
    return ThreadPoolExecutor(
        max_workers=max(8, concurrency * WORKERS_PER_SLOT), thread_name_prefix="imgedit-io"
    )


# --- result rows ---------------------------------------------------------------------------


def _requested_size(row: ManifestRow) -> str | None:
    p = row.params
    if p.size:
        return p.size
    if p.aspect_ratio or p.resolution:
        return "/".join(x for x in (p.aspect_ratio, p.resolution) if x)
    return None


def _base_result(row: ManifestRow) -> ResultRow:
    return ResultRow(
        row=row.row,
        id=row.id,
        status="failed",
        prompt=row.prompt,
        seed=row.seed,
        # Pre-signed URLs carry keys in their query string: none of that is stored.
        source_uris=[redact_uri(u) for u in row.images],
        n_requested=row.params.image_count(),
        requested_size=_requested_size(row),
        started_at=utcnow(),
    )


def invalid_result(row: InvalidRow) -> ResultRow:
    now = utcnow()
    first = row.errors[0] if row.errors else None
    return ResultRow(
        row=row.row,
        id=row.id,
        status="invalid",
        error_code="invalid_row",
        error_message=row.message,
        error_column=first.column if first else None,
        started_at=now,
        finished_at=now,
    )


def not_selected_result(row: ParsedRow) -> ResultRow:
    now = utcnow()
    return ResultRow(
        row=row.row,
        id=row.id,
        status="skipped",
        reason=SKIP_NOT_SELECTED,
        started_at=now,
        finished_at=now,
    )


def stopped_result(ctx: RunContext, row: ParsedRow) -> ResultRow:
    """The result of a row the stopped run never started: skipped (or invalid, as it is)."""
    if ctx.only_rows is not None and row.row not in ctx.only_rows:
        return not_selected_result(row)
    if isinstance(row, InvalidRow):
        return invalid_result(row)
    result = _base_result(row)
    result.finished_at = result.started_at
    return _stopped(ctx, result)


def _finish(result: ResultRow, started: float) -> ResultRow:
    result.finished_at = utcnow()
    result.elapsed_s = time.perf_counter() - started
    return result


def _done(result: ResultRow) -> ResultRow:
    result.status = "skipped"
    result.reason = SKIP_DONE
    return result


def _stopped(ctx: RunContext, result: ResultRow) -> ResultRow:
    result.status = "skipped"
    result.reason = SKIP_INTERRUPTED if ctx.stop.interrupted else SKIP_STOPPED
    if ctx.stop.reason is not None:
        result.error_code = ctx.stop.code
        result.error_message = f"not attempted: the run stopped on {ctx.stop.reason}"
    return result


def _duplicate(result: ResultRow, first: ResultRow) -> ResultRow:
    """A second row with the same job key: no second edit, it shares the first's outputs."""
    result.status = "skipped" if first.status in ("succeeded", "skipped") else first.status
    result.reason = SKIP_DUPLICATE
    result.output_uris = list(first.output_uris)
    result.actual_size = first.actual_size
    result.output_format = first.output_format
    result.n_outputs = first.n_outputs
    result.revised_prompt = first.revised_prompt
    if first.status not in ("succeeded", "skipped"):
        result.error_code = first.error_code
        result.error_message = f"same job as row {first.row}, which ended {first.status}"
    return result


# --- a row ---------------------------------------------------------------------------------


async def process_row(
    ctx: RunContext, row: ParsedRow, journal: ChunkJournal | None = None
) -> ResultRow:
    """One manifest row to exactly one result row; never raises for a row's own failure."""
    if ctx.only_rows is not None and row.row not in ctx.only_rows:
        return not_selected_result(row)
    if isinstance(row, InvalidRow):
        return invalid_result(row)
    started = time.perf_counter()
    result = _base_result(row)
    try:
        return _finish(await _process_valid(ctx, row, result, journal), started)
    except Exception as exc:  # a bug must cost one row, not the run
        log.exception("row %s: unexpected error", row.row)
        result.status = "failed"
        result.error_code = "internal_error"
        result.error_message = f"{type(exc).__name__}: {exc}"
        return _finish(result, started)


async def _process_valid(
    ctx: RunContext, row: ManifestRow, result: ResultRow, journal: ChunkJournal | None
) -> ResultRow:
    if ctx.stop.stopped:
        return _stopped(ctx, result)
    try:
        sources = await _load_sources(ctx, row)
        mask = await ctx.loader.load_mask(row.mask, sources[0]) if row.mask else None
    except SourceError as exc:
        result.status = "invalid"
        result.error_code = "source_error"
        result.error_column = exc.column
        result.error_message = f"row {row.row}: column {exc.column}: {exc}"
        return result

    key = job_key(
        model=ctx.client.model,
        image_sha256=[s.sha256 for s in sources],
        mask_sha256=mask.sha256 if mask else None,
        prompt=row.prompt,
        seed=row.seed,
        params=row.params,
    )
    result.job_key = key
    result.sidecar_uri = ctx.storage.uri_for(layout.sidecar_key(key))
    overwrite = ctx.config.overwrite
    if key in ctx.done_keys and not overwrite:
        return _done(result)
    first = ctx._inflight.get(key)
    if first is not None:
        return _duplicate(result, await asyncio.shield(first))
    # From here this row is the one working on the job in this process: other rows with the
    # same key wait for its result instead of claiming the job themselves.
    future: asyncio.Future[ResultRow] = asyncio.get_running_loop().create_future()
    ctx._inflight[key] = future
    claimed = False
    try:
        if await _already_done(ctx, key, result, journal):
            return _done(result)
        if ctx.claims is not None:
            chunk = journal.chunk if journal is not None else None
            got = await ctx.claims.acquire(
                key, chunk, lambda: ctx.stop.stopped, check_done=not overwrite
            )
            if got.waited_s:
                result.claim_wait_s = round(got.waited_s, 3)
            if got.state == "stopped":
                return _stopped(ctx, result)
            if got.state == "done":
                ctx.done_keys.add(key)
                if journal is not None:
                    journal.found(key)
                return _done(result)
            claimed = True
        await _edit_and_store(ctx, row, sources, mask, result, journal)
        return result
    except StorageError as exc:
        ctx.storage_health.failed(exc)
        result.status = "failed"
        result.error_code = "storage_error"
        result.error_message = f"cannot claim or check the job in the output: {exc}"
        return result
    finally:
        del ctx._inflight[key]
        future.set_result(result)
        if claimed and ctx.claims is not None and result.status != "succeeded":
            # Nothing to index: give the job back now for whoever runs it next.
            await ctx.claims.release([key])


async def _already_done(
    ctx: RunContext, key: str, result: ResultRow, journal: ChunkJournal | None
) -> bool:
    """With the done index not to be trusted alone (no claims), a HEAD of the sidecar."""
    if not ctx.check_unindexed or ctx.config.overwrite:
        return False
    found = await ctx.io(ctx.storage.exists, layout.sidecar_key(key))
    if found:
        ctx.done_keys.add(key)
        if journal is not None:
            journal.found(key)
    return found


async def request_for(ctx: RunContext, row: ManifestRow) -> EditRequest:
    """The request a row would send (its sources loaded); raises SourceError."""
    sources = await _load_sources(ctx, row)
    mask = await ctx.loader.load_mask(row.mask, sources[0]) if row.mask else None
    return _request(ctx, row, sources, mask)


async def _load_sources(ctx: RunContext, row: ManifestRow) -> list[Source]:
    column = row.images_column
    if len(row.images) == 1:
        # Most rows: no gather, so no task per row (a cached source then costs no loop turn).
        return [await ctx.loader.load(row.images[0], column=column)]
    return list(await asyncio.gather(*(ctx.loader.load(u, column=column) for u in row.images)))


def _request(
    ctx: RunContext, row: ManifestRow, sources: Sequence[Source], mask: Source | None
) -> EditRequest:
    def part(name: str, s: Source) -> ImagePart:
        fmt = s.info.format
        return ImagePart(
            f"{name}.{fmt}", s.data, spec.CONTENT_TYPES.get(fmt, "application/octet-stream")
        )

    return EditRequest(
        prompt=row.prompt,
        images=[part(f"image{i}", s) for i, s in enumerate(sources)],
        mask=part("mask", mask) if mask else None,
        seed=row.seed,
        params=row.params,
        response_format=ctx.config.response_format,
    )


# --- the edit ------------------------------------------------------------------------------


async def _edit(
    ctx: RunContext, row: ManifestRow, request: EditRequest, result: ResultRow
) -> EditResponse | None:
    """The API's answer after retries, or None with `result` saying why there is none."""
    price = row.params.image_count() * ctx.config.price_per_image_usd
    deadline = time.monotonic() + ctx.config.retry.max_seconds
    lost = 0

    async def attempt() -> EditResponse:
        nonlocal lost
        try:
            await ctx.gate.wait(ctx.stop, deadline)
        except GateTimeout:
            raise _GateClosed from None
        async with ctx.limiter:
            # Checked after the wait for a slot: the run may have stopped meanwhile.
            if ctx.stop.stopped:
                raise RunStopped
            if ctx.permits is not None:
                await ctx.permits.acquire()
            if not ctx.budget.reserve(price):
                raise BudgetExhausted
            result.attempts += 1
            charged: float | None = 0.0
            try:
                with ctx.stop.request():
                    response = await ctx.client.edit(request)
                # Not reported, or not trusted (see client): the worst case, for the budget.
                charged = response.cost if response.cost is not None else None
                ctx.api_health.answered = True
                return response
            except Abandoned:
                lost += 1
                charged = None
                raise
            except APIError as exc:
                if exc.may_have_charged:
                    lost += 1
                    charged = None  # unknown: count the worst case against the budget
                if exc.run_fatal:
                    ctx.stop.trip(exc)
                ctx.api_health.failed(exc)
                if isinstance(exc, RateLimitError) and exc.retry_after:
                    ctx.gate.pause(exc.retry_after)
                log.debug("row %s attempt %s: %s", row.row, result.attempts, exc)
                raise
            finally:
                ctx.budget.settle(price, charged)

    def should_stop() -> bool:
        return ctx.stop.stopped or ctx.budget.exhausted

    try:
        response: EditResponse | None = None
        async for attempt_state in retrying(ctx.config.retry, should_stop=should_stop):
            with attempt_state:
                response = await attempt()
        return response
    except (RunStopped, Abandoned) as exc:
        _stopped(ctx, result)
        if isinstance(exc, Abandoned):
            result.error_code = "abandoned"
            result.error_message = (
                f"abandoned after {ctx.stop.drain_grace_s:g} s without an answer when the run "
                "was interrupted; the API may have charged it"
            )
    except BudgetExhausted:
        result.status = "skipped"
        result.reason = SKIP_BUDGET
        result.error_code = "budget"
        result.error_message = (
            f"not started: it could cost USD {price:.2f} and the run's budget of USD "
            f"{ctx.config.max_cost_usd:.2f} would be passed; a later run can continue it"
        )
    except _GateClosed:
        result.status = "failed"
        result.error_code = "rate_limited"
        result.error_message = (
            "the API asked to wait past this row's time limit "
            f"({ctx.config.retry.max_seconds:g} s); a later run can continue it"
        )
    except APIError as exc:
        result.status = "failed"
        result.error_code = exc.error_code
        result.error_message = str(exc)
        result.request_id = exc.request_id
    finally:
        result.possible_double_charges = lost
        result.possible_double_charge_usd = round(lost * price, 6)
    return None


class _GateClosed(Exception):
    """Internal: the rate gate would hold the row past its time limit (not retried)."""


async def _edit_and_store(
    ctx: RunContext,
    row: ManifestRow,
    sources: Sequence[Source],
    mask: Source | None,
    result: ResultRow,
    journal: ChunkJournal | None = None,
) -> None:
    request = _request(ctx, row, sources, mask)
    response = await _edit(ctx, row, request, result)
    if response is None:
        return
    _record_response(result, response)
    short = len(response.images) < response.n_asked
    try:
        if journal is not None and not short:
            await journal.before_commit()
        await _store(ctx, row, sources, mask, request, response, result, commit=not short)
    except StorageError as exc:
        ctx.storage_health.failed(exc)
        result.status = "failed"
        result.error_code = "storage_error"
        result.error_message = f"edit done and paid, but storing it failed: {exc}"
        result.output_uris = []
        return
    ctx.storage_health.ok()
    if short:
        # Kept, but not done: a later run asks for the whole job again.
        result.status = "failed"
        result.error_code = "short_answer"
        result.error_message = (
            f"asked for {response.n_asked} images, the API answered {len(response.images)}: "
            "kept, not marked done"
        )
        return
    assert result.job_key is not None
    ctx.done_keys.add(result.job_key)
    result.status = "succeeded"
    if journal is not None:
        journal.committed(result.job_key)


def _record_response(result: ResultRow, response: EditResponse) -> None:
    first = response.images[0]
    result.n_outputs = len(response.images)
    result.actual_size = first.info.size
    result.output_format = first.info.format
    result.revised_prompt = next(
        (i.revised_prompt for i in response.images if i.revised_prompt), None
    )
    result.cost = response.cost
    result.cost_raw = response.cost_raw
    result.warnings = "; ".join(response.warnings) or None
    result.currency = response.currency
    result.latency_s = response.latency_s
    result.request_id = response.request_id
    result.provider = response.provider


async def _store(
    ctx: RunContext,
    row: ManifestRow,
    sources: Sequence[Source],
    mask: Source | None,
    request: EditRequest,
    response: EditResponse,
    result: ResultRow,
    *,
    commit: bool = True,
) -> None:
    """Images first, then the sidecar: a job without a sidecar is not done, whatever else exists."""
    assert result.job_key is not None
    keys = [
        layout.image_key(result.job_key, i, img.info.format)
        for i, img in enumerate(response.images)
    ]
    uris = await asyncio.gather(
        *(
            ctx.io(ctx.storage.put_bytes, k, img.data, spec.CONTENT_TYPES.get(img.info.format))
            for k, img in zip(keys, response.images, strict=True)
        )
    )
    result.output_uris = list(uris)
    if not commit:
        return
    sidecar = sidecar_document(ctx, row, sources, mask, request, response, result)
    data = json.dumps(sidecar, indent=2, sort_keys=True, default=str).encode()
    await ctx.io(
        ctx.storage.put_bytes, layout.sidecar_key(result.job_key), data, "application/json"
    )


def sidecar_document(
    ctx: RunContext,
    row: ManifestRow,
    sources: Sequence[Source],
    mask: Source | None,
    request: EditRequest,
    response: EditResponse,
    result: ResultRow,
) -> dict[str, Any]:
    p = row.params
    return {
        "job_key": result.job_key,
        "pipeline_version": __version__,
        "run_id": ctx.run_id,
        "manifest_row": row.row,
        "manifest_id": row.id,
        "model": ctx.client.model,
        "request": {
            "prompt": row.prompt,
            "seed": row.seed,
            "images": [
                {"uri": redact_uri(s.uri), "sha256": s.sha256, "size": s.info.size} for s in sources
            ],
            "mask": {"uri": redact_uri(mask.uri), "sha256": mask.sha256} if mask else None,
            "n": p.n,
            "size": p.size,
            "aspect_ratio": p.aspect_ratio,
            "resolution": p.resolution,
            "quality": p.quality,
            "output_format": p.output_format,
            "output_compression": p.output_compression,
            "user": p.user,
            "extra": p.extra,
            "response_format": request.response_format,
        },
        "response": {
            "id": response.id,
            "created": response.created,
            "size": response.size,
            "output_format": response.output_format,
            "request_id": response.request_id,
            "metadata": response.metadata,
        },
        "outputs": [
            {
                "uri": uri,
                "format": img.info.format,
                "width": img.info.width,
                "height": img.info.height,
                "size": img.info.size,
                "bytes": len(img.data),
                "revised_prompt": img.revised_prompt,
            }
            for uri, img in zip(result.output_uris, response.images, strict=True)
        ],
        "actual_size": result.actual_size,
        "revised_prompt": result.revised_prompt,
        "cost": response.cost,
        "cost_raw": response.cost_raw,
        "warnings": list(response.warnings),
        "currency": response.currency,
        "provider": response.provider,
        "executed_model": response.executed_model,
        "attempts": result.attempts,
        "possible_double_charges": result.possible_double_charges,
        "latency_s": response.latency_s,
        "created_at": utcnow().isoformat(),
    }


__all__ = [
    "DEFAULT_CHUNKS_IN_FLIGHT",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_CONCURRENCY",
    "RunConfig",
    "RunContext",
    "invalid_result",
    "io_thread_pool",
    "not_selected_result",
    "process_row",
    "request_for",
    "sidecar_document",
    "stopped_result",
]
