"""A run's plan: its inputs checked, its rows selected and validated, what is left priced."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from pipeline import spec
from pipeline.engine.client import check_credentials
from pipeline.engine.options import RunOptions
from pipeline.engine.profiles import load_profile
from pipeline.engine.results import (
    failed_rows_of,
    rows_done_before,
    utcnow,
)
from pipeline.engine.source_check import validate_with_sources
from pipeline.errors import ManifestError
from pipeline.io.allowed_roots import AllowedRoots, check_allowed
from pipeline.io.netguard import source_policy
from pipeline.io.storage import Storage, open_storage
from pipeline.manifest.open import (
    Manifest,
    ValidationReport,
    format_report,
    open_manifest,
)
from pipeline.manifest.row_sets import RowSet, RowsLeft
from pipeline.manifest.select import check_ids, select_rows
from pipeline.manifest.where import parse_where
from pipeline.models.profile import ModelProfile
from pipeline.models.registry import DEFAULT_PROFILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    run_id: str
    manifest: str
    output: str
    rows: int
    valid: int
    invalid: int
    images: int  # output images the rows left ask for
    estimated_cost_usd: float
    report: ValidationReport
    rows_left: int = 0  # valid rows in the selection not finished by earlier runs
    rows_done: int = 0  # rows earlier runs of this manifest on this output finished
    only_rows: set[int] | None = None  # the selection (see selected_rows); None: every row
    # The manifest, opened once for the whole run (and pinned to one version): `execute`
    # reads its chunks from it and closes it.
    opened: Manifest | None = None
    # The run's model profile (resolved once per run): what rows are checked by, what is
    # sent, and how the answers' cost is read.
    profile: ModelProfile = DEFAULT_PROFILE


def new_run_id(now: datetime | None = None) -> str:
    now = now or utcnow()
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def check_flow_inputs(
    *,
    manifest: str | None,
    output: str,
    where: str | None = None,
    ids: Sequence[str] = (),
    source_prefix: str | None = None,
) -> None:
    """Refuse, before any row is read, what no row can fix: a manifest, catalogue prefix or
    output outside the worker's allowed roots, a `where` that is not the safe expression
    language, an id list no form should hold."""
    roots = AllowedRoots.from_env()
    if manifest is not None:
        check_allowed(manifest, "manifest", roots)
    if source_prefix is not None:
        check_allowed(source_prefix, "source_prefix", roots)
    check_allowed(output, "output", roots)
    if where is not None:
        parse_where(where)
    check_ids(ids)


def check_run_inputs(opts: RunOptions) -> None:
    check_flow_inputs(
        manifest=opts.manifest,
        output=opts.output,
        where=opts.select_where,
        ids=opts.select_ids or (),
    )
    check_credentials(opts.api_base)


def plan_run(
    opts: RunOptions,
    run_id: str,
    storage: Storage | None = None,
    profile: ModelProfile | None = None,
) -> RunPlan:
    """Validate the whole manifest (streaming, no API call); with `strict`, refuse invalid rows.

    The manifest is opened here once for the whole run (`RunPlan.opened`: an S3 object is
    pinned to the version this first read saw, and a Parquet one downloaded once); the run's
    chunks read that same handle, and `execute` closes it. The estimate counts only what is
    left: rows in the selection that earlier runs of this manifest on this output did not
    finish (results.rows_done_before; each job is still checked when the run reaches it).
    Rows are checked by the run's model profile (`profile`, else resolved here: see
    `engine.profiles`), and priced at its list price.
    """
    check_run_inputs(opts)
    profile = profile or load_profile(opts.model, base_url=opts.api_base)
    storage = storage or open_storage(opts.output, endpoint_url=opts.s3_endpoint_url)
    opened = open_manifest(
        opts.manifest,
        endpoint_url=opts.s3_endpoint_url,
        etag=opts.manifest_version,
        profile=profile,
    )
    try:
        only = selected_rows(opts, storage, etag=opened.file.etag)
        done = RowSet() if opts.overwrite else rows_done_before(storage, opts.manifest)
        report = _validate(opts, opened, RowsLeft(only, done), profile)
    except BaseException:
        opened.close()
        raise
    images_left = report.images if report.images_left is None else report.images_left
    return RunPlan(
        run_id=run_id,
        manifest=opts.manifest,
        output=opts.output,
        rows=report.rows,
        valid=report.valid,
        invalid=report.invalid,
        images=images_left,
        estimated_cost_usd=round(images_left * profile.cost.price_per_image_usd, 6),
        report=report,
        rows_left=report.valid if report.rows_left is None else report.rows_left,
        rows_done=len(done),
        only_rows=only,
        opened=opened,
        profile=profile,
    )


def _validate(
    opts: RunOptions, opened: Manifest, left: Callable[[int], bool], profile: ModelProfile
) -> ValidationReport:
    if not opts.strict:
        return opened.validate(row_range=opts.row_range, left=left)
    # Strict: what the run would fail on (a missing, unusable or refused source or mask)
    # refuses the run too, before any API call.
    report = validate_with_sources(
        opts.manifest,
        endpoint_url=opts.s3_endpoint_url,
        etag=opened.file.etag,
        row_range=opts.row_range,
        concurrency=opts.concurrency,
        source_timeout=opts.source_timeout,
        policy=source_policy(opts.allow_private_sources),
        left=left,
        profile=profile,
    )
    if report.invalid:
        raise ManifestError(
            f"--strict: {report.invalid} of {report.rows} rows are invalid; nothing was sent.\n"
            + format_report(report)
        )
    return report


def describe_plan(plan: RunPlan) -> str:
    """The plan in one line for the run's log: what is left, and what it should cost."""
    done = f"; {plan.rows_done} done in earlier runs" if plan.rows_done else ""
    profile = plan.profile
    model = ""
    if profile.model != spec.DEFAULT_MODEL or profile.is_guess:
        note = f": {profile.note}" if profile.note else ""
        model = f"; model {profile.model} ({profile.origin} profile{note})"
    if plan.report.dropped:
        tally = ", ".join(f"{n} in {k} rows" for n, k in plan.report.dropped.most_common())
        model += f"; not sent (the model does not take them): {tally}"
    return (
        f"run {plan.run_id}: {plan.rows} rows ({plan.invalid} invalid{done}); "
        f"{plan.rows_left} rows left to edit, about {plan.images} images, estimated cost "
        f"{spec.CURRENCY} {plan.estimated_cost_usd:.2f}{model}"
    )


def selected_rows(opts: RunOptions, storage: Storage, etag: str | None = None) -> set[int] | None:
    """The rows this run may edit when it is a selection (a backfill), else None (all)."""
    if not (opts.select_ids or opts.select_where or opts.retry_failed_of):
        if opts.limit is None:
            return None
        first = max(opts.row_start, 1)
        last = first + opts.limit
        return set(range(first, last if opts.row_end is None else min(last, opts.row_end)))
    rows = select_rows(
        opts.manifest,
        ids=opts.select_ids or None,
        where=opts.select_where,
        failed_rows=failed_rows_of(storage, opts.retry_failed_of) if opts.retry_failed_of else None,
        endpoint_url=opts.s3_endpoint_url,
        etag=etag,
    )
    if opts.limit is not None:
        rows = set(sorted(rows)[: opts.limit])
    return rows
