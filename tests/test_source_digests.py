"""Source digests: a resume of rows that each have their own source finds their jobs done from
the digests the output keeps by (URI, version), without reading the sources again; a source
whose bytes (or only its times) changed is read again; digests are a cache, never trusted
for what is sent."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest

from pipeline.engine import source_digests
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.engine.sources import SourceLoader
from pipeline.engine.summary import RunSummary
from pipeline.io.local_storage import LocalStorage
from tests.conftest import image_bytes
from tests.inprocess_emulator import InProcessEmulator

pytestmark = pytest.mark.integration

ROWS = 12


@pytest.fixture
def emulator() -> Iterator[InProcessEmulator]:
    emu = InProcessEmulator()
    yield emu
    emu.close()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sources actually read (the loader's one read path), in order."""
    seen: list[str] = []
    read = SourceLoader._read_and_check

    async def counted(self: SourceLoader, uri: str) -> Any:
        seen.append(uri)
        return await read(self, uri)

    monkeypatch.setattr(SourceLoader, "_read_and_check", counted)
    return seen


def write_manifest(path: Path, images: list[str], first: int = 0) -> Path:
    """Row r<i>, seed i, from `first` on: the same i, the same job."""
    lines = ["id,image,prompt,seed"] + [
        f"r{i},{uri},a starry sky,{i}" for i, uri in enumerate(images, first)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def run(manifest: Path, out: str, emu: InProcessEmulator, **kw: Any) -> RunSummary:
    opts = RunOptions(manifest=str(manifest), output=out, api_base=emu.base_url, **kw)
    return await run_manifest(opts, emu.parts())


def statuses(summary: RunSummary) -> dict[str, str]:
    table = pd.read_parquet(summary.results_uri) if "://" not in summary.results_uri else None
    assert table is not None
    return dict(zip(table["id"], table["status"], strict=True))


async def test_a_resume_of_rows_with_their_own_sources_reads_none_of_them(
    tmp_path: Path, emulator: InProcessEmulator, reads: list[str]
) -> None:
    paths = []
    for i in range(ROWS):
        path = tmp_path / "src" / f"product-{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image_bytes((32 + i, 32), (i * 20, 100, 200)))
        paths.append(path)
    manifest = write_manifest(tmp_path / "m.csv", [str(p) for p in paths])
    out = str(tmp_path / "out")

    first = await run(manifest, out, emulator)
    assert first.by_status["succeeded"] == ROWS and len(reads) == ROWS
    kept = source_digests.load(LocalStorage(out))
    assert len(kept) == ROWS
    requests = emulator.stats()["requests"]

    reads.clear()
    second = await run(manifest, out, emulator)
    assert second.by_status.get("skipped") == ROWS and second.skipped_by_reason == {"done": ROWS}
    assert reads == []  # every job found done without reading its source
    assert emulator.stats()["requests"] == requests
    assert (
        pd.read_parquet(second.results_uri)["job_key"].tolist()
        == pd.read_parquet(first.results_uri)["job_key"].tolist()
    )

    # New bytes: read, and a new job edited. Same bytes, new times: read, found done.
    paths[3].write_bytes(image_bytes((40, 40), (1, 2, 3)))
    paths[7].touch()
    reads.clear()
    third = await run(manifest, out, emulator)
    assert sorted(reads) == sorted([str(paths[3]), str(paths[7])])
    assert third.by_status == {"succeeded": 1, "failed": 0, "invalid": 0, "skipped": ROWS - 1}
    assert emulator.stats()["requests"] == requests + 1
    # Both new versions are filed: the next resume reads nothing.
    reads.clear()
    fourth = await run(manifest, out, emulator)
    assert reads == [] and fourth.by_status.get("skipped") == ROWS


async def test_digests_are_a_cache_a_bad_segment_is_skipped_and_many_are_merged(
    tmp_path: Path,
    emulator: InProcessEmulator,
    reads: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "out"
    storage = LocalStorage(str(out))
    images = []
    for i in range(4):
        path = tmp_path / "src" / f"p{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image_bytes((30, 30 + i), (9, 9, i)))
        images.append(str(path))
        # One run a row: one segment each.
        await run(write_manifest(tmp_path / f"m{i}.csv", images[-1:], i), str(out), emulator)
    segments = sorted(storage.list_keys(source_digests.PREFIX))
    assert len(segments) == 4
    monkeypatch.setattr(source_digests, "COMPACT_AT", 2)
    storage.put_bytes(source_digests.PREFIX + "garbage.parquet", b"not parquet")
    manifest = write_manifest(tmp_path / "all.csv", images)
    caplog.set_level(logging.WARNING)
    reads.clear()
    summary = await run(manifest, str(out), emulator)
    assert reads == [] and summary.by_status.get("skipped") == 4
    assert "garbage.parquet skipped" in caplog.text
    # Merged beside the rows: one segment holds the four (the unreadable one stays).
    left = sorted(storage.list_keys(source_digests.PREFIX))
    assert len(left) == 2 and source_digests.PREFIX + "garbage.parquet" in left
    assert len(source_digests.load(storage)) == 4
    # With --overwrite nothing is taken from them: every source read, every row edited.
    reads.clear()
    again = await run(manifest, str(out), emulator, overwrite=True)
    assert len(reads) == 4 and again.by_status["succeeded"] == 4


async def test_s3_sources_are_checked_by_a_head_not_read(
    tmp_path: Path, emulator: InProcessEmulator, reads: list[str], moto_endpoint: str
) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="catalogue")
    s3.create_bucket(Bucket="edits")
    images = []
    for i in range(6):
        s3.put_object(Bucket="catalogue", Key=f"p/{i}.png", Body=image_bytes((30, 31), (i, 8, 9)))
        images.append(f"s3://catalogue/p/{i}.png")
    manifest = write_manifest(tmp_path / "m.csv", images)
    kw = {"s3_endpoint_url": moto_endpoint}
    first = await run(manifest, "s3://edits/out", emulator, **kw)
    assert first.by_status["succeeded"] == 6 and len(reads) == 6
    reads.clear()
    second = await run(manifest, "s3://edits/out", emulator, **kw)
    assert reads == [] and second.by_status.get("skipped") == 6
    s3.put_object(Bucket="catalogue", Key="p/2.png", Body=image_bytes((50, 50), (1, 1, 1)))
    reads.clear()
    third = await run(manifest, "s3://edits/out", emulator, **kw)
    assert reads == ["s3://catalogue/p/2.png"]
    assert third.by_status["succeeded"] == 1 and third.by_status["skipped"] == 5


def test_digests_are_found_by_uri_and_version_and_survive_a_merge() -> None:
    def sha(i: int) -> bytes:
        return hashlib.sha256(str(i).encode()).digest()

    entries = {source_digests.fingerprint(f"/x/{i}", "v1"): sha(i) for i in range(3000)}
    known = source_digests.SourceDigests(b"".join(entries), b"".join(entries.values()))
    assert all(known.get(f"/x/{i}", "v1") == sha(i).hex() for i in range(3000))
    assert known.get("/x/1", "v2") is None and known.get("/y/1", "v1") is None
    table = known.table()
    merged = source_digests.SourceDigests(
        b"".join(table.column("fingerprint").to_pylist()),
        b"".join(table.column("sha256").to_pylist()),
    )
    assert len(merged) == 3000
    assert all(merged.get(f"/x/{i}", "v1") == sha(i).hex() for i in range(0, 3000, 7))


async def test_a_re_edit_with_a_new_prompt_stops_asking_versions_that_find_nothing_done(
    tmp_path: Path, emulator: InProcessEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = []
    for i in range(40):
        path = tmp_path / "src" / f"q{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(image_bytes((20 + i, 20), (i, 3, 3)))
        images.append(str(path))
    out = str(tmp_path / "out")
    await run(write_manifest(tmp_path / "m.csv", images), out, emulator)
    asked: list[str] = []
    version = SourceLoader.version

    async def counted(self: SourceLoader, uri: str) -> str | None:
        asked.append(uri)
        return await version(self, uri)

    monkeypatch.setattr(SourceLoader, "version", counted)
    monkeypatch.setattr(source_digests, "TRIES_BEFORE_JUDGING", 4)
    restyled = tmp_path / "restyled.csv"
    restyled.write_text((tmp_path / "m.csv").read_text().replace("a starry sky", "brand style"))
    summary = await run(restyled, out, emulator)
    assert summary.by_status["succeeded"] == 40
    # Four rows asked, none was done: the other 36 read their sources without a stat first.
    assert len(asked) == 4
