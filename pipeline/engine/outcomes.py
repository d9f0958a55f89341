"""The result row of each way a manifest row can end without an edit of its own."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, TypeVar

from pipeline.engine.context import RunContext
from pipeline.engine.results import (
    SKIP_DONE,
    SKIP_DUPLICATE,
    SKIP_INTERRUPTED,
    SKIP_NOT_SELECTED,
    SKIP_STOPPED,
    ResultRow,
    utcnow,
)
from pipeline.engine.sources import redact_uri
from pipeline.manifest.types import InvalidRow, ManifestRow, ParsedRow

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rows being loaded or stored besides those waiting on the API, per unit of concurrency.
WORKERS_PER_SLOT = 2


def requested_size(row: ManifestRow) -> str | None:
    p = row.params
    if p.size:
        return p.size
    if p.aspect_ratio or p.resolution:
        return "/".join(x for x in (p.aspect_ratio, p.resolution) if x)
    return None


def base_result(row: ManifestRow) -> ResultRow:
    return ResultRow(
        row=row.row,
        id=row.id,
        status="failed",
        prompt=row.prompt,
        seed=row.seed,
        # Pre-signed URLs carry keys in their query string: none of that is stored.
        source_uris=[redact_uri(u) for u in row.images],
        n_requested=row.params.image_count(),
        requested_size=requested_size(row),
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
    result = base_result(row)
    result.finished_at = result.started_at
    return mark_stopped(ctx, result)


def finish(result: ResultRow, started: float) -> ResultRow:
    result.finished_at = utcnow()
    result.elapsed_s = time.perf_counter() - started
    return result


def mark_done(result: ResultRow) -> ResultRow:
    result.status = "skipped"
    result.reason = SKIP_DONE
    return result


def mark_stopped(ctx: RunContext, result: ResultRow) -> ResultRow:
    result.status = "skipped"
    result.reason = SKIP_INTERRUPTED if ctx.stop.interrupted else SKIP_STOPPED
    if ctx.stop.reason is not None:
        result.error_code = ctx.stop.code
        result.error_message = f"not attempted: the run stopped on {ctx.stop.reason}"
    return result


def as_duplicate(result: ResultRow, first: ResultRow) -> ResultRow:
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
