"""Manifest reading and validation: CSV and Parquet, local and S3, row and manifest errors."""

from __future__ import annotations

import gzip
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto import mock_aws

from pipeline import spec
from pipeline.errors import ManifestError
from pipeline.manifest import read as manifest_read
from pipeline.manifest.location import ManifestFile
from pipeline.manifest.open import (
    ROW_COLUMN,
    format_report,
    open_manifest,
    validate_manifest,
)
from pipeline.manifest.types import InvalidRow, ManifestRow, ParsedRow

BUCKET = "manifests-bucket"


# --- helpers ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str | bytes, name: str = "m.csv") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def parse(uri: str, **kw: Any) -> list[ParsedRow]:
    with open_manifest(uri, **kw) as manifest:
        return list(manifest.rows())


def one(tmp_path: Path, header: str, line: str) -> ParsedRow:
    rows = parse(write(tmp_path, f"{header}\n{line}\n"))
    assert len(rows) == 1
    return rows[0]


def valid(row: ParsedRow) -> ManifestRow:
    assert isinstance(row, ManifestRow), getattr(row, "message", row)
    return row


def problems(row: ParsedRow) -> list[tuple[str, str]]:
    assert isinstance(row, InvalidRow), f"expected an invalid row, got {row}"
    return [(e.column, e.reason) for e in row.errors]


def write_parquet(tmp_path: Path, table: pa.Table, name: str = "m.parquet") -> str:
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield client


# --- valid rows ---------------------------------------------------------------------------


def test_csv_row_with_every_column(tmp_path: Path) -> None:
    header = (
        "id,image,prompt,seed,mask,n,size,aspect_ratio,resolution,output_format,"
        "output_compression,quality,user,params,param.turbo,param.replicate_weights"
    )
    line = (
        "cat-1,images/cat.png,  make it blue  ,42,masks/m.png,3,1024x1024,16:9,1K,JPG,80,high,"
        'u1,"{""disable_safety_checker"": true}",false,abc'
    )
    row = valid(one(tmp_path, header, line))
    assert row.row == 1
    assert row.id == "cat-1"
    assert row.images == (str(tmp_path / "images" / "cat.png"),)
    assert row.prompt == "make it blue"
    assert row.seed == 42
    assert row.mask == str(tmp_path / "masks" / "m.png")
    p = row.params
    assert (p.n, p.size, p.aspect_ratio, p.resolution) == (3, "1024x1024", "16:9", "1K")
    assert (p.output_format, p.output_compression, p.quality, p.user) == ("jpeg", 80, "high", "u1")
    assert p.extra == {
        "disable_safety_checker": True,
        "turbo": False,
        "replicate_weights": "abc",
    }


def test_unset_cells_mean_api_defaults(tmp_path: Path) -> None:
    row = valid(one(tmp_path, "image,prompt,seed,n,size,params,param.turbo", "a.png,p,,,,,"))
    assert row.seed is None
    assert row.params.n is None and row.params.size is None
    assert row.params.extra == {}
    assert row.params.image_count() == 1


def test_param_columns_parse_json_scalars(tmp_path: Path) -> None:
    header = "image,prompt,param.a,param.b,param.c,param.d,param.e,param.f,param.g"
    row = valid(one(tmp_path, header, 'x.png,p,true,3,2.5,hello,null,"""q""",[1]'))
    assert row.params.extra == {"a": True, "b": 3, "c": 2.5, "d": "hello", "f": "q", "g": "[1]"}


def test_column_names_ignore_case_and_spaces(tmp_path: Path) -> None:
    row = valid(one(tmp_path, " Image , PROMPT ,Seed", "a.png,hello,7"))
    assert (row.prompt, row.seed) == ("hello", 7)


def test_derived_ids(tmp_path: Path) -> None:
    rows = parse(write(tmp_path, "image,prompt\na.png,p\nb.png,q\n"))
    assert [valid(r).id for r in rows] == ["row-1", "row-2"]
    rows = parse(write(tmp_path, "id,image,prompt\nx,a.png,p\n,b.png,q\n  ,c.png,r\n"))
    assert [valid(r).id for r in rows] == ["x", "row-2", "row-3"]


def test_source_resolution(tmp_path: Path) -> None:
    sub = tmp_path / "manifests"
    sub.mkdir()
    text = (
        "images,prompt\n"
        "images/cat.png,p\n"
        "../shared/dog.png,p\n"
        "/abs/x.png,p\n"
        "file:///abs/y%20z.png,p\n"
        "s3://bkt/k/a.png,p\n"
        "https://example.com/a.png?x=1,p\n"
        "http://example.com/b.png,p\n"
    )
    rows = [valid(r) for r in parse(write(sub, text, "example.csv"))]
    assert [r.images[0] for r in rows] == [
        str(sub / "images" / "cat.png"),
        str(tmp_path / "shared" / "dog.png"),
        "/abs/x.png",
        "/abs/y z.png",
        "s3://bkt/k/a.png",
        "https://example.com/a.png?x=1",
        "http://example.com/b.png",
    ]


def test_images_column_forms(tmp_path: Path) -> None:
    text = (
        "image,images,prompt\n"
        "a.png,,one\n"
        ',"[""a.png"", ""s3://b/c.png""]",json\n'
        ",a.png| b.png |c.png,pipes\n"
        ",a.png,single in images\n"
    )
    rows = [valid(r) for r in parse(write(tmp_path, text))]
    d = str(tmp_path)
    assert rows[0].images == (f"{d}/a.png",)
    assert rows[1].images == (f"{d}/a.png", "s3://b/c.png")
    assert rows[2].images == (f"{d}/a.png", f"{d}/b.png", f"{d}/c.png")
    assert rows[3].images == (f"{d}/a.png",)


# --- row errors ---------------------------------------------------------------------------

LONG = "x" * (spec.MAX_PROMPT_CHARS + 203)

ROW_ERRORS = [
    # (header, line, column, reason)
    ("image,prompt", "a.png,", "prompt", "prompt is empty"),
    ("image,prompt", 'a.png,"   "', "prompt", "prompt is empty"),
    ("image,prompt", f"a.png,{LONG}", "prompt", "prompt is 1203 characters; the limit is 1000"),
    ("image,prompt", ",p", "image", "no image; set image or images"),
    ("images,prompt", ",p", "images", "no image; set image or images"),
    ("images,prompt", "a|b|c|d|e|f,p", "images", "6 images; the limit is 5"),
    ("images,prompt", '"[]",p', "images", "images is an empty list; no image"),
    ("images,prompt", "a||b,p", "images", "image 2 of 3 is empty"),
    ("images,prompt", '"[1, ""a""]",p', "images", "image 1 of 2 is not a string"),
    ("images,prompt", '"[""a""",p', "images", "images is not a valid JSON array"),
    ("image,images,prompt", "a.png,b.png,p", "images", "both image and images are set"),
    ("image,prompt", '"[""a.png""]",p', "image", "image holds one source"),
    ("image,prompt", "a.png|b.png,p", "image", "image holds one source; put a list in the images"),
    ("image,prompt", "ftp://h/a.png,p", "image", "unsupported scheme 'ftp' in 'ftp://h/a.png'"),
    ("images,prompt", "a.png|gs://b/c,p", "images", "image 2: unsupported scheme 'gs'"),
    ("image,prompt", "s3://bucket-only,p", "image", "needs a bucket and a key"),
    ("image,prompt", "https:///a.png,p", "image", "has no host"),
    ("image,prompt", "http://h[/x,p", "image", "is not a valid URL"),
    ("image,prompt", "file://other/a.png,p", "image", "names another host"),
    ("image,prompt,mask", "a.png,p,data://x", "mask", "unsupported scheme 'data'"),
    ("image,prompt,seed", "a.png,p,abc", "seed", "seed 'abc' is not an integer"),
    ("image,prompt,seed", "a.png,p,4.5", "seed", "seed '4.5' is not an integer"),
    ("image,prompt,seed", "a.png,p,NaN", "seed", "seed 'NaN' is not an integer"),
    ("image,prompt,seed", "a.png,p,-1", "seed", "seed -1 is out of range 0..9223372036854775807"),
    ("image,prompt,seed", f"a.png,p,{2**63}", "seed", f"seed {2**63} is out of range"),
    ("image,prompt,n", "a.png,p,0", "n", "n 0 is out of range 1..10"),
    ("image,prompt,n", "a.png,p,11", "n", "n 11 is out of range 1..10"),
    ("image,prompt,n", "a.png,p,two", "n", "n 'two' is not an integer"),
    (
        "image,prompt,output_compression",
        "a.png,p,0",
        "output_compression",
        "output_compression 0 is out of range 1..100",
    ),
    (
        "image,prompt,output_compression",
        "a.png,p,101",
        "output_compression",
        "output_compression 101 is out of range 1..100",
    ),
    ("image,prompt,size", "a.png,p,huge", "size", "unknown size 'huge'; expected WxH"),
    (
        "image,prompt,aspect_ratio",
        "a.png,p,wide",
        "aspect_ratio",
        "unknown aspect ratio 'wide'; expected W:H",
    ),
    ("image,prompt,resolution", "a.png,p,big", "resolution", "unknown resolution 'big'"),
    ("image,prompt,output_format", "a.png,p,bmp", "output_format", "unknown output format 'bmp'"),
    ("id,image,prompt", "../x,a.png,p", "id", "id '../x' contains '/'"),
    ("id,image,prompt", "a/b,a.png,p", "id", "id 'a/b' contains '/'"),
    ("id,image,prompt", "a\\b,a.png,p", "id", "id 'a\\\\b' contains '\\\\'"),
    ("id,image,prompt", "a\x00b,a.png,p", "id", "contains a control character"),
    ("id,image,prompt", "a\x1bb,a.png,p", "id", "contains a control character"),
    ("id,image,prompt", "..,a.png,p", "id", "id '..' is not allowed"),
    ("id,image,prompt", ".,a.png,p", "id", "id '.' is not allowed"),
    ("id,image,prompt", "x" * 257 + ",a.png,p", "id", "id is 257 characters; the limit is 256"),
    ("image,prompt,params", "a.png,p,[1]", "params", "params must be a JSON object, not list"),
    ("image,prompt,params", "a.png,p,{nope", "params", "params is not valid JSON"),
    (
        "image,prompt,params",
        'a.png,p,"{""size"": ""1024x1024""}"',
        "params",
        "params sets 'size', which has its own column; use the size column",
    ),
    (
        "image,prompt,params",
        'a.png,p,"{""model"": ""other""}"',
        "params",
        "params sets 'model', which the client sets itself",
    ),
    (
        "image,prompt,params",
        'a.png,p,"{""Response_Format"": ""url""}"',
        "params",
        "params sets 'Response_Format', which the client sets itself",
    ),
    (
        "image,prompt,params,param.turbo",
        'a.png,p,"{""turbo"": true}",false',
        "param.turbo",
        "turbo is set in both params and param.turbo; keep one",
    ),
]


@pytest.mark.parametrize(("header", "line", "column", "reason"), ROW_ERRORS)
def test_row_errors(tmp_path: Path, header: str, line: str, column: str, reason: str) -> None:
    # A valid row first: the bad one must be row 2, with its own number.
    good = valid_line(header)
    rows = parse(write(tmp_path, f"{header}\n{good}\n{line}\n"))
    assert len(rows) == 2
    valid(rows[0])
    bad = rows[1]
    assert bad.row == 2
    found = problems(bad)
    assert len(found) == 1, found
    assert found[0][0] == column
    assert reason in found[0][1], found[0][1]


def valid_line(header: str) -> str:
    defaults = {"image": "ok.png", "images": "", "prompt": "fine", "id": "good"}
    cells = [defaults.get(c, "") for c in header.split(",")]
    if "image" not in header.split(","):
        cells[header.split(",").index("images")] = "ok.png"
    return ",".join(cells)


def test_all_problems_of_a_row_are_reported(tmp_path: Path) -> None:
    header = "id,image,prompt,seed,n,size,output_format"
    row = one(tmp_path, header, "a/b,,,abc,99,huge,bmp")
    assert isinstance(row, InvalidRow)
    assert row.row == 1
    assert row.id is None
    assert [c for c, _ in problems(row)] == [
        "id",
        "image",
        "prompt",
        "seed",
        "n",
        "size",
        "output_format",
    ]
    assert "row 1: column id: id 'a/b' contains '/'" in row.message


def test_invalid_row_keeps_its_id(tmp_path: Path) -> None:
    row = one(tmp_path, "id,image,prompt", "keep-me,a.png,")
    assert isinstance(row, InvalidRow) and row.id == "keep-me"
    row = one(tmp_path, "image,prompt", "a.png,")
    assert isinstance(row, InvalidRow) and row.id == "row-1"


def test_duplicate_ids(tmp_path: Path) -> None:
    text = (
        "id,image,prompt\nx,a.png,p\ny,a.png,p\nx,a.png,p\n x ,a.png,p\nrow-6,a.png,p\n,a.png,p\n"
    )
    rows = parse(write(tmp_path, text))
    assert [r.row for r in rows] == [1, 2, 3, 4, 5, 6]
    valid(rows[0])
    valid(rows[1])
    assert problems(rows[2]) == [("id", "duplicate id 'x' (first at row 1)")]
    assert problems(rows[3]) == [("id", "duplicate id 'x' (first at row 1)")]
    valid(rows[4])
    # The derived id of row 6 collides with the explicit id of row 5.
    assert problems(rows[5]) == [("id", "duplicate id 'row-6' (first at row 5)")]


def test_each_pass_checks_ids_afresh(tmp_path: Path) -> None:
    with open_manifest(write(tmp_path, "id,image,prompt\nx,a.png,p\n")) as manifest:
        assert isinstance(next(manifest.rows()), ManifestRow)
        assert isinstance(next(manifest.rows()), ManifestRow)


# --- CSV dialects and damage --------------------------------------------------------------


def test_bom_semicolon_crlf_and_multiline_values(tmp_path: Path) -> None:
    text = 'image;prompt;seed\r\na.png;"line one\r\nline; two";1\r\nb.png;plain;2\r\n'
    path = write(tmp_path, b"\xef\xbb\xbf" + text.encode())
    with open_manifest(path) as manifest:
        assert manifest.delimiter == ";"
        assert manifest.columns == ["image", "prompt", "seed"]
        rows = [valid(r) for r in manifest.rows()]
    assert [(r.row, r.prompt, r.seed) for r in rows] == [
        (1, "line one\r\nline; two", 1),
        (2, "plain", 2),
    ]


def test_tab_separated(tmp_path: Path) -> None:
    rows = parse(write(tmp_path, "image\tprompt\na.png\tp, with comma\n", "m.tsv"))
    assert valid(rows[0]).prompt == "p, with comma"


def test_gzip_csv(tmp_path: Path) -> None:
    path = write(tmp_path, gzip.compress(b"image,prompt\na.png,p\nb.png,q\n"), "m.csv.gz")
    assert [valid(r).prompt for r in parse(path)] == ["p", "q"]


def make_rows(count: int, ragged: dict[int, str] | None = None) -> str:
    ragged = ragged or {}
    lines = ["id,image,prompt,seed"]
    for n in range(1, count + 1):
        lines.append(ragged.get(n, f"id-{n},img/{n}.png,prompt number {n},{n}"))
    return "\n".join(lines) + "\n"


def test_ragged_rows_keep_their_place_across_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pyarrow blocks so ragged rows fall in the middle of a many-block file.
    monkeypatch.setattr(manifest_read, "CSV_BLOCK_BYTES", 4096)
    bad = {
        1: "short,row",
        777: "id-777,img.png",
        1500: "id-1500,img.png,p,1,extra,more",
        1501: "too,few",
        2999: '"multi\nline",x',
        3000: "last,one,two,three,four",
    }
    path = write(tmp_path, make_rows(3000, bad))
    with open_manifest(path) as manifest:
        batches = list(manifest.batches(batch_size=128))
        assert manifest.count_rows() == 3000
    assert all(len(b) == 128 for b in batches[:-1])
    rows = [r for b in batches for r in b]
    assert [r.row for r in rows] == list(range(1, 3001))
    for r in rows:
        if r.row in bad:
            assert isinstance(r, InvalidRow)
            assert len(r.errors) == 1 and r.errors[0].column == ROW_COLUMN
        else:
            assert valid(r).id == f"id-{r.row}"
            assert r.seed == r.row
    by_row = {r.row: r for r in rows}
    assert problems(by_row[1]) == [(ROW_COLUMN, "expected 4 fields, found 2")]
    assert problems(by_row[777]) == [(ROW_COLUMN, "expected 4 fields, found 2")]
    assert problems(by_row[1500]) == [(ROW_COLUMN, "expected 4 fields, found 6")]
    assert problems(by_row[1501]) == [(ROW_COLUMN, "expected 4 fields, found 2")]
    assert "a quote may be unclosed" in problems(by_row[2999])[0][1]
    assert problems(by_row[3000]) == [(ROW_COLUMN, "expected 4 fields, found 5")]


def test_unclosed_quote_in_a_large_file_is_a_manifest_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_read, "CSV_BLOCK_BYTES", 4096)
    text = make_rows(1000, {500: 'id-500,a.png,"never closed,1'})
    manifest = open_manifest(write(tmp_path, text))
    with pytest.raises(ManifestError, match=r"bad quoting .* after data row \d+"):
        list(manifest.rows())


def test_unclosed_quote_swallowing_the_end_of_a_small_file(tmp_path: Path) -> None:
    # pyarrow reads the rest of the file into the one value: when that leaves the row short,
    # it is ragged; when the value is the last column, the last row says what happened.
    rows = parse(write(tmp_path, make_rows(5, {3: 'id-3,a.png,"never closed,3'})))
    assert [r.row for r in rows] == [1, 2, 3]
    [(column, reason)] = problems(rows[2])
    assert column == ROW_COLUMN
    assert reason == (
        "expected 4 fields, found 3; the row spans several lines, so a quote may be unclosed"
    )
    text = 'image,prompt,user\na.png,p,u1\na.png,q,"u2\nb.png,r,u3\nc.png,s,u4\n'
    rows = parse(write(tmp_path, text))
    assert [r.row for r in rows] == [1, 2]
    valid(rows[0])
    [(column, reason)] = problems(rows[1])
    assert column == "user"
    assert (
        reason == "the last row's user runs over 3 lines, 2 of them like rows; is a quote unclosed?"
    )


def test_multiline_last_value_is_fine(tmp_path: Path) -> None:
    text = 'image,prompt\na.png,"first line\nsecond, line, and more"\n'
    assert valid(parse(write(tmp_path, text))[0]).prompt == "first line\nsecond, line, and more"
    text = 'image,prompt\na.png,p\nb.png,"open\nc.png,q\n'
    [(column, reason)] = problems(parse(write(tmp_path, text))[1])
    assert (column, reason) == (
        "prompt",
        "the last row's prompt runs over 2 lines, 1 of them like rows; is a quote unclosed?",
    )


def csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


# Multi-line prompts a person writes: commas (one a line, as many as a 2- or 3-column row has
# delimiters, and a whole 10-column row's worth), quotes, blank lines, a line ending in a comma,
# one-word lines and a line break at the very end of the value.
MULTILINE_PROMPTS = [
    'Write "SALE" on the sign\nand make it red',
    'Write "SALE" on the sign\nand make it red, bold\n\nthen add "50% off", below it',
    'Make it "vintage",\n\nsepia, grain\nRed, bold\nmore, contrast, please\n',
    'Style: "noir"\na, b, c, d, e, f, g, h, i, j\nk,l,m,n,o,p,q,r,s\nend',
    'Keep the logo at top-left\n"as is"\n\n\nfinally, sharpen\n\n',
]
WIDE_HEADER = [
    "id",
    "image",
    "prompt",
    "seed",
    "n",
    "size",
    "output_format",
    "output_compression",
    "user",
    "param.style",
]


def wide_line(number: int, prompt: str) -> str:
    cells = [f"r{number}", f"img/{number}.png", csv_cell(prompt), str(number), "1"]
    return ",".join([*cells, "1024x1024", "jpeg", "80", f"u{number}", "vivid"])


@pytest.mark.parametrize("width", [2, 3, 10])
def test_multiline_prompts_validate_in_manifests_of_any_width(tmp_path: Path, width: int) -> None:
    def line(number: int, prompt: str) -> str:
        if width == 2:
            return f"img/{number}.png,{csv_cell(prompt)}"
        if width == 3:
            return f"img/{number}.png,{csv_cell(prompt)},{number}"
        return wide_line(number, prompt)

    header = {2: "image,prompt", 3: "image,prompt,seed", 10: ",".join(WIDE_HEADER)}[width]
    prompts = [*MULTILINE_PROMPTS, "plain"]
    lines = [header] + [line(n, p) for n, p in enumerate(prompts, 1)]
    # Each prompt also as the last row (a value there may end with a line break).
    for last in MULTILINE_PROMPTS:
        rows = parse(write(tmp_path, "\n".join([*lines[:-1], line(99, last)]) + "\n"))
        assert [valid(r).prompt for r in rows] == [p.strip() for p in [*prompts[:-1], last]]
    rows = parse(write(tmp_path, "\n".join(lines) + "\n"))
    assert [valid(r).prompt for r in rows] == [p.strip() for p in prompts]
    assert [r.row for r in rows] == list(range(1, len(prompts) + 1))
    # Also with CRLF line ends and the prompt as the last column.
    if width == 3:
        crlf = "image,seed,prompt\r\n" + "".join(
            f"img/{n}.png,{n},{csv_cell(p.replace(chr(10), chr(13) + chr(10)))}\r\n"
            for n, p in enumerate(prompts, 1)
        )
        rows = parse(write(tmp_path, crlf))
        assert [valid(r).prompt for r in rows] == [p.replace("\n", "\r\n").strip() for p in prompts]


SWALLOWING = [
    # (manifest, the bad row, its column, words of the reason): a quote left open swallows
    # the rows after it, up to the next quote (or to the end of the file).
    ('image,prompt\na.png,"open\nb.png,q\nc.png,"r"\nd.png,s\n', 1, "prompt", "stray quote"),
    ('image,prompt\na.png,"open\nb.png,"q"\nc.png,r\n', 1, "prompt", "stray quote"),
    ('image,prompt\na.png,p\nb.png,"Write ""SALE""\nc.png,q\nd.png,r\n', 2, "prompt", "last row"),
    ('image,prompt\na.png,p\nb.png,"open\nc.png,q\n', 2, "prompt", "last row"),
    ('image,prompt\na.png,p\nb.png,"open\nhttps://h/x,q\n', 2, "prompt", "last row"),
    ('image,prompt\nimg/a,p\nimg/b,"open\nimg/c,q\n', 2, "prompt", "last row"),
    ('image,prompt,seed\na.png,"open,1\nb.png,q,2\nc.png,"r",3\n', 1, "prompt", "stray quote"),
    ('image,prompt,seed\na.png,"open,1\nb.png,"r",3\nd.png,s,4\n', 1, "prompt", "stray quote"),
    ('image,seed,prompt\na.png,1,p\nb.png,2,"open\nc.png,3,q\n', 2, "prompt", "last row"),
    ('image,seed,prompt\na.png,1,"open\nb.png,2,"q"\nc.png,3,r\n', 1, "prompt", "stray quote"),
    ('prompt,image\n"open,a.png\nq,b.png\n"r",c.png\n', 1, "prompt", "stray quote"),
]


@pytest.mark.parametrize(("text", "row", "column", "words"), SWALLOWING)
def test_an_unclosed_quote_is_reported_in_narrow_manifests(
    tmp_path: Path, text: str, row: int, column: str, words: str
) -> None:
    rows = parse(write(tmp_path, text))
    bad = [r for r in rows if isinstance(r, InvalidRow)]
    assert [r.row for r in bad] == [row], rows
    [(found, reason)] = problems(bad[0])
    assert found == column
    assert "is a quote unclosed?" in reason and words in reason, reason


def test_quotes_inside_unquoted_values_are_kept(tmp_path: Path) -> None:
    row = valid(one(tmp_path, "image,prompt", 'a.png,a 5" statue'))
    assert row.prompt == 'a 5" statue'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "has no rows"),
        (b"\n\n  \n", "has no rows"),
        (b"\xef\xbb\xbf", "has no rows"),
        (b"image,prompt\n", "has no rows"),
        (b"image,prompt\n\n\n", "has no rows"),
        (b"image,prompt\na.png,caf\xe9\n", r"not valid UTF-8 \(line 2 has the byte 0xe9\)"),
        (b"\xff\xfei\x00m\x00", "UTF-16"),
        (b"image,promt\na.png,p\n", "no prompt column; found columns: 'image', 'promt'"),
        (b"img,prompt\na.png,p\n", "no image or images column; found columns: 'img', 'prompt'"),
        (b"image,prompt,Prompt\na,b,c\n", "has the column 'prompt' twice"),
        (b"image,prompt,param.size\na,b,c\n", "'param.size' sets 'size'.*use the size column"),
        (b"image,prompt,param.model\na,b,c\n", "'param.model' sets 'model'"),
        (b"image,prompt,param.\na,b,c\n", "names no parameter"),
    ],
)
def test_csv_manifest_errors(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        open_manifest(write(tmp_path, content))


def test_non_utf8_deep_in_the_file(tmp_path: Path) -> None:
    text = make_rows(3000).encode() + b"id-x,a.png,caf\xe9,1\n"
    manifest = open_manifest(write(tmp_path, text))
    with pytest.raises(ManifestError, match=r"not valid UTF-8 \(data row 3001\)"):
        list(manifest.rows())


def test_file_level_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(ManifestError, match=f"manifest not found: {missing}"):
        open_manifest(str(missing))
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(ManifestError, match="is a directory"):
        open_manifest(str(tmp_path / "dir.csv"))
    with pytest.raises(ManifestError, match=r"unknown format for manifest .*m\.xlsx"):
        open_manifest(write(tmp_path, "x", "m.xlsx"))
    with pytest.raises(ManifestError, match="unknown format"):
        open_manifest(write(tmp_path, "x", "manifest"))
    with pytest.raises(ManifestError, match="not a readable Parquet file"):
        open_manifest(write(tmp_path, "image,prompt\n", "m.parquet"))
    with pytest.raises(ManifestError, match="cannot decompress"):
        open_manifest(write(tmp_path, b"not gzip at all", "m.csv.gz"))


def test_file_uri_manifest(tmp_path: Path) -> None:
    path = write(tmp_path, "image,prompt\na.png,p\n", "my manifest.csv")
    assert valid(parse(f"file://{path}")[0]).images == (str(tmp_path / "a.png"),)
    quoted = "file://localhost" + path.replace(" ", "%20")
    assert valid(parse(quoted)[0]).images == (str(tmp_path / "a.png"),)
    with pytest.raises(ManifestError, match="names another host"):
        open_manifest("file://elsewhere/m.csv")
    with pytest.raises(ManifestError, match=r"unsupported manifest location https://h/m\.csv"):
        open_manifest("https://h/m.csv")


def test_unknown_columns_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "image,prompt,promt,notes\na.png,p,x,y\n")
    with open_manifest(path) as manifest:
        assert manifest.unknown_columns == ["promt", "notes"]
    report = validate_manifest(path)
    assert report.unknown_columns == ["promt", "notes"]
    text = format_report(report)
    assert "unknown columns, ignored: 'promt' (did you mean 'prompt'?), 'notes'" in text


# --- batching and streaming ---------------------------------------------------------------


def test_batches_arrive_in_order(tmp_path: Path) -> None:
    with open_manifest(write(tmp_path, make_rows(2500))) as manifest:
        batches = list(manifest.batches(batch_size=1000))
    assert [len(b) for b in batches] == [1000, 1000, 500]
    rows = [valid(r) for b in batches for r in b]
    assert [r.row for r in rows] == list(range(1, 2501))
    assert [r.id for r in rows] == [f"id-{n}" for n in range(1, 2501)]
    with pytest.raises(ValueError, match="batch_size"):
        next(open_manifest(write(tmp_path, make_rows(1))).batches(batch_size=0))


def test_large_csv_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200k rows: batches are bounded and arrive before the file has been read through."""
    path = tmp_path / "big.csv"
    with open(path, "w") as f:
        f.write("id,image,prompt,seed\n")
        for n in range(1, 200_001):
            f.write(f"id-{n},img/{n}.png,prompt number {n},{n}\n")
    size = path.stat().st_size
    read_so_far = 0
    real_open = ManifestFile.open

    class Counting:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.closed = False

        def read(self, n: int = -1) -> bytes:
            nonlocal read_so_far
            data: bytes = self.inner.read(n)
            read_so_far += len(data)
            return data

        def close(self) -> None:
            self.inner.close()
            self.closed = True

    def counting_open(self: ManifestFile) -> pa.NativeFile:
        return pa.PythonFile(Counting(real_open(self)), mode="r")

    monkeypatch.setattr(ManifestFile, "open", counting_open)
    # pyarrow's I/O thread reads about 32 blocks ahead; small blocks make the bound visible.
    block = 64 * 1024
    monkeypatch.setattr(manifest_read, "CSV_BLOCK_BYTES", block)
    with open_manifest(str(path)) as manifest:
        read_so_far = 0
        batches = manifest.batches(batch_size=1000)
        first = next(batches)
        assert len(first) == 1000
        assert read_so_far <= 40 * block < size / 3
        total, last_row, biggest = len(first), first[-1].row, len(first)
        for batch in batches:
            assert batch[0].row == last_row + 1
            total += len(batch)
            last_row = batch[-1].row
            biggest = max(biggest, len(batch))
            assert all(isinstance(r, ManifestRow) for r in batch)
    assert (total, last_row, biggest) == (200_000, 200_000, 1000)
    assert read_so_far == size


# --- validate_manifest and the report -----------------------------------------------------


def test_validate_manifest_counts_and_report(tmp_path: Path) -> None:
    text = (
        "id,image,prompt,seed,n\n"
        "a,a.png,p,1,3\n"
        "b,a.png,p,abc,\n"
        "c,a.png,p,2,\n"
        "d,,p,,\n"
        "e,a.png\n"
        "f,a.png,p,,2\n"
        "g,a.png,p,x,\n"
    )
    report = validate_manifest(write(tmp_path, text))
    assert (report.rows, report.valid, report.invalid, report.images) == (7, 3, 4, 6)
    assert [r.row for r in report.errors] == [2, 4, 5, 7]
    assert report.errors_by_column == {"seed": 2, "image": 1, ROW_COLUMN: 1}
    assert not report.ok
    assert report.estimated_cost_usd == pytest.approx(0.06)
    text = format_report(report)
    assert "7 rows, 3 valid, 4 invalid; 6 output images (about USD 0.06)" in text
    assert "row 2, column seed: seed 'abc' is not an integer" in text
    assert "row 4, column image: no image; set image or images" in text
    assert "row 5: expected 5 fields, found 2" in text
    assert "row 7, column seed: seed 'x' is not an integer" in text


def test_report_keeps_only_the_first_errors(tmp_path: Path) -> None:
    text = "image,prompt\n" + "a.png,\n" * 30
    report = validate_manifest(write(tmp_path, text), max_errors=10)
    assert (report.invalid, len(report.errors), report.errors_truncated) == (30, 10, True)
    assert [r.row for r in report.errors] == list(range(1, 11))
    listed = format_report(report, max_listed=5)
    assert listed.count("column prompt: prompt is empty") == 5
    assert "... and 5 more problems and 20 more invalid rows not listed" in listed


def test_report_all_valid(tmp_path: Path) -> None:
    report = validate_manifest(write(tmp_path, "image,prompt\na.png,p\n"))
    assert report.ok and report.errors == []
    assert format_report(report).endswith("all rows are valid")


# --- Parquet ------------------------------------------------------------------------------


def test_parquet_typed_columns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "images": pa.array(
                [["a.png", "s3://b/r.png"], None, ["c.png"], ["d.png"]], pa.list_(pa.string())
            ),
            "image": pa.array([None, "b.png", None, None]),
            "prompt": pa.array(["one", "two", "three", "four"]).dictionary_encode(),
            "seed": pa.array([42.0, None, 4.5, float("nan")], pa.float64()),
            "n": pa.array([2, None, 1, 1], pa.int32()),
            "param.turbo": pa.array([False, None, True, True]),
            "param.strength": pa.array([0.5, None, None, None]),
            "params": pa.array(['{"x": 1}', None, None, None], pa.large_string()),
            "extra_col": pa.array([b"\x00", b"", b"", b""]),
        }
    )
    path = write_parquet(tmp_path, table)
    with open_manifest(path) as manifest:
        assert manifest.format == "parquet"
        assert manifest.unknown_columns == ["extra_col"]
        assert manifest.count_rows() == 4
        rows = list(manifest.rows())
    first, second = valid(rows[0]), valid(rows[1])
    assert first.id == "1"
    assert first.images == (str(tmp_path / "a.png"), "s3://b/r.png")
    assert (first.prompt, first.seed, first.params.n) == ("one", 42, 2)
    assert first.params.extra == {"x": 1, "turbo": False, "strength": 0.5}
    assert second.images == (str(tmp_path / "b.png"),)
    assert second.seed is None and second.params.extra == {}
    assert problems(rows[2]) == [("seed", "seed 4.5 is not an integer")]
    assert problems(rows[3]) == [("seed", "seed nan is not an integer")]


def test_parquet_string_seed_and_list_errors(tmp_path: Path) -> None:
    table = pa.table(
        {
            "images": pa.array(
                [["a.png"], ["a.png"] * 6, [None], [], ["a.png"]], pa.list_(pa.string())
            ),
            "prompt": ["p", "p", "p", "p", None],
            "seed": ["x", "7", "", None, "8"],
        }
    )
    rows = parse(write_parquet(tmp_path, table))
    assert [r.row for r in rows] == [1, 2, 3, 4, 5]
    assert problems(rows[0]) == [("seed", "seed 'x' is not an integer")]
    assert problems(rows[1]) == [("images", "6 images; the limit is 5")]
    assert problems(rows[2]) == [("images", "image 1 of 1 is empty")]
    assert problems(rows[3]) == [("images", "no image; set image or images")]
    assert problems(rows[4]) == [("prompt", "prompt is missing")]


@pytest.mark.parametrize(
    ("column", "array", "message"),
    [
        ("prompt", pa.array([b"p"], pa.binary()), "'prompt' has the Parquet type binary"),
        ("prompt", pa.array([{"a": "p"}]), "'prompt' has the Parquet type struct"),
        ("seed", pa.array([pa.scalar(1, pa.timestamp("s"))]), "'seed' has the Parquet type"),
        ("images", pa.array([[1]], pa.list_(pa.int64())), "expected a string or list<string>"),
        ("size", pa.array([1024]), "'size' has the Parquet type int64; expected a string"),
        ("param.x", pa.array([[1]]), "'param.x' has the Parquet type list"),
    ],
)
def test_parquet_column_types_that_cannot_hold_values(
    tmp_path: Path, column: str, array: pa.Array, message: str
) -> None:
    columns: dict[str, pa.Array] = {"image": pa.array(["a.png"]), "prompt": pa.array(["p"])}
    columns[column] = array
    with pytest.raises(ManifestError, match=message):
        open_manifest(write_parquet(tmp_path, pa.table(columns)))


def test_parquet_manifest_errors(tmp_path: Path) -> None:
    empty = pa.table({"image": pa.array([], pa.string()), "prompt": pa.array([], pa.string())})
    with pytest.raises(ManifestError, match="has no rows"):
        open_manifest(write_parquet(tmp_path, empty, "empty.pq"))
    with pytest.raises(ManifestError, match="no prompt column; found columns: 'image', 'text'"):
        open_manifest(write_parquet(tmp_path, pa.table({"image": ["a"], "text": ["p"]})))
    dup = pa.Table.from_arrays(
        [pa.array(["a"]), pa.array(["p"]), pa.array(["q"])], names=["image", "prompt", "prompt"]
    )
    with pytest.raises(ManifestError, match="column 'prompt' twice"):
        open_manifest(write_parquet(tmp_path, dup, "dup.parquet"))


def test_parquet_batches_span_row_groups(tmp_path: Path) -> None:
    n = 20_000
    table = pa.table(
        {"id": [f"r{i}" for i in range(n)], "image": ["a.png"] * n, "prompt": ["p"] * n}
    )
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=3000)
    with open_manifest(str(path)) as manifest:
        batches = list(manifest.batches(batch_size=700))
    assert all(len(b) == 700 for b in batches[:-1])
    rows = [valid(r) for b in batches for r in b]
    assert [r.row for r in rows] == list(range(1, n + 1))
    assert [r.id for r in rows] == [f"r{i}" for i in range(n)]


# --- S3 -----------------------------------------------------------------------------------


def test_s3_csv_resolves_relative_sources_against_its_prefix(s3: Any) -> None:
    body = "image,prompt,mask\nimages/cat.png,p,../masks/m.png\n/local/x.png,q,\n"
    s3.put_object(Bucket=BUCKET, Key="runs/may/manifest.csv", Body=body.encode())
    uri = f"s3://{BUCKET}/runs/may/manifest.csv"
    with open_manifest(uri) as manifest:
        assert manifest.count_rows() == 2
        rows = [valid(r) for r in manifest.rows()]
    assert rows[0].images == (f"s3://{BUCKET}/runs/may/images/cat.png",)
    assert rows[0].mask == f"s3://{BUCKET}/runs/masks/m.png"
    assert rows[1].images == ("/local/x.png",)


def test_s3_relative_path_may_not_leave_the_bucket(s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="m.csv", Body=b"image,prompt\n../x.png,p\n")
    rows = parse(f"s3://{BUCKET}/m.csv")
    assert problems(rows[0]) == [("image", "relative path '../x.png' leads outside the bucket")]


def test_s3_parquet_and_gzip(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_parquet(tmp_path, pa.table({"image": ["a.png", "b.png"], "prompt": ["p", "q"]}))
    s3.put_object(Bucket=BUCKET, Key="dir/m.parquet", Body=Path(path).read_bytes())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    with open_manifest(f"s3://{BUCKET}/dir/m.parquet") as manifest:
        assert len(list(scratch.iterdir())) == 1  # Parquet needs a local copy
        assert manifest.count_rows() == 2
        rows = [valid(r) for r in manifest.rows()]
    assert list(scratch.iterdir()) == []
    assert [r.images[0] for r in rows] == [f"s3://{BUCKET}/dir/a.png", f"s3://{BUCKET}/dir/b.png"]
    s3.put_object(Bucket=BUCKET, Key="m.csv.gz", Body=gzip.compress(b"image;prompt\na;b\n"))
    assert valid(parse(f"s3://{BUCKET}/m.csv.gz")[0]).prompt == "b"


def test_s3_manifest_errors(s3: Any) -> None:
    with pytest.raises(ManifestError, match=f"manifest not found: s3://{BUCKET}/none.csv"):
        open_manifest(f"s3://{BUCKET}/none.csv")
    with pytest.raises(ManifestError, match="bucket 'no-such-bucket' does not exist"):
        open_manifest("s3://no-such-bucket/m.parquet")
    with pytest.raises(ManifestError, match="must name an object"):
        open_manifest(f"s3://{BUCKET}/")
    s3.put_object(Bucket=BUCKET, Key="bad.csv", Body=b"image,text\na,b\n")
    with pytest.raises(ManifestError, match="no prompt column"):
        open_manifest(f"s3://{BUCKET}/bad.csv")


def test_s3_manifest_replaced_between_passes(s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="m.csv", Body=b"image,prompt\na,p\n")
    with open_manifest(f"s3://{BUCKET}/m.csv") as manifest:
        s3.put_object(Bucket=BUCKET, Key="m.csv", Body=b"image,prompt\nb,q\n")
        with pytest.raises(ManifestError, match="changed since this run first read it"):
            list(manifest.rows())


def test_validate_manifest_on_s3(s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key="v.csv", Body=b"image,prompt,n\na,p,2\nb,,\n")
    report = validate_manifest(f"s3://{BUCKET}/v.csv")
    assert (report.rows, report.valid, report.invalid, report.images) == (2, 1, 1, 2)
    assert report.uri == f"s3://{BUCKET}/v.csv"


def test_parquet_struct_params_and_fixed_keys(tmp_path: Path) -> None:
    params = pa.array([{"turbo": True, "size": None}, {"turbo": None, "size": "1:1"}])
    table = pa.table({"image": ["a.png", "b.png"], "prompt": ["p", "q"], "params": params})
    rows = parse(write_parquet(tmp_path, table))
    assert valid(rows[0]).params.extra == {"turbo": True}
    assert problems(rows[1]) == [
        ("params", "params sets 'size', which has its own column; use the size column")
    ]
