"""The reference images of a multi-image prompt (image 2, 3, ...) worked into the picture."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from pipeline.emulator.filters import F32, colour_transfer, fitted, lerp, to_float
from pipeline.emulator.regions import border_region
from pipeline.emulator.vocabulary import PALETTE, PLACE, Plan

PALETTE_STRENGTH = 0.85  # how far the picture's colours move to the reference's
PALETTE_TEXTURE = 0.15  # how much of the reference itself shows under its palette
BLEND_WEIGHT = 0.3  # a reference the prompt names for nothing in particular
PLACE_FRACTION = 0.32  # a placed reference's long side, of the picture's short side
MIN_CUTOUT_SHARE = 0.05  # a cut-out smaller than this share of the reference: paste it whole


def apply_references(picture: F32, references: Sequence[Image.Image], plan: Plan) -> F32:
    """Each reference as the prompt uses it: its palette, placed at the centre, or blended."""
    h, w = picture.shape[:2]
    placed = 0
    for index, reference in enumerate(references):
        use = plan.use_of(index)
        if use == PLACE:
            picture = _place(picture, reference, placed)
            placed += 1
            continue
        whole = fitted(reference, (w, h))
        if use == PALETTE:
            picture = colour_transfer(picture, whole, PALETTE_STRENGTH)
            picture = lerp(picture, whole, PALETTE_TEXTURE)
        else:
            picture = lerp(picture, whole, BLEND_WEIGHT)
    return picture


def _place(picture: F32, reference: Image.Image, index: int) -> F32:
    """The reference, its own background flooded away, pasted at the centre (the next one
    placed a little to the right, and so on)."""
    h, w = picture.shape[:2]
    side = max(8, round(min(h, w) * PLACE_FRACTION))
    cut = to_float(np.asarray(ImageOps.contain(reference, (side, side))))
    keep = 1.0 - border_region(cut)
    if float(keep.mean()) < MIN_CUTOUT_SHARE:
        keep = np.ones(cut.shape[:2], dtype=np.float32)
    ch, cw = cut.shape[:2]
    x0 = min(max(0, (w - cw) // 2 + index * (cw * 2 // 3)), w - cw)
    y0 = max(0, (h - ch) // 2)
    out = picture.copy()
    out[y0 : y0 + ch, x0 : x0 + cw] = lerp(out[y0 : y0 + ch, x0 : x0 + cw], cut, keep)
    return out
