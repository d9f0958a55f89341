"""Typed, documented parameter groups shared by the deployments' forms in the Prefect UI."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.constants import DEFAULT_CONCURRENCY, DEFAULT_LIMIT_NAME

OutputFormat = Literal["png", "jpeg", "webp", "avif", "gif"]
AspectRatio = Literal["auto", "1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4"]


class RunSettings(BaseModel):
    """Where requests go and how hard to push: the same for every row of the run."""

    model_config = ConfigDict(extra="forbid")

    api_base: str | None = Field(
        None, description="API base URL; empty: the workers' IMGEDIT_API_BASE, else Lumenfall"
    )
    model: str | None = Field(
        None,
        description="Model name sent to the API; empty: the workers' IMGEDIT_MODEL, else "
        "p-image-edit",
    )
    concurrency: int = Field(
        DEFAULT_CONCURRENCY, ge=1, le=1024, description="Edit requests in flight at once"
    )
    max_cost_usd: float | None = Field(
        None, ge=0, description="Budget in USD; rows past it are skipped for a later run"
    )
    api_limit: str | None = Field(
        DEFAULT_LIMIT_NAME, description="Prefect global concurrency limit shared by all runs"
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, R2); empty: AWS_ENDPOINT_URL_S3, else AWS"
    )
    shards: int = Field(1, ge=1, le=1000, description="Child flow runs to spread the run over")
    allow_private_sources: bool = Field(
        False,
        description="Also fetch http(s) sources from loopback and private networks (ignored on "
        "workers with IMGEDIT_ALLOWED_ROOTS)",
    )

    def flow_kwargs(self) -> dict[str, Any]:
        return self.model_dump()


class EditSettings(BaseModel):
    """How every image is edited; empty fields leave the API's default."""

    model_config = ConfigDict(extra="forbid")

    seed: int | None = Field(None, ge=0, description="Seed, for reproducible edits")
    n: int | None = Field(None, ge=1, le=10, description="Outputs per source image")
    size: str | None = Field(None, description="WxH, W:H or auto (mapped to a supported size)")
    aspect_ratio: AspectRatio | None = Field(None, description="Shape, if no size is given")
    output_format: OutputFormat | None = Field(None, description="Format of the results")
    output_compression: int | None = Field(
        None, ge=1, le=100, description="Quality of lossy formats, 1-100"
    )
    turbo: bool | None = Field(
        None, description="p-image-edit's turbo mode (faster; off for complex edits)"
    )

    def manifest_columns(self) -> dict[str, object]:
        """As manifest columns (provider extras as `param.<name>`), unset ones left out."""
        cols: dict[str, object] = {
            k: v for k, v in self.model_dump(exclude={"turbo"}).items() if v is not None
        }
        if self.turbo is not None:
            cols["param.turbo"] = self.turbo
        return cols
