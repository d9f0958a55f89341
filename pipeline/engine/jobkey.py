"""Content-derived job keys: the same edit of the same bytes always lands at the same key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pipeline.manifest.types import EditParams

# Bump when the key's inputs change meaning, so old results are not taken for new ones.
KEY_VERSION = 1
KEY_HEX_CHARS = 32  # 128 bits: collisions are not a practical concern at any catalogue size
# One encoder for every key: `json.dumps` with these options builds a new JSONEncoder per
# call, about a tenth of a key's cost when a resume computes a million. Same output.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def job_key(
    *,
    model: str,
    image_sha256: Sequence[str],
    mask_sha256: str | None,
    prompt: str,
    seed: int | None,
    params: EditParams,
) -> str:
    """Hash of everything that determines the result: model, source bytes, prompt, seed, params.

    `user` is left out (it labels the caller, it does not change the image); so is the
    response format (how the bytes travel, not what they are).
    """
    fields: dict[str, Any] = {
        "n": params.n,
        "size": params.size,
        "aspect_ratio": params.aspect_ratio,
        "resolution": params.resolution,
        "quality": params.quality,
        "output_format": params.output_format,
        "output_compression": params.output_compression,
    }
    doc = {
        "v": KEY_VERSION,
        "model": model,
        "images": list(image_sha256),
        "mask": mask_sha256,
        "prompt": prompt,
        "seed": seed,
        "params": {k: v for k, v in fields.items() if v is not None},
        "extra": params.extra,
    }
    canonical = _CANONICAL.encode(doc)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]
