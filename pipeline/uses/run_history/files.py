"""An output's run folders: what each `runs/<id>/` holds, and reading its results table (or,
for a killed or running run, its parts so far)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.engine import layout
from pipeline.engine.results import RESULTS_SCHEMA
from pipeline.errors import HistoryError, StorageError
from pipeline.io.storage import LocalStorage, Storage, check_key, open_storage

RESULTS_NAME: Final = "results.parquet"
SUMMARY_NAME: Final = "summary.json"
CONTACT_SHEET_NAME: Final = "contact-sheet.png"
LOG_NAME: Final = "run.log"
PARTS_DIR: Final = "parts/"

# A result image's key, at the end of the URI a results table gives it (local or s3).
_IMAGE_KEY_RE = re.compile(
    r"(?:^|/)("
    + re.escape(layout.IMAGES_PREFIX)
    + r"[0-9a-f]{2}/[0-9a-f]{8,64}-[0-9]+\.[a-z0-9]{1,5})$"
)


@dataclass
class RunFiles:
    """What a listing of `runs/<id>/` found."""

    run_id: str
    results: bool = False
    summary: bool = False
    contact_sheet: bool = False
    log: bool = False
    parts: list[str] = field(default_factory=list)

    @property
    def any_table(self) -> bool:
        return self.results or bool(self.parts)

    def add(self, key: str, name: str) -> None:
        """Note the file at `key`, called `name` within the run's folder."""
        if name == RESULTS_NAME:
            self.results = True
        elif name == SUMMARY_NAME:
            self.summary = True
        elif name == CONTACT_SHEET_NAME:
            self.contact_sheet = True
        elif name == LOG_NAME:
            self.log = True
        elif name.startswith(PARTS_DIR) and name.endswith(".parquet"):
            self.parts.append(key)


def open_output(uri: str, *, endpoint_url: str | None = None) -> Storage:
    """The output at `uri` to read; HistoryError when a local output folder does not exist."""
    storage = open_storage(uri, endpoint_url=endpoint_url)
    if isinstance(storage, LocalStorage) and not storage.root.is_dir():
        raise HistoryError(f"no such output folder: {storage.root_uri}")
    return storage


def scan_runs(storage: Storage) -> dict[str, RunFiles]:
    """Every run folder of the output, by run id (one listing of `runs/`)."""
    runs: dict[str, RunFiles] = {}
    for key in storage.list_keys(layout.RUNS_PREFIX):
        _, _, rest = key.partition(layout.RUNS_PREFIX)
        run_id, sep, name = rest.partition("/")
        if not sep or not name:
            continue
        try:
            layout.check_run_id(run_id)
        except ValueError:
            continue
        runs.setdefault(run_id, RunFiles(run_id)).add(key, name)
    for files in runs.values():
        files.parts.sort()
    return runs


def scan_run(storage: Storage, run_id: str) -> RunFiles | None:
    """The folder of one run, or None when nothing is under it."""
    prefix = layout.run_prefix(run_id)
    files = RunFiles(run_id)
    found = False
    for key in storage.list_keys(prefix):
        found = True
        files.add(key, key[len(prefix) :])
    files.parts.sort()
    return files if found else None


def read_columns(data: bytes, columns: Sequence[str]) -> pa.Table:
    """`columns` of a results table (or part), in that order; a column it lacks is null."""
    with pq.ParquetFile(pa.BufferReader(data)) as pf:
        present = set(pf.schema_arrow.names)
        table = pf.read(columns=[c for c in columns if c in present])
    arrays = []
    for name in columns:
        typ = RESULTS_SCHEMA.field(name).type
        if name in present:
            arrays.append(table.column(name).cast(typ))
        else:
            arrays.append(pa.chunked_array([pa.nulls(table.num_rows, typ)]))
    return pa.table(arrays, names=list(columns))


def run_table(storage: Storage, files: RunFiles, columns: Sequence[str]) -> pa.Table:
    """A run's results: its table, or (killed, or still running) its parts so far."""
    if files.results:
        return read_columns(storage.get_bytes(layout.results_key(files.run_id)), columns)
    tables = [read_columns(storage.get_bytes(key), columns) for key in files.parts]
    if not tables:
        return pa.table(
            [pa.nulls(0, RESULTS_SCHEMA.field(c).type) for c in columns], names=list(columns)
        )
    return pa.concat_tables(tables)


def run_rows(storage: Storage, run_id: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of one run (its results table, or its parts so far), `columns` of them."""
    layout.check_run_id(run_id)
    files = scan_run(storage, run_id)
    if files is None:
        raise HistoryError(f"no run {run_id!r} under {storage.root_uri}")
    return run_table(storage, files, list(columns or RESULTS_SCHEMA.names))


def tally(
    table: pa.Table, column: str, values: Iterable[str]
) -> tuple[dict[str, int], dict[str, int]]:
    """Rows by `column` for each of `values`, and the `skipped` ones by reason (null: unknown)."""
    found = table.column(column)
    counts = {v: int(pc.sum(pc.equal(found, v)).as_py() or 0) for v in values}
    skipped = table.filter(pc.equal(found, "skipped"))
    reasons = pc.value_counts(skipped.column("reason").fill_null("unknown")).to_pylist()
    return counts, {str(r["values"]): int(r["counts"]) for r in reasons}


def image_key_of_uri(uri: str | None) -> str | None:
    """The storage key (`images/ab/<key>-0.png`) a result URI of a results table names."""
    if not uri:
        return None
    m = _IMAGE_KEY_RE.search(uri.replace("\\", "/"))
    if m is None:
        return None
    try:
        return check_key(m.group(1))
    except StorageError:
        return None
