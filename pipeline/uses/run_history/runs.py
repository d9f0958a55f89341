"""An output's runs, listed: each run's state, times, counts and cost, from its summary (or,
without one, from its results table or parts)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine import layout
from pipeline.engine.results import SKIP_BUDGET, STATUSES
from pipeline.errors import StorageNotFound
from pipeline.io.storage import Storage
from pipeline.uses.run_history.files import RunFiles, run_table, scan_runs, tally

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

# The columns a run's counts are made of.
_COUNT_COLUMNS: Final = ("row", "status", "reason", "cost", "currency", "started_at", "finished_at")


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


def _time_range(table: pa.Table) -> tuple[datetime | None, datetime | None]:
    first = pc.min(table.column("started_at")).as_py()
    last = pc.max(table.column("finished_at")).as_py()
    return first, last


def read_summary(storage: Storage, run_id: str) -> dict[str, Any] | None:
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


def run_info(storage: Storage, files: RunFiles) -> RunInfo:
    summary = read_summary(storage, files.run_id) if files.summary else None
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
        table = run_table(storage, files, _COUNT_COLUMNS)
        by_status, skipped = tally(table, "status", STATUSES)
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
    scanned = scan_runs(storage)
    infos = [
        run_info(storage, files) for files in scanned.values() if files.summary or files.any_table
    ]
    return _newest_first(infos)
