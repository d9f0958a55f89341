"""A resume of rows already done: the done set held compactly (`done_keys`), every row's
result written once, and the run's table merged from the parts it kept in memory."""

from __future__ import annotations

import csv
import hashlib
import random
import threading
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.engine import chunk as chunk_module
from pipeline.engine import done_index, done_keys, layout, progress, results
from pipeline.engine import run as run_module
from pipeline.engine.done_keys import DoneKeys
from pipeline.engine.jobkey import job_key
from pipeline.engine.options import RunOptions
from pipeline.engine.run import RunParts, run_manifest
from pipeline.engine.runner import done_row, done_rows
from pipeline.engine.summary import SUMMARY_COLUMNS, merge_results, summarize
from pipeline.errors import ManifestError
from pipeline.io.s3_storage import S3Storage
from pipeline.io.storage import LocalStorage, Storage
from pipeline.manifest.open import open_manifest
from pipeline.manifest.types import ManifestRow
from pipeline.models.registry import DEFAULT_PROFILE

ROWS = 40


def hex_keys(rng: random.Random, n: int) -> list[str]:
    return [f"{rng.getrandbits(128):032x}" for _ in range(n)]


def test_done_keys_answer_as_a_set_of_the_same_keys_would() -> None:
    rng = random.Random(7)
    keys = hex_keys(rng, 3000)
    # Neighbours sharing their high 64 bits, and keys of other forms (shorter, longer).
    keys += [keys[0][:16] + f"{rng.getrandbits(64):016x}" for _ in range(5)]
    keys += ["abcdef12", "a" * 64, f"{0:032x}", "f" * 32]
    segments = [
        pa.array(keys[i : i + 500] + keys[i : i + 3] + [None]) for i in range(0, len(keys), 500)
    ]
    done = DoneKeys.from_arrays(segments)
    expected = set(keys)
    assert len(done) == len(expected) and done == expected and set(done) == expected
    assert all(k in done for k in keys)
    assert not any(k in done for k in hex_keys(random.Random(8), 3000))
    near = keys[10]
    for other in (near.upper(), near + "\n", "0_" + near[2:], near[:-1], 42):
        assert other not in done
    assert done.to_arrow().to_pylist() == sorted(expected)
    # A chunk's lookups at once answer what each one alone does.
    asked = keys[::7] + hex_keys(random.Random(9), 500) + [near.upper(), near + "\n", "abcdef12"]
    random.Random(10).shuffle(asked)
    assert done.which(asked) == [k in done for k in asked]
    assert sum(done.which(asked)) == len(keys[::7]) + 1 and done.which([]) == []
    assert DoneKeys(["abcdef12"]).which(["abcdef12", keys[0]]) == [True, False]
    many = ["abcdef12", *keys[:20]]  # enough to be searched at once, with no sorted part
    assert DoneKeys(["abcdef12"]).which(many) == [True] + [False] * 20
    new = hex_keys(rng, 1)[0]
    done.add(new)
    done.add(keys[1])  # already there: counted once
    assert new in done and len(done) == len(expected) + 1
    assert DoneKeys() == set() and not DoneKeys() and DoneKeys(["ab" * 16]) != DoneKeys()


def test_keys_added_during_a_run_join_the_sorted_part_and_answer_as_a_set_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(done_keys, "FOLD_AT", 50)
    rng = random.Random(11)
    indexed = hex_keys(rng, 400)
    done = DoneKeys.from_arrays([pa.array(indexed)])
    # Added keys: new ones, some sharing an indexed key's high 64 bits (below and above it),
    # keys already there, and keys of another form (never folded).
    added = hex_keys(rng, 230)
    added += [k[:16] + lo for k in indexed[:6] for lo in ("0" * 16, "f" * 16)]
    added += [*indexed[::50], "abcdef12", "Z" * 32]
    rng.shuffle(added)
    expected = set(indexed)
    for key in added:
        done.add(key)
        expected.add(key)
        # Folded every 50 usual keys: never more than that wait as strings.
        assert len(done._new) < 50
    assert len(done) == len(expected) and set(done) == expected and done == expected
    assert done.to_arrow().to_pylist() == sorted(expected)
    hi = list(done._hi)
    assert hi == sorted(hi) and len(hi) >= len(expected) - 50 - 2
    asked = added + hex_keys(random.Random(12), 300) + [indexed[5][:16] + "1" * 16]
    assert done.which(asked) == [k in expected for k in asked]
    assert [k in done for k in asked] == [k in expected for k in asked]


def test_a_compacted_index_keeps_every_key_sorted_in_one_segment(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    rng = random.Random(3)
    jobs: set[str] = set()
    for chunk in range(done_index.COMPACT_AT + 1):
        keys = hex_keys(rng, 20) + (["0123abcd"] if chunk == 5 else [])
        jobs.update(keys)
        done_index.write_chunk_segment(storage, "r1", chunk, 0, keys)
    storage.put_bytes(done_index.ROOT_KEY, b'{"version": 1}')
    assert done_index.load_done(storage).keys == jobs
    (merged,) = storage.list_keys(done_index.SEGMENTS_PREFIX)
    assert done_index.read_segment(storage.get_bytes(merged)) == sorted(jobs)
    assert done_index.load_done(storage).keys == jobs


class Listener:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def on_plan(self, run_id: str, total_rows: int, estimated_cost_usd: float) -> None:
        pass

    def on_row(self, run_id: str, result: results.ResultRow) -> None:
        self.rows.append(result.row)

    def on_concurrency(self, run_id: str, limit: int, ceiling: int, mode: str) -> None:
        pass


class CountingFolder(LocalStorage):
    """A local folder counting the results parts read back."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.part_reads = 0

    def get_bytes(self, key: str) -> bytes:
        if "/parts/" in key:
            self.part_reads += 1
        return super().get_bytes(key)


class CountingRemote:
    """A store that is not a local folder (a part read back is a GET, as on S3), kept in
    one, counting the results parts read back."""

    def __init__(self, root: Path) -> None:
        self.folder = CountingFolder(root)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.folder, name)

    @property
    def part_reads(self) -> int:
        return self.folder.part_reads


def write_manifest(path: Path, sources: dict[str, Path]) -> Path:
    names = sorted(sources)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "prompt", "seed", "output_format"])
        for i in range(ROWS):
            prompt = "" if i == 7 else f"edit {i % 30}"  # row 8 invalid; rows 31.. repeat jobs
            writer.writerow([f"r{i}", sources[names[i % len(names)]], prompt, i % 30, "jpeg"])
    return path


def index_every_job(manifest: Path, storage: Storage | CountingRemote) -> dict[int, str]:
    """The done index of every valid row's job, as the runner computes its key."""
    keys = {}
    with open_manifest(str(manifest)) as opened:
        for row in opened.rows():
            if isinstance(row, ManifestRow):
                shas = [hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in row.images]
                keys[row.row] = job_key(
                    model=DEFAULT_PROFILE.model,
                    image_sha256=shas,
                    mask_sha256=None,
                    prompt=row.prompt,
                    seed=row.seed,
                    params=row.params,
                )
    done_index.write_segment(storage, done_index.segment_key("populate"), keys.values())
    storage.put_bytes(done_index.ROOT_KEY, b'{"version": 1}')
    return keys


@pytest.mark.parametrize(
    ("store", "kept_budget", "part_reads"),
    [
        (CountingRemote, None, 0),
        (CountingRemote, 0, 7),
        # A local folder's parts are read back: as cheap as memory, which they would hold.
        (CountingFolder, None, 7),
    ],
    ids=["parts-kept", "parts-read-back", "local-folder"],
)
async def test_a_resumed_run_has_every_row_once_with_its_status(
    tmp_path: Path,
    sources: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    store: type[CountingFolder | CountingRemote],
    kept_budget: int | None,
    part_reads: int,
) -> None:
    if kept_budget is not None:
        monkeypatch.setattr(results, "KEEP_PARTS_BYTES", kept_budget)
    manifest = write_manifest(tmp_path / "m.csv", sources)
    storage = store(tmp_path / "out")
    keys = index_every_job(manifest, storage)
    opts = RunOptions(
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        api_base="http://127.0.0.1:9/v1",  # never called: every valid row is done
        chunk_size=6,
    )
    fast: list[int] = []

    def counted(ctx: Any, row: Any) -> Any:
        found = done_row(ctx, row)
        if found is not None:
            fast.append(found.row)
        return found

    def counted_at_once(ctx: Any, rows: Any) -> Any:
        found = done_rows(ctx, rows)
        # What a chunk finds at its start is what each row alone finds (but for the times).
        alone = [done_row(ctx, row) for row in rows]
        untimed = [f and f._replace(started_at=0, finished_at=0, elapsed_s=0) for f in found]
        assert untimed == [
            a and a._replace(started_at=0, finished_at=0, elapsed_s=0) for a in alone
        ]
        fast.extend(f.row for f in found if f is not None)
        return found

    monkeypatch.setattr(chunk_module, "done_row", counted)
    monkeypatch.setattr(chunk_module, "done_rows", counted_at_once)
    heard = Listener()
    unsubscribe = progress.subscribe(heard)
    try:
        summary = await run_manifest(opts, RunParts(storage=cast(Storage, storage)))
    finally:
        unsubscribe()
    table: Any = pq.read_table(summary.results_uri).to_pandas()
    assert sorted(table["row"]) == list(range(1, ROWS + 1))
    by_row = table.set_index("row")
    assert by_row.loc[8, "status"] == "invalid"
    done = by_row.drop(index=8)
    assert (done["status"] == "skipped").all() and (done["reason"] == "done").all()
    assert done["job_key"].to_dict() == keys
    assert summary.by_status == {"succeeded": 0, "failed": 0, "invalid": 1, "skipped": ROWS - 1}
    assert summary.skipped_by_reason == {"done": ROWS - 1}
    # Done rows whose sources were cached took the path without a ResultRow; the others (the
    # first chunks', while their sources load; the invalid row) the full one. Listeners heard
    # every row once.
    assert len(fast) >= ROWS // 2 and 8 not in fast and len(set(fast)) == len(fast)
    assert sorted(heard.rows) == list(range(1, ROWS + 1))
    # Seven chunks' parts: merged from memory, unless none could be kept or need be.
    assert storage.part_reads == part_reads


def test_done_rows_make_the_table_their_result_rows_make() -> None:
    now = results.utcnow()
    done = [
        results.DoneRow(
            row=r,
            id=f"r{r}" if r % 2 else None,
            job_key=f"{r:032x}",
            prompt=f"edit {r}",
            seed=r if r % 3 else None,
            source_uris=["/a.png", "s3://b/c.jpg"][: 1 + r % 2],
            sidecar_uri=f"s3://out/jobs/{r:032x}.json",
            n_requested=1 + r % 2,
            requested_size="1024x1024" if r % 2 else None,
            started_at=now,
            finished_at=now,
            elapsed_s=0.001 * r,
        )
        for r in (5, 1, 4, 2)
    ]
    assert results.done_rows_table(done).equals(results.rows_to_table([d.result() for d in done]))
    assert results.done_rows_table([]).equals(results.rows_to_table([]))
    failed = results.ResultRow(row=3, id="r3", status="failed", error_code="x")
    mixed = results.part_table([failed], done)
    assert mixed.equals(results.rows_to_table([failed, *(d.result() for d in done)]))


def test_merged_results_and_their_summary_are_those_of_the_parts(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    now = results.utcnow()
    parts: dict[str, bytes] = {}
    every: list[results.ResultRow] = []
    for part in range(5):
        rows = [
            results.ResultRow(
                row=part * 3 + i + 1,
                id=f"r{part}-{i}",
                status=("succeeded", "failed", "skipped")[i],
                reason="done" if i == 2 else None,
                cost=0.01 * part if i == 0 else None,
                currency="USD" if i == 0 else None,
                n_outputs=1 if i == 0 else None,
                latency_s=1.5 + part if i == 0 else None,
                error_code="server_error" if i == 1 else None,
                started_at=now,
            )
            for i in range(3)
        ]
        # Parts of only done rows leave most summary columns all null.
        table = results.rows_to_table(rows if part % 2 else rows[2:])
        every.extend(rows if part % 2 else rows[2:])
        parts[f"runs/r1/parts/{part}.parquet"] = results.table_to_parquet_bytes(table)
    keys = sorted(parts)
    storage.put_bytes(keys[0], parts.pop(keys[0]))  # one read back, the others from memory
    uri, totals = merge_results(storage, keys, "r1", parts)
    assert parts == {}  # each dropped once merged
    merged = pq.read_table(uri)
    assert merged.equals(results.rows_to_table(every))
    # Totalled part by part, the summary is the whole table's.
    assert totals.result() == summarize(merged.select(SUMMARY_COLUMNS))
    assert totals.result()["latency_p50_s"] == 3.5
    assert totals.result()["skipped_by_reason"] == {"done": 5}


async def test_a_resume_merges_many_index_segments_beside_its_rows(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sources)
    storage = LocalStorage(tmp_path / "out")
    keys = index_every_job(manifest, storage)
    rng = random.Random(5)
    others = set()
    for chunk in range(done_index.COMPACT_AT + 1):  # more segments than a reader keeps
        more = hex_keys(rng, 3)
        others.update(more)
        done_index.write_chunk_segment(storage, "old", chunk, 0, more)
    opts = RunOptions(
        manifest=str(manifest), output=str(tmp_path / "out"), api_base="http://127.0.0.1:9/v1"
    )
    summary = await run_manifest(opts, RunParts(storage=storage))
    assert summary.by_status["skipped"] == ROWS - 1 and summary.by_status["invalid"] == 1
    (merged,) = storage.list_keys(done_index.SEGMENTS_PREFIX)
    assert "merged" in merged
    jobs = set(keys.values()) | others
    assert done_index.read_segment(storage.get_bytes(merged)) == sorted(jobs)
    assert done_index.load_done(storage).keys == jobs


def test_sidecar_uris_are_those_the_storage_names(tmp_path: Path) -> None:
    keys = [*hex_keys(random.Random(4), 50), "abcdef12"]
    for storage in (LocalStorage(tmp_path / "out"), S3Storage("bucket", "a/b", client=None)):
        expected = [storage.uri_for(layout.sidecar_key(k)) for k in keys]
        assert layout.sidecar_uris(storage.uri_for, keys) == expected
    odd = layout.sidecar_uris(lambda key: f"x://{key}?v=1", keys[:3])
    assert odd == [f"x://{layout.sidecar_key(k)}?v=1" for k in keys[:3]]
    with pytest.raises(ValueError, match="not a job key"):
        layout.sidecar_uris(LocalStorage(tmp_path / "out").uri_for, ["../x"])


async def test_a_resume_reads_its_index_beside_the_plan(
    tmp_path: Path, sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", sources)
    storage = LocalStorage(tmp_path / "out")
    keys = index_every_job(manifest, storage)
    reading = threading.Event()
    read_output, plan_run = run_module.read_output, run_module.plan_run

    def read(*args: Any) -> Any:
        reading.set()
        return read_output(*args)

    def plan(*args: Any) -> Any:
        # Not after the plan: beside it (the test would wait out the timeout and fail).
        assert reading.wait(30)
        return plan_run(*args)

    monkeypatch.setattr(run_module, "read_output", read)
    monkeypatch.setattr(run_module, "plan_run", plan)
    opts = RunOptions(
        manifest=str(manifest), output=str(tmp_path / "out"), api_base="http://127.0.0.1:9/v1"
    )
    summary = await run_manifest(opts, RunParts(storage=storage))
    assert summary.by_status["skipped"] == ROWS - 1
    table = pq.read_table(summary.results_uri).to_pandas().set_index("row")
    assert table.drop(index=8)["job_key"].to_dict() == keys


async def test_a_run_that_cannot_plan_leaves_a_new_output_untouched(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image\nr1,/nowhere.png\n")  # no prompt column: nothing can run
    out = tmp_path / "out"
    opts = RunOptions(manifest=str(manifest), output=str(out), api_base="http://127.0.0.1:9/v1")
    with pytest.raises(ManifestError):
        await run_manifest(opts, RunParts(storage=LocalStorage(out)))
    assert not out.exists() or not any(out.rglob("*"))
