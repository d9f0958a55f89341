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
  references costs one read each and a million distinct sources do not sit in memory.
- The manifest is streamed in batches; a bounded window of rows is in flight.

Reading every source costs what a run's reading costs (a remote manifest of a million http
sources means a million downloads): callers make it optional (`imgedit validate
--no-sources`), and may bound it with a row range.

`check_sources` gives a `SourceReport`; `merge_into` folds it into a `ValidationReport` so
`format_report` lists its rows among the others; `validate_with_sources` (sync) or
`avalidate_with_sources` does both in one pass over the manifest.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeVar

from pipeline.engine.sources import (
    DEFAULT_CACHE_BYTES,
    DEFAULT_HTTP_TIMEOUT,
    SourceLoader,
    mask_problem,
    redact_uri,
)
from pipeline.errors import SourceError
from pipeline.imageinfo import ImageInfo
from pipeline.io.allowed_roots import AllowedRoots
from pipeline.io.netguard import AddressPolicy, source_policy
from pipeline.manifest.open import (
    DEFAULT_BATCH_SIZE,
    MAX_REPORTED_ERRORS,
    RowRange,
    ValidationReport,
    open_manifest,
)
from pipeline.manifest.types import FieldError, InvalidRow, ManifestRow, ParsedRow

__all__ = [
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_CONCURRENCY",
    "FROM_ENV",
    "MAX_SOURCE_PIXELS",
    "SourceChecker",
    "SourceProblem",
    "SourceReport",
    "Verdict",
    "avalidate_with_sources",
    "check_sources",
    "merge_into",
    "validate_with_sources",
]

T = TypeVar("T")

# Source reads at once (a run's default concurrency).
DEFAULT_CONCURRENCY = 16
# Verdicts remembered (URI -> format and size, or the problem): a few hundred bytes each, so
# ~30 MB at most; a manifest with more distinct sources re-reads one only if it comes back
# after this many others.
DEFAULT_CACHE_ENTRIES = 100_000
# The API documents no pixel limit for uploads, and the run refuses nothing by pixel count
# but Pillow's decompression-bomb limit (`imageinfo.probe`, at Image.MAX_IMAGE_PIXELS, whose
# default is this number). Named here so the check does not depend on a process having
# raised or lifted Pillow's global, and so a tighter limit has one place to go.
MAX_SOURCE_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # 89,478,485: about 9459 x 9459
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


@dataclass(frozen=True, slots=True)
class Verdict:
    """What checking one source found: its header facts, and why it is unusable (or None)."""

    info: ImageInfo | None
    problem: str | None = None


@dataclass(frozen=True)
class SourceProblem(InvalidRow):
    """A valid row with an unusable source or mask: an InvalidRow, plus the output images it
    asked for (which leave the cost estimate when the row becomes invalid)."""

    images: int = 1


@dataclass
class SourceReport:
    """The outcome of checking the sources of a manifest's valid rows."""

    uri: str
    rows: int = 0  # rows seen (valid or not) in the range
    rows_checked: int = 0  # valid rows whose sources were checked
    invalid: int = 0  # of those, rows with at least one problem
    invalid_images: int = 0  # output images those rows asked for
    problems: list[SourceProblem] = field(default_factory=list)  # the first max_errors
    problems_by_column: Counter[str] = field(default_factory=Counter)  # rows per column
    sources_read: int = 0  # reads made: distinct sources, unless evicted and seen again
    cache_hits: int = 0  # sources answered by an earlier or in-flight read
    cached_verdicts: int = 0  # verdicts held at the end (at most the cap)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    @property
    def truncated(self) -> bool:
        return self.invalid > len(self.problems)


class SourceChecker:
    """Checks rows' sources with a loader: bounded reads, one read per URI, LRU verdicts.

    Use from one event loop. The loader belongs to the caller (it is not closed here).
    """

    def __init__(
        self,
        loader: SourceLoader,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if cache_entries < 0:
            raise ValueError(f"cache_entries must be 0 or more, not {cache_entries}")
        self.loader = loader
        self.concurrency = concurrency
        self.cache_entries = cache_entries
        self._slots = asyncio.Semaphore(concurrency)
        self._verdicts: OrderedDict[str, Verdict] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[Verdict]] = {}
        self.reads = 0  # reads this checker started
        self.cache_hits = 0  # verdicts from the cache or from a read already in flight

    @property
    def cached(self) -> int:
        """Verdicts held now (never more than `cache_entries`)."""
        return len(self._verdicts)

    def cached_verdict(self, uri: str) -> Verdict | None:
        """The remembered verdict on `uri` (counted as a hit), or None."""
        verdict = self._verdicts.get(uri)
        if verdict is not None:
            self._verdicts.move_to_end(uri)
            self.cache_hits += 1
        return verdict

    async def verdict(self, uri: str) -> Verdict:
        """The verdict on `uri`: remembered, joined to a read in flight, or read now."""
        cached = self.cached_verdict(uri)
        if cached is not None:
            return cached
        task = self._inflight.get(uri)
        if task is None:
            self.reads += 1
            task = asyncio.create_task(self._read(uri))
            self._inflight[uri] = task
            task.add_done_callback(lambda t: self._finish(uri, t))
        else:
            self.cache_hits += 1
        # Shielded: one row's cancellation must not cancel a read other rows wait on.
        return await asyncio.shield(task)

    def check_cached(self, row: ManifestRow) -> tuple[bool, SourceProblem | None]:
        """`(True, outcome)` if every source of the row has a verdict already, else
        `(False, None)` (nothing counted): shared references then cost no task."""
        uris = _uris(row)
        verdicts: list[Verdict] = []
        for uri in uris:
            verdict = self._verdicts.get(uri)
            if verdict is None:
                return False, None
            verdicts.append(verdict)
        for uri in uris:
            self._verdicts.move_to_end(uri)
        self.cache_hits += len(uris)
        return True, _outcome(row, verdicts)

    async def check_row(self, row: ManifestRow) -> SourceProblem | None:
        """The row's source problems (one per unusable source or mask), or None."""
        uris = _uris(row)
        if len(uris) == 1:
            verdicts = [await self.verdict(uris[0])]
        else:
            verdicts = list(await asyncio.gather(*(self.verdict(u) for u in uris)))
        return _outcome(row, verdicts)

    async def aclose(self) -> None:
        """Cancel the reads still in flight (a check that stopped early); keep the verdicts."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, uri: str) -> Verdict:
        async with self._slots:
            try:
                source = await self.loader.load(uri)
            except SourceError as exc:
                return Verdict(None, str(exc))
        info = source.info
        del source  # the bytes go now, whatever the loader keeps
        pixels = info.width * info.height
        if pixels > MAX_SOURCE_PIXELS:
            return Verdict(
                info,
                f"image is {info.size} ({pixels:,} pixels), more than the "
                f"{MAX_SOURCE_PIXELS:,} allowed: {redact_uri(uri)}",
            )
        return Verdict(info)

    def _finish(self, uri: str, task: asyncio.Task[Verdict]) -> None:
        if self._inflight.get(uri) is task:
            del self._inflight[uri]
        if task.cancelled() or task.exception() is not None or self.cache_entries == 0:
            return
        self._verdicts[uri] = task.result()
        self._verdicts.move_to_end(uri)
        while len(self._verdicts) > self.cache_entries:
            self._verdicts.popitem(last=False)


def _uris(row: ManifestRow) -> tuple[str, ...]:
    return (*row.images, row.mask) if row.mask is not None else row.images


def _outcome(row: ManifestRow, verdicts: list[Verdict]) -> SourceProblem | None:
    """`verdicts` are those of `_uris(row)`, in order."""
    errors: list[FieldError] = []
    for verdict in verdicts[: len(row.images)]:
        if verdict.problem is not None:
            error = FieldError(row.images_column, verdict.problem)
            if error not in errors:  # the same source twice in a row: one line
                errors.append(error)
    if row.mask is not None:
        mask = verdicts[-1]
        problem = mask.problem
        if problem is None and mask.info is not None:
            problem = mask_problem(row.mask, mask.info, verdicts[0].info)
        if problem is not None:
            errors.append(FieldError("mask", problem))
    if not errors:
        return None
    return SourceProblem(row.row, row.id, tuple(errors), images=row.params.image_count())


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


async def _check(
    manifest_uri: str,
    *,
    endpoint_url: str | None,
    concurrency: int,
    row_range: RowRange | None,
    roots: AllowedRoots | _FromEnv | None,
    policy: AddressPolicy | None,
    on_progress: ProgressCallback | None,
    max_errors: int,
    source_timeout: float,
    keep_bytes: bool,
    cache_entries: int,
    loader: SourceLoader | None,
    validation: bool,
    left: Callable[[int], bool] | None = None,
) -> tuple[SourceReport, ValidationReport | None]:
    """One pass over the manifest: the source report, and the cell report if `validation`."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    if max_errors < 0:
        raise ValueError(f"max_errors must be 0 or more, not {max_errors}")
    started = time.perf_counter()
    executor: ThreadPoolExecutor | None = None
    own = loader is None
    if loader is None:
        executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="imgedit-check")
        loader = SourceLoader(
            endpoint_url=endpoint_url,
            http_timeout=source_timeout,
            # 0: nothing is cached (every source has bytes), the verdicts are.
            cache_bytes=DEFAULT_CACHE_BYTES if keep_bytes else 0,
            executor=executor,
            roots=_resolve_roots(roots),
            policy=policy if policy is not None else source_policy(False),
        )
    reads_before, hits_before = loader.reads, loader.cache_hits
    checker = SourceChecker(loader, concurrency=concurrency, cache_entries=cache_entries)
    report = SourceReport(uri=manifest_uri)
    # Rows in flight, in file order (so problems are listed in row order), at most `limit`.
    window: deque[tuple[ManifestRow, asyncio.Future[SourceProblem | None]]] = deque()
    limit = concurrency * ROWS_PER_SLOT
    loop = asyncio.get_running_loop()
    progress = _Progress(on_progress, 0)
    cells: ValidationReport | None = None

    def settle(row: ManifestRow, problem: SourceProblem | None) -> None:
        report.rows_checked += 1
        progress.done += 1
        if problem is None:
            return
        report.invalid += 1
        report.invalid_images += problem.images
        if len(report.problems) < max_errors:
            report.problems.append(problem)
        for column in {e.column for e in problem.errors}:
            report.problems_by_column[column] += 1

    try:
        manifest = await asyncio.to_thread(open_manifest, manifest_uri, endpoint_url=endpoint_url)
        with manifest:
            if validation:
                cells = ValidationReport(
                    uri=manifest.uri,
                    format=manifest.format,
                    columns=list(manifest.columns),
                    unknown_columns=list(manifest.unknown_columns),
                )
                if left is not None:
                    cells.rows_left = cells.images_left = 0
            if on_progress is not None:
                progress.total = await asyncio.to_thread(
                    _cheap_total, manifest.format, manifest_uri, manifest.count_rows, row_range
                )
            batches = manifest.batches(DEFAULT_BATCH_SIZE, row_range)
            while (batch := await asyncio.to_thread(_next_batch, batches)) is not None:
                for parsed in batch:
                    report.rows += 1
                    if cells is not None:
                        cells.add(parsed, max_errors=max_errors)
                        if (
                            left is not None
                            and isinstance(parsed, ManifestRow)
                            and left(parsed.row)
                        ):
                            cells.rows_left = (cells.rows_left or 0) + 1
                            cells.images_left = (
                                cells.images_left or 0
                            ) + parsed.params.image_count()
                    if not isinstance(parsed, ManifestRow):
                        progress.done += 1
                        continue
                    known, problem = checker.check_cached(parsed)
                    if known and not window:
                        settle(parsed, problem)  # nothing ahead of it: in order already
                    elif known:
                        done: asyncio.Future[SourceProblem | None] = loop.create_future()
                        done.set_result(problem)
                        window.append((parsed, done))
                    else:
                        window.append((parsed, loop.create_task(checker.check_row(parsed))))
                    while len(window) >= limit:
                        row, pending = window.popleft()
                        settle(row, await pending)
                    progress.tick()
                del batch
            while window:
                row, pending = window.popleft()
                settle(row, await pending)
            progress.tick(final=True)
    except BaseException:
        for _, pending in window:
            pending.cancel()
        await asyncio.gather(*(p for _, p in window), return_exceptions=True)
        raise
    finally:
        await checker.aclose()
        if own:
            await loader.aclose()
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
    report.sources_read = loader.reads - reads_before
    report.cache_hits = checker.cache_hits + (loader.cache_hits - hits_before)
    report.cached_verdicts = checker.cached
    report.elapsed_s = time.perf_counter() - started
    return report, cells


async def check_sources(
    manifest_uri: str,
    *,
    endpoint_url: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    row_range: RowRange | None = None,
    roots: AllowedRoots | _FromEnv | None = FROM_ENV,
    policy: AddressPolicy | None = None,
    on_progress: ProgressCallback | None = None,
    max_errors: int = MAX_REPORTED_ERRORS,
    source_timeout: float = DEFAULT_HTTP_TIMEOUT,
    keep_bytes: bool = False,
    cache_entries: int = DEFAULT_CACHE_ENTRIES,
    loader: SourceLoader | None = None,
) -> SourceReport:
    """Read and check the sources and masks of every valid row (rows `start <= row < end`).

    - `concurrency`: source reads at once (blocking reads run in a pool of that many
      threads, as a run's do).
    - `roots`: local and S3 sources must lie under these; `FROM_ENV` (default) reads
      `IMGEDIT_ALLOWED_ROOTS` now, None allows anywhere.
    - `policy`: which addresses http(s) sources may come from; None is a run's default
      (`netguard.source_policy(False)`: public addresses only, unless the worker's
      `IMGEDIT_ALLOW_PRIVATE_SOURCES=1`).
    - `on_progress(done, total)`: rows done, and the rows in the range when that is cheap
      to know (Parquet, a local CSV) else 0; at most every PROGRESS_INTERVAL_S.
    - `max_errors`: problems kept in the report (all are counted).
    - `keep_bytes`: keep checked sources' bytes in the loader's LRU (256 MiB) instead of
      dropping them at once; verdicts are remembered either way, `cache_entries` of them.
    - `loader`: check with this loader (its roots, policy, caps and cache) instead of a new
      one; it is not closed. `endpoint_url`, `roots`, `policy`, `source_timeout` and
      `keep_bytes` then only concern the manifest or are ignored.

    Raises ManifestError for a manifest that cannot be read, as `validate_manifest` does.
    Cell-invalid rows are not checked (their sources may not even be paths). Contacts no
    API; the only network reads are the http(s) sources and S3.
    """
    report, _ = await _check(
        manifest_uri,
        endpoint_url=endpoint_url,
        concurrency=concurrency,
        row_range=row_range,
        roots=roots,
        policy=policy,
        on_progress=on_progress,
        max_errors=max_errors,
        source_timeout=source_timeout,
        keep_bytes=keep_bytes,
        cache_entries=cache_entries,
        loader=loader,
        validation=False,
    )
    return report


def merge_into(
    report: ValidationReport, sources: SourceReport, *, max_errors: int = MAX_REPORTED_ERRORS
) -> ValidationReport:
    """`report` with the rows whose sources are unusable counted invalid (a new report).

    A row invalid for its cells and its sources is one invalid row (its problems joined);
    rows that become invalid leave `valid` and their images leave the estimate. The errors
    stay in row order, the first `max_errors` of both lists.
    """
    listed = {r.row: r for r in report.errors}
    overlap = [p for p in sources.problems if p.row in listed]
    fresh = sources.invalid - len(overlap)
    by_column = Counter(report.errors_by_column)
    by_column.update(sources.problems_by_column)
    merged: dict[int, InvalidRow] = dict(listed)
    for problem in sources.problems:
        old = listed.get(problem.row)
        if old is None:
            merged[problem.row] = problem
            continue
        old_columns = {e.column for e in old.errors}
        for column in {e.column for e in problem.errors} & old_columns:
            by_column[column] -= 1  # this row is already counted under that column
        merged[problem.row] = InvalidRow(old.row, old.id, old.errors + problem.errors)
    # Each list holds only its first rows when truncated: past its last one, the other list
    # alone would not be "the first errors" of the manifest.
    cutoff: float = float("inf")
    if report.errors_truncated:
        cutoff = report.errors[-1].row if report.errors else 0
    if sources.truncated:
        cutoff = min(cutoff, sources.problems[-1].row if sources.problems else 0)
    errors = [merged[r] for r in sorted(merged) if r <= cutoff][:max_errors]
    freed_images = sources.invalid_images - sum(p.images for p in overlap)
    return replace(
        report,
        valid=max(0, report.valid - fresh),
        invalid=report.invalid + fresh,
        images=max(0, report.images - freed_images),
        errors=errors,
        errors_by_column=+by_column,
        sources_checked=(report.sources_checked or 0) + sources.rows_checked,
        source_invalid=report.source_invalid + sources.invalid,
    )


async def avalidate_with_sources(
    manifest_uri: str,
    *,
    endpoint_url: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    row_range: RowRange | None = None,
    roots: AllowedRoots | _FromEnv | None = FROM_ENV,
    policy: AddressPolicy | None = None,
    on_progress: ProgressCallback | None = None,
    max_errors: int = MAX_REPORTED_ERRORS,
    source_timeout: float = DEFAULT_HTTP_TIMEOUT,
    keep_bytes: bool = False,
    cache_entries: int = DEFAULT_CACHE_ENTRIES,
    loader: SourceLoader | None = None,
    left: Callable[[int], bool] | None = None,
) -> ValidationReport:
    """`validate_manifest` and `check_sources` in one pass over the manifest, merged.

    Parameters as `check_sources`. For a huge remote manifest this reads every source a run
    would: callers offer to skip it (`--no-sources`) and use `validate_manifest` alone.
    """
    sources, cells = await _check(
        manifest_uri,
        endpoint_url=endpoint_url,
        concurrency=concurrency,
        row_range=row_range,
        roots=roots,
        policy=policy,
        on_progress=on_progress,
        max_errors=max_errors,
        source_timeout=source_timeout,
        keep_bytes=keep_bytes,
        cache_entries=cache_entries,
        loader=loader,
        validation=True,
        left=left,
    )
    assert cells is not None
    return merge_into(cells, sources, max_errors=max_errors)


def validate_with_sources(
    manifest_uri: str,
    *,
    endpoint_url: str | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    row_range: RowRange | None = None,
    roots: AllowedRoots | _FromEnv | None = FROM_ENV,
    policy: AddressPolicy | None = None,
    on_progress: ProgressCallback | None = None,
    max_errors: int = MAX_REPORTED_ERRORS,
    source_timeout: float = DEFAULT_HTTP_TIMEOUT,
    keep_bytes: bool = False,
    cache_entries: int = DEFAULT_CACHE_ENTRIES,
    left: Callable[[int], bool] | None = None,
) -> ValidationReport:
    """`avalidate_with_sources` from synchronous code (its own event loop).

    Called from a thread that runs an event loop already (e.g. `engine.plan_run` inside
    `run_manifest`), it runs in a thread of its own, blocking the caller until done.
    Skip it (`validate_manifest` alone) for a huge remote manifest: see the module doc.
    """

    def start() -> Coroutine[Any, Any, ValidationReport]:
        return avalidate_with_sources(
            manifest_uri,
            endpoint_url=endpoint_url,
            concurrency=concurrency,
            row_range=row_range,
            roots=roots,
            policy=policy,
            on_progress=on_progress,
            max_errors=max_errors,
            source_timeout=source_timeout,
            keep_bytes=keep_bytes,
            cache_entries=cache_entries,
            left=left,
        )

    return _run_sync(start)


def _run_sync(start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(start())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgedit-check") as pool:
        return pool.submit(lambda: asyncio.run(start())).result()
