"""Reading a local Parquet manifest in record batches, each column's type checked first."""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ManifestError
from pipeline.manifest.columns import ColumnMap, RawBatch, RawItem, RawRow
from pipeline.manifest.rows import PARAM_PREFIX

__all__ = ["PARQUET_READ_ROWS", "ParquetReader", "parquet_type_problem"]

PARQUET_READ_ROWS = 8192

# Parquet types each column may have; anything else cannot hold the values.
_INT_COLUMNS = frozenset({"seed", "n", "output_compression"})


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return bool(
        pa.types.is_null(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
    )


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _is_text_list(t: pa.DataType) -> bool:
    is_list = (
        pa.types.is_list(t)
        or pa.types.is_large_list(t)
        or pa.types.is_fixed_size_list(t)
        or pa.types.is_list_view(t)
        or pa.types.is_large_list_view(t)
    )
    return bool(is_list and _is_text(t.value_type))


def parquet_type_problem(name: str, t: pa.DataType) -> str | None:
    """What the column's Parquet type should be instead, or None when it can hold the values."""
    if _is_text(t):
        return None
    if name in _INT_COLUMNS:
        return None if _is_number(t) else "an integer, float or string column"
    if name == "id":
        return None if pa.types.is_integer(t) else "a string or integer column"
    if name == "images":
        return None if _is_text_list(t) else "a string or list<string> column"
    if name == "params":
        return None if pa.types.is_struct(t) else "a string (JSON object) or struct column"
    if name.startswith(PARAM_PREFIX):
        scalar = _is_number(t) or pa.types.is_boolean(t)
        return None if scalar else "a string, number or boolean column"
    return "a string column"


class ParquetReader:
    """Reads a local Parquet file in record batches of the known columns only."""

    def __init__(self, path: str, uri: str) -> None:
        self._uri = uri
        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ManifestError(f"manifest {uri} is not a readable Parquet file: {exc}") from exc
        self.schema = self._file.schema_arrow
        self.columns = list(self.schema.names)
        self.num_rows = self._file.metadata.num_rows

    def check(self, cmap: ColumnMap) -> None:
        for raw, name in cmap.canonical.items():
            t = self.schema.field(raw).type
            expected = parquet_type_problem(name, t)
            if expected:
                raise ManifestError(
                    f"manifest {self._uri}: column {raw!r} has the Parquet type {t}; "
                    f"expected {expected}"
                )
        if self.num_rows == 0:
            raise ManifestError(f"manifest {self._uri} has no rows")

    def rows(self, cmap: ColumnMap) -> Iterator[RawItem]:
        for segment in self.segments(cmap):
            columns = [column.to_pylist() for column in segment.columns.values()]
            names = list(segment.columns)
            for offset, values in enumerate(zip(*columns, strict=True)):
                yield RawRow(segment.row + offset, dict(zip(names, values, strict=True)))

    def segments(self, cmap: ColumnMap) -> Iterator[RawBatch]:
        """The rows of `rows`, a record batch at a time, as Arrow arrays."""
        raws = list(cmap.canonical)
        names = [cmap.canonical[r] for r in raws]
        next_row = 1
        batches = self._file.iter_batches(batch_size=PARQUET_READ_ROWS, columns=raws)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:
                raise ManifestError(
                    f"cannot read manifest {self._uri} after row {next_row - 1}: {exc}"
                ) from exc
            if batch.num_rows:
                columns = {name: batch.column(i) for i, name in enumerate(names)}
                yield RawBatch(next_row, columns, batch.num_rows)
            next_row += batch.num_rows

    def close(self) -> None:
        self._file.close()
