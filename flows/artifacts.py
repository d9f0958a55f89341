"""Run artifacts beyond the summary: the before/after contact sheet, stored beside the results."""

from __future__ import annotations

import asyncio
import logging

from prefect.artifacts import acreate_link_artifact

from pipeline.contact_sheet import contact_sheet, write_contact_sheet
from pipeline.errors import ImgEditError
from pipeline.netguard import AddressPolicy, source_policy
from pipeline.storage import open_storage

CONTACT_SHEET_ARTIFACT_KEY = "imgedit-contact-sheet"

log = logging.getLogger(__name__)


async def publish_contact_sheet(
    results_uri: str,
    output: str,
    run_id: str,
    endpoint_url: str | None,
    allow_private_sources: bool = False,
) -> str | None:
    """Render a sample of the run's rows (source | result) to PNG, store it, link it."""
    try:
        # In a thread: reading thumbnails and encoding the PNG would hold up the event loop
        # (and the flow's other end-of-run calls) for a second or so.
        uri = await asyncio.to_thread(
            _render_and_store,
            results_uri,
            output,
            run_id,
            endpoint_url,
            source_policy(allow_private_sources),
        )
    except ImgEditError as exc:
        # A missing thumbnail must not fail a run whose edits are all stored.
        log.warning("no contact sheet for run %s: %s", run_id, exc)
        return None
    link = uri if "://" in uri else f"file://{uri}"
    await acreate_link_artifact(
        link=link,
        link_text=f"contact sheet of run {run_id}",
        key=CONTACT_SHEET_ARTIFACT_KEY,
        description="Source and result thumbnails of a sample of the run's rows",
    )
    return uri


def _render_and_store(
    results_uri: str, output: str, run_id: str, endpoint_url: str | None, policy: AddressPolicy
) -> str:
    png = contact_sheet(
        results_uri, endpoint_url=endpoint_url, title=f"imgedit run {run_id}", policy=policy
    )
    return write_contact_sheet(open_storage(output, endpoint_url=endpoint_url), run_id, png)
