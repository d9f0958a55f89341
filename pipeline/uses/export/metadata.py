"""A sample's metadata: the results table's columns as they are, plus what the sample adds."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from pipeline.engine.results import RESULTS_SCHEMA

__all__ = [
    "IMAGE_COLUMN",
    "METADATA_SCHEMA",
    "RESULT_COLUMNS",
    "SOURCE_COLUMN",
    "hf_features",
    "sample_metadata",
]

# Columns of the results table every sample carries, with the table's values unchanged.
# `cost` is the row's (every image of an n>1 row); `actual_size` the first image's.
RESULT_COLUMNS: tuple[str, ...] = (
    "row",
    "id",
    "job_key",
    "prompt",
    "seed",
    "source_uris",
    "sidecar_uri",
    "n_requested",
    "n_outputs",
    "requested_size",
    "actual_size",
    "output_format",
    "revised_prompt",
    "cost",
    "currency",
    "request_id",
    "provider",
)
# What each sample adds: which image of the row it is, where it is stored, its measured size.
_SAMPLE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("run_id", pa.string()),
    pa.field("key", pa.string()),
    pa.field("image_index", pa.int32()),
    pa.field("output_uri", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("sha256", pa.string()),
)
METADATA_SCHEMA = pa.schema(
    [
        *(RESULTS_SCHEMA.field(name).with_nullable(True) for name in RESULT_COLUMNS),
        *_SAMPLE_FIELDS,
    ]
)
# The image column of a Parquet export, as Hugging Face `datasets` stores an `Image`.
IMAGE_COLUMN = "image"
SOURCE_COLUMN = "source_image"
IMAGE_STRUCT = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])


def sample_metadata(
    result: dict[str, Any],
    *,
    run_id: str,
    key: str,
    index: int,
    uri: str,
    width: int,
    height: int,
    sha256: str,
) -> dict[str, Any]:
    """The metadata of image `index` of a result row (a dict of the results table's row)."""
    meta = {name: result.get(name) for name in RESULT_COLUMNS}
    meta.update(
        run_id=run_id,
        key=key,
        image_index=index,
        output_uri=uri,
        width=width,
        height=height,
        sha256=sha256,
    )
    return meta


def _feature(typ: pa.DataType) -> dict[str, Any]:
    if pa.types.is_list(typ):
        return {"feature": _feature(typ.value_type), "_type": "Sequence"}
    if pa.types.is_struct(typ) and typ == IMAGE_STRUCT:
        return {"_type": "Image"}
    return {"dtype": _VALUE_DTYPES[typ], "_type": "Value"}


_VALUE_DTYPES: dict[pa.DataType, str] = {
    pa.string(): "string",
    pa.int64(): "int64",
    pa.int32(): "int32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
}


def hf_features(schema: pa.Schema) -> bytes:
    """The `huggingface` schema metadata saying each column's feature (the image columns are
    `Image`), so `datasets.load_dataset("parquet", ...)` decodes them as images."""
    features = {f.name: _feature(f.type) for f in schema}
    return json.dumps({"info": {"features": features}}).encode()
