"""PNG and JPEG files assembled from separately compressed bands of rows.

An edited picture differs from its cached look only in a bar at the top, a caption strip at
the bottom and the few row groups its seeded stamps touch (see look). The look's middle rows
are compressed once; each output then only compresses its bands and touched groups and
splices the pieces together. PNG: each 16-row group of the middle is a sync-flushed raw
deflate segment in its own IDAT chunk, and the checksum is combined from the pieces'. JPEG:
every MCU row is its own restart interval, so rows are exchangeable as bytes. A spliced JPEG
is byte-identical to encoding the whole picture; a spliced PNG decodes to the same pixels.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

MCU_ROWS = 16  # 4:2:0 chroma subsampling: an MCU is 16x16 pixels
JPEG_SUBSAMPLING = "4:2:0"
_JPEG_SOS = b"\xff\xda"
_JPEG_EOI = b"\xff\xd9"
_JPEG_RST = re.compile(rb"\xff[\xd0-\xd7]")
PNG_LEVEL = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib header for a 32 KiB window deflate stream (FLEVEL is advisory only).
ZLIB_HEADER = b"\x78\x01"
ADLER_BASE = 65521
FILTER_SUB = 1
FILTER_UP = 2


@dataclass(frozen=True)
class PngSegment:
    chunk: bytes  # a complete IDAT chunk holding a sync-flushed raw deflate segment
    adler: int  # adler32 of the segment's uncompressed scanlines
    raw_len: int


@dataclass(frozen=True)
class JpegParts:
    header: bytes  # SOI up to the end of the SOS segment
    rows: list[bytes]  # entropy-coded data of each MCU row, restart markers removed


# --- PNG -------------------------------------------------------------------------------------


def png_segment(rows: np.ndarray) -> PngSegment:
    """The middle piece of a spliced PNG, for an (h, w, 3) uint8 block of rows."""
    raw = _filter_rows(rows, up=True)
    return PngSegment(_chunk(b"IDAT", _deflate(raw, final=False)), zlib.adler32(raw), len(raw))


def spliced_png(
    width: int,
    height: int,
    top: Image.Image,
    middle: Sequence[PngSegment],
    strip: Image.Image,
) -> bytes:
    """The RGB PNG of `top`, then the `middle` segments' rows, then `strip`, stacked
    (width x height)."""
    top_raw = _filter_rows(np.asarray(top), up=False)
    strip_raw = _filter_rows(np.asarray(strip), up=False)
    adler = zlib.adler32(top_raw)
    for segment in middle:
        adler = adler32_combine(adler, segment.adler, segment.raw_len)
    adler = adler32_combine(adler, zlib.adler32(strip_raw), len(strip_raw))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", ihdr),
            _chunk(b"IDAT", ZLIB_HEADER + _deflate(top_raw, final=False)),
            *(segment.chunk for segment in middle),
            _chunk(b"IDAT", _deflate(strip_raw, final=True) + struct.pack(">I", adler)),
            _chunk(b"IEND", b""),
        )
    )


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """adler32 of A+B from adler32(A), adler32(B) and len(B) (zlib's adler32_combine)."""
    rem = len2 % ADLER_BASE
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % ADLER_BASE
    sum1 = (sum1 + (adler2 & 0xFFFF) + ADLER_BASE - 1) % ADLER_BASE
    sum2 = (sum2 + (adler1 >> 16) + (adler2 >> 16) + ADLER_BASE - rem) % ADLER_BASE
    return sum1 | (sum2 << 16)


def _filter_rows(rows: np.ndarray, *, up: bool) -> bytes:
    """PNG scanlines for an (h, w, 3) uint8 block whose first row must not look upward.

    The first row always uses Sub, so a block decodes the same whatever precedes it; the
    others use Up (photographs) or Sub (flat bands with text).
    """
    h, w, _ = rows.shape
    flat = rows.reshape(h, w * 3)
    out = np.empty((h, w * 3 + 1), dtype=np.uint8)
    sub = flat.copy()
    sub[:, 3:] -= flat[:, :-3]
    if up and h > 1:
        out[0, 0] = FILTER_SUB
        out[0, 1:] = sub[0]
        out[1:, 0] = FILTER_UP
        np.subtract(flat[1:], flat[:-1], out=out[1:, 1:])
    else:
        out[:, 0] = FILTER_SUB
        out[:, 1:] = sub
    return out.tobytes()


def _deflate(raw: bytes, *, final: bool) -> bytes:
    comp = zlib.compressobj(PNG_LEVEL, zlib.DEFLATED, -15)
    return comp.compress(raw) + comp.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
    )


# --- JPEG ------------------------------------------------------------------------------------


def encode_jpeg(picture: Image.Image, quality: int) -> bytes:
    # Baseline, standard Huffman tables, a restart marker after every MCU row: each row's
    # entropy-coded data then depends on nothing but its own pixels and the quality.
    out = io.BytesIO()
    picture.save(
        out,
        "JPEG",
        quality=quality,
        subsampling=JPEG_SUBSAMPLING,
        optimize=False,
        progressive=False,
        restart_marker_rows=1,
    )
    return out.getvalue()


def jpeg_parts(picture: Image.Image, quality: int) -> JpegParts:
    """`picture` as a JPEG header and the entropy-coded data of each MCU row."""
    return _split_jpeg(encode_jpeg(picture, quality))


def spliced_jpeg(
    top: Image.Image, header: bytes, middle: list[bytes], strip: Image.Image, quality: int
) -> bytes:
    """The JPEG of `top`, then the `middle` MCU rows, then `strip`, under `header` (the whole
    picture's, encoded at the same quality)."""
    rows = [
        *jpeg_parts(top, quality).rows,
        *middle,
        *jpeg_parts(strip, quality).rows,
    ]
    pieces = [header]
    for i, row in enumerate(rows):
        if i:
            pieces.append(bytes((0xFF, 0xD0 + (i - 1) % 8)))
        pieces.append(row)
    pieces.append(_JPEG_EOI)
    return b"".join(pieces)


def _split_jpeg(data: bytes) -> JpegParts:
    pos = 2  # after SOI
    while True:
        marker = data[pos : pos + 2]
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
        if marker == _JPEG_SOS:
            break
    if not data.endswith(_JPEG_EOI):
        raise ValueError("JPEG encoder output does not end with EOI")
    # Inside entropy-coded data 0xFF is always followed by 0x00, so this split is exact.
    return JpegParts(data[:pos], _JPEG_RST.split(data[pos:-2]))
