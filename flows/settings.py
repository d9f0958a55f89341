"""Typed, documented parameter groups shared by the deployments' forms in the Prefect UI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from pipeline.constants import DEFAULT_LIMIT_NAME
from pipeline.engine.options import RunOptions

OutputFormat = Literal["png", "jpeg", "webp", "avif", "gif"]
AspectRatio = Literal["auto", "1:1", "16:9", "9:16", "3:2", "2:3", "4:3", "3:4"]


# The run options the deployments' forms offer in their `run` group: each field, with its
# type, default, bounds and description, is the run options model's own (pipeline.engine.options).
RUN_GROUP_OPTIONS = (
    "api_base",
    "model",
    "concurrency",
    "fixed_concurrency",
    "max_cost_usd",
    "s3_endpoint_url",
    "allow_private_sources",
)


class _FlowOnly(BaseModel):
    """What only the flow knows: Prefect's shared limit and the scale-out."""

    api_limit: str | None = Field(
        DEFAULT_LIMIT_NAME, description="Prefect global concurrency limit shared by all runs"
    )
    shards: int = Field(1, ge=1, le=1000, description="Child flow runs to spread the run over")


def _run_settings() -> type[BaseModel]:
    fields: dict[str, Any] = {
        name: (RunOptions.model_fields[name].annotation, RunOptions.model_fields[name])
        for name in RUN_GROUP_OPTIONS
    }
    fields.update({name: (f.annotation, f) for name, f in _FlowOnly.model_fields.items()})
    return create_model(
        "RunSettings",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Where requests go and how hard to push: the same for every row of the run.",
        __module__=__name__,
        **fields,
    )


if TYPE_CHECKING:
    # What type checkers see; the defaults are placeholders (the real ones are the model's).
    class RunSettings(BaseModel):
        api_base: str | None = None
        model: str | None = None
        concurrency: int = 0
        max_cost_usd: float | None = None
        s3_endpoint_url: str | None = None
        allow_private_sources: bool = False
        api_limit: str | None = None
        shards: int = 0

        def flow_kwargs(self) -> dict[str, Any]: ...

else:
    RunSettings = _run_settings()
    RunSettings.flow_kwargs = lambda self: self.model_dump()


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
