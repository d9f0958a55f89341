"""One job's edit: the request, its attempts under the run's limits, its images and sidecar."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline import __version__, spec
from pipeline.engine import layout
from pipeline.engine.client import EditRequest, EditResponse, ImagePart
from pipeline.engine.client_request import fit_request
from pipeline.engine.context import RunContext
from pipeline.engine.outcomes import mark_stopped
from pipeline.engine.results import (
    SKIP_BUDGET,
    ResultRow,
    utcnow,
)
from pipeline.engine.retry import retrying
from pipeline.engine.run_control import (
    Abandoned,
    BudgetExhausted,
    RunStopped,
)
from pipeline.engine.sources import Source, redact_uri
from pipeline.errors import APIError, StorageError
from pipeline.manifest.types import ManifestRow

if TYPE_CHECKING:
    from pipeline.engine.chunk import ChunkJournal

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rows being loaded or stored besides those waiting on the API, per unit of concurrency.
WORKERS_PER_SLOT = 2


async def request_for(ctx: RunContext, row: ManifestRow) -> EditRequest:
    """The request a row would send (its sources loaded); raises SourceError."""
    sources = await load_sources(ctx, row)
    mask = await ctx.loader.load_mask(row.mask, sources[0]) if row.mask else None
    return _request(ctx, row, sources, mask)


async def load_sources(ctx: RunContext, row: ManifestRow) -> list[Source]:
    column = row.images_column
    if len(row.images) == 1:
        # Most rows: no gather, so no task per row (a cached source then costs no loop turn).
        return [await ctx.loader.load(row.images[0], column=column)]
    return list(await asyncio.gather(*(ctx.loader.load(u, column=column) for u in row.images)))


def _request(
    ctx: RunContext, row: ManifestRow, sources: Sequence[Source], mask: Source | None
) -> EditRequest:
    return _fitted_request(ctx, row, sources, mask)[0]


def _fitted_request(
    ctx: RunContext, row: ManifestRow, sources: Sequence[Source], mask: Source | None
) -> tuple[EditRequest, tuple[str, ...]]:
    """The row's request, without what the run's model does not take, and what that was."""

    def part(name: str, s: Source) -> ImagePart:
        fmt = s.info.format
        return ImagePart(
            f"{name}.{fmt}", s.data, spec.CONTENT_TYPES.get(fmt, "application/octet-stream")
        )

    request = EditRequest(
        prompt=row.prompt,
        images=[part(f"image{i}", s) for i, s in enumerate(sources)],
        mask=part("mask", mask) if mask else None,
        seed=row.seed,
        params=row.params,
        response_format=ctx.config.response_format,
    )
    # What the run's model does not take is not sent (the row's result names it).
    return fit_request(request, ctx.profile)


# --- the edit ------------------------------------------------------------------------------


async def _edit(
    ctx: RunContext, row: ManifestRow, request: EditRequest, result: ResultRow
) -> EditResponse | None:
    """The API's answer after retries, or None with `result` saying why there is none."""
    price = row.params.image_count() * ctx.config.price_per_image_usd
    lost = 0

    async def attempt() -> EditResponse:
        nonlocal lost
        if ctx.stop.stopped:
            raise RunStopped  # before waiting for a slot: a stopped run starts nothing
        async with ctx.slots.slot(retry=result.attempts > 0, row=row.row) as slot:
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
                ctx.slots.answered(slot)
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
                # A 429 or a burst of 503s: an adaptive limit backs off; a fixed one keeps
                # this slot closed for a 429's Retry-After. The row waits it (retry policy).
                ctx.slots.failed(slot, exc)
                log.debug("row %s attempt %s: %s", row.row, result.attempts, exc)
                raise
            finally:
                ctx.budget.settle(price, charged)

    def should_stop() -> bool:
        return ctx.stop.stopped or ctx.budget.exhausted

    try:
        response: EditResponse | None = None
        async for attempt_state in retrying(
            ctx.config.retry, should_stop=should_stop, sleep=ctx.stop.sleep
        ):
            with attempt_state:
                response = await attempt()
        return response
    except (RunStopped, Abandoned) as exc:
        mark_stopped(ctx, result)
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
    except APIError as exc:
        result.status = "failed"
        result.error_code = exc.error_code
        result.error_message = str(exc)
        result.request_id = exc.request_id
    finally:
        result.possible_double_charges = lost
        result.possible_double_charge_usd = round(lost * price, 6)
    return None


async def edit_and_store(
    ctx: RunContext,
    row: ManifestRow,
    sources: Sequence[Source],
    mask: Source | None,
    result: ResultRow,
    journal: ChunkJournal | None = None,
) -> None:
    request, dropped = _fitted_request(ctx, row, sources, mask)
    result.dropped_params = list(dropped)
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
    result.cost_source = response.cost_source
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
            # Fields the row set that the model does not take: not sent.
            "dropped_params": result.dropped_params,
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
        "cost_source": response.cost_source,
        "usage": response.usage,
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
