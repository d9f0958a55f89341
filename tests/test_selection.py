"""Choosing rows for a backfill: by id, a where expression or a run's failures; engine numbering."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine import layout
from pipeline.engine.results import (
    ResultRow,
    failed_rows_of,
    rows_to_table,
    table_to_parquet_bytes,
)
from pipeline.errors import ConfigError, ManifestError
from pipeline.io.storage import LocalStorage
from pipeline.manifest import select as selection
from pipeline.manifest.open import open_manifest
from pipeline.manifest.select import RawManifest, check_where, select_rows
from pipeline.manifest.types import ManifestRow

CSV = """id,image,prompt,Seed,size,param.turbo,team
cat-1,a.png,p,1,1024x1024,true,red
cat-2,b.png,p,20,auto,false,blue
,c.png,p,,1024x1024,,red
dog-1,d.png,p,5,,true,blue
this,row,has,too,many,fields,here,and,more
dog-2,e.png,p,abc,1024x1024,false,red
"""


@pytest.fixture
def manifest(tmp_path: Path) -> str:
    path = tmp_path / "m.csv"
    path.write_text(CSV)
    return str(path)


def ids_of(uri: str, rows: set[int]) -> list[str]:
    """The ids pipeline.manifest.open gives the selected rows (so numbering is proven the same)."""
    with open_manifest(uri) as m:
        return [r.id for r in m.rows() if r.row in rows and r.id is not None]


def test_ids_select_rows_numbered_as_the_manifest(manifest: str) -> None:
    rows = select_rows(manifest, ids=["dog-2", "row-3", " cat-1 "])
    assert rows == {1, 3, 6}  # the ragged row 5 still counts
    assert sorted(ids_of(manifest, rows)) == ["cat-1", "dog-2", "row-3"]


def test_unknown_ids_are_an_error(manifest: str) -> None:
    with pytest.raises(ConfigError, match=r"2 id\(s\) are not in manifest .*'nope-1', 'nope-2'"):
        select_rows(manifest, ids=["cat-1", "nope-2", "nope-1"])
    with pytest.raises(ConfigError, match="id list is empty"):
        select_rows(manifest, ids=[" "])


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ('size == "1024x1024"', {1, 3, 6}),
        ("seed > 4", {2, 4}),  # CSV seed is a number; 'abc' and empty are NaN
        ("isnull(seed)", {3, 6}),
        ('`param.turbo` == "true"', {1, 4}),
        ('startswith(id, "dog")', {4, 6}),
        ('team == "red" and not (size == "auto")', {1, 3, 6}),
        ('team in ["blue"]', {2, 4}),
        ("True", {1, 2, 3, 4, 6}),
    ],
)
def test_where_filters_on_columns(manifest: str, where: str, expected: set[int]) -> None:
    assert select_rows(manifest, where=where) == expected


def test_criteria_combine_with_and(manifest: str) -> None:
    assert select_rows(manifest, ids=["cat-1", "cat-2", "dog-1"], where='team == "blue"') == {2, 4}


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("size ==", "is not valid"),
        ('sise == "auto"', "did you mean 'size'"),
        ("seed + 1", "must be a condition"),
        ("@secret > 1", "not valid"),
        ("   ", "empty"),
        ('__import__("os")', "not a supported function"),
    ],
)
def test_bad_where_fails_before_reading_rows(manifest: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        select_rows(manifest, where=where)


def test_where_type_mistakes_in_a_csv_are_explained(manifest: str) -> None:
    with pytest.raises(ConfigError, match=r"column 'team' is text \(use num\(team\)"):
        select_rows(manifest, where="team > 3")


def test_parquet_columns_keep_their_types(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    table = pa.table(
        {
            "id": pa.array([10, 11, 12], pa.int64()),
            "image": ["a.png", "b.png", "c.png"],
            "prompt": ["p", "p", "p"],
            "param.turbo": [True, False, None],
            "score": [0.1, 0.9, None],
            "n": pa.array([None, None, 2], pa.int64()),
        }
    )
    pq.write_table(table, path)
    assert select_rows(str(path), where="`param.turbo` == False") == {2}
    assert select_rows(str(path), where="score >= 0.1") == {1, 2}  # null is NaN: not selected
    assert select_rows(str(path), where="n == 2 or isnull(score)") == {3}
    assert select_rows(str(path), ids=["12"]) == {3}


def test_failed_rows_of_a_run(manifest: str, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    results = [
        ResultRow(row=1, id="cat-1", status="failed"),
        ResultRow(row=2, id="cat-2", status="succeeded"),
        ResultRow(row=3, id="row-3", status="failed"),
        ResultRow(row=4, id="dog-1", status="failed"),
        ResultRow(row=5, id=None, status="invalid"),
        ResultRow(row=6, id="dog-2", status="skipped", reason="done"),
    ]
    storage.put_bytes(layout.results_key("r1"), table_to_parquet_bytes(rows_to_table(results)))
    assert select_rows(manifest, failed_rows=failed_rows_of(storage, "r1")) == {1, 3, 4}
    assert select_rows(
        manifest, failed_rows=failed_rows_of(storage, "r1"), where='team == "red"'
    ) == {1, 3}
    with pytest.raises(ConfigError, match="cannot read the results of run 'r2'"):
        select_rows(manifest, failed_rows=failed_rows_of(storage, "r2"))


def test_no_criterion_is_an_error(manifest: str) -> None:
    with pytest.raises(ConfigError, match="choose the rows"):
        select_rows(manifest)


def test_many_rows_in_small_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "SELECT_BATCH_ROWS", 3)
    path = tmp_path / "m.csv"
    path.write_text("image,prompt,seed\n" + "".join(f"x{i}.png,p,{i}\n" for i in range(1, 21)))
    assert select_rows(str(path), where="seed % 5 == 0") == {5, 10, 15, 20}
    with open_manifest(str(path)) as m:
        seeds = {r.row: r.seed for r in m.rows() if isinstance(r, ManifestRow)}
    assert all(seeds[r] % 5 == 0 for r in (5, 10, 15, 20))


def test_raw_manifest_needs_no_prompt_column(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("IMAGE,Caption\na.png,hello\n")
    with RawManifest(str(path)) as raw:
        assert raw.columns == ["image", "Caption"]
        (row,) = list(raw.rows())
        assert row.cells == {"image": "a.png", "Caption": "hello"}  # type: ignore[union-attr]
    path.write_text("image,Image\na.png,b.png\n")
    with pytest.raises(ManifestError, match="column 'image' twice"):
        RawManifest(str(path))
    with pytest.raises(ManifestError, match="not found"):
        RawManifest(str(tmp_path / "none.csv"))


def test_check_where_alone() -> None:
    check_where("seed > 3", ["seed"], ["seed"])
    with pytest.raises(ConfigError, match="columns are: seed"):
        check_where("x > 3", ["seed"])
