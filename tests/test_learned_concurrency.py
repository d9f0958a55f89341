"""Adaptive concurrency starts where the last run against the same API and model ended: the
limit is kept in the output store (`index/concurrency/`), read defensively, written only by
an adaptive run whose limit was tested."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from pipeline.engine.adaptive import AimdLimit
from pipeline.engine.learned_limit import (
    MIN_ANSWERS,
    learned_key,
    read_learned,
    write_learned,
)
from pipeline.engine.summary import RunSummary, describe_concurrency
from pipeline.io.local_storage import LocalStorage
from tests.test_adaptive_concurrency import API, K, OverloadedAPI, burst, overloaded_run

ROWS = 200


def test_a_learned_limit_is_where_slow_start_begins() -> None:
    learned = AimdLimit(32, learned=10)
    assert (learned.limit, learned.start, learned.learned, learned.slow_start) == (
        10,
        10,
        True,
        True,
    )
    for ticket in burst(learned, 10):
        learned.succeeded(ticket)
    assert learned.limit == 20  # a round trip's answers double it, as from 4
    at_ceiling = AimdLimit(16, learned=40)
    assert at_ceiling.limit == 16 and at_ceiling.start == 16
    assert AimdLimit(16, learned=0).limit == 1
    fresh = AimdLimit(32)
    assert (fresh.limit, fresh.start, fresh.learned) == (4, 4, False)


def test_the_hint_is_read_defensively(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    storage = LocalStorage(str(tmp_path))
    key = learned_key(API, "p-image-edit")
    assert read_learned(storage, API, "p-image-edit") is None
    report = {"mode": "adaptive", "ceiling": 20, "final": 9, "answers": MIN_ANSWERS}
    assert write_learned(storage, API, "p-image-edit", report, "r1")
    assert read_learned(storage, API, "p-image-edit") == 9
    assert read_learned(storage, API, "other-model") is None
    assert read_learned(storage, "http://127.0.0.1:8/v1", "p-image-edit") is None
    # Too few answers, or fixed: nothing learned, the hint stays.
    assert not write_learned(storage, API, "p-image-edit", {**report, "answers": 3}, "r2")
    assert not write_learned(storage, API, "p-image-edit", {**report, "mode": "fixed"}, "r3")
    assert read_learned(storage, API, "p-image-edit") == 9
    caplog.set_level(logging.WARNING)
    for bad in [b"{", b'{"version": 1, "final": 0}', b'{"version": 1, "final": "9"}',
                b'{"version": 2, "final": 9}', b"[1]", b'{"version": 1, "final": 1.5}',
                b" " * 5000 + b'{"version": 1, "final": 9}']:  # fmt: skip
        storage.put_bytes(key, bad)
        assert read_learned(storage, API, "p-image-edit") is None, bad
    assert "ignoring the learned concurrency" in caplog.text
    # The key names neither the URL nor its credentials.
    secret = "http://user:hunter2@127.0.0.1:9/v1"
    assert "hunter2" not in learned_key(secret, "m")
    assert write_learned(storage, secret, "m", report, "r4")
    stored = storage.get_bytes(learned_key(secret, "m"))
    assert b"hunter2" not in stored and json.loads(stored)["final"] == 9


async def adaptive_run(
    tmp_path: Path, name: str, out: Path, *, fixed: bool = False
) -> tuple[OverloadedAPI, RunSummary]:
    """A run of ROWS rows on `out`, its jobs named by `name` (another name: new jobs)."""
    return await overloaded_run(tmp_path / name, fixed=fixed, rows=ROWS, output=out, tag=f"{name} ")


@pytest.mark.integration
async def test_a_second_run_starts_where_the_first_ended(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first_api, first = await adaptive_run(tmp_path, "first", out)
    c1 = first.concurrency
    assert c1 is not None and c1["start"] == 4 and not c1["learned"]
    assert c1["answers"] >= ROWS
    stored = json.loads((out / learned_key(API, "p-image-edit")).read_text())
    assert stored["final"] == c1["final"] and stored["run_id"] == first.run_id

    second_api, second = await adaptive_run(tmp_path, "second", out)
    c2 = second.concurrency
    assert c2 is not None
    assert (c2["start"], c2["learned"]) == (c1["final"], True)
    assert c2["curve"][0] == [0.0, c1["final"]]
    assert max(n for _, n in c2["curve"]) <= 2 * K and second_api.max_arriving <= 2 * K
    assert "learned by an earlier run" in describe_concurrency(c2)
    for api, summary in ((first_api, first), (second_api, second)):
        table = pd.read_parquet(summary.results_uri)
        assert len(table) == ROWS and summary.by_status["succeeded"] == ROWS
        assert set(api.charged.values()) == {1} and len(api.charged) == ROWS

    hint = out / learned_key(API, "p-image-edit")
    after_second = json.loads(hint.read_text())
    assert (after_second["final"], after_second["run_id"]) == (c2["final"], second.run_id)

    # A fixed run neither uses nor changes it; a resume of done rows (no answers) keeps it.
    _, fixed = await adaptive_run(tmp_path, "third", out, fixed=True)
    assert fixed.concurrency == {"mode": "fixed", "ceiling": 2 * K, "final": 2 * K, "curve": []}
    assert json.loads(hint.read_text()) == after_second
    resume_api, resume = await adaptive_run(tmp_path, "second", out)
    assert resume.by_status.get("skipped") == ROWS and resume_api.charged == {}
    assert json.loads(hint.read_text()) == after_second
