"""The edit-API emulator's settings: defaults, validation, environment round trip."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError
from pipeline.spec import DEFAULT_MODEL

ENV_PREFIX = "IMGEDIT_EMULATOR_"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DEFAULT_RETRY_AFTER_S = 1.0
DEFAULT_SLOW_S = 30.0
DEFAULT_FILE_TTL_S = 3600.0
DEFAULT_FILE_STORE_BYTES = 512 * 1024 * 1024
DEFAULT_BASE_CACHE_ENTRIES = 32
DEFAULT_REQUEST_LOG_SIZE = 10_000
DEFAULT_REVISED_PROMPT_RATE = 0.5
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
MALFORMED_KINDS: tuple[str, ...] = ("not_json", "no_data", "bad_base64", "not_image")
LATENCY_DISTRIBUTIONS: tuple[str, ...] = ("fixed", "uniform", "lognormal")
DEFAULT_WEATHER_CAPACITY = 8
# Fault-rate fields, in the order a draw walks them (the order is part of replay).
FAULT_RATE_FIELDS: tuple[str, ...] = (
    "rate_limited_rate",
    "internal_error_rate",
    "exhausted_rate",
    "drop_rate",
    "slow_rate",
    "malformed_rate",
    "truncate_rate",
)
MASK = "***"


def _rate(description: str) -> Any:
    """A fault rate: a probability per edit request, 0 unless set."""
    return Field(default=0.0, ge=0.0, le=1.0, description=description)


class EmulatorConfig(BaseModel):
    """Everything the emulator can be told, at start (flags, environment) or at run time.

    Changed at run time (POST /_emulator/config), every field takes effect at once except
    host, port and render_threads, which only matter at start. Each field's description is
    also its `imgedit emulator --<field>` help (pipeline.emulator.command builds the options).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field(default=DEFAULT_HOST, description="Interface to listen on.")
    port: int = Field(
        default=DEFAULT_PORT, ge=0, le=65535, description="Port to listen on (0: any free port)."
    )
    api_key: str | None = Field(
        default=None, description="Require this Bearer key (default: accept any)."
    )
    # None: unlimited.
    balance_usd: float | None = Field(
        default=None, ge=0.0, description="Account balance; overdrawing answers 402."
    )
    models: list[str] = Field(
        default_factory=lambda: [DEFAULT_MODEL], description="Comma-separated model ids served."
    )
    disabled_models: list[str] = Field(
        default_factory=list, description="Comma-separated model ids answering MODEL_DISABLED."
    )
    # Time to answer an edit (not a 429) from its arrival, decoding and rendering included:
    # mean seconds, spread (standard deviation), shape.
    latency: float = Field(
        default=0.0, ge=0.0, description="Mean time to answer an edit, rendering included, seconds."
    )
    latency_jitter: float = Field(
        default=0.0, ge=0.0, description="Standard deviation of the latency, seconds."
    )
    latency_distribution: Literal["fixed", "uniform", "lognormal"] = Field(
        default="fixed", description="fixed, uniform or lognormal."
    )
    # Faults: each rate is a probability per edit request; they must add up to at most 1.
    fault_seed: int = Field(default=0, description="Seed of every fault and latency draw.")
    rate_limited_rate: float = _rate("Share of edits answered 429 RATE_LIMITED.")
    retry_after: float = Field(
        default=DEFAULT_RETRY_AFTER_S, ge=0.0, description="Retry-After of a 429, seconds."
    )
    internal_error_rate: float = _rate("Share answered 500 INTERNAL_ERROR.")
    exhausted_rate: float = _rate("Share answered 502 ALL_PROVIDERS_EXHAUSTED.")
    drop_rate: float = _rate("Share charged, then the connection dropped mid-answer.")
    slow_rate: float = _rate("Share charged, then answered after --slow-seconds.")
    slow_seconds: float = Field(
        default=DEFAULT_SLOW_S, ge=0.0, description="Delay of a slow answer, seconds."
    )
    malformed_rate: float = _rate("Share charged, then answered 200 with a broken body.")
    malformed_kinds: list[str] = Field(
        default_factory=lambda: list(MALFORMED_KINDS),
        description="Comma-separated: " + ", ".join(MALFORMED_KINDS) + ".",
    )
    truncate_rate: float = _rate("Share of url answers whose first download is cut short.")
    # API weather (pipeline.emulator.weather): how the gateway behaves over a run.
    weather: Literal["steady", "gateway", "overloaded"] = Field(
        default="steady",
        description="API weather: steady (as configured), gateway (its real latency, faults "
        "in bursts) or overloaded (429 past --weather-capacity requests in flight).",
    )
    weather_capacity: int = Field(
        default=DEFAULT_WEATHER_CAPACITY,
        ge=1,
        description="Requests in flight the overloaded weather admits; more are answered 429.",
    )
    weather_time_scale: float = Field(
        default=1.0,
        gt=0.0,
        description="Speed of the weather's clock: its latencies and Retry-After are divided "
        "by it (100: a hundred times faster, same shape).",
    )
    revised_prompt_rate: float = Field(
        default=DEFAULT_REVISED_PROMPT_RATE,
        ge=0.0,
        le=1.0,
        description="Share of answers carrying a revised_prompt.",
    )
    # Result files served at /v1/files/...
    file_ttl: float = Field(
        default=DEFAULT_FILE_TTL_S, gt=0.0, description="Lifetime of result URLs, seconds."
    )
    file_store_bytes: int = Field(
        default=DEFAULT_FILE_STORE_BYTES,
        ge=0,
        description="Memory budget of stored result files, bytes.",
    )
    public_base_url: str | None = Field(
        default=None, description="Base of result URLs (default: the request's host)."
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES, gt=0, description="Largest accepted upload, bytes."
    )
    base_cache_size: int = Field(
        default=DEFAULT_BASE_CACHE_ENTRIES,
        ge=1,
        description="Decoded source compositions kept in memory.",
    )
    output_scale: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Answer images this fraction of the asked size on each side (runs of "
        "100k rows fit on a disk at 0.0625); `size` in the answer says what was sent.",
    )
    render_threads: int = Field(default=0, ge=0, description="Render threads (0: one per CPU).")
    request_log_size: int = Field(
        default=DEFAULT_REQUEST_LOG_SIZE, ge=0, description="Edit requests kept in the request log."
    )

    @field_validator("models", "disabled_models", "malformed_kinds", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_key", "public_base_url", "balance_usd", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            return None
        return value

    @field_validator("malformed_kinds")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        unknown = [k for k in value if k not in MALFORMED_KINDS]
        if unknown:
            raise ValueError(
                f"unknown malformed kinds {unknown}; expected some of {', '.join(MALFORMED_KINDS)}"
            )
        return value

    @model_validator(mode="after")
    def _rates_fit(self) -> EmulatorConfig:
        total = sum(getattr(self, name) for name in FAULT_RATE_FIELDS)
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {total:g}, more than 1")
        return self

    def __repr__(self) -> str:
        return f"EmulatorConfig({self.public_dict()!r})"

    __str__ = __repr__

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data, the API key masked."""
        data = self.model_dump()
        if data["api_key"] is not None:
            data["api_key"] = MASK
        return data

    def updated(self, changes: Mapping[str, Any]) -> EmulatorConfig:
        """A validated copy with `changes` applied; raises ConfigError naming the problem."""
        return _validated({**self.model_dump(), **changes})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> EmulatorConfig:
        """Defaults overridden by `IMGEDIT_EMULATOR_<FIELD>` variables."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        return _validated(values)

    def to_env(self) -> dict[str, str]:
        """Every field as an `IMGEDIT_EMULATOR_<FIELD>` variable (inverse of from_env)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                text = ""
            elif isinstance(value, list):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            env[ENV_PREFIX + name.upper()] = text
        return env


def _validated(values: Mapping[str, Any]) -> EmulatorConfig:
    try:
        return EmulatorConfig.model_validate(dict(values))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        # Not chained: pydantic's own message quotes input values, the API key among them.
        raise ConfigError(f"invalid emulator config: {problems}") from None
