"""Content-derived job keys: the same edit of the same bytes always lands at the same key."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from typing import TypedDict, Unpack

from pipeline.manifest.types import EditParams

# Bump when the key's inputs change meaning, so old results are not taken for new ones.
KEY_VERSION = 1
KEY_HEX_CHARS = 32  # 128 bits: collisions are not a practical concern at any catalogue size
# One encoder for every key: `json.dumps` with these options builds a new JSONEncoder per
# call, about a tenth of a key's cost when a resume computes a million. Same output.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# A JSON string as `_CANONICAL` writes one (the C encoder with ensure_ascii off).
_string = json.encoder.encode_basestring


class KeyFields(TypedDict):
    """Everything that determines an edit's result."""

    model: str
    image_sha256: Sequence[str]
    mask_sha256: str | None
    prompt: str
    seed: int | None
    params: EditParams


def job_key(**fields: Unpack[KeyFields]) -> str:
    """Hash of everything that determines the result: model, source bytes, prompt, seed, params.

    `user` is left out (it labels the caller, it does not change the image); so is the
    response format (how the bytes travel, not what they are).
    """
    return key_of(_head(fields), fields["prompt"], fields["seed"])


def canonical_doc(**fields: Unpack[KeyFields]) -> str:
    """The key's document as canonical JSON (sorted keys, no spaces, UTF-8 as is): `{"extra":
    params.extra, "images": [...], "mask": ..., "model": ..., "params": {the set ones of n,
    size, aspect_ratio, resolution, quality, output_format, output_compression}, "prompt":
    ..., "seed": ..., "v": KEY_VERSION}`, what `json` writes of it (tests/test_jobkey.py holds
    the two equal), written field by field: `json` walking a dict took half of a resume's
    per-row time."""
    return _doc(_head(fields), fields["prompt"], fields["seed"])


def key_head(
    *, model: str, image_sha256: Sequence[str], mask_sha256: str | None, params: EditParams
) -> str:
    """The key's document up to its prompt: every field but the prompt and the seed sorts
    before them, so rows with the same sources, mask, model and params share it (a chunk of
    a resume makes it once, then `key_of` each row's prompt and seed)."""
    extra = _CANONICAL.encode(params.extra) if params.extra else "{}"
    images = ",".join([_string(sha) for sha in image_sha256])
    mask = "null" if mask_sha256 is None else _string(mask_sha256)
    params_json = _params_json(
        params.aspect_ratio,
        params.n,
        params.output_compression,
        params.output_format,
        params.quality,
        params.resolution,
        params.size,
    )
    return (
        f'{{"extra":{extra},"images":[{images}],"mask":{mask},"model":{_string(model)},'
        f'"params":{params_json},"prompt":'
    )


def key_of(head: str, prompt: str, seed: int | None) -> str:
    """The job key of a document's `key_head` and a row's prompt and seed."""
    doc = _doc(head, prompt, seed)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]


def _head(fields: KeyFields) -> str:
    return key_head(
        model=fields["model"],
        image_sha256=fields["image_sha256"],
        mask_sha256=fields["mask_sha256"],
        params=fields["params"],
    )


def _doc(head: str, prompt: str, seed: int | None) -> str:
    return f'{head}{_string(prompt)},"seed":{_int(seed)},"v":{KEY_VERSION}}}'


def _int(value: int | None) -> str:
    if type(value) is int:
        return int.__repr__(value)  # what json writes for an int
    return _CANONICAL.encode(value)


@functools.lru_cache(maxsize=1024, typed=True)
def _params_json(
    aspect_ratio: str | None,
    n: int | None,
    output_compression: int | None,
    output_format: str | None,
    quality: str | None,
    resolution: str | None,
    size: str | None,
) -> str:
    """The key's `params` object (its fields in sorted order, unset ones left out); a run's
    rows share a few of them."""
    fields = {
        "aspect_ratio": aspect_ratio,
        "n": n,
        "output_compression": output_compression,
        "output_format": output_format,
        "quality": quality,
        "resolution": resolution,
        "size": size,
    }
    return _CANONICAL.encode({k: v for k, v in fields.items() if v is not None})
