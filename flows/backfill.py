"""`backfill`: an ad-hoc run over chosen rows of a manifest, started from the UI's form."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.client.schemas.objects import State

from flows.edit_manifest import edit_subflow
from flows.settings import RunSettings
from pipeline.errors import ConfigError


@flow(name="backfill", persist_result=False, validate_parameters=True)
async def backfill(
    manifest: str,
    output: str,
    ids: list[str] | None = None,
    where: str | None = None,
    failed_of_run: str | None = None,
    overwrite: bool = False,
    run: RunSettings = RunSettings(),  # noqa: B008
) -> dict[str, Any] | State[Any]:
    """Edit only the chosen rows (every criterion given must hold); the others are skipped.

    Args:
        manifest: Manifest (CSV/Parquet, local path or s3://)
        output: Output root: a local folder or s3://bucket/prefix
        ids: Only the rows with these ids
        where: Only rows where this expression over the manifest columns holds, e.g.
            seed > 10 and output_format == "png" (comparisons, and/or/not, in [...],
            contains/startswith/isnull...; not Python: see the README)
        failed_of_run: Only the rows that failed in this earlier run id
        overwrite: Redo the chosen rows even where results already exist
        run: API, limits and budget
    """
    if not (ids or where or failed_of_run):
        raise ConfigError("choose the rows: ids, a where expression, or failed_of_run")
    return await edit_subflow(
        manifest=manifest,
        output=output,
        select_ids=ids,
        select_where=where,
        retry_failed_of=failed_of_run,
        overwrite=overwrite,
        **run.flow_kwargs(),
    )
