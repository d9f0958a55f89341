"""The emulator's deterministic image edit: sources fitted, edited as the prompt's words ask,
tinted and captioned.

An edit is split so that almost all of its cost is paid once: the *base* (decoded, cover-fitted
first image, references and mask; per sources, mask and output size) is cached, and so is each
*look* of a base (the effects the prompt's words ask for, see vocabulary and effects; per
base and effects). Each (prompt, seed, variant) then only adds two tinted bands (a bar at the
top, a caption strip at the bottom) and the seeded stamps of its overlays (stars, snowflakes,
the sun). PNG and JPEG output exploit that split (see splice and look): the look's unchanged
row groups are compressed once and spliced between the freshly compressed bands and groups.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import struct
import textwrap
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from pipeline.emulator.effects import Scene, apply_effects
from pipeline.emulator.filters import lerp, to_float, to_u8
from pipeline.emulator.look import Look
from pipeline.emulator.overlays import Overlays, as_map
from pipeline.emulator.references import apply_references
from pipeline.emulator.splice import (
    MCU_ROWS,
    PNG_LEVEL,
    encode_jpeg,
    spliced_jpeg,
    spliced_png,
)
from pipeline.emulator.vocabulary import Plan, plan_for
from pipeline.errors import InvalidImageError

# Band geometry, as fractions of the output height; band edges fall on JPEG MCU rows.
TOP_BAR_FRACTION = 1 / 48
CAPTION_FRACTION = 0.13
CAPTION_PADDING_FRACTION = 0.012
CAPTION_PROMPT_LINES = 3
LINE_SPACING = 1.25
# Reference images become square thumbnails of this fraction of the short side.
THUMB_FRACTION = 1 / 6
THUMB_BORDER = 3
# How strongly the first reference shows through the whole picture, and inside a mask.
REFERENCE_BLEND = 0.18
MASK_BLEND = 0.65
# Neutral backdrop for transparent sources.
BACKDROP_RGB = (128, 128, 128)

DEFAULT_QUALITY: dict[str, int] = {"jpeg": 85, "webp": 80, "avif": 60}
WEBP_METHOD = 0  # fastest: the emulator is a test double, not an encoder benchmark
AVIF_SPEED = 10


@dataclass(frozen=True)
class Layout:
    """Where the bands of one output size lie: rows [0, top) and [height - caption, height)."""

    width: int
    height: int
    top: int
    caption: int

    @property
    def middle(self) -> tuple[int, int]:
        return self.top, self.height - self.caption


def layout_for(width: int, height: int) -> Layout:
    top = MCU_ROWS * max(1, round(height * TOP_BAR_FRACTION / MCU_ROWS))
    middle_end = MCU_ROWS * int((height - height * CAPTION_FRACTION) // MCU_ROWS)
    if middle_end <= top:
        raise ValueError(f"output {width}x{height} is too small for the caption bands")
    return Layout(width, height, top, height - middle_end)


# --- the base: everything that depends only on the sources and the output size --------------


# Looks kept per base: a batch applies one prompt, a benchmark a handful, to each source.
LOOK_CACHE_ENTRIES = 4


class Base:
    """The cached part of an edit, and the looks made of it. Pictures are never changed."""

    def __init__(
        self,
        image: Image.Image,
        layout: Layout,
        *,
        fitted: Image.Image | None = None,
        references: Sequence[Image.Image] = (),
        area: Image.Image | None = None,
        thumbnails: Sequence[tuple[int, int, int, int]] = (),
    ) -> None:
        self.image = image  # the picture of a prompt that asks for no effect
        self.layout = layout
        self.fitted = fitted if fitted is not None else image  # the first image, fitted
        self.references = list(references)
        self.area = area
        self.thumbnails = list(thumbnails)
        self._looks: OrderedDict[Plan, Look] = OrderedDict()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()

    def look(self, plan: Plan) -> Look:
        """The look of `plan`, made once (other threads wanting it meanwhile wait)."""
        with self._build_lock:
            with self._lock:
                found = self._looks.get(plan)
                if found is not None:
                    self._looks.move_to_end(plan)
                    return found
            made = build_look(self, plan)
            with self._lock:
                self._looks[plan] = made
                while len(self._looks) > LOOK_CACHE_ENTRIES:
                    self._looks.popitem(last=False)
            return made


def build_look(base: Base, plan: Plan) -> Look:
    """`base` edited as `plan` asks: references, effects (inside the mask's area, if any),
    thumbnails of the references on top, and the overlays its variants will draw."""
    layout = base.layout
    if not plan:
        return Look(np.asarray(base.image), layout.middle, None)
    source = to_float(np.asarray(base.fitted))
    area = None if base.area is None else np.asarray(base.area, dtype=np.float32) / np.float32(255)
    scene = Scene(source=source, area=area)
    picture = apply_references(source, base.references, plan)
    picture = apply_effects(picture, plan, scene)
    if area is not None:
        picture = lerp(source, picture, area)
    image = Image.fromarray(to_u8(picture))
    _paste_thumbnails(image, base.references, layout)
    overlays = None
    if scene.overlays:
        allowed = np.full((layout.height, layout.width), 255, dtype=np.uint8)
        if area is not None:
            allowed = as_map(area)
        for left, top, right, bottom in base.thumbnails:
            allowed[top:bottom, left:right] = 0
        sky = as_map(scene.sky()) if plan.has("night") or plan.has("sunset") else allowed
        stars = sky if scene.star_weight is None else as_map(scene.star_weight)
        overlays = Overlays(tuple(scene.overlays), layout.middle, allowed, sky, stars, scene.mono)
    return Look(np.asarray(image), layout.middle, overlays)


def decode_rgb(data: bytes, target: tuple[int, int] | None = None) -> Image.Image:
    """The first frame of `data` as RGB, transparency flattened onto a neutral grey."""
    try:
        im = Image.open(io.BytesIO(data))
        if target and im.format == "JPEG":
            # Let libjpeg decode at a reduced scale that still covers the target.
            im.draft("RGB", target)
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            backdrop = Image.new("RGBA", rgba.size, (*BACKDROP_RGB, 255))
            return Image.alpha_composite(backdrop, rgba).convert("RGB")
        return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"image could not be decoded: {exc}") from exc


def _edit_area(mask: bytes, size: tuple[int, int]) -> Image.Image:
    """An L image, 255 where the mask is fully transparent (the area to edit), else 0."""
    try:
        im = Image.open(io.BytesIO(mask))
        im.load()
        alpha = im.convert("RGBA").getchannel("A")
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise InvalidImageError(f"mask could not be decoded: {exc}") from exc
    fitted = ImageOps.fit(alpha, size, method=Image.Resampling.NEAREST)
    return fitted.point([255] + [0] * 255)


def build_base(images: Sequence[bytes], mask: bytes | None, width: int, height: int) -> Base:
    """Decode and compose the sources for one output size. CPU-heavy: run it off the loop."""
    if not images:
        raise ValueError("at least one image is needed")
    size = (width, height)
    layout = layout_for(width, height)
    fitted = ImageOps.fit(decode_rgb(images[0], size), size, method=Image.Resampling.BILINEAR)
    refs = [decode_rgb(data, size) for data in images[1:]]
    picture = fitted
    first_ref: Image.Image | None = None
    if refs:
        first_ref = ImageOps.fit(refs[0], size, method=Image.Resampling.BILINEAR)
        picture = Image.blend(picture, first_ref, REFERENCE_BLEND)
    area: Image.Image | None = None
    if mask is not None:
        area = _edit_area(mask, size)
        # The "edit" inside the mask: the first reference, or the picture's negative.
        donor = first_ref if first_ref is not None else ImageOps.invert(picture)
        edited = Image.blend(picture, donor, MASK_BLEND)
        picture = Image.composite(edited, picture, area)
    thumbnails = _paste_thumbnails(picture, refs, layout)
    return Base(picture, layout, fitted=fitted, references=refs, area=area, thumbnails=thumbnails)


def _paste_thumbnails(
    picture: Image.Image, refs: Sequence[Image.Image], layout: Layout
) -> list[tuple[int, int, int, int]]:
    """Pastes a framed thumbnail of each reference down the right edge; returns their boxes."""
    side = max(16, round(min(layout.width, layout.height) * THUMB_FRACTION))
    margin = max(4, side // 12)
    x = layout.width - side - margin
    y = layout.top + margin
    boxes = []
    for ref in refs:
        if y + side > layout.height - layout.caption:
            break
        frame = Image.new("RGB", (side, side), (255, 255, 255))
        inner = side - 2 * THUMB_BORDER
        frame.paste(
            ImageOps.fit(ref, (inner, inner), Image.Resampling.BILINEAR),
            (THUMB_BORDER, THUMB_BORDER),
        )
        picture.paste(frame, (x, y))
        boxes.append((x, y, x + side, y + side))
        y += side + margin
    return boxes


class BaseCache:
    """A small thread-safe LRU of bases keyed by (source hashes, mask hash, width, height)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[object, ...], Base] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[object, ...]) -> Base | None:
        with self._lock:
            base = self._items.get(key)
            if base is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return base

    def put(self, key: tuple[object, ...], base: Base) -> None:
        with self._lock:
            self._items[key] = base
            self._items.move_to_end(key)
            while len(self._items) > max(1, self.max_entries):
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


# --- the per-variant part: two bands -------------------------------------------------------


def tint_colour(prompt: str, seed: int | None, variant: int) -> tuple[int, int, int]:
    """A saturated colour that is a pure function of (prompt, seed, variant)."""
    digest = hashlib.sha256(f"{prompt}\x00{seed}\x00{variant}".encode()).digest()
    hue = int.from_bytes(digest[:2], "big") / 65536
    sat = 0.55 + digest[2] / 255 * 0.35
    val = 0.45 + digest[3] / 255 * 0.40
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return round(r * 255), round(g * 255), round(b * 255)


_fonts = threading.local()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # One font object per thread: FreeType faces are not safe to share across threads.
    cache: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont] | None = getattr(
        _fonts, "cache", None
    )
    if cache is None:
        cache = {}
        _fonts.cache = cache
    font = cache.get(size)
    if font is None:
        font = ImageFont.load_default(size=size)
        cache[size] = font
    return font


def caption_lines(prompt: str, chars_per_line: int) -> list[str]:
    words = " ".join(prompt.split())
    lines = textwrap.wrap(words, width=max(8, chars_per_line)) or [""]
    if len(lines) > CAPTION_PROMPT_LINES:
        lines = lines[:CAPTION_PROMPT_LINES]
        last = lines[-1]
        lines[-1] = (last[: max(0, chars_per_line - 1)].rstrip()) + "…"
    return lines


# Rendered prompt lines, as masks, per (prompt, size): a batch repeats a few prompts with
# many seeds, and drawing text is most of a variant's cost. ~130 kB per entry at 1 MP.
CAPTION_CACHE_ENTRIES = 64


@dataclass(frozen=True)
class _Mask:
    """Where the prompt lines' ink goes: the inked box of the caption and its alpha there."""

    box: tuple[int, int]
    alpha: Image.Image | None  # None: the lines have no ink (an empty prompt)


class _CaptionCache:
    """A small thread-safe LRU of the prompt lines' text mask (an L image) per caption."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[object, ...], _Mask] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> _Mask | None:
        with self._lock:
            mask = self._items.get(key)
            if mask is not None:
                self._items.move_to_end(key)
            return mask

    def put(self, key: tuple[object, ...], mask: _Mask) -> None:
        with self._lock:
            self._items[key] = mask
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)


_captions = _CaptionCache(CAPTION_CACHE_ENTRIES)


def _prompt_mask(
    size: tuple[int, int], lines: Sequence[str], font_px: int, pad: int, step: float
) -> _Mask:
    """The prompt lines drawn at full coverage (255) on black, cut to their inked box."""
    key = (size, tuple(lines), font_px, pad, step)
    mask = _captions.get(key)
    if mask is None:
        full = Image.new("L", size, 0)
        draw = ImageDraw.Draw(full)
        font = _font(font_px)
        for i, line in enumerate(lines):
            draw.text((pad, pad + i * step), line, font=font, fill=255)
        # Pasting through the whole strip costs ~0.5 ms; the text covers a fraction of it.
        bbox = full.getbbox()
        mask = _Mask(bbox[:2], full.crop(bbox)) if bbox else _Mask((0, 0), None)
        _captions.put(key, mask)
    return mask


def render_bands(
    layout: Layout, *, prompt: str, seed: int | None, variant: int, n: int
) -> tuple[Image.Image, Image.Image]:
    """The top bar and the caption strip of one variant."""
    tint = tint_colour(prompt, seed, variant)
    luminance = 0.299 * tint[0] + 0.587 * tint[1] + 0.114 * tint[2]
    ink = (16, 16, 16) if luminance > 140 else (245, 245, 245)
    top = Image.new("RGB", (layout.width, layout.top), tint)
    strip = Image.new("RGB", (layout.width, layout.caption), tint)
    pad = max(4, round(layout.height * CAPTION_PADDING_FRACTION))
    lines_total = CAPTION_PROMPT_LINES + 1
    font_px = max(8, int((layout.caption - 2 * pad) / (lines_total * LINE_SPACING)))
    # Aileron's average advance is about half its size; wrapping by count avoids measuring.
    chars = int((layout.width - 2 * pad) / (font_px * 0.5))
    lines = caption_lines(prompt, chars)
    step = font_px * LINE_SPACING
    # The prompt's lines come from the cache as an alpha mask; only the seed line is drawn.
    mask = _prompt_mask(strip.size, lines, font_px, pad, step)
    if mask.alpha is not None:
        x, y = mask.box
        strip.paste(ink, (x, y, x + mask.alpha.width, y + mask.alpha.height), mask.alpha)
    seed_text = "-" if seed is None else str(seed)
    ImageDraw.Draw(strip).text(
        (pad, pad + len(lines) * step),
        f"seed {seed_text}  ·  image {variant + 1}/{n}",
        font=_font(font_px),
        fill=ink,
    )
    return top, strip


def overlay_key(prompt: str, seed: int | None, variant: int) -> bytes:
    """What a variant's seeded stamps are drawn from: (prompt, seed, variant), like its tint."""
    return hashlib.sha256(f"overlay\x00{prompt}\x00{seed}\x00{variant}".encode()).digest()


def compose(base: Base, top: Image.Image, strip: Image.Image) -> Image.Image:
    """The base's own picture (a prompt that asks for no effect) under two bands."""
    picture = base.image.copy()
    picture.paste(top, (0, 0))
    picture.paste(strip, (0, base.layout.height - base.layout.caption))
    return picture


def variant_picture(
    base: Base, *, prompt: str, seed: int | None, variant: int, n: int
) -> Image.Image:
    """The whole picture of one variant, as render_variant encodes it."""
    look = base.look(plan_for(prompt))
    top, strip = render_bands(base.layout, prompt=prompt, seed=seed, variant=variant, n=n)
    picture = Image.fromarray(look.picture(overlay_key(prompt, seed, variant)))
    picture.paste(top, (0, 0))
    picture.paste(strip, (0, base.layout.height - base.layout.caption))
    return picture


def render_variant(
    base: Base,
    *,
    prompt: str,
    seed: int | None,
    variant: int,
    n: int,
    output_format: str,
    compression: int | None = None,
) -> bytes:
    """One output image, encoded. Same arguments, same bytes."""
    layout = base.layout
    if output_format not in ("png", "jpeg"):
        picture = variant_picture(base, prompt=prompt, seed=seed, variant=variant, n=n)
        return encode(picture, output_format, compression)
    look = base.look(plan_for(prompt))
    key = overlay_key(prompt, seed, variant)
    top, strip = render_bands(layout, prompt=prompt, seed=seed, variant=variant, n=n)
    if output_format == "png":
        return spliced_png(layout.width, layout.height, top, look.middle_png(key), strip)
    quality = compression or DEFAULT_QUALITY["jpeg"]
    header, rows = look.middle_jpeg(key, quality)
    return spliced_jpeg(top, header, rows, strip, quality)


def encode(picture: Image.Image, output_format: str, compression: int | None = None) -> bytes:
    out = io.BytesIO()
    if output_format == "png":
        picture.save(out, "PNG", compress_level=PNG_LEVEL)
    elif output_format == "jpeg":
        return encode_jpeg(picture, compression or DEFAULT_QUALITY["jpeg"])
    elif output_format == "webp":
        quality = compression or DEFAULT_QUALITY["webp"]
        picture.save(out, "WEBP", quality=quality, method=WEBP_METHOD)
    elif output_format == "avif":
        quality = compression or DEFAULT_QUALITY["avif"]
        picture.save(out, "AVIF", quality=quality, speed=AVIF_SPEED)
    elif output_format == "gif":
        paletted = picture.quantize(256, method=Image.Quantize.FASTOCTREE)
        paletted.save(out, "GIF")
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return out.getvalue()
