"""`catalogue-reedit`: the scheduled re-edit of a catalogue, paying only for changed sources."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import State

from flows.edit_manifest import edit_subflow
from flows.settings import EditSettings, RunSettings
from pipeline.engine import layout
from pipeline.engine.plan import check_flow_inputs, new_run_id
from pipeline.errors import ConfigError
from pipeline.io.storage import open_storage
from pipeline.uses.catalogue import build_manifest_from_prefix


@flow(name="catalogue-reedit", persist_result=False, validate_parameters=True)
async def catalogue_reedit(
    output: str,
    source_prefix: str | None = None,
    prompt: str | None = None,
    manifest: str | None = None,
    where: str | None = None,
    edit: EditSettings = EditSettings(),  # noqa: B008 - pydantic models are immutable defaults here
    run: RunSettings = RunSettings(),  # noqa: B008
) -> dict[str, Any] | State[Any]:
    """Re-edit the catalogue: results are keyed by each source's content hash, so only sources
    that changed (or are new) since the last run cost an API call.

    Args:
        output: Output root: a local folder or s3://bucket/prefix
        source_prefix: Every image under this folder or s3:// prefix is a source
        prompt: The edit applied to every image of source_prefix
        manifest: Or: a manifest (CSV/Parquet) listing the catalogue
        where: Only catalogue rows where this expression holds, e.g. startswith(image,
            "s3://shop/shoes/") (image, id, prompt and the edit columns; not Python)
        edit: How each image is edited (with source_prefix)
        run: API, limits and budget
    """
    logger = get_run_logger()
    if (source_prefix is None) == (manifest is None):
        raise ConfigError("give either source_prefix (with a prompt) or manifest, not both")
    check_flow_inputs(manifest=manifest, source_prefix=source_prefix, output=output, where=where)
    run_id = new_run_id()
    if source_prefix is not None:
        if not prompt:
            raise ConfigError("source_prefix needs a prompt: the edit applied to every image")
        manifest = build_catalogue_manifest(
            source_prefix, prompt, edit, output, run_id, run.s3_endpoint_url
        )
        if manifest is None:
            logger.warning("no images under %s: nothing to do", source_prefix)
            return {"run_id": run_id, "rows": 0, "by_status": {}, "cost_usd": 0.0}
    assert manifest is not None
    return await edit_subflow(
        manifest=manifest, output=output, run_id=run_id, select_where=where, **run.flow_kwargs()
    )


def build_catalogue_manifest(
    prefix: str,
    prompt: str,
    edit: EditSettings,
    output: str,
    run_id: str,
    endpoint_url: str | None,
) -> str | None:
    """List the prefix into a manifest stored beside the run's results; None if it is empty."""
    with tempfile.TemporaryDirectory(prefix="imgedit-catalogue-") as tmp:
        path = Path(tmp) / "manifest.parquet"
        info = build_manifest_from_prefix(
            prefix,
            prompt=prompt,
            out_path=path,
            settings=edit.manifest_columns(),
            endpoint_url=endpoint_url,
        )
        if info.rows == 0:
            return None
        storage = open_storage(output, endpoint_url=endpoint_url)
        return storage.put_file(layout.run_prefix(run_id) + "manifest.parquet", path)
