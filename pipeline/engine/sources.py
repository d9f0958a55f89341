"""Loading a row's source images and mask, cached: local paths, s3:// or http(s):// URIs.

The bytes come through the one reader of `pipeline.io.uri` (caps, timeouts, the address
rules, the allowed roots, regular files only); here they are hashed and checked as images,
each URI read once however many rows share it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from PIL import Image

from pipeline.errors import ImgEditError, InvalidImageError, SourceError
from pipeline.imageinfo import ImageInfo, probe
from pipeline.io.allowed_roots import AllowedRoots
from pipeline.io.netguard import AddressPolicy
from pipeline.io.redact import redact_uri
from pipeline.io.uri import UriReader, human_size
from pipeline.spec import INPUT_FORMATS

T = TypeVar("T")

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "DEFAULT_HTTP_TIMEOUT",
    "DEFAULT_MAX_BYTES",
    "Source",
    "SourceLoader",
    "human_size",
    "mask_problem",
    "redact_uri",
]

DEFAULT_HTTP_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 50 * 2**20
DEFAULT_CACHE_BYTES = 256 * 2**20

_FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WebP", "avif": "AVIF"}
_ACCEPTED = ", ".join(sorted(_FORMAT_NAMES[f] for f in INPUT_FORMATS))
# What a source may be; anything else is refused before it is read.
_SOURCE_PREFIXES = ("http://", "https://", "s3://", "file:", "/")
_EXPECTED = "expected an absolute path, file://, s3://, http:// or https://"


@dataclass(frozen=True)
class Source:
    """One loaded source file: its bytes, their SHA-256 (hex) and what the header says."""

    uri: str
    data: bytes = field(repr=False)
    sha256: str
    info: ImageInfo
    # What the bytes were read as (see UriReader.aversion); None: no version (http).
    version: str | None = None

    def __repr__(self) -> str:
        return (
            f"Source(uri={redact_uri(self.uri)!r}, {self.info.format} {self.info.size}, "
            f"{len(self.data)} bytes, sha256={self.sha256[:12]}...)"
        )


class _LoadFailure(Exception):
    """A failed read, column-free: each waiter re-raises it as its own SourceError."""


class SourceLoader:
    """Reads source files once each: an LRU cache by URI, and one read per URI in flight.

    Reads go through one `UriReader`: local and S3 reads in a worker thread of `executor`
    (one shared, lazily created boto3 client), http(s) through one shared httpx client,
    streaming with a size cap. Use from one event loop; `aclose()` when done.
    """

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        http_timeout: float = DEFAULT_HTTP_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        executor: Executor | None = None,
        roots: AllowedRoots | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url
        # Local and S3 sources must lie under these (IMGEDIT_ALLOWED_ROOTS); None: anywhere.
        self.roots = roots
        # Which addresses http(s) sources may come from (default: public ones only).
        self.policy = policy or AddressPolicy()
        # None: asyncio's default pool (cpu+4 threads); a run passes its own, sized to its
        # concurrency, so S3 reads do not queue behind a handful of threads.
        self._executor = executor
        self.http_timeout = http_timeout
        self.max_bytes = max_bytes
        self.cache_bytes = cache_bytes
        self._reader = UriReader(
            endpoint_url=endpoint_url,
            timeout=http_timeout,
            max_bytes=max_bytes,
            transport=transport,
            policy=self.policy,
            roots=roots,
            executor=executor,
        )
        self._cache: OrderedDict[str, Source] = OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[str, asyncio.Task[Source]] = {}
        # Counters for logs and tests: reads actually made, loads answered from the cache.
        self.reads = 0
        self.cache_hits = 0

    async def __aenter__(self) -> SourceLoader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def load(self, uri: str, *, column: str = "image") -> Source:
        """The source at `uri`, validated as an accepted input image; SourceError if not."""
        cached = self._cache.get(uri)
        if cached is not None:
            self._cache.move_to_end(uri)
            self.cache_hits += 1
            return cached
        task = self._inflight.get(uri)
        if task is None:
            task = asyncio.create_task(self._read_and_check(uri))
            self._inflight[uri] = task
            task.add_done_callback(lambda t: self._finish(uri, t))
        try:
            # Shielded: one waiter being cancelled must not cancel the read the others share.
            return await asyncio.shield(task)
        except _LoadFailure as exc:
            raise SourceError(str(exc), column=column, uri=redact_uri(uri)) from exc.__cause__

    def holds(self, uris: Sequence[str]) -> bool:
        """Whether every one of `uris` is in the cache now (nothing counted or moved)."""
        return all(uri in self._cache for uri in uris)

    def cached(self, uris: Sequence[str]) -> list[Source] | None:
        """The sources at `uris` if the cache holds every one (answered, counted and kept as
        `load` would), else None and nothing touched: a row whose sources are all cached can
        be answered without awaiting anything."""
        found: list[Source] = []
        for uri in uris:
            source = self._cache.get(uri)
            if source is None:
                return None
            found.append(source)
        for uri in uris:
            self._cache.move_to_end(uri)
            self.cache_hits += 1
        return found

    async def version(self, uri: str) -> str | None:
        """The source's current version without reading it (a stat, an S3 HEAD), or None:
        an http(s) source, or none to be had (reading it then says why)."""
        if _location_problem(uri) is not None:
            return None
        return await self._reader.aversion(uri)

    async def load_mask(self, uri: str, first: Source) -> Source:
        """The mask at `uri`: a PNG of the same dimensions as `first` (the edited image)."""
        mask = await self.load(uri, column="mask")
        problem = mask_problem(uri, mask.info, first.info)
        if problem is not None:
            raise SourceError(problem, column="mask", uri=redact_uri(uri))
        return mask

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        self._cache.clear()
        self._cached_bytes = 0
        await self._reader.aclose()

    # --- cache ---------------------------------------------------------------------------

    def _finish(self, uri: str, task: asyncio.Task[Source]) -> None:
        if self._inflight.get(uri) is task:
            del self._inflight[uri]
        if task.cancelled() or task.exception() is not None:
            return  # failures are not cached: the next row tries again
        self._remember(task.result())

    def _remember(self, source: Source) -> None:
        size = len(source.data)
        if size > self.cache_bytes or source.uri in self._cache:
            return
        self._cache[source.uri] = source
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old.data)

    # --- reading -------------------------------------------------------------------------

    async def _read_and_check(self, uri: str) -> Source:
        self.reads += 1
        try:
            return await self._read_and_check_inner(uri)
        except _LoadFailure:
            raise
        except Exception as exc:
            # A bug or an error nobody foresaw still fails one row with a sentence, not a
            # traceback; the chained cause keeps the details for a debugger.
            raise _LoadFailure(
                f"cannot load {redact_uri(uri)}: unexpected {type(exc).__name__}"
            ) from exc

    async def _read_and_check_inner(self, uri: str) -> Source:
        problem = _location_problem(uri)
        if problem is not None:
            raise _LoadFailure(problem)
        try:
            data, version = await self._reader.aread_versioned(uri)
        except ImgEditError as exc:
            # The reader's message names the location, redacted, and says what failed.
            raise _LoadFailure(str(exc)) from None
        return await self._in_thread(_check_image, uri, data, version)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def mask_problem(uri: str, mask: ImageInfo, first: ImageInfo | None) -> str | None:
    """Why the mask at `uri` does not fit the first image (None: it does): a PNG of the same
    dimensions. Without `first` (it could not be loaded) only the format is checked."""
    if mask.format != "png":
        return f"mask must be a PNG, got {_FORMAT_NAMES[mask.format]}: {redact_uri(uri)}"
    if first is not None and (mask.width, mask.height) != (first.width, first.height):
        return f"mask is {mask.size} but the first image is {first.size}"
    return None


def _check_image(uri: str, data: bytes, version: str | None = None) -> Source:
    """Hash and probe `data` (in a worker thread: hashing 50 MiB takes a while)."""
    shown = redact_uri(uri)
    try:
        info = probe(data)
    except InvalidImageError as exc:
        reason = str(exc)
        if reason == "unsupported image format":
            name = _pil_format(data)
            reason = f"unsupported image format{f' {name}' if name else ''} (accepted: {_ACCEPTED})"
        raise _LoadFailure(f"{reason}: {shown}") from None
    if info.format not in INPUT_FORMATS:
        raise _LoadFailure(
            f"unsupported image format {_FORMAT_NAMES.get(info.format, info.format)} "
            f"(accepted: {_ACCEPTED}): {shown}"
        )
    sha256 = hashlib.sha256(data).hexdigest()
    return Source(uri=uri, data=data, sha256=sha256, info=info, version=version)


def _pil_format(data: bytes) -> str | None:
    """Pillow's name for the format of `data`, for a refusal message (header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format
    except Exception:  # only a nicer message is at stake
        return None


def _location_problem(uri: str) -> str | None:
    """Why `uri` cannot be a source (a manifest resolves relative paths before), or None."""
    if uri.startswith(_SOURCE_PREFIXES):
        return None
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme:
        return f"unsupported URI scheme {scheme!r} in {redact_uri(uri)} ({_EXPECTED})"
    return f"not an absolute path: {uri!r} ({_EXPECTED})"
