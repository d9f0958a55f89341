"""The benchmark command runs end to end at tiny sizes (it proves the command, not speed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw

from pipeline.emulator import render

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT_S = 240


@pytest.mark.integration
def test_benchmark_command_runs_every_part_at_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench",
            "--rows", "12",
            "--concurrency", "4",
            "--latency", "0.05",
            "--reps", "1",
            "--cpu-reps", "1",
            "--scale-rows", "30,90",
            "--no-scale-flow",
            "--workdir", str(tmp_path / "work"),
            "--prefect-home", str(tmp_path / "prefect-home"),
            "--json", str(out),
        ],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1. Latency-bound" in proc.stdout and "Targets" in proc.stdout
    result = json.loads(out.read_text())
    summary = result["summary"]

    latency = summary["latency"]["variants"]
    assert set(latency) == {"baseline", "runner", "flow"}
    for name, row in latency.items():
        assert row["run_s"] > 0 and row["total_s"] >= row["run_s"], name
    cpu = summary["cpu"]["variants"]
    assert cpu["baseline"]["cpu_vs_baseline"] == pytest.approx(1.0)
    assert cpu["runner"]["cpu_ms_per_image_run"] > 0

    # Every edit run did all its rows (the bench checks the emulator's ledger too).
    edits = [r for r in result["runs"] if r["part"] in ("latency", "cpu")]
    assert len(edits) == 6
    assert all(r["succeeded"] == 12 for r in edits)
    # Resumes found every job done and sent nothing.
    resumes = {r["rows"]: r for r in result["runs"] if r.get("case", "").startswith("resume-")}
    assert set(resumes) == {30, 90}
    assert all(r["skipped_by_reason"] == {"done": r["rows"]} for r in resumes.values())
    validate = next(r for r in result["runs"] if r["variant"] == "validate")
    assert validate["rows"] == 90 and validate["valid"] == 90
    assert {t["target"].split(" ")[0] for t in summary["targets"]} >= {"latency-bound", "CPU"}


def _draw_caption_directly(layout: render.Layout, prompt: str, seed: int) -> Image.Image:
    """The caption as render_bands drew it before its text cache: every line with draw.text."""
    tint = render.tint_colour(prompt, seed, 0)
    luminance = 0.299 * tint[0] + 0.587 * tint[1] + 0.114 * tint[2]
    ink = (16, 16, 16) if luminance > 140 else (245, 245, 245)
    strip = Image.new("RGB", (layout.width, layout.caption), tint)
    draw = ImageDraw.Draw(strip)
    pad = max(4, round(layout.height * render.CAPTION_PADDING_FRACTION))
    font_px = max(
        8,
        int((layout.caption - 2 * pad) / ((render.CAPTION_PROMPT_LINES + 1) * render.LINE_SPACING)),
    )
    lines = render.caption_lines(prompt, int((layout.width - 2 * pad) / (font_px * 0.5)))
    lines.append(f"seed {seed}  ·  image 1/1")
    for i, line in enumerate(lines):
        draw.text((pad, pad + i * font_px * render.LINE_SPACING), line, font=render._font(font_px),
                  fill=ink)  # fmt: skip
    return strip


@pytest.mark.parametrize("prompt", ["", "x", "make it blue " * 30])
def test_cached_caption_has_the_pixels_of_drawing_it(prompt: str) -> None:
    layout = render.layout_for(1024, 1024)
    for seed in (1, 2):  # the second draw of the prompt comes from the cache
        _, strip = render.render_bands(layout, prompt=prompt, seed=seed, variant=0, n=1)
        expected = _draw_caption_directly(layout, prompt, seed)
        assert ImageChops.difference(strip, expected).getbbox() is None
