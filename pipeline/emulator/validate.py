"""Reading and checking an edit request as the gateway documents it: the multipart form, the
API key, the model, prompt, images, mask and options. Every refusal is an ErrorAnswer."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from pipeline import spec
from pipeline.emulator.answers import ErrorAnswer, invalid
from pipeline.emulator.catalog import EmulatedModel, emulated, usage_micros, usage_tokens
from pipeline.emulator.config import EmulatorConfig
from pipeline.errors import InvalidImageError, SpecValueError
from pipeline.imageinfo import probe
from pipeline.models import check as model_check
from pipeline.models.profile import (
    ASPECT_RATIO,
    ENHANCE_PROMPT,
    KNOWN_PARAMS,
    PARAM_ALIASES,
    QUALITY,
    RESOLUTION,
    THINKING,
    ModelProfile,
)

PRICE_MICROS = round(spec.PRICE_PER_IMAGE_USD * spec.MICROS_PER_USD)
# Multipart limits: 5 images + a mask + room for stray parts; many provider fields.
MAX_FORM_FILES = 32
MAX_FORM_FIELDS = 256
MAX_FIELD_BYTES = 1024 * 1024
MAX_SEED = 2**63
IMAGE_PART_RE = re.compile(r"^image(\[\d*\])?$")
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


@dataclass
class Edit:
    """A validated edit request."""

    model: str
    prompt: str
    images: list[bytes]
    image_sha: list[str]
    mask: bytes | None
    mask_sha: str | None
    n: int
    width: int
    height: int
    response_format: str
    output_format: str
    compression: int | None
    seed: int | None
    served: EmulatedModel | None = None
    # Prompt enhancement asked for: True on, False off, None the model's default.
    enhance: bool | None = None
    usage: dict[str, Any] | None = None  # the `usage` a token-billed model reports
    unit_micros: int = PRICE_MICROS

    @property
    def cost_micros(self) -> int:
        if self.usage is not None:
            return usage_micros(self.model, self.usage)
        return self.n * self.unit_micros


@dataclass(frozen=True)
class FormFile:
    name: str
    upload: UploadFile
    data: bytes
    sha256: str


@dataclass
class Form:
    """A multipart body: its text fields and its files, in order."""

    fields: list[tuple[str, str]]
    files: list[FormFile]

    def first(self, name: str) -> str | None:
        for key, value in self.fields:
            if key == name:
                return value
        return None

    def image_parts(self) -> list[FormFile]:
        return [f for f in self.files if IMAGE_PART_RE.match(f.name)]


def is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in TRUE_VALUES


async def read_form(request: Request) -> Form:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise invalid(
            f"expected a multipart/form-data body, got {content_type or 'no content type'!r}"
        )
    try:
        form = await request.form(
            max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
    except StarletteHTTPException as exc:
        raise invalid(f"unreadable multipart body: {exc.detail}") from exc
    try:
        fields: list[tuple[str, str]] = []
        files: list[FormFile] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                files.append(FormFile(key, value, data, hashlib.sha256(data).hexdigest()))
            else:
                fields.append((key, value))
        return Form(fields, files)
    finally:
        await form.close()


def check_auth(api_key: str | None, request: Request) -> None:
    """Refuses (401) a request without the Bearer key, when the emulator has one."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    ):
        raise ErrorAnswer(
            401,
            "AUTHENTICATION_FAILED",
            "Invalid API key" if header else "Missing API key: send Authorization: Bearer",
        )


# The smallest side of a scaled-down answer (config.output_scale): room for its caption band.
MIN_SCALED_SIDE = 32


def validate(form: Form, config: EmulatorConfig) -> Edit:
    """The edit `form` asks for, or the ErrorAnswer the gateway would give it."""
    model = _model(form, config)
    served = emulated(model)
    profile = served.profile
    prompt = _prompt(form, profile)
    _refuse_untaken(form, profile)
    parts, dims = _images(form, config, model, profile)
    mask = _mask(form, dims[0], profile)
    n = _int_field(form, "n", profile.min_n, profile.max_n) or 1
    compression = _int_field(form, "output_compression", spec.MIN_COMPRESSION, spec.MAX_COMPRESSION)
    seed = _int_field(form, "seed", -MAX_SEED, MAX_SEED - 1)
    response_format, output_format = _formats(form, profile)
    _check_enums(form, profile, output_format)
    width, height = _output_size(form, dims[0], profile)
    quality = _text_field(form, QUALITY)
    usage = usage_tokens(prompt, dims, (width, height), n, quality) if served.usage else None
    if config.output_scale < 1:
        # Billed as asked, sent smaller: what the answer's `size` then reports.
        width = max(MIN_SCALED_SIDE, round(width * config.output_scale))
        height = max(MIN_SCALED_SIDE, round(height * config.output_scale))
    return Edit(
        model=model,
        prompt=prompt,
        images=[p.data for p in parts],
        image_sha=[p.sha256 for p in parts],
        mask=mask.data if mask is not None else None,
        mask_sha=mask.sha256 if mask is not None else None,
        n=n,
        width=width,
        height=height,
        response_format=response_format,
        output_format=output_format,
        compression=compression,
        seed=seed,
        served=served,
        enhance=_enhance(form, profile),
        usage=usage,
        unit_micros=round(profile.cost.price_per_image_usd * spec.MICROS_PER_USD),
    )


def _field_names(form: Form) -> list[str]:
    return list(dict.fromkeys(key for key, _ in form.fields))


def _refuse_untaken(form: Form, profile: ModelProfile) -> None:
    """A model that refuses unknown fields (gpt-image) answers 400 for one it does not take
    (seed...); prompt enhancement is ignored where a model lacks it, as the gateway does."""
    if not profile.strict_extras:
        return
    for key in _field_names(form):
        name = PARAM_ALIASES.get(key, key)
        if name == ENHANCE_PROMPT or profile.takes(name):
            continue
        if name == THINKING:
            raise invalid(f"{key} is not supported by {profile.model}; supported: none", key)
        raise invalid(f"Unknown parameter: '{key}'.", key)


def _enum_value(form: Form, name: str) -> tuple[str, str] | None:
    """(the field's name as sent, its value) for `name` or one of its aliases."""
    for key in (name, *(a for a, n in PARAM_ALIASES.items() if n == name)):
        value = _text_field(form, key)
        if value is not None:
            return key, value
    return None


def _check_enums(form: Form, profile: ModelProfile, output_format: str) -> None:
    """Every enumerated field the model takes holds a value it supports (400 listing them)."""
    for name in KNOWN_PARAMS:
        if name == QUALITY or not profile.takes(name):
            continue
        found = _enum_value(form, name)
        if found is None:
            continue
        key, value = found
        try:
            model_check.check_enum(profile, key, value)
            if name == "background":
                model_check.check_transparent(profile, value, output_format)
        except SpecValueError as exc:
            raise invalid(str(exc), key) from exc


def _enhance(form: Form, profile: ModelProfile) -> bool | None:
    found = _enum_value(form, ENHANCE_PROMPT)
    if found is None or not profile.takes(ENHANCE_PROMPT):
        return None
    key, value = found
    text = value.lower()
    if text in TRUE_VALUES:
        return True
    if text in ("off", "false", "0", "no"):
        return False
    raise invalid(f"{key} must be on or off, got {value[:40]!r}", key)


def _model(form: Form, config: EmulatorConfig) -> str:
    model = _text_field(form, "model")
    if model is None:
        raise invalid("model: Invalid input: expected string, received undefined", "model")
    if model not in config.models:
        raise ErrorAnswer(404, "MODEL_NOT_FOUND", f"Model '{model}' not found", param="model")
    if model in config.disabled_models:
        raise ErrorAnswer(404, "MODEL_DISABLED", f"Model '{model}' is disabled", param="model")
    return model


def _prompt(form: Form, profile: ModelProfile) -> str:
    prompt = form.first("prompt")
    if prompt is None:
        raise invalid("prompt: Invalid input: expected string, received undefined", "prompt")
    if not prompt.strip():
        raise invalid("prompt: Too small: expected string to have >=1 characters", "prompt")
    if len(prompt) > profile.max_prompt_chars:
        raise invalid(
            f"prompt: Too big: expected string to have <={profile.max_prompt_chars} characters",
            "prompt",
        )
    return prompt


def _images(
    form: Form, config: EmulatorConfig, model: str, profile: ModelProfile
) -> tuple[list[FormFile], list[tuple[int, int]]]:
    """The image parts and their dimensions; at least one, each a readable accepted format."""
    for key, _ in form.fields:
        if IMAGE_PART_RE.match(key) or key == "mask":
            raise invalid(f"{key} must be a file upload, got a text field", key)
    parts = form.image_parts()
    if not parts:
        raise invalid("image: at least one image file is required", "image")
    if len(parts) > profile.max_images:
        raise invalid(
            f"image: {model} accepts at most {profile.max_images} images, got {len(parts)}",
            "image",
        )
    if len(parts) < profile.min_images:
        raise invalid(
            f"image: {model} needs at least {profile.min_images} images, got {len(parts)}",
            "image",
        )
    dims: list[tuple[int, int]] = []
    for i, part in enumerate(parts, start=1):
        key, data = part.name, part.data
        if len(data) > config.max_image_bytes:
            raise invalid(
                f"image {i} is {len(data)} bytes, more than the {config.max_image_bytes} allowed",
                key,
            )
        try:
            info = probe(data)
        except InvalidImageError as exc:
            raise invalid(f"image {i} is not a valid image: {exc}", key) from exc
        if info.format not in spec.INPUT_FORMATS:
            accepted = ", ".join(sorted(spec.INPUT_FORMATS))
            raise invalid(
                f"image {i} has unsupported format {info.format}; expected {accepted}", key
            )
        dims.append((info.width, info.height))
    return parts, dims


def _mask(form: Form, first: tuple[int, int], profile: ModelProfile) -> FormFile | None:
    """The mask part, if any: one PNG the size of the first image."""
    mask_parts = [f for f in form.files if f.name == "mask"]
    if len(mask_parts) > 1:
        raise invalid("mask: at most one mask may be sent", "mask")
    if not mask_parts:
        return None
    mask = mask_parts[0]
    if not profile.mask.accepted:
        raise invalid(f"mask: {profile.model} takes no mask", "mask")
    limit = profile.mask.max_bytes
    if limit is not None and len(mask.data) > limit:
        raise invalid(f"mask is {len(mask.data)} bytes; {profile.model} takes at most {limit}")
    try:
        mask_info = probe(mask.data)
    except InvalidImageError as exc:
        raise invalid(f"mask is not a valid image: {exc}", "mask") from exc
    if mask_info.format != "png":
        raise invalid(f"mask must be a PNG image, got {mask_info.format}", "mask")
    if (mask_info.width, mask_info.height) != first:
        raise invalid(
            f"mask is {mask_info.size} but the first image is {first[0]}x{first[1]}; "
            "they must have the same dimensions",
            "mask",
        )
    return mask


def _formats(form: Form, profile: ModelProfile) -> tuple[str, str]:
    """(response_format, output_format), checking quality on the way."""
    default = "url" if "url" in profile.response_formats else profile.response_formats[0]
    response_format = _text_field(form, "response_format") or default
    if response_format not in spec.RESPONSE_FORMATS:
        raise invalid(
            f"response_format must be one of {', '.join(spec.RESPONSE_FORMATS)}, "
            f"got {response_format!r}",
            "response_format",
        )
    if response_format not in profile.response_formats:
        raise invalid(
            f"response_format {response_format!r} is not supported by {profile.model}; "
            f"supported: {', '.join(profile.response_formats)}",
            "response_format",
        )
    output_format = "png"
    raw_format = _text_field(form, "output_format")
    if raw_format is not None:
        try:
            output_format = model_check.normalize_output_format(profile, raw_format)
        except SpecValueError as exc:
            raise invalid(str(exc), "output_format") from exc
    quality = _text_field(form, "quality")
    allowed = profile.enums.get(QUALITY, spec.QUALITY_VALUES)
    if quality is not None and quality.lower() not in allowed:
        raise invalid(
            f"quality must be one of {', '.join(allowed)}, got {quality!r}",
            "quality",
        )
    return response_format, output_format


def _output_size(form: Form, first: tuple[int, int], profile: ModelProfile) -> tuple[int, int]:
    size = _text_field(form, "size")
    aspect_ratio = _text_field(form, ASPECT_RATIO) if profile.takes(ASPECT_RATIO) else None
    resolution = _text_field(form, RESOLUTION) if profile.takes(RESOLUTION) else None
    for name, value, check in (
        ("size", size, model_check.check_size),
        (ASPECT_RATIO, aspect_ratio, model_check.check_aspect_ratio),
        (RESOLUTION, resolution, model_check.check_resolution),
    ):
        if value is not None:
            try:
                check(profile, value)
            except SpecValueError as exc:
                raise invalid(str(exc), name) from exc
    try:
        return model_check.output_size(profile, size, aspect_ratio, resolution, first_image=first)
    except SpecValueError as exc:
        raise invalid(str(exc), "size") from exc


def _int_field(form: Form, name: str, low: int | None, high: int | None) -> int | None:
    raw = form.first(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise invalid(f"{name} must be an integer, got {raw[:40]!r}", name) from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _text_field(form: Form, name: str) -> str | None:
    raw = form.first(name)
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()
