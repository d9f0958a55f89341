"""Run artifacts beyond the summary: the before/after contact sheet, stored beside the results.

The sheet is published as a markdown artifact that the Prefect UI renders on the run's
Artifacts tab: a small JPEG preview embedded as a data URI (the full PNG is often megabytes,
and an artifact is stored in Prefect's database), what it shows, and where the full sheet
is: a pre-signed HTTPS link for an `s3://` output, the absolute path for a local one.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image
from prefect.artifacts import acreate_markdown_artifact

from pipeline.errors import ImgEditError
from pipeline.io.netguard import AddressPolicy, source_policy
from pipeline.io.s3 import is_s3_uri, make_s3_client, parse_s3_uri
from pipeline.io.storage import open_storage
from pipeline.uses.contact_sheet import (
    ContactSheet,
    jpeg_data_uri,
    preview_jpeg,
    render_contact_sheet,
    write_contact_sheet,
)

CONTACT_SHEET_ARTIFACT_KEY = "imgedit-contact-sheet"
CONTACT_SHEET_DESCRIPTION = "Source and result thumbnails of a sample of the run's rows"
# How long a pre-signed link to the full sheet works: the longest SigV4 allows.
PRESIGN_EXPIRY = timedelta(days=7)
# Query parameters that carry a session token (SigV4, SigV2); never put in an artifact.
_TOKEN_PARAMETERS = frozenset({"x-amz-security-token"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Published:
    uri: str
    markdown: str
    text_only: str  # the same without the preview, should the API refuse the larger one


async def publish_contact_sheet(
    results_uri: str,
    output: str,
    run_id: str,
    endpoint_url: str | None,
    allow_private_sources: bool = False,
) -> str | None:
    """Render a sample of the run's rows (source | result) to PNG, store it, show it.

    The artifact (key `imgedit-contact-sheet`) shows a small JPEG of the sheet and says where
    the full PNG is. Returns the full sheet's URI (a path for a local output), or None when
    no sheet could be made: that never fails the run.
    """
    try:
        # In a thread: reading thumbnails, encoding the PNG and its preview would hold up the
        # event loop (and the flow's other end-of-run calls) for a second or so.
        published = await asyncio.to_thread(
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
    try:
        await acreate_markdown_artifact(
            markdown=published.markdown,
            key=CONTACT_SHEET_ARTIFACT_KEY,
            description=CONTACT_SHEET_DESCRIPTION,
        )
    except httpx.HTTPStatusError as exc:
        if published.markdown == published.text_only:
            raise
        # A proxy in front of the API may refuse a body of a few hundred kB (413): the text
        # still says where the sheet is.
        log.warning(
            "contact sheet of run %s: the API refused the artifact with its preview (HTTP %s);"
            " publishing it without",
            run_id,
            exc.response.status_code,
        )
        await acreate_markdown_artifact(
            markdown=published.text_only,
            key=CONTACT_SHEET_ARTIFACT_KEY,
            description=CONTACT_SHEET_DESCRIPTION,
        )
    return published.uri


def _render_and_store(
    results_uri: str, output: str, run_id: str, endpoint_url: str | None, policy: AddressPolicy
) -> _Published:
    sheet = render_contact_sheet(
        results_uri, endpoint_url=endpoint_url, title=f"imgedit run {run_id}", policy=policy
    )
    uri = write_contact_sheet(open_storage(output, endpoint_url=endpoint_url), run_id, sheet.png)
    try:
        preview: bytes | None = preview_jpeg(sheet.png)
    except (ValueError, OSError, MemoryError) as exc:
        log.warning("contact sheet of run %s: no preview: %s", run_id, exc)
        preview = None
    where = full_sheet_location(uri, endpoint_url)
    return _Published(
        uri=uri,
        markdown=contact_sheet_markdown(run_id, sheet, where, preview=preview),
        text_only=contact_sheet_markdown(run_id, sheet, where, preview=None),
    )


def contact_sheet_markdown(
    run_id: str, sheet: ContactSheet, where: str, *, preview: bytes | None
) -> str:
    """The artifact's markdown: what the sheet shows, its `preview` (a JPEG), `where` it is."""
    shown, total = sheet.shown, sheet.total
    if total == 0:
        what = "No succeeded rows in this run: the sheet has no thumbnails."
    else:
        if shown < total:
            rows = f"{shown} of {total} succeeded rows (a sample, in row order)"
        else:
            rows = f"all {total} succeeded rows" if total > 1 else "the one succeeded row"
        what = f"Source and result thumbnails of {rows}, each with its id, seed and prompt."
    parts = [f"### Contact sheet of run {_code(run_id)}", what]
    if preview is None:
        parts.append("_No preview: see the full sheet._")
    else:
        with Image.open(io.BytesIO(preview)) as im:
            size = f"{im.width} x {im.height} px"
        full = f"{sheet.width} x {sheet.height} px"
        scaled = "full size" if size == full else f"scaled down from {full}"
        parts += [
            f"![contact sheet of run {run_id}]({jpeg_data_uri(preview)})",
            f"_Preview: a {size} JPEG of the sheet ({scaled})._",
        ]
    parts.append(where)
    return "\n\n".join(parts) + "\n"


def full_sheet_location(uri: str, endpoint_url: str | None) -> str:
    """A markdown line saying where the full sheet `uri` is, and how to open it.

    For `s3://`, a link pre-signed with the output's S3 client (`endpoint_url` as for the
    output), valid PRESIGN_EXPIRY. Not with temporary credentials: such a link carries the
    session token in its query (`X-Amz-Security-Token`), a secret that must not be stored in
    an artifact, and would stop working when the token expires (hours, not days). A local
    path is shown as text: browsers do not open `file://` links from a web page.
    """
    if not is_s3_uri(uri):
        path = os.path.abspath(uri)
        return f"Full sheet (PNG), on the machine that ran this flow: {_code(path)}"
    loc = parse_s3_uri(uri)
    stored = f"Full sheet (PNG): {_code(uri)}"
    try:
        client = make_s3_client(endpoint_url, max_pool_connections=1)
        try:
            # botocore presigns S3 with SigV2 in older regions unless told otherwise; buckets
            # made since 2020 refuse SigV2. Keep the client's own SigV4 (the first answer to
            # this event wins over botocore's own handler).
            # (The stubs type handlers as returning None; this event uses the answer.)
            events = client.meta.events
            events.register_first("choose-signer.s3", _same_signer)  # type: ignore[arg-type]
            url = client.generate_presigned_url(
                "get_object",
                Params={"Bucket": loc.bucket, "Key": loc.key},
                ExpiresIn=int(PRESIGN_EXPIRY.total_seconds()),
            )
        finally:
            client.close()
    except (BotoCoreError, ClientError, ValueError) as exc:
        # Only the type: a message could quote a credential source's details.
        log.warning("contact sheet %s: no pre-signed link: %s", uri, type(exc).__name__)
        return f"{stored}. No pre-signed link ({type(exc).__name__}): open it with your S3 tools."
    parts = urlsplit(url)
    query = {name.lower(): value for name, value in parse_qsl(parts.query)}
    if _TOKEN_PARAMETERS & query.keys():
        return (
            f"{stored}. A pre-signed link is not available with temporary credentials (it would"
            " carry the session token, and expire with it): open it with your S3 tools."
        )
    until = _sigv4_expiry(query)
    if until is None or parts.scheme not in ("https", "http") or parts.username or parts.password:
        return f"{stored}. No pre-signed link for this endpoint: open it with your S3 tools."
    return (
        f"Full sheet (PNG): [download]({_link_target(url)}), a pre-signed link, valid for "
        f"{_duration(PRESIGN_EXPIRY)}, until {until:%Y-%m-%d %H:%M} UTC; stored at {_code(uri)}."
    )


def _same_signer(signature_version: str, **kwargs: object) -> str:
    return signature_version


def _sigv4_expiry(query: dict[str, str]) -> datetime | None:
    """When a SigV4 pre-signed URL stops working, from its own query; None if not SigV4."""
    try:
        signed = datetime.strptime(query["x-amz-date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        return signed + timedelta(seconds=int(query["x-amz-expires"]))
    except (KeyError, ValueError):
        return None


def _duration(delta: timedelta) -> str:
    if delta.days and not delta.seconds:
        return f"{delta.days} day" + ("s" if delta.days > 1 else "")
    hours = round(delta.total_seconds() / 3600)
    return f"{hours} hour" + ("s" if hours != 1 else "")


def _link_target(url: str) -> str:
    """`url` safe inside markdown's `(...)`: botocore percent-encodes keys, but to be sure."""
    return "".join(f"%{ord(c):02X}" if c in "()<> \t\r\n" else c for c in url)


def _code(text: str) -> str:
    """`text` as a markdown code span, whatever backticks it holds."""
    text = text.replace("\n", " ")
    fence = "`"
    while fence in text:
        fence += "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
