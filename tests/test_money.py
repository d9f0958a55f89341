"""Money: every job paid once, and no answer, wait or store that can make a run spend blind.

The engine against scripted APIs (httpx.MockTransport) and real storage: lying costs, huge
waits and texts, short answers, claims between two runs at once, stores that ignore
conditional writes, full disks and read-only buckets.
"""

from __future__ import annotations

import asyncio
import base64
import csv
import errno
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pandas as pd
import pytest
from moto import mock_aws
from PIL import Image

from pipeline.emulator.process import EmulatorProcess
from pipeline.engine import claims, done_index, layout
from pipeline.engine.options import RunOptions
from pipeline.engine.run import RunParts, run_manifest
from pipeline.engine.summary import RunSummary
from pipeline.errors import ConfigError, StorageError
from pipeline.io.storage import LocalStorage, open_storage
from tests.conftest import image_bytes

API = "https://api.test/v1"
PRICE = 0.01


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scripted API is not on this machine: a run needs a key to start at all.
    monkeypatch.setenv("IMGEDIT_API_KEY", "scripted-" + "api-key")


def png(size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (9, 99, 199)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


PNG_B64 = base64.b64encode(png()).decode()


def answer(*, n: int = 1, cost: Any = PRICE, revised: str | None = None) -> dict[str, Any]:
    item: dict[str, Any] = {"b64_json": PNG_B64}
    if revised is not None:
        item["revised_prompt"] = revised
    return {
        "id": "req-1",
        "created": 1,
        "size": "32x32",
        "output_format": "png",
        "data": [dict(item) for _ in range(n)],
        "metadata": {"cost": cost, "cost_currency": "USD", "provider": "scripted"},
    }


class ScriptedAPI:
    """An edit API answering each request with `respond(number, request)`; counts requests."""

    def __init__(self, respond: Callable[[int, httpx.Request], httpx.Response]) -> None:
        self.respond = respond
        self.requests = 0
        self._lock = threading.Lock()

    def handler(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests += 1
            number = self.requests
        return self.respond(number, request)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)


def manifest(tmp_path: Path, rows: int, *, n: int | None = None, distinct: bool = True) -> Path:
    src = tmp_path / "src.png"
    src.write_bytes(image_bytes((40, 40), (1, 2, 3)))
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "prompt", "n"])
        for i in range(rows):
            w.writerow([f"r{i}", src, f"edit {i}" if distinct else "edit", n or ""])
    return path


async def run(
    m: Path, out: Path | str, api: ScriptedAPI | None = None, *, parts: RunParts | None = None,
    **kw: Any,
) -> RunSummary:  # fmt: skip
    opts = RunOptions(manifest=str(m), output=str(out), api_base=kw.pop("api_base", API), **kw)
    if parts is None:
        parts = RunParts(api_transport=api.transport if api else None)
    return await run_manifest(opts, parts)


def results(summary: RunSummary) -> pd.DataFrame:
    return pd.read_parquet(summary.results_uri).set_index("id")


# --- lying costs ---------------------------------------------------------------------------


@pytest.mark.parametrize("cost", [-5, "NaN", "Infinity", 1e308, "abc", 400.0, True])
async def test_an_untrusted_cost_cannot_disable_the_budget(tmp_path: Path, cost: Any) -> None:
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer(cost=cost)))
    concurrency = 2
    summary = await run(
        manifest(tmp_path, 20), tmp_path / "out", api, max_cost_usd=0.05, concurrency=concurrency
    )
    # Each answer is settled at its worst case (1 image x USD 0.01): the budget holds.
    assert api.requests <= 0.05 / PRICE + concurrency
    assert summary.by_status["succeeded"] == api.requests
    assert summary.skipped_by_reason.get("budget", 0) == 20 - api.requests
    table = results(summary)
    done = table[table["status"] == "succeeded"]
    assert done["cost"].isna().all() and done["cost_raw"].notna().all()
    assert done["warnings"].str.contains("not trusted").all()
    # The summary's cost is finite and explained: nothing reported, all assumed.
    assert summary.cost_usd == 0.0
    assert summary.distrusted_costs == api.requests
    assert summary.cost_assumed_usd == pytest.approx(api.requests * PRICE)


async def test_a_trusted_cost_is_summed(tmp_path: Path) -> None:
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer(cost="0.01")))
    summary = await run(manifest(tmp_path, 5), tmp_path / "out", api)
    assert summary.cost_usd == pytest.approx(0.05)
    assert summary.distrusted_costs == 0 and summary.cost_assumed_usd == 0


# --- untrusted waits and sizes -------------------------------------------------------------


async def test_a_huge_retry_after_does_not_hold_the_run_past_its_time_limits(
    tmp_path: Path,
) -> None:
    def respond(i: int, request: httpx.Request) -> httpx.Response:
        if i == 1:
            return httpx.Response(
                429,
                headers={"Retry-After": "999999"},
                json={"error": {"message": "slow down", "code": "RATE_LIMITED"}},
            )
        return httpx.Response(200, json=answer())

    api = ScriptedAPI(respond)
    # A guard, not a timing assert: without the caps this run sleeps for 11 days.
    summary = await asyncio.wait_for(
        run(manifest(tmp_path, 60), tmp_path / "out", api, concurrency=4, max_retry_seconds=3),
        timeout=120,
    )
    table = results(summary)
    assert len(table) == 60
    assert set(table["status"]) <= {"succeeded", "failed"}
    failed = table[table["status"] == "failed"]
    assert (failed["error_code"].str.lower() == "rate_limited").all()
    assert api.requests < 60 + 4  # nobody hammered the API while the gate was closed


async def test_a_20_mb_revised_prompt_makes_a_small_sidecar(tmp_path: Path) -> None:
    huge = "x" * (20 * 2**20)
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer(revised=huge)))
    summary = await run(manifest(tmp_path, 2), tmp_path / "out", api)
    table = results(summary)
    assert (table["status"] == "succeeded").all()
    assert table["revised_prompt"].str.len().max() <= 8192
    for sidecar in (tmp_path / "out" / "jobs").rglob("*.json"):
        assert sidecar.stat().st_size < 100_000
        assert "revised_prompt cut" in json.loads(sidecar.read_text())["warnings"][0]


async def test_a_short_answer_is_kept_but_not_marked_done(tmp_path: Path) -> None:
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer(n=1, cost=0.01)))
    m = manifest(tmp_path, 1, n=3)
    summary = await run(m, tmp_path / "out", api)
    row = results(summary).iloc[0]
    assert row["status"] == "failed" and row["error_code"] == "short_answer"
    assert len(row["output_uris"]) == 1  # what it got is kept
    assert not list((tmp_path / "out" / "jobs").rglob("*.json"))  # not done
    again = await run(m, tmp_path / "out", api)
    assert api.requests == 2  # the next run asks again
    assert results(again).iloc[0]["status"] == "failed"


# --- claims: one edit per job across runs ----------------------------------------------------


async def test_two_runs_at_once_pay_each_job_once(tmp_path: Path) -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.05)
        return httpx.Response(200, json=answer())

    count = {"n": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        count["n"] += 1
        return await slow(request)

    transport = httpx.MockTransport(handler)
    m = manifest(tmp_path, 40)
    first, second = await asyncio.gather(
        run(m, tmp_path / "out", parts=RunParts(api_transport=transport), concurrency=4),
        run(m, tmp_path / "out", parts=RunParts(api_transport=transport), concurrency=4),
    )
    doubles = first.possible_double_charges + second.possible_double_charges
    assert count["n"] <= 40 + doubles
    for summary in (first, second):
        table = results(summary)
        assert len(table) == 40 and table.index.is_unique
        assert set(table["status"]) <= {"succeeded", "skipped"}
    both = results(first)["status"].eq("succeeded") | results(second)["status"].eq("succeeded")
    assert both.all()
    assert first.claims_waited + second.claims_waited > 0
    assert not list((tmp_path / "out" / "claims").rglob("*.json"))  # all given back


async def test_a_dead_claim_is_taken_over_and_a_live_one_is_waited_for(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    loop = asyncio.get_running_loop()

    async def io(fn: Callable[..., Any], *args: Any) -> Any:
        return await loop.run_in_executor(None, fn, *args)

    job = "ab" * 16
    # A claim of another host whose lease ran out an hour ago: dead.
    stale = claims.LeaseBody(
        run_id="old", token="t", renewed_at="2026-01-01T00:00:00+00:00", lease_s=1.0, host="x"
    )
    storage.put_bytes(claims.claim_key(job), stale.encode())
    book = claims.Claims(storage, "new", io, lease_s=60, poll_s=0.05)
    got = await book.acquire(job, 0, lambda: False)
    assert got.state == "acquired" and got.taken_over
    # Now held and renewed by `book`: a second run waits until the sidecar appears.
    other = claims.Claims(storage, "other", io, lease_s=60, poll_s=0.05)
    waiter = asyncio.ensure_future(other.acquire(job, 0, lambda: False))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    storage.put_bytes(layout.sidecar_key(job), b"{}")
    got = await waiter
    assert got.state == "done" and got.waited_s > 0
    await book.release([job])
    assert not storage.exists(claims.claim_key(job))


async def r1_failed_then_claimed_by_a_killed_run(tmp_path: Path) -> tuple[Path, str, LocalStorage]:
    """A 3-row manifest whose r1 failed (nothing stored) and whose job a killed run claimed."""
    api = ScriptedAPI(
        lambda i, r: (
            httpx.Response(400, json={"error": {"code": "BAD_REQUEST", "message": "no"}})
            if b"edit 1" in r.content
            else httpx.Response(200, json=answer())
        )
    )
    m = manifest(tmp_path, 3)
    first = results(await run(m, tmp_path / "out", api))
    assert first.loc["r1", "status"] == "failed"
    job = str(first.loc["r1", "job_key"])
    dead = claims.LeaseBody(
        run_id="killed", token="t", renewed_at="2026-01-01T00:00:00+00:00", lease_s=1.0, host="x"
    )
    storage = LocalStorage(tmp_path / "out")
    storage.put_bytes(claims.claim_key(job), dead.encode())
    return m, job, storage


async def test_a_job_a_killed_run_had_claimed_counts_as_a_possible_double_charge(
    tmp_path: Path,
) -> None:
    # The first run fails row r1 (nothing stored); then a killed run is found to have held
    # r1's claim: it may have paid for r1 before it died, so editing r1 may pay twice.
    m, _, _ = await r1_failed_then_claimed_by_a_killed_run(tmp_path)
    fine = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer()))
    second = await run(m, tmp_path / "out", fine)
    table = results(second)
    assert fine.requests == 1 and table.loc["r1", "status"] == "succeeded"
    assert table.loc["r1", "possible_double_charges"] == 1
    assert second.possible_double_charges == 1
    assert table.loc[["r0", "r2"], "possible_double_charges"].eq(0).all()


async def test_a_killed_runs_claim_cleared_by_another_run_still_counts_where_the_job_is_edited(
    tmp_path: Path,
) -> None:
    # Two shards restarted at once after their host died: the first to start clears every
    # dead claim of the output; the job is edited by the other, which must count it too.
    m, job, storage = await r1_failed_then_claimed_by_a_killed_run(tmp_path)
    cleared_by_the_other_shard = done_index.load_done(storage)
    assert cleared_by_the_other_shard.orphaned == {job}
    assert not storage.exists(claims.claim_key(job))
    fine = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer()))
    second = await run(m, tmp_path / "out", fine)
    table = results(second)
    assert fine.requests == 1 and table.loc["r1", "status"] == "succeeded"
    assert table.loc["r1", "possible_double_charges"] == 1
    assert second.possible_double_charges == 1


async def test_an_orphan_record_is_kept_until_every_job_it_names_is_done(
    tmp_path: Path,
) -> None:
    m, job, storage = await r1_failed_then_claimed_by_a_killed_run(tmp_path)
    assert done_index.load_done(storage).orphaned == {job}
    # A record naming a job done and one not: kept while any of its jobs may still be edited.
    done_job = min(done_index.list_sidecars(storage))  # r0's or r2's
    storage.put_bytes(f"{done_index.ORPHANS_PREFIX}mixed.txt", f"{job}\n{done_job}".encode())
    (record,) = [k for k in storage.list_keys(done_index.ORPHANS_PREFIX) if "mixed" not in k]
    assert done_index.load_done(storage).orphaned == {job}  # read again: both still there
    assert len(list(storage.list_keys(done_index.ORPHANS_PREFIX))) == 2
    second = await run(m, tmp_path / "out", ScriptedAPI(ok))
    assert second.possible_double_charges == 1  # the record did its work first
    assert done_index.load_done(storage).orphaned == set()
    assert list(storage.list_keys(done_index.ORPHANS_PREFIX)) == []
    assert not storage.exists(record)


def ok(i: int, r: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=answer())


async def test_a_store_that_ignores_conditional_writes_is_refused_unless_exclusive(
    tmp_path: Path, aws_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.io.storage as storage_module

    real = storage_module.make_s3_client

    def ignoring(*args: Any, **kw: Any) -> Any:
        client = real(*args, **kw)

        def drop_conditions(params: dict[str, Any], **_: Any) -> None:
            params.pop("IfNoneMatch", None)
            params.pop("IfMatch", None)

        client.meta.events.register("provide-client-params.s3.PutObject", drop_conditions)
        return client

    monkeypatch.setattr(storage_module, "make_s3_client", ignoring)
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer()))
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="plain")
        m = manifest(tmp_path, 3)
        with pytest.raises(ConfigError, match="ignores conditional writes"):
            await run(m, "s3://plain/out", api)
        assert api.requests == 0
        summary = await run(m, "s3://plain/out", api, exclusive_output=True)
        assert summary.by_status["succeeded"] == 3
        keys = list(open_storage("s3://plain/out").list_keys(claims.CLAIMS_PREFIX))
        assert keys == []  # no claims were taken, and the probe cleaned up after itself


# --- storage that cannot take results --------------------------------------------------------


class FullDisk(LocalStorage):
    """A local output whose disk fills up after `room` image writes."""

    def __init__(self, root: Path, room: int, api: ScriptedAPI) -> None:
        super().__init__(root)
        self.room = room
        self.api = api
        self.requests_at_first_failure: int | None = None
        self._lock = threading.Lock()

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        if key.startswith(layout.IMAGES_PREFIX):
            with self._lock:
                self.room -= 1
                full = self.room < 0
                if full and self.requests_at_first_failure is None:
                    self.requests_at_first_failure = self.api.requests
            if full:
                err = OSError(errno.ENOSPC, "No space left on device")
                raise StorageError(f"cannot write {key}: {err.strerror}", fatal=True) from err
        return super().put_bytes(key, data, content_type)


async def test_a_full_disk_stops_spending_after_the_first_failure(tmp_path: Path) -> None:
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer()))
    concurrency = 4
    storage = FullDisk(tmp_path / "out", room=5, api=api)
    summary = await run(
        manifest(tmp_path, 60),
        tmp_path / "out",
        parts=RunParts(storage=storage, api_transport=api.transport),
        concurrency=concurrency,
    )
    assert summary.stop_kind == "stopped" and "No space left" in (summary.stopped_by or "")
    # Paid after the first failure: at most the requests already in flight.
    assert storage.requests_at_first_failure is not None
    assert api.requests <= storage.requests_at_first_failure + concurrency
    table = results(summary)
    assert len(table) == 60
    assert table["status"].eq("succeeded").sum() == 5
    assert summary.storage_failures >= 1
    assert summary.skipped_by_reason.get("stopped", 0) == 60 - api.requests


async def test_a_read_only_bucket_stops_the_run_with_one_message(
    tmp_path: Path, aws_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.io.storage as storage_module

    real = storage_module.make_s3_client

    def read_only(*args: Any, **kw: Any) -> Any:
        client = real(*args, **kw)

        def deny(params: dict[str, Any], **_: Any) -> None:
            if params["Key"].split("/", 1)[-1].startswith(layout.IMAGES_PREFIX):
                first_failure.setdefault("requests", api.requests)
                raise client.exceptions.ClientError(
                    {"Error": {"Code": "AccessDenied", "Message": "read-only bucket"}},
                    "PutObject",
                )

        client.meta.events.register("provide-client-params.s3.PutObject", deny)
        return client

    monkeypatch.setattr(storage_module, "make_s3_client", read_only)
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer()))
    first_failure: dict[str, int] = {}
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="read-only")
        summary = await run(manifest(tmp_path, 40), "s3://read-only/out", api, concurrency=4)
    assert summary.stop_kind == "stopped" and "access denied" in (summary.stopped_by or "")
    # Paid after the first failure: at most the requests already in flight.
    assert api.requests <= first_failure["requests"] + 4
    assert summary.by_status["succeeded"] == 0


# --- killed runs: dead markers and claims are cleared by the next run -----------------------


async def test_a_killed_runs_marker_and_claims_are_cleared_by_the_next_run(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    out = tmp_path / "out"
    storage = LocalStorage(out)
    m = manifest(tmp_path, 6)
    # What SIGKILL leaves: jobs 0-2 committed (sidecars) but not indexed, their claims and the
    # chunk's marker, held by a process of another host that stopped renewing long ago.
    first = await run(m, out, api_base=emulator.base_url)
    done = sorted(results(first)["job_key"])
    for key in storage.list_keys("index/"):
        storage.delete(key)
    for job in done[3:]:
        storage.delete(layout.sidecar_key(job))
    dead = claims.LeaseBody(
        run_id="killed", token="t", renewed_at="2026-01-01T00:00:00+00:00", lease_s=1.0, host="x"
    ).encode()
    for job in done:
        storage.put_bytes(claims.claim_key(job), dead)
    storage.put_bytes(done_index.open_marker_key("killed", 0), dead)
    storage.put_bytes(done_index.ROOT_KEY, b"{}")
    emulator.reset()

    again = await run(m, out, api_base=emulator.base_url)
    assert emulator.stats()["charged_images"] == 3  # only the uncommitted jobs
    # What the output's read (beside the plan) found is in the run's stored log.
    run_log = storage.get_bytes(layout.run_log_key(again.run_id)).decode()
    assert "cleared 6 dead claims and 1 dead open markers" in run_log
    assert again.skipped_by_reason.get("done") == 3
    assert not list(storage.list_keys("index/open/")) and not list(storage.list_keys("claims/"))
    found = done_index.load_done(storage)
    assert not found.check_unindexed and found.open_chunks == 0 and found.keys == set(done)
    emulator.reset()
    third = await run(m, out, api_base=emulator.base_url)
    assert third.skipped_by_reason.get("done") == 6 and emulator.stats()["requests"] == 0


# --- results parts: written as rows finish, never lost ----------------------------------------


class SlowParts(LocalStorage):
    """A local output whose results-part writes are slow, so flushes overlap the chunk's end."""

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        if "/parts/" in key:
            import time

            time.sleep(0.05)
        return super().put_bytes(key, data, content_type)


async def test_every_row_reaches_the_results_table_however_flushes_fall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pipeline.engine.chunk

    monkeypatch.setattr(pipeline.engine.chunk, "FLUSH_INTERVAL_S", 0.01)
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer()))
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        summary = await run(
            manifest(tmp_path, 120),
            out,
            parts=RunParts(storage=SlowParts(out), api_transport=api.transport),
            concurrency=8,
        )
        table = results(summary)
        assert len(table) == 120 and table.index.is_unique
        assert len(list((out / "runs").glob("*/parts/*.parquet"))) > 1
