"""A model profile as data: inputs, sizes, formats, parameters, answers, where cost comes from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pipeline import spec
from pipeline.models.prices import TokenPrices

# The optional request fields a profile may or may not take (besides prompt, image, n and
# output_format, which every model takes). Fields with a manifest column of their own...
SEED = "seed"
QUALITY = "quality"
ASPECT_RATIO = "aspect_ratio"
RESOLUTION = "resolution"
OUTPUT_COMPRESSION = "output_compression"
USER = "user"
MASK = "mask"
# ...and fields that travel as provider extras (`params`, `param.<name>`).
BACKGROUND = "background"
INPUT_FIDELITY = "input_fidelity"
THINKING = "thinking"
ENHANCE_PROMPT = "enhance_prompt"
MODERATION = "moderation"
COLUMN_PARAMS: tuple[str, ...] = (SEED, QUALITY, ASPECT_RATIO, RESOLUTION, OUTPUT_COMPRESSION, USER)
EXTRA_PARAMS: tuple[str, ...] = (BACKGROUND, INPUT_FIDELITY, THINKING, ENHANCE_PROMPT, MODERATION)
KNOWN_PARAMS: frozenset[str] = frozenset(COLUMN_PARAMS) | frozenset(EXTRA_PARAMS)
# Other spellings the gateway accepts for a field (the name of prompt enhancement is
# unconfirmed: both spellings are read, `enhance_prompt` is sent).
PARAM_ALIASES: dict[str, str] = {
    "thinking_level": THINKING,
    "prompt_enhancement": ENHANCE_PROMPT,
}
# Fields every model takes (checked against the profile's limits, never dropped).
BASE_FIELDS: frozenset[str] = frozenset(
    {"model", "prompt", "image", "image[]", "images", "mask", "n", "size", "output_format"}
    | {"response_format", "stream"}
)
THINKING_VALUES: tuple[str, ...] = ("off", "on", "minimal", "high")
ON_OFF: tuple[str, ...] = ("on", "off")

Origin = Literal["built-in", "schema", "permissive"]
CostSource = Literal["metadata", "per_image", "tokens"]


def canonical_param(name: str) -> str:
    """A field's canonical name: `thinking_level` is `thinking`; others are themselves."""
    key = name.strip().lower()
    return PARAM_ALIASES.get(key, key)


@dataclass(frozen=True)
class SizeRule:
    """Which `size`, `aspect_ratio` and `resolution` values a model takes.

    `nearest`: any `WxH` or `W:H` is mapped to the nearest of `fixed` (p-image-edit);
    otherwise a `WxH` must be one of `fixed`, or within `free` = (min side, max side) when set.
    """

    fixed: tuple[str, ...] = ()
    free: tuple[int, int] | None = None
    max_pixels: int | None = None
    multiple_of: int = 1
    ratios: bool = False  # `W:H` accepted as a size
    nearest: bool = False
    auto: bool = True
    aspect_ratios: tuple[str, ...] = ()  # empty: any W:H (when aspect_ratio is taken)
    tiers: tuple[str, ...] = ()  # empty: any tier (when resolution is taken)

    def describe(self) -> str:
        parts: list[str] = []
        if self.fixed:
            parts.append(("nearest of " if self.nearest else "") + ", ".join(self.fixed))
        if self.free:
            parts.append(f"any WxH, sides {self.free[0]}..{self.free[1]}")
        if not self.fixed and not self.free:
            parts.append("any WxH")
        if self.ratios:
            parts.append("W:H")
        if self.auto:
            parts.append("auto")
        return ", ".join(parts)


@dataclass(frozen=True)
class MaskRule:
    accepted: bool = True
    formats: tuple[str, ...] = ("png",)
    max_bytes: int | None = None
    same_size: bool = True  # the mask is the first image's size


@dataclass(frozen=True)
class CostRule:
    """Where an edit's cost comes from, and the list price a run plans and checks with.

    `metadata`: the answer's `metadata.cost`; `per_image`: `price_per_image_usd` times the
    images (when no cost is reported); `tokens`: the answer's `usage` times `token_prices`.
    `price_per_image_usd` is the estimate per output image and the base of the trust
    ceiling of a reported cost; `price_known` False says it is a guess.
    """

    source: CostSource = "metadata"
    price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD
    token_prices: TokenPrices | None = None
    price_known: bool = True


@dataclass(frozen=True)
class ModelProfile:
    """What one model accepts and how it answers. `origin` says where the profile comes from
    (built in, the gateway's schema, or a permissive guess) and `note` why it is a guess."""

    model: str
    origin: Origin = "built-in"
    note: str | None = None
    min_images: int = spec.MIN_IMAGES
    max_images: int = spec.MAX_IMAGES
    max_prompt_chars: int = spec.MAX_PROMPT_CHARS
    mask: MaskRule = field(default_factory=MaskRule)
    sizes: SizeRule = field(default_factory=SizeRule)
    output_formats: tuple[str, ...] = spec.OUTPUT_FORMATS
    min_n: int = spec.MIN_N
    max_n: int = spec.MAX_N
    # The optional fields of KNOWN_PARAMS it takes; any other is not sent.
    params: frozenset[str] = KNOWN_PARAMS
    # Allowed values of enumerated fields (lower case); a field not here takes any value.
    enums: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    response_formats: tuple[str, ...] = spec.RESPONSE_FORMATS
    # Answers may carry `revised_prompt` (its prompt enhancement, when on).
    revised_prompt: bool = True
    cost: CostRule = field(default_factory=CostRule)
    # Provider extras it is known to take; with `strict_extras`, any other extra is not sent.
    extras: frozenset[str] = frozenset()
    strict_extras: bool = False
    # Output formats `background=transparent` needs (empty: no such rule).
    transparent_formats: tuple[str, ...] = ()
    owned_by: str = "unknown"

    def takes(self, name: str) -> bool:
        """Whether a request field (canonical name, or an extra) is sent to this model."""
        key = canonical_param(name)
        if key in BASE_FIELDS:
            return True
        if key in KNOWN_PARAMS:
            return key in self.params
        return not self.strict_extras or key in self.extras

    @property
    def is_guess(self) -> bool:
        return self.origin != "built-in"

    def limits(self) -> dict[str, str]:
        """The profile for a person, one short text per limit (`imgedit models`)."""
        taken = sorted(p for p in self.params if p != MASK)
        enums = "; ".join(f"{k}: {'/'.join(v)}" for k, v in sorted(self.enums.items()))
        cost = self.cost
        if cost.source == "tokens" and cost.token_prices is not None:
            priced = f"usage tokens x price table ({cost.token_prices.describe()})"
        elif cost.source == "per_image":
            priced = f"USD {cost.price_per_image_usd:g} per image"
        else:
            priced = "metadata.cost"
            if cost.price_known:
                priced += f" (list price USD {cost.price_per_image_usd:g} per image)"
        if not cost.price_known:
            priced += f" (price unknown; estimates use USD {cost.price_per_image_usd:g}/image)"
        return {
            "profile": self.origin + (f" ({self.note})" if self.note else ""),
            "images": f"{self.min_images}..{self.max_images}",
            "mask": "png" if self.mask.accepted else "no",
            "sizes": self.sizes.describe(),
            "output formats": ", ".join(self.output_formats),
            "n": f"{self.min_n}..{self.max_n}",
            "parameters": ", ".join(taken) + (f" ({enums})" if enums else ""),
            "answers": ", ".join(self.response_formats)
            + (", revised_prompt" if self.revised_prompt else ""),
            "cost": priced,
        }


__all__ = [
    "ASPECT_RATIO",
    "BACKGROUND",
    "BASE_FIELDS",
    "COLUMN_PARAMS",
    "ENHANCE_PROMPT",
    "EXTRA_PARAMS",
    "INPUT_FIDELITY",
    "KNOWN_PARAMS",
    "MASK",
    "MODERATION",
    "ON_OFF",
    "OUTPUT_COMPRESSION",
    "PARAM_ALIASES",
    "QUALITY",
    "RESOLUTION",
    "SEED",
    "THINKING",
    "THINKING_VALUES",
    "USER",
    "CostRule",
    "CostSource",
    "MaskRule",
    "ModelProfile",
    "Origin",
    "SizeRule",
    "canonical_param",
]
