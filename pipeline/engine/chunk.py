"""A chunk of manifest rows: its workers, and what it writes as its rows finish.

Every FLUSH_INTERVAL_S (or FLUSH_ROWS rows) and at its end, a chunk writes:
1. a done-index segment of the jobs it committed since the last flush (see done_index), then
   gives back their claims (see claims): until then a killed chunk's committed jobs are
   still found through their claims;
2. a results part of the rows finished since the last flush, so a SIGKILL loses at most that
   window of results-table rows (the sidecars stay the truth; a re-run's table has every row);
3. a segment of the digests of the sources the run read since (see source_digests).
A chunk opens a leased marker (`index/open/...`, renewed with the claims) before its first
commit and removes it after its last segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pipeline.engine import done_index, layout, progress, source_digests
from pipeline.engine.context import WORKERS_PER_SLOT, RunContext
from pipeline.engine.outcomes import stopped_result
from pipeline.engine.results import DoneRow, ResultRow, part_table, table_to_parquet_bytes
from pipeline.engine.runner import done_row, done_rows, process_row
from pipeline.errors import StorageError
from pipeline.manifest.types import ParsedRow

log = logging.getLogger(__name__)

# How often a chunk writes what finished: the most a SIGKILL can lose of the results table.
FLUSH_INTERVAL_S = 5.0
FLUSH_ROWS = 2000
# A results part that will not write is retried this many times, then kept in memory and
# written with the run's final table (never a reason to stop the other chunks).
PART_WRITE_ATTEMPTS = 3
PART_RETRY_BACKOFF_S = 0.5


@dataclass(frozen=True)
class ChunkStats:
    """What a chunk did, and where its results parts are (the run's table is merged from them)."""

    chunk: int
    rows: int
    by_status: dict[str, int]
    part_keys: list[str] = field(default_factory=list)


class ChunkJournal:
    """What a chunk tells the done index, the claims and the results parts as it goes."""

    def __init__(self, ctx: RunContext, chunk: int) -> None:
        self.ctx = ctx
        self.chunk = chunk
        self.opened = False
        # A segment could not be written: the marker stays, so runs after this one know an
        # index entry may be missing (and look, see done_index).
        self.index_failed = False
        self.part_keys: list[str] = []
        self._jobs: set[str] = set()  # committed (or found done) since the last flush
        self._rows: list[ResultRow] = []  # finished since the last flush
        self._done: list[DoneRow] = []  # found done (without a ResultRow) since then
        self._seq = 0
        self._open_lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self.nudge = asyncio.Event()

    @property
    def marker_key(self) -> str:
        return done_index.open_marker_key(self.ctx.run_id, self.chunk)

    async def before_commit(self) -> None:
        """Open the chunk's marker before its first sidecar (once)."""
        if self.opened:
            return
        async with self._open_lock:
            if not self.opened:
                claims = self.ctx.claims
                body = claims.body(self.chunk) if claims is not None else None
                await self.ctx.io(
                    done_index.mark_open, self.ctx.storage, self.ctx.run_id, self.chunk, body
                )
                if claims is not None:
                    claims.markers[self.marker_key] = self.chunk
                self.opened = True

    def committed(self, job_key: str) -> None:
        self._jobs.add(job_key)

    def found(self, job_key: str) -> None:
        """A job the index lacked whose sidecar exists: index it with the chunk's own."""
        self._jobs.add(job_key)

    def finished(self, result: ResultRow) -> None:
        self._rows.append(result)
        if len(self._rows) + len(self._done) >= FLUSH_ROWS:
            self.nudge.set()

    def finished_done(self, done: DoneRow) -> None:
        self._done.append(done)
        if len(self._rows) + len(self._done) >= FLUSH_ROWS:
            self.nudge.set()

    async def flush(self) -> None:
        """Index and release what was committed, then write the finished rows as a part."""
        async with self._flush_lock:
            jobs, self._jobs = self._jobs, set()
            rows, self._rows = self._rows, []
            done, self._done = self._done, []
            seq, self._seq = self._seq, self._seq + 1
            if jobs:
                indexed: bool = await self.ctx.io(
                    done_index.write_chunk_segment,
                    self.ctx.storage,
                    self.ctx.run_id,
                    self.chunk,
                    seq,
                    sorted(jobs),
                )
                if not indexed:
                    self.index_failed = True
                elif self.ctx.claims is not None:
                    # Only once indexed: a claim is how a killed chunk's jobs are found.
                    await self.ctx.claims.release(jobs)
            if rows or done:
                key = layout.part_key(self.ctx.run_id, self.chunk, seq)
                await self._write_part(key, rows, done)
            digests = self.ctx.source_digests.take_new()
            if digests:
                name = f"{self.ctx.run_id}.{self.chunk}.{seq}"
                await self.ctx.io(source_digests.write_segment, self.ctx.storage, name, digests)

    async def _write_part(self, key: str, rows: list[ResultRow], done: list[DoneRow]) -> None:
        data = table_to_parquet_bytes(part_table(rows, done))
        self.part_keys.append(key)
        for attempt in range(PART_WRITE_ATTEMPTS):
            try:
                await self.ctx.io(self.ctx.storage.put_bytes, key, data)
                self.ctx.kept_parts.keep(key, data)
                return
            except StorageError as exc:
                if attempt == PART_WRITE_ATTEMPTS - 1:
                    log.warning(
                        "chunk %d: results part not written (%s); kept for the final table",
                        self.chunk,
                        exc,
                    )
                    self.ctx.unwritten_parts[key] = data
                    return
                await asyncio.sleep(PART_RETRY_BACKOFF_S * 2**attempt)

    async def flush_periodically(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.nudge.wait(), FLUSH_INTERVAL_S)
            self.nudge.clear()
            # Shielded: the flusher is cancelled when the chunk ends, and a flush cut short
            # after it took the rows would lose them; the chunk's last flush waits for it.
            await asyncio.shield(self.flush())

    async def close(self) -> None:
        """The last flush, then the marker goes (only if every segment was written)."""
        await self.flush()
        if not self.opened:
            return
        if self.ctx.claims is not None:
            self.ctx.claims.markers.pop(self.marker_key, None)
        if not self.index_failed:
            await self.ctx.io(
                done_index.close_marker, self.ctx.storage, self.ctx.run_id, self.chunk
            )


async def process_chunk(ctx: RunContext, chunk: int, rows: Sequence[ParsedRow]) -> ChunkStats:
    """Edit every row of a chunk, writing results and index entries as rows finish."""
    next_index = 0
    journal = ChunkJournal(ctx, chunk)
    counts: Counter[str] = Counter()

    found = done_rows(ctx, rows)

    async def worker() -> None:
        nonlocal next_index
        while next_index < len(rows):
            i = next_index
            next_index += 1
            # A row found done at the chunk's start is still not skipped once the run stops
            # (it ends `stopped`, as every row not finished then).
            done = found[i] if not ctx.stop.stopped else None
            if done is None:
                done = done_row(ctx, rows[i])
            if done is not None:
                counts["skipped"] += 1
                journal.finished_done(done)
                if progress.listening():
                    progress.publish_row(ctx.run_id, done.result())
                continue
            r = await process_row(ctx, rows[i], journal)
            counts[r.status] += 1
            journal.finished(r)
            progress.publish_row(ctx.run_id, r)

    flusher = asyncio.ensure_future(journal.flush_periodically())
    try:
        workers = min(len(rows), ctx.config.concurrency * WORKERS_PER_SLOT)
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        flusher.cancel()
        await asyncio.gather(flusher, return_exceptions=True)
        await journal.close()
    return ChunkStats(chunk, len(rows), dict(counts), journal.part_keys)


async def skip_chunk(ctx: RunContext, chunk: int, rows: Sequence[ParsedRow]) -> ChunkStats:
    """A chunk the stopped run never started: one result row each, one part, no request."""
    journal = ChunkJournal(ctx, chunk)
    results = [stopped_result(ctx, row) for row in rows]
    for r in results:
        journal.finished(r)
    await journal.flush()
    counts: Counter[str] = Counter(r.status for r in results)
    return ChunkStats(chunk, len(rows), dict(counts), journal.part_keys)


ChunkProcessor = Callable[[int, Sequence[ParsedRow]], Awaitable[ChunkStats]]


async def run_windowed(
    chunks: Iterable[tuple[int, Sequence[ParsedRow]]],
    process: ChunkProcessor,
    window: int,
    *,
    stopped: Callable[[], bool] = lambda: False,
    skip: ChunkProcessor | None = None,
) -> list[ChunkStats]:
    """Run `process` over chunks with at most `window` in flight, reading chunks lazily.

    Once `stopped()`, the chunks not yet started go to `skip` instead (a plain coroutine, not
    an orchestrated task), so a stopped run still ends with one result row per manifest row
    in seconds, however many chunks were left.
    """
    pending: set[asyncio.Task[ChunkStats]] = set()
    finished: list[ChunkStats] = []
    try:
        for index, rows in chunks:
            if skip is not None and stopped():
                finished.append(await skip(index, rows))
                continue
            pending.add(asyncio.ensure_future(process(index, rows)))
            if len(pending) >= window:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                finished.extend(t.result() for t in done)
        if pending:
            done, pending = await asyncio.wait(pending)
            finished.extend(t.result() for t in done)
    finally:
        # A chunk that raised (a bug: rows and parts never raise) ends the run; the others
        # must not go on editing unobserved.
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    return sorted(finished, key=lambda s: s.chunk)


__all__ = [
    "FLUSH_INTERVAL_S",
    "ChunkJournal",
    "ChunkStats",
    "process_chunk",
    "run_windowed",
    "skip_chunk",
]
