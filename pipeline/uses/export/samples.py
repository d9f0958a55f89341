"""A result row's samples: each stored image read back whole and checked, or one counted error."""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pipeline.errors import ImgEditError, InvalidImageError, StorageNotFound
from pipeline.imageinfo import probe
from pipeline.io.redact import redact_uri
from pipeline.io.storage import Storage
from pipeline.io.uri import UriReader
from pipeline.uses.export.metadata import sample_metadata
from pipeline.uses.run_history.files import image_key_of_uri

__all__ = ["RowError", "Sample", "SampleLoader", "ordered_map", "sample_key"]

T = TypeVar("T")
R = TypeVar("R")

# File extensions of the formats as stored (`jpeg` is written `.jpg`, as WebDataset expects).
_EXTENSIONS = {"jpeg": "jpg"}

# Why a row gave no samples (the `code` of a RowError).
NO_OUTPUTS = "no_outputs"  # a succeeded row whose output_uris is empty
NOT_IN_OUTPUT = "not_in_output"  # an output URI that names no image of this output
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
IMAGE_INVALID = "image_invalid"
SOURCE_UNREADABLE = "source_unreadable"
SOURCE_INVALID = "source_invalid"
UNEXPECTED = "unexpected_error"


@dataclass(frozen=True)
class Sample:
    """One result image: its bytes as stored, its extension, its metadata, and (optionally)
    its row's source images as (extension, bytes)."""

    key: str
    ext: str
    image: bytes
    metadata: dict[str, Any]
    sources: tuple[tuple[str, bytes], ...] = field(default=())

    @property
    def size(self) -> int:
        return len(self.image) + sum(len(data) for _, data in self.sources)


@dataclass(frozen=True)
class RowError:
    """Why a succeeded row could not be exported; the export counts it and goes on."""

    row: int
    id: str | None
    code: str
    message: str


def sample_key(row: int, index: int) -> str:
    """The WebDataset key of image `index` of manifest row `row`: unique per image, no dot."""
    return f"{row:09d}-{index}"


def extension(fmt: str) -> str:
    return _EXTENSIONS.get(fmt, fmt)


class SampleLoader:
    """Reads a result row's images from the output (and, asked, its sources by URI)."""

    def __init__(self, storage: Storage, run_id: str, sources: UriReader | None) -> None:
        self.storage = storage
        self.run_id = run_id
        self.sources = sources

    def load(self, result: dict[str, Any]) -> list[Sample] | RowError:
        """The row's samples, or why it gives none; never raises for one row."""
        try:
            return self._load(result)
        except Exception as exc:  # one row's surprise is that row's error, not the export's
            return RowError(
                int(result["row"]), result.get("id"), UNEXPECTED, f"{type(exc).__name__}: {exc}"
            )

    def _load(self, result: dict[str, Any]) -> list[Sample] | RowError:
        row, row_id = int(result["row"]), result.get("id")

        def error(code: str, message: str) -> RowError:
            return RowError(row, row_id, code, message)

        uris: list[str] = list(result.get("output_uris") or [])
        if not uris:
            return error(NO_OUTPUTS, "succeeded, but the results table lists no output image")
        sources: tuple[tuple[str, bytes], ...] = ()
        if self.sources is not None:
            loaded = self._sources(self.sources, result.get("source_uris") or [])
            if isinstance(loaded, RowError):
                return error(loaded.code, loaded.message)
            sources = loaded
        samples = []
        for index, uri in enumerate(uris):
            key = image_key_of_uri(uri)
            if key is None:
                return error(NOT_IN_OUTPUT, f"{redact_uri(uri)} is not an image of this output")
            try:
                data = self.storage.get_bytes(key)
                info = probe(data)
            except StorageNotFound:
                return error(IMAGE_MISSING, f"result image missing: {self.storage.uri_for(key)}")
            except InvalidImageError as exc:
                return error(IMAGE_INVALID, f"{self.storage.uri_for(key)}: {exc}")
            except ImgEditError as exc:
                return error(IMAGE_UNREADABLE, str(exc))
            s_key = sample_key(row, index)
            meta = sample_metadata(
                result,
                run_id=self.run_id,
                key=s_key,
                index=index,
                uri=uri,
                width=info.width,
                height=info.height,
                sha256=hashlib.sha256(data).hexdigest(),
            )
            ext = extension(key.rsplit(".", 1)[-1])
            samples.append(Sample(s_key, ext, data, meta, sources))
        return samples

    @staticmethod
    def _sources(reader: UriReader, uris: list[str]) -> tuple[tuple[str, bytes], ...] | RowError:
        """The row's sources as (extension, bytes), or why one cannot be read (row unset)."""
        out: list[tuple[str, bytes]] = []
        for uri in uris:
            try:
                data = reader.read(uri)
                info = probe(data)
            except InvalidImageError as exc:
                return RowError(0, None, SOURCE_INVALID, f"source {redact_uri(uri)}: {exc}")
            except ImgEditError as exc:
                return RowError(0, None, SOURCE_UNREADABLE, f"source {redact_uri(uri)}: {exc}")
            out.append((extension(info.format), data))
        return tuple(out)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`fn` over `items` in `workers` threads, results in order; at most `2 * workers` items
    are in flight or waiting, so memory stays bounded whatever the number of items."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgedit-export")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
