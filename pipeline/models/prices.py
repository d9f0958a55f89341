"""Token prices of the models billed by `usage`: one data table, easy to update.

UNCONFIRMED: these are OpenAI's published list prices for its gpt-image models as last read
(USD per million tokens); what the gateway charges through its own metering may differ.
Update the table here (nothing else holds a price), and set `confirmed` once checked
against an invoice. The per-image estimate a run plans its budget with is the worst case:
the largest output (high quality, 1536x1024) and one input image per edit.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKENS_PER_MILLION = 1_000_000
# Output tokens of the largest, highest-quality image (1536x1024, quality=high).
ESTIMATE_OUTPUT_TOKENS_PER_IMAGE = 6240
# Input tokens of one source image at high input fidelity, plus a prompt.
ESTIMATE_IMAGE_INPUT_TOKENS = 6000
ESTIMATE_TEXT_INPUT_TOKENS = 300


@dataclass(frozen=True)
class TokenPrices:
    """USD per million tokens of text input, image input and image output."""

    text_input: float
    image_input: float
    output: float
    confirmed: bool = False

    def cost_usd(self, text_input: int, image_input: int, output: int) -> float:
        return (
            text_input * self.text_input + image_input * self.image_input + output * self.output
        ) / TOKENS_PER_MILLION

    def estimate_per_image_usd(self) -> float:
        """The most one output image should cost (see the module doc)."""
        text, image = ESTIMATE_TEXT_INPUT_TOKENS, ESTIMATE_IMAGE_INPUT_TOKENS
        return self.cost_usd(text, image, ESTIMATE_OUTPUT_TOKENS_PER_IMAGE)

    def describe(self) -> str:
        flag = "" if self.confirmed else ", unconfirmed"
        return (
            f"USD/M tokens: text in {self.text_input:g}, image in {self.image_input:g}, "
            f"out {self.output:g}{flag}"
        )


# The table: model id -> prices. UNCONFIRMED figures (see the module doc).
TOKEN_PRICES: dict[str, TokenPrices] = {
    "gpt-image-1": TokenPrices(text_input=5.0, image_input=10.0, output=40.0),
    "gpt-image-1-mini": TokenPrices(text_input=2.0, image_input=2.5, output=8.0),
    "gpt-image-1.5": TokenPrices(text_input=5.0, image_input=8.0, output=32.0),
}
