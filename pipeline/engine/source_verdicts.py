"""Verdicts on a manifest's sources: each URI read once through the run's own loader, checked
(readable, an accepted image, within the pixel limit; a mask a PNG of the first image's size),
and remembered in a bounded LRU, so shared references cost one read."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from pipeline.engine.source_report import SourceProblem
from pipeline.engine.sources import SourceLoader, mask_problem, redact_uri
from pipeline.errors import SourceError
from pipeline.imageinfo import ImageInfo
from pipeline.manifest.types import FieldError, ManifestRow

__all__ = [
    "DEFAULT_CACHE_ENTRIES",
    "DEFAULT_CONCURRENCY",
    "MAX_SOURCE_PIXELS",
    "SourceChecker",
    "Verdict",
]

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


@dataclass(frozen=True, slots=True)
class Verdict:
    """What checking one source found: its header facts, and why it is unusable (or None)."""

    info: ImageInfo | None
    problem: str | None = None


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
        max_pixels: int = MAX_SOURCE_PIXELS,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        if cache_entries < 0:
            raise ValueError(f"cache_entries must be 0 or more, not {cache_entries}")
        self.loader = loader
        self.concurrency = concurrency
        self.cache_entries = cache_entries
        self.max_pixels = max_pixels  # a source with more pixels is unusable
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
        if pixels > self.max_pixels:
            return Verdict(
                info,
                f"image is {info.size} ({pixels:,} pixels), more than the "
                f"{self.max_pixels:,} allowed: {redact_uri(uri)}",
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
