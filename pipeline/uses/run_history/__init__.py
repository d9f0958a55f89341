"""An output's history from `runs/` alone: its runs, a run's failures, each row's latest state.

The package: `files` (what each run folder holds, reading its tables), `runs` (the runs
listed, each one's state and counts), `detail` (one run: failures by error code, its files,
how to retry), `status` (each row's latest state across runs, with pyarrow) and `sql` (the
same in SQL, for duckdb).
"""

from __future__ import annotations

from pipeline.errors import HistoryError as HistoryError
from pipeline.uses.run_history.detail import (
    DEFAULT_TOP_FAILURES,
    FAILURE_COLUMNS,
    FailureGroup,
    RunDetail,
    cut,
    failure_groups,
    retry_command,
    run_detail,
)
from pipeline.uses.run_history.files import LOG_NAME, image_key_of_uri, open_output, run_rows
from pipeline.uses.run_history.runs import (
    RUN_STATES,
    STATE_COMPLETE,
    STATE_INCOMPLETE,
    STATE_INTERRUPTED,
    STATE_ROWS_FAILED,
    STATE_STOPPED,
    RunInfo,
    list_runs,
)
from pipeline.uses.run_history.sql import LATEST_STATE_SQL, latest_state_sql
from pipeline.uses.run_history.status import (
    NEVER_RUN,
    ROW_STATES,
    STATUS_KEY,
    STATUS_SCHEMA,
    manifest_rows,
    row_status,
    state_counts,
    write_status,
)

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
