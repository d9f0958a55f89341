"""Contact sheets: a valid PNG, one line per sampled row, source and result side by side;
its small JPEG preview, and the markdown of the Prefect artifact that shows it."""

from __future__ import annotations

import base64
import io
import os
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import boto3
import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from moto import mock_aws
from PIL import Image, ImageDraw, ImageFont

from flows.artifacts import (
    PRESIGN_EXPIRY,
    contact_sheet_markdown,
    full_sheet_location,
    publish_contact_sheet,
)
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine import layout
from pipeline.engine.options import RunOptions
from pipeline.engine.results import ResultRow, rows_to_table
from pipeline.engine.run import run_manifest
from pipeline.io.storage import LocalStorage
from pipeline.uses.contact_sheet import (
    MAX_SAMPLE,
    PREVIEW_MAX_BASE64,
    ContactSheet,
    preview_jpeg,
    render_contact_sheet,
    sample_rows,
    sheet_geometry,
    wrap,
    write_contact_sheet,
)
from tests.conftest import image_bytes, served_moto

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
    png = render_contact_sheet(rows_to_table(rows), thumb=THUMB, title="run r1").png
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
    sheet = open_png(render_contact_sheet(table, thumb=THUMB, sample=2, seed=3).png)
    assert sheet.size == (sheet_geometry(2, THUMB).width, sheet_geometry(2, THUMB).height)
    assert (
        render_contact_sheet(table, thumb=THUMB, sample=2, seed=3).png
        == render_contact_sheet(table, thumb=THUMB, sample=2, seed=3).png
    )


def test_no_succeeded_rows_still_gives_a_png(tmp_path: Path) -> None:
    table = rows_to_table([ResultRow(row=1, id="a", status="failed")])
    sheet = open_png(render_contact_sheet(table, thumb=THUMB).png)
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
    sheet = open_png(render_contact_sheet(rows_to_table([row]), thumb=THUMB).png)
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
        png = render_contact_sheet(results, thumb=THUMB).png
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
        render_contact_sheet(rows_to_table([]), **kwargs)  # type: ignore[arg-type]


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
    png = render_contact_sheet(summary.results_uri, thumb=THUMB, title=f"run {summary.run_id}").png
    uri = write_contact_sheet(LocalStorage(tmp_path / "out"), summary.run_id, png)
    sheet = open_png(Path(uri).read_bytes())
    geo = sheet_geometry(3, THUMB)
    assert sheet.size == (geo.width, geo.height)
    for line, colour in enumerate(colours.values()):  # row order: red, green, blue
        assert share_near(region(sheet, geo.source_box(line)), colour) > 0.97
        # The emulator keeps the source under tinted bands and a caption: not the same picture.
        assert share_near(region(sheet, geo.result_box(line)), colour) < 0.9


# --- the preview and the artifact's markdown ---------------------------------------------

DATA_URI_RE = re.compile(r"!\[[^\]]*\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)")
LINK_RE = re.compile(r"\[download\]\((https?://[^)\s]+)\)")
UNTIL_RE = re.compile(r"valid for 7 days, until (\d{4}-\d\d-\d\d \d\d:\d\d) UTC")


def noise_png(path: Path, seed: int, size: tuple[int, int] = (96, 96)) -> str:
    """Random pixels: what JPEG compresses worst, so the preview has to shrink."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def open_jpeg(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "JPEG"
    return im


def assert_same_shape(small: Image.Image, sheet: ContactSheet) -> None:
    """The aspect ratio kept, to within a pixel of the shorter side."""
    ratio = (small.width / small.height) / (sheet.width / sheet.height)
    assert abs(ratio - 1) <= 1 / min(small.size), (small.size, (sheet.width, sheet.height))


@pytest.fixture(scope="module")
def big_sheet(tmp_path_factory: pytest.TempPathFactory) -> ContactSheet:
    """A sheet of MAX_SAMPLE (500) rows of noise: ~35,000 px tall, megabytes of PNG."""
    tmp = tmp_path_factory.mktemp("big")
    images = [noise_png(tmp / f"n{i}.png", i) for i in range(6)]
    rows = [
        ResultRow(
            row=i,
            id=f"img-{i}",
            status="succeeded",
            prompt=f"make picture {i} look like a watercolour painting of a harbour at dusk",
            seed=i,
            source_uris=[images[i % 6]],
            output_uris=[images[(i + 1) % 6]],
        )
        for i in range(1, 601)
    ]
    return render_contact_sheet(rows_to_table(rows), sample=MAX_SAMPLE, thumb=THUMB)


def test_the_preview_of_a_big_sheet_fits_the_cap_and_keeps_its_shape(
    big_sheet: ContactSheet,
) -> None:
    assert big_sheet.shown == MAX_SAMPLE and big_sheet.total == 600
    assert len(base64.b64encode(big_sheet.png)) > 10 * PREVIEW_MAX_BASE64
    jpeg = preview_jpeg(big_sheet.png)
    assert len(base64.b64encode(jpeg)) <= PREVIEW_MAX_BASE64
    small = open_jpeg(jpeg)
    assert small.height < big_sheet.height  # scaled down: it did not fit as it was
    assert_same_shape(small, big_sheet)
    # A tighter cap: smaller still, same shape.
    tiny = preview_jpeg(big_sheet.png, max_base64=40_000)
    assert len(base64.b64encode(tiny)) <= 40_000
    tiny_im = open_jpeg(tiny)
    assert tiny_im.height < small.height
    assert_same_shape(tiny_im, big_sheet)


def test_a_small_sheet_keeps_its_size(tmp_path: Path) -> None:
    sheet = render_contact_sheet(rows_to_table(make_results(tmp_path, [RED, GREEN])), thumb=THUMB)
    im = open_jpeg(preview_jpeg(sheet.png))
    assert im.size == (sheet.width, sheet.height) == open_png(sheet.png).size
    geo = sheet_geometry(2, THUMB)
    # Still the same picture: the red source where the sheet has it.
    assert share_near(region(im, geo.source_box(0)), RED, tolerance=24) > 0.9


def test_the_preview_refuses_what_is_not_a_sheet() -> None:
    with pytest.raises(ValueError, match="not a contact sheet PNG"):
        preview_jpeg(b"GIF89a not a png")
    with pytest.raises(ValueError, match="fits"):
        preview_jpeg(image_bytes((64, 64)), max_base64=10)


def sample_sheet(tmp_path: Path) -> ContactSheet:
    table = rows_to_table(make_results(tmp_path, [RED, GREEN, BLUE, RED, GREEN]))
    return render_contact_sheet(table, thumb=THUMB, sample=3)


def embedded_jpeg(markdown: str) -> Image.Image:
    (encoded,) = DATA_URI_RE.findall(markdown)
    return open_jpeg(base64.b64decode(encoded))


def test_markdown_for_a_local_output(tmp_path: Path) -> None:
    sheet = sample_sheet(tmp_path)
    uri = write_contact_sheet(LocalStorage(tmp_path / "out"), "r1", sheet.png)
    where = full_sheet_location(uri, None)
    markdown = contact_sheet_markdown("r1", sheet, where, preview=preview_jpeg(sheet.png))
    assert "### Contact sheet of run `r1`" in markdown
    assert "3 of 5 succeeded rows (a sample" in markdown
    assert_same_shape(embedded_jpeg(markdown), sheet)
    # The full sheet's absolute path, as text: browsers do not follow file:// from a page.
    assert f"`{tmp_path / 'out' / 'runs' / 'r1' / 'contact-sheet.png'}`" in markdown
    assert "file:" not in markdown and "](/" not in markdown
    text_only = contact_sheet_markdown("r1", sheet, where, preview=None)
    assert "data:" not in text_only and "No preview" in text_only


@pytest.fixture
def long_term_credentials(aws_credentials: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_SESSION_TOKEN")


def test_markdown_for_s3_has_a_presigned_link_and_its_expiry(
    tmp_path: Path, long_term_credentials: None
) -> None:
    sheet = sample_sheet(tmp_path)
    uri = "s3://bkt/out/runs/r1/contact-sheet.png"
    before = datetime.now(UTC).replace(second=0, microsecond=0)
    with mock_aws():  # no request leaves; moto's own fake keys sign
        where = full_sheet_location(uri, None)
        secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    markdown = contact_sheet_markdown("r1", sheet, where, preview=preview_jpeg(sheet.png))
    assert_same_shape(embedded_jpeg(markdown), sheet)
    (link,) = LINK_RE.findall(markdown)
    parts = urlsplit(link)
    query = parse_qs(parts.query)
    assert parts.scheme == "https" and parts.path.endswith("/out/runs/r1/contact-sheet.png")
    # SigV4 (buckets made since 2020 refuse SigV2), for as long as the text says.
    assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
    assert query["X-Amz-Expires"] == [str(int(PRESIGN_EXPIRY.total_seconds()))]
    assert "X-Amz-Security-Token" not in query
    for form in (secret, quote(secret, safe=""), base64.b64encode(secret.encode()).decode()):
        assert form not in markdown
    (until,) = UNTIL_RE.findall(markdown)
    stated = datetime.strptime(until, "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    assert before + timedelta(days=7) <= stated <= datetime.now(UTC) + timedelta(days=7)
    assert f"`{uri}`" in markdown


def test_no_presigned_link_with_temporary_credentials(
    tmp_path: Path, aws_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "session-token-that-must-not-be-stored"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    with mock_aws():
        where = full_sheet_location("s3://bkt/out/runs/r1/contact-sheet.png", None)
    assert token not in where and "Security-Token" not in where and "http" not in where
    assert "not available with temporary credentials" in where
    assert "`s3://bkt/out/runs/r1/contact-sheet.png`" in where


@pytest.fixture
def moto_endpoint(long_term_credentials: None) -> Iterator[str]:
    with served_moto() as endpoint:
        yield endpoint


@pytest.mark.integration
def test_the_presigned_link_fetches_the_sheet_from_the_outputs_endpoint(
    tmp_path: Path, moto_endpoint: str
) -> None:
    client = boto3.client("s3", endpoint_url=moto_endpoint)
    client.create_bucket(Bucket="sheets")
    png = sample_sheet(tmp_path).png
    client.put_object(Bucket="sheets", Key="o/runs/r1/contact-sheet.png", Body=png)
    client.close()
    where = full_sheet_location("s3://sheets/o/runs/r1/contact-sheet.png", moto_endpoint)
    (link,) = LINK_RE.findall(where)
    assert link.startswith(f"{moto_endpoint}/sheets/o/runs/r1/contact-sheet.png?")
    response = httpx.get(link)
    assert response.status_code == 200 and response.content == png


async def test_an_api_refusing_the_preview_still_gets_the_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results.parquet"
    pq.write_table(rows_to_table(make_results(tmp_path, [RED])), results)
    published: list[str] = []

    async def create(markdown: str, key: str, description: str) -> None:
        if "data:image" in markdown:  # as a proxy with a small body limit would
            request = httpx.Request("POST", "http://prefect/api/artifacts/")
            raise httpx.HTTPStatusError(
                "too large", request=request, response=httpx.Response(413, request=request)
            )
        assert key == "imgedit-contact-sheet"
        published.append(markdown)

    monkeypatch.setattr("flows.artifacts.acreate_markdown_artifact", create)
    uri = await publish_contact_sheet(str(results), str(tmp_path / "out"), "r1", None)
    assert uri == str(tmp_path / "out" / "runs" / "r1" / "contact-sheet.png")
    (markdown,) = published
    assert "No preview" in markdown and f"`{uri}`" in markdown
    assert "the one succeeded row" in markdown


def test_markdown_of_a_run_without_succeeded_rows(tmp_path: Path) -> None:
    sheet = render_contact_sheet(rows_to_table([]), thumb=THUMB)
    where = full_sheet_location(str(tmp_path / "s.png"), None)
    markdown = contact_sheet_markdown("r0", sheet, where, preview=preview_jpeg(sheet.png))
    assert "No succeeded rows in this run" in markdown
    assert_same_shape(embedded_jpeg(markdown), sheet)


async def test_a_run_without_a_results_table_publishes_nothing(tmp_path: Path) -> None:
    missing = str(tmp_path / "runs" / "r1" / "results.parquet")
    assert await publish_contact_sheet(missing, str(tmp_path), "r1", None) is None
    assert not (tmp_path / "runs" / "r1" / "contact-sheet.png").exists()
