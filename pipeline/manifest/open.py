"""Manifests: open a CSV or Parquet list of edits (local or S3), stream its rows, validate them.

A manifest is a `.csv` (also `.csv.gz`, `.tsv`) or `.parquet`/`.pq` file, at a local path
(`file://` accepted) or at `s3://bucket/key`. A CSV is UTF-8 (a BOM is fine), its delimiter is
`,`, `;` or a tab (sniffed from the header line), and quoted values may span lines. Rows are
numbered from 1, the header not counted; every data row becomes exactly one ManifestRow (valid)
or InvalidRow (with one reason per problem), in file order, streamed in batches so a manifest
of millions of rows never sits in memory.

Columns (names are matched ignoring case and surrounding spaces; an empty cell means "not set"):

- `prompt` (required): the edit instruction, at most 1000 characters (after trimming).
- `image`: one source image, the one that is edited.
- `images`: 1 to 5 sources: a JSON array (`["a.png", "b.png"]`), `a.png|b.png`, or a
  Parquet `list<string>`. The first is edited, the others are references. A row sets
  `image` or `images`, not both.
- `mask`: optional source, a PNG whose transparent pixels mark the area to edit.
- `id`: optional label, at most 256 characters, no `/`, `\\`, NUL or control characters,
  not `.` or `..`; a repeated id makes the later rows invalid. Default `row-<row>`. Ids are
  labels only, never part of a storage key.
- `seed`: optional integer 0 to 2**63-1 (`42`, `42.0`; not `4.5`).
- `n`: optional number of outputs, 1 to 10 (default 1).
- `size`: optional `WxH`, `W:H` or `auto`; mapped to the nearest supported output size.
- `aspect_ratio`: optional `W:H` or `auto` (`size` wins over it).
- `resolution`: optional tier such as `1K`, or `auto`.
- `output_format`: optional `png`, `jpeg` (or `jpg`), `gif`, `webp`, `avif`.
- `output_compression`: optional integer 1 to 100, for lossy formats.
- `quality`, `user`: optional free text, passed on.
- `params`: optional provider extras as a JSON object, e.g. `{"turbo": false}`.
- `param.<name>`: optional provider extra `<name>` (e.g. `param.turbo`): `true`, `false`
  and numbers are read as JSON, other text stays text, `null` or empty means unset.

Sources are local paths (relative ones resolve against the manifest's own directory, or
against its key prefix for an S3 manifest), `file://` paths, `s3://bucket/key` or `http(s)://`
URLs. They are not read here; loading them later reports its own errors.

Extras (`params`, `param.<name>`) may not set a field that has its own column or that the client
sets (`model`, `response_format`): that is an error naming the key (a `param.size` column fails
the whole manifest). A key set both in `params` and by a `param.<name>` column in the same row
is an error too, rather than one silently winning. Other columns are ignored and reported as
unknown, so a typo such as `promt` shows.

Manifest-level problems raise ManifestError at `open_manifest`: missing or unreadable file,
unknown format, no rows, no `prompt` column, no `image`/`images` column, a column twice, a
Parquet column of a type that cannot hold its values, a CSV that is not UTF-8. Problems that
only a full pass can find (bad bytes or a never-ending quoted value deep in a CSV) raise
ManifestError while streaming; `validate_manifest` makes that pass before anything is spent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline import spec
from pipeline.manifest.batch import BatchValidator, FastRows
from pipeline.manifest.batch_rows import parsed_rows
from pipeline.manifest.handle import ManifestHandle
from pipeline.manifest.read import (
    ColumnMap,
    ParquetReader,
    RawItem,
    map_columns,
    suggest,
)
from pipeline.manifest.row_sets import RowsLeft
from pipeline.manifest.rows import KNOWN_COLUMNS, PARAM_PREFIX, RowValidator, SourceBase
from pipeline.manifest.types import ROW_COLUMN, InvalidRow, ManifestRow, ParsedRow
from pipeline.models.profile import ModelProfile
from pipeline.models.registry import DEFAULT_PROFILE

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "KNOWN_COLUMNS",
    "MAX_REPORTED_ERRORS",
    "PARAM_PREFIX",
    "ROW_COLUMN",
    "Manifest",
    "ValidationReport",
    "format_report",
    "open_manifest",
    "validate_manifest",
]

DEFAULT_BATCH_SIZE = 1000
# Rows `start <= row < end` (1-based data rows; end None: to the last row).
RowRange = tuple[int, int | None]
MAX_REPORTED_ERRORS = 1000
# format_report lists at most this many rows; the report object keeps MAX_REPORTED_ERRORS.
DEFAULT_LISTED_ERRORS = 50

ManifestFormat = Literal["csv", "parquet"]


class Manifest(ManifestHandle):
    """An opened manifest whose header has been checked; rows are read lazily, in batches.

    Each call to `batches` (or `rows`) is a fresh pass over the file, with its own id check.
    Close it (or use it as a context manager) to remove the local copy of an S3 Parquet file.
    """

    format: ManifestFormat
    columns: list[str]
    unknown_columns: list[str]
    delimiter: str | None

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        etag: str | None = None,
        profile: ModelProfile | None = None,
    ) -> None:
        super().__init__(uri, map_columns, endpoint_url=endpoint_url, etag=etag)
        # The rules rows are checked by: the run's model (default p-image-edit).
        self.profile = profile or DEFAULT_PROFILE
        self.format = "csv" if self.fmt == "csv" else "parquet"
        self.delimiter = self.csv.delimiter if self.csv is not None else None
        if self.parquet is not None:
            try:
                self.parquet.check(self._cmap)
            except BaseException:
                self.close()
                raise
        self._base = self.base
        self.columns = list(self._cmap.found)
        self.unknown_columns = list(self._cmap.unknown)

    @property
    def column_map(self) -> ColumnMap:
        return self._cmap

    @property
    def source_base(self) -> SourceBase:
        """Where relative image and mask paths resolve."""
        return self._base

    def _raw_rows(self) -> Iterator[RawItem]:
        return self._reader.rows(self._cmap)

    def rows(self, row_range: RowRange | None = None) -> Iterator[ParsedRow]:
        """Every row in order, validated (one pass); only rows `start <= row < end` if given.

        Rows before the range are still validated, so duplicate ids are found across the
        whole manifest, not just within a shard of it. Rows are checked a batch at a time
        (`pipeline.manifest.batch_rows`); each is what `rows_one_by_one` makes of it.
        """
        for segment in self._segments(row_range):
            yield from segment

    def rows_one_by_one(self, row_range: RowRange | None = None) -> Iterator[ParsedRow]:
        """What `rows` yields, every row through the per-row checks (`RowValidator`): the
        reference the batch checks are held to."""
        validator = RowValidator(self._cmap.known, self._base, self.profile)
        start, end = row_range or (1, None)
        for item in self._raw_rows():
            if end is not None and item.row >= end:
                return
            if isinstance(item, InvalidRow):
                parsed: ParsedRow = item
            else:
                parsed = validator.validate(item.row, item.cells, item.problems)
            if parsed.row >= start:
                yield parsed

    def _segments(self, row_range: RowRange | None) -> Iterator[list[ParsedRow]]:
        """The rows of `rows`, a reader's segment at a time (a few thousand rows)."""
        checker = BatchValidator(RowValidator(self._cmap.known, self._base, self.profile))
        start, end = row_range or (1, None)
        for item in self._reader.segments(self._cmap):
            if end is not None and item.row >= end:
                return
            if isinstance(item, InvalidRow):
                if item.row >= start:
                    yield [item]
                continue
            if end is not None and item.row + item.length > end:
                item = item.head(end - item.row)
            parsed = parsed_rows(checker, item)
            if item.row < start:
                parsed = parsed[start - item.row :]
            if parsed:
                yield parsed

    def batches(
        self, batch_size: int = DEFAULT_BATCH_SIZE, row_range: RowRange | None = None
    ) -> Iterator[list[ParsedRow]]:
        """The rows in order, in lists of `batch_size` (the last may be shorter)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        batch: list[ParsedRow] = []
        for segment in self._segments(row_range):
            at = 0
            while at < len(segment):
                take = segment[at : at + batch_size - len(batch)]
                batch.extend(take)
                at += len(take)
                if len(batch) >= batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def count_rows(self) -> int:
        """Data rows (valid or not): Parquet metadata, or a streaming pass over a CSV."""
        if isinstance(self._reader, ParquetReader):
            return int(self._reader.num_rows)
        return self._reader.count_rows(self._cmap)

    def validate(
        self,
        *,
        max_errors: int = MAX_REPORTED_ERRORS,
        row_range: RowRange | None = None,
        left: Callable[[int], bool] | None = None,
    ) -> ValidationReport:
        """One full pass: counts, the first `max_errors` invalid rows, per-column tallies.

        With `left` (a row number -> whether the run still has to edit it), the report also
        counts the valid rows and images left to pay for (`rows_left`, `images_left`).
        """
        report = self.new_report()
        rows_left = images_left = 0
        start, end = row_range or (1, None)
        # The rows of `rows`, checked a batch at a time (see pipeline.manifest.batch): the
        # same report, without a Python call per valid row.
        validator = RowValidator(self._cmap.known, self._base, self.profile)
        checker = BatchValidator(validator)
        for item in self._reader.segments(self._cmap):
            if end is not None and item.row >= end:
                break
            if isinstance(item, InvalidRow):
                if item.row >= start:
                    report.add(item, max_errors=max_errors)
                continue
            if end is not None and item.row + item.length > end:
                item = item.head(end - item.row)
            slow, fast = checker.validate(item)
            more_rows, more_images = _count_batch(report, slow, fast, start, max_errors, left)
            rows_left += more_rows
            images_left += more_images
        if left is not None:
            report.rows_left, report.images_left = rows_left, images_left
        return report

    def new_report(self) -> ValidationReport:
        """An empty report of this manifest, by the rules of its model's profile."""
        profile = self.profile
        return ValidationReport(
            uri=self.uri,
            format=self.format,
            columns=list(self.columns),
            unknown_columns=list(self.unknown_columns),
            model=profile.model,
            profile_origin=profile.origin,
            profile_note=profile.note,
            price_per_image_usd=profile.cost.price_per_image_usd,
        )

    def __repr__(self) -> str:
        return f"Manifest({self.uri!r}, format={self.format!r}, columns={self.columns!r})"


def _count_batch(
    report: ValidationReport,
    slow: Iterator[ParsedRow],
    fast: FastRows,
    start: int,
    max_errors: int,
    left: Callable[[int], bool] | None,
) -> tuple[int, int]:
    """Count one checked batch (rows before `start` left out) into `report`, as `add` would
    row by row; returns the valid rows and images `left` to edit."""
    in_range = fast.rows >= start
    # Fields not sent enter the tally in the order rows first set them (its ties' order):
    # those first set by a valid row of `fast` enter before any later row's.
    pending: list[tuple[int, int, str]] = []
    for rank, (column, mask) in enumerate(fast.dropped.items()):
        hits = np.flatnonzero(mask & in_range)
        if len(hits) and column not in report.dropped:
            pending.append((int(fast.rows[hits[0]]), rank, column))
    pending.sort(reverse=True)

    def enter_before(row: int) -> None:
        while pending and pending[-1][0] < row:
            column = pending.pop()[2]
            if column not in report.dropped:
                report.dropped[column] = 0

    rows_left = images_left = 0
    for parsed in slow:
        if parsed.row < start:
            continue
        if pending and isinstance(parsed, ManifestRow) and parsed.dropped:
            enter_before(parsed.row)
        report.add(parsed, max_errors=max_errors)
        if left is not None and isinstance(parsed, ManifestRow) and left(parsed.row):
            rows_left += 1
            images_left += parsed.params.image_count()
    enter_before(2**63)
    rows, images = fast.rows[in_range], fast.images[in_range]
    count = len(rows)
    report.rows += count
    report.valid += count
    report.images += int(images.sum())
    for column, mask in fast.dropped.items():
        times = int(np.count_nonzero(mask[in_range]))
        if times:
            report.dropped[column] += times
    if left is not None and count:
        wanted = (
            left.mask(rows)
            if isinstance(left, RowsLeft)
            else np.fromiter((left(row) for row in rows.tolist()), dtype=bool, count=count)
        )
        rows_left += int(np.count_nonzero(wanted))
        images_left += int(images[wanted].sum())
    return rows_left, images_left


def open_manifest(
    uri: str,
    *,
    endpoint_url: str | None = None,
    etag: str | None = None,
    profile: ModelProfile | None = None,
) -> Manifest:
    """Open a manifest and check it as a whole (file, format, header, column types).

    Raises ManifestError naming the problem. `endpoint_url` selects the S3 service
    (see pipeline.io.s3.resolve_endpoint_url); `etag` the version of an S3 manifest to read
    (one that has changed since is a ManifestError; None: the version this first read sees);
    `profile` the model whose rules rows are checked by (None: p-image-edit).
    """
    return Manifest(uri, endpoint_url=endpoint_url, etag=etag, profile=profile)


@dataclass
class ValidationReport:
    """The outcome of validating every row of a manifest."""

    uri: str
    format: str
    columns: list[str] = field(default_factory=list)
    unknown_columns: list[str] = field(default_factory=list)
    rows: int = 0
    valid: int = 0
    invalid: int = 0
    images: int = 0  # output images the valid rows ask for (the sum of n)
    errors: list[InvalidRow] = field(default_factory=list)  # the first MAX_REPORTED_ERRORS
    errors_by_column: Counter[str] = field(default_factory=Counter)  # invalid rows per column
    # Valid rows and images a run still has to pay for (not done, selected); see validate.
    rows_left: int | None = None
    images_left: int | None = None
    # Valid rows whose sources were read and checked (see pipeline.engine.source_check);
    # None: not checked.
    sources_checked: int | None = None
    source_invalid: int = 0  # of those, rows with a missing or unusable source or mask
    # The model the rows were checked for, where its profile came from, and why it is a guess.
    model: str = spec.DEFAULT_MODEL
    profile_origin: str = "built-in"
    profile_note: str | None = None
    price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD
    # Valid rows per field they set that the model does not take (not sent).
    dropped: Counter[str] = field(default_factory=Counter)

    def add(self, parsed: ParsedRow, *, max_errors: int = MAX_REPORTED_ERRORS) -> None:
        """Count one row (valid or not) into the report, keeping the first `max_errors`."""
        self.rows += 1
        if isinstance(parsed, ManifestRow):
            self.valid += 1
            self.images += parsed.params.image_count()
            self.dropped.update(parsed.dropped)
            return
        self.invalid += 1
        if len(self.errors) < max_errors:
            self.errors.append(parsed)
        for column in {e.column for e in parsed.errors}:
            self.errors_by_column[column] += 1

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    @property
    def errors_truncated(self) -> bool:
        return self.invalid > len(self.errors)

    @property
    def estimated_cost_usd(self) -> float:
        """What the valid rows would cost at the known price per output image."""
        return round(self.images * self.price_per_image_usd, 6)


def validate_manifest(
    uri: str,
    *,
    endpoint_url: str | None = None,
    max_errors: int = MAX_REPORTED_ERRORS,
    row_range: RowRange | None = None,
    left: Callable[[int], bool] | None = None,
    profile: ModelProfile | None = None,
) -> ValidationReport:
    """Open the manifest and validate every row; ManifestError for manifest-level problems."""
    with open_manifest(uri, endpoint_url=endpoint_url, profile=profile) as manifest:
        return manifest.validate(max_errors=max_errors, row_range=row_range, left=left)


def format_error(row: InvalidRow) -> list[str]:
    """One line per problem: `row 7, column seed: seed 'abc' is not an integer`."""
    lines = []
    for err in row.errors:
        if err.column == ROW_COLUMN:
            lines.append(f"row {row.row}: {err.reason}")
        else:
            lines.append(f"row {row.row}, column {err.column}: {err.reason}")
    return lines


def format_report(report: ValidationReport, *, max_listed: int = DEFAULT_LISTED_ERRORS) -> str:
    """The report for a person: totals, unknown columns, then one line per problem."""
    lines = [
        f"manifest {report.uri} ({report.format}): {report.rows} rows, {report.valid} valid, "
        f"{report.invalid} invalid; {report.images} output images "
        f"(about {spec.CURRENCY} {report.estimated_cost_usd:.2f})"
    ]
    if report.model != spec.DEFAULT_MODEL or report.profile_origin != "built-in":
        note = f": {report.profile_note}" if report.profile_note else ""
        lines.append(f"checked for model {report.model} ({report.profile_origin} profile{note})")
    if report.dropped:
        tally = ", ".join(f"{name} in {k} rows" for name, k in report.dropped.most_common())
        lines.append(f"not sent to {report.model} (it does not take them): {tally}")
    if report.unknown_columns:
        shown = []
        for column in report.unknown_columns:
            guess = suggest(column)
            shown.append(f"{column!r} (did you mean {guess!r}?)" if guess else repr(column))
        lines.append("unknown columns, ignored: " + ", ".join(shown))
    if report.errors_by_column:
        tally = ", ".join(
            f"{'whole row' if c == ROW_COLUMN else c} {k}"
            for c, k in report.errors_by_column.most_common()
        )
        lines.append(f"invalid rows by column: {tally}")
    if report.images_left is not None:
        lines.append(
            f"left to edit: {report.rows_left} of {report.valid} valid rows, "
            f"{report.images_left} images (about {spec.CURRENCY} "
            f"{report.images_left * report.price_per_image_usd:.2f}); the others are done"
        )
    if report.sources_checked is not None:
        lines.append(
            f"sources read for {report.sources_checked} valid rows: "
            f"{report.source_invalid} with a missing or unusable image or mask"
        )
    listed = 0
    for row in report.errors:
        for line in format_error(row):
            if listed >= max_listed:
                break
            lines.append(line)
            listed += 1
    more = report.invalid - len(report.errors)
    problems = sum(len(r.errors) for r in report.errors)
    if problems > listed or more > 0:
        unlisted = problems - listed
        parts = []
        if unlisted > 0:
            parts.append(f"{unlisted} more problems")
        if more > 0:
            parts.append(f"{more} more invalid rows")
        lines.append(f"... and {' and '.join(parts)} not listed")
    if report.ok:
        lines.append("all rows are valid")
    return "\n".join(lines)
