"""Choosing manifest rows for a backfill: by id, by a filter expression, or a run's failures.

`select_rows` answers the 1-based data-row numbers (the numbering of `pipeline.manifest.open`, a
ragged CSV row counted in place) that pass every criterion given; the engine then edits only
those (RunContext.only_rows). The criteria combine with AND:

- `ids`: manifest ids (a row without an id is `row-<n>`, as in the manifest). An id that no
  row has is an error, so a typo cannot silently select nothing.
- `where`: an expression of pipeline.manifest.where's small language over the manifest's columns
  (never Python: it is parsed and interpreted by pipeline.manifest.where), e.g.
  `size == "1024x1024" and seed > 10`, `startswith(id, "cat-")`,
  `` `param.turbo` == "false" `` (names that are not identifiers go in backticks). Known
  columns are named canonically (lower case, see pipeline.manifest.open); other columns as in the
  file. In a CSV every cell is text except `seed`, `n` and `output_compression`, which are
  numbers (`num(col)` reads another column as one); a Parquet column keeps its type. The
  expression is checked against the columns before any row is read.
- `failed_rows`: the rows that ended `failed` in an earlier run (the engine reads them from that
  run's results table: pipeline.engine.results.failed_rows_of).

`RawManifest` is the reader under it (and under pipeline.uses.augment): every column of every row,
with no prompt or image column required.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import pandas as pd
import pyarrow as pa

from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest.cells import MAX_ID_CHARS, cell_text
from pipeline.manifest.handle import ManifestHandle
from pipeline.manifest.read import (
    ColumnMap,
    RawItem,
    RawRow,
    canonical_name,
)
from pipeline.manifest.where import Where, compile_where

__all__ = [
    "NUMERIC_CSV_COLUMNS",
    "SELECT_BATCH_ROWS",
    "RawManifest",
    "check_where",
    "row_id",
    "select_rows",
]

# Rows evaluated per DataFrame: big enough to amortise pandas' per-call cost, small enough
# that a million-row manifest never sits in memory.
SELECT_BATCH_ROWS = 8192
# CSV columns read as numbers for `where`, so `seed > 10` compares numbers, not text.
NUMERIC_CSV_COLUMNS: tuple[str, ...] = ("seed", "n", "output_compression")
# Unknown ids quoted in an error; the rest are counted.
MAX_SHOWN_IDS = 10
# Ids one selection may name (a form field: a list past this belongs in a manifest).
MAX_SELECT_IDS = 100_000
# `DataFrame.eval` resolves names here before the columns: empty, so `@name` finds nothing.
_NO_VARIABLES: dict[str, Any] = {}


class RawManifest(ManifestHandle):
    """Every column of a manifest's rows, streamed in order, numbered like pipeline.manifest.open.

    Columns are keyed by their canonical name when they are known manifest columns (`Seed ` ->
    `seed`, `PARAM.turbo` -> `param.turbo`) and by their name in the file otherwise. Unlike
    `open_manifest`, no column is required. Close it (or use `with`) to remove the local copy
    of an S3 Parquet file.
    """

    format: str
    columns: list[str]
    types: dict[str, pa.DataType]

    def __init__(
        self, uri: str, *, endpoint_url: str | None = None, etag: str | None = None
    ) -> None:
        super().__init__(uri, all_columns, endpoint_url=endpoint_url, etag=etag)
        self.format = self.fmt
        if self.parquet is None:
            self.types = {name: pa.string() for name in self._cmap.known}
        else:
            if self.parquet.num_rows == 0:
                self.close()
                raise ManifestError(f"manifest {uri} has no rows")
            schema = self.parquet.schema
            self.types = {
                name: schema.field(raw).type for raw, name in self._cmap.canonical.items()
            }
        self.columns = self._cmap.known

    def rows(self) -> Iterator[RawItem]:
        """Each data row: a RawRow with every column, or an InvalidRow for a ragged CSV row."""
        return self._reader.rows(self._cmap)

    def __repr__(self) -> str:
        return f"RawManifest({self.uri!r}, columns={self.columns!r})"


def all_columns(found: Sequence[str], uri: str) -> ColumnMap:
    """A ColumnMap keeping every column: known ones canonical, the others as named."""
    cmap = ColumnMap(found=list(found))
    first_at: dict[str, int] = {}
    for index, raw in enumerate(found, 1):
        name = canonical_name(raw) or raw
        if name in first_at:
            raise ManifestError(
                f"manifest {uri} has the column {name!r} twice (columns {first_at[name]} "
                f"and {index})"
            )
        first_at[name] = index
        cmap.canonical[raw] = name
    return cmap


def check_ids(ids: Iterable[str]) -> None:
    """ConfigError unless `ids` is a list a form could sensibly hold (count and length capped)."""
    for count, value in enumerate(ids, 1):
        if count > MAX_SELECT_IDS:
            raise ConfigError(f"more than {MAX_SELECT_IDS} ids; select with where or a manifest")
        if not isinstance(value, str):
            raise ConfigError(f"id {count} is not text")
        if len(value) > MAX_ID_CHARS:
            raise ConfigError(
                f"id {count} is {len(value)} characters; ids have at most {MAX_ID_CHARS}"
            )


def row_id(row: int, cells: dict[str, object]) -> str:
    """The id pipeline.manifest.open gives the row: its `id` cell (trimmed), else `row-<n>`."""
    return cell_text(cells.get("id")) or f"row-{row}"


# --- where --------------------------------------------------------------------------------


def _cell(value: object) -> object:
    # An empty cell means "not set" everywhere in a manifest: to `where` it is null.
    return None if isinstance(value, str) and not value.strip() else value


def _frame(rows: Sequence[RawRow], columns: Sequence[str], numeric: Iterable[str]) -> pd.DataFrame:
    data: dict[str, Any] = {c: [_cell(r.cells.get(c)) for r in rows] for c in columns}
    frame = pd.DataFrame(data, columns=list(columns), dtype=object)
    for column in numeric:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _is_numeric(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_numeric(t.value_type)
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _numeric_columns(manifest: RawManifest) -> list[str]:
    """Columns compared as numbers: a null or bad cell becomes NaN, never a TypeError."""
    if manifest.format == "csv":
        return [c for c in NUMERIC_CSV_COLUMNS if c in manifest.columns]
    return [c for c in manifest.columns if _is_numeric(manifest.types[c])]


def check_where(where: str, columns: Sequence[str], numeric: Iterable[str] = ()) -> Where:
    """The compiled `where` over `columns`; ConfigError naming the problem (no row is read)."""
    return compile_where(where, columns, numeric)


def _where_rows(where: Where, rows: Sequence[RawRow], manifest: RawManifest) -> list[int]:
    if not rows:
        return []
    frame = _frame(rows, manifest.columns, _numeric_columns(manifest))
    mask = where.mask(frame)
    return [r.row for r, keep in zip(rows, mask, strict=True) if keep]


# --- selection ----------------------------------------------------------------------------


def _batched(items: Iterator[RawItem], size: int) -> Iterator[list[RawItem]]:
    batch: list[RawItem] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def select_rows(
    manifest_uri: str,
    *,
    ids: Iterable[str] | None = None,
    where: str | None = None,
    failed_rows: set[int] | None = None,
    endpoint_url: str | None = None,
    etag: str | None = None,
) -> set[int]:
    """The 1-based row numbers passing every criterion given (at least one is required).

    Raises ConfigError for no criterion, an empty id list, an id no row has, a bad `where`
    or an unreadable run; ManifestError when the manifest cannot be read.
    """
    if ids is None and where is None and failed_rows is None:
        raise ConfigError("choose the rows: give ids, a where expression or a run's failures")
    wanted: set[str] | None = None
    if ids is not None:
        wanted = {i.strip() for i in ([ids] if isinstance(ids, str) else ids)}
        wanted.discard("")
        if not wanted:
            raise ConfigError("the id list is empty")
    failed = failed_rows

    selected: set[int] = set()
    found: set[str] = set()
    with RawManifest(manifest_uri, endpoint_url=endpoint_url, etag=etag) as manifest:
        compiled = (
            None
            if where is None
            else check_where(where, manifest.columns, _numeric_columns(manifest))
        )
        for batch in _batched(manifest.rows(), SELECT_BATCH_ROWS):
            candidates: list[RawRow] = []
            for item in batch:
                if not isinstance(item, RawRow):
                    continue  # a ragged CSV row: no cells to match, and it can only be invalid
                if wanted is not None:
                    rid = row_id(item.row, item.cells)
                    if rid not in wanted:
                        continue
                    found.add(rid)
                if failed is not None and item.row not in failed:
                    continue
                candidates.append(item)
            if compiled is None:
                selected.update(r.row for r in candidates)
            else:
                selected.update(_where_rows(compiled, candidates, manifest))
    if wanted is not None and found != wanted:
        missing = sorted(wanted - found)
        shown = ", ".join(repr(m) for m in missing[:MAX_SHOWN_IDS])
        more = f" and {len(missing) - MAX_SHOWN_IDS} more" if len(missing) > MAX_SHOWN_IDS else ""
        raise ConfigError(f"{len(missing)} id(s) are not in manifest {manifest_uri}: {shown}{more}")
    return selected
