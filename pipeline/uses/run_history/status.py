"""The latest state of each row of an output, across all its runs (`row_status`), folded one
run at a time with pyarrow; its counts, and writing it as Parquet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine import layout
from pipeline.engine.results import (
    SKIP_DONE,
    SKIP_DUPLICATE,
    SKIP_NOT_SELECTED,
    STATUSES,
    table_to_parquet_bytes,
)
from pipeline.errors import HistoryError
from pipeline.io.storage import LocalStorage, Storage, open_storage
from pipeline.uses.run_history.files import RunFiles, run_table, scan_runs, tally

# The latest state of a row: a results status, or never run (in no run, or only unselected).
NEVER_RUN: Final = "never_run"
ROW_STATES: Final = (*STATUSES, NEVER_RUN)

# Where `imgedit status --write-default` puts the row states, under the output root.
STATUS_KEY: Final = "status.parquet"

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


def _runs_for_state(storage: Storage) -> list[RunFiles]:
    scanned = scan_runs(storage)
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
        table = _last_per_row(run_table(storage, files, _ENTRY_COLUMNS))
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
    counts, reasons = tally(table, "state", ROW_STATES)
    out = {s: counts[s] for s in ("succeeded", "failed", "invalid")}
    for reason in sorted(reasons):
        out[f"skipped: {reason}"] = reasons[reason]
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
