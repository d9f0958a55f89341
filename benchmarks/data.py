"""Benchmark inputs: source images, manifests, and "already done" results for resume tests."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline import spec
from pipeline.engine import layout
from pipeline.engine.jobkey import job_key
from pipeline.manifest.types import EditParams

# A catalogue photo: a 0.8 MP JPEG of ~130 kB (gradients, shapes, grain). A handful of
# distinct ones keeps the emulator's base cache warm (it is a test double; its cost must not
# be what the benchmark measures).
SOURCE_SIZE = (1024, 768)
SOURCE_COUNT = 8
SOURCE_QUALITY = 85
# Grain, so the JPEG weighs what a photo does rather than what a flat drawing does.
GRAIN_SIGMA = 16
GRAIN_BLEND = 0.25
# JPEG output is the emulator's fast path (spliced bands, no full re-encode) and what a
# catalogue pipeline would ask for; PNG would make the emulator, not the pipeline, the cost.
OUTPUT_FORMAT = "jpeg"
OUTPUT_SIZE = "1024x1024"
MANIFEST_COLUMNS = ("id", "image", "prompt", "seed", "size", "output_format")
PROMPTS = (
    "replace the background with a plain light grey studio backdrop",
    "make the product look like it is lit by warm evening sunlight",
    "remove the reflections and add a soft drop shadow",
    "turn the scene into a watercolour illustration",
)


def make_source(index: int) -> bytes:
    """A deterministic photo-like JPEG: gradients, shapes and some grain."""
    w, h = SOURCE_SIZE
    im = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    draw = ImageDraw.Draw(im)
    rnd = hashlib.sha256(f"source-{index}".encode()).digest()
    for i in range(12):
        x, y = rnd[i] * w // 256, rnd[i + 12] * h // 256
        r = 40 + rnd[i + 4] % 160
        colour = (rnd[i], rnd[(i + 7) % 32], rnd[(i + 13) % 32])
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    # effect_noise is seeded by nothing we control: derive the grain from the index instead.
    grain = Image.frombytes("L", SOURCE_SIZE, _grain_bytes(index, w * h))
    grain = grain.point(lambda v: 128 + (v - 128) * GRAIN_SIGMA // 64).convert("RGB")
    im = Image.blend(im, grain, GRAIN_BLEND)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=SOURCE_QUALITY)
    return out.getvalue()


def _grain_bytes(index: int, n: int) -> bytes:
    seed = hashlib.sha256(f"grain-{index}".encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.shake_256(seed + counter.to_bytes(4, "big")).digest(1 << 16)
        counter += 1
    return bytes(out[:n])


def write_sources(folder: Path, count: int = SOURCE_COUNT) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"source-{i}.jpg"
        if not path.exists():
            path.write_bytes(make_source(i))
        paths.append(path)
    return paths


def manifest_rows(sources: Sequence[Path], rows: int) -> Iterator[dict[str, str]]:
    """Distinct jobs (the seed differs per row), cycling over the sources and prompts."""
    for i in range(rows):
        yield {
            "id": f"bench-{i:07d}",
            "image": str(sources[i % len(sources)]),
            "prompt": PROMPTS[i % len(PROMPTS)],
            "seed": str(i),
            "size": OUTPUT_SIZE,
            "output_format": OUTPUT_FORMAT,
        }


def write_manifest(path: Path, sources: Sequence[Path], rows: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(manifest_rows(sources, rows))
    return path


def done_job_keys(
    sources: Sequence[Path], rows: int, model: str = spec.DEFAULT_MODEL
) -> Iterator[str]:
    """The job keys the pipeline computes for `manifest_rows(sources, rows)`."""
    shas = [hashlib.sha256(p.read_bytes()).hexdigest() for p in sources]
    params = EditParams(size=OUTPUT_SIZE, output_format=OUTPUT_FORMAT)
    for row in manifest_rows(sources, rows):
        yield job_key(
            model=model,
            image_sha256=[shas[int(row["seed"]) % len(sources)]],
            mask_sha256=None,
            prompt=row["prompt"],
            seed=int(row["seed"]),
            params=params,
        )


def sidecar_body(key: str) -> bytes:
    """A minimal sidecar: only its existence matters to planning."""
    return json.dumps({"job_key": key, "benchmark": True}).encode()


def populate_done(put: Callable[[str, bytes], object], sources: Sequence[Path], rows: int) -> int:
    """Write the sidecar of every job of the manifest through `put(key, data)`."""
    count = 0
    for key in done_job_keys(sources, rows):
        put(layout.sidecar_key(key), sidecar_body(key))
        count += 1
    return count
