"""`backfill`: an ad-hoc run over chosen rows of a manifest, started from the UI's form."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow
from pydantic import Field

from flows.edit_manifest import edit_manifest
from flows.settings import RunSettings
from pipeline.errors import ConfigError


@flow(name="backfill", persist_result=False, validate_parameters=True)
async def backfill(
    manifest: Annotated[str, Field(description="Manifest (CSV/Parquet, local path or s3://)")],
    output: Annotated[str, Field(description="Output root: a local folder or s3://bucket/prefix")],
    ids: Annotated[list[str] | None, Field(description="Only the rows with these ids")] = None,
    where: Annotated[
        str | None,
        Field(
            description="Only rows where this pandas expression over the manifest columns "
            'holds, e.g. seed > 10 and output_format == "png"'
        ),
    ] = None,
    failed_of_run: Annotated[
        str | None, Field(description="Only the rows that failed in this earlier run id")
    ] = None,
    overwrite: Annotated[
        bool, Field(description="Redo the chosen rows even where results already exist")
    ] = False,
    run: Annotated[RunSettings, Field(description="API, limits and budget")] = RunSettings(),  # noqa: B008
) -> dict[str, Any]:
    """Edit only the chosen rows (every criterion given must hold); the others are skipped."""
    if not (ids or where or failed_of_run):
        raise ConfigError("choose the rows: ids, a where expression, or failed_of_run")
    result: dict[str, Any] = await edit_manifest(
        manifest=manifest,
        output=output,
        select_ids=ids,
        select_where=where,
        retry_failed_of=failed_of_run,
        overwrite=overwrite,
        **run.flow_kwargs(),
    )
    return result
