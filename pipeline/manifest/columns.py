"""A manifest's name and header: its format, its columns, and the raw rows readers yield.

Column names ignore case and surrounding spaces; `param.<name>` columns keep their name's
case. The header must hold a prompt column and an image or images column, each known column
at most once.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline.errors import ManifestError
from pipeline.manifest.rows import KNOWN_COLUMNS, PARAM_PREFIX, fixed_param_column_reason
from pipeline.manifest.types import FieldError, InvalidRow

__all__ = [
    "CSV_EXTENSIONS",
    "GZIP_EXTENSIONS",
    "PARQUET_EXTENSIONS",
    "ColumnMap",
    "RawBatch",
    "RawItem",
    "RawRow",
    "canonical_name",
    "manifest_format",
    "map_columns",
    "suggest",
]

CSV_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv")
GZIP_EXTENSIONS: tuple[str, ...] = (".csv.gz", ".tsv.gz")
PARQUET_EXTENSIONS: tuple[str, ...] = (".parquet", ".pq")


@dataclass(frozen=True)
class RawRow:
    """One data row's cells by canonical column name, plus problems found while reading it."""

    row: int
    cells: dict[str, object]
    problems: tuple[FieldError, ...] = ()


RawItem = RawRow | InvalidRow


@dataclass(frozen=True)
class RawBatch:
    """`length` consecutive data rows from `row` on, as Arrow arrays by canonical column name
    (the known columns only), plus the problems found while reading some of them, by index
    in the batch (as RawRow.problems)."""

    row: int
    columns: dict[str, pa.Array]
    length: int
    problems: dict[int, tuple[FieldError, ...]] = field(default_factory=dict)

    def head(self, count: int) -> RawBatch:
        """The first `count` rows."""
        return RawBatch(
            self.row,
            {name: array.slice(0, count) for name, array in self.columns.items()},
            count,
            {i: p for i, p in self.problems.items() if i < count},
        )


@dataclass
class ColumnMap:
    """The manifest's columns: as found, the known ones by canonical name, and the rest."""

    found: list[str]
    canonical: dict[str, str] = field(default_factory=dict)  # raw name -> canonical name
    unknown: list[str] = field(default_factory=list)

    @property
    def known(self) -> list[str]:
        return list(self.canonical.values())


def canonical_name(raw: str) -> str | None:
    """The known column `raw` names (case and surrounding spaces ignored), else None."""
    name = raw.strip()
    lowered = name.lower()
    if lowered in KNOWN_COLUMNS:
        return lowered
    if lowered.startswith(PARAM_PREFIX):
        return PARAM_PREFIX + name[len(PARAM_PREFIX) :].strip()
    return None


def map_columns(found: Sequence[str], uri: str) -> ColumnMap:
    """Check the header: no duplicate known columns, a prompt, an image or images column."""
    cmap = ColumnMap(found=list(found))
    first_at: dict[str, int] = {}
    for index, raw in enumerate(found, 1):
        name = canonical_name(raw)
        if name is None:
            # pandas writes its index as an unnamed first column; it is noise, not a typo.
            if not raw.startswith("__index_level_"):
                cmap.unknown.append(raw)
            continue
        if name in first_at:
            raise ManifestError(
                f"manifest {uri} has the column {name!r} twice (columns {first_at[name]} "
                f"and {index})"
            )
        first_at[name] = index
        if name.startswith(PARAM_PREFIX):
            reason = fixed_param_column_reason(name)
            if reason:
                raise ManifestError(f"manifest {uri}: {reason}")
        cmap.canonical[raw] = name
    listed = ", ".join(repr(c) for c in found) or "none"
    if "prompt" not in first_at:
        raise ManifestError(f"manifest {uri} has no prompt column; found columns: {listed}")
    if "image" not in first_at and "images" not in first_at:
        raise ManifestError(
            f"manifest {uri} has no image or images column; found columns: {listed}"
        )
    return cmap


def suggest(column: str) -> str | None:
    """The known column an unknown one most likely meant (`promt` -> `prompt`)."""
    matches = difflib.get_close_matches(column.strip().lower(), KNOWN_COLUMNS, n=1, cutoff=0.75)
    return matches[0] if matches else None


def manifest_format(uri: str) -> tuple[str, bool]:
    """("csv" | "parquet", gzip-compressed) from the name; ManifestError when unknown."""
    name = uri.lower().rstrip("/")
    if name.endswith(GZIP_EXTENSIONS):
        return "csv", True
    if name.endswith(CSV_EXTENSIONS):
        return "csv", False
    if name.endswith(PARQUET_EXTENSIONS):
        return "parquet", False
    raise ManifestError(
        f"unknown format for manifest {uri}: expected a name ending in .csv, .csv.gz, .tsv, "
        ".parquet or .pq"
    )
