"""A resume of rows that each have their own source: `python -m benchmarks.distinct_sources [N]`.

Writes N distinct source JPEGs (the benchmark's photo-like image, a few bytes apart) and a
manifest of one row each, edits them once through the library runner against the emulator
(small outputs, a local folder), then resumes three times on the same output: with the
source digests the first run kept (`index/sources/`), without them (moved aside: every
source read and hashed again, as before they existed), and with them again. Prints wall and
CPU seconds of each resume, in this process. Figures vary with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.engine.source_digests import PREFIX

from .data import make_source

DEFAULT_ROWS = 10_000


def write_inputs(work: Path, rows: int) -> Path:
    src = work / "src"
    src.mkdir(parents=True, exist_ok=True)
    base = make_source(0)
    lines = ["id,image,prompt,seed,size,output_format"]
    for i in range(rows):
        path = src / f"p{i}.jpg"
        # Bytes after a JPEG's end are ignored by decoders: the same image, another digest.
        path.write_bytes(base + i.to_bytes(4, "little"))
        lines.append(f"r{i},{path},a starry sky,{i},1024x1024,jpeg")
    manifest = work / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", type=int, nargs="?", default=DEFAULT_ROWS)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    work = Path(tempfile.mkdtemp(prefix="imgedit-distinct-"))
    try:
        manifest = write_inputs(work, args.rows)
        out = work / "out"
        digests, aside = out / PREFIX, work / "digests-aside"
        with EmulatorProcess(EmulatorConfig(latency=0.0, output_scale=0.0625)) as emu:
            opts = RunOptions(
                manifest=str(manifest),
                output=str(out),
                api_base=emu.base_url,
                concurrency=64,
                fixed_concurrency=True,
            )
            t0 = time.perf_counter()
            first = asyncio.run(run_manifest(opts))
            print(f"edit {args.rows} rows: {time.perf_counter() - t0:.1f} s, {first.by_status}")
            for label in ("with digests", "without digests", "with digests again"):
                if label == "without digests":
                    shutil.move(str(digests), aside)
                t0, c0 = time.perf_counter(), time.process_time()
                summary = asyncio.run(run_manifest(opts))
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if label == "without digests":
                    # That run filed the digests again; keep the first run's.
                    shutil.rmtree(digests, ignore_errors=True)
                    shutil.move(str(aside), digests)
                skipped = summary.by_status.get("skipped", 0)
                print(f"resume {label}: {wall:.2f} s wall, {cpu:.2f} s CPU, {skipped} skipped")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
