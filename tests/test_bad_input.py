"""Bad input, end to end: the engine runs manifests with bad rows next to good ones, against
the emulator, and every bad row ends as one `invalid` result naming its row, column and reason,
with no API request made for it; manifest-level problems stop the run before any request.

Unit-level checks of the same rules are in test_manifest.py and test_sources.py; here the
whole path (reader, validator, source loader, runner, results table) is under test.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import struct
import threading
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.emulator.config import FAULT_RATE_FIELDS
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.engine.summary import RunSummary
from pipeline.errors import ManifestError
from tests.conftest import served_moto

pytestmark = pytest.mark.integration

COLUMNS = [
    "id",
    "image",
    "images",
    "prompt",
    "seed",
    "mask",
    "n",
    "size",
    "aspect_ratio",
    "resolution",
    "output_format",
    "output_compression",
]
# The loader waits 30 s for an http source by default; the timeout case needs less.
SOURCE_HTTP_TIMEOUT_S = 1.0
HANG_S = 10.0
BUCKET = "inputs"


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30, 0) if mode == "RGBA" else (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def noisy_jpeg() -> bytes:
    # Noise: most of the file is scan data, so half of it still has a readable header.
    buf = io.BytesIO()
    Image.frombytes("L", (128, 128), bytes(range(256)) * 64).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A complete, tiny PNG that declares `width`x`height` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


# --- servers: http sources, S3 ------------------------------------------------------------


class SourceServer:
    """Image sources over plain http on 127.0.0.1: one fine, one 404, one that never answers.

    The loader treats http:// and https:// URLs the same way; https differs only by TLS.
    """

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/hang.png":
                    server.release.wait(HANG_S)
                if self.path in ("/ok.png", "/hang.png"):
                    status, body, ctype = 200, server.image, "image/png"
                else:
                    status, body, ctype = 404, b"not found", "text/plain"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up first (the timeout case)

        return Handler

    def __enter__(self) -> SourceServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        with served_moto() as endpoint:
            s3 = boto3.client("s3", endpoint_url=endpoint)
            s3.create_bucket(Bucket=BUCKET)
            s3.put_object(Bucket=BUCKET, Key="good.png", Body=png())
            s3.close()
            yield endpoint


# --- running the engine -------------------------------------------------------------------


def write_csv(
    path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    return path


def reset_emulator(emu: EmulatorProcess) -> None:
    emu.reset()
    emu.configure(
        **dict.fromkeys(FAULT_RATE_FIELDS, 0.0), latency=0.0, api_key=None, balance_usd=None
    )


async def run_engine(
    manifest: Path, output: Path, emu: EmulatorProcess, **kw: Any
) -> tuple[RunSummary, pd.DataFrame]:
    # Its http sources are on a loopback test server: reachable only through the opt-in.
    kw.setdefault("allow_private_sources", True)
    summary = await run_manifest(
        RunOptions(manifest=str(manifest), output=str(output), api_base=emu.base_url, **kw)
    )
    return summary, pd.read_parquet(summary.results_uri)


def requested_prompts(emu: EmulatorProcess) -> Counter[str]:
    return Counter(r["fields"]["prompt"] for r in emu.requests())


def result_of(results: pd.DataFrame, row: int) -> pd.Series:
    match = results[results["row"] == row]
    assert len(match) == 1, f"row {row} appears {len(match)} times in the results"
    return match.iloc[0]


def assert_invalid(results: pd.DataFrame, row: int, column: str, *words: str) -> None:
    r = result_of(results, row)
    message = str(r["error_message"])
    assert r["status"] == "invalid", (row, r["status"], message)
    assert r["error_column"] == column, (row, r["error_column"], message)
    assert message.startswith(f"row {row}"), message
    for word in words:
        assert word in message, (row, word, message)
    assert pd.isna(r["request_id"]) and r["attempts"] == 0


# --- one manifest with every row-level problem next to good rows -----------------------------


@dataclass(frozen=True)
class Case:
    name: str
    cells: dict[str, str]
    column: str
    words: tuple[str, ...]


@dataclass
class BigRun:
    results: pd.DataFrame
    rows_of: dict[str, int]  # case name -> row number
    good: dict[int, str]  # row number -> prompt, of the good rows
    requests: Counter[str]
    output: Path
    root: Path
    cases: list[Case] = field(default_factory=list)


def bad_cases(files: dict[str, str], http_base: str) -> list[Case]:
    sq = files["square"]
    return [
        Case("prompt-empty", {"prompt": ""}, "prompt", ("prompt is empty",)),
        Case("prompt-blank", {"prompt": "   "}, "prompt", ("prompt is empty",)),
        Case("prompt-1001", {"prompt": "x" * 1001}, "prompt", ("1001 characters", "limit is 1000")),
        Case("no-image", {"image": ""}, "image", ("no image",)),
        Case(
            "six-images",
            {"image": "", "images": json.dumps([sq] * 6)},
            "images",
            ("6 images", "limit is 5"),
        ),
        Case(
            "missing-file",
            {"image": files["nope"]},
            "image",
            ("file not found", files["nope"]),
        ),
        Case(
            "missing-s3-object",
            {"image": f"s3://{BUCKET}/nope.png"},
            "image",
            ("s3 object not found", f"s3://{BUCKET}/nope.png"),
        ),
        Case(
            "missing-s3-bucket",
            {"image": "s3://no-such-bucket/x.png"},
            "image",
            ("bucket not found", "no-such-bucket"),
        ),
        Case(
            "http-404",
            {"image": f"{http_base}/missing.png"},
            "image",
            (f"{http_base}/missing.png answered 404",),
        ),
        Case(
            "http-timeout",
            {"image": f"{http_base}/hang.png"},
            "image",
            ("timed out", f"{http_base}/hang.png"),
        ),
        Case("not-an-image", {"image": files["text"]}, "image", ("not an image", files["text"])),
        Case("truncated-png", {"image": files["cut_png"]}, "image", ("truncated PNG",)),
        Case("truncated-jpeg", {"image": files["cut_jpeg"]}, "image", ("truncated JPEG",)),
        Case("bomb", {"image": files["bomb"]}, "image", ("exceed the safety limit",)),
        Case(
            "mask-wrong-size",
            {"mask": files["mask_small"]},
            "mask",
            ("mask is 32x32", "first image is 64x64"),
        ),
        Case("mask-not-png", {"mask": files["mask_jpeg"]}, "mask", ("mask must be a PNG",)),
        Case("mask-missing", {"mask": files["nope"]}, "mask", ("file not found",)),
        Case("size-unknown", {"size": "huge"}, "size", ("unknown size 'huge'",)),
        Case("size-zero", {"size": "0x100"}, "size", ("zero side",)),
        Case("aspect-unknown", {"aspect_ratio": "wide"}, "aspect_ratio", ("unknown aspect ratio",)),
        Case("resolution-unknown", {"resolution": "ultra"}, "resolution", ("unknown resolution",)),
        Case(
            "format-unknown",
            {"output_format": "bmp"},
            "output_format",
            ("unknown output format 'bmp'",),
        ),
        Case("n-zero", {"n": "0"}, "n", ("n 0 is out of range 1..10",)),
        Case("n-eleven", {"n": "11"}, "n", ("n 11 is out of range 1..10",)),
        Case("n-text", {"n": "two"}, "n", ("n 'two' is not an integer",)),
        Case(
            "compression-zero",
            {"output_format": "jpeg", "output_compression": "0"},
            "output_compression",
            ("out of range 1..100",),
        ),
        Case(
            "compression-101",
            {"output_format": "jpeg", "output_compression": "101"},
            "output_compression",
            ("out of range 1..100",),
        ),
        Case("seed-word", {"seed": "forty"}, "seed", ("seed 'forty' is not an integer",)),
        Case("seed-fraction", {"seed": "4.5"}, "seed", ("seed '4.5' is not an integer",)),
        Case("seed-negative", {"seed": "-1"}, "seed", ("out of range",)),
        Case("seed-huge", {"seed": str(2**64)}, "seed", ("out of range",)),
        Case(
            "duplicate-id",
            {"id": "good-row-000"},
            "id",
            ("duplicate id 'good-row-000'", "first at row 1"),
        ),
        Case("id-dotdot-slash", {"id": "../evil-a"}, "id", ("contains '/'",)),
        Case("id-slash", {"id": "sub/evil-b"}, "id", ("contains '/'",)),
        Case("id-backslash", {"id": "..\\evil-c"}, "id", ("contains '\\\\'",)),
        Case("id-nul", {"id": "evil-d\x00.png"}, "id", ("control character",)),
        Case("id-dotdot", {"id": ".."}, "id", ("not allowed",)),
    ]


def good_variants(files: dict[str, str], http_base: str) -> list[dict[str, str]]:
    """Good rows at the edges of what is allowed, so the checks do not over-reject."""
    return [
        {},
        {"image": f"{http_base}/ok.png"},
        {"image": f"s3://{BUCKET}/good.png"},
        {"mask": files["mask"]},
        {"prompt": "y" * 1000},
        {"image": "", "images": json.dumps([files["square"]] * 5)},
        {"n": "2", "output_format": "jpeg", "output_compression": "100"},
        {"seed": "42.0", "size": "16:9", "resolution": "1K"},
        {"aspect_ratio": "auto", "output_format": "JPG"},
    ]


@pytest.fixture(scope="module")
def source_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("sources")
    jpeg = noisy_jpeg()
    square = png()
    data = {
        "square": ("square.png", square),
        "text": ("notes.png", b"hello, this is not an image\n"),
        "cut_png": ("cut.png", square[: len(square) // 2]),
        "cut_jpeg": ("cut.jpg", jpeg[: len(jpeg) // 2]),
        "bomb": ("bomb.png", png_header_only(30_000, 30_000)),
        "mask": ("mask.png", png((64, 64), "RGBA")),
        "mask_small": ("mask-small.png", png((32, 32), "RGBA")),
        "mask_jpeg": ("mask.jpg", jpeg),
    }
    files = {}
    for key, (name, content) in data.items():
        (folder / name).write_bytes(content)
        files[key] = str(folder / name)
    files["nope"] = str(folder / "nope.png")
    return files


@pytest.fixture(scope="module")
def big_run(
    tmp_path_factory: pytest.TempPathFactory,
    emulator_process: EmulatorProcess,
    source_files: dict[str, str],
    s3_endpoint: str,
) -> Iterator[BigRun]:
    root = tmp_path_factory.mktemp("big")
    with SourceServer(png()) as http:
        cases = bad_cases(source_files, http.base)
        variants = good_variants(source_files, http.base)
        rows: list[dict[str, str]] = []
        rows_of: dict[str, int] = {}
        good: dict[int, str] = {}

        def add_good() -> None:
            k = len(good)
            cells = {
                "id": f"good-row-{k:03d}",
                "image": source_files["square"],
                "prompt": f"good edit {k}",
                "seed": str(k),
                **variants[k % len(variants)],
            }
            rows.append(cells)
            good[len(rows)] = cells["prompt"]

        add_good()
        for case in cases:
            cells = {
                "id": f"bad-{case.name}",
                "image": source_files["square"],
                "prompt": f"bad {case.name}",
                "seed": "7",
                **case.cells,
            }
            rows.append(cells)
            rows_of[case.name] = len(rows)
            add_good()
        reset_emulator(emulator_process)
        manifest = write_csv(root / "manifest.csv", rows)
        output = root / "out"
        _, results = asyncio.run(
            run_engine(
                manifest,
                output,
                emulator_process,
                concurrency=8,
                s3_endpoint_url=s3_endpoint,
                source_timeout=SOURCE_HTTP_TIMEOUT_S,
            )
        )
        requests = requested_prompts(emulator_process)
    yield BigRun(results, rows_of, good, requests, output, root, cases)


CASE_NAMES = [c.name for c in bad_cases(defaultdict(str), "http://127.0.0.1")]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_each_bad_row_is_one_invalid_result_naming_row_column_and_reason(
    big_run: BigRun, name: str
) -> None:
    case = next(c for c in big_run.cases if c.name == name)
    row = big_run.rows_of[name]
    assert_invalid(big_run.results, row, case.column, *case.words)
    r = result_of(big_run.results, row)
    if case.name.startswith("id-"):
        assert pd.isna(r["id"])  # an unusable id is not echoed back as if it were one
    else:
        assert r["id"] == case.cells.get("id", f"bad-{name}")
    # No API request was made for it.
    assert f"bad {name}" not in big_run.requests


def test_the_good_rows_beside_them_succeed_and_only_they_reach_the_api(big_run: BigRun) -> None:
    results = big_run.results
    assert sorted(results["row"]) == list(range(1, len(big_run.good) + len(big_run.cases) + 1))
    for row, prompt in big_run.good.items():
        r = result_of(results, row)
        assert r["status"] == "succeeded", (row, prompt[:40], r["error_message"])
    assert big_run.requests == Counter(big_run.good.values())


def test_ids_with_path_characters_never_reach_a_storage_key(big_run: BigRun) -> None:
    names = [str(p.relative_to(big_run.output)) for p in big_run.output.rglob("*")]
    assert any(n.startswith("jobs/") for n in names)
    for name in names:
        # Keys are content hashes: no id of any row, good or bad, is part of one.
        assert "evil" not in name and "good-row" not in name and "bad-" not in name, name
    # Nothing was written beside the output either (`../evil-a` would land there).
    assert sorted(p.name for p in big_run.root.iterdir()) == ["manifest.csv", "out"]


# --- CSV structure ----------------------------------------------------------------------------


def good_line(sources: dict[str, Path], k: int, delimiter: str = ",") -> str:
    return delimiter.join([f"good-{k}", str(sources["square.png"]), f"good edit {k}", str(k)])


async def test_a_bom_does_not_hide_the_first_column(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    text = "id,image,prompt,seed\n" + "\n".join(
        [good_line(sources, 1), f"bad-1,{sources['square.png']},bad edit,x", good_line(sources, 2)]
    )
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"\xef\xbb\xbf" + text.encode() + b"\n")
    _, results = await run_engine(manifest, tmp_path / "out", emulator)
    # Read as `\ufeffid`, the id column would be unknown and every id would be `row-<n>`.
    assert list(results["id"]) == ["good-1", "bad-1", "good-2"]
    assert list(results["status"]) == ["succeeded", "invalid", "succeeded"]
    assert_invalid(results, 2, "seed", "seed 'x' is not an integer")
    assert requested_prompts(emulator) == Counter(["good edit 1", "good edit 2"])


@pytest.mark.parametrize(("delimiter", "suffix"), [(";", ".csv"), ("\t", ".tsv")])
async def test_semicolon_and_tab_delimiters_are_read(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    delimiter: str,
    suffix: str,
) -> None:
    lines = [
        delimiter.join(["id", "image", "prompt", "seed"]),
        good_line(sources, 1, delimiter),
        delimiter.join(["bad-1", str(sources["square.png"]), "bad edit", "4.5"]),
        good_line(sources, 2, delimiter),
    ]
    manifest = tmp_path / f"m{suffix}"
    manifest.write_text("\n".join(lines) + "\n")
    _, results = await run_engine(manifest, tmp_path / "out", emulator)
    assert list(results["status"]) == ["succeeded", "invalid", "succeeded"]
    assert_invalid(results, 2, "seed", "seed '4.5' is not an integer")
    assert requested_prompts(emulator) == Counter(["good edit 1", "good edit 2"])


async def test_ragged_rows_are_invalid_in_place(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    img = sources["square.png"]
    lines = [
        "id,image,prompt,seed",
        good_line(sources, 1),
        f"long,{img},too many fields,3,surplus",
        good_line(sources, 3),
        f"short,{img}",
        good_line(sources, 5),
    ]
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(lines) + "\n")
    _, results = await run_engine(manifest, tmp_path / "out", emulator)
    assert list(results["row"]) == [1, 2, 3, 4, 5]
    assert_invalid(results, 2, "(row)", "expected 4 fields, found 5")
    assert_invalid(results, 4, "(row)", "expected 4 fields, found 2")
    assert list(results["status"]) == ["succeeded", "invalid", "succeeded", "invalid", "succeeded"]
    assert requested_prompts(emulator) == Counter(f"good edit {k}" for k in (1, 3, 5))


async def test_an_unclosed_quote_that_leaves_a_row_ragged_is_reported(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    img = sources["square.png"]
    text = (
        "id,image,prompt,seed\n"
        f"{good_line(sources, 1)}\n"
        f'open,{img},"never closed,2\n'
        f"swallowed,{img},lost edit,3\n"
        f'"tail",{img},tail edit,4\n'
        f"{good_line(sources, 5)}\n"
    )
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    _, results = await run_engine(manifest, tmp_path / "out", emulator)
    assert_invalid(results, 2, "(row)", "quote may be unclosed")
    assert result_of(results, 1)["status"] == "succeeded"
    assert results.iloc[-1]["id"] == "good-5" and results.iloc[-1]["status"] == "succeeded"
    requested = requested_prompts(emulator)
    assert requested == Counter(["good edit 1", "good edit 5"])


async def test_an_unclosed_quote_swallowing_the_rest_of_the_file_is_reported(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    img = sources["square.png"]
    text = (
        "id,image,seed,prompt\n"
        f"good-1,{img},1,good edit 1\n"
        f'open,{img},2,"never closed\n'
        f"next,{img},3,next edit\n"
        f"last,{img},4,last edit\n"
    )
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    _, results = await run_engine(manifest, tmp_path / "out", emulator)
    assert list(results["status"]) == ["succeeded", "invalid"]
    assert_invalid(results, 2, "prompt", "is a quote unclosed?")
    assert requested_prompts(emulator) == Counter(["good edit 1"])


async def test_an_unclosed_quote_closed_on_a_later_line_is_reported(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    img = sources["square.png"]
    text = (
        "id,image,prompt,seed\n"
        f"{good_line(sources, 1)}\n"
        f'open,{img},"never closed,2\n'
        f'swallowed,{img},"lost edit",3\n'
        f"{good_line(sources, 4)}\n"
    )
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    _, results = await run_engine(manifest, tmp_path / "out", emulator)
    assert result_of(results, 2)["status"] == "invalid"
    assert "quote" in str(result_of(results, 2)["error_message"])


async def test_a_missing_source_in_an_images_list_names_the_images_column(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    listed = json.dumps([str(sources["square.png"]), str(tmp_path / "gone.png")])
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"id": "good-1", "images": json.dumps([str(sources["square.png"])]), "prompt": "g"},
            {"id": "bad-1", "images": listed, "prompt": "b"},
        ],
        columns=["id", "images", "prompt"],
    )
    _, results = await run_engine(manifest, tmp_path / "out", emulator)
    assert result_of(results, 1)["status"] == "succeeded"
    assert_invalid(results, 2, "images", "file not found", "gone.png")


# --- Parquet rows -------------------------------------------------------------------------------


async def test_parquet_rows_with_bad_values_are_invalid_in_place(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    img = str(sources["square.png"])
    table = pa.table(
        {
            "id": ["good-1", "null-prompt", "good-3", "float-seed", "six", "bad/id", "nul\x00id"],
            "images": [[img], [img], [img], [img], [img] * 6, [img], [img]],
            "prompt": ["good edit 1", None, "good edit 3", "p4", "p5", "p6", "p7"],
            "seed": [1.0, 2.0, 3.0, 4.5, 5.0, 6.0, 7.0],
            "n": pa.array([1, None, None, None, None, None, None], pa.int64()),
        }
    )
    manifest = tmp_path / "m.parquet"
    pq.write_table(table, manifest)
    _, results = await run_engine(manifest, tmp_path / "out", emulator)
    assert list(results["row"]) == list(range(1, 8))
    assert result_of(results, 1)["status"] == "succeeded"
    assert result_of(results, 3)["status"] == "succeeded"
    assert_invalid(results, 2, "prompt", "prompt is missing")
    assert_invalid(results, 4, "seed", "seed 4.5 is not an integer")
    assert_invalid(results, 5, "images", "6 images; the limit is 5")
    assert_invalid(results, 6, "id", "contains '/'")
    assert_invalid(results, 7, "id", "control character")
    assert requested_prompts(emulator) == Counter(["good edit 1", "good edit 3"])
    assert not [p for p in (tmp_path / "out").rglob("*") if "bad" in p.name or "nul" in p.name]


# --- manifest-level problems: nothing is sent -----------------------------------------------


def _csv(text: str, name: str = "m.csv") -> tuple[str, bytes]:
    return name, text.encode()


def _parquet(table: pa.Table, name: str = "m.parquet") -> tuple[str, bytes]:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return name, buf.getvalue()


MANIFEST_PROBLEMS: dict[str, tuple[tuple[str, bytes] | None, str]] = {
    "empty-file": (_csv(""), r"has no rows \(the file is empty\)"),
    "blank-lines": (_csv("\n\n  \n"), r"has no rows"),
    "header-only": (_csv("image,prompt\n"), r"has no rows \(only a header\)"),
    "empty-parquet": (
        _parquet(
            pa.table({"image": pa.array([], pa.string()), "prompt": pa.array([], pa.string())})
        ),
        r"has no rows",
    ),
    "no-prompt-column": (_csv("id,image\na,/x.png\n"), r"has no prompt column; found columns"),
    "no-image-column": (_csv("id,prompt\na,p\n"), r"has no image or images column"),
    "prompt-twice": (_csv("image,prompt,Prompt\na.png,p,q\n"), r"column 'prompt' twice"),
    "pipe-delimiter": (
        _csv("id|image|prompt\na|/x.png|p\n"),
        r"has no prompt column; found columns: 'id\|image\|prompt'",
    ),
    "param-sets-size": (
        _csv("image,prompt,param.size\na.png,p,1x1\n"),
        r"column 'param.size' sets 'size', which has its own column",
    ),
    "latin-1": (
        ("m.csv", "image,prompt\na.png,caf\xe9\n".encode("latin-1")),
        r"not valid UTF-8 \(line 2 has the byte 0xe9\)",
    ),
    "latin-1-deep": (
        (
            "m.csv",
            b"image,prompt\n" + b"/a.png,p\n" * 20_000 + "/a.png,caf\xe9\n".encode("latin-1"),
        ),
        r"not valid UTF-8 \(data row 20001\)",
    ),
    "utf-16": (("m.csv", "image,prompt\na.png,p\n".encode("utf-16")), r"UTF-16 or UTF-32"),
    "garbage-parquet": (("m.parquet", b"not parquet at all"), r"is not a readable Parquet file"),
    "prompt-int64": (
        _parquet(pa.table({"image": ["/a.png"], "prompt": [5]})),
        r"column 'prompt' has the Parquet type int64; expected a string column",
    ),
    "seed-bool": (
        _parquet(pa.table({"image": ["/a.png"], "prompt": ["p"], "seed": [True]})),
        r"column 'seed' has the Parquet type bool; expected an integer, float or string column",
    ),
    "image-binary": (
        _parquet(pa.table({"image": [b"/a.png"], "prompt": ["p"]})),
        r"column 'image' has the Parquet type binary; expected a string column",
    ),
    "images-of-ints": (
        _parquet(pa.table({"images": [[1, 2]], "prompt": ["p"]})),
        r"column 'images' has the Parquet type list<element: int64>",
    ),
    "xlsx": (("m.xlsx", b"PK\x03\x04"), r"unknown format for manifest .*m\.xlsx"),
    "json": (("m.json", b"[]"), r"unknown format for manifest .*m\.json"),
    "missing": (None, r"manifest not found: .*missing\.csv"),
}


@pytest.mark.parametrize("problem", list(MANIFEST_PROBLEMS))
async def test_manifest_level_problems_fail_before_any_api_call(
    tmp_path: Path, emulator: EmulatorProcess, problem: str
) -> None:
    content, pattern = MANIFEST_PROBLEMS[problem]
    if content is None:
        manifest = tmp_path / "missing.csv"
    else:
        manifest = tmp_path / content[0]
        manifest.write_bytes(content[1])
    with pytest.raises(ManifestError, match=pattern) as info:
        await run_engine(manifest, tmp_path / "out", emulator)
    assert "Traceback" not in str(info.value)
    stats = emulator.stats()
    assert stats["requests"] == 0 and stats["dry_runs"] == 0
    assert not (tmp_path / "out").exists()


async def test_a_directory_is_not_a_manifest(tmp_path: Path, emulator: EmulatorProcess) -> None:
    folder = tmp_path / "m.csv"
    folder.mkdir()
    with pytest.raises(ManifestError, match=r"is a directory, not a file"):
        await run_engine(folder, tmp_path / "out", emulator)
    assert emulator.stats()["requests"] == 0


async def test_strict_refuses_a_manifest_with_any_bad_row_before_any_call(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    img = sources["square.png"]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt,seed\n{img},fine,1\n{img},fine,x\n{img},,3\n")
    with pytest.raises(ManifestError) as info:
        await run_engine(manifest, tmp_path / "out", emulator, strict=True)
    message = str(info.value)
    assert "2 of 3 rows are invalid; nothing was sent" in message
    assert "row 2, column seed: seed 'x' is not an integer" in message
    assert "row 3, column prompt: prompt is empty" in message
    assert emulator.stats()["requests"] == 0
