"""CPU the emulator's render spends per output, by effect: `python -m benchmarks.emulator_render`.

For each effect word, an edit of the throughput benchmark's photo-like 0.8 MP JPEG source
(benchmarks.data.make_source) to a 1024x1024 output is rendered for many seeds, in this one
thread. Printed per effect: the CPU of making its look once (the effect on the fitted source;
cached per source and effects, like the base), and the CPU of each output once the look is
cached (bands, caption, seeded stamps, the row groups they touch compressed afresh, splicing),
per 1 MP of output, for JPEG (the target: under 10 ms) and PNG. `--json` prints the figures
as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from pipeline.emulator import render
from pipeline.emulator.vocabulary import plan_for

from .data import make_source

TARGET_MS_PER_MP = 10.0
# (label, prompt, number of images: the source, then references)
CASES: tuple[tuple[str, str, int], ...] = (
    ("no effect word", "make the product pop", 1),
    ("night", "Add a starry night sky", 1),
    ("night, milky way", "Add a starry night sky with the milky way", 1),
    ("snow", "a winter scene with snow", 1),
    ("sunset", "at sunset", 1),
    ("watercolour", "as a watercolour painting", 1),
    ("sketch", "a pencil sketch", 1),
    ("neon", "neon cyberpunk", 1),
    ("black and white", "black and white", 1),
    ("white background", "on a white background with a soft shadow", 1),
    ("blur", "blur it", 1),
    ("sharpen", "sharpen it", 1),
    ("references", "use the palette of image 2 and place the logo from image 3", 3),
    ("snowy night", "a snowy night", 1),
    ("snowy sunset, b&w", "a snowy sunset in black and white", 1),
)


def _cpu_ms(work: Callable[[], object]) -> float:
    start = time.process_time()
    work()
    return (time.process_time() - start) * 1000


def measure(
    label: str, prompt: str, images: int, *, size: int, variants: int, quality: int
) -> dict[str, Any]:
    sources = [make_source(i) for i in range(images)]
    holder: list[render.Base] = []
    base_ms = _cpu_ms(lambda: holder.append(render.build_base(sources, None, size, size)))
    base = holder[0]
    look_ms = _cpu_ms(lambda: base.look(plan_for(prompt)))
    mp = size * size / 1e6
    result: dict[str, Any] = {
        "effect": label,
        "prompt": prompt,
        "effects": list(plan_for(prompt).effects),
        "base_ms": round(base_ms, 1),
        "look_ms": round(look_ms, 1),
    }
    for fmt in ("jpeg", "png"):
        # The first output of a format compresses the look's row groups once: not per output.
        first = _cpu_ms(
            lambda fmt=fmt: render.render_variant(
                base,
                prompt=prompt,
                seed=0,
                variant=0,
                n=1,
                output_format=fmt,
                compression=quality if fmt == "jpeg" else None,
            )
        )
        samples = [
            _cpu_ms(
                lambda seed=seed, fmt=fmt: render.render_variant(
                    base,
                    prompt=prompt,
                    seed=seed,
                    variant=0,
                    n=1,
                    output_format=fmt,
                    compression=quality if fmt == "jpeg" else None,
                )
            )
            for seed in range(1, variants + 1)
        ]
        result[f"{fmt}_first_ms"] = round(first, 1)
        result[f"{fmt}_ms_per_mp"] = round(statistics.mean(samples) / mp, 2)
        result[f"{fmt}_p90_ms_per_mp"] = round(statistics.quantiles(samples, n=10)[-1] / mp, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="output side (square)")
    parser.add_argument("--variants", type=int, default=60, help="outputs timed per effect")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    rows = [
        measure(label, prompt, images, size=args.size, variants=args.variants, quality=args.quality)
        for label, prompt, images in CASES
    ]
    worst = max(r["jpeg_ms_per_mp"] for r in rows)
    if args.json:
        print(json.dumps({"target_ms_per_mp": TARGET_MS_PER_MP, "worst": worst, "rows": rows}))
        return
    print(
        f"CPU per output, {args.size}x{args.size}, {args.variants} seeds per effect "
        f"(ms per 1 MP of output; look: once per source and effects)"
    )
    print(f"{'effect':<20} {'look ms':>8} {'JPEG ms/MP':>11} {'p90':>6} {'PNG ms/MP':>10}")
    for r in rows:
        print(
            f"{r['effect']:<20} {r['look_ms']:>8.1f} {r['jpeg_ms_per_mp']:>11.2f} "
            f"{r['jpeg_p90_ms_per_mp']:>6.2f} {r['png_ms_per_mp']:>10.2f}"
        )
    verdict = "within" if worst < TARGET_MS_PER_MP else "OVER"
    print(
        f"worst JPEG: {worst:.2f} ms CPU per 1 MP output, {verdict} the "
        f"{TARGET_MS_PER_MP:g} ms target"
    )


if __name__ == "__main__":
    main()
