"""The edit-manifest flow on a real (temporary) Prefect server, over the emulator."""

from __future__ import annotations

import csv
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)

import flows.edit_manifest as flow_module
from flows.edit_manifest import PROGRESS_ARTIFACT_KEY, SUMMARY_ARTIFACT_KEY, edit_manifest
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine import run as run_module
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("prefect_harness"),
    # Prefect 3.8's run engine leaves one client socket to its own API server unclosed
    # (checked: the peer is the harness's API port, never the emulator's or ours).
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def manifest_of(tmp_path: Path, sources: dict[str, Path], rows: int) -> Path:
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "prompt", "seed", "output_format"])
        for i in range(rows):
            w.writerow([f"r{i}", sources["wide.jpg"], f"prompt {i}", i, "jpeg"])
    return path


async def test_flow_edits_in_chunk_tasks_and_publishes_a_summary(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    manifest = manifest_of(tmp_path, sources, 7)
    state = await edit_manifest(
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        api_base=emulator.base_url,
        chunk_size=3,
        concurrency=4,
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = await state.result()
    assert summary["by_status"]["succeeded"] == 7
    assert summary["cost_usd"] == pytest.approx(0.07)
    results = pd.read_parquet(summary["results_uri"])
    assert sorted(results["id"]) == sorted(f"r{i}" for i in range(7))
    assert list(results["row"]) == list(range(1, 8))

    flow_run_id = state.state_details.flow_run_id
    async with get_client() as client:
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[SUMMARY_ARTIFACT_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
        progress = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROGRESS_ARTIFACT_KEY])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        )
    chunk_runs = sorted(t.name for t in task_runs if t.name.startswith("chunk-"))
    # 7 rows in chunks of 3: three coarse tasks, not one task per row.
    assert chunk_runs == ["chunk-0", "chunk-1", "chunk-2"]
    assert len(artifacts) == 1 and artifacts[0].type == "table"
    table = artifacts[0].data
    assert "succeeded" in str(table) and "latency p95 (s)" in str(table)
    assert len(progress) == 1 and progress[0].type == "progress"
    assert progress[0].data == pytest.approx(100.0)


async def test_a_run_fatal_error_fails_the_flow_with_one_clear_message(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emulator.configure(api_key="the-right-key")
    monkeypatch.setenv("IMGEDIT_API_KEY", "a-wrong-key")
    state = await edit_manifest(
        manifest=str(manifest_of(tmp_path, sources, 20)),
        output=str(tmp_path / "out"),
        api_base=emulator.base_url,
        concurrency=2,
        return_state=True,
    )
    assert state.is_failed()
    message = str(await state.result(raise_on_failure=False))
    assert "401" in message and "run the same command again" in message
    assert "a-wrong-key" not in message and "the-right-key" not in message
    assert emulator.stats()["requests"] <= 2


async def test_a_global_limit_bounds_requests_in_flight_and_is_released(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    from flows.limits import setup_limit

    await setup_limit("imgedit-test-limit", 3)
    emulator.configure(latency=0.05)
    state = await edit_manifest(
        manifest=str(manifest_of(tmp_path, sources, 24)),
        output=str(tmp_path / "out"),
        api_base=emulator.base_url,
        concurrency=8,
        api_limit="imgedit-test-limit",
        return_state=True,
    )
    assert state.is_completed(), state.message
    stats = emulator.stats()
    assert stats["requests"] == 24
    # Never past the limit (3), though the run asked for 8; and the slots were used.
    assert 1 < stats["max_in_flight"] <= 3
    async with get_client() as client:
        limit = await client.read_global_concurrency_limit_by_name("imgedit-test-limit")
    assert limit.active_slots == 0


async def test_without_a_global_limit_the_run_keeps_its_local_limit(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    emulator.configure(latency=0.05)
    state = await edit_manifest(
        manifest=str(manifest_of(tmp_path, sources, 12)),
        output=str(tmp_path / "out"),
        api_base=emulator.base_url,
        concurrency=4,
        api_limit="no-such-limit",
        return_state=True,
    )
    assert state.is_completed(), state.message
    assert 2 < emulator.stats()["max_in_flight"] <= 4


async def test_a_resuming_flow_reads_its_index_beside_the_plan(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = manifest_of(tmp_path, sources, 5)
    args = {
        "manifest": str(manifest),
        "output": str(tmp_path / "out"),
        "api_base": emulator.base_url,
        "chunk_size": 2,
        "return_state": True,
    }
    # The first run through the library runner (no Prefect start to pay twice).
    first = await run_manifest(
        RunOptions(manifest=str(manifest), output=str(tmp_path / "out"), api_base=emulator.base_url)
    )
    assert first.by_status["succeeded"] == 5
    reading = threading.Event()
    read_output, plan_run = run_module.read_output, flow_module.plan_run

    def read(*a: Any) -> Any:
        reading.set()
        return read_output(*a)

    def plan(*a: Any) -> Any:
        assert reading.wait(30)  # beside the plan: after it, this would time out
        return plan_run(*a)

    monkeypatch.setattr(run_module, "read_output", read)
    monkeypatch.setattr(flow_module, "plan_run", plan)
    again = await edit_manifest(**args)
    assert again.is_completed(), again.message
    summary = await again.result()
    assert summary["by_status"]["skipped"] == 5 and summary["by_status"]["succeeded"] == 0
