"""An output's history from `runs/` alone: its runs, a run's failures, each row's latest state."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.engine import layout
from pipeline.engine.results import (
    RESULTS_SCHEMA,
    SKIP_BUDGET,
    SKIP_DONE,
    SKIP_DUPLICATE,
    SKIP_NOT_SELECTED,
    STATUSES,
    table_to_parquet_bytes,
)
from pipeline.errors import HistoryError, StorageError, StorageNotFound
from pipeline.io.storage import LocalStorage, Storage, check_key, open_storage

__all__ = [
    "DEFAULT_TOP_FAILURES",
    "FAILURE_COLUMNS",
    "LATEST_STATE_SQL",
    "LOG_NAME",
    "NEVER_RUN",
    "ROW_STATES",
    "RUN_STATES",
    "STATE_COMPLETE",
    "STATE_INCOMPLETE",
    "STATE_INTERRUPTED",
    "STATE_ROWS_FAILED",
    "STATE_STOPPED",
    "STATUS_KEY",
    "STATUS_SCHEMA",
    "FailureGroup",
    "RunDetail",
    "RunInfo",
    "cut",
    "failure_groups",
    "image_key_of_uri",
    "latest_state_sql",
    "list_runs",
    "manifest_rows",
    "open_output",
    "retry_command",
    "row_status",
    "run_detail",
    "run_rows",
    "state_counts",
    "write_status",
]

# The state of a run as a whole.
STATE_COMPLETE: Final = "complete"  # every row succeeded or was skipped
STATE_ROWS_FAILED: Final = "rows failed"  # it went through; some rows failed or were invalid
STATE_STOPPED: Final = "stopped"  # a run-fatal error or the budget stopped it
STATE_INTERRUPTED: Final = "interrupted"  # Ctrl-C / SIGTERM
STATE_INCOMPLETE: Final = "incomplete (no summary)"  # killed, or still running
RUN_STATES: Final = (
    STATE_COMPLETE,
    STATE_ROWS_FAILED,
    STATE_STOPPED,
    STATE_INTERRUPTED,
    STATE_INCOMPLETE,
)

# The latest state of a row: a results status, or never run (in no run, or only unselected).
NEVER_RUN: Final = "never_run"
ROW_STATES: Final = (*STATUSES, NEVER_RUN)

# Where `imgedit status --write-default` puts the row states, under the output root.
STATUS_KEY: Final = "status.parquet"
DEFAULT_TOP_FAILURES: Final = 10
# Example error messages are cut to this many characters.
EXAMPLE_MESSAGE_CHARS: Final = 200
ELLIPSIS: Final = "..."

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
# Earlier than any run: a run whose rows carry no start time sorts first.
_NO_START: Final = np.iinfo(np.int64).min

STATUS_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string()),
        # succeeded / failed / invalid / skipped / never_run
        pa.field("state", pa.string(), nullable=False),
        # skipped: budget, stopped, interrupted; succeeded: done or duplicate when no run of
        # this output has the edit's own result row (else null: the row that edited it)
        pa.field("reason", pa.string()),
        pa.field("job_key", pa.string()),
        pa.field("output_uris", pa.list_(pa.string())),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        # the run whose result row gave the state; the last run that listed the row at all
        pa.field("state_run_id", pa.string()),
        pa.field("last_run_id", pa.string()),
        # how many runs listed the row (`not_selected` included)
        pa.field("runs_seen", pa.int32(), nullable=False),
    ]
)

# The columns a row's latest state is made of.
_ENTRY_COLUMNS: Final = (
    "row",
    "id",
    "job_key",
    "status",
    "reason",
    "output_uris",
    "error_code",
    "error_message",
    "started_at",
)
# The columns a run's counts are made of.
_COUNT_COLUMNS: Final = ("row", "status", "reason", "cost", "currency", "started_at", "finished_at")

# The same "latest state per row" as `row_status`, in duckdb over the results tables.
# The priority of a result row: a success (edited, or skipped `done` / `duplicate`) beats
# anything, and one that carries output URIs beats one that does not; then any other status
# beats `not_selected`; within a priority the newest run wins (runs are ordered by their
# first row's `started_at`, then by run id). Only rows whose best is `not_selected` are
# `never_run`. Unlike `row_status`, it reads `results.parquet` only: the parts of killed runs
# and rows of the manifest that no run listed are not in it, and a scaled-out run's shards
# count in `runs_seen` beside their parent.
LATEST_STATE_SQL: Final = r"""
with entries as (
    select
        row, id, job_key, status, reason, output_uris, error_code, error_message,
        regexp_extract(filename, '([^/\\]+)[/\\]results\.parquet$', 1) as run_id,
        min(started_at) over (partition by filename) as run_started,
        file_row_number as seq,
        status = 'succeeded'
            or (status = 'skipped' and coalesce(reason, '') in ('done', 'duplicate')) as success,
        case
            when success then 2 + (coalesce(len(output_uris), 0) > 0)::int
            when status = 'skipped' and coalesce(reason, '') = 'not_selected' then 0
            else 1
        end as priority
    from read_parquet(
        '{results_glob}', filename = true, file_row_number = true, union_by_name = true
    )
),
ranked as (
    select
        *,
        row_number() over (
            partition by row
            order by priority desc, run_started desc nulls last, run_id desc, seq desc
        ) as pick,
        first_value(run_id) over (
            partition by row order by run_started desc nulls last, run_id desc
        ) as last_run_id,
        count(distinct run_id) over (partition by row) as runs_seen
    from entries
)
select
    row,
    id,
    case priority when 0 then 'never_run' when 1 then status else 'succeeded' end as state,
    case when priority = 0 or (priority = 3 and status = 'succeeded') then null
        else reason end as reason,
    job_key,
    output_uris,
    error_code,
    error_message,
    run_id as state_run_id,
    last_run_id,
    runs_seen
from ranked
where pick = 1
order by row
"""


def latest_state_sql(results_glob: str) -> str:
    """`LATEST_STATE_SQL` over `results_glob` (e.g. `out/runs/*/results.parquet`)."""
    return LATEST_STATE_SQL.replace("{results_glob}", results_glob.replace("'", "''"))


# --- runs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunInfo:
    """One run of an output, from its summary (or, without one, from its results or parts)."""

    run_id: str
    state: str
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    rows: int
    by_status: dict[str, int]
    skipped_by_reason: dict[str, int]
    cost_usd: float
    currency: str
    manifest: str | None
    output: str | None
    stopped_by: str | None
    has_summary: bool
    has_results: bool
    parts: int
    # The scaled-out run this one is a shard of (its rows are in the parent's table too).
    parent: str | None = None

    @property
    def failed(self) -> int:
        return self.by_status.get("failed", 0)

    @property
    def not_ok(self) -> int:
        """Rows that failed or were invalid."""
        return self.failed + self.by_status.get("invalid", 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "state": self.state,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "duration_s": self.duration_s,
            "rows": self.rows,
            "by_status": dict(self.by_status),
            "skipped_by_reason": dict(self.skipped_by_reason),
            "cost_usd": self.cost_usd,
            "currency": self.currency,
            "manifest": self.manifest,
            "output": self.output,
            "stopped_by": self.stopped_by,
            "has_summary": self.has_summary,
            "has_results": self.has_results,
            "parts": self.parts,
            "parent": self.parent,
        }


@dataclass
class _RunFiles:
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


def open_output(uri: str, *, endpoint_url: str | None = None) -> Storage:
    """The output at `uri` to read; HistoryError when a local output folder does not exist."""
    storage = open_storage(uri, endpoint_url=endpoint_url)
    if isinstance(storage, LocalStorage) and not storage.root.is_dir():
        raise HistoryError(f"no such output folder: {storage.root_uri}")
    return storage


def _scan(storage: Storage) -> dict[str, _RunFiles]:
    runs: dict[str, _RunFiles] = {}
    for key in storage.list_keys(layout.RUNS_PREFIX):
        _, _, rest = key.partition(layout.RUNS_PREFIX)
        run_id, sep, name = rest.partition("/")
        if not sep or not name:
            continue
        try:
            layout.check_run_id(run_id)
        except ValueError:
            continue
        files = runs.setdefault(run_id, _RunFiles(run_id))
        if name == RESULTS_NAME:
            files.results = True
        elif name == SUMMARY_NAME:
            files.summary = True
        elif name == CONTACT_SHEET_NAME:
            files.contact_sheet = True
        elif name == LOG_NAME:
            files.log = True
        elif name.startswith(PARTS_DIR) and name.endswith(".parquet"):
            files.parts.append(key)
    for files in runs.values():
        files.parts.sort()
    return runs


def _read_columns(data: bytes, columns: Sequence[str]) -> pa.Table:
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


def _run_table(storage: Storage, files: _RunFiles, columns: Sequence[str]) -> pa.Table:
    """A run's results: its table, or (killed, or still running) its parts so far."""
    if files.results:
        return _read_columns(storage.get_bytes(layout.results_key(files.run_id)), columns)
    tables = [_read_columns(storage.get_bytes(key), columns) for key in files.parts]
    if not tables:
        return pa.table(
            [pa.nulls(0, RESULTS_SCHEMA.field(c).type) for c in columns], names=list(columns)
        )
    return pa.concat_tables(tables)


def run_rows(storage: Storage, run_id: str, columns: Sequence[str] | None = None) -> pa.Table:
    """The rows of one run (its results table, or its parts so far), `columns` of them."""
    layout.check_run_id(run_id)
    files = _scan_run(storage, run_id)
    if files is None:
        raise HistoryError(f"no run {run_id!r} under {storage.root_uri}")
    return _run_table(storage, files, list(columns or RESULTS_SCHEMA.names))


def _scan_run(storage: Storage, run_id: str) -> _RunFiles | None:
    prefix = layout.run_prefix(run_id)
    files = _RunFiles(run_id)
    found = False
    for key in storage.list_keys(prefix):
        found = True
        name = key[len(prefix) :]
        if name == RESULTS_NAME:
            files.results = True
        elif name == SUMMARY_NAME:
            files.summary = True
        elif name == CONTACT_SHEET_NAME:
            files.contact_sheet = True
        elif name == LOG_NAME:
            files.log = True
        elif name.startswith(PARTS_DIR) and name.endswith(".parquet"):
            files.parts.append(key)
    files.parts.sort()
    return files if found else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _counts(table: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    status = table.column("status")
    by_status: dict[str, int] = {s: int(pc.sum(pc.equal(status, s)).as_py() or 0) for s in STATUSES}
    skipped = table.filter(pc.equal(status, "skipped"))
    reasons = pc.value_counts(skipped.column("reason").fill_null("unknown")).to_pylist()
    return by_status, {str(r["values"]): int(r["counts"]) for r in reasons}


def _time_range(table: pa.Table) -> tuple[datetime | None, datetime | None]:
    first = pc.min(table.column("started_at")).as_py()
    last = pc.max(table.column("finished_at")).as_py()
    return first, last


def _summary(storage: Storage, run_id: str) -> dict[str, Any] | None:
    try:
        data = storage.get_bytes(layout.summary_key(run_id))
    except StorageNotFound:
        return None
    try:
        summary = json.loads(data)
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def _run_state(
    summary: Mapping[str, Any] | None, by_status: Mapping[str, int], skipped: Mapping[str, int]
) -> tuple[str, str | None]:
    if summary is None:
        return STATE_INCOMPLETE, None
    stopped_by = summary.get("stopped_by")
    stopped_text = str(stopped_by) if stopped_by else None
    kind = summary.get("stop_kind")
    if kind == "interrupted":
        return STATE_INTERRUPTED, stopped_text or "interrupted (Ctrl-C / SIGTERM)"
    if kind == "stopped" or stopped_text:
        return STATE_STOPPED, stopped_text
    budget = skipped.get(SKIP_BUDGET, 0)
    if budget:
        return STATE_STOPPED, f"budget (--max-cost): {budget} rows left"
    if by_status.get("failed", 0) or by_status.get("invalid", 0):
        return STATE_ROWS_FAILED, None
    return STATE_COMPLETE, None


def _int_map(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int | float)}


def _run_info(storage: Storage, files: _RunFiles) -> RunInfo:
    summary = _summary(storage, files.run_id) if files.summary else None
    if summary is not None:
        by_status = {s: 0 for s in STATUSES} | _int_map(summary.get("by_status"))
        skipped = _int_map(summary.get("skipped_by_reason"))
        started = _parse_time(summary.get("started_at"))
        finished = _parse_time(summary.get("finished_at"))
        elapsed = summary.get("elapsed_s")
        duration = float(elapsed) if isinstance(elapsed, int | float) else None
        rows = int(summary.get("rows") or sum(by_status.values()))
        cost = float(summary.get("cost_usd") or 0.0)
        currency = str(summary.get("currency") or "USD")
        manifest = summary.get("manifest")
        output = summary.get("output")
    else:
        table = _run_table(storage, files, _COUNT_COLUMNS)
        by_status, skipped = _counts(table)
        started, finished = _time_range(table)
        duration = (finished - started).total_seconds() if started and finished else None
        rows = table.num_rows
        cost = round(float(pc.sum(table.column("cost")).as_py() or 0.0), 6)
        currencies = pc.unique(table.column("currency").drop_null()).to_pylist()
        currency = "/".join(str(c) for c in currencies) or "USD"
        manifest = output = None
    state, stopped_by = _run_state(summary, by_status, skipped)
    return RunInfo(
        run_id=files.run_id,
        state=state,
        started_at=started,
        finished_at=finished,
        duration_s=duration,
        rows=rows,
        by_status=by_status,
        skipped_by_reason=skipped,
        cost_usd=cost,
        currency=currency,
        manifest=str(manifest) if manifest else None,
        output=str(output) if output else None,
        stopped_by=stopped_by,
        has_summary=summary is not None,
        has_results=files.results,
        parts=len(files.parts),
        parent=layout.shard_parent(files.run_id),
    )


def _newest_first(runs: Iterable[RunInfo]) -> list[RunInfo]:
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(runs, key=lambda r: (r.started_at or oldest, r.run_id), reverse=True)


def list_runs(storage: Storage) -> list[RunInfo]:
    """Every run of the output, newest first (by start time, then run id).

    One GET per run (its summary); a run without a summary is counted from its results
    table or its parts. Folders under `runs/` with neither are not runs.
    """
    scanned = _scan(storage)
    infos = [
        _run_info(storage, files) for files in scanned.values() if files.summary or files.any_table
    ]
    return _newest_first(infos)


# --- one run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailureGroup:
    """Failed (or invalid) rows of a run with the same error code, and the first of them."""

    status: str
    error_code: str | None
    count: int
    example_row: int
    example_id: str | None
    example_message: str | None
    example_column: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "error_code": self.error_code,
            "count": self.count,
            "example_row": self.example_row,
            "example_id": self.example_id,
            "example_message": self.example_message,
            "example_column": self.example_column,
        }


@dataclass(frozen=True)
class RunDetail:
    """One run: its summary, failures by error code, where its files are, how to retry."""

    run: RunInfo
    output: str
    summary: dict[str, Any] | None
    failures: list[FailureGroup]
    failure_groups: int  # all groups; `failures` holds the largest few
    results_uri: str | None
    summary_uri: str | None
    contact_sheet_uri: str | None
    log_uri: str | None
    parts_uri: str | None
    retry_command: str | None

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return self.run.skipped_by_reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run.to_dict(),
            "output": self.output,
            "summary": self.summary,
            "failures": [f.to_dict() for f in self.failures],
            "failure_groups": self.failure_groups,
            "skipped_by_reason": dict(self.skipped_by_reason),
            "results_uri": self.results_uri,
            "summary_uri": self.summary_uri,
            "contact_sheet_uri": self.contact_sheet_uri,
            "log_uri": self.log_uri,
            "parts_uri": self.parts_uri,
            "retry_command": self.retry_command,
        }


def cut(text: str | None, limit: int = EXAMPLE_MESSAGE_CHARS) -> str | None:
    """`text` cut to `limit` characters (ending in `...` when cut)."""
    if text is None or len(text) <= limit:
        return text
    return text[: max(0, limit - len(ELLIPSIS))] + ELLIPSIS


def retry_command(manifest: str, output: str, run_id: str) -> str:
    """The shell command that edits again only the rows that failed in `run_id`."""
    return shlex.join(["imgedit", "run", manifest, "--output", output, "--retry-failed-of", run_id])


# Columns `failure_groups` reads.
FAILURE_COLUMNS: Final = (
    "row",
    "id",
    "status",
    "reason",
    "error_code",
    "error_message",
    "error_column",
)
# An example is a row that failed on its own when the group has one (not a duplicate's echo).
_ECHO_OFFSET: Final = 2**40


def failure_groups(table: pa.Table) -> list[FailureGroup]:
    """Failed and invalid rows grouped by (status, error code), largest group first.

    Each group's example is its first row that is not a duplicate of another (whose message
    only points at that other row), else its first row.
    """
    status = table.column("status")
    bad = table.filter(pc.is_in(status, pa.array(["failed", "invalid"])))
    if not bad.num_rows:
        return []
    echo = pc.equal(bad.column("reason").fill_null(""), SKIP_DUPLICATE)
    rank = pc.add(bad.column("row"), pc.multiply(echo.cast(pa.int64()), _ECHO_OFFSET))
    grouped = (
        bad.append_column("rank", rank)
        .group_by(["status", "error_code"], use_threads=False)
        .aggregate([("row", "count"), ("rank", "min")])
        .to_pylist()
    )
    firsts = {int(g["rank_min"]) % _ECHO_OFFSET for g in grouped}
    examples = {
        int(r["row"]): r
        for r in bad.filter(pc.is_in(bad.column("row"), pa.array(sorted(firsts)))).to_pylist()
    }
    groups = []
    for g in grouped:
        first = int(g["rank_min"]) % _ECHO_OFFSET
        example = examples[first]
        groups.append(
            FailureGroup(
                status=str(g["status"]),
                error_code=g["error_code"],
                count=int(g["row_count"]),
                example_row=first,
                example_id=example.get("id"),
                example_message=cut(example.get("error_message")),
                example_column=example.get("error_column"),
            )
        )
    return sorted(groups, key=lambda g: (-g.count, g.status, g.error_code or ""))


def run_detail(
    storage: Storage,
    run_id: str | None = None,
    *,
    top: int = DEFAULT_TOP_FAILURES,
    table: pa.Table | None = None,
) -> RunDetail:
    """One run (the newest when `run_id` is None); HistoryError when there is no such run.

    `table`: the run's rows (at least FAILURE_COLUMNS) when the caller has them already.
    """
    if run_id is None:
        runs = list_runs(storage)
        if not runs:
            raise HistoryError(f"no runs under {storage.root_uri}")
        run_id = runs[0].run_id
    else:
        try:
            layout.check_run_id(run_id)
        except ValueError as exc:
            raise HistoryError(str(exc)) from None
    files = _scan_run(storage, run_id)
    if files is None or not (files.summary or files.any_table):
        raise HistoryError(f"no run {run_id!r} under {storage.root_uri}")
    info = _run_info(storage, files)
    summary = _summary(storage, run_id) if files.summary else None
    if table is None:
        table = _run_table(storage, files, FAILURE_COLUMNS)
    groups = failure_groups(table)
    retry = None
    if info.failed and files.results and info.manifest:
        retry = retry_command(info.manifest, storage.root_uri, run_id)
    return RunDetail(
        run=info,
        output=storage.root_uri,
        summary=summary,
        failures=groups[:top],
        failure_groups=len(groups),
        results_uri=storage.uri_for(layout.results_key(run_id)) if files.results else None,
        summary_uri=storage.uri_for(layout.summary_key(run_id)) if files.summary else None,
        contact_sheet_uri=(
            storage.uri_for(layout.contact_sheet_key(run_id)) if files.contact_sheet else None
        ),
        log_uri=storage.uri_for(layout.run_prefix(run_id) + LOG_NAME) if files.log else None,
        parts_uri=(
            storage.uri_for(layout.run_prefix(run_id) + PARTS_DIR.rstrip("/")) + "/"
            if files.parts
            else None
        ),
        retry_command=retry,
    )


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


# --- the latest state of each row ------------------------------------------------------------


def _last_per_row(table: pa.Table) -> pa.Table:
    """One entry per row number: the last one (parts of a killed run may repeat a row)."""
    values = table.column("row").to_numpy()
    if bool(np.all(values[1:] > values[:-1])):
        return table  # a results table: in row order, each row once
    order = np.lexsort((np.arange(len(values)), values))
    ordered = values[order]
    last = np.append(ordered[1:] != ordered[:-1], True)
    return table.take(pa.array(order[last]))


def _priorities(table: pa.Table) -> tuple[pa.Array, pa.Array]:
    """Each entry's priority (see LATEST_STATE_SQL) and whether it is a success."""
    status = table.column("status")
    reason = table.column("reason").fill_null("")
    skipped = pc.equal(status, "skipped")
    success = pc.or_(
        pc.equal(status, "succeeded"),
        pc.and_(skipped, pc.is_in(reason, pa.array([SKIP_DONE, SKIP_DUPLICATE]))),
    )
    outputs = pc.greater(pc.list_value_length(table.column("output_uris")).fill_null(0), 0)
    unselected = pc.and_(skipped, pc.equal(reason, SKIP_NOT_SELECTED))
    success_np = success.to_numpy(zero_copy_only=False).astype(bool)
    priority = np.where(
        success_np,
        2 + outputs.to_numpy(zero_copy_only=False).astype(np.int8),
        np.where(unselected.to_numpy(zero_copy_only=False).astype(bool), 0, 1),
    ).astype(np.int8)
    return pa.array(priority, pa.int8()), pa.array(success_np, pa.bool_())


def _flat(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _overlay(
    base: pa.Array | pa.ChunkedArray, at: np.ndarray, values: pa.Array | pa.ChunkedArray
) -> pa.Array:
    """`base` with `base[at[i]] = values[i]`."""
    flat = _flat(base)
    if not len(at):
        return flat
    index = np.arange(len(flat), dtype=np.int64)
    index[at] = len(flat) + np.arange(len(values), dtype=np.int64)
    return pa.concat_arrays([flat, _flat(values).cast(flat.type)]).take(pa.array(index))


def _is_newer(starts: pa.Array, run_ids: pa.Array, start: int, run_id: str) -> np.ndarray:
    """Whether the run (`start`, `run_id`) is at least as new as each of (`starts`, `run_ids`)."""
    s = starts.fill_null(_NO_START).to_numpy(zero_copy_only=False)
    same_or_older_id = pc.less_equal(run_ids, run_id).fill_null(True)
    ids = same_or_older_id.to_numpy(zero_copy_only=False).astype(bool)
    result: np.ndarray = (s < start) | ((s == start) & ids)
    return result


def _col(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _fold(state: pa.Table | None, entries: pa.Table, start: int, run_id: str) -> pa.Table:
    """The state of every row after one more run's `entries` (any run order gives the same)."""
    n = entries.num_rows
    this_run = pa.scalar(run_id, pa.string())
    entries = (
        entries.append_column("run_start", pa.array(np.full(n, start, np.int64)))
        .append_column("run_id", pa.repeat(this_run, n))
        .append_column("last_start", pa.array(np.full(n, start, np.int64)))
        .append_column("last_run_id", pa.repeat(this_run, n))
        .append_column("runs_seen", pa.array(np.ones(n, np.int32)))
    )
    if state is None:
        return entries.combine_chunks()
    idx = pc.index_in(entries.column("row"), value_set=state.column("row"))
    matched = pc.is_valid(idx).to_numpy(zero_copy_only=False).astype(bool)
    positions = idx.to_numpy(zero_copy_only=False)[matched].astype(np.int64)
    theirs = state.take(pa.array(positions))
    mine = entries.filter(pa.array(matched))
    # Runs seen, and the last run that listed the row, whichever entry gives the state.
    seen = pc.add(_col(theirs, "runs_seen"), 1).cast(pa.int32())
    newest = _is_newer(_col(theirs, "last_start"), _col(theirs, "last_run_id"), start, run_id)
    last_start = pa.array(np.where(newest, start, _col(theirs, "last_start").to_numpy()))
    last_run = pc.if_else(pa.array(newest), this_run, _col(theirs, "last_run_id"))
    # Which entry gives the state: the higher priority, then the newer run.
    mine_first = _col(mine, "priority").to_numpy() > _col(theirs, "priority").to_numpy()
    same = _col(mine, "priority").to_numpy() == _col(theirs, "priority").to_numpy()
    newer = _is_newer(_col(theirs, "run_start"), _col(theirs, "run_id"), start, run_id)
    wins = mine_first | (same & newer)
    updates = {"runs_seen": seen, "last_start": last_start, "last_run_id": last_run}
    # The state's rows that stay, with their counts updated; the entries that win.
    kept = state
    for name, values in updates.items():
        i = kept.schema.get_field_index(name)
        kept = kept.set_column(i, name, _overlay(kept.column(name), positions, values))
    keep = np.ones(state.num_rows, bool)
    keep[positions[wins]] = False
    winners = mine.filter(pa.array(wins))
    for name, values in updates.items():
        i = winners.schema.get_field_index(name)
        winners = winners.set_column(i, name, values.filter(pa.array(wins)))
    new = entries.filter(pa.array(~matched))
    return pa.concat_tables([kept.filter(pa.array(keep)), winners, new]).combine_chunks()


def _fold_jobs(jobs: pa.Table | None, entries: pa.Table, success: pa.Array) -> pa.Table:
    """Output URIs by job key: the first success with outputs seen for each job."""
    has = pc.and_(
        pc.and_(success, pc.is_valid(entries.column("job_key"))),
        pc.greater(pc.list_value_length(entries.column("output_uris")).fill_null(0), 0),
    )
    found = entries.filter(has).select(["job_key", "output_uris"])
    if jobs is not None:
        found = found.filter(pc.invert(pc.is_in(found.column("job_key"), jobs.column("job_key"))))
    keys = found.column("job_key")
    firsts = pc.index_in(pc.unique(keys), value_set=keys)
    found = found.take(firsts)
    return found if jobs is None else pa.concat_tables([jobs, found])


def _run_start(table: pa.Table) -> int:
    first = pc.min(table.column("started_at").cast(pa.int64())).as_py()
    return int(first) if first is not None else int(_NO_START)


def _runs_for_state(storage: Storage) -> list[_RunFiles]:
    scanned = _scan(storage)
    with_results = {r for r, f in scanned.items() if f.results}
    chosen = []
    for files in scanned.values():
        if not files.any_table:
            continue
        parent = layout.shard_parent(files.run_id)
        if parent is not None and parent in with_results:
            continue  # the parent's table has the shard's rows
        chosen.append(files)
    return sorted(chosen, key=lambda f: f.run_id)


def _iter_entries(storage: Storage) -> Iterator[tuple[str, int, pa.Table, pa.Array]]:
    for files in _runs_for_state(storage):
        table = _last_per_row(_run_table(storage, files, _ENTRY_COLUMNS))
        start = _run_start(table)
        priority, success = _priorities(table)
        table = table.drop_columns(["started_at"]).append_column("priority", priority)
        yield files.run_id, start, table, success


def manifest_rows(manifest_uri: str, *, endpoint_url: str | None = None) -> pa.Table:
    """Every data row of a manifest: its 1-based `row` number and `id` (one streaming pass)."""
    from pipeline.manifest.open import open_manifest

    rows: list[int] = []
    ids: list[str | None] = []
    with open_manifest(manifest_uri, endpoint_url=endpoint_url) as manifest:
        for parsed in manifest.rows():
            rows.append(parsed.row)
            ids.append(parsed.id)
    return pa.table({"row": pa.array(rows, pa.int64()), "id": pa.array(ids, pa.string())})


def _finish(state: pa.Table, jobs: pa.Table | None) -> pa.Table:
    priority = state.column("priority").to_numpy()
    status = state.column("status").to_numpy(zero_copy_only=False)
    states = np.where(priority == 0, NEVER_RUN, np.where(priority == 1, status, "succeeded"))
    edited = (priority == 3) & (status == "succeeded")
    reason = pc.if_else(
        pa.array((priority == 0) | edited), pa.scalar(None, pa.string()), state.column("reason")
    )
    outputs = state.column("output_uris").combine_chunks()
    if jobs is not None and jobs.num_rows:
        # A row done (skipped) in every run that listed it: the outputs of its job's edit.
        idx = pc.index_in(state.column("job_key"), value_set=jobs.column("job_key"))
        found = pc.is_valid(idx).to_numpy(zero_copy_only=False).astype(bool)
        need = np.flatnonzero((priority == 2) & found)
        if len(need):
            at = idx.to_numpy(zero_copy_only=False)[need].astype(np.int64)
            outputs = _overlay(outputs, need, jobs.column("output_uris").take(pa.array(at)))
    table = pa.table(
        {
            "row": state.column("row"),
            "id": state.column("id"),
            "state": pa.array(states.astype(object), pa.string()),
            "reason": reason,
            "job_key": state.column("job_key"),
            "output_uris": outputs,
            "error_code": state.column("error_code"),
            "error_message": state.column("error_message"),
            "state_run_id": state.column("run_id"),
            "last_run_id": state.column("last_run_id"),
            "runs_seen": state.column("runs_seen"),
        },
        schema=STATUS_SCHEMA,
    )
    return table.sort_by("row")


def _empty_status() -> pa.Table:
    return STATUS_SCHEMA.empty_table()


def _with_manifest(table: pa.Table, manifest: pa.Table) -> pa.Table:
    """One row per manifest row, in its order: the state found, else `never_run`."""
    idx = pc.index_in(manifest.column("row"), value_set=table.column("row"))
    found = table.take(idx)
    empty = pa.scalar([], pa.list_(pa.string()))
    columns = {
        "row": manifest.column("row"),
        "id": pc.coalesce(manifest.column("id"), found.column("id")),
        "state": found.column("state").fill_null(NEVER_RUN),
        "reason": found.column("reason"),
        "job_key": found.column("job_key"),
        "output_uris": pc.fill_null(found.column("output_uris"), empty),
        "error_code": found.column("error_code"),
        "error_message": found.column("error_message"),
        "state_run_id": found.column("state_run_id"),
        "last_run_id": found.column("last_run_id"),
        "runs_seen": found.column("runs_seen").fill_null(0),
    }
    return pa.table(columns, schema=STATUS_SCHEMA)


def row_status(
    storage: Storage,
    manifest_uri: str | None = None,
    *,
    endpoint_url: str | None = None,
) -> pa.Table:
    """The latest state of each row across every run of the output (STATUS_SCHEMA).

    A row is `succeeded` when any run edited it or found its job done (`skipped` with
    reason `done` or `duplicate`; its `output_uris` are the edit's); else it has the status
    of the newest run that did more than leave it unselected (`failed` with that run's
    error, `invalid`, `skipped` for the budget, a stop or an interrupt); else `never_run`.
    Runs are read one at a time (results table, or a killed run's parts) and folded into
    one row per row number with pyarrow: memory grows with the rows, not with the runs.
    With `manifest_uri`, exactly the manifest's rows, those in no run `never_run`.
    """
    state: pa.Table | None = None
    jobs: pa.Table | None = None
    for run_id, start, entries, success in _iter_entries(storage):
        jobs = _fold_jobs(jobs, entries, success)
        state = _fold(state, entries, start, run_id)
    table = _empty_status() if state is None else _finish(state, jobs)
    if manifest_uri is not None:
        table = _with_manifest(table, manifest_rows(manifest_uri, endpoint_url=endpoint_url))
    return table


def state_counts(table: pa.Table) -> dict[str, int]:
    """Rows by latest state: succeeded, failed, invalid, `skipped: <reason>`..., never_run."""
    state = table.column("state")
    counts = {s: int(pc.sum(pc.equal(state, s)).as_py() or 0) for s in ROW_STATES}
    skipped = table.filter(pc.equal(state, "skipped"))
    del counts["skipped"]
    out = {s: counts[s] for s in ("succeeded", "failed", "invalid")}
    reasons = pc.value_counts(skipped.column("reason").fill_null("unknown")).to_pylist()
    for r in sorted(reasons, key=lambda r: str(r["values"])):
        out[f"skipped: {r['values']}"] = int(r["counts"])
    out[NEVER_RUN] = counts[NEVER_RUN]
    return out


def write_status(
    storage: Storage,
    table: pa.Table,
    path: str | None = None,
    *,
    endpoint_url: str | None = None,
) -> str:
    """Write the row states as Parquet: `status.parquet` under the output, or at `path`
    (a local path or `s3://bucket/key`); returns where."""
    data = table_to_parquet_bytes(table)
    if path is None:
        return storage.put_bytes(STATUS_KEY, data, "application/vnd.apache.parquet")
    if path.startswith("s3://"):
        parent, _, name = path.rstrip("/").rpartition("/")
        if not name or parent in ("s3:", "s3:/"):
            raise HistoryError(f"not an S3 object URI: {path!r}")
        return open_storage(parent, endpoint_url=endpoint_url).put_bytes(name, data)
    target = Path(path).expanduser()
    return LocalStorage(target.parent).put_bytes(target.name, data)
