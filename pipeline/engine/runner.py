"""The async engine's rows: each manifest row to exactly one result, paid at most once.

A valid row's sources are loaded and hashed into a job key; a job already done is skipped;
otherwise the run claims the job (see `pipeline.engine.claims`), edits it under the run's limits
(`pipeline.engine.run_control`) with retries, stores its images and then its sidecar, and reports
it to its chunk's journal (see `pipeline.engine.chunk`), which indexes it and gives the claim back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from pipeline.engine import layout
from pipeline.engine.context import RunContext
from pipeline.engine.edit import edit_and_store, load_sources
from pipeline.engine.jobkey import job_key, key_head, key_of
from pipeline.engine.outcomes import (
    as_duplicate,
    base_result,
    finish,
    invalid_result,
    mark_done,
    mark_stopped,
    not_selected_result,
    requested_size,
)
from pipeline.engine.results import DoneRow, ResultRow, utcnow
from pipeline.engine.sources import redact_uri
from pipeline.errors import SourceError, StorageError
from pipeline.manifest.types import InvalidRow, ManifestRow, ParsedRow

if TYPE_CHECKING:
    from pipeline.engine.chunk import ChunkJournal

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rows being loaded or stored besides those waiting on the API, per unit of concurrency.
WORKERS_PER_SLOT = 2


async def process_row(
    ctx: RunContext, row: ParsedRow, journal: ChunkJournal | None = None
) -> ResultRow:
    """One manifest row to exactly one result row; never raises for a row's own failure."""
    if ctx.only_rows is not None and row.row not in ctx.only_rows:
        return not_selected_result(row)
    if isinstance(row, InvalidRow):
        return invalid_result(row)
    started = time.perf_counter()
    result = base_result(row)
    try:
        return finish(await _process_valid(ctx, row, result, journal), started)
    except Exception as exc:  # a bug must cost one row, not the run
        log.exception("row %s: unexpected error", row.row)
        result.status = "failed"
        result.error_code = "internal_error"
        result.error_message = f"{type(exc).__name__}: {exc}"
        return finish(result, started)


def done_row(ctx: RunContext, row: ParsedRow) -> DoneRow | None:
    """The result of a row whose job was done before this run, if it can be had without
    awaiting anything (its sources in the loader's cache, its key in the done set): what
    `process_row` would end it with, without a ResultRow or a coroutine, for resumes of
    millions of done rows. None: the row goes through `process_row` (which also ends a done
    row whose sources are not cached yet as done)."""
    return done_rows(ctx, [row])[0]


def done_rows(ctx: RunContext, rows: Sequence[ParsedRow]) -> list[DoneRow | None]:
    """`done_row` of each of a chunk's rows, as far as the loader's cache answers when the
    chunk starts: the done set searched once for the chunk, each key's head and each source's
    redaction made once. A None is not "not done": the row still goes through `done_row` (its
    sources may be cached by then), then `process_row`."""
    found: list[DoneRow | None] = [None] * len(rows)
    if ctx.config.overwrite or ctx.stop.stopped or not ctx.done_keys:
        return found
    started, started_at = time.perf_counter(), utcnow()
    model, only = ctx.client.model, ctx.only_rows
    picked: list[tuple[int, ManifestRow]] = []
    keys: list[str] = []
    # Rows with the same sources and params (one EditParams per batch's set of them, see
    # batch_rows) share their key's head; the sources are those cached now, for the call.
    heads: dict[tuple[tuple[str, ...], int], str] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, ManifestRow) or row.mask:
            continue
        if only is not None and row.row not in only:
            continue
        sources = ctx.loader.cached(row.images)
        if sources is None:
            continue
        shared = (row.images, id(row.params))
        head = heads.get(shared)
        if head is None:
            head = heads[shared] = key_head(
                model=model,
                image_sha256=[s.sha256 for s in sources],
                mask_sha256=None,
                params=row.params,
            )
        picked.append((i, row))
        keys.append(key_of(head, row.prompt, row.seed))
    hits = ctx.done_keys.which(keys)
    done = [(i, row, key) for (i, row), key, hit in zip(picked, keys, hits, strict=True) if hit]
    sidecars = layout.sidecar_uris(ctx.storage.uri_for, [key for _, _, key in done])
    redacted: dict[str, str] = {}
    finished_at = utcnow()
    elapsed = (time.perf_counter() - started) / max(1, len(picked))
    for (i, row, key), sidecar in zip(done, sidecars, strict=True):
        uris = []
        for uri in row.images:
            shown = redacted.get(uri)
            if shown is None:
                shown = redacted[uri] = redact_uri(uri)
            uris.append(shown)
        found[i] = DoneRow(
            row=row.row,
            id=row.id,
            job_key=key,
            prompt=row.prompt,
            seed=row.seed,
            source_uris=uris,
            sidecar_uri=sidecar,
            n_requested=row.params.image_count(),
            requested_size=requested_size(row),
            started_at=started_at,
            finished_at=finished_at,
            elapsed_s=elapsed,
        )
    return found


async def _process_valid(
    ctx: RunContext, row: ManifestRow, result: ResultRow, journal: ChunkJournal | None
) -> ResultRow:
    if ctx.stop.stopped:
        return mark_stopped(ctx, result)
    if await _done_by_digests(ctx, row, result):
        return mark_done(result)
    try:
        sources = await load_sources(ctx, row)
        mask = await ctx.loader.load_mask(row.mask, sources[0]) if row.mask else None
    except SourceError as exc:
        result.status = "invalid"
        result.error_code = "source_error"
        result.error_column = exc.column
        result.error_message = f"row {row.row}: column {exc.column}: {exc}"
        return result
    for source in (*sources, *([mask] if mask else [])):
        if source.version is not None:
            ctx.source_digests.add(source.uri, source.version, source.sha256)

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
        return mark_done(result)
    first = ctx._inflight.get(key)
    if first is not None:
        return as_duplicate(result, await asyncio.shield(first))
    # From here this row is the one working on the job in this process: other rows with the
    # same key wait for its result instead of claiming the job themselves.
    future: asyncio.Future[ResultRow] = asyncio.get_running_loop().create_future()
    ctx._inflight[key] = future
    claimed = False
    try:
        if await _already_done(ctx, key, result, journal):
            return mark_done(result)
        if ctx.claims is not None:
            chunk = journal.chunk if journal is not None else None
            got = await ctx.claims.acquire(
                key, chunk, lambda: ctx.stop.stopped, check_done=not overwrite
            )
            if got.waited_s:
                result.claim_wait_s = round(got.waited_s, 3)
            if got.state == "stopped":
                return mark_stopped(ctx, result)
            if got.state == "done":
                ctx.done_keys.add(key)
                if journal is not None:
                    journal.found(key)
                return mark_done(result)
            claimed = True
            taken_over = got.taken_over
        else:
            taken_over = False
        await edit_and_store(ctx, row, sources, mask, result, journal)
        if (taken_over or key in ctx.orphaned) and result.status != "skipped":
            # The dead holder (a killed run or host) may have been charged for its request
            # before it died: this edit may pay for the job a second time.
            result.possible_double_charges += 1
            result.possible_double_charge_usd = round(
                result.possible_double_charge_usd
                + row.params.image_count() * ctx.config.price_per_image_usd,
                6,
            )
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


async def _done_by_digests(ctx: RunContext, row: ManifestRow, result: ResultRow) -> bool:
    """Whether the row's job is done, known from its sources' digests and versions without
    reading them (see source_digests); False whenever anything is unknown, and then the row
    reads its sources as usual."""
    digests = ctx.source_digests
    if ctx.config.overwrite or not ctx.done_keys or not digests.worth_asking():
        return False
    uris = (*row.images, row.mask) if row.mask else row.images
    if ctx.loader.holds(uris):
        return False  # read already in this run: no stat or HEAD needed to know the job
    digests.tries += 1
    shas: list[str] = []
    for uri in uris:
        version = await ctx.loader.version(uri)
        sha = digests.get(uri, version) if version is not None else None
        if sha is None:
            return False
        shas.append(sha)
    key = job_key(
        model=ctx.client.model,
        image_sha256=shas[: len(row.images)],
        mask_sha256=shas[-1] if row.mask else None,
        prompt=row.prompt,
        seed=row.seed,
        params=row.params,
    )
    if key not in ctx.done_keys:
        return False
    digests.hits += 1
    result.job_key = key
    result.sidecar_uri = ctx.storage.uri_for(layout.sidecar_key(key))
    return True


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
