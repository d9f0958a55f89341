"""The models the emulator serves: each one's profile and how it answers.

The built-in profiles (pipeline.models) are served as the client knows them; `emu-flex-edit`
is the emulator's own, a model with no built-in client profile, so a client must read its
`?schema=true`. Any other id the config serves follows p-image-edit's rules under its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from pipeline import spec
from pipeline.models.builtin import BUILTIN, P_IMAGE_EDIT
from pipeline.models.prices import TOKEN_PRICES
from pipeline.models.profile import (
    ASPECT_RATIO,
    ENHANCE_PROMPT,
    ON_OFF,
    OUTPUT_COMPRESSION,
    QUALITY,
    SEED,
    THINKING,
    THINKING_VALUES,
    USER,
    CostRule,
    ModelProfile,
    SizeRule,
)

FLEX_MODEL = "emu-flex-edit"
FLEX_PRICE_USD = 0.02
FLEX = ModelProfile(
    model=FLEX_MODEL,
    max_images=3,
    max_prompt_chars=2000,
    sizes=SizeRule(
        free=(256, 2048),
        multiple_of=16,
        auto=True,
        aspect_ratios=("1:1", "4:3", "3:4", "16:9", "9:16"),
    ),
    output_formats=("png", "jpeg", "webp"),
    max_n=4,
    params=frozenset({SEED, QUALITY, ASPECT_RATIO, OUTPUT_COMPRESSION, USER, THINKING})
    | {ENHANCE_PROMPT},
    enums={QUALITY: ("standard", "hd"), THINKING: THINKING_VALUES, ENHANCE_PROMPT: ON_OFF},
    cost=CostRule(source="metadata", price_per_image_usd=FLEX_PRICE_USD),
    owned_by="emulator",
)

# Output tokens per image by quality, for the two sizes of OpenAI's table (auto: medium).
OUTPUT_TOKENS: dict[str, tuple[int, int]] = {
    "low": (272, 408),
    "medium": (1056, 1584),
    "high": (4160, 6240),
}
IMAGE_TOKENS_BASE = 85
IMAGE_TOKENS_PER_TILE = 170
TILE_SIDE = 512
CHARS_PER_TEXT_TOKEN = 4


@dataclass(frozen=True)
class EmulatedModel:
    profile: ModelProfile
    provider: str
    executed_prefix: str
    usage: bool  # answers report `usage` tokens instead of metadata.cost


def _entries() -> dict[str, EmulatedModel]:
    out = {
        m: EmulatedModel(p, "openai", "openai/", True)
        for m, p in BUILTIN.items()
        if p.cost.source == "tokens"
    }
    out[P_IMAGE_EDIT.model] = EmulatedModel(P_IMAGE_EDIT, "replicate", "replicate/prunaai/", False)
    out[FLEX_MODEL] = EmulatedModel(FLEX, "emulator", "emulator/", False)
    return out


CATALOG: dict[str, EmulatedModel] = _entries()


def emulated(model: str) -> EmulatedModel:
    """How `model` is served: its catalog entry, else p-image-edit's rules under its name."""
    found = CATALOG.get(model)
    if found is not None:
        return found
    base = CATALOG[P_IMAGE_EDIT.model]
    return replace(base, profile=replace(P_IMAGE_EDIT, model=model))


def usage_tokens(
    prompt: str,
    image_dims: list[tuple[int, int]],
    out: tuple[int, int],
    n: int,
    quality: str | None,
) -> dict[str, Any]:
    """A plausible `usage` for an edit: text tokens from the prompt, image tokens per 512 px
    tile of each input, output tokens from OpenAI's table by size and quality, times n."""
    text = max(1, math.ceil(len(prompt) / CHARS_PER_TEXT_TOKEN))
    image = sum(
        IMAGE_TOKENS_BASE
        + IMAGE_TOKENS_PER_TILE * math.ceil(w / TILE_SIDE) * math.ceil(h / TILE_SIDE)
        for w, h in image_dims
    )
    square, oblong = OUTPUT_TOKENS.get((quality or "medium").lower(), OUTPUT_TOKENS["medium"])
    output = (square if out[0] == out[1] else oblong) * n
    return {
        "input_tokens": text + image,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        "output_tokens": output,
        "total_tokens": text + image + output,
    }


def usage_micros(model: str, usage: dict[str, Any]) -> int:
    """What `usage` costs at the price table, in micros (the emulator's own ledger)."""
    details = usage["input_tokens_details"]
    cost = TOKEN_PRICES[model].cost_usd(
        details["text_tokens"], details["image_tokens"], usage["output_tokens"]
    )
    return round(cost * spec.MICROS_PER_USD)
