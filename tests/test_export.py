"""`imgedit export`: a real run's results as WebDataset shards and Parquet, read back by the
packages training code uses (webdataset, Hugging Face datasets), locally and on S3."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pyarrow.parquet as pq
import pytest
from moto import mock_aws
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from flows.export_cli import Format
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.engine.summary import RunSummary
from pipeline.errors import ConfigError
from pipeline.uses.export import (
    INDEX_NAME,
    RESULT_COLUMNS,
    ExportFormat,
    ExportOptions,
    ExportReport,
    export_run,
    parse_size,
)
from tests.conftest import image_bytes
from tests.inprocess_emulator import InProcessEmulator

ROWS = 200
MULTI = {10, 60, 110, 160}  # rows (0-based) asking for n=2: two samples each
INVALID_ROW = 7  # no prompt: invalid, not exported
DUPLICATE_ROW = 8  # the same edit as row 0: skipped (duplicate), not exported
FORMATS = ("png", "jpeg", "webp")


@dataclass(frozen=True)
class Run:
    output: Path
    summary: RunSummary
    table: list[dict[str, Any]]  # the results table's rows

    @property
    def run_id(self) -> str:
        return self.summary.run_id

    def succeeded(self) -> dict[int, dict[str, Any]]:
        return {r["row"]: r for r in self.table if r["status"] == "succeeded"}

    def images(self) -> int:
        return sum(len(r["output_uris"]) for r in self.succeeded().values())


def _manifest(path: Path, src: Path) -> Path:
    with path.open("w", newline="") as fh:
        fields = ["id", "images", "prompt", "seed", "n", "output_format"]
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for i in range(ROWS):
            j = 0 if i == DUPLICATE_ROW else i  # the duplicate asks row 0's edit again
            writer.writerow(
                {
                    "id": f"r{i}",
                    "images": str(src),
                    "prompt": "" if i == INVALID_ROW else f"prompt {j}",
                    "seed": j,
                    "n": 2 if i in MULTI else "",
                    "output_format": FORMATS[j % 3],
                }
            )
    return path


def _make_run(output: Path | str, manifest: Path, **kw: Any) -> RunSummary:
    emulator = InProcessEmulator()
    try:
        opts = RunOptions(
            manifest=str(manifest),
            output=str(output),
            api_base=emulator.base_url,
            concurrency=16,
            **kw,
        )
        return asyncio.run(run_manifest(opts, emulator.parts()))
    finally:
        emulator.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One 200-row run through the engine and the in-process emulator, shared by the tests
    that only read it."""
    base = tmp_path_factory.mktemp("export-run")
    src = base / "src.png"
    src.write_bytes(image_bytes((32, 24), (10, 120, 200)))
    manifest = _manifest(base / "m.csv", src)
    summary = _make_run(base / "out", manifest)
    table = pq.read_table(summary.results_uri).to_pylist()
    assert summary.by_status["succeeded"] == ROWS - 2
    assert summary.skipped_by_reason == {"duplicate": 1}
    return Run(base / "out", summary, table)


def _stored(uri: str) -> bytes:
    return Path(uri).read_bytes()


def _check_metadata(meta: dict[str, Any], run: Run) -> tuple[int, int]:
    """`meta` equals its results table row; (row, image index)."""
    row = run.succeeded()[meta["row"]]
    for column in RESULT_COLUMNS:
        assert meta[column] == row[column], column
    index = meta["image_index"]
    assert meta["run_id"] == run.run_id
    assert meta["output_uri"] == row["output_uris"][index]
    data = _stored(meta["output_uri"])
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as im:
        assert (meta["width"], meta["height"]) == im.size
    return meta["row"], index


def _index(folder: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((folder / INDEX_NAME).read_text())
    for f in doc["files"]:
        data = (folder / f["name"]).read_bytes()
        assert len(data) == f["bytes"]
        assert hashlib.sha256(data).hexdigest() == f["sha256"]
    return doc


def _export(run: Run, fmt: ExportFormat, to: Path | str, **kw: Any) -> ExportReport:
    return export_run(str(run.output), run.run_id, ExportOptions(format=fmt, to=str(to), **kw))


def test_webdataset_shards_hold_the_stored_bytes_and_the_results_rows(
    run: Run, tmp_path: Path
) -> None:
    import webdataset as wds

    report = _export(run, ExportFormat.webdataset, tmp_path / "wds", shard_bytes=parse_size("1MB"))
    assert report.samples == run.images() == ROWS - 2 + len(MULTI)
    assert report.rows_exported == ROWS - 2 and not report.errors
    assert report.not_exported == {"invalid": 1, "skipped: duplicate": 1}
    index = _index(tmp_path / "wds")
    assert index["format"] == "webdataset" and index["run_id"] == run.run_id
    names = [f["name"] for f in index["files"]]
    assert len(names) > 1 and names[0] == "shard-000000.tar"
    assert sum(f["samples"] for f in index["files"]) == report.samples
    assert all(f["bytes"] <= 10**6 for f in index["files"])
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == sorted([*names, INDEX_NAME])

    urls = [str(tmp_path / "wds" / n) for n in names]
    seen: set[tuple[int, int]] = set()
    # webdataset's own tar reader and key grouping (what wds.WebDataset runs), over streams
    # this test opens and closes: WebDataset(urls) leaves its last shard open until GC.
    with contextlib.ExitStack() as stack:
        streams = [{"url": u, "stream": stack.enter_context(open(u, "rb"))} for u in urls]
        samples = list(wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams)))
    assert samples
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["__key__"] == meta["key"]
        row, index_ = _check_metadata(meta, run)
        (ext,) = {k for k in sample if k in ("png", "jpg", "webp")}
        assert ext == {"png": "png", "jpeg": "jpg", "webp": "webp"}[meta["output_format"]]
        assert sample[ext] == _stored(meta["output_uri"])
        seen.add((row, index_))
    assert len(seen) == report.samples
    assert {i for r, i in seen if r - 1 in MULTI} == {0, 1}


def test_parquet_loads_in_hugging_face_datasets_as_images(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import datasets

    report = _export(
        run,
        ExportFormat.parquet,
        tmp_path / "pq",
        shard_bytes=parse_size("2MB"),
        row_group_bytes=200_000,
    )
    assert report.samples == run.images() and not report.errors
    index = _index(tmp_path / "pq")
    files = [str(tmp_path / "pq" / f["name"]) for f in index["files"]]
    assert len(files) > 1 and files[0].endswith("part-000000.parquet")
    for path in files:
        meta = pq.ParquetFile(path).metadata
        assert meta.num_row_groups > 1
        for g in range(meta.num_row_groups):
            assert meta.row_group(g).total_byte_size < 2 * 200_000

    ds = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == report.samples
    first = ds[0]
    with Image.open(io.BytesIO(_stored(first["output_uri"]))) as im:
        assert first["image"].size == im.size
    raw = ds.cast_column("image", datasets.Image(decode=False))
    seen = set()
    for record in raw:
        image = record.pop("image")
        assert image["bytes"] == _stored(record["output_uri"])
        seen.add(_check_metadata(record, run))
    assert len(seen) == report.samples


def test_a_missing_or_broken_image_is_a_counted_error_and_the_rest_goes_on(
    run: Run, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    shutil.copytree(run.output, output)
    rows = run.succeeded()
    missing, broken = rows[1], rows[2]
    (output / missing["output_uris"][0].split("/out/", 1)[1]).unlink()
    truncated = output / broken["output_uris"][0].split("/out/", 1)[1]
    truncated.write_bytes(truncated.read_bytes()[:100])
    report = export_run(
        str(output),
        run.run_id,
        ExportOptions(format=ExportFormat.webdataset, to=str(tmp_path / "wds")),
    )
    assert report.errors == {"image_missing": 1, "image_invalid": 1}
    assert report.samples == run.images() - 2
    assert [e.row for e in report.examples["image_missing"]] == [1]
    text = "\n".join(report.lines())
    assert "image_missing 1" in text and "row 2 (id r1)" in text

    result = CliRunner().invoke(
        app,
        ["export", str(output), "--run", run.run_id, "--to", str(tmp_path / "cli")],
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "not exported: 2 rows" in result.output and "image_missing" in result.output


def test_cli_exports_the_newest_run_and_says_what_it_left_out(run: Run, tmp_path: Path) -> None:
    to = tmp_path / "export"
    args = ["export", str(run.output), "--format", "parquet", "--to", str(to)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["run_id"] == run.run_id and report["samples"] == run.images()
    assert report["not_exported"] == {"invalid": 1, "skipped: duplicate": 1}
    result = CliRunner().invoke(app, [*args, "--shard-size", "3 furlongs"])
    assert result.exit_code == 2 and "not a size" in result.output
    result = CliRunner().invoke(app, ["export", str(tmp_path), "--to", str(to)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_re_export_replaces_the_export_whole(run: Run, tmp_path: Path) -> None:
    to = tmp_path / "wds"
    many = _export(run, ExportFormat.webdataset, to, shard_bytes=parse_size("500KB"))
    assert many.files > 2
    one = _export(run, ExportFormat.webdataset, to)
    assert one.files == 1
    assert sorted(p.name for p in to.iterdir()) == ["index.json", "shard-000000.tar"]
    assert _index(to)["files"][0]["samples"] == run.images()
    # The same run exported twice gives the same bytes.
    again = _export(run, ExportFormat.webdataset, tmp_path / "again")
    assert (tmp_path / "again" / "shard-000000.tar").read_bytes() == (
        to / "shard-000000.tar"
    ).read_bytes()
    assert again.samples == one.samples


def test_sources_go_along_when_asked(run: Run, tmp_path: Path) -> None:
    report = _export(run, ExportFormat.webdataset, tmp_path / "wds", with_sources=True)
    src = Path(run.succeeded()[1]["source_uris"][0]).read_bytes()
    with tarfile.open(tmp_path / "wds" / "shard-000000.tar") as tar:
        names = tar.getnames()
        member = tar.extractfile("000000001-0.src.png")
        assert member is not None and member.read() == src
    assert len([n for n in names if ".src." in n]) == report.samples
    assert names[:3] == ["000000001-0.png", "000000001-0.json", "000000001-0.src.png"]


@pytest.fixture
def s3(aws_credentials: None) -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bkt")
        yield client


def test_export_from_and_to_s3(s3: Any, tmp_path: Path) -> None:
    src = tmp_path / "src.png"
    src.write_bytes(image_bytes((32, 24)))
    manifest = tmp_path / "m.csv"
    lines = ["id,images,prompt,seed,n"] + [
        f"r{i},{src},prompt {i},{i},{2 if i == 3 else 1}" for i in range(12)
    ]
    manifest.write_text("\n".join(lines) + "\n")
    summary = _make_run("s3://bkt/out", manifest)
    assert summary.by_status["succeeded"] == 12
    options = ExportOptions(format=ExportFormat.webdataset, to="s3://bkt/datasets/wds")
    report = export_run("s3://bkt/out", summary.run_id, options)
    assert report.samples == 13 and not report.errors
    index = json.loads(s3.get_object(Bucket="bkt", Key="datasets/wds/index.json")["Body"].read())
    (shard,) = index["files"]
    data = s3.get_object(Bucket="bkt", Key=f"datasets/wds/{shard['name']}")["Body"].read()
    assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        metas = [
            json.loads(tar.extractfile(m).read())  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.name.endswith(".json")
        ]
        for meta in metas:
            key = meta["output_uri"].removeprefix("s3://bkt/")
            stored = s3.get_object(Bucket="bkt", Key=key)["Body"].read()
            member = tar.extractfile(f"{meta['key']}.png")
            assert member is not None and member.read() == stored
    assert len(metas) == 13

    parquet = ExportOptions(format=ExportFormat.parquet, to="s3://bkt/datasets/pq")
    report = export_run("s3://bkt/out", None, parquet)
    assert report.samples == 13
    body = s3.get_object(Bucket="bkt", Key="datasets/pq/part-000000.parquet")["Body"].read()
    table = pq.read_table(io.BytesIO(body))
    assert table.num_rows == 13 and b"huggingface" in (table.schema.metadata or {})
    listed = s3.list_objects_v2(Bucket="bkt", Prefix="datasets/")["Contents"]
    assert sorted(o["Key"] for o in listed) == [
        "datasets/pq/index.json",
        "datasets/pq/part-000000.parquet",
        "datasets/wds/index.json",
        f"datasets/wds/{shard['name']}",
    ]


def test_the_augment_dataset_form_offers_the_export() -> None:
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    schema = parameter_schema_from_entrypoint(
        str(Path(__file__).resolve().parents[1] / "flows/augment_dataset.py:augment_dataset")
    ).model_dump()
    props = schema["properties"]
    assert "webdataset" in props["export"]["description"]
    assert "exports" in props["export_to"]["description"]
    choices = json.dumps(schema.get("definitions", {}))
    assert '"webdataset"' in choices and '"parquet"' in choices


def test_sizes_and_formats() -> None:
    assert parse_size("256MiB") == 256 * 2**20
    assert parse_size("1GB") == 10**9
    assert parse_size("70000") == 70000
    for bad in ("", "12 parsecs", "-5MB", "10"):
        with pytest.raises(ConfigError):
            parse_size(bad)
    assert {f.value for f in Format} == {f.value for f in ExportFormat}
