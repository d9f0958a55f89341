"""Training-ready datasets from a run: WebDataset tar shards or Parquet with an `Image` column.

The package: `options` (what is asked), `run_rows` (the results table in batches), `samples`
(a row's images read back, or a counted error), `metadata` (each sample's columns),
`webdataset` and `parquet` (the writers), `destination` (atomic puts, the index), `report`
(what was done) and `export` (the sequence).
"""

from __future__ import annotations

from pipeline.uses.export.destination import INDEX_NAME, FileEntry
from pipeline.uses.export.export import export_run, newest_run
from pipeline.uses.export.metadata import IMAGE_COLUMN, METADATA_SCHEMA, RESULT_COLUMNS
from pipeline.uses.export.options import (
    DEFAULT_SHARD_BYTES,
    ExportFormat,
    ExportOptions,
    parse_size,
)
from pipeline.uses.export.report import ExportReport
from pipeline.uses.export.samples import RowError, Sample, sample_key

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "IMAGE_COLUMN",
    "INDEX_NAME",
    "METADATA_SCHEMA",
    "RESULT_COLUMNS",
    "ExportFormat",
    "ExportOptions",
    "ExportReport",
    "FileEntry",
    "RowError",
    "Sample",
    "export_run",
    "newest_run",
    "parse_size",
    "sample_key",
]
