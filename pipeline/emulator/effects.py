"""The emulator's effects: one function per vocabulary entry, applied to a cached picture.

Every effect here depends only on the sources and the prompt's words, never on the seed: its
result is cached with the look (see look). What varies with the seed (stars, snowflakes, the
sun) is asked for through `Scene.overlays` and drawn per variant (see overlays).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from pipeline.emulator.filters import (
    F32,
    blur,
    edges,
    lerp,
    luminance,
    saturate,
    saturation,
    soft,
    unsharp,
    vertical,
)
from pipeline.emulator.regions import border_region
from pipeline.emulator.vocabulary import Plan

# Below this share of the picture a flood from the top is not a sky: the top rows are used.
MIN_SKY_SHARE = 0.04
FALLBACK_SKY_ROWS = 0.45
SKY_TOLERANCE = 40.0
PAPER = np.array([250, 246, 236], dtype=np.float32)
WHITE = 255.0

STARS = "stars"
FLAKES = "flakes"
SUN = "sun"


@dataclass
class Scene:
    """What the effects of one look share: the unedited picture, the edit area, the regions
    found so far and the seeded overlays asked for."""

    source: F32
    area: F32 | None = None  # the mask's edit area, 0..1 (None: the whole picture)
    background: F32 | None = None
    star_weight: F32 | None = None  # where stars may be, 0..1 (None: the sky)
    overlays: list[str] = field(default_factory=list)
    mono: bool = False
    _sky: F32 | None = None

    @property
    def short(self) -> int:
        return int(min(self.source.shape[:2]))

    def sky(self) -> F32:
        """(h, w) 0..1: the area of the edit, else what floods from the top border, else the
        top rows fading out."""
        if self._sky is None:
            if self.area is not None:
                self._sky = self.area
            else:
                sky = border_region(self.source, "t", SKY_TOLERANCE)
                if float(sky.mean()) < MIN_SKY_SHARE:
                    h, w = sky.shape
                    fade = np.clip(1 - vertical(h) / FALLBACK_SKY_ROWS, 0, 1)
                    sky = np.broadcast_to(fade, (h, w)).astype(np.float32)
                self._sky = sky
        return self._sky


Effect = Callable[[F32, Scene], F32]


def white_background(picture: F32, scene: Scene) -> F32:
    """What floods from the border by colour similarity becomes white."""
    background = border_region(picture)
    scene.background = background
    return lerp(picture, WHITE, background)


def shadow(picture: F32, scene: Scene) -> F32:
    """A soft drop shadow of the foreground, down and to the right, on the background."""
    if scene.background is None:
        return picture
    offset = max(2, scene.short // 40)
    foreground = 1.0 - scene.background
    shifted = np.zeros_like(foreground)
    shifted[offset:, offset // 2 :] = foreground[:-offset, : foreground.shape[1] - offset // 2]
    shade = soft(shifted * 255, scene.short / 30) / 255 * 0.45 * scene.background
    return np.asarray(picture * (1 - shade)[..., None], dtype=np.float32)


def paint(picture: F32, scene: Scene) -> F32:
    """Watercolour: a soft wash over blurred detail, fewer tones, inked edges, paper."""
    detail = blur(picture, max(1.0, scene.short / 400))
    mixed = lerp(detail, soft(picture, scene.short / 60), 0.45)
    levels = 6
    poster = np.round(mixed / 255 * (levels - 1)) / (levels - 1) * 255
    mixed = saturate(lerp(mixed, poster.astype(np.float32), 0.35), 1.4)
    ink = np.clip(edges(luminance(detail)) / 40, 0, 1)
    mixed = np.asarray(mixed * (1 - 0.55 * ink)[..., None], dtype=np.float32)
    grain = _paper_grain(picture.shape[0], picture.shape[1])
    return np.asarray(lerp(mixed, PAPER, 0.14) + grain[..., None], dtype=np.float32)


def _paper_grain(height: int, width: int) -> F32:
    """A fixed paper texture (the same for every picture of this size), about +-6 levels."""
    rng = np.random.default_rng(20_240)
    small = rng.normal(128, 60, (max(1, height // 3), max(1, width // 3))).astype(np.float32)
    im = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8))
    grown = np.asarray(im.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.asarray((grown - 128) * 0.1, dtype=np.float32)


def sketch(picture: F32, scene: Scene) -> F32:
    """Pencil on paper: a colour-dodge sketch of the luma, a little of its shading kept."""
    grey = luminance(picture)
    inverse = blur(255 - grey, max(2.0, scene.short / 150))
    dodge = np.clip(grey * 255 / np.maximum(255 - inverse, 1), 0, 255) / 255
    lines = dodge**2.2
    shade = 0.75 + 0.25 * grey / 255
    return np.asarray(PAPER * (lines * shade)[..., None], dtype=np.float32)


def sunset(picture: F32, scene: Scene) -> F32:
    """A warm gradient: orange-red at the top, golden toward the bottom, a glow mid-height."""
    t = vertical(picture.shape[0])[..., None]
    top = np.array([1.30, 0.80, 0.60], dtype=np.float32)
    bottom = np.array([1.12, 0.90, 0.70], dtype=np.float32)
    glow = np.exp(-(((t - 0.45) / 0.22) ** 2)) * np.array([60, 28, -8], dtype=np.float32)
    warm = picture * (top * (1 - t) + bottom * t) + glow
    scene.overlays.append(SUN)
    return np.asarray((warm - 128) * 1.08 + 128, dtype=np.float32)


def snow(picture: F32, scene: Scene) -> F32:
    """Winter: paler, cooler and brighter, a cold haze; flakes come per seed."""
    pale = saturate(picture, 0.6)
    cool = pale * np.array([0.90, 0.98, 1.10], dtype=np.float32) + np.array(
        [10, 20, 36], dtype=np.float32
    )
    scene.overlays.append(FLAKES)
    return lerp(np.asarray(cool, dtype=np.float32), np.array([232, 240, 252], np.float32), 0.2)


def night(picture: F32, scene: Scene) -> F32:
    """Night: the ground dark and blue, the sky a deep gradient; stars come per seed."""
    h = picture.shape[0]
    grey = luminance(picture)[..., None]
    ground = picture * np.array([0.22, 0.27, 0.42], dtype=np.float32)
    t = vertical(h)[..., None]
    top = np.array([4, 7, 26], dtype=np.float32)
    horizon = np.array([30, 42, 88], dtype=np.float32)
    sky_colour = top * (1 - t) + horizon * t + grey * 0.1
    scene.overlays.append(STARS)
    return lerp(np.asarray(ground, dtype=np.float32), sky_colour.astype(np.float32), scene.sky())


def milky_way(picture: F32, scene: Scene) -> F32:
    """A faint band of light across the night sky, where more of the stars gather."""
    h, w = picture.shape[:2]
    ys = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    distance = (ys - (0.05 + 0.5 * xs)) * (w / max(h, 1)) ** 0.5
    band = np.exp(-((distance / 0.09) ** 2)) * scene.sky()
    scene.star_weight = np.asarray(np.clip(scene.sky() * (0.5 + 1.5 * band), 0, 1), np.float32)
    haze = soft(np.asarray(band * 255, dtype=np.float32), scene.short / 40) / 255
    return np.asarray(picture + haze[..., None] * np.array([70, 64, 96], np.float32), np.float32)


def mono(picture: F32, scene: Scene) -> F32:
    """Black and white, a little more contrast."""
    scene.mono = True
    grey = (luminance(picture) - 128) * 1.1 + 128
    return np.asarray(np.repeat(grey[..., None], 3, axis=-1), dtype=np.float32)


def neon(picture: F32, scene: Scene) -> F32:
    """Neon: the picture nearly black, its edges glowing in saturated colour."""
    h, w = picture.shape[:2]
    strength = np.clip(edges(blur(luminance(picture), 1.0)) / 30, 0, 1)
    low = picture.min(axis=-1, keepdims=True)
    spread = np.maximum(picture.max(axis=-1, keepdims=True) - low, 1)
    hue = (picture - low) / spread * 255
    xs = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    magenta = np.array([255, 40, 210], dtype=np.float32)
    cyan = np.array([30, 230, 255], dtype=np.float32)
    gradient = np.broadcast_to(magenta * (1 - xs) + cyan * xs, (h, w, 3))
    greyish = (saturation(picture) < 0.2).astype(np.float32)
    colour = lerp(hue.astype(np.float32), gradient.astype(np.float32), greyish)
    lines = np.asarray(colour * strength[..., None], dtype=np.float32)
    glow = soft(lines, scene.short / 50) * 1.8
    # A hot core only on the strongest edges: white everywhere would wash the colour out.
    core = np.clip(strength - 0.9, 0, 1)[..., None] * colour
    return np.asarray(picture * 0.14 + glow + lines * 1.1 + core, dtype=np.float32)


def blurred(picture: F32, scene: Scene) -> F32:
    return blur(picture, max(2.0, scene.short / 110))


def sharpened(picture: F32, scene: Scene) -> F32:
    """Unsharp masking at two scales: fine detail, then local contrast."""
    fine = unsharp(picture, max(1.2, scene.short / 500), 1.6)
    return unsharp(fine, max(4.0, scene.short / 60), 0.35)


EFFECTS: dict[str, Effect] = {
    "white_background": white_background,
    "shadow": shadow,
    "paint": paint,
    "sketch": sketch,
    "sunset": sunset,
    "snow": snow,
    "night": night,
    "milky_way": milky_way,
    "mono": mono,
    "neon": neon,
    "blur": blurred,
    "sharpen": sharpened,
}


def apply_effects(picture: F32, plan: Plan, scene: Scene) -> F32:
    """`picture` with the plan's effects applied in order, clipped to 0..255."""
    for name in plan.effects:
        picture = EFFECTS[name](picture, scene)
    return np.asarray(np.clip(picture, 0, 255), dtype=np.float32)
