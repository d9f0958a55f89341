"""Pixel helpers for the emulator's effects: float pictures, luminance, blurs, edges, colour."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter, ImageOps

F32 = npt.NDArray[np.float32]  # (h, w, 3) pictures and (h, w) maps, 0..255 or 0..1
U8 = npt.NDArray[np.uint8]

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_float(picture: U8) -> F32:
    return picture.astype(np.float32)


def to_u8(picture: F32) -> U8:
    return np.asarray(np.clip(picture + 0.5, 0, 255), dtype=np.uint8)


def luminance(picture: F32) -> F32:
    """(h, w) luma of an (h, w, 3) picture."""
    return np.asarray(picture @ LUMA, dtype=np.float32)


def lerp(a: F32, b: F32 | float, t: F32 | float) -> F32:
    """a + (b - a) * t; a (h, w) weight map `t` applies to every channel."""
    if isinstance(t, np.ndarray) and t.ndim == a.ndim - 1:
        t = t[..., None]
    return np.asarray(a + (b - a) * t, dtype=np.float32)


def saturate(picture: F32, factor: float) -> F32:
    """Saturation scaled by `factor` around each pixel's luma (0: grey)."""
    grey = luminance(picture)[..., None]
    return np.asarray(grey + (picture - grey) * factor, dtype=np.float32)


def saturation(picture: F32) -> F32:
    """(h, w) HSV saturation, 0..1."""
    high = picture.max(axis=-1)
    low = picture.min(axis=-1)
    return np.asarray((high - low) / np.maximum(high, 1.0), dtype=np.float32)


def blur(picture: F32, radius: float) -> F32:
    """A Gaussian blur (Pillow's, on 8 bits), for (h, w, 3) pictures or (h, w) maps 0..255."""
    if radius <= 0:
        return picture
    im = Image.fromarray(to_u8(picture))
    return to_float(np.asarray(im.filter(ImageFilter.GaussianBlur(radius))))


def soft(picture: F32, radius: float) -> F32:
    """A wide blur made cheap: shrink, blur a little, grow back (bilinear)."""
    h, w = picture.shape[:2]
    factor = max(1.0, radius / 3)
    small_size = (max(1, round(w / factor)), max(1, round(h / factor)))
    im = Image.fromarray(to_u8(picture))
    small = im.resize(small_size, Image.Resampling.BOX).filter(ImageFilter.GaussianBlur(2))
    return to_float(np.asarray(small.resize((w, h), Image.Resampling.BILINEAR)))


def unsharp(picture: F32, radius: float, amount: float) -> F32:
    """Unsharp masking: the picture plus `amount` times what a blur of `radius` removes."""
    return np.asarray(picture + (picture - blur(picture, radius)) * amount, dtype=np.float32)


def edges(grey: F32) -> F32:
    """(h, w) Sobel gradient magnitude of an (h, w) map (0 on the border pixels)."""
    g = np.pad(grey, 1, mode="edge")
    gx = (g[:-2, 2:] + 2 * g[1:-1, 2:] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[1:-1, :-2] + g[2:, :-2])
    gy = (g[2:, :-2] + 2 * g[2:, 1:-1] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[:-2, 1:-1] + g[:-2, 2:])
    return np.asarray(np.sqrt(gx * gx + gy * gy) / 4, dtype=np.float32)


def vertical(height: int) -> F32:
    """(h, 1) map of each row's position, 0 at the top to 1 at the bottom."""
    return np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]


def colour_transfer(picture: F32, reference: F32, strength: float) -> F32:
    """The picture with each channel's mean and spread moved toward the reference's."""
    axes = (0, 1)
    mean, std = picture.mean(axis=axes), picture.std(axis=axes) + 1.0
    ref_mean, ref_std = reference.mean(axis=axes), reference.std(axis=axes) + 1.0
    moved = (picture - mean) * (ref_std / std) + ref_mean
    return lerp(picture, np.asarray(moved, dtype=np.float32), strength)


def fitted(picture: Image.Image, size: tuple[int, int]) -> F32:
    """`picture` cover-fitted to `size` as a float picture."""
    return to_float(np.asarray(ImageOps.fit(picture, size, method=Image.Resampling.BILINEAR)))
