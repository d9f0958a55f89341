"""Catalogue manifests from a folder or an S3 prefix, and reading URIs back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import boto3
import httpx
import pandas as pd
import pytest
from moto import mock_aws

from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.errors import ConfigError, StorageError, StorageNotFound
from pipeline.io.storage import S3Storage
from pipeline.io.uri import UriReader
from pipeline.manifest.open import open_manifest, validate_manifest
from pipeline.manifest.rows import MAX_ID_CHARS
from pipeline.manifest.types import ManifestRow
from pipeline.uses import catalogue
from pipeline.uses.catalogue import (
    build_manifest_from_prefix,
    catalogue_id,
    check_settings,
    decode_catalogue_id,
)
from tests.conftest import image_bytes

SETTINGS = {
    "seed": 7,
    "size": "1024x1024",
    "output_format": "webp",
    "n": 2,
    "param.turbo": False,
}
# Relative keys of the images a test folder holds, and of what must be skipped.
IMAGES = [
    "a.png",
    "a/b.jpg",
    "a/c d.webp",
    "ab.PNG",
    "deep/er/x.gif",
    "pipe|name.png",
]
OTHERS = ["notes.txt", "a/meta.json", ".hidden.png", "deep/.cache/y.png", "README"]


def make_folder(root: Path) -> Path:
    for key in IMAGES + OTHERS:
        path = root.joinpath(*key.split("/"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes((8, 8)) if key.lower().endswith((".png", ".jpg")) else b"x")
    return root


def valid_rows(uri: str, **kw: str | None) -> list[ManifestRow]:
    with open_manifest(uri, **kw) as manifest:
        rows = list(manifest.rows())
    assert all(isinstance(r, ManifestRow) for r in rows), rows
    return [r for r in rows if isinstance(r, ManifestRow)]


def test_local_folder_every_image_once_sorted_by_key(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "cat")
    with open(bytes(root) + b"/not-utf8-\xff.png", "wb") as f:
        f.write(b"x")
    info = build_manifest_from_prefix(
        str(root), prompt=" make it snowy ", out_path=tmp_path / "m.parquet", settings=SETTINGS
    )
    assert info.rows == len(IMAGES) and info.skipped == len(OTHERS) + 1
    report = validate_manifest(str(info.path))
    assert report.ok and report.valid == len(IMAGES) and report.unknown_columns == []
    rows = valid_rows(str(info.path))
    keys = [decode_catalogue_id(r.id) for r in rows]
    assert keys == sorted(IMAGES)  # "a.png" < "a/b.jpg" < "ab.PNG": full-key order
    for row, key in zip(rows, keys, strict=True):
        assert row.images == (str(root.joinpath(*key.split("/"))),)
        assert Path(row.images[0]).is_file()
        assert row.prompt == "make it snowy" and row.seed == 7
        assert row.params.n == 2 and row.params.size == "1024x1024"
        assert row.params.output_format == "webp" and row.params.extra == {"turbo": False}
    ids = {r.id for r in rows}
    assert {"a%2Fb.jpg", "a%2Fc d.webp", "deep%2Fer%2Fx.gif"} <= ids
    # The pipe would make `image` a list: that row uses `images` with one element instead.
    table = pd.read_parquet(info.path).set_index("id")
    assert pd.isna(table.loc["pipe|name.png", "image"])
    assert list(table.loc["pipe|name.png", "images"]) == [str(root / "pipe|name.png")]


def test_many_keys_are_written_in_several_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(catalogue, "CATALOGUE_BATCH_ROWS", 4)
    root = tmp_path / "many"
    root.mkdir()
    for i in range(11):
        (root / f"img-{i:02d}.png").write_bytes(b"x")
    info = build_manifest_from_prefix(
        str(root), prompt="p", out_path=tmp_path / "out" / "m.parquet"
    )
    assert info.rows == 11
    table = pd.read_parquet(info.path)
    assert list(table["id"]) == [f"img-{i:02d}.png" for i in range(11)]
    assert list(table.columns) == ["id", "image", "images", "prompt"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "m.parquet"]  # no temp


def test_empty_folder_gives_an_empty_manifest(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_bytes(b"x")
    info = build_manifest_from_prefix(
        str(tmp_path / "empty"), prompt="p", out_path=tmp_path / "m.parquet"
    )
    assert (info.rows, info.skipped) == (0, 1)
    assert pd.read_parquet(info.path).empty


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"settings": {"sizee": "1024x1024"}}, "did you mean 'size'"),
        ({"settings": {"size": "huge"}}, "size"),
        ({"settings": {"n": 11}}, "n 11 is out of range"),
        ({"settings": {"prompt": "x"}}, "each row sets its own prompt"),
        ({"settings": {"param.model": "x"}}, "client sets itself"),
        ({"settings": {"seed": [1]}}, "must be text, a number"),
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * 1001}, "limit is 1000"),
        ({"extensions": ()}, "no image extensions"),
        ({"out_path": "m.csv"}, r"must end in \.parquet or \.pq"),
    ],
)
def test_bad_arguments_fail_before_listing(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"prompt": "p", "out_path": tmp_path / "m.parquet"}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        build_manifest_from_prefix(str(tmp_path), **args)  # type: ignore[arg-type]
    assert not (tmp_path / "m.parquet").exists()


def test_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="catalogue folder not found"):
        build_manifest_from_prefix(
            str(tmp_path / "nope"), prompt="p", out_path=tmp_path / "m.parquet"
        )
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"catalogue location .* is not a folder"):
        build_manifest_from_prefix(
            str(tmp_path / "file.png"), prompt="p", out_path=tmp_path / "m.parquet"
        )


def test_settings_are_canonical_and_params_become_json() -> None:
    out = check_settings({"Size": "2:3", "PARAM.turbo": True, "params": {"x": 1}, "user": None})
    assert out == {"size": "2:3", "param.turbo": True, "params": '{"x": 1}'}


def test_catalogue_ids_are_legal_unique_and_reversible() -> None:
    keys = ["a/b.png", "a__b.png", "a%2Fb.png", "tab\there.png", "back\\slash.png", "é/ü.png"]
    ids = [catalogue_id(k) for k in keys]
    assert len(set(ids)) == len(keys)
    for key, rid in zip(keys, ids, strict=True):
        assert not {"/", "\\", "\t"} & set(rid)
        assert unquote(rid) == key
    long_a = "d/" * 200 + "a.png"
    long_b = "d/" * 200 + "b.png"
    assert len(catalogue_id(long_a)) == MAX_ID_CHARS
    assert catalogue_id(long_a) != catalogue_id(long_b)


@pytest.fixture
def s3(aws_credentials: None) -> Iterator[object]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bkt")
        yield client


def test_s3_prefix_is_listed_as_a_folder(s3: object, tmp_path: Path) -> None:
    client = boto3.client("s3", region_name="us-east-1")
    for key in ["cat/" + k for k in IMAGES + OTHERS] + ["cat-old/z.png", "cat/sub/", "top.png"]:
        client.put_object(Bucket="bkt", Key=key, Body=image_bytes((8, 8)))
    info = build_manifest_from_prefix(
        "s3://bkt/cat", prompt="p", out_path=tmp_path / "m.parquet", settings={"seed": 1}
    )
    assert (info.rows, info.skipped) == (len(IMAGES), len(OTHERS) + 1)  # + the folder marker
    rows = valid_rows(str(info.path))
    assert [decode_catalogue_id(r.id) for r in rows] == sorted(IMAGES)
    assert [r.images[0] for r in rows] == [f"s3://bkt/cat/{k}" for k in sorted(IMAGES)]


def test_an_unordered_listing_is_sorted(
    s3: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = boto3.client("s3", region_name="us-east-1")
    for key in ("c.png", "a.png", "b.png"):
        client.put_object(Bucket="bkt", Key=f"p/{key}", Body=b"x")
    listed = S3Storage.list_keys

    def backwards(self: S3Storage, prefix: str = "") -> Iterator[str]:
        return iter(sorted(listed(self, prefix), reverse=True))

    monkeypatch.setattr(S3Storage, "list_keys", backwards)
    info = build_manifest_from_prefix("s3://bkt/p/", prompt="p", out_path=tmp_path / "m.parquet")
    assert list(pd.read_parquet(info.path)["id"]) == ["a.png", "b.png", "c.png"]


def test_uri_reader_reads_local_s3_and_http(s3: object, tmp_path: Path) -> None:
    client = boto3.client("s3", region_name="us-east-1")
    client.put_object(Bucket="bkt", Key="k/x.bin", Body=b"s3 bytes")
    (tmp_path / "f.bin").write_bytes(b"local bytes")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/x":
            return httpx.Response(200, content=b"http bytes")
        return httpx.Response(404)

    with UriReader(transport=httpx.MockTransport(handler)) as read:
        assert read(str(tmp_path / "f.bin")) == b"local bytes"
        assert read((tmp_path / "f.bin").as_uri()) == b"local bytes"
        assert read("s3://bkt/k/x.bin") == b"s3 bytes"
        assert read("http://127.0.0.1/x") == b"http bytes"
        for missing in (str(tmp_path / "nope"), "s3://bkt/k/nope", "http://127.0.0.1/nope"):
            with pytest.raises(StorageNotFound):
                read(missing)
        with pytest.raises(StorageError, match="unsupported scheme"):
            read("ftp://host/x")
    with UriReader(max_bytes=4) as small, pytest.raises(StorageError, match="larger than"):
        small(str(tmp_path / "f.bin"))


@pytest.mark.integration
async def test_rerun_over_a_catalogue_edits_only_changed_sources(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    root = tmp_path / "cat"
    root.mkdir()
    colours = {"a.png": (200, 0, 0), "b.png": (0, 200, 0), "c.png": (0, 0, 200)}
    for name, colour in colours.items():
        (root / name).write_bytes(image_bytes((32, 32), colour))

    async def run(run_id: str) -> dict[str, str]:
        info = build_manifest_from_prefix(
            str(root), prompt="p", out_path=tmp_path / f"{run_id}.parquet", settings={"seed": 3}
        )
        opts = RunOptions(
            manifest=str(info.path),
            output=str(tmp_path / "out"),
            api_base=emulator.base_url,
            run_id=run_id,
        )
        summary = await run_manifest(opts)
        table = pd.read_parquet(summary.results_uri)
        return dict(
            zip(table["id"], table["status"] + "/" + table["reason"].fillna(""), strict=True)
        )

    assert await run("first") == {k: "succeeded/" for k in colours}
    assert len(emulator.requests()) == 3
    assert await run("unchanged") == {k: "skipped/done" for k in colours}
    assert len(emulator.requests()) == 3  # no API call for an unchanged catalogue
    (root / "b.png").write_bytes(image_bytes((32, 32), (9, 9, 9)))
    (root / "d.png").write_bytes(image_bytes((32, 32), (90, 90, 9)))
    status = await run("changed")
    assert status == {
        "a.png": "skipped/done",
        "b.png": "succeeded/",
        "c.png": "skipped/done",
        "d.png": "succeeded/",
    }
    assert len(emulator.requests()) == 5
