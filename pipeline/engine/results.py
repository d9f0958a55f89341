"""The results table: one row per manifest row, written as per-chunk parts and merged per run."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.engine import layout
from pipeline.errors import ConfigError, StorageError
from pipeline.io.arrow_memory import release_arrow_memory
from pipeline.io.storage import Storage
from pipeline.manifest.row_sets import RowSet

Status = Literal["succeeded", "failed", "invalid", "skipped"]
STATUSES: tuple[Status, ...] = ("succeeded", "failed", "invalid", "skipped")

# Why a row was skipped (the `reason` column).
SKIP_DONE = "done"  # its sidecar existed before this run: no API call
SKIP_DUPLICATE = "duplicate"  # another row of this run has the same job key
SKIP_STOPPED = "stopped"  # a run-fatal error (401, 402...) stopped the run first
SKIP_BUDGET = "budget"  # starting it would have passed --max-cost
SKIP_NOT_SELECTED = "not_selected"  # outside this run's selection (e.g. --retry-failed-of)
SKIP_INTERRUPTED = "interrupted"  # Ctrl-C / SIGTERM stopped the run first

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("job_key", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("source_uris", pa.list_(pa.string())),
        pa.field("output_uris", pa.list_(pa.string())),
        pa.field("sidecar_uri", pa.string()),
        pa.field("n_requested", pa.int32()),
        pa.field("n_outputs", pa.int32()),
        pa.field("requested_size", pa.string()),
        pa.field("actual_size", pa.string()),
        pa.field("output_format", pa.string()),
        pa.field("revised_prompt", pa.string()),
        pa.field("cost", pa.float64()),
        pa.field("currency", pa.string()),
        pa.field("attempts", pa.int32()),
        pa.field("latency_s", pa.float64()),
        pa.field("elapsed_s", pa.float64()),
        pa.field("request_id", pa.string()),
        pa.field("provider", pa.string()),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("error_column", pa.string()),
        pa.field("possible_double_charges", pa.int32()),
        pa.field("possible_double_charge_usd", pa.float64()),
        pa.field("started_at", pa.timestamp("ms", tz="UTC")),
        pa.field("finished_at", pa.timestamp("ms", tz="UTC")),
        # Seconds this row waited on another run's claim of the same job (see claims).
        pa.field("claim_wait_s", pa.float64()),
        # A reported cost that was not trusted (negative, NaN, absurd...), as the API sent it.
        pa.field("cost_raw", pa.string()),
        # What in the API's answer was distrusted or cut, `; `-separated.
        pa.field("warnings", pa.string()),
        # Fields the row set that the run's model does not take: not sent.
        pa.field("dropped_params", pa.list_(pa.string())),
        # Where `cost` came from: "metadata" (metadata.cost) or "usage" (tokens x prices).
        pa.field("cost_source", pa.string()),
    ]
)


# Results parts a run wrote are kept in memory up to this many bytes, so that its table is
# merged without reading each part back (one GET per 1,000 rows: 1,000 GETs and several
# seconds for a resume of a million done rows, whose parts take about 45 MB).
KEEP_PARTS_BYTES = 64 * 2**20


def utcnow() -> datetime:
    return datetime.now(UTC)


class KeptParts:
    """Results parts this process wrote (stored too), up to a budget: the merge reads them
    from here; parts past the budget are read back from storage as before."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = KEEP_PARTS_BYTES if budget is None else budget
        self.parts: dict[str, bytes] = {}
        self._bytes = 0

    def keep(self, key: str, data: bytes) -> None:
        if self._bytes + len(data) <= self.budget:
            self.parts[key] = data
            self._bytes += len(data)


@dataclass
class ResultRow:
    """What happened to one manifest row in one run.

    `latency_s` is the successful attempt's request time; `elapsed_s` covers every attempt,
    backoff and storage write. `possible_double_charges` counts attempts whose answer was
    lost after the request went out (the API may have charged for them).
    """

    row: int
    id: str | None
    status: Status
    job_key: str | None = None
    reason: str | None = None
    prompt: str | None = None
    seed: int | None = None
    source_uris: list[str] = field(default_factory=list)
    output_uris: list[str] = field(default_factory=list)
    sidecar_uri: str | None = None
    n_requested: int | None = None
    n_outputs: int | None = None
    requested_size: str | None = None
    actual_size: str | None = None
    output_format: str | None = None
    revised_prompt: str | None = None
    cost: float | None = None
    currency: str | None = None
    attempts: int = 0
    latency_s: float | None = None
    elapsed_s: float | None = None
    request_id: str | None = None
    provider: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_column: str | None = None
    possible_double_charges: int = 0
    possible_double_charge_usd: float = 0.0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    claim_wait_s: float | None = None
    cost_raw: str | None = None
    warnings: str | None = None
    dropped_params: list[str] = field(default_factory=list)
    cost_source: str | None = None


class DoneRow(NamedTuple):
    """A row skipped as `done` (its job was done before this run), as the columns its result
    row sets; every other column is `ResultRow`'s default. A resume of a million done rows
    builds these instead of a ResultRow each (and its table column by column from them)."""

    row: int
    id: str | None
    job_key: str
    prompt: str | None
    seed: int | None
    source_uris: list[str]
    sidecar_uri: str
    n_requested: int
    requested_size: str | None
    started_at: datetime
    finished_at: datetime
    elapsed_s: float

    def result(self) -> ResultRow:
        return ResultRow(status="skipped", reason=SKIP_DONE, **self._asdict())


def done_rows_table(done: Sequence[DoneRow]) -> pa.Table:
    """The results table of done rows: what `rows_to_table` makes of their `result()`s."""
    ordered = sorted(done, key=lambda d: d.row)
    columns: dict[str, Sequence[Any]] = {
        name: [d[i] for d in ordered] for i, name in enumerate(DoneRow._fields)
    }
    # The other columns as a done row's ResultRow leaves them (its defaults, so they cannot
    # drift): one value repeated.
    constant = ResultRow(row=0, id=None, status="skipped", reason=SKIP_DONE)
    for name in RESULTS_SCHEMA.names:
        if name not in columns:
            columns[name] = [getattr(constant, name)] * len(ordered)
    return pa.Table.from_pydict(columns, schema=RESULTS_SCHEMA)


def part_table(rows: Sequence[ResultRow], done: Sequence[DoneRow] = ()) -> pa.Table:
    """A results part: result rows and done rows, in row order."""
    if not done:
        return rows_to_table(rows)
    if not rows:
        return done_rows_table(done)
    return pa.concat_tables([rows_to_table(rows), done_rows_table(done)]).sort_by("row")


def rows_to_table(rows: Sequence[ResultRow]) -> pa.Table:
    # Column by column from the attributes: a dict per row through dataclasses.asdict
    # deep-copies every list and datetime, ~25 us a row (2.5 s for a 100k-row resume).
    ordered = sorted(rows, key=lambda r: r.row)
    columns = {name: [getattr(r, name) for r in ordered] for name in RESULTS_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=RESULTS_SCHEMA)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(pa.BufferReader(data), schema=RESULTS_SCHEMA)


# Rows per row group of a merged results table. A row group per part (1,000 rows) made the
# writer hold the metadata and statistics of a thousand row groups for a million rows (tens
# of MB until it closed); parts are gathered into groups of this many rows instead. Not
# more: the writer buffers a whole group (64k-row groups cost 40 MB more at 100k rows; 16k
# ones were the runner's peak, 15-20 MB above the rest of its run).
MERGED_ROW_GROUP_ROWS = 8 * 1024


def merge_tables_to_file(tables: Iterable[pa.Table], path: Path) -> int:
    """Stream tables (e.g. chunk parts, in order) into one Parquet file; returns its row count."""
    count = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(path, RESULTS_SCHEMA, compression="zstd") as writer:
        for table in tables:
            pending.append(table.cast(RESULTS_SCHEMA))
            pending_rows += table.num_rows
            count += table.num_rows
            if pending_rows >= MERGED_ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending, pending_rows = [], 0
                # What the group took is freed: give it back before the next one is read
                # (at 100k rows the merge's peak was 84 MB above its start without, 50 with).
                release_arrow_memory()
        if pending:
            writer.write_table(pa.concat_tables(pending))
    return count


def temp_parquet_path() -> Path:
    fd, name = tempfile.mkstemp(prefix="imgedit-results-", suffix=".parquet")
    os.close(fd)
    return Path(name)


def failed_rows_of(storage: Storage, run_id: str) -> set[int]:
    """Row numbers that ended `failed` in an earlier run's results table."""
    try:
        data = storage.get_bytes(layout.results_key(run_id))
    except StorageError as exc:
        raise ConfigError(f"cannot read the results of run {run_id!r}: {exc}") from exc
    table = pq.read_table(pa.BufferReader(data), columns=["row", "status"])
    failed = table.filter(pc.equal(table.column("status"), "failed"))
    return {int(r) for r in failed.column("row").to_pylist()}


def rows_done_before(storage: Storage, manifest_uri: str) -> RowSet:
    """Rows of `manifest_uri` that earlier runs on this output finished (succeeded, or found
    done): what a new run of it will most likely skip, for its estimate. Its own check is per
    job at run time (a changed source is a new job), so this is an estimate, not a promise.

    Reads the summary of each run under `runs/` (one listing of `runs/`) and the row, status
    and reason columns of the results tables of this manifest's runs.
    """
    done: list[npt.NDArray[np.int64]] = []
    run_ids = {
        key[len(layout.RUNS_PREFIX) :].partition("/")[0]
        for key in storage.list_keys(layout.RUNS_PREFIX)
        if key.endswith("/summary.json")
    }
    for run_id in sorted(run_ids):
        try:
            summary = json.loads(storage.get_bytes(layout.summary_key(run_id)))
            if not isinstance(summary, dict) or summary.get("manifest") != manifest_uri:
                continue
            data = storage.get_bytes(layout.results_key(run_id))
        except (StorageError, ValueError):
            continue  # a run without a table, or an unreadable summary: nothing to count
        table = pq.read_table(pa.BufferReader(data), columns=["row", "status", "reason"])
        finished = pc.or_(
            pc.equal(table.column("status"), "succeeded"),
            pc.and_(
                pc.equal(table.column("status"), "skipped"),
                pc.is_in(table.column("reason"), pa.array([SKIP_DONE, SKIP_DUPLICATE])),
            ),
        )
        rows = table.filter(finished).column("row").to_numpy()
        done.append(np.asarray(rows, dtype=np.int64))
        del table, data  # a million rows' table: not held while the next one is read
    return RowSet(np.concatenate(done) if done else np.empty(0, dtype=np.int64))


__all__ = [
    "KEEP_PARTS_BYTES",
    "RESULTS_SCHEMA",
    "SKIP_BUDGET",
    "SKIP_DONE",
    "SKIP_DUPLICATE",
    "SKIP_INTERRUPTED",
    "SKIP_NOT_SELECTED",
    "SKIP_STOPPED",
    "STATUSES",
    "DoneRow",
    "KeptParts",
    "ResultRow",
    "Status",
    "done_rows_table",
    "failed_rows_of",
    "merge_tables_to_file",
    "part_table",
    "read_parquet_bytes",
    "rows_done_before",
    "rows_to_table",
    "table_to_parquet_bytes",
    "utcnow",
]
