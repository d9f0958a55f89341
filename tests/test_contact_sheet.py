"""Contact sheets: a valid PNG, one line per sampled row, source and result side by side."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
from moto import mock_aws
from PIL import Image, ImageDraw, ImageFont

from pipeline import layout
from pipeline.contact_sheet import (
    contact_sheet,
    sample_rows,
    sheet_geometry,
    wrap,
    write_contact_sheet,
)
from pipeline.emulator import EmulatorProcess
from pipeline.engine import RunOptions, run_manifest
from pipeline.results import ResultRow, rows_to_table
from pipeline.storage import LocalStorage
from tests.conftest import image_bytes

THUMB = 64
RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)
WHITE = (255, 255, 255)


def region(sheet: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(sheet.crop(box).convert("RGB"), dtype=np.int16)


def share_near(pixels: np.ndarray, colour: Sequence[int], tolerance: int = 6) -> float:
    """The share of pixels within `tolerance` of `colour` on every channel."""
    close = np.all(np.abs(pixels - np.array(colour, dtype=np.int16)) <= tolerance, axis=-1)
    return float(close.mean())


def open_png(data: bytes) -> Image.Image:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "PNG"
    return im


def make_results(tmp_path: Path, colours: list[tuple[int, int, int]]) -> list[ResultRow]:
    """One succeeded row per colour: a square source of it, a white result with a stripe."""
    rows = []
    for i, colour in enumerate(colours, 1):
        src = tmp_path / f"src-{i}.png"
        src.write_bytes(image_bytes((48, 48), colour))
        out = tmp_path / f"out-{i}.png"
        result = Image.new("RGB", (80, 40), WHITE)
        ImageDraw.Draw(result).rectangle((0, 0, 79, 9), fill=colour)
        result.save(out)
        rows.append(
            ResultRow(
                row=i * 2,
                id=f"img-{i}",
                status="succeeded",
                prompt=f"prompt number {i}",
                seed=i,
                source_uris=[str(src)],
                output_uris=[str(out)],
            )
        )
    return rows


def test_one_line_per_row_source_beside_result(tmp_path: Path) -> None:
    rows = make_results(tmp_path, [RED, GREEN, BLUE])
    rows.append(ResultRow(row=1, id="bad", status="failed", source_uris=[str(tmp_path / "x")]))
    png = contact_sheet(rows_to_table(rows), thumb=THUMB, title="run r1")
    sheet = open_png(png)
    geo = sheet_geometry(3, THUMB)
    assert sheet.size == (geo.width, geo.height)
    for line, colour in enumerate([RED, GREEN, BLUE]):
        source = region(sheet, geo.source_box(line))
        assert share_near(source, colour) > 0.97  # a square source fills its cell
        result = region(sheet, geo.result_box(line))
        assert share_near(result, colour) < 0.3  # mostly white: the edit shows
        assert share_near(result, WHITE) > 0.3
        caption = region(sheet, geo.caption_box(line))
        assert share_near(caption, (250, 250, 250), 0) < 0.99  # some text was drawn


def test_sampling_is_deterministic_and_in_row_order(tmp_path: Path) -> None:
    rows = [
        ResultRow(
            row=i,
            id=f"r{i}",
            status="succeeded" if i % 3 else "failed",
            output_uris=[f"/o/{i}.png"],
        )
        for i in range(1, 61)
    ]
    table = rows_to_table(rows)

    def pick(seed: int) -> list[int]:
        kept, total = sample_rows(table, lambda u: b"", sample=5, seed=seed)
        assert total == 40
        return [r["row"] for r in kept]

    first = pick(1)
    assert first == pick(1) and first == sorted(first) and len(first) == 5
    assert all(r % 3 for r in first)  # failed rows are never shown
    assert len({tuple(pick(s)) for s in range(6)}) > 1
    kept, total = sample_rows(table, lambda u: b"", sample=100, seed=0)
    assert total == 40 and len(kept) == 40


def test_sample_smaller_than_the_run(tmp_path: Path) -> None:
    table = rows_to_table(make_results(tmp_path, [RED, GREEN, BLUE, RED, GREEN]))
    sheet = open_png(contact_sheet(table, thumb=THUMB, sample=2, seed=3))
    assert sheet.size == (sheet_geometry(2, THUMB).width, sheet_geometry(2, THUMB).height)
    assert contact_sheet(table, thumb=THUMB, sample=2, seed=3) == contact_sheet(
        table, thumb=THUMB, sample=2, seed=3
    )


def test_no_succeeded_rows_still_gives_a_png(tmp_path: Path) -> None:
    table = rows_to_table([ResultRow(row=1, id="a", status="failed")])
    sheet = open_png(contact_sheet(table, thumb=THUMB))
    geo = sheet_geometry(0, THUMB)
    assert sheet.size == (geo.width, geo.height) and geo.height > geo.header


def test_unreadable_images_become_grey_cells(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"not an image")
    row = ResultRow(
        row=1,
        id="a",
        status="succeeded",
        prompt="p",
        source_uris=[str(tmp_path / "missing.png")],
        output_uris=[str(tmp_path / "junk.png")],
    )
    sheet = open_png(contact_sheet(rows_to_table([row]), thumb=THUMB))
    geo = sheet_geometry(1, THUMB)
    for box in (geo.source_box(0), geo.result_box(0)):
        assert share_near(region(sheet, box), (160, 160, 160), 0) > 0.5


def test_results_from_a_parquet_file_and_images_on_s3(
    tmp_path: Path, aws_credentials: None
) -> None:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bkt")
        client.put_object(Bucket="bkt", Key="s/a.png", Body=image_bytes((32, 32), GREEN))
        client.put_object(Bucket="bkt", Key="o/a.png", Body=image_bytes((32, 32), BLUE))
        row = ResultRow(
            row=1,
            id="a",
            status="succeeded",
            prompt="p",
            source_uris=["s3://bkt/s/a.png"],
            output_uris=["s3://bkt/o/a.png"],
        )
        storage = LocalStorage(tmp_path / "out")
        results = tmp_path / "results.parquet"
        pq.write_table(rows_to_table([row]), results)
        png = contact_sheet(results, thumb=THUMB)
    sheet = open_png(png)
    geo = sheet_geometry(1, THUMB)
    assert share_near(region(sheet, geo.source_box(0)), GREEN) > 0.97
    assert share_near(region(sheet, geo.result_box(0)), BLUE) > 0.97
    uri = write_contact_sheet(storage, "r1", png)
    assert uri == str(tmp_path / "out" / "runs" / "r1" / "contact-sheet.png")
    assert Path(uri).read_bytes() == png
    assert layout.contact_sheet_key("r1") == "runs/r1/contact-sheet.png"


def test_long_prompts_wrap_and_are_cut() -> None:
    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = ImageFont.load_default(size=12)
    text = " ".join(["word"] * 200) + " " + "x" * 300
    lines = wrap(draw, text, font, 120, 4)
    assert len(lines) == 4 and lines[-1].endswith("...")
    assert all(draw.textlength(line, font=font) <= 120 for line in lines)
    assert wrap(draw, "short prompt", font, 120, 4) == ["short prompt"]
    (only,) = wrap(draw, "y" * 300, font, 120, 1)
    assert only.endswith("...") and draw.textlength(only, font=font) <= 120


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"sample": 0}, "sample"), ({"thumb": 8}, "thumb")]
)
def test_bad_sizes_are_refused(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        contact_sheet(rows_to_table([]), **kwargs)  # type: ignore[arg-type]


@pytest.mark.integration
async def test_contact_sheet_of_a_real_run(tmp_path: Path, emulator: EmulatorProcess) -> None:
    colours = {"red": RED, "green": GREEN, "blue": BLUE}
    lines = ["id,image,prompt,seed"]
    for name, colour in colours.items():
        (tmp_path / f"{name}.png").write_bytes(image_bytes((64, 64), colour))
        lines.append(f"{name},{tmp_path / name}.png,make the {name} square a circle,{len(name)}")
    lines.append("gone,/nope.png,p,1")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    opts = RunOptions(
        manifest=str(tmp_path / "m.csv"),
        output=str(tmp_path / "out"),
        api_base=emulator.base_url,
        run_id="real",
    )
    summary = await run_manifest(opts)
    assert summary.by_status["succeeded"] == 3
    png = contact_sheet(summary.results_uri, thumb=THUMB, title=f"run {summary.run_id}")
    uri = write_contact_sheet(LocalStorage(tmp_path / "out"), summary.run_id, png)
    sheet = open_png(Path(uri).read_bytes())
    geo = sheet_geometry(3, THUMB)
    assert sheet.size == (geo.width, geo.height)
    for line, colour in enumerate(colours.values()):  # row order: red, green, blue
        assert share_near(region(sheet, geo.source_box(line)), colour) > 0.97
        # The emulator keeps the source under tinted bands and a caption: not the same picture.
        assert share_near(region(sheet, geo.result_box(line)), colour) < 0.9
