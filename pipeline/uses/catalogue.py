"""Catalogues: a manifest built from every image under a folder or S3 prefix, and URI reads.

`build_manifest_from_prefix` lists a local folder (recursively) or an `s3://bucket/prefix`
(as a folder: `s3://b/photos` lists `photos/...`, not `photos-old/...`) and writes a Parquet
manifest with one row per image, sorted by key, streamed in batches:

- `id`: the key relative to the prefix, percent-encoded where the manifest's id rules need it:
  `%` -> `%25`, `/` -> `%2F`, `\\` -> `%5C`, control characters -> their UTF-8 `%XX` bytes
  (`urllib.parse.unquote` gives the key back). So `cats/tabby 1.jpg` -> `cats%2Ftabby 1.jpg`.
  The scheme is injective (no two keys share an id) and stable across runs. A key whose id
  would pass 256 characters keeps its first 239 and ends in `~` and 16 hex digits of its hash.
- `image`: the image's full URI (an absolute local path, or `s3://bucket/key`). A URI that the
  manifest would read as a list (one holding `|`, or starting with `[`) goes in the `images`
  column instead, as a one-element list; `images` is null on every other row.
- `prompt`: the one prompt, and one column per setting (`seed`, `size`, `n`, `output_format`,
  `param.turbo`, ...), checked like manifest cells before anything is listed.

Images are the keys ending in one of `extensions` (case ignored); other keys are skipped and
counted, and so is anything inside a hidden file or folder (a path segment starting with `.`)
and a local file whose name is not valid UTF-8.
Re-editing only what changed needs nothing more: a job key hashes the source's bytes, so a run
over an unchanged catalogue finds every job done and makes no API call.

`iter_parquet_batches` reads a table, or a Parquet file at a path or URI (through a reader
such as `pipeline.io.uri.UriReader`), in record batches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import ConfigError, StorageError, StorageNotFound
from pipeline.io.storage import LocalStorage, open_storage
from pipeline.manifest.read import PARQUET_EXTENSIONS, canonical_name, suggest
from pipeline.manifest.rows import (
    MAX_ID_CHARS,
    PARAM_PREFIX,
    RowValidator,
    SourceBase,
    fixed_param_column_reason,
)
from pipeline.manifest.types import InvalidRow

log = logging.getLogger(__name__)

__all__ = [
    "CATALOGUE_BATCH_ROWS",
    "IMAGE_EXTENSIONS",
    "ManifestInfo",
    "build_manifest_from_prefix",
    "catalogue_id",
    "check_manifest_path",
    "check_settings",
    "decode_catalogue_id",
    "iter_parquet_batches",
    "setting_type",
    "shorten_id",
    "write_parquet_atomically",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".gif")
# Manifest rows buffered before a Parquet write: about a megabyte of keys.
CATALOGUE_BATCH_ROWS = 8192
# A long id keeps this many hex digits of its SHA-256 after a `~`, so shortened ids stay unique.
ID_HASH_CHARS = 16
ID_HASH_SEPARATOR = "~"
# Per-character escapes of catalogue ids: what the manifest forbids in an id, plus `%` itself.
_ID_UNSAFE = (
    frozenset("%/\\")
    | frozenset(chr(c) for c in range(0x20))
    | frozenset(chr(c) for c in range(0x7F, 0xA0))
    | frozenset("\u2028\u2029")
)
# Columns a setting may not be: each row's own (id, image) or given separately (prompt).
ROW_OWN_COLUMNS: frozenset[str] = frozenset({"id", "image", "images", "prompt", "mask"})
# Placeholders for checking settings as a manifest row would be checked.
_CHECK_IMAGE = "/check.png"
_CHECK_PROMPT = "check"


@dataclass(frozen=True)
class ManifestInfo:
    """A manifest written from a listing: where, its rows (images) and the keys skipped."""

    path: Path
    rows: int
    skipped: int = 0


# --- ids ----------------------------------------------------------------------------------


def shorten_id(text: str, max_chars: int = MAX_ID_CHARS) -> str:
    """`text` if it fits, else its start plus `~` and a hash of the whole (still unique)."""
    if len(text) <= max_chars:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HASH_CHARS]
    keep = max_chars - ID_HASH_CHARS - len(ID_HASH_SEPARATOR)
    return f"{text[:keep]}{ID_HASH_SEPARATOR}{digest}"


def catalogue_id(relative_key: str) -> str:
    """The manifest id of a key relative to the catalogue's prefix (see the module doc)."""
    escaped = "".join(quote(ch, safe="") if ch in _ID_UNSAFE else ch for ch in relative_key)
    return shorten_id(escaped)


def decode_catalogue_id(row_id: str) -> str:
    """The relative key of an id `catalogue_id` made (not of a shortened one)."""
    return unquote(row_id)


# --- settings -----------------------------------------------------------------------------


def setting_type(column: str, value: object) -> pa.DataType:
    """The Parquet type a setting's value is written as."""
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, str):
        return pa.string()
    raise ConfigError(
        f"setting {column!r} must be text, a number or true/false, not {type(value).__name__}"
    )


def check_settings(
    settings: Mapping[str, object], *, reserved: frozenset[str] = ROW_OWN_COLUMNS
) -> dict[str, object]:
    """The settings by canonical column name (None values dropped, `params` as JSON text).

    Each is checked as a manifest cell would be (`size`, `n`, `seed`, `output_format`...), so
    a bad value fails here, before anything is listed or sent. ConfigError names the problem.
    """
    out: dict[str, object] = {}
    for raw, value in settings.items():
        name = canonical_name(str(raw))
        if name is None:
            guess = suggest(str(raw))
            hint = f" (did you mean {guess!r}?)" if guess else ""
            raise ConfigError(
                f"unknown setting {raw!r}{hint}: settings are manifest columns such as seed, "
                f"n, size, output_format or {PARAM_PREFIX}<name>"
            )
        if name in reserved:
            raise ConfigError(f"setting {raw!r} is not allowed here: each row sets its own {name}")
        if name.startswith(PARAM_PREFIX):
            reason = fixed_param_column_reason(name)
            if reason:
                raise ConfigError(f"setting {raw!r}: {reason}")
        if name in out:
            raise ConfigError(f"setting {name!r} is given twice")
        if value is None:
            continue
        if name == "params" and isinstance(value, Mapping):
            value = json.dumps(dict(value), sort_keys=True)
        setting_type(name, value)
        out[name] = value
    cells: dict[str, object] = {"image": _CHECK_IMAGE, "prompt": _CHECK_PROMPT, **out}
    checked = RowValidator(list(cells), SourceBase(local_dir="/")).validate(1, cells)
    if isinstance(checked, InvalidRow):
        raise ConfigError("bad settings: " + "; ".join(e.reason for e in checked.errors))
    return out


# --- writing Parquet ----------------------------------------------------------------------


def check_manifest_path(path: Path | str) -> None:
    """ConfigError unless `path` names a Parquet manifest the engine will recognise."""
    if not str(path).lower().endswith(PARQUET_EXTENSIONS):
        raise ConfigError(
            f"manifest path {str(path)!r} must end in {' or '.join(PARQUET_EXTENSIONS)}"
        )


class ParquetBatches:
    """Rows (dicts) buffered and written to a ParquetWriter in batches of a fixed schema."""

    def __init__(self, writer: pq.ParquetWriter, schema: pa.Schema, batch_rows: int) -> None:
        self._writer = writer
        self._schema = schema
        self._batch_rows = batch_rows
        self._rows: list[dict[str, Any]] = []
        self.written = 0

    def add(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._batch_rows:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self._schema))
            self.written += len(self._rows)
            self._rows = []


def write_parquet_atomically(out_path: Path | str, schema: pa.Schema) -> _AtomicParquet:
    """A ParquetWriter on a temporary file beside `out_path`, renamed into place on success."""
    return _AtomicParquet(Path(out_path), schema)


class _AtomicParquet:
    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path.expanduser().absolute()
        self.schema = schema
        self._tmp: str | None = None
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> pq.ParquetWriter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(
                prefix=".tmp-", suffix=".parquet", dir=self.path.parent
            )
            os.close(fd)
            self.writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        except OSError as exc:
            self._discard()
            raise StorageError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        return self.writer

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        assert self.writer is not None and self._tmp is not None
        try:
            self.writer.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
                self._tmp = None
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        finally:
            self._discard()

    def _discard(self) -> None:
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            self._tmp = None


# --- listing ------------------------------------------------------------------------------


class _OutOfOrder(Exception):
    """Internal: the listing did not come in key order; sort it in memory instead."""


def _walk_sorted(directory: str, key_base: str = "") -> Iterator[str]:
    """Files under `directory` as `/`-keys, in the order a sort of the full keys gives.

    Siblings sort with a directory's name followed by `/`, which is exactly where its keys
    fall among the full keys; symlinked directories are not followed (no loops).
    """
    try:
        with os.scandir(directory) as it:
            entries = [(e.name + ("/" if e.is_dir(follow_symlinks=False) else ""), e) for e in it]
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise StorageError(f"cannot list {directory}: {exc.strerror or exc}") from exc
    for name, entry in sorted(entries, key=lambda pair: pair[0]):
        if name.endswith("/"):
            yield from _walk_sorted(entry.path, key_base + name)
        elif entry.is_file():
            yield key_base + name


def _looks_like_list(uri: str) -> bool:
    """Whether the manifest's `image` column would take this URI for a list of sources."""
    return "|" in uri or uri.lstrip().startswith("[")


def _is_utf8(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_hidden(key: str) -> bool:
    return any(segment.startswith(".") for segment in key.split("/"))


def build_manifest_from_prefix(
    prefix_uri: str,
    *,
    prompt: str,
    out_path: Path | str,
    settings: Mapping[str, object] | None = None,
    endpoint_url: str | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> ManifestInfo:
    """Write a Parquet manifest of every image under `prefix_uri` (see the module doc).

    ConfigError for a bad prompt, setting, or location (a local folder that does not exist);
    StorageError when listing or writing fails. `rows == 0` means no image was found (the
    file is still written, but the engine refuses a manifest without rows).
    """
    check_manifest_path(out_path)
    text = prompt.strip()
    columns = check_settings(settings or {})
    cells: dict[str, object] = {"image": _CHECK_IMAGE, "prompt": text}
    checked = RowValidator(list(cells), SourceBase(local_dir="/")).validate(1, cells)
    if isinstance(checked, InvalidRow):
        raise ConfigError("bad prompt: " + "; ".join(e.reason for e in checked.errors))
    suffixes = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    if not suffixes:
        raise ConfigError("no image extensions given")

    storage = open_storage(prefix_uri, endpoint_url=endpoint_url)
    if isinstance(storage, LocalStorage):
        root = str(storage.root)
        if not os.path.isdir(root):
            if os.path.exists(root):
                raise ConfigError(f"catalogue location {root} is not a folder")
            raise ConfigError(f"catalogue folder not found: {root}")

        def listing() -> Iterator[str]:
            return _walk_sorted(root)

        def uri_of(key: str) -> str:
            return os.path.join(root, *key.split("/"))
    else:
        s3_storage = storage
        root_uri = s3_storage.root_uri

        def listing() -> Iterator[str]:
            return s3_storage.list_keys("")

        def uri_of(key: str) -> str:
            return f"{root_uri}/{key}"

    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.string()),
            ("images", pa.list_(pa.string())),
            ("prompt", pa.string()),
        ]
        + [(name, setting_type(name, value)) for name, value in columns.items()]
    )
    fixed = {"prompt": text, **columns}

    def write(keys: Iterator[str], *, check_order: bool) -> tuple[int, int]:
        skipped = 0
        previous: str | None = None
        with write_parquet_atomically(out_path, schema) as writer:
            out = ParquetBatches(writer, schema, CATALOGUE_BATCH_ROWS)
            for key in keys:
                if check_order:
                    if previous is not None and key <= previous:
                        raise _OutOfOrder
                    previous = key
                if _is_hidden(key) or not key.lower().endswith(suffixes):
                    skipped += 1
                    continue
                if not _is_utf8(key):
                    # A local name that is not UTF-8 cannot be written to a Parquet string.
                    log.warning("skipped %r: its name is not valid UTF-8", key)
                    skipped += 1
                    continue
                uri = uri_of(key)
                if _looks_like_list(uri):
                    out.add({"id": catalogue_id(key), "images": [uri], **fixed})
                else:
                    out.add({"id": catalogue_id(key), "image": uri, **fixed})
            out.flush()
        return out.written, skipped

    try:
        rows, skipped = write(listing(), check_order=True)
    except _OutOfOrder:
        # S3 lists general-purpose buckets in key order; some stores (directory buckets, a
        # few S3-compatible services) do not. Sorting needs every key in memory once.
        log.warning("%s did not list in key order; sorting its keys in memory", prefix_uri)
        rows, skipped = write(iter(sorted(set(listing()))), check_order=False)
    log.info("catalogue %s: %d images, %d other keys skipped", prefix_uri, rows, skipped)
    return ManifestInfo(path=Path(out_path).expanduser().absolute(), rows=rows, skipped=skipped)


# --- reading Parquet tables ---------------------------------------------------------------


def iter_parquet_batches(
    source: pa.Table | Path | str,
    read: Callable[[str], bytes],
    batch_rows: int,
    columns: Sequence[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The record batches of a table, or of a Parquet file at a local path or a URI.

    With `columns`, only those, in that order; ConfigError naming any the table lacks.
    """
    text = "the table" if isinstance(source, pa.Table) else str(source)

    def check(names: Sequence[str]) -> None:
        missing = [c for c in columns or () if c not in names]
        if missing:
            raise ConfigError(f"{text} has no {', '.join(missing)} column")

    if isinstance(source, pa.Table):
        check(source.schema.names)
        table = source.select(list(columns)) if columns is not None else source
        yield from table.to_batches(max_chunksize=batch_rows)
        return
    try:
        if "://" in text or text.startswith("file:"):
            # Remote tables are read whole: results tables are megabytes, not gigabytes.
            handle: Any = pa.BufferReader(read(text))
        else:
            handle = text
        parquet = pq.ParquetFile(handle)
        check(parquet.schema_arrow.names)
        yield from parquet.iter_batches(
            batch_size=batch_rows, columns=list(columns) if columns is not None else None
        )
    except FileNotFoundError as exc:
        raise StorageNotFound(f"not found: {text}") from exc
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"cannot read the Parquet file {text}: {exc}") from exc
