"""An answer's `usage` (token counts) read and capped, and the cost it means at the model's
token prices: how the gpt-image family reports what an edit cost."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.constants import MAX_USAGE_TOKENS
from pipeline.models.prices import TokenPrices


@dataclass(frozen=True)
class Usage:
    """Token counts of one answer, each an int in 0..MAX_USAGE_TOKENS."""

    text_input: int
    image_input: int
    output: int

    def as_dict(self) -> dict[str, int]:
        return {
            "text_input_tokens": self.text_input,
            "image_input_tokens": self.image_input,
            "output_tokens": self.output,
        }

    def cost_usd(self, prices: TokenPrices) -> float:
        return prices.cost_usd(self.text_input, self.image_input, self.output)


def _count(value: Any) -> int | None:
    """A token count: a non-negative whole number under the cap, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and (not math.isfinite(value) or not value.is_integer()):
        return None
    number = int(value)
    return number if 0 <= number <= MAX_USAGE_TOKENS else None


def read_usage(usage: Any, warnings: list[str]) -> Usage | None:
    """`usage` as token counts, or None (with a warning when it was there but unusable).

    Input tokens not broken down into text and image are counted as image tokens, the
    dearer kind: a cost from them is never under the price.
    """
    if usage is None:
        return None
    if not isinstance(usage, Mapping):
        warnings.append("usage is not an object: not used")
        return None
    total_in = _count(usage.get("input_tokens"))
    output = _count(usage.get("output_tokens"))
    if total_in is None or output is None:
        warnings.append(
            f"usage has no usable input_tokens and output_tokens (0..{MAX_USAGE_TOKENS}): not used"
        )
        return None
    details = usage.get("input_tokens_details")
    text = image = None
    if isinstance(details, Mapping):
        text = _count(details.get("text_tokens"))
        image = _count(details.get("image_tokens"))
    text = text or 0
    image = image if image is not None else max(total_in - text, 0)
    if text + image < total_in:
        image = total_in - text
    return Usage(text_input=text, image_input=image, output=output)
