"""Reading and checking an edit request as the gateway documents it: the multipart form, the
API key, the model, prompt, images, mask and options. Every refusal is an ErrorAnswer."""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from pipeline import spec
from pipeline.emulator.answers import ErrorAnswer, invalid
from pipeline.emulator.config import EmulatorConfig
from pipeline.errors import InvalidImageError, SpecValueError
from pipeline.imageinfo import probe

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

    @property
    def cost_micros(self) -> int:
        return self.n * PRICE_MICROS


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


def validate(form: Form, config: EmulatorConfig) -> Edit:
    """The edit `form` asks for, or the ErrorAnswer the gateway would give it."""
    model = _model(form, config)
    prompt = _prompt(form)
    parts, dims = _images(form, config, model)
    mask = _mask(form, dims[0])
    n = _int_field(form, "n", spec.MIN_N, spec.MAX_N) or 1
    compression = _int_field(form, "output_compression", spec.MIN_COMPRESSION, spec.MAX_COMPRESSION)
    seed = _int_field(form, "seed", -MAX_SEED, MAX_SEED - 1)
    response_format, output_format = _formats(form)
    out = _output_size(form, dims[0])
    return Edit(
        model=model,
        prompt=prompt,
        images=[p.data for p in parts],
        image_sha=[p.sha256 for p in parts],
        mask=mask.data if mask is not None else None,
        mask_sha=mask.sha256 if mask is not None else None,
        n=n,
        width=out.width,
        height=out.height,
        response_format=response_format,
        output_format=output_format,
        compression=compression,
        seed=seed,
    )


def _model(form: Form, config: EmulatorConfig) -> str:
    model = _text_field(form, "model")
    if model is None:
        raise invalid("model: Invalid input: expected string, received undefined", "model")
    if model not in config.models:
        raise ErrorAnswer(404, "MODEL_NOT_FOUND", f"Model '{model}' not found", param="model")
    if model in config.disabled_models:
        raise ErrorAnswer(404, "MODEL_DISABLED", f"Model '{model}' is disabled", param="model")
    return model


def _prompt(form: Form) -> str:
    prompt = form.first("prompt")
    if prompt is None:
        raise invalid("prompt: Invalid input: expected string, received undefined", "prompt")
    if not prompt.strip():
        raise invalid("prompt: Too small: expected string to have >=1 characters", "prompt")
    if len(prompt) > spec.MAX_PROMPT_CHARS:
        raise invalid(
            f"prompt: Too big: expected string to have <={spec.MAX_PROMPT_CHARS} characters",
            "prompt",
        )
    return prompt


def _images(
    form: Form, config: EmulatorConfig, model: str
) -> tuple[list[FormFile], list[tuple[int, int]]]:
    """The image parts and their dimensions; at least one, each a readable accepted format."""
    for key, _ in form.fields:
        if IMAGE_PART_RE.match(key) or key == "mask":
            raise invalid(f"{key} must be a file upload, got a text field", key)
    parts = form.image_parts()
    if not parts:
        raise invalid("image: at least one image file is required", "image")
    if len(parts) > spec.MAX_IMAGES:
        raise invalid(
            f"image: {model} accepts at most {spec.MAX_IMAGES} images, got {len(parts)}", "image"
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


def _mask(form: Form, first: tuple[int, int]) -> FormFile | None:
    """The mask part, if any: one PNG the size of the first image."""
    mask_parts = [f for f in form.files if f.name == "mask"]
    if len(mask_parts) > 1:
        raise invalid("mask: at most one mask may be sent", "mask")
    if not mask_parts:
        return None
    mask = mask_parts[0]
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


def _formats(form: Form) -> tuple[str, str]:
    """(response_format, output_format), checking quality on the way."""
    response_format = _text_field(form, "response_format") or "url"
    if response_format not in spec.RESPONSE_FORMATS:
        raise invalid(
            f"response_format must be one of {', '.join(spec.RESPONSE_FORMATS)}, "
            f"got {response_format!r}",
            "response_format",
        )
    output_format = "png"
    raw_format = _text_field(form, "output_format")
    if raw_format is not None:
        try:
            output_format = spec.normalize_output_format(raw_format)
        except SpecValueError as exc:
            raise invalid(str(exc), "output_format") from exc
    quality = _text_field(form, "quality")
    if quality is not None and quality.lower() not in spec.QUALITY_VALUES:
        raise invalid(
            f"quality must be one of {', '.join(spec.QUALITY_VALUES)}, got {quality!r}",
            "quality",
        )
    return response_format, output_format


def _output_size(form: Form, first: tuple[int, int]) -> spec.OutputSize:
    size = _text_field(form, "size")
    aspect_ratio = _text_field(form, "aspect_ratio")
    resolution = _text_field(form, "resolution")
    for name, value, check in (
        ("size", size, spec.check_size),
        ("aspect_ratio", aspect_ratio, spec.check_aspect_ratio),
        ("resolution", resolution, spec.check_resolution),
    ):
        if value is not None:
            try:
                check(value)
            except SpecValueError as exc:
                raise invalid(str(exc), name) from exc
    try:
        return spec.resolve_output_size(size, aspect_ratio, resolution, first_image=first)
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
