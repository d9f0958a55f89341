"""Cheap facts about image bytes (format, size, completeness) from headers, not a full decode."""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from pipeline.errors import InvalidImageError

_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "GIF": "gif", "WEBP": "webp", "AVIF": "avif"}


@dataclass(frozen=True)
class ImageInfo:
    format: str  # one of spec.OUTPUT_FORMATS
    width: int
    height: int
    mode: str

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


def probe(data: bytes, *, check_complete: bool = True) -> ImageInfo:
    """Format and dimensions of `data`, raising InvalidImageError for anything unusable.

    Reads the header only. With `check_complete`, also rejects truncated files by their
    trailers (PNG IEND, JPEG EOI, RIFF length, GIF trailer), which costs no decode.
    Dimensions past Pillow's decompression-bomb limit are refused here too.
    """
    if not data:
        raise InvalidImageError("empty file")
    try:
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS Pillow warns, past twice that it raises: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = _PIL_FORMATS.get(im.format or "")
                width, height = im.size
                mode = im.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"image dimensions exceed the safety limit ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError("not an image (unrecognised bytes)") from exc
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise InvalidImageError(f"unreadable image header: {exc}") from exc
    if fmt is None:
        raise InvalidImageError("unsupported image format")
    if width <= 0 or height <= 0:
        raise InvalidImageError("image has no pixels")
    if check_complete and not _looks_complete(fmt, data):
        raise InvalidImageError(f"truncated {fmt.upper()} data")
    return ImageInfo(fmt, width, height, mode)


def _looks_complete(fmt: str, data: bytes) -> bool:
    if fmt == "png":
        # The last chunk is IEND: length 0, type, CRC.
        return data[-12:-4] == b"\x00\x00\x00\x00IEND"
    if fmt == "jpeg":
        # EOI, allowing for trailing padding some encoders add.
        return b"\xff\xd9" in data[-64:]
    if fmt == "gif":
        return data.rstrip(b"\x00")[-1:] == b";"
    if fmt == "webp":
        if len(data) < 12:
            return False
        riff_len: int = struct.unpack("<I", data[4:8])[0]
        return len(data) >= riff_len + 8
    if fmt == "avif":
        return _isobmff_complete(data)
    return True


def _isobmff_complete(data: bytes) -> bool:
    """Every top-level box of an ISO-BMFF file (AVIF) fits in the data."""
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            return False
        size, _ = struct.unpack(">I4s", data[pos : pos + 8])
        if size == 1:
            if end - pos < 16:
                return False
            (size,) = struct.unpack(">Q", data[pos + 8 : pos + 16])
        elif size == 0:
            return True
        if size < 8 or pos + size > end:
            return False
        pos += size
    return True
