"""The done index: a resume reads a few segments instead of listing every sidecar, and stays
safe when a chunk was killed between its commits and its segment."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest
from moto import mock_aws
from typer.testing import CliRunner

from flows.cli import app
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine import claims, done_index, layout
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.engine.summary import RunSummary
from pipeline.errors import StorageError, StorageNotFound
from pipeline.io.storage import LocalStorage, S3Storage, open_storage

pytestmark = pytest.mark.integration

ROWS = 7


def write_manifest(path: Path, sources: dict[str, Path], rows: int = ROWS) -> Path:
    names = sorted(sources)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "prompt", "seed", "output_format"])
        for i in range(rows):
            writer.writerow([f"r{i}", sources[names[i % len(names)]], f"edit {i}", i, "jpeg"])
    return path


async def run(
    manifest: Path, output: Path, emu: EmulatorProcess, **kw: Any
) -> tuple[RunSummary, pd.DataFrame]:
    opts = RunOptions(
        manifest=str(manifest),
        output=str(output),
        api_base=emu.base_url,
        concurrency=3,
        chunk_size=3,
        **kw,
    )
    summary = await run_manifest(opts)
    return summary, pd.read_parquet(summary.results_uri)


async def first_run(
    tmp_path: Path, sources: dict[str, Path], emu: EmulatorProcess
) -> tuple[Path, Path, pd.DataFrame]:
    """A manifest, its output and the results of a first run that edited every row."""
    manifest = write_manifest(tmp_path / "m.csv", sources)
    out = tmp_path / "out"
    _, results = await run(manifest, out, emu)
    assert (results["status"] == "succeeded").all()
    return manifest, out, results


async def rerun_sends_nothing(manifest: Path, out: Path, emu: EmulatorProcess) -> None:
    """Run again: every row is found done and no request reaches the API."""
    requests = emu.stats()["requests"]
    _, results = await run(manifest, out, emu)
    assert (results["status"] == "skipped").all() and (results["reason"] == "done").all()
    assert emu.stats()["requests"] == requests, "a job with a sidecar was edited again"


def sidecar_jobs(output: Path) -> set[str]:
    return {p.stem for p in (output / "jobs").rglob("*.json")}


def keys_under(output: Path, prefix: str) -> list[str]:
    return sorted(LocalStorage(output).list_keys(prefix))


def forbid_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(storage: object) -> set[str]:
        raise AssertionError("the sidecars were listed although the index covers them")

    monkeypatch.setattr(done_index, "list_sidecars", refuse)


def count_listings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real: Callable[[Any], set[str]] = done_index.list_sidecars

    def counted(storage: Any) -> set[str]:
        found = real(storage)
        calls.append(len(found))
        return found

    monkeypatch.setattr(done_index, "list_sidecars", counted)
    return calls


async def test_a_rerun_reads_the_index_and_lists_no_sidecar(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest, out, first = await first_run(tmp_path, sources, emulator)
    assert keys_under(out, done_index.OPEN_PREFIX) == []
    assert done_index.ROOT_KEY in keys_under(out, done_index.INDEX_PREFIX)
    segments = keys_under(out, done_index.SEGMENTS_PREFIX)
    assert len(segments) == 3  # one per chunk of 3 rows
    indexed = done_index.load_done(LocalStorage(out))
    assert indexed.keys == sidecar_jobs(out) == set(first["job_key"])
    assert not indexed.check_unindexed

    forbid_listing(monkeypatch)
    await rerun_sends_nothing(manifest, out, emulator)
    # A run that committed nothing adds no segment.
    assert keys_under(out, done_index.SEGMENTS_PREFIX) == segments


async def test_an_output_without_an_index_is_listed_once_then_indexed(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest, out, first = await first_run(tmp_path, sources, emulator)
    storage = LocalStorage(out)
    # As an output written before the index existed: sidecars only.
    for key in keys_under(out, done_index.INDEX_PREFIX):
        storage.delete(key)

    listings = count_listings(monkeypatch)
    await rerun_sends_nothing(manifest, out, emulator)
    assert listings == [ROWS]

    again = done_index.load_done(storage)
    assert listings == [ROWS], "the listing's segment and root make a second listing needless"
    assert again.keys == set(first["job_key"])
    assert again.source == "index"


async def test_jobs_a_killed_chunk_committed_are_found_by_their_sidecars(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest, out, first = await first_run(tmp_path, sources, emulator)
    storage = LocalStorage(out)
    # A chunk killed after its sidecars, before its segment: its marker stays, no segment.
    lost = sorted(keys_under(out, done_index.SEGMENTS_PREFIX))[:2]
    lost_jobs = set().union(*(done_index.read_segment(storage.get_bytes(k)) for k in lost))
    for key in lost:
        storage.delete(key)
    done_index.mark_open(storage, "killed-run", 4)
    assert done_index.load_done(storage).keys == set(first["job_key"]) - lost_jobs

    forbid_listing(monkeypatch)
    await rerun_sends_nothing(manifest, out, emulator)

    # What the checks found is indexed now; the killed run's marker is not ours to remove.
    loaded = done_index.load_done(storage)
    assert loaded.keys == set(first["job_key"])
    assert loaded.check_unindexed and loaded.open_chunks == 1
    assert keys_under(out, done_index.OPEN_PREFIX) == [done_index.open_marker_key("killed-run", 4)]

    monkeypatch.undo()
    result = CliRunner().invoke(app, ["reindex", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{ROWS} jobs done" in result.output
    assert keys_under(out, done_index.OPEN_PREFIX) == []
    rebuilt = done_index.load_done(storage)
    assert rebuilt.keys == sidecar_jobs(out) and not rebuilt.check_unindexed
    assert len(keys_under(out, done_index.SEGMENTS_PREFIX)) == 1


class SegmentsFail(LocalStorage):
    """Local storage that cannot write index segments (e.g. a prefix denied by policy)."""

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        if key.startswith(done_index.SEGMENTS_PREFIX):
            raise StorageError(f"cannot write {key}: access denied")
        return super().put_bytes(key, data, content_type)


async def test_a_chunk_that_cannot_index_its_jobs_leaves_its_marker(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sources)
    out = tmp_path / "out"
    monkeypatch.setattr("pipeline.engine.run.open_storage", lambda *a, **k: SegmentsFail(out))
    _, first = await run(manifest, out, emulator)
    assert (first["status"] == "succeeded").all()
    assert len(keys_under(out, done_index.OPEN_PREFIX)) == 3

    monkeypatch.undo()
    await rerun_sends_nothing(manifest, out, emulator)


def indexed_segments(storage: LocalStorage, segments: int) -> set[str]:
    """A rooted index of `segments` segments of two jobs each; returns the jobs."""
    storage.put_bytes(done_index.ROOT_KEY, b"{}")
    jobs = [f"{i:064x}" for i in range(2 * segments)]
    for i in range(segments):
        key = done_index.chunk_segment_key("r1", i)
        done_index.write_segment(storage, key, jobs[2 * i : 2 * i + 2])
    return set(jobs)


def test_many_segments_are_merged_into_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(done_index, "COMPACT_AT", 3)
    storage = LocalStorage(tmp_path)
    jobs = indexed_segments(storage, 5)
    assert done_index.load_done(storage).keys == jobs
    (merged,) = keys_under(tmp_path, done_index.SEGMENTS_PREFIX)
    assert set(done_index.read_segment(storage.get_bytes(merged))) == jobs
    assert done_index.load_done(storage).keys == jobs


class MergedWhileRead(LocalStorage):
    """Another run merges the segments between our listing and our first read."""

    merged = False

    def get_bytes(self, key: str) -> bytes:
        if key.startswith(done_index.SEGMENTS_PREFIX) and not self.merged:
            self.merged = True
            segments = list(self.list_keys(done_index.SEGMENTS_PREFIX))
            read = super().get_bytes
            jobs = set().union(*(done_index.read_segment(read(k)) for k in segments))
            done_index.write_segment(self, done_index.segment_key("merged-by-other"), jobs)
            for k in segments:
                self.delete(k)
            raise StorageNotFound(f"not found: {key}")
        return super().get_bytes(key)


def test_a_segment_merged_away_while_read_is_read_again(tmp_path: Path) -> None:
    storage = MergedWhileRead(tmp_path)
    jobs = indexed_segments(storage, 3)
    assert done_index.load_done(storage).keys == jobs
    assert storage.merged


def test_the_index_on_s3_is_built_from_a_listing_once(
    aws_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = {f"{i:064x}" for i in range(30)}
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="out")
        storage = open_storage("s3://out/runs-a")
        assert isinstance(storage, S3Storage)
        for job in jobs:
            storage.put_bytes(layout.sidecar_key(job), b"{}")
        listings = count_listings(monkeypatch)
        first = done_index.load_done(storage)
        assert first.keys == jobs and first.source == "listing"
        second = done_index.load_done(storage)
        assert second.keys == jobs and second.source == "index"
        assert listings == [len(jobs)]


def test_live_leased_markers_cost_nothing_and_a_legacy_marker_still_means_checking(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path)
    storage.put_bytes(done_index.ROOT_KEY, b"{}")
    shard, sibling = layout.shard_run_id("R1", 1), layout.shard_run_id("R1", 2)
    live = claims.lease_body(sibling, "t", 60.0, 0)
    done_index.mark_open(storage, sibling, 0, live)
    # A live chunk of any run (a sibling shard or another run) needs no sidecar checks: its
    # jobs' claims make a run wait for them.
    found = done_index.load_done(storage)
    assert not found.check_unindexed and found.open_chunks == 1
    # Without claims (a store without conditional writes) any open chunk means checking.
    assert done_index.load_done(storage, claims=False).check_unindexed
    # A marker without a lease (an older version's) cannot be judged: check, as before.
    done_index.mark_open(storage, shard, 3)
    again = done_index.load_done(storage)
    assert again.check_unindexed and again.open_chunks == 2
