"""`augment-dataset`: images x prompts x seeds from a compact spec, into a dataset table."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_link_artifact
from prefect.client.schemas.objects import State

from flows.edit_manifest import edit_subflow
from flows.settings import EditSettings, RunSettings
from pipeline.engine import layout
from pipeline.engine.plan import check_flow_inputs, new_run_id
from pipeline.io.allowed_roots import AllowedRoots, check_allowed
from pipeline.io.storage import open_storage
from pipeline.uses.augment import AugmentSpec, expand_manifest, write_dataset_table
from pipeline.uses.export import ExportFormat, ExportOptions, export_run

DATASET_ARTIFACT_KEY = "imgedit-dataset"
EXPORT_ARTIFACT_KEY = "imgedit-export"


@flow(name="augment-dataset", persist_result=False, validate_parameters=True)
async def augment_dataset(
    manifest: str,
    output: str,
    prompts: list[str] | None = None,
    prompt_template: str | None = None,
    seeds: list[int] = [0],  # noqa: B006
    where: str | None = None,
    edit: EditSettings = EditSettings(),  # noqa: B008
    run: RunSettings = RunSettings(),  # noqa: B008
    export: ExportFormat | None = None,
    export_to: str | None = None,
) -> dict[str, Any] | State[Any]:
    """Expand, edit, and write `runs/<run_id>/dataset.parquet`: one row per output image.

    Args:
        manifest: Source manifest (CSV/Parquet): image(s), id and any columns
        output: Output root: a local folder or s3://bucket/prefix
        prompts: Prompts, each applied to every source image
        prompt_template: Or one prompt filled from row columns, e.g. 'Put the {product} on a beach'
        seeds: Seeds, each applied to every prompt
        where: Only expanded rows where this expression holds, e.g. seed > 1 and
            contains(prompt, "beach") (the source's columns, prompt, seed; not Python)
        edit: How each image is edited (n: variants per request)
        run: API, limits and budget
        export: Also export the run's images as a training-ready dataset: webdataset (tar
            shards) or parquet (an Image column for Hugging Face datasets)
        export_to: Where the export goes (a local folder or s3://); default
            <output>/exports/<run_id>/<format>
    """
    logger = get_run_logger()
    check_flow_inputs(manifest=manifest, output=output, where=where)
    run_id = new_run_id()
    storage = open_storage(output, endpoint_url=run.s3_endpoint_url)
    export_options = (
        ExportOptions(
            format=export,
            to=export_to or storage.uri_for(f"exports/{run_id}/{export.value}"),
        )
        if export is not None
        else None
    )
    if export_options is not None:
        # Refused before anything is paid, as the output is.
        check_allowed(export_options.to, "export destination", AllowedRoots.from_env())
    settings = {k: v for k, v in edit.manifest_columns().items() if k not in ("seed", "n")}
    spec = AugmentSpec(
        manifest=manifest,
        prompts=prompts,
        prompt_template=prompt_template,
        seeds=seeds,
        n=edit.n,
        settings=settings,
    )
    with tempfile.TemporaryDirectory(prefix="imgedit-augment-") as tmp:
        expanded = Path(tmp) / "expanded.parquet"
        info = expand_manifest(spec, expanded, endpoint_url=run.s3_endpoint_url)
        logger.info("%d sources x prompts x seeds = %d rows", info.sources, info.rows)
        expanded_uri = storage.put_file(layout.run_prefix(run_id) + "expanded.parquet", expanded)
        summary = await edit_subflow(
            manifest=expanded_uri,
            output=output,
            run_id=run_id,
            select_where=where,
            **run.flow_kwargs(),
        )
        if not isinstance(summary, dict):
            return summary  # interrupted: no dataset table for a run that did not finish
        dataset = write_dataset_table(
            summary["results_uri"],
            expanded,
            storage.uri_for(layout.run_prefix(run_id) + "dataset.parquet"),
            endpoint_url=run.s3_endpoint_url,
        )
    link = dataset.uri if "://" in dataset.uri else f"file://{dataset.uri}"
    await acreate_link_artifact(
        link=link,
        link_text=f"dataset of run {run_id} ({dataset.rows} images)",
        key=DATASET_ARTIFACT_KEY,
        description="Augmented dataset table (Parquet): load it with pandas.read_parquet",
    )
    result = {**summary, "dataset_uri": dataset.uri, "dataset_rows": dataset.rows}
    if export_options is None:
        return result
    report = await asyncio.to_thread(
        export_run, output, run_id, export_options, endpoint_url=run.s3_endpoint_url
    )
    for line in report.lines():
        logger.info("%s", line)
    index = report.index_uri if "://" in report.index_uri else f"file://{report.index_uri}"
    await acreate_link_artifact(
        link=index,
        link_text=f"{report.format} export of run {run_id} ({report.samples} images)",
        key=EXPORT_ARTIFACT_KEY,
        description="Training-ready dataset: its index lists every file with its sha256",
    )
    return {**result, "export": report.to_dict()}
