"""The latest state of each row of an output in SQL, for duckdb over the runs' results tables:
what `row_status` computes with pyarrow."""

from __future__ import annotations

from typing import Final

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
