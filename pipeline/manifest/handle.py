"""A manifest's bytes opened for reading: its reader (CSV or Parquet) and its columns.

What `Manifest` (checked rows) and `RawManifest` (every column, for selection) share: the
file, pinned to one S3 version; the format; where relative sources resolve; an S3 Parquet
manifest downloaded once and removed on close.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

from pipeline.manifest.columns import ColumnMap, manifest_format
from pipeline.manifest.location import ManifestFile
from pipeline.manifest.parquet_read import ParquetReader
from pipeline.manifest.read import CsvReader
from pipeline.manifest.source_base import SourceBase

ColumnMapper = Callable[[Sequence[str], str], ColumnMap]


class ManifestHandle:
    """The manifest at `uri` opened with its reader; columns mapped by `mapper`."""

    def __init__(
        self,
        uri: str,
        mapper: ColumnMapper,
        *,
        endpoint_url: str | None = None,
        etag: str | None = None,
    ) -> None:
        self.uri = uri
        self._cleanup: weakref.finalize[[str], ManifestHandle] | None = None
        self._parquet: ParquetReader | None = None
        self.file = ManifestFile(uri, endpoint_url=endpoint_url, etag=etag)
        fmt, gzip = manifest_format(uri)
        self.fmt = fmt
        self.base = SourceBase.for_manifest(self.file.uri if self.file.is_s3 else self.file.path)
        self._reader: CsvReader | ParquetReader
        if fmt == "csv":
            self.csv: CsvReader | None = CsvReader(self.file, gzip=gzip)
            self._reader = self.csv
            self._cmap = mapper(self.csv.columns, uri)
            return
        self.csv = None
        path = self.file.path
        if self.file.is_s3:
            path = self.file.download()
            self._cleanup = weakref.finalize(self, _remove, path)
        try:
            self._parquet = self._reader = ParquetReader(path, uri)
            self._cmap = mapper(self._parquet.columns, uri)
        except BaseException:
            self.close()
            raise

    @property
    def parquet(self) -> ParquetReader | None:
        return self._parquet

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


__all__ = ["ColumnMapper", "ManifestHandle"]
