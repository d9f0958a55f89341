"""Manifest readers: CSV and Parquet, local or on S3, streamed in blocks as raw rows.

A reader checks the file and its header when it is made (so a bad manifest fails at open
time) and then yields one raw row per data row, in order, numbered from 1 (header excluded).
Each raw row is a `RawRow` (cells keyed by canonical column name) or, for a CSV row with the
wrong number of fields, an InvalidRow in its place.

The CSV reader is here; the rest is in the modules this one gathers: `columns` (format,
header, raw rows), `location` (where the bytes are: `ManifestFile`) and `parquet_read`.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from pipeline.errors import ManifestError
from pipeline.manifest.columns import (
    CSV_EXTENSIONS,
    GZIP_EXTENSIONS,
    PARQUET_EXTENSIONS,
    ColumnMap,
    RawBatch,
    RawItem,
    RawRow,
    canonical_name,
    manifest_format,
    map_columns,
    suggest,
)
from pipeline.manifest.location import ManifestFile
from pipeline.manifest.parquet_read import PARQUET_READ_ROWS, ParquetReader, parquet_type_problem
from pipeline.manifest.rows import ragged_row
from pipeline.manifest.types import FieldError, InvalidRow

__all__ = [
    "CSV_BLOCK_BYTES",
    "CSV_EXTENSIONS",
    "GZIP_EXTENSIONS",
    "PARQUET_EXTENSIONS",
    "PARQUET_READ_ROWS",
    "ColumnMap",
    "CsvReader",
    "ManifestFile",
    "ParquetReader",
    "RawItem",
    "RawRow",
    "canonical_name",
    "manifest_format",
    "map_columns",
    "parquet_type_problem",
    "sniff_delimiter",
    "suggest",
]

# How much of a CSV is read up front to find its header, sniff the delimiter and check UTF-8.
SNIFF_BYTES = 64 * 1024
MAX_HEADER_BYTES = 1024 * 1024
# pyarrow parses a CSV in blocks of this size and its I/O thread reads up to about 32 blocks
# ahead, so roughly 33 blocks of raw CSV (plus one output batch) is what sits in memory,
# whatever the file's size. A single row may not be larger than a block.
CSV_BLOCK_BYTES = 256 * 1024
DELIMITERS: tuple[str, ...] = (",", ";", "\t")
# Text of a ragged row kept for its hint; the rest is not needed.
MAX_RAGGED_TEXT = 4096


_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)

# Telling a multi-line value that swallowed rows (a quote left open) from a real multi-line
# prompt: see CsvReader._rowlike_lines.
_SOURCE_COLUMNS = frozenset({"image", "images", "mask"})
_IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".gif",
    ".avif",
    ".bmp",
    ".tif",
    ".tiff",
    ".heic",
    ".heif",
)
_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://\S+$")


# --- CSV ----------------------------------------------------------------------------------


def _header_end(text: str) -> int:
    """Index of the line break ending the header (quotes respected), or -1."""
    in_quotes = False
    for i, ch in enumerate(text):
        if ch == '"':
            in_quotes = not in_quotes
        elif ch in "\r\n" and not in_quotes:
            return i
    return -1


def sniff_delimiter(header: str) -> str:
    """The candidate delimiter the header uses most (`,` wins ties and single columns)."""
    return max(DELIMITERS, key=header.count)


class CsvReader:
    """Streams a CSV with pyarrow; every column is read as text, ragged rows kept in place."""

    def __init__(self, source: ManifestFile, *, gzip: bool) -> None:
        self._source = source
        self._gzip = gzip
        header = self._read_header()
        self.delimiter = sniff_delimiter(header)
        self.columns = next(csv.reader([header], delimiter=self.delimiter), [])
        # Where the image sources are, for telling swallowed rows from multi-line prompts.
        self._source_indices = [
            i for i, raw in enumerate(self.columns) if canonical_name(raw) in _SOURCE_COLUMNS
        ]

    def _stream(self) -> pa.NativeFile:
        raw = self._source.open()
        return pa.CompressedInputStream(raw, "gzip") if self._gzip else raw

    def _read_prefix(self) -> tuple[bytes, bool]:
        """The first bytes of the (decompressed) file up to the header's end; and whether EOF."""
        stream = self._stream()
        chunks: list[bytes] = []
        size = 0
        seen_line_end = False
        try:
            # At least SNIFF_BYTES (to check UTF-8 and see whether rows follow the header),
            # more only while the header line has not ended.
            while size < SNIFF_BYTES or (not seen_line_end and size < MAX_HEADER_BYTES):
                chunk = stream.read(SNIFF_BYTES)
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
                size += len(chunk)
                seen_line_end = seen_line_end or b"\n" in chunk or b"\r" in chunk
        except (OSError, pa.ArrowException) as exc:
            what = "decompress" if self._gzip else "read"
            raise ManifestError(f"cannot {what} manifest {self._source.uri}: {exc}") from exc
        finally:
            stream.close()
        return b"".join(chunks), False

    def _read_header(self) -> str:
        uri = self._source.uri
        data, eof = self._read_prefix()
        if data.startswith(_UTF16_BOMS):
            raise ManifestError(f"manifest {uri} is UTF-16 or UTF-32 encoded; save it as UTF-8")
        data = data.removeprefix(codecs.BOM_UTF8)
        try:
            text, _ = codecs.utf_8_decode(data, "strict", eof)
        except UnicodeDecodeError as exc:
            line = data.count(b"\n", 0, exc.start) + 1
            raise ManifestError(
                f"manifest {uri} is not valid UTF-8 (line {line} has the byte "
                f"0x{data[exc.start]:02x}); save it as UTF-8"
            ) from None
        # pyarrow skips blank lines before the header too.
        stripped = text.lstrip("\r\n")
        if not stripped.strip():
            raise ManifestError(f"manifest {uri} has no rows (the file is empty)")
        end = _header_end(stripped)
        if end < 0:
            if not eof:
                raise ManifestError(
                    f"manifest {uri}: no end of the header line in the first "
                    f"{MAX_HEADER_BYTES // 1024} KiB; is this a CSV file?"
                )
            end = len(stripped)
        if eof and not stripped[end:].strip():
            raise ManifestError(f"manifest {uri} has no rows (only a header)")
        return stripped[:end]

    def _open_reader(
        self, handler: Callable[[Any], str], include: list[str] | None
    ) -> tuple[pa.NativeFile, pacsv.CSVStreamingReader]:
        stream = self._stream()
        try:
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(use_threads=False, block_size=CSV_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(
                    delimiter=self.delimiter,
                    newlines_in_values=True,
                    invalid_row_handler=handler,
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in self.columns},
                    include_columns=include or [],
                    strings_can_be_null=False,
                ),
            )
        except (pa.ArrowException, OSError) as exc:
            stream.close()
            raise self._translate(exc, 0) from exc
        return stream, reader

    def _translate(self, exc: Exception, last_row: int) -> ManifestError:
        uri = self._source.uri
        message = str(exc)
        if isinstance(exc, ManifestError):
            return exc
        if "straddl" in message:
            return ManifestError(
                f"bad quoting in manifest {uri}: a quoted value after data row {last_row} "
                "never ends (is a quote unclosed?)"
            )
        if "invalid UTF8" in message:
            where = _pyarrow_row(message)
            at = f"data row {where - 1}" if where else f"after data row {last_row}"
            return ManifestError(f"manifest {uri} is not valid UTF-8 ({at}); save it as UTF-8")
        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
            return ManifestError(f"cannot read manifest {uri}: {exc}")
        return ManifestError(f"cannot parse manifest {uri} after data row {last_row}: {message}")

    def _batches(self, reader: Any, last_row: Callable[[], int]) -> Iterator[pa.RecordBatch]:
        """The reader's batches; a read error names `last_row()`, the last row read well."""
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as exc:
                raise self._translate(exc, last_row()) from exc
            yield batch

    def _open_for_rows(
        self, cmap: ColumnMap
    ) -> tuple[
        pa.NativeFile,
        pacsv.CSVStreamingReader,
        deque[tuple[int, int, int, str]],
        list[tuple[int, str]],
    ]:
        """The open stream and reader, the queue pyarrow fills with ragged rows as it reads
        (row, expected and found columns, text), and the known columns (index, name)."""
        ragged: deque[tuple[int, int, int, str]] = deque()

        def on_invalid(bad: Any) -> str:
            number = bad.number if bad.number is not None else -1
            text = (bad.text or "")[:MAX_RAGGED_TEXT]
            # pyarrow counts the header as row 1.
            ragged.append((number - 1, bad.expected_columns, bad.actual_columns, text))
            return "skip"

        stream, reader = self._open_reader(on_invalid, None)
        if list(reader.schema.names) != self.columns:
            stream.close()
            raise ManifestError(
                f"cannot parse the header of manifest {self._source.uri}: read as "
                f"{reader.schema.names}, expected {self.columns}"
            )
        names = [cmap.canonical.get(raw) for raw in reader.schema.names]
        known = [(i, name) for i, name in enumerate(names) if name is not None]
        return stream, reader, ragged, known

    def rows(self, cmap: ColumnMap) -> Iterator[RawItem]:
        """Every data row in order: RawRow, or InvalidRow for a ragged row, numbered from 1
        (the segments, a row at a time)."""
        for segment in self.segments(cmap):
            if isinstance(segment, InvalidRow):
                yield segment
                continue
            names = list(segment.columns)
            columns = [column.to_pylist() for column in segment.columns.values()]
            for offset, values in enumerate(zip(*columns, strict=True)):
                yield RawRow(
                    segment.row + offset,
                    dict(zip(names, values, strict=True)),
                    segment.problems.get(offset, ()),
                )

    def segments(self, cmap: ColumnMap) -> Iterator[RawBatch | InvalidRow]:
        """What `rows` yields, with runs of consecutive rows kept as Arrow columns (RawBatch).

        Rows are numbered, and ragged rows (InvalidRow) placed, exactly as `rows` does; a row
        whose value may have swallowed rows (or the file's last row, whose quote may be left
        open) carries the same problems as there, in `RawBatch.problems`.
        """
        stream, reader, ragged, known = self._open_for_rows(cmap)
        value_at = dict(known)
        next_row = 1
        held: RawBatch | None = None
        last_values: tuple[Any, ...] = ()
        try:
            for batch in self._batches(reader, lambda: next_row - 1):  # noqa: B023
                start, count = 0, batch.num_rows
                while start < count:
                    while ragged and ragged[0][0] <= next_row:
                        _, expected, found, text = ragged.popleft()
                        if held is not None:
                            yield held
                            held = None
                        yield ragged_row(next_row, expected, found, text)
                        next_row += 1
                    take = count - start
                    if ragged:
                        take = min(take, ragged[0][0] - next_row)
                    part = batch.slice(start, take)
                    columns = {name: part.column(i) for i, name in known}
                    if held is not None:
                        yield held
                    held = RawBatch(
                        next_row, columns, take, self._batch_problems(value_at, part, known)
                    )
                    next_row += take
                    start += take
                if batch.num_rows:
                    last_values = tuple(
                        batch.column(i)[batch.num_rows - 1].as_py()
                        for i in range(batch.num_columns)
                    )
            if held is not None and not ragged:
                problems = self._unclosed_quote(list(reader.schema.names), last_values)
                if problems:
                    held.problems[held.length - 1] = problems
            if held is not None:
                yield held
            while ragged:
                _, expected, found, text = ragged.popleft()
                yield ragged_row(next_row, expected, found, text)
                next_row += 1
        finally:
            stream.close()

    def _batch_problems(
        self, value_at: dict[int, str], part: pa.RecordBatch, known: list[tuple[int, str]]
    ) -> dict[int, tuple[FieldError, ...]]:
        """`_swallowed_rows` of the rows of `part` that may have any (a value with a quote
        and a line break), by index in `part`."""
        maybe: Any = None
        for i, _ in known:
            column = part.column(i)
            quoted = pc.and_(
                pc.match_substring(column, '"'),
                pc.or_(pc.match_substring(column, "\n"), pc.match_substring(column, "\r")),
            )
            maybe = quoted if maybe is None else pc.or_(maybe, quoted)
        if maybe is None or not pc.any(maybe).as_py():
            return {}
        problems: dict[int, tuple[FieldError, ...]] = {}
        for index in pc.indices_nonzero(maybe).to_pylist():
            row = {i: part.column(i)[index].as_py() for i, _ in known}
            found = self._swallowed_rows(value_at, row)
            if found:
                problems[index] = found
        return problems

    def _swallowed_rows(
        self, value_at: dict[int, str], row: dict[int, object]
    ) -> tuple[FieldError, ...]:
        """Problems when a row's value looks like it swallowed rows between two quotes.

        A quote opened in one row and closed in a later one makes pyarrow merge the rows in
        between into one value: that value spans lines that look like rows (see
        `_rowlike_lines`) and keeps a stray quote (the closing one, read as text). Only a
        value with both is refused: it would otherwise be paid for with the wrong prompt
        while the swallowed rows vanish.

        `value_at` maps raw column index -> canonical name of the columns read; `row` the
        row's values by raw column index.
        """
        for index, name in value_at.items():
            value = row.get(index)
            if not isinstance(value, str) or '"' not in value:
                continue
            if "\n" not in value and "\r" not in value:
                continue
            lines, rowlike = self._rowlike_lines(value, row)
            if rowlike:
                return (
                    FieldError(
                        name,
                        f"{name} runs over {lines} lines, {rowlike} of them like rows "
                        "and a stray quote: is a quote unclosed? (rows in it were not read)",
                    ),
                )
        return ()

    def _unclosed_quote(self, names: list[str], values: tuple[Any, ...]) -> tuple[FieldError, ...]:
        """Problems when the file's last row looks like it swallowed rows after an open quote.

        pyarrow accepts a quote left open at the end of a file: the rest of the file becomes
        one value of the last row. That value then ends with the file's final line break and
        holds lines that look like rows (see `_rowlike_lines`); a real multi-line value
        rarely ends with a line break, and even then seldom has such lines.
        """
        row = dict(enumerate(values))
        for index, name in enumerate(names):
            value = row.get(index)
            if not isinstance(value, str) or not value.endswith(("\n", "\r")):
                continue
            lines, rowlike = self._rowlike_lines(value, row)
            if rowlike:
                column = canonical_name(name) or name
                return (
                    FieldError(
                        column,
                        f"the last row's {column} runs over {lines} lines, {rowlike} "
                        "of them like rows; is a quote unclosed?",
                    ),
                )
        return ()

    def _rowlike_lines(self, value: str, row: dict[int, object]) -> tuple[int, int]:
        """(lines of `value`, how many of its lines after the first look like manifest rows).

        Counting delimiters alone cannot tell: with 2 or 3 columns, any prompt line holding a
        comma has "as many delimiters as a row". What a swallowed row has and prose lacks is
        an image source where the manifest keeps its sources. A line looks like a row when,
        split at the delimiter (a swallowed line holds no lone quote: one would have ended
        the value), it has
          * exactly as many fields as the header, and
          * in an image, images or mask column, a value shaped like a source: a URL
            (`scheme://...`, no spaces), a name ending in an image extension (with a `/` if
            it has spaces: `my photos/cat 1.png` but not `Use cat.png`), or a space-free
            path in the same folder as this row's own value of that column.
        The value's last line may also be the start of the row whose quote closed the value
        (`b.png,` + the rest of that field): there, two or more fields whose leading,
        complete ones hold such a source in a source column count too.
        So `Write "SALE" on the sign` / `and make it red, bold` is a prompt in any manifest,
        and `b.png,make it red` inside a value is a swallowed row. The price: a prompt line
        made of an image name, the delimiter and (for wider manifests) exactly enough
        further delimiters (`ref.png, keep its style` with 2 columns) still reads as a row.
        """
        lines = _LINE_BREAK_RE.split(value.rstrip("\r\n"))
        sources = self._source_indices
        width = len(self.columns)
        rowlike = 0
        for number, line in enumerate(lines[1:], 2):
            fields = line.split(self.delimiter)
            if len(fields) == width:
                candidates = sources
            elif number == len(lines) and 2 <= len(fields) < width:
                candidates = [i for i in sources if i < len(fields) - 1]
            else:
                continue
            if any(_source_shaped(fields[i], row.get(i)) for i in candidates):
                rowlike += 1
        return len(lines), rowlike

    def count_rows(self, cmap: ColumnMap) -> int:
        """Data rows, ragged ones included, converting only the (unique) prompt column."""
        ragged = 0

        def on_invalid(bad: Any) -> str:
            nonlocal ragged
            ragged += 1
            return "skip"

        prompt = next(raw for raw, name in cmap.canonical.items() if name == "prompt")
        stream, reader = self._open_reader(on_invalid, [prompt])
        total = 0
        try:
            for batch in self._batches(reader, lambda: total + ragged):  # noqa: B023
                total += batch.num_rows
        finally:
            stream.close()
        return total + ragged


def _source_shaped(text: str, own: object) -> bool:
    """Whether a CSV field looks like an image source (or `|` list of them); see above."""
    parts = [part.strip() for part in text.split("|")]
    if not all(parts):
        return False
    folder = ""
    first = own.split("|", 1)[0].strip() if isinstance(own, str) else ""
    if "/" in first:
        folder = first.rsplit("/", 1)[0] + "/"
    for part in parts:
        spaced = any(ch.isspace() for ch in part)
        if _URL_RE.match(part):
            continue
        path = part.lower().split("?", 1)[0]
        if path.endswith(_IMAGE_SUFFIXES) and (not spaced or "/" in part):
            continue
        if folder and not spaced and part.startswith(folder) and len(part) > len(folder):
            continue
        return False
    return True


def _pyarrow_row(message: str) -> int | None:
    """The `Row #N` pyarrow names in a conversion error (it counts the header as 1)."""
    marker = "Row #"
    at = message.find(marker)
    if at < 0:
        return None
    digits = ""
    for ch in message[at + len(marker) :]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None
