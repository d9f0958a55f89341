"""A look: the picture of one (sources, prompt's effects), cached with its compressed rows.

Its middle rows (between the caption bands) are compressed once, per 16-row group; a variant
replaces only the groups its seeded stamps (overlays) touch, compressed afresh.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

from pipeline.emulator.filters import U8
from pipeline.emulator.overlays import I32, Overlays, Stamps, draw, touched_groups
from pipeline.emulator.splice import MCU_ROWS, JpegParts, PngSegment, jpeg_parts, png_segment


class Look:
    """A finished picture (bands excepted) and, made on demand, its compressed row groups."""

    def __init__(self, image: U8, middle: tuple[int, int], overlays: Overlays | None) -> None:
        self.image = image
        self.first, self.last = (row // MCU_ROWS for row in middle)
        self.overlays = overlays
        self._png: list[PngSegment] | None = None
        self._jpeg: dict[int, JpegParts] = {}
        self._lock = threading.Lock()

    def png_groups(self) -> list[PngSegment]:
        """One PNG segment per 16-row group of the middle."""
        with self._lock:
            if self._png is None:
                self._png = [self._png_group(self.image, g) for g in range(self.first, self.last)]
            return self._png

    def jpeg_parts(self, quality: int) -> JpegParts:
        with self._lock:
            parts = self._jpeg.get(quality)
            if parts is None:
                parts = jpeg_parts(Image.fromarray(self.image), quality)
                self._jpeg[quality] = parts
            return parts

    def stamped(self, key: bytes) -> tuple[I32, U8 | None]:
        """The middle's row groups a variant's stamps touch, and those groups' rows stacked
        with the stamps drawn (None: no stamps)."""
        none = np.zeros(0, np.int32)
        if self.overlays is None:
            return none, None
        stamps = self.overlays.stamps(key)
        live = stamps.alpha > 0
        if not live.all():  # off the allowed area (a mask, reference thumbnails)
            stamps = Stamps(stamps.ys[live], stamps.xs[live], stamps.rgb[live], stamps.alpha[live])
        groups = touched_groups(stamps, MCU_ROWS)
        if groups.shape[0] == 0:
            return none, None
        rows = (groups[:, None] * MCU_ROWS + np.arange(MCU_ROWS)[None, :]).ravel()
        stacked = self.image[rows]
        # Each stamp's place among the touched groups (every stamp is in one by now).
        place = np.zeros(self.image.shape[0] // MCU_ROWS + 1, np.int32)
        place[groups] = np.arange(groups.shape[0], dtype=np.int32)
        local = place[stamps.ys // MCU_ROWS] * MCU_ROWS + stamps.ys % MCU_ROWS
        draw(stacked, local.astype(np.int32), stamps.xs, stamps)
        return groups, stacked

    def middle_png(self, key: bytes) -> list[PngSegment]:
        segments = list(self.png_groups())
        groups, stacked = self.stamped(key)
        if stacked is not None:
            for i, group in enumerate(groups):
                segments[int(group) - self.first] = self._png_group(stacked, i)
        return segments

    def middle_jpeg(self, key: bytes, quality: int) -> tuple[bytes, list[bytes]]:
        """The JPEG header and the middle's MCU rows of one variant."""
        parts = self.jpeg_parts(quality)
        rows = parts.rows[self.first : self.last]
        groups, stacked = self.stamped(key)
        if stacked is not None:
            fresh = jpeg_parts(Image.fromarray(stacked), quality).rows
            for group, data in zip(groups, fresh, strict=True):
                rows[int(group) - self.first] = data
        return parts.header, rows

    def picture(self, key: bytes) -> U8:
        """The whole picture of one variant (bands not drawn)."""
        groups, stacked = self.stamped(key)
        if stacked is None:
            return self.image.copy()
        out = self.image.copy()
        for i, group in enumerate(groups):
            out[group * MCU_ROWS : (group + 1) * MCU_ROWS] = stacked[
                i * MCU_ROWS : (i + 1) * MCU_ROWS
            ]
        return out

    @staticmethod
    def _png_group(rows: U8, index: int) -> PngSegment:
        return png_segment(rows[index * MCU_ROWS : (index + 1) * MCU_ROWS])
