"""What to augment (`AugmentSpec`): a source manifest, prompts or one prompt template, seeds,
n and settings; and the template itself: checked like a form field, filled from a row."""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import spec as api
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest.rows import MAX_SEED, MIN_SEED
from pipeline.uses.catalogue import ROW_OWN_COLUMNS, check_settings

# Settings may not set what each expanded row sets from the source or the spec.
AUGMENT_RESERVED: frozenset[str] = ROW_OWN_COLUMNS | frozenset({"seed", "n"})


# --- templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplatePart:
    literal: str
    column: str | None
    spec: str
    conversion: str | None


# A template is a form field: it is checked like one. Its length, its number of fields and
# each field's width and precision are capped, so `{col:>50000000}` cannot allocate 100 MB
# per row; a filled prompt over the API's limit fails its row as usual.
MAX_TEMPLATE_CHARS = 4000
MAX_TEMPLATE_FIELDS = 50
MAX_FORMAT_WIDTH = 200
# Python's format-spec mini-language, each part named so width and precision can be capped.
_FORMAT_SPEC_RE = re.compile(
    r"(?:(?P<fill>.)?[<>=^])?[-+ ]?z?#?0?(?P<width>[0-9]*)[,_]?"
    r"(?:\.(?P<precision>[0-9]+))?[bcdeEfFgGnosxX%]?",
    re.DOTALL,
)


def parse_template(template: str) -> list[TemplatePart]:
    """The template's parts; ValueError naming the problem (pydantic reports it)."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(
            f"prompt template is {len(template)} characters; the limit is {MAX_TEMPLATE_CHARS}"
        )
    shown = template if len(template) <= 80 else template[:77] + "..."
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"prompt template {shown!r} is not valid: {exc}") from None
    parts = []
    for literal, name, format_spec, conversion in parsed:
        if name is None:
            parts.append(TemplatePart(literal, None, "", None))
            continue
        if not name.strip() or name.strip().isdigit():
            raise ValueError(
                f"prompt template {shown!r} has a positional field {{{name}}}; name a "
                "column instead, e.g. {caption}"
            )
        if "{" in (format_spec or ""):
            raise ValueError(f"prompt template {shown!r}: nested fields are not supported")
        _check_format_spec(format_spec or "", name.strip())
        parts.append(TemplatePart(literal, name.strip(), format_spec or "", conversion))
    if sum(p.column is not None for p in parts) > MAX_TEMPLATE_FIELDS:
        raise ValueError(f"prompt template has more than {MAX_TEMPLATE_FIELDS} fields")
    return parts


def _check_format_spec(spec: str, column: str) -> None:
    m = _FORMAT_SPEC_RE.fullmatch(spec)
    if m is None:
        raise ValueError(f"prompt template field {{{column}}} has an invalid format {spec[:40]!r}")
    for part in ("width", "precision"):
        value = m.group(part)
        if value and int(value) > MAX_FORMAT_WIDTH:
            raise ValueError(
                f"prompt template field {{{column}}}: {part} {value[:12]} is over the limit of "
                f"{MAX_FORMAT_WIDTH}"
            )


def template_fields(template: str) -> list[str]:
    """The column names the template's fields use, in order, each once."""
    return list(dict.fromkeys(p.column for p in parse_template(template) if p.column))


def is_empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def fill_template(template: str, cells: Mapping[str, object], *, row: int | None = None) -> str:
    """The template with each field replaced by its column's cell (ManifestError if empty)."""
    return fill_parts(parse_template(template), cells, row)


def fill_parts(parts: Sequence[TemplatePart], cells: Mapping[str, object], row: int | None) -> str:
    out: list[str] = []
    for part in parts:
        out.append(part.literal)
        if part.column is None:
            continue
        value = cells.get(part.column)
        where = f"row {row}" if row is not None else "the row"
        if is_empty(value):
            raise ManifestError(
                f"{where}: column {part.column!r} is empty, and the prompt template needs it"
            )
        if part.conversion == "r":
            value = repr(value)
        elif part.conversion == "a":
            value = ascii(value)
        elif part.conversion == "s":
            value = str(value)
        try:
            out.append(format(value, part.spec))
        except (ValueError, TypeError) as exc:
            raise ManifestError(
                f"{where}: column {part.column!r} value {str(value)[:60]!r} does not fit the "
                f"template's format {part.spec!r}: {exc}"
            ) from None
    return "".join(out).strip()


# --- the spec -----------------------------------------------------------------------------


class AugmentSpec(BaseModel):
    """What to expand: a source manifest, prompts or one template, seeds, n and settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Annotated[str, Field(description="Source manifest URI (CSV/Parquet, local/s3://)")]
    prompts: Annotated[
        list[str] | None, Field(description="Prompts; every source row gets each one")
    ] = None
    prompt_template: Annotated[
        str | None, Field(description="One prompt per row from its columns: '{caption}, oil'")
    ] = None
    seeds: Annotated[list[int], Field(description="Seeds; every prompt gets each one")] = [0]
    n: Annotated[int | None, Field(description="Outputs per request (1 to 10)")] = None
    settings: Annotated[
        dict[str, Any],
        Field(description="Manifest columns for every row: size, output_format, param.X..."),
    ] = {}

    @field_validator("manifest")
    @classmethod
    def _manifest(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the source manifest URI is empty")
        return value.strip()

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("prompts is an empty list")
        cleaned = [p.strip() for p in value]
        for i, p in enumerate(cleaned):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if len(p) > api.MAX_PROMPT_CHARS:
                raise ValueError(
                    f"prompt {i} is {len(p)} characters; the limit is {api.MAX_PROMPT_CHARS}"
                )
        return cleaned

    @field_validator("prompt_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("prompt_template is empty")
        if not template_fields(value):
            raise ValueError(
                f"prompt_template {value!r} names no column; use prompts for a fixed prompt"
            )
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("seeds is an empty list")
        for seed in value:
            if not MIN_SEED <= seed <= MAX_SEED:
                raise ValueError(f"seed {seed} is out of range {MIN_SEED}..{MAX_SEED}")
        repeated = [s for s, k in Counter(value).items() if k > 1]
        if repeated:
            raise ValueError(f"seeds repeat {repeated}; each seed makes one row per prompt")
        return value

    @field_validator("n")
    @classmethod
    def _n(cls, value: int | None) -> int | None:
        if value is not None and not api.MIN_N <= value <= api.MAX_N:
            raise ValueError(f"n {value} is out of range {api.MIN_N}..{api.MAX_N}")
        return value

    @model_validator(mode="after")
    def _one_prompt_source(self) -> AugmentSpec:
        if (self.prompts is None) == (self.prompt_template is None):
            raise ValueError("give exactly one of prompts and prompt_template")
        try:
            check_settings(self.settings, reserved=AUGMENT_RESERVED)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def prompt_count(self) -> int:
        return len(self.prompts) if self.prompts is not None else 1
