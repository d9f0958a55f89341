"""Dataset augmentation: expand images x prompts x seeds into a manifest, then tabulate outputs.

`expand_manifest` streams a source manifest (CSV or Parquet, local or S3; it needs `image` or
`images`, `id` is optional) and writes a Parquet manifest with one row per (source row,
prompt, seed), in that order:

- `id`: `<source_id>--p<prompt_index>--s<seed>` (a long source id is shortened, see
  pipeline.uses.catalogue.shorten_id, so the id stays within the manifest's 256 characters);
- `source_id` (the source row's id, or `row-<n>`), `source_row` (its 1-based row number),
  `prompt_index` (0-based in `prompts`; always 0 for a template);
- `image` / `images` / `mask` as in the source, relative paths made absolute (against the
  source manifest's location) so the expanded manifest works wherever it is written;
  `images` is written as a JSON array;
- `prompt`: the spec's prompt, or the template filled from the source row;
- `seed`: the spec's seed; `n`: the spec's `n` (else the source's, if it has the column);
- the source's other edit columns (`size`, `output_format`, `param.*`, ...) carried over, and
  the spec's `settings`, which win over them. The source's `prompt` and `seed` are replaced
  (a template can still use them: `{prompt}`); its other columns are only for the template.

A template is a Python format string whose fields are column names: `"{caption}, in the
style of {style}"`, `"{caption!r:.40}"`. A field names a column whole (`{param.turbo}` is that
column; there is no attribute or index access). A template naming a column the manifest lacks
is an error before anything is written; an empty cell it needs is an error naming the row.
A filled prompt longer than the API allows makes that row invalid when it runs, as usual.

`write_dataset_table` turns the run's results table (plus the expanded manifest, for the
source ids) into the augmented dataset: a Parquet file with one row per OUTPUT image (a job
with n variants gives n rows), loadable with `pandas.read_parquet` or `datasets`'s Parquet
loader. Its columns (DATASET_SCHEMA):

- `row` (int64), `id`: the manifest row and its id;
- `source_id`, `prompt_index` (int64, null without an expanded manifest): which source and
  which prompt of the spec;
- `source_uri`: the edited source image; `source_uris` (list<string>): it and any references;
- `prompt`, `seed` (int64);
- `variant` (int32): 0-based index of the output within its job (0..n-1);
- `output_uri`: the result image (absolute local path or s3:// URI);
- `width`, `height` (int32), `format` (png, jpeg, webp...): of the result image;
- `revised_prompt`: the provider's rewrite of the prompt, when it made one;
- `cost` (float64, USD): what THIS run paid for the image (the job's cost / its outputs);
  0.0 for an image an earlier run made, or another row of this run made;
- `job_key`, `sidecar_uri`: the job and its JSON sidecar (full request and response);
- `status`: `succeeded` (edited in this run), `done` (an earlier run's result, read from its
  sidecar), `duplicate` (the same job as another row of this run).

Rows that failed, were invalid, or were skipped without a result are left out (DatasetInfo
counts them). The width, height and format of a `succeeded` or `duplicate` row come from the
results table (every output of one request has the same size); a `done` row's come from its
sidecar, one read per job.
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline import spec as api
from pipeline.engine.results import SKIP_DONE, SKIP_DUPLICATE
from pipeline.errors import ConfigError, ImgEditError, ManifestError
from pipeline.io.s3 import is_s3_uri, parse_s3_uri
from pipeline.io.storage import open_storage
from pipeline.manifest.read import RawRow, canonical_name
from pipeline.manifest.rows import MAX_ID_CHARS, MAX_SEED, MIN_SEED, PARAM_PREFIX, SourceBase
from pipeline.manifest.select import RawManifest, row_id
from pipeline.uses.catalogue import (
    ROW_OWN_COLUMNS,
    ParquetBatches,
    UriReader,
    check_manifest_path,
    check_settings,
    iter_parquet_batches,
    setting_type,
    shorten_id,
    write_parquet_atomically,
)

log = logging.getLogger(__name__)

__all__ = [
    "DATASET_SCHEMA",
    "AugmentSpec",
    "DatasetInfo",
    "ExpandInfo",
    "expand_manifest",
    "expanded_id",
    "fill_template",
    "template_fields",
    "write_dataset_table",
]

EXPAND_BATCH_ROWS = 8192
DATASET_READ_ROWS = 4096
# Parallel sidecar reads for `done` rows (S3 latency, not CPU, is what they wait on).
SIDECAR_READ_WORKERS = 16
# Source columns copied into every expanded row besides image, images and mask; `n` is
# copied unless the spec sets it.
CARRIED_COLUMNS: tuple[str, ...] = (
    "n",
    "size",
    "aspect_ratio",
    "resolution",
    "output_format",
    "output_compression",
    "quality",
    "user",
    "params",
)
SOURCE_COLUMNS: tuple[str, ...] = ("image", "images", "mask")
# Settings may not set what each expanded row sets from the source or the spec.
AUGMENT_RESERVED: frozenset[str] = ROW_OWN_COLUMNS | frozenset({"seed", "n"})

DATASET_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("prompt_index", pa.int64()),
        pa.field("source_uri", pa.string()),
        pa.field("source_uris", pa.list_(pa.string())),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("variant", pa.int32(), nullable=False),
        pa.field("output_uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("revised_prompt", pa.string()),
        pa.field("cost", pa.float64()),
        pa.field("job_key", pa.string()),
        pa.field("sidecar_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
    ]
)
DATASET_STATUSES: tuple[str, ...] = ("succeeded", "done", "duplicate")
_RESULT_COLUMNS: tuple[str, ...] = (
    "row",
    "id",
    "status",
    "reason",
    "prompt",
    "seed",
    "source_uris",
    "output_uris",
    "sidecar_uri",
    "actual_size",
    "output_format",
    "revised_prompt",
    "cost",
    "job_key",
)
_MANIFEST_COLUMNS: tuple[str, ...] = ("id", "source_id", "prompt_index")


# --- templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
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


def _parse_template(template: str) -> list[_Part]:
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
            parts.append(_Part(literal, None, "", None))
            continue
        if not name.strip() or name.strip().isdigit():
            raise ValueError(
                f"prompt template {shown!r} has a positional field {{{name}}}; name a "
                "column instead, e.g. {caption}"
            )
        if "{" in (format_spec or ""):
            raise ValueError(f"prompt template {shown!r}: nested fields are not supported")
        _check_format_spec(format_spec or "", name.strip())
        parts.append(_Part(literal, name.strip(), format_spec or "", conversion))
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
    return list(dict.fromkeys(p.column for p in _parse_template(template) if p.column))


def _is_empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return isinstance(value, float) and math.isnan(value)


def fill_template(template: str, cells: Mapping[str, object], *, row: int | None = None) -> str:
    """The template with each field replaced by its column's cell (ManifestError if empty)."""
    return _fill(_parse_template(template), cells, row)


def _fill(parts: Sequence[_Part], cells: Mapping[str, object], row: int | None) -> str:
    out: list[str] = []
    for part in parts:
        out.append(part.literal)
        if part.column is None:
            continue
        value = cells.get(part.column)
        where = f"row {row}" if row is not None else "the row"
        if _is_empty(value):
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


@dataclass(frozen=True)
class ExpandInfo:
    """The expanded manifest: where, its rows, and the source rows it came from."""

    path: Path
    rows: int
    sources: int


def expanded_id(source_id: str, prompt_index: int, seed: int) -> str:
    suffix = f"--p{prompt_index}--s{seed}"
    return shorten_id(source_id, MAX_ID_CHARS - len(suffix)) + suffix


def _plain_type(t: pa.DataType) -> pa.DataType:
    """A carried column's type as written: dictionaries decoded, structs (params) as JSON."""
    if pa.types.is_dictionary(t):
        return _plain_type(t.value_type)
    if pa.types.is_struct(t) or pa.types.is_null(t):
        return pa.string()
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    return t


def _resolve(base: SourceBase, text: str) -> str:
    try:
        return base.resolve(text)
    except ValueError:
        return text  # not a usable source: the run reports it for this row, with the reason


def _source_cell(column: str, value: object, base: SourceBase) -> str | None:
    """An image, images or mask cell with relative paths made absolute; bad ones kept as is."""
    if _is_empty(value) or (isinstance(value, list | tuple) and not value):
        return None
    if column != "images":
        return _resolve(base, str(value).strip())
    items: object
    if isinstance(value, list | tuple):
        items = list(value)
    else:
        text = str(value).strip()
        if text.startswith("["):
            try:
                items = json.loads(text)
            except ValueError:
                return text
        else:
            items = [part.strip() for part in text.split("|")]
    if not isinstance(items, list):
        return str(value)
    resolved = [
        _resolve(base, item.strip()) if isinstance(item, str) and item.strip() else item
        for item in items
    ]
    return json.dumps(resolved, ensure_ascii=False)


def _carried(value: object, to_text: bool) -> object:
    if _is_empty(value):
        return None
    if to_text and isinstance(value, Mapping | list | tuple):
        # A Parquet struct or list written into a text column: its JSON, as `params` takes.
        return json.dumps(value if isinstance(value, Mapping) else list(value), sort_keys=True)
    return value


def _template_columns(fields: Sequence[str], columns: Sequence[str], uri: str) -> dict[str, str]:
    """Each template field's column in the manifest (exact name, else the canonical one)."""
    found: dict[str, str] = {}
    for name in fields:
        if name in columns:
            found[name] = name
            continue
        canonical = canonical_name(name)
        if canonical is not None and canonical in columns:
            found[name] = canonical
            continue
        lowered = {c.lower(): c for c in columns}
        hint = lowered.get(name.lower())
        extra = f" (did you mean {hint!r}?)" if hint else ""
        raise ConfigError(
            f"the prompt template uses the column {name!r}, which manifest {uri} does not "
            f"have{extra}; its columns are: {', '.join(columns)}"
        )
    return found


def expand_manifest(
    spec: AugmentSpec, out_path: Path | str, *, endpoint_url: str | None = None
) -> ExpandInfo:
    """Write the expanded manifest (see the module doc) to the local Parquet file `out_path`.

    ManifestError when the source manifest cannot be read, lacks image columns, has a ragged
    row, or lacks a cell the template needs; ConfigError when the template names a column
    the manifest does not have. Nothing is left at `out_path` on error.
    """
    check_manifest_path(out_path)
    settings = check_settings(spec.settings, reserved=AUGMENT_RESERVED)
    template = _parse_template(spec.prompt_template) if spec.prompt_template else None
    prompts = spec.prompts or []
    with RawManifest(spec.manifest, endpoint_url=endpoint_url) as source:
        columns = source.columns
        if "image" not in columns and "images" not in columns:
            raise ManifestError(
                f"manifest {spec.manifest} has no image or images column; found columns: "
                + ", ".join(columns)
            )
        fields: dict[str, str] = {}
        if template is not None:
            names = [p.column for p in template if p.column]
            fields = _template_columns(names, columns, spec.manifest)
            template = [
                _Part(p.literal, fields[p.column] if p.column else None, p.spec, p.conversion)
                for p in template
            ]
        source_cols = [c for c in SOURCE_COLUMNS if c in columns]
        carried = [
            c
            for c in columns
            if (c in CARRIED_COLUMNS or c.startswith(PARAM_PREFIX))
            and c not in settings
            and not (c == "n" and spec.n is not None)
        ]
        schema_fields: list[tuple[str, pa.DataType]] = [
            ("id", pa.string()),
            ("source_id", pa.string()),
            ("source_row", pa.int64()),
            ("prompt_index", pa.int64()),
        ]
        schema_fields += [(c, pa.string()) for c in source_cols]
        schema_fields += [("prompt", pa.string()), ("seed", pa.int64())]
        if spec.n is not None:
            schema_fields.append(("n", pa.int64()))
        carried_types = {c: _plain_type(source.types[c]) for c in carried}
        text_columns = {c: pa.types.is_string(t) for c, t in carried_types.items()}
        schema_fields += list(carried_types.items())
        schema_fields += [(c, setting_type(c, v)) for c, v in settings.items()]
        schema = pa.schema(schema_fields)
        fixed: dict[str, object] = dict(settings)
        if spec.n is not None:
            fixed["n"] = spec.n

        sources = 0
        with write_parquet_atomically(out_path, schema) as writer:
            out = ParquetBatches(writer, schema, EXPAND_BATCH_ROWS)
            for item in source.rows():
                if not isinstance(item, RawRow):
                    raise ManifestError(
                        f"manifest {spec.manifest}, row {item.row}: "
                        + "; ".join(e.reason for e in item.errors)
                    )
                cells = item.cells
                sources += 1
                sid = row_id(item.row, cells)
                common: dict[str, object] = {"source_id": sid, "source_row": item.row}
                for c in source_cols:
                    common[c] = _source_cell(c, cells.get(c), source.base)
                for c in carried:
                    common[c] = _carried(cells.get(c), text_columns[c])
                common.update(fixed)
                row_prompts = (
                    [_fill(template, cells, item.row)] if template is not None else prompts
                )
                for index, prompt in enumerate(row_prompts):
                    for seed in spec.seeds:
                        out.add(
                            {
                                **common,
                                "id": expanded_id(sid, index, seed),
                                "prompt_index": index,
                                "prompt": prompt,
                                "seed": seed,
                            }
                        )
            out.flush()
    log.info("expanded %d source rows into %d rows", sources, out.written)
    return ExpandInfo(
        path=Path(out_path).expanduser().absolute(), rows=out.written, sources=sources
    )


# --- the dataset table --------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """The dataset table written: where, its rows (images), and what each result row gave."""

    uri: str
    rows: int
    jobs: int
    by_status: dict[str, int] = field(default_factory=dict)  # images by dataset status
    excluded: int = 0  # result rows without an image: failed, invalid, not run
    missing_sidecars: int = 0  # `done` rows whose sidecar could not be read


def _manifest_rows(path: Path | str | None, reader: UriReader) -> Iterator[dict[str, Any]]:
    """The expanded manifest's rows in order, numbered from 1 (id, source_id, prompt_index)."""
    if path is None:
        return
    number = 0
    for batch in iter_parquet_batches(path, reader, DATASET_READ_ROWS, _MANIFEST_COLUMNS):
        for record in batch.to_pylist():
            number += 1
            record["row"] = number
            yield record


def _size(text: str | None) -> tuple[int | None, int | None]:
    if not text or "x" not in text:
        return None, None
    w, _, h = text.partition("x")
    return (int(w), int(h)) if w.isdigit() and h.isdigit() else (None, None)


def _sidecar_outputs(reader: UriReader, uri: str | None) -> list[dict[str, Any]] | None:
    if not uri:
        return None
    try:
        doc = json.loads(reader.read(uri))
        outputs = doc["outputs"]
        return [
            {
                "output_uri": str(o["uri"]),
                "width": o.get("width"),
                "height": o.get("height"),
                "format": o.get("format"),
                "revised_prompt": o.get("revised_prompt") or doc.get("revised_prompt"),
            }
            for o in outputs
        ]
    except (ImgEditError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read the outputs of sidecar %s: %s", uri, exc)
        return None


def _result_outputs(r: dict[str, Any]) -> list[dict[str, Any]]:
    width, height = _size(r["actual_size"])
    return [
        {
            "output_uri": uri,
            "width": width,
            "height": height,
            "format": r["output_format"],
            "revised_prompt": r["revised_prompt"],
        }
        for uri in r["output_uris"] or []
    ]


def _dataset_status(r: dict[str, Any]) -> str | None:
    if r["status"] == "succeeded":
        return "succeeded"
    if r["status"] == "skipped" and r["reason"] == SKIP_DONE:
        return "done"
    if r["status"] == "skipped" and r["reason"] == SKIP_DUPLICATE and r["output_uris"]:
        return "duplicate"
    return None


def write_dataset_table(
    results: pa.Table | Path | str,
    expanded_manifest: Path | str | None,
    out: Path | str,
    *,
    endpoint_url: str | None = None,
    reader: UriReader | None = None,
) -> DatasetInfo:
    """Write the augmented dataset table (DATASET_SCHEMA) to a local path or s3:// URI.

    `results` is a run's results table (a pyarrow Table, or its Parquet file: local path or
    s3:// URI); `expanded_manifest` the manifest that run ran (for source ids and prompt
    indexes; None uses the row id as the source id). ConfigError when the two do not match.
    """
    own_reader = reader is None
    uri_reader = reader or UriReader(endpoint_url=endpoint_url)
    out_text = str(out)
    to_s3 = is_s3_uri(out_text)
    local_out = Path(tempfile.mkdtemp(prefix="imgedit-dataset-")) / "dataset.parquet"
    if not to_s3:
        local_out = Path(out_text)
    info = DatasetInfo(uri=out_text, rows=0, jobs=0)
    status_counts: Counter[str] = Counter()
    try:
        manifest_rows = _manifest_rows(expanded_manifest, uri_reader)
        current: dict[str, Any] | None = None
        previous_row = 0
        with (
            ThreadPoolExecutor(SIDECAR_READ_WORKERS, thread_name_prefix="imgedit-sidecar") as pool,
            write_parquet_atomically(local_out, DATASET_SCHEMA) as writer,
        ):
            table_out = ParquetBatches(writer, DATASET_SCHEMA, DATASET_READ_ROWS)
            for batch in iter_parquet_batches(
                results, uri_reader, DATASET_READ_ROWS, _RESULT_COLUMNS
            ):
                records = batch.to_pylist()
                kept: list[tuple[dict[str, Any], str, dict[str, Any] | None]] = []
                for r in records:
                    if r["row"] <= previous_row:
                        raise ConfigError("the results table is not in row order")
                    previous_row = r["row"]
                    m: dict[str, Any] | None = None
                    if expanded_manifest is not None:
                        while current is None or current["row"] < r["row"]:
                            current = next(manifest_rows, None)
                            if current is None:
                                raise ConfigError(
                                    f"the results have row {r['row']}, which manifest "
                                    f"{expanded_manifest} does not"
                                )
                        m = current
                        if current["row"] != r["row"] or (
                            r["id"] is not None and current["id"] != r["id"]
                        ):
                            raise ConfigError(
                                f"the results do not belong to manifest {expanded_manifest}: "
                                f"row {r['row']} is {r['id']!r} in the results and "
                                f"{current['id']!r} in the manifest"
                            )
                    status = _dataset_status(r)
                    if status is None:
                        info.excluded += 1
                        continue
                    kept.append((r, status, m))
                done_uris = [r["sidecar_uri"] for r, s, _ in kept if s == "done"]
                sidecars = dict(
                    zip(
                        done_uris,
                        pool.map(lambda u: _sidecar_outputs(uri_reader, u), done_uris),
                        strict=True,
                    )
                )
                for r, status, m in kept:
                    if status == "done":
                        outputs = sidecars.get(r["sidecar_uri"])
                        if outputs is None:
                            info.missing_sidecars += 1
                            continue
                    else:
                        outputs = _result_outputs(r)
                    info.jobs += 1
                    sources = list(r["source_uris"] or [])
                    paid = r["cost"] if status == "succeeded" and r["cost"] is not None else 0.0
                    for variant, o in enumerate(outputs):
                        table_out.add(
                            {
                                "row": r["row"],
                                "id": r["id"],
                                "source_id": m["source_id"] if m else r["id"],
                                "prompt_index": m["prompt_index"] if m else None,
                                "source_uri": sources[0] if sources else None,
                                "source_uris": sources,
                                "prompt": r["prompt"],
                                "seed": r["seed"],
                                "variant": variant,
                                "cost": round(paid / len(outputs), 9),
                                "job_key": r["job_key"],
                                "sidecar_uri": r["sidecar_uri"],
                                "status": status,
                                **o,
                            }
                        )
                        status_counts[status] += 1
            table_out.flush()
            info.rows = table_out.written
        if to_s3:
            loc = parse_s3_uri(out_text)
            storage = open_storage(f"s3://{loc.bucket}", endpoint_url=endpoint_url)
            info.uri = storage.put_file(loc.key, local_out, "application/vnd.apache.parquet")
        else:
            info.uri = str(local_out.expanduser().absolute())
    finally:
        if to_s3:
            local_out.unlink(missing_ok=True)
            local_out.parent.rmdir()
        if own_reader:
            uri_reader.close()
    info.by_status = {s: status_counts.get(s, 0) for s in DATASET_STATUSES}
    if info.missing_sidecars:
        log.warning("%d done rows left out: their sidecars are unreadable", info.missing_sidecars)
    return info
