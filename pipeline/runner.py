"""The async engine: edits a chunk of manifest rows under bounded concurrency, a result each."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from . import __version__, done_index, layout, progress, spec
from .client import EditClient, EditRequest, EditResponse, ImagePart, ResponseFormat
from .errors import APIError, RateLimitError, SourceError, StorageError
from .jobkey import job_key
from .results import (
    SKIP_BUDGET,
    SKIP_DONE,
    SKIP_DUPLICATE,
    SKIP_NOT_SELECTED,
    SKIP_STOPPED,
    ResultRow,
    rows_to_table,
    table_to_parquet_bytes,
    utcnow,
)
from .retry import RetryPolicy, retrying
from .rows import InvalidRow, ManifestRow, ParsedRow
from .sources import Source, SourceLoader, redact_uri
from .storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONCURRENCY = 16
DEFAULT_CHUNK_SIZE = 1000
# Two chunks in flight share one request limit, so the API stays busy while a chunk drains.
DEFAULT_CHUNKS_IN_FLIGHT = 2
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


class RunStopped(Exception):
    """Internal: a run-fatal error elsewhere stopped the run before this row's next attempt."""


class BudgetExhausted(Exception):
    """Internal: starting this request could pass the run's --max-cost."""


class Budget:
    """`--max-cost`: no request starts once spent plus in flight could pass the limit.

    Each attempt reserves its worst case (n x price) before it starts and settles to what
    the API reported (or, for a lost answer, the worst case) when it ends.
    """

    def __init__(self, max_cost_usd: float | None) -> None:
        self.max_cost_usd = max_cost_usd
        self.spent = 0.0
        self.in_flight = 0.0
        self.refused = False

    @property
    def exhausted(self) -> bool:
        return self.refused

    def reserve(self, amount: float) -> bool:
        if self.max_cost_usd is not None and (
            self.spent + self.in_flight + amount > self.max_cost_usd + 1e-9
        ):
            self.refused = True
            return False
        self.in_flight += amount
        return True

    def settle(self, reserved: float, charged: float) -> None:
        self.in_flight -= reserved
        self.spent += charged


class BatchedPermits:
    """Permits for requests (e.g. a requests-per-minute limit) fetched `batch` at a time.

    Fetching a permit from a remote limiter costs a round trip; one fetch per batch keeps that
    off the per-request path.
    """

    def __init__(self, take: Callable[[int], Awaitable[None]], batch: int) -> None:
        self._take = take
        self.batch = batch
        self._left = 0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            if self._left == 0:
                await self._take(self.batch)
                self._left = self.batch
            self._left -= 1


class RunStop:
    """The first run-fatal error (401, 402, unknown model) stops every new request of the run."""

    def __init__(self) -> None:
        self.error: APIError | None = None

    @property
    def stopped(self) -> bool:
        return self.error is not None

    def trip(self, exc: APIError) -> None:
        if self.error is None:
            self.error = exc
            log.error("run stopped: %s", exc)


class RateGate:
    """After a 429 with Retry-After, no worker of the run starts a request before it expires."""

    def __init__(self) -> None:
        self._until = 0.0

    def pause(self, seconds: float) -> None:
        self._until = max(self._until, time.monotonic() + seconds)

    async def wait(self) -> None:
        while (delay := self._until - time.monotonic()) > 0:
            await asyncio.sleep(delay)


@dataclass(frozen=True)
class ChunkStats:
    """What a chunk did, and where its results part is (the run's table is merged from those)."""

    chunk: int
    rows: int
    by_status: dict[str, int]
    part_key: str


class RunContext:
    """What the chunks of one run share in one process: clients, limits, the done set."""

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
    ) -> None:
        self.run_id = layout.check_run_id(run_id)
        self.storage = storage
        self.client = client
        self.loader = loader
        self.config = config
        self.done_keys: set[str] = done_keys if done_keys is not None else set()
        # The done index may miss jobs a killed chunk committed: check a job's sidecar
        # before editing it (see pipeline.done_index).
        self.check_unindexed = check_unindexed
        self.stop = RunStop()
        self.budget = Budget(config.max_cost_usd)
        self.gate = RateGate()
        self.limiter = asyncio.Semaphore(config.concurrency)
        self._inflight: dict[str, asyncio.Future[ResultRow]] = {}
        self.io_executor = io_executor or io_thread_pool(config.concurrency)
        # When set, rows not in it end `skipped` (not selected) without any I/O.
        self.only_rows = only_rows
        # When set, every request takes a permit first (a shared rate limit).
        self.permits: BatchedPermits | None = None

    def set_concurrency(self, limit: int) -> None:
        """Change the request limit; only before the first request of the run."""
        self.config = replace(self.config, concurrency=limit)
        self.limiter = asyncio.Semaphore(limit)

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.io_executor, partial(fn, *args, **kwargs)
        )

    def close(self) -> None:
        self.io_executor.shutdown(wait=True)


def io_thread_pool(concurrency: int) -> ThreadPoolExecutor:
    """Threads for blocking storage and source I/O (boto3, files), sized to the concurrency.

    asyncio's default pool has only cpu+4 threads: at concurrency 64 writes would queue.
    """
    return ThreadPoolExecutor(
        max_workers=max(8, concurrency * WORKERS_PER_SLOT), thread_name_prefix="imgedit-io"
    )


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


def _finish(result: ResultRow, started: float) -> ResultRow:
    result.finished_at = utcnow()
    result.elapsed_s = time.perf_counter() - started
    return result


class ChunkJournal:
    """What a chunk tells the done index: it is open before its first commit, and which
    jobs it found done that the index lacked."""

    def __init__(self, ctx: RunContext, chunk: int) -> None:
        self.ctx = ctx
        self.chunk = chunk
        self.opened = False
        self.found: set[str] = set()
        self._lock = asyncio.Lock()

    async def before_commit(self) -> None:
        if self.opened:
            return
        async with self._lock:
            if not self.opened:
                await self.ctx.io(
                    done_index.mark_open, self.ctx.storage, self.ctx.run_id, self.chunk
                )
                self.opened = True

    async def close(self, results: Sequence[ResultRow]) -> None:
        committed = self.found | {
            r.job_key for r in results if r.status == "succeeded" and r.job_key
        }
        if not (committed or self.opened):
            return
        # Should indexing fail, the open marker (ours, or the one that made us look for
        # sidecars) stays, and later runs look for these jobs' sidecars too.
        await self.ctx.io(
            done_index.close_chunk,
            self.ctx.storage,
            self.ctx.run_id,
            self.chunk,
            sorted(committed),
            delete_marker=self.opened,
        )


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
    if key in ctx.done_keys and not ctx.config.overwrite:
        return _done(result)
    first = ctx._inflight.get(key)
    if first is not None:
        return _duplicate(result, await asyncio.shield(first))
    if ctx.check_unindexed and not ctx.config.overwrite:
        try:
            found = await ctx.io(ctx.storage.exists, layout.sidecar_key(key))
        except StorageError as exc:
            result.error_code = "storage_error"
            result.error_message = f"cannot check whether the job is already done: {exc}"
            return result
        if found:
            ctx.done_keys.add(key)
            if journal is not None:
                journal.found.add(key)
            return _done(result)
        first = ctx._inflight.get(key)
        if first is not None:
            return _duplicate(result, await asyncio.shield(first))

    future: asyncio.Future[ResultRow] = asyncio.get_running_loop().create_future()
    ctx._inflight[key] = future
    try:
        await _edit_and_store(ctx, row, sources, mask, result, journal)
    finally:
        del ctx._inflight[key]
        future.set_result(result)
    return result


def _done(result: ResultRow) -> ResultRow:
    result.status = "skipped"
    result.reason = SKIP_DONE
    return result


def _stopped(ctx: RunContext, result: ResultRow) -> ResultRow:
    result.status = "skipped"
    result.reason = SKIP_STOPPED
    if ctx.stop.error is not None:
        result.error_code = ctx.stop.error.error_code
        result.error_message = f"not attempted: the run stopped on {ctx.stop.error}"
    return result


def _duplicate(result: ResultRow, first: ResultRow) -> ResultRow:
    """A second row with the same job key: no second edit, it shares the first's outputs."""
    result.status = "skipped" if first.status == "succeeded" else first.status
    result.reason = SKIP_DUPLICATE
    result.output_uris = list(first.output_uris)
    result.actual_size = first.actual_size
    result.output_format = first.output_format
    result.n_outputs = first.n_outputs
    result.revised_prompt = first.revised_prompt
    if first.status != "succeeded":
        result.error_code = first.error_code
        result.error_message = f"same job as row {first.row}, which ended {first.status}"
    return result


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


async def _edit_and_store(
    ctx: RunContext,
    row: ManifestRow,
    sources: Sequence[Source],
    mask: Source | None,
    result: ResultRow,
    journal: ChunkJournal | None = None,
) -> None:
    request = _request(ctx, row, sources, mask)
    price = row.params.image_count() * ctx.config.price_per_image_usd
    lost = 0

    async def attempt() -> EditResponse:
        nonlocal lost
        await ctx.gate.wait()
        async with ctx.limiter:
            # Checked after the wait for a slot: the run may have stopped meanwhile.
            if ctx.stop.stopped:
                raise RunStopped
            if ctx.permits is not None:
                await ctx.permits.acquire()
            if not ctx.budget.reserve(price):
                raise BudgetExhausted
            result.attempts += 1
            charged: float | None = None
            try:
                response = await ctx.client.edit(request)
                charged = response.cost if response.cost is not None else price
                return response
            except APIError as exc:
                if exc.may_have_charged:
                    lost += 1
                    charged = price  # unknown: count the worst case against the budget
                if exc.run_fatal:
                    ctx.stop.trip(exc)
                if isinstance(exc, RateLimitError) and exc.retry_after:
                    ctx.gate.pause(exc.retry_after)
                log.debug("row %s attempt %s: %s", row.row, result.attempts, exc)
                raise
            finally:
                ctx.budget.settle(price, charged or 0.0)

    def should_stop() -> bool:
        return ctx.stop.stopped or ctx.budget.exhausted

    try:
        response: EditResponse | None = None
        async for attempt_state in retrying(ctx.config.retry, should_stop=should_stop):
            with attempt_state:
                response = await attempt()
        assert response is not None
    except RunStopped:
        _stopped(ctx, result)
        return
    except BudgetExhausted:
        result.status = "skipped"
        result.reason = SKIP_BUDGET
        result.error_code = "budget"
        result.error_message = (
            f"not started: it could cost USD {price:.2f} and the run's budget of USD "
            f"{ctx.config.max_cost_usd:.2f} would be passed; a later run can continue it"
        )
        return
    except APIError as exc:
        result.status = "failed"
        result.error_code = exc.error_code
        result.error_message = str(exc)
        result.request_id = exc.request_id
        return
    finally:
        result.possible_double_charges = lost
        result.possible_double_charge_usd = round(lost * price, 6)

    _record_response(result, response)
    try:
        if journal is not None:
            await journal.before_commit()
        await _store(ctx, row, sources, mask, request, response, result)
    except StorageError as exc:
        result.status = "failed"
        result.error_code = "storage_error"
        result.error_message = f"edit done and paid, but storing it failed: {exc}"
        result.output_uris = []
        return
    ctx.done_keys.add(result.job_key or "")
    result.status = "succeeded"


def _record_response(result: ResultRow, response: EditResponse) -> None:
    first = response.images[0]
    result.n_outputs = len(response.images)
    result.actual_size = first.info.size
    result.output_format = first.info.format
    result.revised_prompt = next(
        (i.revised_prompt for i in response.images if i.revised_prompt), None
    )
    result.cost = response.cost
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
        "currency": response.currency,
        "provider": response.provider,
        "executed_model": response.executed_model,
        "attempts": result.attempts,
        "possible_double_charges": result.possible_double_charges,
        "latency_s": response.latency_s,
        "created_at": utcnow().isoformat(),
    }


async def process_chunk(ctx: RunContext, chunk: int, rows: Sequence[ParsedRow]) -> ChunkStats:
    """Edit every row of a chunk, index its jobs, write its results part; returns its stats."""
    results: list[ResultRow | None] = [None] * len(rows)
    next_index = 0
    journal = ChunkJournal(ctx, chunk)

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(rows):
            i = next_index
            next_index += 1
            r = await process_row(ctx, rows[i], journal)
            results[i] = r
            progress.publish_row(ctx.run_id, r)

    workers = min(len(rows), ctx.config.concurrency * WORKERS_PER_SLOT)
    await asyncio.gather(*(worker() for _ in range(workers)))
    done = [r for r in results if r is not None]
    await journal.close(done)
    key = layout.part_key(ctx.run_id, chunk)
    await ctx.io(ctx.storage.put_bytes, key, table_to_parquet_bytes(rows_to_table(done)))
    return ChunkStats(chunk, len(done), dict(Counter(r.status for r in done)), key)


async def run_windowed(
    chunks: Iterable[tuple[int, Sequence[ParsedRow]]],
    process: Callable[[int, Sequence[ParsedRow]], Awaitable[ChunkStats]],
    window: int = DEFAULT_CHUNKS_IN_FLIGHT,
) -> list[ChunkStats]:
    """Run `process` over chunks with at most `window` in flight, reading chunks lazily."""
    pending: set[asyncio.Task[ChunkStats]] = set()
    finished: list[ChunkStats] = []
    try:
        for index, rows in chunks:
            pending.add(asyncio.ensure_future(process(index, rows)))
            if len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                finished.extend(t.result() for t in done)
        if pending:
            done, pending = await asyncio.wait(pending)
            finished.extend(t.result() for t in done)
    finally:
        # A chunk that failed (its results part could not be written) ends the run: the
        # others must not go on editing unobserved.
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    return sorted(finished, key=lambda s: s.chunk)
