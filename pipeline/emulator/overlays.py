"""The seeded part of an edit: stars, snowflakes and the sun, drawn per variant over a look.

They are sparse on purpose: a variant re-encodes only the 16-row groups its stamps touch
(see look), so most of a picture's compressed rows stay cached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from pipeline.emulator.effects import FLAKES, STARS, SUN
from pipeline.emulator.filters import F32, LUMA, U8

I32 = npt.NDArray[np.int32]

# Stamps per pixel of the drawable area, before weighting by where they may go.
STAR_DENSITY = 1 / 550
FLAKE_DENSITY = 1 / 650
# Sizes are for a 1024-pixel short side and scale with it.
STAR_RADII = (1.2, 2.0, 3.0)
STAR_SHARES = (0.70, 0.93)  # cumulative: small below the first, medium below the second
FLAKE_RADII = (2.0, 3.0, 4.2, 6.0)
FLAKE_SHARES = (0.4, 0.7, 0.9)
FLAKE_FIELD_SEED = 20261130  # the field is the same for every look; variants shift it
SUN_RADIUS = 0.05  # of the short side
SUN_GLOW = 2.4  # the glow's radius, in sun radii (its area is most of a sunset variant's CPU)
REFERENCE_SIDE = 1024


@dataclass(frozen=True)
class Stamps:
    """Pixels to paint: where, in which colour, how opaque."""

    ys: I32
    xs: I32
    rgb: F32  # (n, 3)
    alpha: F32  # (n,)

    def __len__(self) -> int:
        return int(self.ys.shape[0])


@dataclass(frozen=True)
class Sprite:
    """A small alpha shape as offsets from its centre."""

    dy: I32
    dx: I32
    alpha: F32


@lru_cache(maxsize=64)
def disc(radius: float, glint: bool = False) -> Sprite:
    """A soft disc of `radius` pixels; with `glint`, thin rays three radii long."""
    reach = int(np.ceil(radius * (3 if glint else 1))) + 1
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    d = np.hypot(dy, dx)
    alpha = np.clip(radius + 0.5 - d, 0, 1)
    if glint:
        ray = (np.minimum(abs(dy), abs(dx)) < 0.6) * np.clip(1 - d / (3 * radius), 0, 1) * 0.8
        alpha = np.maximum(alpha, ray)
    keep = alpha > 0.02
    return Sprite(
        dy[keep].astype(np.int32), dx[keep].astype(np.int32), alpha[keep].astype(np.float32)
    )


@lru_cache(maxsize=16)
def glow(radius: float, reach: float) -> Sprite:
    """A disc of `radius` inside a halo fading out at `reach`."""
    r = int(np.ceil(reach))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    d = np.hypot(dy, dx)
    halo = np.clip(1 - d / reach, 0, 1) ** 2 * 0.7
    alpha = np.maximum(np.clip(radius + 0.5 - d, 0, 1), halo)
    keep = alpha > 0.02
    return Sprite(
        dy[keep].astype(np.int32), dx[keep].astype(np.int32), alpha[keep].astype(np.float32)
    )


@dataclass(frozen=True)
class Overlays:
    """What a look's variants draw over it, and where they may."""

    kinds: tuple[str, ...]
    rows: tuple[int, int]  # the rows between the bands
    # (h, w) maps, 0..255 for 0..1 (a byte a pixel: a look may be kept a long time)
    allowed: U8  # not on reference thumbnails, not outside a mask's area
    sky: U8  # where the sun shines through
    star_weight: U8  # where stars are
    mono: bool

    @property
    def scale(self) -> float:
        return float(min(self.allowed.shape)) / REFERENCE_SIDE

    def stamps(self, key: bytes) -> Stamps:
        """The stamps of one variant: a pure function of `key` (prompt, seed, variant)."""
        rng = np.random.default_rng(int.from_bytes(key[:8], "big"))
        stamps = _concat([_DRAWERS[kind](self, rng) for kind in self.kinds])
        if self.mono:
            grey = stamps.rgb @ LUMA
            stamps = Stamps(stamps.ys, stamps.xs, np.repeat(grey[:, None], 3, 1), stamps.alpha)
        return stamps

    def positions(self, rng: np.random.Generator, count: int) -> tuple[I32, I32]:
        top, bottom = self.rows
        ys = rng.integers(top, bottom, count, dtype=np.int32)
        xs = rng.integers(0, self.allowed.shape[1], count, dtype=np.int32)
        return ys, xs

    def place(
        self,
        sprite: Sprite,
        ys: I32,
        xs: I32,
        rgb: F32,
        alpha: F32,
        where: U8 | None = None,
    ) -> Stamps:
        """`sprite` at each (y, x), clipped to the drawable rows, faded by `allowed` (and
        the map `where`) at each pixel."""
        py = (ys[:, None] + sprite.dy[None, :]).ravel()
        px = (xs[:, None] + sprite.dx[None, :]).ravel()
        a = (alpha[:, None] * sprite.alpha[None, :]).ravel()
        colour = np.repeat(rgb, sprite.dy.shape[0], axis=0)
        top, bottom = self.rows
        inside = (py >= top) & (py < bottom) & (px >= 0) & (px < self.allowed.shape[1])
        py, px, a, colour = py[inside], px[inside], a[inside], colour[inside]
        a = a * at(self.allowed, py, px)
        if where is not None:
            a = a * at(where, py, px)
        return Stamps(py.astype(np.int32), px.astype(np.int32), colour, a.astype(np.float32))


def at(weights: U8, ys: I32, xs: I32) -> F32:
    """A 0..255 map's values at (ys, xs), as 0..1."""
    # A flat take: 2-D fancy indexing costs several times more on this hot path.
    index = ys.astype(np.intp) * weights.shape[1] + xs
    return np.asarray(_UNIT[weights.ravel().take(index)], dtype=np.float32)


# 0..255 -> 0..1, looked up rather than computed per pixel.
_UNIT = np.arange(256, dtype=np.float32) / np.float32(255)


def as_map(weights: F32) -> U8:
    """A 0..1 weight map as bytes."""
    return np.asarray(np.clip(weights * 255 + 0.5, 0, 255), dtype=np.uint8)


def _empty() -> Stamps:
    return Stamps(
        np.zeros(0, np.int32),
        np.zeros(0, np.int32),
        np.zeros((0, 3), np.float32),
        np.zeros(0, np.float32),
    )


def _concat(parts: list[Stamps]) -> Stamps:
    if not parts:
        return _empty()
    return Stamps(
        np.concatenate([p.ys for p in parts]),
        np.concatenate([p.xs for p in parts]),
        np.concatenate([p.rgb for p in parts]),
        np.concatenate([p.alpha for p in parts]),
    )


def _sized(
    overlays: Overlays,
    rng: np.random.Generator,
    ys: I32,
    xs: I32,
    radii: tuple[float, ...],
    shares: tuple[float, ...],
    colours: F32,
    alphas: F32,
    where: U8 | None,
    glint_last: bool,
) -> Stamps:
    size_class = np.searchsorted(np.asarray(shares), rng.random(ys.shape[0]))
    parts = []
    for i, radius in enumerate(radii):
        pick = size_class == i
        if not pick.any():
            continue
        sprite = disc(round(radius * overlays.scale, 1), glint_last and i == len(radii) - 1)
        parts.append(overlays.place(sprite, ys[pick], xs[pick], colours[pick], alphas[pick], where))
    return _concat(parts)


def stars(overlays: Overlays, rng: np.random.Generator) -> Stamps:
    """Stars where the star weight is, of three sizes, the biggest with rays; white to pale
    blue or gold."""
    top, bottom = overlays.rows
    count = int((bottom - top) * overlays.allowed.shape[1] * STAR_DENSITY)
    ys, xs = overlays.positions(rng, count)
    keep = rng.random(count) < at(overlays.star_weight, ys, xs) * at(overlays.allowed, ys, xs)
    ys, xs = ys[keep], xs[keep]
    n = ys.shape[0]
    tints = np.array([[255, 255, 255], [205, 222, 255], [255, 238, 200]], dtype=np.float32)
    colours = tints[rng.integers(0, 3, n)]
    alphas = np.asarray(rng.uniform(0.6, 1.0, n), dtype=np.float32)
    return _sized(
        overlays,
        rng,
        ys,
        xs,
        STAR_RADII,
        STAR_SHARES,
        colours,
        alphas,
        overlays.star_weight,
        glint_last=True,
    )


def flakes(overlays: Overlays, rng: np.random.Generator) -> Stamps:
    """Snowflakes everywhere they may be, four sizes, nearly white: the look's field of
    flakes shifted by a seeded offset (building a field per variant cost most of its CPU)."""
    top, bottom = overlays.rows
    height, width = bottom - top, overlays.allowed.shape[1]
    field = _flake_field(height, width, round(overlays.scale, 4))
    dy, dx = int(rng.integers(0, height)), int(rng.integers(0, width))
    ys = ((field.ys + dy) % height + top).astype(np.int32)
    xs = ((field.xs + dx) % width).astype(np.int32)
    return Stamps(ys, xs, field.rgb, field.alpha * at(overlays.allowed, ys, xs))


@lru_cache(maxsize=8)
def _flake_field(height: int, width: int, scale: float) -> Stamps:
    """Flakes over a `height` x `width` area that tiles (sprites wrap around its edges), rows
    from 0: drawn once per picture size, shifted per variant."""
    rng = np.random.default_rng(FLAKE_FIELD_SEED)
    count = int(height * width * FLAKE_DENSITY)
    ys = rng.integers(0, height, count)
    xs = rng.integers(0, width, count)
    # Mostly opaque: a flake must read as white over any ground, not as a grey smudge.
    alphas = rng.uniform(0.8, 1.0, count).astype(np.float32)
    size_class = np.searchsorted(np.asarray(FLAKE_SHARES), rng.random(count))
    parts = []
    for i, radius in enumerate(FLAKE_RADII):
        pick = size_class == i
        sprite = disc(round(radius * scale, 1))
        py = ((ys[pick][:, None] + sprite.dy[None, :]) % height).ravel()
        px = ((xs[pick][:, None] + sprite.dx[None, :]) % width).ravel()
        a = (alphas[pick][:, None] * sprite.alpha[None, :]).ravel()
        parts.append((py, px, a))
    py = np.concatenate([p[0] for p in parts]).astype(np.int32)
    px = np.concatenate([p[1] for p in parts]).astype(np.int32)
    alpha = np.concatenate([p[2] for p in parts]).astype(np.float32)
    rgb = np.broadcast_to(np.array([250, 252, 255], np.float32), (py.shape[0], 3))
    return Stamps(py, px, rgb, alpha)


def sun(overlays: Overlays, rng: np.random.Generator) -> Stamps:
    """A low sun with a warm halo, somewhere across the upper half, behind the ground."""
    h, w = overlays.allowed.shape
    short = min(h, w)
    x = int(rng.uniform(0.15, 0.85) * w)
    y = int(rng.uniform(0.22, 0.42) * h)
    radius = SUN_RADIUS * short
    sprite = glow(round(radius, 1), round(radius * SUN_GLOW, 1))
    core = sprite.alpha >= 0.999
    colours = np.where(core[:, None], [[255, 246, 210]], [[255, 170, 70]]).astype(np.float32)
    ys = np.full(sprite.dy.shape[0], y, np.int32) + sprite.dy
    xs = np.full(sprite.dx.shape[0], x, np.int32) + sprite.dx
    single = Sprite(np.zeros(1, np.int32), np.zeros(1, np.int32), np.ones(1, np.float32))
    stamps = overlays.place(single, ys, xs, colours, sprite.alpha)
    through = 0.3 + 0.7 * at(overlays.sky, stamps.ys, stamps.xs)
    return Stamps(stamps.ys, stamps.xs, stamps.rgb, stamps.alpha * through)


_DRAWERS: dict[str, Callable[[Overlays, np.random.Generator], Stamps]] = {
    STARS: stars,
    FLAKES: flakes,
    SUN: sun,
}


def touched_groups(stamps: Stamps, group_rows: int) -> I32:
    """The sorted row groups (of `group_rows` rows) that the stamps paint on."""
    # A count per group rather than np.unique: no sort of every stamp pixel.
    painted = stamps.ys[stamps.alpha > 0] // group_rows
    return np.flatnonzero(np.bincount(painted)).astype(np.int32)


def draw(rows: U8, ys: I32, xs: I32, stamps: Stamps) -> None:
    """Blends the stamps into `rows` in place, at (ys, xs) of `rows` (the stamps' own
    coordinates mapped by the caller)."""
    # One flat index per pixel: a 1-D take/put is several times faster than 2-D fancy
    # indexing, and this is most of a snowy variant's CPU. No filtering of transparent
    # stamps and no clipping: a blend with alpha in [0, 1] of values in [0, 255] stays there.
    flat = rows.reshape(-1, rows.shape[-1])
    if not np.shares_memory(flat, rows):
        raise ValueError("draw needs C-contiguous rows")
    index = ys.astype(np.intp) * rows.shape[1] + xs
    over = flat.take(index, axis=0).astype(np.float32)
    over += (stamps.rgb - over) * stamps.alpha[:, None]
    over += 0.5
    flat[index] = over.astype(np.uint8)
