"""Job keys: the key written field by field is the SHA-256 of the key document's canonical
JSON (what results stored by earlier versions were keyed by), for any prompt and parameters."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from pipeline.engine.jobkey import KEY_HEX_CHARS, KEY_VERSION, KeyFields, canonical_doc, job_key
from pipeline.manifest.types import EditParams

REFERENCE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_doc(fields: KeyFields) -> dict[str, Any]:
    """The key's document as the first versions built it (and hashed its `json`): results
    stored since are found by it."""
    params = fields["params"]
    set_params = {
        "n": params.n,
        "size": params.size,
        "aspect_ratio": params.aspect_ratio,
        "resolution": params.resolution,
        "quality": params.quality,
        "output_format": params.output_format,
        "output_compression": params.output_compression,
    }
    return {
        "v": KEY_VERSION,
        "model": fields["model"],
        "images": list(fields["image_sha256"]),
        "mask": fields["mask_sha256"],
        "prompt": fields["prompt"],
        "seed": fields["seed"],
        "params": {k: v for k, v in set_params.items() if v is not None},
        "extra": params.extra,
    }


PROMPTS = [
    "a starry sky",
    'say "SALE" \\ now',
    "line\nbreak\ttab\x00nul\x1f\x7f",
    "café ünïcödé 日本語 🚀 \u2028\u2029",
    "",
    " padded ",
]
EXTRAS: list[dict[str, Any]] = [
    {},
    {"turbo": True},
    {"b": [1, 2.5, None], "a": {"z": "é", "y": False}},
    {"x": 1e300},
]


def _random_params(rnd: random.Random) -> EditParams:
    def maybe(*values: object) -> object:
        return rnd.choice([None, *values])

    return EditParams(
        n=maybe(1, 4),  # type: ignore[arg-type]
        size=maybe("1024x1024", "auto"),  # type: ignore[arg-type]
        aspect_ratio=maybe("16:9"),  # type: ignore[arg-type]
        resolution=maybe("1MP"),  # type: ignore[arg-type]
        quality=maybe("high", "low"),  # type: ignore[arg-type]
        output_format=maybe("png", "jpeg"),  # type: ignore[arg-type]
        output_compression=maybe(0, 100),  # type: ignore[arg-type]
        user=maybe("u1"),  # type: ignore[arg-type]
        extra=dict(rnd.choice(EXTRAS)),
    )


def test_the_key_is_the_hash_of_the_documents_canonical_json() -> None:
    rnd = random.Random(5)
    seen = set()
    for _ in range(2000):
        fields: KeyFields = {
            "model": rnd.choice(["p-image-edit", "gpt-image-1", "modèle/ü"]),
            "image_sha256": [
                hashlib.sha256(bytes([rnd.randrange(256)])).hexdigest()
                for _ in range(rnd.randint(1, 3))
            ],
            "mask_sha256": rnd.choice([None, hashlib.sha256(b"m").hexdigest()]),
            "prompt": rnd.choice(PROMPTS),
            "seed": rnd.choice([None, 0, 42, 2**63 - 1]),
            "params": _random_params(rnd),
        }
        reference = REFERENCE.encode(key_doc(fields))
        assert canonical_doc(**fields) == reference
        key = job_key(**fields)
        assert key == hashlib.sha256(reference.encode("utf-8")).hexdigest()[:KEY_HEX_CHARS]
        seen.add(key)
    assert len(seen) > 1000  # the fields chosen do change the key
