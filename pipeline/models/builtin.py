"""The built-in profiles: p-image-edit (the default) and OpenAI's gpt-image family."""

from __future__ import annotations

from pipeline import spec
from pipeline.models.prices import TOKEN_PRICES
from pipeline.models.profile import (
    BACKGROUND,
    INPUT_FIDELITY,
    KNOWN_PARAMS,
    MODERATION,
    OUTPUT_COMPRESSION,
    QUALITY,
    USER,
    CostRule,
    MaskRule,
    ModelProfile,
    SizeRule,
)

# p-image-edit: today's rules, unchanged. Every field is sent (the gateway passes on what it
# does not map), any `WxH` or `W:H` maps to the nearest of its seven sizes.
P_IMAGE_EDIT = ModelProfile(
    model=spec.DEFAULT_MODEL,
    sizes=SizeRule(
        fixed=tuple(str(s) for s in spec.SUPPORTED_SIZES), ratios=True, nearest=True, auto=True
    ),
    params=KNOWN_PARAMS,
    cost=CostRule(source="metadata", price_per_image_usd=spec.PRICE_PER_IMAGE_USD),
    extras=frozenset({"turbo", "disable_safety_checker", "replicate_weights"}),
    owned_by="prunaai",
)

GPT_IMAGE_MAX_IMAGES = 16
GPT_IMAGE_MAX_PROMPT_CHARS = 32_000
GPT_IMAGE_MASK_MAX_BYTES = 4 * 1024 * 1024
GPT_IMAGE_SIZES: tuple[str, ...] = ("1024x1024", "1536x1024", "1024x1536")
GPT_IMAGE_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")
GPT_IMAGE_ENUMS: dict[str, tuple[str, ...]] = {
    QUALITY: ("low", "medium", "high", "auto"),
    BACKGROUND: ("transparent", "opaque", "auto"),
    INPUT_FIDELITY: ("high", "low"),
    MODERATION: ("auto", "low"),
}


def _gpt_image(model: str, *, input_fidelity: bool = True) -> ModelProfile:
    prices = TOKEN_PRICES[model]
    taken = {QUALITY, BACKGROUND, OUTPUT_COMPRESSION, USER, MODERATION}
    enums = dict(GPT_IMAGE_ENUMS)
    if input_fidelity:
        taken.add(INPUT_FIDELITY)
    else:
        del enums[INPUT_FIDELITY]
    return ModelProfile(
        model=model,
        max_images=GPT_IMAGE_MAX_IMAGES,
        max_prompt_chars=GPT_IMAGE_MAX_PROMPT_CHARS,
        mask=MaskRule(accepted=True, formats=("png",), max_bytes=GPT_IMAGE_MASK_MAX_BYTES),
        sizes=SizeRule(fixed=GPT_IMAGE_SIZES, auto=True),
        output_formats=GPT_IMAGE_FORMATS,
        params=frozenset(taken),
        enums=enums,
        response_formats=("b64_json",),
        revised_prompt=False,
        cost=CostRule(
            source="tokens",
            price_per_image_usd=prices.estimate_per_image_usd(),
            token_prices=prices,
        ),
        strict_extras=True,
        transparent_formats=("png", "webp"),
        owned_by="openai",
    )


BUILTIN: dict[str, ModelProfile] = {
    p.model: p
    for p in (
        P_IMAGE_EDIT,
        _gpt_image("gpt-image-1"),
        _gpt_image("gpt-image-1-mini", input_fidelity=False),
        _gpt_image("gpt-image-1.5"),
    )
}
