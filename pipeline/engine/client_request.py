"""What an edit request sends: its fields as multipart form text and its image parts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pipeline.manifest.types import EditParams
from pipeline.models.profile import SEED, ModelProfile

__all__ = [
    "RESERVED_FIELDS",
    "EditRequest",
    "ImagePart",
    "ResponseFormat",
    "build_files",
    "build_form",
    "fit_request",
    "form_value",
]

# The EditParams fields a model may not take (the others every model takes).
OPTIONAL_PARAM_FIELDS = ("aspect_ratio", "resolution", "quality", "output_compression", "user")

# Form fields the client sets itself; provider extras may not override them.
RESERVED_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "image",
        "image[]",
        "mask",
        "n",
        "size",
        "aspect_ratio",
        "resolution",
        "quality",
        "response_format",
        "output_format",
        "output_compression",
        "seed",
        "user",
    }
)

ResponseFormat = Literal["url", "b64_json"]


@dataclass(frozen=True)
class ImagePart:
    """One uploaded file: the bytes and what to call them in the multipart body."""

    filename: str
    data: bytes
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class EditRequest:
    prompt: str
    images: Sequence[ImagePart]
    mask: ImagePart | None = None
    seed: int | None = None
    params: EditParams = field(default_factory=EditParams)
    response_format: ResponseFormat = "b64_json"


def form_value(value: Any) -> str:
    """How a field travels in multipart form data: JSON for bools, lists and objects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def build_form(request: EditRequest, model: str) -> dict[str, str]:
    """Every request field as form text; `None` fields are not sent."""
    p = request.params
    fields: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "n": p.n,
        "size": p.size,
        "aspect_ratio": p.aspect_ratio,
        "resolution": p.resolution,
        "quality": p.quality,
        "response_format": request.response_format,
        "output_format": p.output_format,
        "output_compression": p.output_compression,
        "seed": request.seed,
        "user": p.user,
    }
    form = {k: form_value(v) for k, v in fields.items() if v is not None}
    for key, value in p.extra.items():
        if key in RESERVED_FIELDS:
            raise ValueError(f"provider extra {key!r} would override a request field")
        if value is not None:
            form[key] = form_value(value)
    return form


def fit_request(request: EditRequest, profile: ModelProfile) -> tuple[EditRequest, tuple[str, ...]]:
    """The request without the fields `profile`'s model does not take, and their names."""
    p = request.params
    dropped: list[str] = []
    seed = request.seed
    if seed is not None and not profile.takes(SEED):
        seed = None
        dropped.append(SEED)
    changes: dict[str, Any] = {}
    for name in OPTIONAL_PARAM_FIELDS:
        if getattr(p, name) is not None and not profile.takes(name):
            changes[name] = None
            dropped.append(name)
    extra = {k: v for k, v in p.extra.items() if profile.takes(k)}
    dropped.extend(k for k in p.extra if k not in extra)
    if not dropped:
        return request, ()
    return replace(request, seed=seed, params=replace(p, extra=extra, **changes)), tuple(dropped)


def build_files(request: EditRequest) -> list[tuple[str, tuple[str, bytes, str]]]:
    """One file is a part named `image`, several are `image[]` parts (as the OpenAI SDK does)."""
    if not request.images:
        raise ValueError("an edit needs at least one image")
    name = "image" if len(request.images) == 1 else "image[]"
    files = [(name, (im.filename, im.data, im.content_type)) for im in request.images]
    if request.mask is not None:
        m = request.mask
        files.append(("mask", (m.filename, m.data, m.content_type)))
    return files
