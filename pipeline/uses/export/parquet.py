"""Parquet files of bounded size: the image in a Hugging Face `Image` column, then the metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.uses.export.destination import Destination
from pipeline.uses.export.metadata import (
    IMAGE_COLUMN,
    IMAGE_STRUCT,
    METADATA_SCHEMA,
    SOURCE_COLUMN,
    hf_features,
)
from pipeline.uses.export.samples import Sample

__all__ = ["ParquetParts", "parquet_schema", "part_name"]

_CONTENT_TYPE = "application/vnd.apache.parquet"


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def parquet_schema(with_sources: bool) -> pa.Schema:
    """`image` ({bytes, path}), `source_image` with sources, then the metadata columns; the
    `huggingface` metadata makes `datasets` read the image columns as `Image` features."""
    fields = [pa.field(IMAGE_COLUMN, IMAGE_STRUCT)]
    if with_sources:
        fields.append(pa.field(SOURCE_COLUMN, IMAGE_STRUCT))
    schema = pa.schema([*fields, *METADATA_SCHEMA])
    return schema.with_metadata({b"huggingface": hf_features(schema)})


class ParquetParts:
    """Samples buffered into row groups of about `row_group_bytes` and written to Parquet
    files of at most about `file_bytes` each (a file closes once the next row group would
    take it past that); a full file is published and the next begun. Memory: one row group."""

    def __init__(
        self, dest: Destination, file_bytes: int, row_group_bytes: int, *, with_sources: bool
    ) -> None:
        self.dest = dest
        self.file_bytes = file_bytes
        self.row_group_bytes = min(row_group_bytes, file_bytes)
        self.with_sources = with_sources
        self.schema = parquet_schema(with_sources)
        self._index = 0
        self._writer: pq.ParquetWriter | None = None
        self._path: Path | None = None
        self._file_size = 0
        self._file_samples = 0
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0

    def add(self, sample: Sample) -> None:
        if self._rows and self._buffered + sample.size > self.row_group_bytes:
            self._flush()
        row: dict[str, Any] = {
            IMAGE_COLUMN: {"bytes": sample.image, "path": f"{sample.key}.{sample.ext}"},
            **sample.metadata,
        }
        if self.with_sources:
            first = sample.sources[0] if sample.sources else None
            row[SOURCE_COLUMN] = (
                {"bytes": first[1], "path": f"{sample.key}.src.{first[0]}"} if first else None
            )
        self._rows.append(row)
        self._buffered += sample.size

    def close(self) -> None:
        """Write what is buffered and publish the last file (if it holds any sample)."""
        self._flush()
        if self._writer is not None:
            self._close_file()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is not None and self._file_size + self._buffered > self.file_bytes:
            self._close_file()
        writer = self._writer or self._open_file()
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        writer.write_table(table, row_group_size=len(self._rows))
        self._file_size += self._buffered
        self._file_samples += len(self._rows)
        self._rows, self._buffered = [], 0

    def _open_file(self) -> pq.ParquetWriter:
        self._path = self.dest.staging_path(part_name(self._index))
        # Images are compressed already: zstd gains little on them, much on the metadata.
        self._writer = pq.ParquetWriter(self._path, self.schema, compression="zstd")
        self._file_size = 0
        self._file_samples = 0
        return self._writer

    def _close_file(self) -> None:
        assert self._writer is not None and self._path is not None
        self._writer.close()
        self.dest.publish(part_name(self._index), self._path, self._file_samples, _CONTENT_TYPE)
        self._writer, self._path = None, None
        self._index += 1
