"""A model's parameter schema (`GET /models/{id}?schema=true`) to a profile and back.

The gateway's schema shape is undocumented, so it is read defensively: the parameters are the
`schema` member (or `parameters`, `input_schema`), itself a mapping of field names or a JSON
Schema with `properties`; each member is read for `enum`, `minimum`/`maximum`,
`minItems`/`maxItems` and `maxLength` only, every list and number capped (pipeline.constants).
What cannot be read falls back to the permissive value, and the profile says so in `note`.
`profile_to_schema` writes the shape this module reads best (the emulator serves it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline import constants, spec
from pipeline.models.profile import (
    ASPECT_RATIO,
    BASE_FIELDS,
    ENHANCE_PROMPT,
    KNOWN_PARAMS,
    ON_OFF,
    PARAM_ALIASES,
    RESOLUTION,
    CostRule,
    MaskRule,
    ModelProfile,
    SizeRule,
    canonical_param,
)

SCHEMA_KEYS = ("schema", "parameters", "input_schema")


def permissive_profile(model: str, reason: str) -> ModelProfile:
    """What a run may send to a model it knows nothing of: every field, any size form."""
    return ModelProfile(
        model=model,
        origin="permissive",
        note=f"a guess: {reason}",
        max_images=constants.PERMISSIVE_MAX_IMAGES,
        max_prompt_chars=constants.PERMISSIVE_MAX_PROMPT_CHARS,
        sizes=SizeRule(ratios=True, auto=True),
        cost=CostRule(source="metadata", price_known=False),
    )


def _text(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= constants.MAX_SCHEMA_VALUE_CHARS:
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    return None


def _enum(prop: Mapping[str, Any]) -> tuple[str, ...] | None:
    raw = prop.get("enum")
    if raw is None and isinstance(prop.get("items"), Mapping):
        raw = prop["items"].get("enum")
    if not isinstance(raw, list):
        return None
    values = [_text(v) for v in raw[: constants.MAX_SCHEMA_ENUM_VALUES]]
    kept = tuple(dict.fromkeys(v for v in values if v))
    return kept or None


def _int(prop: Mapping[str, Any], keys: tuple[str, ...], low: int, high: int) -> int | None:
    for key in keys:
        value = prop.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            continue
        return max(low, min(high, int(value)))
    return None


def _properties(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for key in SCHEMA_KEYS:
        found = doc.get(key)
        if isinstance(found, Mapping):
            props = found.get("properties")
            return props if isinstance(props, Mapping) else found
    return None


def profile_from_schema(model: str, doc: Any) -> ModelProfile:
    """The profile a `/models/{id}?schema=true` answer describes, or a permissive one."""
    if not isinstance(doc, Mapping):
        return permissive_profile(model, "the schema answer is not a JSON object")
    props = _properties(doc)
    if props is None:
        return permissive_profile(model, "the answer has no parameter schema")
    fields: dict[str, Mapping[str, Any]] = {}
    for name, prop in list(props.items())[: constants.MAX_SCHEMA_PROPERTIES]:
        if isinstance(name, str) and len(name) <= constants.MAX_SCHEMA_VALUE_CHARS:
            fields[canonical_param(name)] = prop if isinstance(prop, Mapping) else {}
    if "prompt" not in fields and not ({"image", "images", "image[]"} & set(fields)):
        return permissive_profile(model, "the schema names neither prompt nor image")
    guessed: list[str] = []
    image = fields.get("image") or fields.get("images") or fields.get("image[]") or {}
    min_images = _int(image, ("minItems", "minimum"), 1, constants.MAX_SCHEMA_IMAGES) or 1
    max_images = _int(image, ("maxItems", "maximum"), 1, constants.MAX_SCHEMA_IMAGES)
    if max_images is None:
        guessed.append("image count")
        max_images = constants.PERMISSIVE_MAX_IMAGES
    prompt = fields.get("prompt", {})
    max_prompt = _int(prompt, ("maxLength",), 1, constants.MAX_SCHEMA_PROMPT_CHARS)
    if max_prompt is None:
        guessed.append("prompt length")
        max_prompt = constants.PERMISSIVE_MAX_PROMPT_CHARS
    n = fields.get("n", {})
    min_n = _int(n, ("minimum",), spec.MIN_N, spec.MAX_N) or spec.MIN_N
    max_n = _int(n, ("maximum",), spec.MIN_N, spec.MAX_N) or spec.MAX_N
    enums: dict[str, tuple[str, ...]] = {}
    params: set[str] = set()
    extras: set[str] = set()
    for name, prop in fields.items():
        if name in BASE_FIELDS:
            continue
        if name in KNOWN_PARAMS:
            params.add(name)
            values = _enum(prop)
            if values and name not in (ASPECT_RATIO, RESOLUTION):
                enums[name] = tuple(v.lower() for v in values)
        else:
            extras.add(name)
    if ENHANCE_PROMPT in params and ENHANCE_PROMPT not in enums:
        enums[ENHANCE_PROMPT] = ON_OFF
    sizes = _sizes(fields, guessed)
    formats = _enum(fields.get("output_format", {}))
    output_formats = tuple(f for f in (formats or ()) if f in spec.OUTPUT_FORMATS)
    if not output_formats:
        guessed.append("output formats")
        output_formats = spec.OUTPUT_FORMATS
    answers = _enum(fields.get("response_format", {}))
    response_formats = tuple(f for f in (answers or ()) if f in spec.RESPONSE_FORMATS)
    if not response_formats:
        response_formats = spec.RESPONSE_FORMATS
    cost = _cost(doc)
    return ModelProfile(
        model=model,
        origin="schema",
        note=("guessed: " + ", ".join(guessed)) if guessed else None,
        min_images=min(min_images, max_images),
        max_images=max_images,
        max_prompt_chars=max_prompt,
        mask=MaskRule(accepted="mask" in fields),
        sizes=sizes,
        output_formats=output_formats,
        min_n=min(min_n, max_n),
        max_n=max_n,
        params=frozenset(params),
        enums=enums,
        response_formats=response_formats,
        revised_prompt=ENHANCE_PROMPT in params,
        cost=cost,
        extras=frozenset(extras),
        strict_extras=False,
        owned_by=_text(doc.get("owned_by")) or "unknown",
    )


def _sizes(fields: Mapping[str, Mapping[str, Any]], guessed: list[str]) -> SizeRule:
    size = fields.get("size")
    if size is None:
        guessed.append("sizes")
        return SizeRule(ratios=True, auto=True)
    values = _enum(size) or ()
    fixed = tuple(f"{p[0]}x{p[1]}" for p in (_pixels(v) for v in values) if p is not None)
    low = _int(size, ("minimum", "minSide", "min_side"), 1, constants.MAX_SCHEMA_SIDE)
    high = _int(size, ("maximum", "maxSide", "max_side"), 1, constants.MAX_SCHEMA_SIDE)
    free = (low or 1, high) if high is not None else None
    multiple = _int(size, ("multipleOf", "multiple_of"), 1, 1024) or 1
    aspect = _enum(fields.get(ASPECT_RATIO, {})) or ()
    tiers = _enum(fields.get(RESOLUTION, {})) or ()
    if not fixed and free is None:
        guessed.append("sizes")
    return SizeRule(
        fixed=fixed,
        free=free,
        multiple_of=multiple,
        ratios=any(":" in v for v in values),
        auto=not values or any(v.lower() == "auto" for v in values),
        aspect_ratios=tuple(a for a in aspect if a.lower() != "auto"),
        tiers=tuple(t for t in tiers if t.lower() != "auto"),
    )


def _pixels(value: str) -> tuple[int, int] | None:
    try:
        return spec.parse_pixels(value)
    except ValueError:
        return None


def _cost(doc: Mapping[str, Any]) -> CostRule:
    pricing = doc.get("pricing")
    price = pricing.get("per_image") if isinstance(pricing, Mapping) else None
    if (
        isinstance(price, int | float)
        and not isinstance(price, bool)
        and math.isfinite(price)
        and 0 <= price <= constants.MAX_SCHEMA_PRICE_USD
    ):
        return CostRule(source="metadata", price_per_image_usd=float(price))
    return CostRule(source="metadata", price_known=False)


def profile_to_schema(profile: ModelProfile) -> dict[str, Any]:
    """The profile as the schema `profile_from_schema` reads (what the emulator serves)."""
    schema: dict[str, Any] = {
        "prompt": {"type": "string", "maxLength": profile.max_prompt_chars, "required": True},
        "image": {"type": "file", "minItems": profile.min_images, "maxItems": profile.max_images},
        "n": {"type": "integer", "minimum": profile.min_n, "maximum": profile.max_n},
        "output_format": {"type": "string", "enum": list(profile.output_formats)},
        "response_format": {"type": "string", "enum": list(profile.response_formats)},
    }
    if profile.mask.accepted:
        schema["mask"] = {"type": "file", "format": "png"}
    rule = profile.sizes
    size: dict[str, Any] = {"type": "string"}
    enum = list(rule.fixed) + (["auto"] if rule.auto else [])
    if enum and not rule.free:
        size["enum"] = enum
    if rule.free:
        size.update(minimum=rule.free[0], maximum=rule.free[1], multipleOf=rule.multiple_of)
    schema["size"] = size
    for name in sorted(profile.params):
        prop: dict[str, Any] = {"type": "integer" if name == "seed" else "string"}
        values = profile.enums.get(name)
        if name == ASPECT_RATIO and rule.aspect_ratios:
            values = ("auto", *rule.aspect_ratios)
        if name == RESOLUTION and rule.tiers:
            values = ("auto", *rule.tiers)
        if values:
            prop["enum"] = list(values)
        schema[name] = prop
    for name in sorted(profile.extras):
        schema[name] = {"type": "string"}
    for alias, name in PARAM_ALIASES.items():
        if name in profile.params:
            schema[name].setdefault("aliases", []).append(alias)
    return schema
