"""Source checks before a run: missing, non-image, wrong-mask sources found by reading them once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pipeline.engine import source_check
from pipeline.engine.source_check import (
    SourceProblem,
    SourceReport,
    check_sources,
    merge_into,
    validate_with_sources,
)
from pipeline.engine.sources import Source, SourceLoader
from pipeline.errors import ManifestError
from pipeline.io.allowed_roots import ENV_ALLOWED_ROOTS
from pipeline.io.netguard import AddressPolicy
from pipeline.manifest.open import ValidationReport, format_report, validate_manifest
from pipeline.manifest.types import FieldError, InvalidRow
from tests.conftest import image_bytes

PNG = image_bytes((64, 48))
JPEG = image_bytes((64, 48), fmt="JPEG")
SMALL_MASK = image_bytes((32, 32), (0, 0, 0, 0))
GOOD_MASK = image_bytes((64, 48), (0, 0, 0, 0))


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def write_manifest(root: Path, lines: list[str], header: str = "prompt,image,mask") -> str:
    path = root / "m.csv"
    path.write_text(header + "\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def by_row(report: SourceReport) -> dict[int, list[tuple[str, str]]]:
    return {p.row: [(e.column, e.reason) for e in p.errors] for p in report.problems}


@pytest.fixture
def mixed(tmp_path: Path) -> str:
    """Rows 1, 6, 8 good; 2 and 7 missing; 3 text named .png; 4 small mask; 5 JPEG mask."""
    write_files(
        tmp_path,
        {
            "a.png": PNG,
            "b.jpg": JPEG,
            "text.png": b"hello, I am not an image\n",
            "small-mask.png": SMALL_MASK,
            "mask.png": GOOD_MASK,
        },
    )
    return write_manifest(
        tmp_path,
        [
            "good,a.png,",
            "missing,nope.png,",
            "text,text.png,",
            "small mask,a.png,small-mask.png",
            "jpeg mask,a.png,b.jpg",
            "good with mask,b.jpg,mask.png",
            "missing too,nope-either.png,",
            "good again,a.png,mask.png",
        ],
    )


# --- what is found ------------------------------------------------------------------------------


async def test_each_bad_source_is_reported_with_row_column_and_reason(
    mixed: str, tmp_path: Path
) -> None:
    report = await check_sources(mixed)
    problems = by_row(report)
    assert set(problems) == {2, 3, 4, 5, 7}
    assert problems[2] == [("image", f"file not found: {tmp_path / 'nope.png'}")]
    [(column, reason)] = problems[3]
    assert column == "image"
    assert reason.startswith("not an image") and str(tmp_path / "text.png") in reason
    assert problems[4] == [("mask", "mask is 32x32 but the first image is 64x48")]
    assert problems[5] == [("mask", f"mask must be a PNG, got JPEG: {tmp_path / 'b.jpg'}")]
    assert report.rows == report.rows_checked == 8
    assert report.invalid == 5 and not report.ok and not report.truncated
    assert report.invalid_images == 5
    assert report.problems_by_column == Counter({"image": 3, "mask": 2})
    # a.png, b.jpg, mask.png, nope.png, text.png, small-mask.png, nope-either.png
    assert report.sources_read == 7
    assert report.elapsed_s > 0


async def test_images_column_and_every_bad_source_of_a_row(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.png": PNG, "t.png": b"text"})
    uri = write_manifest(
        tmp_path,
        ['x,"[""a.png"", ""gone.png"", ""t.png"", ""gone.png""]",', 'y,"a.png|a.png",'],
        header="prompt,images,mask",
    )
    problems = by_row(await check_sources(uri))
    assert list(problems) == [1]
    # Each unusable source once, in order, under the column the row used.
    assert [c for c, _ in problems[1]] == ["images", "images"]
    assert "gone.png" in problems[1][0][1] and "t.png" in problems[1][1][1]


async def test_mask_is_checked_for_format_even_when_the_first_image_is_bad(
    tmp_path: Path,
) -> None:
    write_files(tmp_path, {"b.jpg": JPEG})
    uri = write_manifest(tmp_path, ["x,gone.png,b.jpg"])
    problems = by_row(await check_sources(uri))
    assert [c for c, _ in problems[1]] == ["image", "mask"]
    assert "must be a PNG" in problems[1][1][1]


async def test_cell_invalid_rows_are_not_read(tmp_path: Path) -> None:
    uri = write_manifest(tmp_path, ["x,gone.png,abc"], header="prompt,image,seed")  # bad seed
    report = await check_sources(uri)
    assert report.rows == 1 and report.rows_checked == 0 and report.sources_read == 0


async def test_pixel_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_files(tmp_path, {"a.png": PNG})
    uri = write_manifest(tmp_path, ["x,a.png,"])
    monkeypatch.setattr(source_check, "MAX_SOURCE_PIXELS", 1000)
    [(column, reason)] = by_row(await check_sources(uri))[1]
    assert column == "image"
    assert reason.startswith("image is 64x48 (3,072 pixels), more than the 1,000 allowed")


async def test_row_range_and_progress(mixed: str) -> None:
    calls: list[tuple[int, int]] = []
    report = await check_sources(
        mixed, row_range=(2, 5), on_progress=lambda d, t: calls.append((d, t))
    )
    assert sorted(by_row(report)) == [2, 3, 4]
    assert report.rows == 3
    assert calls[-1] == (3, 3)


async def test_a_manifest_that_cannot_be_read_raises(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image\na.png\n")
    with pytest.raises(ManifestError, match="prompt"):
        await check_sources(str(path))


# --- where sources may come from ----------------------------------------------------------------


async def test_source_outside_the_allowed_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_files(tmp_path, {"in/a.png": PNG, "out/b.png": PNG})
    uri = write_manifest(tmp_path, ["x,in/a.png,", "y,out/b.png,"])
    monkeypatch.setenv(ENV_ALLOWED_ROOTS, str(tmp_path / "in"))
    problems = by_row(await check_sources(uri))
    assert list(problems) == [2]
    [(column, reason)] = problems[2]
    assert column == "image" and "outside the allowed roots" in reason
    # roots=None: anywhere, whatever the environment says.
    assert (await check_sources(uri, roots=None)).ok


class _CountingServer:
    def __init__(self) -> None:
        self.hits = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.hits += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(PNG)))
                self.end_headers()
                self.wfile.write(PNG)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/x.png"


@pytest.fixture
def counting_server() -> Iterator[_CountingServer]:
    server = _CountingServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)


async def test_loopback_http_source_is_refused_and_never_contacted(
    tmp_path: Path, counting_server: _CountingServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("IMGEDIT_ALLOW_PRIVATE_SOURCES", raising=False)
    uri = write_manifest(tmp_path, [f"x,{counting_server.url},", f"y,{counting_server.url},"])
    report = await check_sources(uri)
    problems = by_row(report)
    assert sorted(problems) == [1, 2]
    [(column, reason)] = problems[1]
    assert column == "image" and "loopback" in reason
    assert counting_server.hits == 0
    assert report.sources_read == 1  # refused once, remembered for row 2

    # The same server, allowed: it answers (so the refusal above was the policy's).
    allowed = await check_sources(uri, policy=AddressPolicy(allow_private=True))
    assert allowed.ok and counting_server.hits == 1


# --- folding into the validation report ---------------------------------------------------------


def test_merge_into_counts_a_row_once() -> None:
    cells = ValidationReport(uri="m.csv", format="csv", rows=5, valid=3, invalid=2, images=6)
    cells.errors = [
        InvalidRow(2, "b", (FieldError("seed", "seed 'x' is not an integer"),)),
        InvalidRow(5, "e", (FieldError("mask", "mask cell problem"),)),
    ]
    cells.errors_by_column.update(["seed", "mask"])
    sources = SourceReport(uri="m.csv", rows=5, rows_checked=4, invalid=3, invalid_images=5)
    sources.problems = [
        SourceProblem(2, "b", (FieldError("image", "file not found: /b.png"),), images=1),
        SourceProblem(3, "c", (FieldError("mask", "mask is 1x1 but the first image is 2x2"),), 2),
        SourceProblem(5, "e", (FieldError("mask", "mask must be a PNG, got JPEG: /m"),), 2),
    ]
    sources.problems_by_column.update(["image", "mask", "mask"])
    merged = merge_into(cells, sources)
    assert (merged.rows, merged.valid, merged.invalid) == (5, 2, 3)
    assert merged.images == 4  # row 3's two images leave the estimate; rows 2, 5 were out
    assert [r.row for r in merged.errors] == [2, 3, 5]
    assert [e.column for e in merged.errors[0].errors] == ["seed", "image"]
    assert merged.errors_by_column == Counter({"seed": 1, "image": 1, "mask": 2})
    assert (merged.sources_checked, merged.source_invalid) == (4, 3)
    assert cells.invalid == 2  # a new report; the old one is unchanged
    text = format_report(merged)
    assert "row 2, column image: file not found: /b.png" in text
    assert "row 3, column mask: mask is 1x1 but the first image is 2x2" in text
    assert "5 rows, 2 valid, 3 invalid" in text


def test_merge_keeps_only_the_first_errors_of_truncated_lists() -> None:
    cells = ValidationReport(uri="m", format="csv", rows=100, valid=97, invalid=3)
    cells.errors = [InvalidRow(r, None, (FieldError("seed", "bad"),)) for r in (10, 20)]
    sources = SourceReport(uri="m", rows_checked=97, invalid=1)
    sources.problems = [SourceProblem(30, None, (FieldError("image", "gone"),))]
    merged = merge_into(cells, sources)
    # The cell list stops at row 20 (a third row is unlisted): row 30 cannot be shown as
    # among the first errors, but it is counted.
    assert [r.row for r in merged.errors] == [10, 20]
    assert merged.invalid == 4 and merged.errors_truncated


def test_validate_with_sources_one_pass(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "a.png": PNG,
            "b.jpg": JPEG,
            "text.png": b"text",
            "small-mask.png": SMALL_MASK,
            "mask.png": GOOD_MASK,
        },
    )
    uri = write_manifest(
        tmp_path,
        [
            "good,a.png,,",
            "bad seed and missing image,nope.png,,abc",  # cells invalid: not read, one row
            "text,text.png,,",
            "small mask,a.png,small-mask.png,",
            "jpeg mask,a.png,b.jpg,",
            "good mask,b.jpg,mask.png,",
            "a PNG of the same size is a mask,a.png,a.png,",
            "good,a.png,mask.png,7",
            "missing,gone.png,,",
        ],
        header="prompt,image,mask,seed",
    )
    assert validate_manifest(uri).invalid == 1
    report = validate_with_sources(uri)
    assert (report.rows, report.valid, report.invalid) == (9, 4, 5)
    assert [r.row for r in report.errors] == [2, 3, 4, 5, 9]
    assert [e.column for e in report.errors[0].errors] == ["seed"]
    assert report.images == 4
    assert (report.sources_checked, report.source_invalid) == (8, 4)
    assert report.errors_by_column == Counter({"seed": 1, "image": 2, "mask": 2})
    shown = format_report(report)
    assert "9 rows, 4 valid, 5 invalid; 4 output images" in shown
    assert "row 2, column seed:" in shown
    assert "row 4, column mask: mask is 32x32 but the first image is 64x48" in shown
    assert f"row 5, column mask: mask must be a PNG, got JPEG: {tmp_path / 'b.jpg'}" in shown
    assert f"row 9, column image: file not found: {tmp_path / 'gone.png'}" in shown
    assert "sources read for 8 valid rows: 4 with a missing or unusable image or mask" in shown
    assert "all rows are valid" not in shown


async def test_validate_with_sources_from_async_code(mixed: str) -> None:
    # A running loop in this thread: the sync entry point runs on a thread of its own.
    report = validate_with_sources(mixed)
    assert report.invalid == 5


# --- reading once, bounded --------------------------------------------------------------------


async def test_shared_references_are_read_once(tmp_path: Path) -> None:
    write_files(tmp_path, {f"s{i}.png": PNG for i in range(3)} | {"mask.png": GOOD_MASK})
    uri = write_manifest(
        tmp_path,
        [f"x,s{i % 3}.png,mask.png" for i in range(60)] + ["y,gone.png,", "z,gone.png,"],
    )
    async with SourceLoader(cache_bytes=0) as loader:
        report = await check_sources(uri, loader=loader)
        assert loader.reads == 5  # three images, the mask, the missing file
    assert report.sources_read == 5
    assert report.cache_hits == 60 * 2 + 2 - 5
    assert sorted(by_row(report)) == [61, 62]


class SlowLoader(SourceLoader):
    """Local reads that take a while, counting how many run at once."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.now = 0
        self.peak = 0
        self._lock = threading.Lock()
        # The loader reads through its UriReader: its local reads are the ones slowed down.
        read_local = self._reader._read_local

        def slow_read_local(uri: str) -> bytes:
            with self._lock:
                self.now += 1
                self.peak = max(self.peak, self.now)
            try:
                time.sleep(0.03)
                return read_local(uri)
            finally:
                with self._lock:
                    self.now -= 1

        self._reader._read_local = slow_read_local  # type: ignore[method-assign]


async def test_concurrency_bounds_reads(tmp_path: Path) -> None:
    write_files(tmp_path, {f"s{i}.png": PNG for i in range(12)})
    uri = write_manifest(tmp_path, [f"x,s{i % 12}.png," for i in range(40)])
    async with SlowLoader() as loader:
        report = await check_sources(uri, loader=loader, concurrency=2)
    assert report.ok and report.rows_checked == 40
    assert loader.reads == 12
    assert loader.peak == 2


async def test_many_rows_few_sources_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_files(tmp_path, {f"s{i}.png": image_bytes((64, 48), (i, i, i)) for i in range(10)})
    uri = write_manifest(tmp_path, [f"edit {i},s{i % 10}.png," for i in range(2000)])
    held: list[int] = []

    class Recording(SourceLoader):
        def _remember(self, source: Source) -> None:
            super()._remember(source)
            held.append(len(self._cache))

    monkeypatch.setattr(source_check, "SourceLoader", Recording)
    report = await check_sources(uri, cache_entries=16)
    assert report.ok and report.rows == report.rows_checked == 2000
    assert report.sources_read == 10 and report.cache_hits == 1990
    assert report.cached_verdicts == 10
    assert held and max(held) == 0  # checked bytes are not kept

    # A cap below the distinct sources: still right, never more verdicts than the cap.
    small = await check_sources(uri, cache_entries=3, concurrency=2)
    assert small.ok and small.rows_checked == 2000
    assert small.cached_verdicts <= 3
    assert small.sources_read > 10


async def test_checker_cache_never_exceeds_its_cap(tmp_path: Path) -> None:
    write_files(tmp_path, {f"s{i}.png": PNG for i in range(10)})
    async with SourceLoader(cache_bytes=0) as loader:
        checker = source_check.SourceChecker(loader, concurrency=4, cache_entries=4)
        sizes = []
        for i in range(30):
            await checker.verdict(str(tmp_path / f"s{i % 10}.png"))
            sizes.append(checker.cached)
        assert max(sizes) == 4


async def test_cancelled_check_leaves_nothing_running(tmp_path: Path) -> None:
    write_files(tmp_path, {f"s{i}.png": PNG for i in range(8)})
    uri = write_manifest(tmp_path, [f"x,s{i}.png," for i in range(8)])
    async with SlowLoader() as loader:
        before = asyncio.all_tasks()
        task = asyncio.create_task(check_sources(uri, loader=loader, concurrency=2))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # No task of the check is left running; the caller's loader may still finish its
        # shared reads (its own, ended by its aclose).
        left = {getattr(t.get_coro(), "__qualname__", "") for t in asyncio.all_tasks() - before}
        assert left <= {"SourceLoader._read_and_check"}
        assert loader.peak <= 2


# --- S3 -----------------------------------------------------------------------------------------


def test_s3_manifest_and_sources(aws_credentials: None) -> None:
    import boto3
    from moto import mock_aws

    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="bkt-src")
        s3.put_object(Bucket="bkt-src", Key="team/a.png", Body=PNG)
        s3.put_object(Bucket="bkt-src", Key="team/mask.png", Body=SMALL_MASK)
        s3.put_object(
            Bucket="bkt-src",
            Key="team/m.csv",
            Body=b"prompt,image,mask\nok,a.png,\ngone,nope.png,\nsmall,a.png,mask.png\n",
        )
        report = validate_with_sources("s3://bkt-src/team/m.csv")
    assert [r.row for r in report.errors] == [2, 3]
    lines = format_report(report).splitlines()
    assert "row 2, column image: s3 object not found: s3://bkt-src/team/nope.png" in lines
    assert "row 3, column mask: mask is 32x32 but the first image is 64x48" in lines
