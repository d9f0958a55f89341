"""Checking a manifest's sources before a run pays: each image and mask read and checked once.

`imgedit validate` checks every row's cells; this reads what the valid rows point at, as a run
would, and reports the rows a run would end `invalid` with `source_error`: a source or mask
that is missing, unreadable, outside `IMGEDIT_ALLOWED_ROOTS`, at a refused address, over the
size cap (50 MiB), not an accepted image (PNG, JPEG, WebP, GIF; truncated files too), past
the pixel limit, or a mask that is not a PNG of the first image's size.

- The reading is `SourceLoader`'s (the run's own reader): the same caps, allowed roots,
  address policy (`netguard`: loopback, private and link-local addresses are refused unless
  the caller's policy allows them, so validating a hostile manifest reaches no internal
  address either), redaction and messages. Nothing else is contacted: no API call, no
  network but the http(s) sources themselves.
- Each distinct source is read once, with at most `concurrency` reads at a time. Its bytes
  are dropped once checked (unless `keep_bytes`); only its verdict (format and size, or the
  problem) is kept, in an LRU of at most `cache_entries` URIs, so a catalogue of shared
  references costs one read each and a million distinct sources do not sit in memory
  (`source_verdicts.SourceChecker`).
- The manifest is streamed in batches; a bounded window of rows is in flight.

Reading every source costs what a run's reading costs (a remote manifest of a million http
sources means a million downloads): callers make it optional (`imgedit validate
--no-sources`), and may bound it with a row range.

`check_sources` gives a `SourceReport`; `merge_into` folds it into a `ValidationReport` so
`format_report` lists its rows among the others; `validate_with_sources` (sync) or
`avalidate_with_sources` does both in one pass over the manifest (`source_report` holds the
reports and the merge).
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypedDict, TypeVar, Unpack

from pipeline.engine.source_report import SourceProblem, SourceReport, merge_into
from pipeline.engine.source_verdicts import (
    DEFAULT_CACHE_ENTRIES,
    DEFAULT_CONCURRENCY,
    MAX_SOURCE_PIXELS,
    SourceChecker,
    Verdict,
)
from pipeline.engine.sources import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_HTTP_TIMEOUT,
    SourceLoader,
)
from pipeline.io.allowed_roots import AllowedRoots
from pipeline.io.netguard import AddressPolicy, source_policy
from pipeline.manifest.open import (
    DEFAULT_BATCH_SIZE,
    MAX_REPORTED_ERRORS,
    Manifest,
    RowRange,
    ValidationReport,
    open_manifest,
)
from pipeline.manifest.types import ManifestRow, ParsedRow
from pipeline.models.profile import ModelProfile

__all__ = [
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_CONCURRENCY",
    "FROM_ENV",
    "MAX_SOURCE_PIXELS",
    "CheckOptions",
    "SourceChecker",
    "SourceProblem",
    "SourceReport",
    "SyncCheckOptions",
    "Verdict",
    "avalidate_with_sources",
    "check_sources",
    "merge_into",
    "validate_with_sources",
]

T = TypeVar("T")

# Rows in flight per read slot: enough that a slow source does not idle the other slots.
ROWS_PER_SLOT = 4
# on_progress is called at most this often (and once at the end).
PROGRESS_INTERVAL_S = 0.1


class _FromEnv(enum.Enum):
    TOKEN = "from-env"


# `roots=FROM_ENV` (the default): the worker's IMGEDIT_ALLOWED_ROOTS, read at the call (a
# run reads it the same way); None: anywhere.
FROM_ENV: Final = _FromEnv.TOKEN

ProgressCallback = Callable[[int, int], None]


class _Progress:
    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0
        self._last = 0.0

    def tick(self, *, final: bool = False) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        if final or now - self._last >= PROGRESS_INTERVAL_S:
            self._last = now
            self.callback(self.done, self.total)


def _next_batch(batches: Iterator[list[ParsedRow]]) -> list[ParsedRow] | None:
    return next(batches, None)


def _cheap_total(
    manifest_format: str, uri: str, count: Callable[[], int], row_range: RowRange | None
) -> int:
    """Rows in the range when counting is cheap (Parquet metadata, a local CSV); else 0."""
    if manifest_format != "parquet" and uri.startswith("s3://"):
        return 0  # a second download of a remote CSV just for a progress bar: no
    rows = count()
    start, end = row_range or (1, None)
    last = rows if end is None else min(rows, end - 1)
    return max(0, last - max(start, 1) + 1)


def _resolve_roots(roots: AllowedRoots | _FromEnv | None) -> AllowedRoots | None:
    return AllowedRoots.from_env() if isinstance(roots, _FromEnv) else roots


class SyncCheckOptions(TypedDict, total=False):
    """The options of `validate_with_sources`: those of `check_sources` but `loader`."""

    endpoint_url: str | None
    etag: str | None
    concurrency: int
    row_range: RowRange | None
    roots: AllowedRoots | _FromEnv | None
    policy: AddressPolicy | None
    on_progress: ProgressCallback | None
    max_errors: int
    source_timeout: float
    keep_bytes: bool
    cache_entries: int
    profile: ModelProfile | None


class CheckOptions(SyncCheckOptions, total=False):
    """The options of `check_sources` and `avalidate_with_sources` (see `check_sources`)."""

    loader: SourceLoader | None


@dataclass(frozen=True)
class _Options:
    """CheckOptions with their defaults."""

    endpoint_url: str | None = None
    etag: str | None = None  # read this version of an S3 manifest (a run's pinned one)
    concurrency: int = DEFAULT_CONCURRENCY
    row_range: RowRange | None = None
    roots: AllowedRoots | _FromEnv | None = FROM_ENV
    policy: AddressPolicy | None = None
    on_progress: ProgressCallback | None = None
    max_errors: int = MAX_REPORTED_ERRORS
    source_timeout: float = DEFAULT_HTTP_TIMEOUT
    keep_bytes: bool = False
    cache_entries: int = DEFAULT_CACHE_ENTRIES
    profile: ModelProfile | None = None  # the run's model (None: p-image-edit)
    loader: SourceLoader | None = None


def _new_loader(options: _Options) -> tuple[SourceLoader, ThreadPoolExecutor]:
    """A loader of the check's own, and the pool its blocking reads run in."""
    executor = ThreadPoolExecutor(
        max_workers=options.concurrency, thread_name_prefix="imgedit-check"
    )
    loader = SourceLoader(
        endpoint_url=options.endpoint_url,
        http_timeout=options.source_timeout,
        # 0: nothing is cached (every source has bytes), the verdicts are.
        cache_bytes=DEFAULT_CACHE_BYTES if options.keep_bytes else 0,
        executor=executor,
        roots=_resolve_roots(options.roots),
        policy=options.policy if options.policy is not None else source_policy(False),
    )
    return loader, executor


class _Window:
    """Rows whose sources are being checked, settled in file order (so problems are listed in
    row order), at most `limit` in flight."""

    def __init__(
        self, checker: SourceChecker, report: SourceReport, progress: _Progress, max_errors: int
    ) -> None:
        self.checker = checker
        self.report = report
        self.progress = progress
        self.max_errors = max_errors
        self.limit = checker.concurrency * ROWS_PER_SLOT
        self._pending: deque[asyncio.Future[SourceProblem | None]] = deque()

    def _settle(self, problem: SourceProblem | None) -> None:
        self.report.add(problem, max_errors=self.max_errors)
        self.progress.done += 1

    async def add(self, row: ManifestRow) -> None:
        """Start checking `row` (or settle it at once); wait while the window is full."""
        known, problem = self.checker.check_cached(row)
        if known and not self._pending:
            self._settle(problem)  # nothing ahead of it: in order already
        elif known:
            done: asyncio.Future[SourceProblem | None] = asyncio.get_running_loop().create_future()
            done.set_result(problem)
            self._pending.append(done)
        else:
            self._pending.append(asyncio.create_task(self.checker.check_row(row)))
        while len(self._pending) >= self.limit:
            self._settle(await self._pending.popleft())

    async def drain(self) -> None:
        """Settle every row still in flight, in order."""
        while self._pending:
            self._settle(await self._pending.popleft())

    async def cancel(self) -> None:
        """Stop the checks still in flight (a pass that failed or was cancelled)."""
        for pending in self._pending:
            pending.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)


def _cells_report(manifest: Manifest, left: Callable[[int], bool] | None) -> ValidationReport:
    cells = manifest.new_report()
    if left is not None:
        cells.rows_left = cells.images_left = 0
    return cells


def _count_cells(
    cells: ValidationReport,
    parsed: ParsedRow,
    max_errors: int,
    left: Callable[[int], bool] | None,
) -> None:
    cells.add(parsed, max_errors=max_errors)
    if left is not None and isinstance(parsed, ManifestRow) and left(parsed.row):
        cells.rows_left = (cells.rows_left or 0) + 1
        cells.images_left = (cells.images_left or 0) + parsed.params.image_count()


async def _check(
    manifest_uri: str,
    options: _Options,
    *,
    validation: bool,
    left: Callable[[int], bool] | None = None,
) -> tuple[SourceReport, ValidationReport | None]:
    """One pass over the manifest: the source report, and the cell report if `validation`."""
    if options.concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {options.concurrency}")
    if options.max_errors < 0:
        raise ValueError(f"max_errors must be 0 or more, not {options.max_errors}")
    started = time.perf_counter()
    executor: ThreadPoolExecutor | None = None
    loader = options.loader
    if loader is None:
        loader, executor = _new_loader(options)
    reads_before, hits_before = loader.reads, loader.cache_hits
    checker = SourceChecker(
        loader,
        concurrency=options.concurrency,
        cache_entries=options.cache_entries,
        max_pixels=MAX_SOURCE_PIXELS,  # read now: the limit this module names
    )
    report = SourceReport(uri=manifest_uri)
    progress = _Progress(options.on_progress, 0)
    window = _Window(checker, report, progress, options.max_errors)
    cells: ValidationReport | None = None
    endpoint_url = options.endpoint_url
    try:
        manifest = await asyncio.to_thread(
            open_manifest,
            manifest_uri,
            endpoint_url=endpoint_url,
            etag=options.etag,
            profile=options.profile,
        )
        with manifest:
            if validation:
                cells = _cells_report(manifest, left)
            if options.on_progress is not None:
                progress.total = await asyncio.to_thread(
                    _cheap_total,
                    manifest.format,
                    manifest_uri,
                    manifest.count_rows,
                    options.row_range,
                )
            batches = manifest.batches(DEFAULT_BATCH_SIZE, options.row_range)
            while (batch := await asyncio.to_thread(_next_batch, batches)) is not None:
                for parsed in batch:
                    report.rows += 1
                    if cells is not None:
                        _count_cells(cells, parsed, options.max_errors, left)
                    if not isinstance(parsed, ManifestRow):
                        progress.done += 1
                        continue
                    await window.add(parsed)
                    progress.tick()
                del batch
            await window.drain()
            progress.tick(final=True)
    except BaseException:
        await window.cancel()
        raise
    finally:
        await checker.aclose()
        if executor is not None:  # the loader is the check's own
            await loader.aclose()
            executor.shutdown(wait=False, cancel_futures=True)
    report.sources_read = loader.reads - reads_before
    report.cache_hits = checker.cache_hits + (loader.cache_hits - hits_before)
    report.cached_verdicts = checker.cached
    report.elapsed_s = time.perf_counter() - started
    return report, cells


async def check_sources(manifest_uri: str, **options: Unpack[CheckOptions]) -> SourceReport:
    """Read and check the sources and masks of every valid row (rows `start <= row < end`).

    - `endpoint_url`: the S3 service of the manifest and its sources.
    - `concurrency`: source reads at once (DEFAULT_CONCURRENCY; blocking reads run in a pool
      of that many threads, as a run's do).
    - `row_range`: only rows `start <= row < end` (None: all).
    - `roots`: local and S3 sources must lie under these; `FROM_ENV` (default) reads
      `IMGEDIT_ALLOWED_ROOTS` now, None allows anywhere.
    - `policy`: which addresses http(s) sources may come from; None is a run's default
      (`netguard.source_policy(False)`: public addresses only, unless the worker's
      `IMGEDIT_ALLOW_PRIVATE_SOURCES=1`).
    - `on_progress(done, total)`: rows done, and the rows in the range when that is cheap
      to know (Parquet, a local CSV) else 0; at most every PROGRESS_INTERVAL_S.
    - `max_errors`: problems kept in the report (all are counted; MAX_REPORTED_ERRORS).
    - `source_timeout`: of each http(s) read (DEFAULT_HTTP_TIMEOUT).
    - `keep_bytes`: keep checked sources' bytes in the loader's LRU (256 MiB) instead of
      dropping them at once; verdicts are remembered either way, `cache_entries` of them
      (DEFAULT_CACHE_ENTRIES).
    - `loader`: check with this loader (its roots, policy, caps and cache) instead of a new
      one; it is not closed. `endpoint_url`, `roots`, `policy`, `source_timeout` and
      `keep_bytes` then only concern the manifest or are ignored.

    Raises ManifestError for a manifest that cannot be read, as `validate_manifest` does.
    Cell-invalid rows are not checked (their sources may not even be paths). Contacts no
    API; the only network reads are the http(s) sources and S3.
    """
    report, _ = await _check(manifest_uri, _Options(**options), validation=False)
    return report


async def avalidate_with_sources(
    manifest_uri: str,
    *,
    left: Callable[[int], bool] | None = None,
    **options: Unpack[CheckOptions],
) -> ValidationReport:
    """`validate_manifest` and `check_sources` in one pass over the manifest, merged.

    Options as `check_sources`; `left` as `validate_manifest`'s. For a huge remote manifest
    this reads every source a run would: callers offer to skip it (`--no-sources`) and use
    `validate_manifest` alone.
    """
    opts = _Options(**options)
    sources, cells = await _check(manifest_uri, opts, validation=True, left=left)
    assert cells is not None
    return merge_into(cells, sources, max_errors=opts.max_errors)


def validate_with_sources(
    manifest_uri: str,
    *,
    left: Callable[[int], bool] | None = None,
    **options: Unpack[SyncCheckOptions],
) -> ValidationReport:
    """`avalidate_with_sources` from synchronous code (its own event loop).

    Called from a thread that runs an event loop already (e.g. `engine.plan_run` inside
    `run_manifest`), it runs in a thread of its own, blocking the caller until done.
    Skip it (`validate_manifest` alone) for a huge remote manifest: see the module doc.
    """

    def start() -> Coroutine[Any, Any, ValidationReport]:
        return avalidate_with_sources(manifest_uri, left=left, **options)

    return _run_sync(start)


def _run_sync(start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(start())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgedit-check") as pool:
        return pool.submit(lambda: asyncio.run(start())).result()
