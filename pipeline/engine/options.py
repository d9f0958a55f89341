"""A run's options, each declared once: type, default, bounds and the sentence that explains it.

`RunOptions` is the one description of what a run can be told. The CLI's `imgedit run` options
are generated from it (flows/cli_options.py), the deployments' nested `run` group is derived from
it (flows/settings.py), a scaled-out run passes it on to its shards field by field, and the
`edit-manifest` flow's parameters, which Prefect must read from the flow's source, are checked
against it field by field (tests/test_options.py: same names, defaults, bounds and descriptions).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.constants import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CHUNKS_IN_FLIGHT,
    DEFAULT_CONCURRENCY,
    DEFAULT_HTTP_TIMEOUT_S,
    DEFAULT_LEASE_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RETRY_SECONDS,
    DEFAULT_TIMEOUT_S,
)

ResponseFormat = Literal["b64_json", "url"]
# Rows `start <= row < end` of a shard (end None: to the last row); as pipeline.manifest.open's.
RowRange = tuple[int, int | None]

# How a field appears on the command line: its option name, or None for a field the CLI
# spells its own way (e.g. --rows A:B for row_start and row_end) or does not offer.
CLI = "cli"


def _cli(name: str | None) -> dict[str, Any]:
    return {CLI: name}


class RunOptions(BaseModel):
    """Everything a run needs besides credentials (those come from the environment)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: Annotated[
        str,
        Field(
            description="Manifest: local path or s3://, CSV or Parquet",
            json_schema_extra=_cli(None),
        ),
    ]
    output: Annotated[
        str,
        Field(
            description="Output root: a local folder or s3://bucket/prefix",
            json_schema_extra=_cli(None),
        ),
    ]
    run_id: Annotated[
        str | None, Field(description="Name of this run's folder under runs/ (default: a new id)")
    ] = None
    api_base: Annotated[
        str | None,
        Field(description="API base URL; empty: IMGEDIT_API_BASE, else the Lumenfall gateway"),
    ] = None
    model: Annotated[
        str | None,
        Field(description="Model name sent to the API; empty: IMGEDIT_MODEL, else p-image-edit"),
    ] = None
    concurrency: Annotated[
        int,
        Field(
            ge=1,
            le=1024,
            description="Most edit requests in flight at once (the adaptive limit's ceiling)",
        ),
    ] = DEFAULT_CONCURRENCY
    fixed_concurrency: Annotated[
        bool,
        Field(
            description="Keep `concurrency` requests in flight instead of adapting: by default "
            "the limit starts low, backs off on 429s and climbs while the API keeps up"
        ),
    ] = False
    max_attempts: Annotated[
        int, Field(ge=1, le=50, description="Attempts per row, the first one included")
    ] = DEFAULT_MAX_ATTEMPTS
    max_retry_seconds: Annotated[
        float, Field(gt=0, description="Seconds one row may spend retrying")
    ] = DEFAULT_MAX_RETRY_SECONDS
    request_timeout: Annotated[
        float, Field(gt=0, description="Seconds before an attempt counts as lost")
    ] = DEFAULT_TIMEOUT_S
    source_timeout: Annotated[
        float, Field(gt=0, description="Seconds to fetch one http(s) source before its row fails")
    ] = DEFAULT_HTTP_TIMEOUT_S
    chunk_size: Annotated[int, Field(ge=1, le=100_000, description="Rows per Prefect task")] = (
        DEFAULT_CHUNK_SIZE
    )
    chunks_in_flight: Annotated[
        int, Field(ge=1, le=16, description="Chunk tasks running at once, sharing one limit")
    ] = DEFAULT_CHUNKS_IN_FLIGHT
    response_format: Annotated[
        ResponseFormat,
        Field(description="How results travel: inline base64, or a URL fetched at once"),
    ] = "b64_json"
    overwrite: Annotated[bool, Field(description="Redo rows whose results already exist")] = False
    strict: Annotated[
        bool,
        Field(description="Fail before any API call if any row or source is invalid"),
    ] = False
    s3_endpoint_url: Annotated[
        str | None,
        Field(description="S3 endpoint (MinIO, R2, moto); empty: AWS_ENDPOINT_URL_S3, else AWS"),
    ] = None
    max_cost_usd: Annotated[
        float | None,
        Field(
            ge=0,
            description="Budget in USD: no request starts once it could be passed",
            json_schema_extra=_cli("--max-cost"),
        ),
    ] = None
    dry_run_estimate: Annotated[
        bool, Field(description="Price the run with the API's dry run of its first row")
    ] = False
    retry_failed_of: Annotated[
        str | None, Field(description="Only redo the rows that failed in this earlier run id")
    ] = None
    select_ids: Annotated[
        tuple[str, ...] | None,
        Field(
            description="Only the rows with these ids (a backfill)", json_schema_extra=_cli(None)
        ),
    ] = None
    select_where: Annotated[
        str | None,
        Field(
            description="Only rows where this expression holds, e.g. seed > 10 and size == "
            '"1:1" (comparisons, and/or/not, in [...], contains/startswith/isnull...; not Python)',
            json_schema_extra=_cli("--where"),
        ),
    ] = None
    manifest_version: Annotated[
        str | None,
        Field(
            max_length=256,
            description="The version (S3 ETag) of the manifest to read: a scaled-out run gives "
            "its shards the one its plan read; a manifest changed since is an error",
            json_schema_extra=_cli(None),
        ),
    ] = None
    row_start: Annotated[
        int,
        Field(
            ge=1,
            description="First manifest row of this run (shards set it)",
            json_schema_extra=_cli(None),
        ),
    ] = 1
    row_end: Annotated[
        int | None,
        Field(
            ge=1,
            description="Row after the last one of this run (shards)",
            json_schema_extra=_cli(None),
        ),
    ] = None
    limit: Annotated[
        int | None,
        Field(
            ge=1,
            description="Only the first N rows the run would edit (after any selection): try a "
            "few first",
        ),
    ] = None
    allow_private_sources: Annotated[
        bool,
        Field(
            description="Also fetch http(s) sources from loopback and private networks (ignored "
            "on workers with IMGEDIT_ALLOWED_ROOTS)"
        ),
    ] = False
    exclusive_output: Annotated[
        bool,
        Field(
            description="No other run writes to this output now: lets a run start on a store "
            "that ignores conditional writes, where jobs cannot be claimed"
        ),
    ] = False
    lease_seconds: Annotated[
        float,
        Field(
            gt=0,
            description="Seconds a claim or open marker of this run lives without renewal",
        ),
    ] = DEFAULT_LEASE_S

    @property
    def row_range(self) -> RowRange | None:
        if self.row_start <= 1 and self.row_end is None:
            return None
        return (self.row_start, self.row_end)

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with `changes`, validated like the original."""
        return RunOptions.model_validate({**self.model_dump(), **changes})


def cli_name(field: str) -> str | None:
    """The option `field` has on the command line, or None when the CLI spells it its own way."""
    extra = RunOptions.model_fields[field].json_schema_extra
    if isinstance(extra, dict) and CLI in extra:
        value = extra[CLI]
        return value if isinstance(value, str) else None
    return "--" + field.replace("_", "-")


__all__ = ["CLI", "ResponseFormat", "RunOptions", "cli_name"]
