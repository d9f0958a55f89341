"""A run's results table read in batches from a local copy: succeeded rows out, the rest counted."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.engine import layout
from pipeline.engine.results import RESULTS_SCHEMA
from pipeline.errors import HistoryError, StorageError
from pipeline.io.s3 import S3_ERRORS, download_object, parse_s3_uri, s3_error
from pipeline.io.storage import LocalStorage, S3Storage, Storage
from pipeline.uses.run_history.files import scan_run

__all__ = ["RunRows"]

SUCCEEDED = "succeeded"


class RunRows:
    """The result rows of one run: its `results.parquet`, or (killed, or still running) its
    parts so far. Each table is read from a local file batch by batch (an S3 one is
    streamed to a temporary file first), so memory stays flat whatever the run's size.

    `not_exported` counts the rows that are not `succeeded`, by `status` or
    `skipped: <reason>`, as they are read.
    """

    def __init__(self, storage: Storage, run_id: str, *, batch_rows: int) -> None:
        layout.check_run_id(run_id)
        files = scan_run(storage, run_id)
        if files is None or not files.any_table:
            raise HistoryError(f"no results table of run {run_id!r} under {storage.root_uri}")
        self.storage = storage
        self.run_id = run_id
        self.complete = files.results
        self.keys = [layout.results_key(run_id)] if files.results else list(files.parts)
        self.batch_rows = batch_rows
        self.rows = 0
        self.not_exported: Counter[str] = Counter()

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        """Batches of succeeded rows, as dicts of the results table's columns, in row order
        within each table."""
        for key in self.keys:
            with self._local_copy(key) as path:
                yield from self._batches(path)

    def _batches(self, path: Path) -> Iterator[list[dict[str, Any]]]:
        try:
            parquet = pq.ParquetFile(path)
            present = set(parquet.schema_arrow.names)
            for batch in parquet.iter_batches(batch_size=self.batch_rows):
                table = _with_every_column(pa.Table.from_batches([batch]), present)
                self.rows += table.num_rows
                ok = pc.equal(table.column("status"), SUCCEEDED)
                self._count(table.filter(pc.invert(ok)))
                yield table.filter(ok).to_pylist()
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"cannot read the results of run {self.run_id!r}: {exc}") from exc

    def _count(self, table: pa.Table) -> None:
        for status, reason in zip(
            table.column("status").to_pylist(), table.column("reason").to_pylist(), strict=True
        ):
            label = f"skipped: {reason or 'unknown'}" if status == "skipped" else str(status)
            self.not_exported[label] += 1

    @contextlib.contextmanager
    def _local_copy(self, key: str) -> Iterator[Path]:
        if isinstance(self.storage, LocalStorage):
            yield Path(self.storage.uri_for(key))
            return
        if not isinstance(self.storage, S3Storage):
            raise StorageError(f"cannot read {key} from {self.storage!r}")
        loc = parse_s3_uri(self.storage.uri_for(key))
        fd, name = tempfile.mkstemp(prefix="imgedit-export-", suffix=".parquet")
        try:
            with os.fdopen(fd, "wb") as out:
                download_object(self.storage.client, loc.bucket, loc.key, out)
            yield Path(name)
        except S3_ERRORS as exc:
            raise s3_error(exc, loc.bucket, loc.key, action="read") from None
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)


def _with_every_column(table: pa.Table, present: set[str]) -> pa.Table:
    """The table with every column of the results schema, cast to it (an older part's
    missing columns are null)."""
    arrays = []
    for f in RESULTS_SCHEMA:
        if f.name in present:
            arrays.append(table.column(f.name).cast(f.type))
        else:
            arrays.append(pa.chunked_array([pa.nulls(table.num_rows, f.type)]))
    return pa.table(arrays, schema=RESULTS_SCHEMA)
