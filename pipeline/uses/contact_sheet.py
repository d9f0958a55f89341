"""Before/after contact sheets: a PNG with source and result thumbnails of sampled rows.

One line per sampled row: the source image (the one edited), the result (its first output),
each scaled to fit a `thumb` x `thumb` cell, then a caption: the row's id, row number, seed
(and how many outputs the row has), and its prompt wrapped to the caption column (cut with
`...` when long). A header says which run and how many rows are shown. Rows are the
`succeeded` rows of a results table, sampled deterministically (reservoir sampling with a
seeded generator, shown in row order); a run with fewer rows shows them all; one with none
still gives a valid PNG that says so. An image that cannot be read or decoded becomes a grey
cell naming the problem instead of failing the sheet. The default font has Latin glyphs;
other scripts in prompts may show as boxes.

`preview_jpeg` makes a small JPEG of a sheet, to embed where every byte is stored (a Prefect
artifact): scaled down, its quality lowered, until its base64 fits `PREVIEW_MAX_BASE64`.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from pipeline.engine import layout
from pipeline.errors import ImgEditError
from pipeline.imageinfo import probe
from pipeline.io.netguard import AddressPolicy
from pipeline.io.storage import Storage
from pipeline.io.uri import UriReader
from pipeline.uses.catalogue import iter_parquet_batches

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SAMPLE",
    "DEFAULT_THUMB",
    "PREVIEW_MAX_BASE64",
    "ContactSheet",
    "SheetGeometry",
    "jpeg_data_uri",
    "preview_jpeg",
    "render_contact_sheet",
    "sample_rows",
    "sheet_geometry",
    "write_contact_sheet",
]

DEFAULT_SAMPLE = 12
DEFAULT_THUMB = 256
MIN_THUMB = 32
MAX_THUMB = 1024
MAX_SAMPLE = 500
READ_ROWS = 8192
LOAD_WORKERS = 8
# The caption column is this many thumbnails wide.
CAPTION_WIDTH_FACTOR = 1.5
# Spacing and text size as fractions of the thumbnail size (so a sheet scales as a whole).
MARGIN_FRACTION = 1 / 16
GAP_FRACTION = 1 / 32
FONT_FRACTION = 1 / 16
MIN_FONT_PX = 10
LINE_SPACING = 1.3
HEADER_LINES = 3
ELLIPSIS = "..."
PAGE_RGB = (250, 250, 250)
CELL_RGB = (224, 224, 224)
# Transparent images are shown over this, so their transparent parts read as "nothing".
BACKDROP_RGB = (128, 128, 128)
ERROR_RGB = (160, 160, 160)
INK_RGB = (20, 20, 20)
MUTED_RGB = (100, 100, 100)
# The preview's cap, in characters of base64 (its data URI is stored in Prefect's database with
# the artifact, and sent to every browser that opens it): ~225 kB of JPEG.
PREVIEW_MAX_BASE64 = 300_000
# Its longest side at most (JPEG's own limit is 65,535): a 500-row sheet is ~130k pixels tall.
PREVIEW_MAX_SIDE = 16_384
# Qualities tried at each size before a smaller size: below ~50 text gets hard to read.
PREVIEW_QUALITIES = (85, 70, 55)
# Each smaller size is at most this fraction of the last one (by side), at least MIN of it.
PREVIEW_SHRINK_MAX = 0.9
PREVIEW_SHRINK_MIN = 0.5

Reader = Callable[[str], bytes]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SheetGeometry:
    """Where everything goes on a sheet of `rows` lines of `thumb`-pixel cells."""

    rows: int
    thumb: int

    @property
    def margin(self) -> int:
        return max(4, round(self.thumb * MARGIN_FRACTION))

    @property
    def gap(self) -> int:
        return max(2, round(self.thumb * GAP_FRACTION))

    @property
    def font_px(self) -> int:
        return max(MIN_FONT_PX, round(self.thumb * FONT_FRACTION))

    @property
    def line_px(self) -> int:
        return round(self.font_px * LINE_SPACING)

    @property
    def caption_width(self) -> int:
        return round(self.thumb * CAPTION_WIDTH_FACTOR)

    @property
    def header(self) -> int:
        return self.margin + HEADER_LINES * self.line_px

    @property
    def width(self) -> int:
        return 2 * self.margin + 2 * self.thumb + 2 * self.gap + self.caption_width

    @property
    def height(self) -> int:
        if self.rows == 0:
            return self.header + self.thumb // 2 + self.margin
        return self.header + self.rows * self.thumb + (self.rows - 1) * self.gap + self.margin

    def _top(self, line: int) -> int:
        return self.header + line * (self.thumb + self.gap)

    def source_box(self, line: int) -> Box:
        top, left = self._top(line), self.margin
        return left, top, left + self.thumb, top + self.thumb

    def result_box(self, line: int) -> Box:
        top, left = self._top(line), self.margin + self.thumb + self.gap
        return left, top, left + self.thumb, top + self.thumb

    def caption_box(self, line: int) -> Box:
        top, left = self._top(line), self.margin + 2 * (self.thumb + self.gap)
        return left, top, left + self.caption_width, top + self.thumb


def sheet_geometry(rows: int, thumb: int = DEFAULT_THUMB) -> SheetGeometry:
    return SheetGeometry(rows=rows, thumb=thumb)


@dataclass(frozen=True)
class _Line:
    row: int
    id: str | None
    prompt: str | None
    seed: int | None
    source_uri: str | None
    output_uri: str
    outputs: int


_COLUMNS = ["row", "id", "status", "prompt", "seed", "source_uris", "output_uris"]


def sample_rows(
    results: pa.Table | Path | str, reader: Reader, *, sample: int, seed: int
) -> tuple[list[dict[str, Any]], int]:
    """Up to `sample` succeeded rows with an output, in row order, and how many there were."""
    rng = random.Random(seed)
    kept: list[dict[str, Any]] = []
    seen = 0
    for batch in iter_parquet_batches(results, reader, READ_ROWS, _COLUMNS):
        # Filtered in Arrow: a resumed run of 100k rows that are all skipped would otherwise
        # turn every row into a dict (~1 s) to keep none of them.
        eligible = pc.and_(
            pc.equal(batch.column("status"), "succeeded"),
            pc.greater(pc.fill_null(pc.list_value_length(batch.column("output_uris")), 0), 0),
        )
        for record in batch.filter(eligible).to_pylist():
            # Reservoir sampling (algorithm R): each eligible row is kept with equal chance.
            if seen < sample:
                kept.append(record)
            else:
                j = rng.randint(0, seen)
                if j < sample:
                    kept[j] = record
            seen += 1
    return sorted(kept, key=lambda r: r["row"]), seen


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=px)


def _thumbnail(data: bytes, thumb: int) -> Image.Image:
    """The first frame of `data` scaled to fit thumb x thumb, RGB (transparency over grey)."""
    probe(data, check_complete=False)  # refuses non-images and decompression bombs cheaply
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (thumb, thumb))  # JPEG decodes at a fraction of its size: faster
        frame = ImageOps.exif_transpose(im)
        frame.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
        if max(frame.size) < thumb:
            # Small sources are enlarged too: both sides of a line are compared at one scale.
            frame = ImageOps.contain(frame, (thumb, thumb), Image.Resampling.LANCZOS)
        if frame.mode in ("RGBA", "LA", "PA") or (
            frame.mode == "P" and "transparency" in frame.info
        ):
            rgba = frame.convert("RGBA")
            backdrop = Image.new("RGB", rgba.size, BACKDROP_RGB)
            backdrop.paste(rgba, mask=rgba.getchannel("A"))
            return backdrop
        return frame.convert("RGB")


def _load(read: Reader, uri: str | None, thumb: int) -> Image.Image | str:
    """A thumbnail, or the reason there is none (short, for the cell)."""
    if not uri:
        return "no image"
    try:
        return _thumbnail(read(uri), thumb)
    except (ImgEditError, OSError, ValueError, Image.DecompressionBombError) as exc:
        log.warning("contact sheet: cannot show %s: %s", uri, exc)
        return f"cannot show: {type(exc).__name__}"


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, *, cut: bool = False) -> str:
    """`text` if it fits in `width` pixels (and is not `cut`), else its start and `...`."""
    if not cut and draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text.rstrip() + ELLIPSIS, font=font) > width:
        text = text[:-1]
    return text.rstrip() + ELLIPSIS


def wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, max_lines: int) -> list[str]:
    """`text` in at most `max_lines` lines of `width` pixels; cut with `...` if it goes on."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = _fit(draw, word, font, width)  # a word wider than the column is cut
        if len(lines) > max_lines:
            break
    if current:
        lines.append(current)
    if len(lines) <= max_lines:
        return lines
    return [*lines[: max_lines - 1], _fit(draw, lines[max_lines - 1], font, width, cut=True)]


def _paste(
    sheet: Image.Image,
    draw: ImageDraw.ImageDraw,
    box: Box,
    content: Image.Image | str,
    font: Any,
    step: int,
) -> None:
    x0, y0, x1, y1 = box
    if isinstance(content, str):
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=ERROR_RGB)
        for i, line in enumerate(wrap(draw, content, font, x1 - x0 - 8, 3)):
            draw.text((x0 + 4, y0 + 4 + i * step), line, font=font, fill=INK_RGB)
        return
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=CELL_RGB)
    w, h = content.size
    sheet.paste(content, (x0 + (x1 - x0 - w) // 2, y0 + (y1 - y0 - h) // 2))


def _caption(
    draw: ImageDraw.ImageDraw, geo: SheetGeometry, line: int, item: _Line, font: Any, small: Any
) -> None:
    x0, y0, x1, y1 = geo.caption_box(line)
    width = x1 - x0
    step = geo.line_px
    head = _fit(draw, item.id or f"row-{item.row}", font, width)
    draw.text((x0, y0), head, font=font, fill=INK_RGB)
    meta = f"row {item.row} | seed {item.seed if item.seed is not None else 'none'}"
    if item.outputs > 1:
        meta += f" | output 1 of {item.outputs}"
    draw.text((x0, y0 + step), _fit(draw, meta, small, width), font=small, fill=MUTED_RGB)
    room = max(1, (y1 - y0 - 2 * step) // step)
    for i, text in enumerate(wrap(draw, item.prompt or "", font, width, room)):
        draw.text((x0, y0 + (2 + i) * step), text, font=font, fill=INK_RGB)


@dataclass(frozen=True)
class ContactSheet:
    """A rendered sheet: its PNG and size, how many rows it shows, of how many succeeded."""

    png: bytes
    width: int
    height: int
    shown: int
    total: int


def render_contact_sheet(
    results: pa.Table | Path | str,
    *,
    read: Reader | None = None,
    endpoint_url: str | None = None,
    sample: int = DEFAULT_SAMPLE,
    thumb: int = DEFAULT_THUMB,
    seed: int = 0,
    title: str | None = None,
    policy: AddressPolicy | None = None,
) -> ContactSheet:
    """A contact sheet of `results` (a results table, its path or URI), with its row counts.

    Images are read with `read` (a function of a URI), by default a UriReader (local paths,
    s3:// with `endpoint_url`, http(s):// under `policy`, see pipeline.io.netguard). ValueError
    for a sample or thumb out of range.
    """
    if not 1 <= sample <= MAX_SAMPLE:
        raise ValueError(f"sample must be 1 to {MAX_SAMPLE}, not {sample}")
    if not MIN_THUMB <= thumb <= MAX_THUMB:
        raise ValueError(f"thumb must be {MIN_THUMB} to {MAX_THUMB} pixels, not {thumb}")
    own = read is None
    reader: Reader = (
        read if read is not None else UriReader(endpoint_url=endpoint_url, policy=policy)
    )
    try:
        records, total = sample_rows(results, reader, sample=sample, seed=seed)
        lines = [
            _Line(
                row=r["row"],
                id=r["id"],
                prompt=r["prompt"],
                seed=r["seed"],
                source_uri=(r["source_uris"] or [None])[0],
                output_uri=r["output_uris"][0],
                outputs=len(r["output_uris"]),
            )
            for r in records
        ]
        with ThreadPoolExecutor(LOAD_WORKERS, thread_name_prefix="imgedit-sheet") as pool:
            sources = list(pool.map(lambda x: _load(reader, x.source_uri, thumb), lines))
            outputs = list(pool.map(lambda x: _load(reader, x.output_uri, thumb), lines))
    finally:
        if own and isinstance(reader, UriReader):
            reader.close()
    png = _render(lines, sources, outputs, total, thumb, title)
    geo = sheet_geometry(len(lines), thumb)
    return ContactSheet(png, width=geo.width, height=geo.height, shown=len(lines), total=total)


def _render(
    lines: Sequence[_Line],
    sources: Sequence[Image.Image | str],
    outputs: Sequence[Image.Image | str],
    total: int,
    thumb: int,
    title: str | None,
) -> bytes:
    geo = sheet_geometry(len(lines), thumb)
    sheet = Image.new("RGB", (geo.width, geo.height), PAGE_RGB)
    draw = ImageDraw.Draw(sheet)
    font = _font(geo.font_px)
    small = _font(max(MIN_FONT_PX, round(geo.font_px * 0.85)))
    m, step = geo.margin, geo.line_px
    heading = title or "contact sheet"
    draw.text((m, m), _fit(draw, heading, font, geo.width - 2 * m), font=font, fill=INK_RGB)
    if lines:
        count = f"{len(lines)} of {total} succeeded rows" + (
            " (a sample)" if len(lines) < total else ""
        )
        draw.text((m, m + step), count, font=small, fill=MUTED_RGB)
        for label, box in (
            ("source", geo.source_box(0)),
            ("result", geo.result_box(0)),
            ("prompt", geo.caption_box(0)),
        ):
            draw.text((box[0], m + 2 * step), label, font=small, fill=MUTED_RGB)
    else:
        draw.text((m, m + step), "no succeeded rows in this run", font=small, fill=MUTED_RGB)
    for i, item in enumerate(lines):
        _paste(sheet, draw, geo.source_box(i), sources[i], small, step)
        _paste(sheet, draw, geo.result_box(i), outputs[i], small, step)
        _caption(draw, geo, i, item, font, small)
    buf = io.BytesIO()
    # The lowest zlib level: a sheet is viewed once or twice; higher levels spend more time
    # per run for a file a few percent smaller.
    sheet.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def write_contact_sheet(storage: Storage, run_id: str, png: bytes) -> str:
    """Store the sheet at `runs/<run_id>/contact-sheet.png` beside the run's results."""
    return storage.put_bytes(layout.contact_sheet_key(run_id), png, "image/png")


def _base64_len(n: int) -> int:
    return 4 * math.ceil(n / 3)


def _scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """`size` times `scale`; the longer side follows from the rounded shorter one, so the
    aspect ratio holds to half a pixel even for a sheet 100 times taller than wide."""
    w, h = size
    if w <= h:
        w2 = max(1, round(w * scale))
        return w2, max(1, round(h * w2 / w))
    h2 = max(1, round(h * scale))
    return max(1, round(w * h2 / h)), h2


def _open_sheet(png: bytes) -> Image.Image:
    """A sheet's PNG, decoded. Opened as PNG directly: `Image.open` would warn about (past
    twice the limit, refuse) a tall sheet as a possible decompression bomb, but these are
    our own; instead no more pixels are decoded than the largest sheet this module makes."""
    try:
        im = PngImagePlugin.PngImageFile(io.BytesIO(png))
    except (SyntaxError, OSError) as exc:  # Pillow says "not a PNG file" with SyntaxError
        raise ValueError(f"not a contact sheet PNG: {exc}") from exc
    largest = sheet_geometry(MAX_SAMPLE, MAX_THUMB)
    if im.width * im.height > largest.width * largest.height:
        raise ValueError(f"a {im.width} x {im.height} PNG is larger than any contact sheet")
    im.load()
    return im.convert("RGB")


def preview_jpeg(png: bytes, *, max_base64: int = PREVIEW_MAX_BASE64) -> bytes:
    """A JPEG of the sheet `png` whose base64 is at most `max_base64` characters.

    The sheet's own size when that fits (its longest side at most PREVIEW_MAX_SIDE), else
    a lower quality, else smaller (same aspect ratio), each time by about the share that is
    too much. ValueError for bytes that are not such a PNG, or a cap too small for a picture.
    """
    sheet = _open_sheet(png)
    scale = min(1.0, PREVIEW_MAX_SIDE / max(sheet.size))
    while True:
        size = _scaled_size(sheet.size, scale)
        frame = (
            sheet
            if size == sheet.size
            else sheet.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        )
        for quality in PREVIEW_QUALITIES:
            buf = io.BytesIO()
            frame.save(buf, "JPEG", quality=quality, optimize=True)
            length = _base64_len(buf.tell())
            if length <= max_base64:
                return buf.getvalue()
        if min(size) <= 1:
            raise ValueError(f"no JPEG of this sheet fits in {max_base64} characters of base64")
        # JPEG size goes roughly with the area: shrink the sides by the root of the excess.
        shrink = math.sqrt(max_base64 / length) * 0.95
        scale *= min(PREVIEW_SHRINK_MAX, max(PREVIEW_SHRINK_MIN, shrink))


def jpeg_data_uri(jpeg: bytes) -> str:
    """`data:image/jpeg;base64,...` of `jpeg`."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
