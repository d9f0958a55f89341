"""Regions found by flooding a picture from its border by colour similarity: background, sky."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from pipeline.emulator.filters import F32, edges, luminance, to_float, to_u8

Bool = npt.NDArray[np.bool_]

# The flood runs on a copy whose long side is GRID pixels (cheap, and JPEG grain averages out).
GRID = 192
# Colour distance to the border's colours under which a pixel is background outright; where
# the picture is smooth (a gradient sky), up to SMOOTH_REACH times that.
TOLERANCE = 42.0
SMOOTH_REACH = 2.6
SMOOTH_EDGE = 6.0  # Sobel magnitude (per grid pixel) under which a pixel counts as smooth
PALETTE_STEP = 16  # border colours are grouped in bins of this many levels per channel
MAX_PALETTE = 48
MAX_ROUNDS = 64
CLOSE_SIZE = 5  # closing (grid pixels) fills seams between flooded areas, e.g. wall and floor


def border_region(picture: F32, sides: str = "tlbr", tolerance: float = TOLERANCE) -> F32:
    """(h, w) weight 0..1 of the area connected to the `sides` ("t", "l", "b", "r") of the
    picture through pixels of a colour like the border's there."""
    h, w = picture.shape[:2]
    scale = GRID / max(h, w)
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    small = to_float(np.asarray(Image.fromarray(to_u8(picture)).resize(size, Image.Resampling.BOX)))
    seeds = _border(small.shape[:2], sides)
    dist = _palette_distance(small, small[seeds])
    smooth = edges(luminance(small)) < SMOOTH_EDGE
    candidate = (dist < tolerance) | (smooth & (dist < tolerance * SMOOTH_REACH))
    region = _close(_flood(seeds & candidate, candidate))
    mask = Image.fromarray(region.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _border(shape: tuple[int, ...], sides: str) -> Bool:
    seeds = np.zeros(shape[:2], dtype=bool)
    if "t" in sides:
        seeds[0, :] = True
    if "b" in sides:
        seeds[-1, :] = True
    if "l" in sides:
        seeds[:, 0] = True
    if "r" in sides:
        seeds[:, -1] = True
    return seeds


def _palette_distance(small: F32, border: F32) -> F32:
    """(h, w) distance of each pixel to the nearest of the border's (binned) colours."""
    bins = (border // PALETTE_STEP).astype(np.int32)
    keys, counts = np.unique(bins, axis=0, return_counts=True)
    palette = (keys[np.argsort(-counts)[:MAX_PALETTE]] * PALETTE_STEP + PALETTE_STEP / 2).astype(
        np.float32
    )
    best = np.full(small.shape[:2], np.inf, dtype=np.float32)
    for colour in palette:
        diff = small - colour
        np.minimum(best, np.einsum("ijk,ijk->ij", diff, diff), out=best)
    return np.asarray(np.sqrt(best), dtype=np.float32)


def _spread_rows(reached: Bool, candidate: Bool) -> Bool:
    """Every run of candidate pixels along a row that holds a reached pixel, reached."""
    h, w = candidate.shape
    runs = np.cumsum(~candidate, axis=1) + (np.arange(h) * (w + 1))[:, None]
    hit = np.zeros((h + 1) * (w + 1), dtype=bool)
    hit[runs[reached]] = True
    return np.asarray(hit[runs] & candidate, dtype=bool)


def _flood(seeds: Bool, candidate: Bool) -> Bool:
    """The candidate pixels 4-connected to a seed, spread along rows and columns in turn."""
    reached = seeds & candidate
    for _ in range(MAX_ROUNDS):
        spread = _spread_rows(reached, candidate)
        spread = _spread_rows(spread.T, candidate.T).T
        if np.array_equal(spread, reached):
            break
        reached = spread
    return reached


def _close(region: Bool) -> Bool:
    im = Image.fromarray(region.astype(np.uint8) * 255)
    closed = im.filter(ImageFilter.MaxFilter(CLOSE_SIZE)).filter(ImageFilter.MinFilter(CLOSE_SIZE))
    return np.asarray(closed) > 127
