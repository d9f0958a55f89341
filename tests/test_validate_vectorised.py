"""`Manifest.validate` checks rows a batch at a time (pipeline.manifest.batch): its report must
be exactly the per-row one (`Manifest.rows` counted row by row): same rows, columns, reasons,
counts, images, dropped fields and report text, for bad cells of every kind, CSV and Parquet,
over many batches, for every built-in model profile, with row ranges and `left`."""

from __future__ import annotations

import csv
import dataclasses
import io
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ManifestError
from pipeline.manifest import parquet_read
from pipeline.manifest import read as manifest_read
from pipeline.manifest.batch import NOT_SPACE, BatchValidator, SeenIds
from pipeline.manifest.batch_rows import PARAM_FIELDS, parsed_rows
from pipeline.manifest.columns import RawBatch
from pipeline.manifest.open import (
    MAX_REPORTED_ERRORS,
    RowRange,
    ValidationReport,
    format_report,
    open_manifest,
)
from pipeline.manifest.rows import RowValidator
from pipeline.manifest.source_base import SourceBase
from pipeline.manifest.types import EditParams, ManifestRow
from pipeline.models.builtin import BUILTIN
from pipeline.models.profile import MaskRule, ModelProfile, SizeRule

# A model stricter than any built-in one: no mask, 2-3 images, short prompts, n 2-4...
TIGHT = ModelProfile(
    model="tight-model",
    origin="schema",
    mask=MaskRule(accepted=False),
    min_images=2,
    max_images=3,
    max_prompt_chars=20,
    min_n=2,
    max_n=4,
    output_formats=("webp",),
    sizes=SizeRule(fixed=("512x512",), auto=False),
    params=frozenset({"quality"}),
    enums={"quality": ("low",)},
    strict_extras=True,
)
ALL_PROFILES = [*BUILTIN.values(), TIGHT]
PROFILES = [pytest.param(p, id=p.model) for p in ALL_PROFILES]

# Cells, good and bad, per column (CSV text).
# fmt: off
POOLS: dict[str, list[str]] = {
    "id": [
        "", "a1", "a1", "row-3", " spaced ", "x/y", "b\\c", ".", "..", "a" * 300, "ünï",
        "\u00a0nbsp", "tab\tin", " ", "\u3000", "ok-id", "ok-id", "ctl\x7f",
    ],
    "image": [
        "", "a.png", "/abs/b.png", "dir/../x.png", "./x.png", "s3://bkt/k.png", "s3://bkt",
        "s3:///k", "S3://b/k", "http://host/x.png", "https://", "http:///x", "HTTP://h/x",
        "file:///tmp/x.png", "file://other/x", "ftp://h/x", "a|b", '["a.png"]', "[", " a.png",
        "\u3000a.png", "  ", "http://[::1]/x", "http://ex ample/x", "dir/a://b", "ünï.png",
    ],
    "images": [
        "", "a.png|b.png", "a.png| b.png", "a||b", '["a.png","b.png"]', "[1]", "[", "a.png",
        "|".join(f"i{i}.png" for i in range(20)), "s3://b/k|https://h/p", "ftp://x|a.png",
        "  ", "a.png|", "file:///x.png|y.png", "../up.png|a.png",
    ],
    "prompt": [
        "make it red", "", "   ", " lead", "trail ", "x" * 1000, "x" * 1001, "été",
        "\u3000wide", "emoji 😀", "two\nlines", "p" * 32001, "\u0085next", "ok",
    ],
    "seed": [
        "", "0", "42", "42.0", "4.5", "-1", "abc", "9" * 19, "9223372036854775807",
        "9223372036854775808", " 7 ", "1e3", "+5", "  ", "٣",
    ],
    "n": ["", "1", "2", "0", "11", "10", "x", "3.0", " 2", "16"],
    "size": [
        "", "1024x1024", "auto", "AUTO", "16:9", "bogus", "1536x1024", " 1024x1024 ", "   ",
        "0x0", "1024X1024",
    ],
    "aspect_ratio": ["", "16:9", "auto", "bad", "1:1", " 4:3", "   "],
    "resolution": ["", "1K", "auto", "9Q", "2k", " 1K ", "  "],
    "output_format": ["", "png", "jpg", "JPEG", "bmp", " webp", "webp", "gif"],
    "output_compression": ["", "50", "0", "101", "abc", "100"],
    "quality": ["", "high", "low", "ultra", "auto", " High"],
    "user": ["", "u1", "  ", " u2", "ü"],
    "mask": ["", "m.png", "ftp://x/m.png", " m.png", "s3://b/m.png"],
    "params": [
        "", "{}", '{"turbo": true}', "{bad", "[1]", '{"size": "x"}',
        '{"background": "transparent"}', '{"thinking": "on"}', "  ",
    ],
    "param.turbo": ["", "true", "null", "1", "x" * 5000, "  "],
    "param.background": ["", "transparent", "opaque", "purple"],
}
# fmt: on
# How often a cell is drawn from the pool rather than left to a plain, valid value.
BAD_RATE = 0.06


def plain(column: str, row: int) -> str:
    """A valid cell (most cells are, so most rows take the batch path)."""
    return {
        "id": f"id-{row}",
        "image": f"img/{row % 7}.png",
        "images": "",
        "prompt": f"edit number {row % 5}",
        "seed": str(row),
        "n": str(1 + row % 3),
        "size": "1024x1024",
        "output_format": "png",
        "quality": "high",
        "user": f"u{row % 3}",
    }.get(column, "")


def fuzz_rows(columns: list[str], count: int, seed: int) -> list[list[str]]:
    rnd = random.Random(seed)
    return [
        [rnd.choice(POOLS[c]) if rnd.random() < BAD_RATE else plain(c, row) for c in columns]
        for row in range(1, count + 1)
    ]


def csv_text(columns: list[str], rows: list[list[str]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def per_row(
    uri: str,
    profile: ModelProfile | None,
    *,
    max_errors: int = MAX_REPORTED_ERRORS,
    row_range: RowRange | None = None,
    left: Callable[[int], bool] | None = None,
) -> ValidationReport:
    """The report as `Manifest.validate` made it before batches: row by row."""
    with open_manifest(uri, profile=profile) as manifest:
        report = manifest.new_report()
        rows_left = images_left = 0
        for parsed in manifest.rows_one_by_one(row_range):
            report.add(parsed, max_errors=max_errors)
            if left is not None and isinstance(parsed, ManifestRow) and left(parsed.row):
                rows_left += 1
                images_left += parsed.params.image_count()
        if left is not None:
            report.rows_left, report.images_left = rows_left, images_left
    return report


def summary(report: ValidationReport) -> dict[str, Any]:
    return {
        "counts": (report.rows, report.valid, report.invalid, report.images),
        "errors": [(r.row, r.id, [(e.column, e.reason) for e in r.errors]) for r in report.errors],
        "by_column": list(report.errors_by_column.most_common()),
        "dropped": list(report.dropped.items()),
        "left": (report.rows_left, report.images_left),
        "text": format_report(report, max_listed=10_000),
    }


def assert_same(uri: str, profile: ModelProfile | None, **kw: Any) -> ValidationReport:
    """The batch report is the per-row one, and so are the rows `Manifest.rows` builds."""
    with open_manifest(uri, profile=profile) as manifest:
        batched = manifest.validate(**kw)
        row_range = kw.get("row_range")
        built = list(manifest.rows(row_range))
        reference = list(manifest.rows_one_by_one(row_range))
        for size in (1, 97, 1000):
            assert [r for b in manifest.batches(size, row_range) for r in b] == reference
    assert built == reference
    expected = summary(per_row(uri, profile, **kw))
    assert summary(batched) == expected
    return batched


WIDE = [
    "id", "image", "images", "prompt", "seed", "mask", "n", "size", "aspect_ratio",
    "resolution", "output_format", "output_compression", "quality", "user", "params",
    "param.turbo", "param.background",
]  # fmt: skip


@pytest.mark.parametrize("profile", PROFILES)
def test_bad_cells_of_every_kind_give_the_per_row_errors(
    tmp_path: Path, profile: ModelProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small blocks: many batches, duplicate ids across them.
    monkeypatch.setattr(manifest_read, "CSV_BLOCK_BYTES", 64 * 1024)
    path = tmp_path / "m.csv"
    path.write_text(csv_text(WIDE, fuzz_rows(WIDE, 1500, seed=7)), encoding="utf-8")
    per_row_calls = 0
    validate = RowValidator.validate

    def counted(self: RowValidator, *args: Any, **kw: Any) -> Any:
        nonlocal per_row_calls
        per_row_calls += 1
        return validate(self, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(RowValidator, "validate", counted)
        with open_manifest(str(path), profile=profile) as manifest:
            manifest.validate()
    report = assert_same(str(path), profile)
    # Every invalid row (and a few valid ones) per row, most valid ones in batch; TIGHT
    # takes no row of this manifest (one image each).
    assert report.invalid <= per_row_calls < report.invalid + report.valid // 2 + 1
    if profile is not TIGHT:
        assert report.valid > 300 and report.invalid > 300
    assert_same(str(path), profile, max_errors=5)


def test_every_pooled_cell_alone_in_an_otherwise_valid_row(tmp_path: Path) -> None:
    columns = [c for c in WIDE if c != "images"]
    rows = []
    for column, pool in POOLS.items():
        for value in pool:
            index = len(rows) + 1
            if column == "images":
                row = [value if c == "image" else plain(c, index) for c in columns]
            else:
                row = [value if c == column else plain(c, index) for c in columns]
            rows.append(row)
    path = tmp_path / "m.csv"
    path.write_text(csv_text(columns, rows), encoding="utf-8")
    for profile in ALL_PROFILES:
        assert_same(str(path), profile)
    images_path = tmp_path / "images.csv"
    images_rows = [[v, "p", str(i)] for i, v in enumerate(POOLS["images"] + POOLS["image"])]
    images_path.write_text(csv_text(["images", "prompt", "seed"], images_rows))
    for profile in ALL_PROFILES:
        assert_same(str(images_path), profile)


def test_narrow_manifests_and_row_ranges(tmp_path: Path) -> None:
    columns = ["image", "prompt"]
    path = tmp_path / "m.csv"
    path.write_text(csv_text(columns, fuzz_rows(columns, 400, seed=3)), encoding="utf-8")
    for row_range in [(1, None), (50, None), (1, 120), (37, 301), (500, None), (400, 401)]:
        assert_same(str(path), None, row_range=row_range)
    assert_same(str(path), None, left=lambda row: row % 3 != 0)
    assert_same(str(path), BUILTIN["gpt-image-1"], row_range=(20, 90), left=lambda r: r > 40)


def test_ragged_and_swallowed_rows_keep_their_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_read, "CSV_BLOCK_BYTES", 4096)
    lines = ["id,image,prompt,seed"]
    lines += [f"id-{n},img/{n}.png,prompt number {n},{n}" for n in range(1, 3001)]
    for n, line in {
        1: "short,row",
        777: "id-777,img.png",
        1500: "id-1500,img.png,p,1,extra,more",
        1501: "too,few",
        2000: "id-5,img.png,dup of row 5,5",
        2999: '"multi\nline",x',
        3000: "last,one,two,three,four",
    }.items():
        lines[n] = line
    path = tmp_path / "ragged.csv"
    path.write_text("\n".join(lines) + "\n")
    report = assert_same(str(path), None)
    assert report.invalid == 7
    assert_same(str(path), None, row_range=(600, 1600), left=lambda r: r % 2 == 0)
    # Rows a quote left open swallowed (the same manifests as tests/test_manifest.py).
    texts = [
        'image,prompt\na.png,"open\nb.png,q\nc.png,"r"\nd.png,s\n',
        'image,prompt\na.png,p\nb.png,"open\nc.png,q\n',
        'image,prompt,user\na.png,p,u1\na.png,q,"u2\nb.png,r,u3\nc.png,s,u4\n',
        'image,prompt,seed\na.png,"open,1\nb.png,"r",3\nd.png,s,4\n',
        'prompt,image\n"open,a.png\nq,b.png\n"r",c.png\n',
        'image,prompt\na.png,"first line\nsecond, line, and more"\n',
        'image,prompt\na.png,"Write ""SALE"" on it\nand, make it red"\nb.png,p\n',
    ]
    for i, text in enumerate(texts):
        path = tmp_path / f"quote-{i}.csv"
        path.write_text(text)
        assert_same(str(path), None)


@pytest.mark.parametrize("profile", PROFILES)
def test_parquet_typed_columns(
    tmp_path: Path, profile: ModelProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parquet_read, "PARQUET_READ_ROWS", 7)
    rnd = random.Random(11)
    count = 300
    images_pool: list[list[str | None] | None] = [
        None, [], ["a.png"], ["a.png", None], ["a.png", " "], ["ftp://x/y", "b.png"],
        [f"i{i}.png" for i in range(20)], ["s3://b/k", "https://h/p"], ["file:///x.png"],
    ]  # fmt: skip
    seeds: list[float | None] = [None, 1.0, 4.5, float("nan"), -3.0, 2.0**60, 1e300, 7.0]

    def pick(pool: list[Any], good: Any) -> Any:
        return rnd.choice(pool) if rnd.random() < 0.15 else good

    table = pa.table(
        {
            "id": pa.array([pick([None, 5, -1, 10**12], n % 250) for n in range(count)]),
            "image": pa.array(
                [pick([None, "", " b.png", "ftp://x", "a|b"], None) for _ in range(count)],
                pa.string(),
            ),
            "images": pa.array(
                [pick(images_pool, ["a.png", f"r{n}.png"]) for n in range(count)],
                pa.list_(pa.string()),
            ),
            "prompt": pa.array([pick([None, "", " x", "p" * 2000], "edit") for _ in range(count)]),
            "seed": pa.array([pick(seeds, float(n)) for n in range(count)], pa.float64()),
            "n": pa.array([pick([None, 0, 11, 3, -2], 1) for _ in range(count)], pa.int64()),
            "output_compression": pa.array(
                [pick([None, 0, 200, 2**63], 80) for _ in range(count)], pa.uint64()
            ),
            "size": pa.array(
                [pick([None, "bogus", "auto", "512x512"], "1024x1024") for _ in range(count)]
            ).dictionary_encode(),
            "quality": pa.array([pick([None, "ultra", "low"], None) for _ in range(count)]),
            "param.turbo": pa.array([pick([None, True, False], None) for _ in range(count)]),
            "mask": pa.nulls(count, pa.string()),
            "user": pa.nulls(count),
        }
    )
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    report = assert_same(str(path), profile)
    if profile is not TIGHT:
        assert report.valid > 50 and report.invalid > 50
    assert_same(str(path), profile, row_range=(30, 250), left=lambda r: r % 5 != 1)
    # String ids and integer seeds, one large batch.
    monkeypatch.setattr(parquet_read, "PARQUET_READ_ROWS", 8192)
    columns = ["id", "image", "prompt", "seed", "n", "output_format"]
    rows = fuzz_rows(columns, 500, seed=5)
    data: dict[str, Any] = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    data["seed"] = pa.array([int(v) if v.isdigit() and len(v) < 18 else None for v in data["seed"]])
    path = tmp_path / "strings.parquet"
    pq.write_table(pa.table(data), path)
    assert_same(str(path), profile)


def test_not_space_is_what_str_strip_keeps() -> None:
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    kept = pc.match_substring_regex(pa.array(chars), "^" + NOT_SPACE + "$").to_pylist()
    assert [c for c, k in zip(chars, kept, strict=True) if k == c.isspace()] == []


def test_seen_ids_remember_the_first_row_across_batches() -> None:
    seen = SeenIds()
    rnd = random.Random(1)
    expected: dict[int, int] = {}
    row = 1
    for _ in range(60):
        size = rnd.randint(1, 300)
        keys = np.array([rnd.randrange(2000) for _ in range(size)], dtype=np.uint64)
        rows = np.arange(row, row + size, dtype=np.int64)
        want = [expected.setdefault(int(k), int(r)) for k, r in zip(keys, rows, strict=True)]
        assert seen.first_rows(keys, rows).tolist() == want
        row += size


def assert_batch_is_per_row(
    columns: dict[str, pa.Array], base: SourceBase, profile: ModelProfile
) -> None:
    """One batch checked by BatchValidator against RowValidator row by row."""
    names = list(columns)
    count = len(next(iter(columns.values())))
    checker = BatchValidator(RowValidator(names, base, profile))
    slow, fast = checker.validate(RawBatch(1, columns, count))
    reference = RowValidator(names, base, profile)
    cells = {name: array.to_pylist() for name, array in columns.items()}
    expected_rows = [
        RowValidator(names, base, profile).validate(r, {n: cells[n][r - 1] for n in names})
        for r in range(1, count + 1)
    ]
    built = parsed_rows(
        BatchValidator(RowValidator(names, base, profile)), RawBatch(1, columns, count)
    )
    assert built == expected_rows
    by_row = {parsed.row: parsed for parsed in slow}
    fast_at = {row: i for i, row in enumerate(fast.rows.tolist())}
    assert sorted([*by_row, *fast_at]) == list(range(1, count + 1))
    for row in range(1, count + 1):
        expected = reference.validate(row, {name: cells[name][row - 1] for name in names})
        if row in by_row:
            assert by_row[row] == expected
            continue
        assert isinstance(expected, ManifestRow), (row, expected)
        i = fast_at[row]
        assert int(fast.images[i]) == expected.params.image_count()
        dropped = tuple(c for c, mask in fast.dropped.items() if mask[i])
        assert dropped == expected.dropped


SOURCES = [
    *POOLS["image"], "../x.png", "a/../../x.png", ".", "./", "..", "a/..", ".hidden.png",
    "/abs.png", "a//b.png", "dir/", "a/./b.png", "x\x00y", "https://h/a b", "s3://b/k/../k2",
]  # fmt: skip


@pytest.mark.parametrize(
    "base",
    [
        SourceBase(local_dir="/data/manifests"),
        SourceBase(s3_bucket="bkt", s3_prefix="in/put"),
        SourceBase(s3_bucket="bkt", s3_prefix=""),
    ],
    ids=["local", "s3-prefix", "s3-root"],
)
@pytest.mark.parametrize("profile", PROFILES)
def test_sources_resolve_as_per_row_from_every_base(
    base: SourceBase, profile: ModelProfile
) -> None:
    sources = SOURCES
    count = len(sources)
    assert_batch_is_per_row(
        {
            "image": pa.array(sources),
            "prompt": pa.array(["p"] * count),
            "mask": pa.array(list(reversed(sources))),
        },
        base,
        profile,
    )
    assert_batch_is_per_row(
        {"images": pa.array(sources), "prompt": pa.array(["p"] * count)}, base, profile
    )
    lists = [[s, "b.png"] for s in sources] + [[s] for s in sources]
    masks = [*sources, *(["m.png", ""] * count)][: len(lists)]
    assert_batch_is_per_row(
        {
            "images": pa.array(lists),
            "prompt": pa.array(["p"] * len(lists)),
            "mask": pa.array(masks),
        },
        base,
        profile,
    )


def test_a_manifest_error_midway_is_the_per_row_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_read, "CSV_BLOCK_BYTES", 4096)
    lines = ["id,image,prompt,seed"]
    lines += [f"id-{n},img/{n}.png,prompt number {n},{n}" for n in range(1, 1001)]
    lines[500] = 'id-500,a.png,"never closed,1'
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    with open_manifest(str(path)) as manifest:
        with pytest.raises(ManifestError) as per_row_error:
            list(manifest.rows_one_by_one())
        with pytest.raises(ManifestError) as batch_error:
            manifest.validate()
        with pytest.raises(ManifestError) as rows_error:
            list(manifest.rows())
    assert str(batch_error.value) == str(per_row_error.value) == str(rows_error.value)


def test_rows_built_from_columns_fill_edit_params_in_field_order() -> None:
    # batch_rows builds EditParams positionally: its order must be the dataclass's.
    names = tuple(f.name for f in dataclasses.fields(EditParams))
    assert names[: len(PARAM_FIELDS)] == PARAM_FIELDS
    assert names[len(PARAM_FIELDS) :] == ("extra",)
