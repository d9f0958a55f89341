"""One request field checked against a model's profile; each refusal a SpecValueError whose
message is the reason. The manifest's rows and the emulator's requests use the same checks."""

from __future__ import annotations

from collections.abc import Iterable

from pipeline import spec
from pipeline.errors import SpecValueError
from pipeline.models.profile import (
    ASPECT_RATIO,
    RESOLUTION,
    ModelProfile,
    canonical_param,
)


def _listed(values: Iterable[str]) -> str:
    return ", ".join(values)


def check_image_count(profile: ModelProfile, count: int) -> None:
    if count < profile.min_images:
        raise SpecValueError(f"{count} images; {profile.model} needs at least {profile.min_images}")
    if count > profile.max_images:
        raise SpecValueError(f"{count} images; the limit is {profile.max_images}")


def check_prompt(profile: ModelProfile, text: str) -> None:
    if len(text) > profile.max_prompt_chars:
        raise SpecValueError(
            f"prompt is {len(text)} characters; the limit is {profile.max_prompt_chars}"
        )


def check_n(profile: ModelProfile, n: int) -> None:
    if not profile.min_n <= n <= profile.max_n:
        raise SpecValueError(f"n {n} is out of range {profile.min_n}..{profile.max_n}")


def check_size(profile: ModelProfile, value: str) -> None:
    """`value` is a size the model takes (p-image-edit: any WxH or W:H, mapped to the nearest)."""
    rule = profile.sizes
    text = value.strip().lower()
    if text == "auto":
        if not rule.auto:
            raise SpecValueError(f"size auto is not taken by {profile.model}")
        return
    spec.check_size(value)  # the form: WxH, W:H (raises with the reason)
    pixels = spec.parse_pixels(value)
    if pixels is None:
        if not (rule.ratios or rule.nearest):
            raise SpecValueError(
                f"size {value!r} is an aspect ratio; {profile.model} takes {rule.describe()}"
            )
        return
    if rule.nearest:
        return
    width, height = pixels
    if f"{width}x{height}" in rule.fixed:
        return
    if rule.free is not None:
        low, high = rule.free
        problems = []
        if not (low <= width <= high and low <= height <= high):
            problems.append(f"sides must be {low}..{high}")
        if rule.multiple_of > 1 and (width % rule.multiple_of or height % rule.multiple_of):
            problems.append(f"sides must be multiples of {rule.multiple_of}")
        if rule.max_pixels is not None and width * height > rule.max_pixels:
            problems.append(f"at most {rule.max_pixels} pixels")
        if not problems:
            return
        raise SpecValueError(f"size {value!r}: {'; '.join(problems)} for {profile.model}")
    if not rule.fixed:
        return
    raise SpecValueError(f"size {value!r} is not one {profile.model} takes: {rule.describe()}")


def check_aspect_ratio(profile: ModelProfile, value: str) -> None:
    spec.check_aspect_ratio(value)
    allowed = profile.sizes.aspect_ratios
    text = value.strip().lower()
    if allowed and text != "auto" and text.replace(" ", "") not in allowed:
        raise SpecValueError(
            f"aspect ratio {value!r} is not one {profile.model} takes: {_listed(allowed)}"
        )


def check_resolution(profile: ModelProfile, value: str) -> None:
    spec.check_resolution(value)
    allowed = profile.sizes.tiers
    text = value.strip().upper()
    if allowed and text != "AUTO" and text not in {t.upper() for t in allowed}:
        raise SpecValueError(
            f"resolution {value!r} is not one {profile.model} takes: {_listed(allowed)}"
        )


def normalize_output_format(profile: ModelProfile, value: str) -> str:
    fmt = spec.normalize_output_format(value)
    if fmt not in profile.output_formats:
        raise SpecValueError(
            f"output format {fmt!r} is not one {profile.model} takes: "
            f"{_listed(profile.output_formats)}"
        )
    return fmt


def check_enum(profile: ModelProfile, name: str, value: object) -> None:
    """An enumerated field's value is one the model takes (a field without a list: any)."""
    allowed = profile.enums.get(canonical_param(name))
    if allowed is None:
        return
    text = str(value).strip().lower() if not isinstance(value, bool) else str(value).lower()
    if text not in allowed:
        raise SpecValueError(
            f"{name} {str(value)[:40]!r} is not supported by {profile.model}; "
            f"supported: {_listed(allowed)}"
        )


def check_transparent(profile: ModelProfile, background: object, output_format: str | None) -> None:
    """`background=transparent` needs an output format with alpha, where the model says so."""
    if not profile.transparent_formats or str(background).strip().lower() != "transparent":
        return
    fmt = output_format or "png"
    if fmt not in profile.transparent_formats:
        raise SpecValueError(
            f"background transparent needs output_format "
            f"{' or '.join(profile.transparent_formats)}, not {fmt}"
        )


def dropped(profile: ModelProfile, names: Iterable[str]) -> tuple[str, ...]:
    """Of the fields a request would set, those the model does not take (not sent), in order."""
    return tuple(name for name in names if not profile.takes(name))


def output_size(
    profile: ModelProfile,
    size: str | None,
    aspect_ratio: str | None = None,
    resolution: str | None = None,
    first_image: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """The size the model renders for these fields (checked first with `check_size`)."""
    rule = profile.sizes
    if rule.nearest:
        out = spec.resolve_output_size(
            size,
            aspect_ratio if profile.takes(ASPECT_RATIO) else None,
            resolution if profile.takes(RESOLUTION) else None,
            first_image=first_image,
        )
        return out.width, out.height
    pixels = spec.parse_pixels(size) if size and size.strip().lower() != "auto" else None
    if pixels is not None:
        return pixels
    ratio = first_image[0] / first_image[1] if first_image else 1.0
    if rule.fixed:
        sizes = [spec.parse_pixels(s) for s in rule.fixed]
        options = [s for s in sizes if s is not None]
        return min(options, key=lambda s: abs(s[0] / s[1] - ratio))
    low, high = rule.free or (spec.MIN_IMAGES, 1024)
    side = max(low, min(high, 1024))
    width, height = (side, round(side / ratio)) if ratio >= 1 else (round(side * ratio), side)
    step = max(rule.multiple_of, 1)
    width = max(low, min(high, width // step * step))
    height = max(low, min(high, height // step * step))
    return width, height
