"""Augmentation: expanding images x prompts x seeds, and the dataset table of a real run."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto import mock_aws
from PIL import Image
from pydantic import ValidationError

from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.results import ResultRow, rows_to_table
from pipeline.engine.run import run_manifest
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest.open import open_manifest, validate_manifest
from pipeline.manifest.rows import MAX_ID_CHARS
from pipeline.manifest.types import ManifestRow
from pipeline.uses.augment import (
    DATASET_SCHEMA,
    AugmentSpec,
    expand_manifest,
    expanded_id,
    fill_template,
    template_fields,
    write_dataset_table,
)
from tests.conftest import image_bytes

DOCUMENTED_COLUMNS = [
    "row",
    "id",
    "source_id",
    "prompt_index",
    "source_uri",
    "source_uris",
    "prompt",
    "seed",
    "variant",
    "output_uri",
    "width",
    "height",
    "format",
    "revised_prompt",
    "cost",
    "job_key",
    "sidecar_uri",
    "status",
]


def write_csv(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def source_csv(sources: dict[str, Path]) -> str:
    folder = sources["square.png"].parent
    return write_csv(
        folder / "m.csv",
        "id,image,caption,style,size\n"
        "sq,square.png,a red square,flat,1024x1024\n"
        "wide,wide.jpg,a green field,watercolour,\n"
        ",tall.png,a blue tower,oil,2:3\n",
    )


def rows_of(path: Path) -> list[ManifestRow]:
    with open_manifest(str(path)) as m:
        rows = list(m.rows())
    assert all(isinstance(r, ManifestRow) for r in rows), rows
    return [r for r in rows if isinstance(r, ManifestRow)]


def test_expansion_is_sources_x_prompts_x_seeds(
    source_csv: str, sources: dict[str, Path], tmp_path: Path
) -> None:
    spec = AugmentSpec(
        manifest=source_csv,
        prompts=["make it snowy", " make it night "],
        seeds=[5, 1, 9],
        n=2,
        settings={"output_format": "webp", "param.turbo": False},
    )
    info = expand_manifest(spec, tmp_path / "out" / "expanded.parquet")
    assert (info.rows, info.sources) == (18, 3)
    report = validate_manifest(str(info.path))
    assert report.ok and report.images == 36
    rows = rows_of(info.path)
    assert [r.id for r in rows[:7]] == [
        "sq--p0--s5",
        "sq--p0--s1",
        "sq--p0--s9",
        "sq--p1--s5",
        "sq--p1--s1",
        "sq--p1--s9",
        "wide--p0--s5",
    ]
    assert rows[-1].id == "row-3--p1--s9"
    first, last = rows[0], rows[-1]
    # Relative sources now absolute: the expanded manifest lives elsewhere.
    assert first.images == (str(sources["square.png"]),)
    assert last.images == (str(sources["tall.png"]),)
    assert (first.prompt, first.seed, rows[4].prompt) == ("make it snowy", 5, "make it night")
    assert first.params.size == "1024x1024" and last.params.size == "2:3"
    assert rows[6].params.size is None
    assert all(r.params.n == 2 and r.params.output_format == "webp" for r in rows)
    assert all(r.params.extra == {"turbo": False} for r in rows)
    table = pd.read_parquet(info.path)
    assert list(table["source_id"].unique()) == ["sq", "wide", "row-3"]
    assert list(table["source_row"].unique()) == [1, 2, 3]
    assert set(table["prompt_index"]) == {0, 1}
    assert "caption" not in table.columns  # template-only columns are not carried


def test_template_fills_each_row(source_csv: str, tmp_path: Path) -> None:
    spec = AugmentSpec(
        manifest=source_csv,
        prompt_template="{caption}, in {style!s:>5} style ({style!r})",
        seeds=[0, 1],
    )
    info = expand_manifest(spec, tmp_path / "e.parquet")
    assert info.rows == 6
    prompts = [r.prompt for r in rows_of(info.path)]
    assert prompts[0] == "a red square, in  flat style ('flat')"
    assert prompts[4] == "a blue tower, in   oil style ('oil')"
    assert {r.id for r in rows_of(info.path)} >= {"sq--p0--s0", "sq--p0--s1"}


def test_template_errors_name_the_column(source_csv: str, tmp_path: Path) -> None:
    spec = AugmentSpec(manifest=source_csv, prompt_template="{captoin} in {style}")
    with pytest.raises(ConfigError, match=r"column 'captoin', which manifest .* does not have"):
        expand_manifest(spec, tmp_path / "e.parquet")
    spec = AugmentSpec(manifest=source_csv, prompt_template="{Caption}")
    with pytest.raises(ConfigError, match="did you mean 'caption'"):
        expand_manifest(spec, tmp_path / "e.parquet")
    # An empty cell the template needs: row 2's size.
    spec = AugmentSpec(manifest=source_csv, prompt_template="{caption} at {size}")
    with pytest.raises(ManifestError, match="row 2: column 'size' is empty"):
        expand_manifest(spec, tmp_path / "e.parquet")
    assert not (tmp_path / "e.parquet").exists()


def test_template_parsing() -> None:
    assert template_fields("{a} {param.turbo} {a!r:>3} {{literal}}") == ["a", "param.turbo"]
    assert fill_template("{x.y}-{n:03d}", {"x.y": "v", "n": 7}) == "v-007"
    with pytest.raises(ManifestError, match="does not fit the template's format"):
        fill_template("{n:03d}", {"n": "seven"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of prompts and prompt_template"),
        ({"prompts": ["a"], "prompt_template": "{a}"}, "exactly one"),
        ({"prompts": []}, "empty list"),
        ({"prompts": ["ok", " "]}, "prompt 1 is empty"),
        ({"prompts": ["x" * 1001]}, "limit is 1000"),
        ({"prompt_template": "{} and {0}"}, "positional field"),
        ({"prompt_template": "no fields"}, "names no column"),
        ({"prompt_template": "{a"}, "not valid"),
        ({"prompts": ["a"], "seeds": [1, 1]}, "seeds repeat"),
        ({"prompts": ["a"], "seeds": [-1]}, "out of range"),
        ({"prompts": ["a"], "n": 11}, "n 11 is out of range"),
        ({"prompts": ["a"], "settings": {"seed": 3}}, "each row sets its own seed"),
        ({"prompts": ["a"], "settings": {"size": "big"}}, "bad settings"),
        ({"prompts": ["a"], "colour": "red"}, "Extra inputs"),
    ],
)
def test_bad_specs_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        AugmentSpec(manifest="m.csv", **kwargs)  # type: ignore[arg-type]


def test_parquet_source_with_image_lists_and_typed_columns(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    folder = sources["square.png"].parent
    table = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "images": pa.array([["square.png", "ref.webp"], ["tall.png"]], pa.list_(pa.string())),
            "prompt": ["old", "old"],
            "size": pa.array(["2:3", "2:3"]).dictionary_encode(),
            "params": pa.array([{"turbo": False}, {"turbo": True}]),
            "n": pa.array([3, None], pa.int64()),
        }
    )
    pq.write_table(table, folder / "m.parquet")
    spec = AugmentSpec(manifest=str(folder / "m.parquet"), prompt_template="{prompt}, new")
    info = expand_manifest(spec, tmp_path / "e.parquet")
    rows = rows_of(info.path)
    assert [r.id for r in rows] == ["1--p0--s0", "2--p0--s0"]
    assert rows[0].images == (str(sources["square.png"]), str(sources["ref.webp"]))
    assert rows[0].prompt == "old, new" and rows[0].seed == 0
    assert rows[0].params.n == 3 and rows[1].params.n is None
    assert rows[0].params.size == "2:3" and rows[1].params.extra == {"turbo": True}


def test_ragged_source_row_and_missing_image_column(tmp_path: Path) -> None:
    bad = write_csv(tmp_path / "bad.csv", "image,caption\na.png,x\nb.png,y,extra\n")
    with pytest.raises(ManifestError, match="row 2: expected 2 fields, found 3"):
        expand_manifest(AugmentSpec(manifest=bad, prompts=["p"]), tmp_path / "e.parquet")
    with pytest.raises(ConfigError, match="must end in"):
        expand_manifest(AugmentSpec(manifest=bad, prompts=["p"]), tmp_path / "e.csv")
    none = write_csv(tmp_path / "none.csv", "caption\nx\n")
    with pytest.raises(ManifestError, match="no image or images column"):
        expand_manifest(AugmentSpec(manifest=none, prompts=["p"]), tmp_path / "e.parquet")


def test_long_source_ids_keep_their_suffix() -> None:
    rid = expanded_id("x" * 300, 3, 2**63 - 1)
    assert len(rid) == MAX_ID_CHARS and rid.endswith(f"--p3--s{2**63 - 1}")
    assert expanded_id("y" * 300, 3, 1) != expanded_id("y" * 299 + "z", 3, 1)


@pytest.fixture
def s3(aws_credentials: None) -> Iterator[None]:
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="bkt")
        yield


def test_s3_source_manifest_resolves_relative_keys(s3: None, tmp_path: Path) -> None:
    client = boto3.client("s3", region_name="us-east-1")
    client.put_object(Bucket="bkt", Key="data/m.csv", Body=b"image\nimgs/a.png\ns3://o/b.png\n")
    info = expand_manifest(
        AugmentSpec(manifest="s3://bkt/data/m.csv", prompts=["p"]), tmp_path / "e.parquet"
    )
    assert [r.images for r in rows_of(info.path)] == [
        ("s3://bkt/data/imgs/a.png",),
        ("s3://o/b.png",),
    ]


def test_dataset_table_refuses_results_of_another_manifest(source_csv: str, tmp_path: Path) -> None:
    info = expand_manifest(AugmentSpec(manifest=source_csv, prompts=["p"]), tmp_path / "e.parquet")
    results = rows_to_table([ResultRow(row=1, id="other", status="failed")])
    with pytest.raises(ConfigError, match="row 1 is 'other' in the results and 'sq--p0--s0'"):
        write_dataset_table(results, info.path, tmp_path / "d.parquet")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": ["x"], "image": ["a.png"], "prompt": ["p"]}), plain)
    with pytest.raises(ConfigError, match="has no source_id, prompt_index column"):
        write_dataset_table(results, plain, tmp_path / "d.pq")


def test_done_and_duplicate_rows_and_a_lost_sidecar(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    out = tmp_path / "img.png"
    out.write_bytes(image_bytes((10, 20)))
    good.write_text(
        json.dumps(
            {
                "outputs": [{"uri": str(out), "width": 10, "height": 20, "format": "png"}],
                "revised_prompt": "better",
            }
        )
    )
    results = rows_to_table(
        [
            ResultRow(row=1, id="a", status="skipped", reason="done", sidecar_uri=str(good)),
            ResultRow(row=2, id="b", status="skipped", reason="done", sidecar_uri="/nope.json"),
            ResultRow(row=3, id="c", status="skipped", reason="budget"),
            ResultRow(
                row=4,
                id="d",
                status="skipped",
                reason="duplicate",
                output_uris=[str(out), str(out)],
                actual_size="10x20",
                output_format="png",
            ),
            ResultRow(row=5, id="e", status="failed", reason="duplicate"),
        ]
    )
    info = write_dataset_table(results, None, tmp_path / "d.parquet")
    assert (info.rows, info.jobs, info.missing_sidecars, info.excluded) == (3, 2, 1, 2)
    assert info.by_status == {"succeeded": 0, "done": 1, "duplicate": 2}
    done, *dups = pd.read_parquet(info.uri).to_dict("records")
    assert done["source_id"] == "a" and pd.isna(done["prompt_index"])
    assert (done["output_uri"], done["width"], done["height"]) == (str(out), 10, 20)
    assert (done["revised_prompt"], done["status"], done["cost"]) == ("better", "done", 0.0)
    assert [(d["id"], d["variant"], d["status"], d["cost"]) for d in dups] == [
        ("d", 0, "duplicate", 0.0),
        ("d", 1, "duplicate", 0.0),
    ]
    assert (dups[1]["width"], dups[1]["height"], dups[1]["format"]) == (10, 20, "png")


def check_dataset(frame: pd.DataFrame) -> None:
    """Every output exists and is the image the row says (size and format)."""
    for record in frame.to_dict("records"):
        path = Path(record["output_uri"])
        assert path.is_file()
        with Image.open(path) as im:
            assert im.size == (record["width"], record["height"])
            assert im.format.lower() == record["format"]
        assert Path(record["sidecar_uri"]).is_file()
        assert record["source_uri"] == record["source_uris"][0]


@pytest.mark.integration
async def test_dataset_table_of_a_real_run(
    sources: dict[str, Path], tmp_path: Path, emulator: EmulatorProcess, aws_credentials: None
) -> None:
    folder = sources["square.png"].parent
    manifest = write_csv(
        folder / "m.csv",
        "id,image\nsq,square.png\ntall,tall.png\nsq-copy,square.png\ngone,missing.png\n",
    )
    spec = AugmentSpec(
        manifest=manifest, prompts=["make it blue", "make it red"], seeds=[1, 2], n=2
    )
    expanded = expand_manifest(spec, tmp_path / "expanded.parquet")
    assert expanded.rows == 16
    out = tmp_path / "out"

    async def run(run_id: str) -> str:
        opts = RunOptions(
            manifest=str(expanded.path),
            output=str(out),
            api_base=emulator.base_url,
            run_id=run_id,
        )
        summary = await run_manifest(opts)
        assert summary.by_status["invalid"] == 4  # the missing source
        return summary.results_uri

    first_results = await run("first")
    info = write_dataset_table(first_results, expanded.path, tmp_path / "ds" / "first.parquet")
    assert "datasets" not in sys.modules  # plain Parquet: pandas/pyarrow are enough
    frame = pd.read_parquet(info.uri)
    assert list(frame.columns) == DOCUMENTED_COLUMNS == DATASET_SCHEMA.names
    assert (info.rows, info.jobs, info.excluded) == (24, 12, 4) and len(frame) == 24
    assert len(emulator.requests()) == 8  # sq-copy's jobs are sq's: never sent twice
    check_dataset(frame)
    source_files = {"sq": "square.png", "sq-copy": "square.png", "tall": "tall.png"}
    assert set(frame["source_id"]) == set(source_files)
    assert sorted(frame["variant"].unique()) == [0, 1]
    for record in frame.to_dict("records"):
        assert record["prompt"] == ["make it blue", "make it red"][record["prompt_index"]]
        assert (
            record["id"] == f"{record['source_id']}--p{record['prompt_index']}--s{record['seed']}"
        )
        assert record["source_uri"] == str(sources[source_files[record["source_id"]]])
    own = frame[frame["source_id"] != "sq-copy"]
    assert set(own["status"]) == {"succeeded"}
    # A copy of a source is the same job: it shares the first row's outputs, and pays nothing.
    copy = frame[frame["source_id"] == "sq-copy"]
    assert set(copy["status"]) <= {"duplicate", "done"} and copy["cost"].sum() == 0
    sq = frame[frame["source_id"] == "sq"]
    assert sorted(copy["output_uri"]) == sorted(sq["output_uri"])
    results = pd.read_parquet(first_results)
    assert frame["cost"].sum() == pytest.approx(results["cost"].sum())
    assert frame["cost"].sum() == pytest.approx(8 * 2 * 0.01)

    # A second run finds every job done: the table comes from the sidecars, at no cost.
    second = write_dataset_table(await run("second"), expanded.path, tmp_path / "ds" / "2.pq")
    assert len(emulator.requests()) == 8
    again = pd.read_parquet(second.uri)
    assert set(again["status"]) == {"done"} and again["cost"].sum() == 0
    check_dataset(again)
    key = ["id", "variant"]
    assert again.sort_values(key)[["output_uri", "width", "height"]].values.tolist() == (
        frame.sort_values(key)[["output_uri", "width", "height"]].values.tolist()
    )

    # The table can go straight to S3, too.
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bkt")
        up = write_dataset_table(first_results, expanded.path, "s3://bkt/ds/data.parquet")
        assert up.uri == "s3://bkt/ds/data.parquet"
        body = client.get_object(Bucket="bkt", Key="ds/data.parquet")["Body"].read()
    assert len(pq.read_table(pa.BufferReader(body))) == 24
