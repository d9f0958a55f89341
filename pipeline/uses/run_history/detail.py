"""One run in detail: its failures grouped by error code, where its files are, how to retry."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine import layout
from pipeline.engine.results import SKIP_DUPLICATE
from pipeline.errors import HistoryError
from pipeline.io.storage import Storage
from pipeline.uses.run_history.files import (
    LOG_NAME,
    PARTS_DIR,
    run_table,
    scan_run,
)
from pipeline.uses.run_history.runs import RunInfo, list_runs, read_summary, run_info

DEFAULT_TOP_FAILURES: Final = 10
# Example error messages are cut to this many characters.
EXAMPLE_MESSAGE_CHARS: Final = 200
ELLIPSIS: Final = "..."


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
    files = scan_run(storage, run_id)
    if files is None or not (files.summary or files.any_table):
        raise HistoryError(f"no run {run_id!r} under {storage.root_uri}")
    info = run_info(storage, files)
    summary = read_summary(storage, run_id) if files.summary else None
    if table is None:
        table = run_table(storage, files, FAILURE_COLUMNS)
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
