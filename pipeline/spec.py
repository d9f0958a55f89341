"""The edit API's contract as data: limits, supported values and the output-size mapping.

Shared by the client, the manifest validator and the emulator so the three never disagree.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.errors import SpecValueError

DEFAULT_API_BASE = "https://api.lumenfall.ai/openai/v1"
DEFAULT_MODEL = "p-image-edit"

MAX_PROMPT_CHARS = 1000
MIN_IMAGES = 1
MAX_IMAGES = 5
MIN_N = 1
MAX_N = 10
MIN_COMPRESSION = 1
MAX_COMPRESSION = 100

PRICE_PER_IMAGE_USD = 0.01
CURRENCY = "USD"
MICROS_PER_USD = 1_000_000
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "gif", "webp", "avif")
LOSSY_FORMATS: frozenset[str] = frozenset({"jpeg", "webp", "avif"})
# Accepted spellings that mean one of OUTPUT_FORMATS.
FORMAT_ALIASES: dict[str, str] = {"jpg": "jpeg"}
RESPONSE_FORMATS: tuple[str, ...] = ("url", "b64_json")
QUALITY_VALUES: tuple[str, ...] = ("auto", "low", "medium", "high", "standard", "hd")
AVIF_MAX_SIDE = 1600

CONTENT_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "avif": "image/avif",
}
# Upload formats the gateway accepts for `image` (GIF is accepted by the gateway too).
INPUT_FORMATS: frozenset[str] = frozenset({"png", "jpeg", "webp", "gif"})


@dataclass(frozen=True)
class OutputSize:
    width: int
    height: int
    aspect: str

    @property
    def ratio(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


# p-image-edit renders exactly one of these, each an aspect ratio at about one megapixel.
SUPPORTED_SIZES: tuple[OutputSize, ...] = (
    OutputSize(1365, 768, "16:9"),
    OutputSize(768, 1365, "9:16"),
    OutputSize(1254, 836, "3:2"),
    OutputSize(836, 1254, "2:3"),
    OutputSize(1183, 887, "4:3"),
    OutputSize(887, 1182, "3:4"),
    OutputSize(1024, 1024, "1:1"),
)
SIZE_BY_ASPECT: dict[str, OutputSize] = {s.aspect: s for s in SUPPORTED_SIZES}
RESOLUTION_TIERS: tuple[str, ...] = ("1K",)

_PIXELS_RE = re.compile(r"^\s*(\d{1,5})\s*[xX×]\s*(\d{1,5})\s*$")
_RATIO_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")
_TIER_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kK]|[mM][pP]?)?\s*$")


def normalize_output_format(value: str) -> str:
    v = value.strip().lower()
    v = FORMAT_ALIASES.get(v, v)
    if v not in OUTPUT_FORMATS:
        raise SpecValueError(
            f"unknown output format {value!r}; expected one of {', '.join(OUTPUT_FORMATS)}"
        )
    return v


def parse_pixels(value: str) -> tuple[int, int] | None:
    """`WxH` as two positive ints, or None when the text is not of that form."""
    m = _PIXELS_RE.match(value)
    if not m:
        return None
    w, h = int(m.group(1)), int(m.group(2))
    if w <= 0 or h <= 0:
        raise SpecValueError(f"size {value!r} has a zero side")
    return w, h


def parse_ratio(value: str) -> float | None:
    """`W:H` as a positive float ratio, or None when the text is not of that form."""
    m = _RATIO_RE.match(value)
    if not m:
        return None
    w, h = float(m.group(1)), float(m.group(2))
    if w <= 0 or h <= 0:
        raise SpecValueError(f"aspect ratio {value!r} has a zero side")
    return w / h


def check_size(value: str) -> None:
    """Raise SpecValueError unless `value` is `auto`, `WxH` or `W:H`."""
    if value.strip().lower() == "auto":
        return
    if parse_pixels(value) is None and parse_ratio(value) is None:
        raise SpecValueError(f"unknown size {value!r}; expected WxH (e.g. 1024x1024), W:H or auto")


def check_aspect_ratio(value: str) -> None:
    if value.strip().lower() == "auto":
        return
    if parse_ratio(value) is None:
        raise SpecValueError(f"unknown aspect ratio {value!r}; expected W:H (e.g. 16:9) or auto")


def check_resolution(value: str) -> None:
    """Any tier is accepted (mapped to the nearest supported one), but it must be a tier."""
    if value.strip().lower() == "auto":
        return
    m = _TIER_RE.match(value)
    if not m or float(m.group(1)) <= 0:
        raise SpecValueError(
            f"unknown resolution {value!r}; expected a tier such as 1K, 2K, 0.5K or auto"
        )


def nearest_size(ratio: float) -> OutputSize:
    """The supported size whose aspect ratio is nearest to `ratio` (in log space)."""
    target = math.log(ratio)
    return min(SUPPORTED_SIZES, key=lambda s: (abs(math.log(s.ratio) - target), s.aspect))


def resolve_output_size(
    size: str | None,
    aspect_ratio: str | None = None,
    resolution: str | None = None,
    first_image: tuple[int, int] | None = None,
) -> OutputSize:
    """The output size p-image-edit produces for these request fields.

    `size` wins over `aspect_ratio` and `resolution`; `W:H` in `size` is an aspect ratio;
    `auto` (or nothing) follows the first image's shape. Only the 1K tier exists, so
    `resolution` is validated and otherwise changes nothing.
    """
    if resolution:
        check_resolution(resolution)
    ratio: float | None = None
    if size and size.strip().lower() != "auto":
        pixels = parse_pixels(size)
        ratio = pixels[0] / pixels[1] if pixels else parse_ratio(size)
        if ratio is None:
            check_size(size)  # raises with the reason
    elif not size and aspect_ratio and aspect_ratio.strip().lower() != "auto":
        ratio = parse_ratio(aspect_ratio)
        if ratio is None:
            check_aspect_ratio(aspect_ratio)
    if ratio is None:
        ratio = first_image[0] / first_image[1] if first_image else 1.0
    return nearest_size(ratio)
