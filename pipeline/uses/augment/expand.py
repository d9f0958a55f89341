"""Expanding a source manifest into a Parquet manifest: one row per (source row, prompt, seed)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest.cells import MAX_ID_CHARS, CellProblem, is_unset, split_images
from pipeline.manifest.read import RawRow, canonical_name
from pipeline.manifest.rows import KNOWN_COLUMNS, PARAM_PREFIX
from pipeline.manifest.select import RawManifest, row_id
from pipeline.manifest.source_base import SourceBase
from pipeline.uses.augment.spec import (
    AUGMENT_RESERVED,
    AugmentSpec,
    TemplatePart,
    fill_parts,
    is_empty,
    parse_template,
)
from pipeline.uses.catalogue import (
    ROW_OWN_COLUMNS,
    ParquetBatches,
    check_manifest_path,
    check_settings,
    setting_type,
    shorten_id,
    write_parquet_atomically,
)

log = logging.getLogger(__name__)

EXPAND_BATCH_ROWS = 8192
# Source columns copied into every expanded row besides image, images and mask (the edit
# columns but the row's own and `seed`: n, size, output_format... params); `n` is copied
# unless the spec sets it.
CARRIED_COLUMNS: tuple[str, ...] = tuple(
    c for c in KNOWN_COLUMNS if c not in ROW_OWN_COLUMNS and c != "seed"
)
SOURCE_COLUMNS: tuple[str, ...] = ("image", "images", "mask")


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
    if is_unset(value):
        return None
    if column != "images":
        return _resolve(base, str(value).strip())
    try:
        items = split_images(value)
    except CellProblem:
        return str(value).strip()
    resolved = [
        _resolve(base, item.strip()) if isinstance(item, str) and item.strip() else item
        for item in items
    ]
    return json.dumps(resolved, ensure_ascii=False)


def _carried(value: object, to_text: bool) -> object:
    if is_empty(value):
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


@dataclass(frozen=True)
class _Plan:
    """How each source row becomes expanded rows: the columns written, and their values."""

    schema: pa.Schema
    template: list[TemplatePart] | None  # its fields name the manifest's own columns
    source_columns: list[str]  # image, images, mask: paths made absolute
    carried: dict[str, bool]  # carried column -> written as text
    fixed: dict[str, object]  # the settings (and the spec's n) every row gets


def _plan(
    spec: AugmentSpec,
    source: RawManifest,
    settings: Mapping[str, object],
    template: list[TemplatePart] | None,
) -> _Plan:
    columns = source.columns
    if "image" not in columns and "images" not in columns:
        raise ManifestError(
            f"manifest {spec.manifest} has no image or images column; found columns: "
            + ", ".join(columns)
        )
    if template is not None:
        names = [p.column for p in template if p.column]
        fields = _template_columns(names, columns, spec.manifest)
        template = [
            TemplatePart(p.literal, fields[p.column] if p.column else None, p.spec, p.conversion)
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
    schema_fields += list(carried_types.items())
    schema_fields += [(c, setting_type(c, v)) for c, v in settings.items()]
    fixed: dict[str, object] = dict(settings)
    if spec.n is not None:
        fixed["n"] = spec.n
    return _Plan(
        schema=pa.schema(schema_fields),
        template=template,
        source_columns=source_cols,
        carried={c: pa.types.is_string(t) for c, t in carried_types.items()},
        fixed=fixed,
    )


def _expanded_rows(
    item: RawRow, plan: _Plan, spec: AugmentSpec, base: SourceBase
) -> Iterator[dict[str, object]]:
    """The rows one source row becomes: each prompt with each seed."""
    cells = item.cells
    sid = row_id(item.row, cells)
    common: dict[str, object] = {"source_id": sid, "source_row": item.row}
    for c in plan.source_columns:
        common[c] = _source_cell(c, cells.get(c), base)
    for c, to_text in plan.carried.items():
        common[c] = _carried(cells.get(c), to_text)
    common.update(plan.fixed)
    prompts = (
        [fill_parts(plan.template, cells, item.row)]
        if plan.template is not None
        else spec.prompts or []
    )
    for index, prompt in enumerate(prompts):
        for seed in spec.seeds:
            yield {
                **common,
                "id": expanded_id(sid, index, seed),
                "prompt_index": index,
                "prompt": prompt,
                "seed": seed,
            }


def expand_manifest(
    spec: AugmentSpec, out_path: Path | str, *, endpoint_url: str | None = None
) -> ExpandInfo:
    """Write the expanded manifest (see the package doc) to the local Parquet file `out_path`.

    ManifestError when the source manifest cannot be read, lacks image columns, has a ragged
    row, or lacks a cell the template needs; ConfigError when the template names a column
    the manifest does not have. Nothing is left at `out_path` on error.
    """
    check_manifest_path(out_path)
    settings = check_settings(spec.settings, reserved=AUGMENT_RESERVED)
    template = parse_template(spec.prompt_template) if spec.prompt_template else None
    with RawManifest(spec.manifest, endpoint_url=endpoint_url) as source:
        plan = _plan(spec, source, settings, template)
        sources = 0
        with write_parquet_atomically(out_path, plan.schema) as writer:
            out = ParquetBatches(writer, plan.schema, EXPAND_BATCH_ROWS)
            for item in source.rows():
                if not isinstance(item, RawRow):
                    raise ManifestError(
                        f"manifest {spec.manifest}, row {item.row}: "
                        + "; ".join(e.reason for e in item.errors)
                    )
                sources += 1
                for row in _expanded_rows(item, plan, spec, source.base):
                    out.add(row)
            out.flush()
    log.info("expanded %d source rows into %d rows", sources, out.written)
    return ExpandInfo(
        path=Path(out_path).expanduser().absolute(), rows=out.written, sources=sources
    )
