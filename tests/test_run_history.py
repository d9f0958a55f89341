"""Run history: `list_runs`, `run_detail`, `row_status`, the duckdb query and the commands.

The output is made by the engine itself against the emulator: a first run where some edits
fail (500s, one attempt each) and two rows are invalid, a resume (the edits that succeeded are
skipped as done, the others fail again), and a `--retry-failed-of` run of the first that
redoes all failed rows but one.
"""

from __future__ import annotations

import asyncio
import csv
import json
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from flows.history_cli import register
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine import layout
from pipeline.engine.options import RunOptions
from pipeline.engine.results import ResultRow, rows_to_table, table_to_parquet_bytes
from pipeline.engine.run import run_manifest
from pipeline.engine.summary import RunSummary
from pipeline.io.storage import LocalStorage
from pipeline.uses import run_history as rh

# Tests that start servers (the emulator, uvicorn, moto) are marked `integration`.
integration = pytest.mark.integration

FIRST, RESUME, RETRY = "zz-first", "mm-resume", "aa-retry"  # names against time order
VALID = 6  # r1..r6; r7 has a missing source, r8 bytes that are no image, r9 repeats r1


@dataclass
class History:
    manifest: Path
    output: Path
    summaries: dict[str, RunSummary]
    first_failed: set[str]  # ids of rows that failed in the first run
    first_succeeded: set[str]
    kept_failed: str  # the failed row the retry run left out


def write_manifest(folder: Path, extra_rows: int = 0) -> Path:
    for i in range(VALID):
        Image.new("RGB", (64, 48), (40 * i, 100, 200 - 30 * i)).save(folder / f"s{i}.png")
    (folder / "bad.png").write_bytes(b"not an image at all")
    rows = [["id", "image", "prompt", "seed"]]
    rows += [[f"r{i + 1}", str(folder / f"s{i}.png"), f"sky {i}", str(i)] for i in range(VALID)]
    rows.append(["r7", str(folder / "missing.png"), "sky 7", "7"])
    rows.append(["r8", str(folder / "bad.png"), "sky 8", "8"])
    rows.append(["r9", str(folder / "s0.png"), "sky 0", "0"])  # the same edit as r1
    rows += [[f"x{i}", str(folder / "s1.png"), f"later {i}", str(i)] for i in range(extra_rows)]
    path = folder / ("m.csv" if not extra_rows else f"m-plus-{extra_rows}.csv")
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def run(emu: EmulatorProcess, manifest: Path, output: Path | str, **kw: Any) -> RunSummary:
    opts = RunOptions(
        manifest=str(manifest),
        output=str(output),
        api_base=emu.base_url,
        concurrency=4,
        max_attempts=1,
        **kw,
    )
    return asyncio.run(run_manifest(opts))


def ids_with(summary: RunSummary, status: str) -> set[str]:
    table = pq.read_table(summary.results_uri, columns=["id", "status"]).to_pylist()
    return {r["id"] for r in table if r["status"] == status}


@pytest.fixture(scope="module")
def history(
    tmp_path_factory: pytest.TempPathFactory, emulator_process: EmulatorProcess
) -> Iterator[History]:
    folder = tmp_path_factory.mktemp("history")
    manifest = write_manifest(folder)
    emu = emulator_process
    emu.reset()
    try:
        # Faults are drawn from the seed and each request's content: find a seed that fails
        # some edits (two distinct ones at least) and lets others through.
        for seed in range(20):
            output = folder / f"out-{seed}"
            emu.configure(internal_error_rate=0.5, fault_seed=seed)
            first = run(emu, manifest, output, run_id=FIRST)
            failed, succeeded = ids_with(first, "failed"), ids_with(first, "succeeded")
            if len(failed - {"r1", "r9"}) >= 2 and succeeded:
                break
            shutil.rmtree(output)
        else:
            raise AssertionError("no fault seed gave a mix of failed and succeeded edits")
        emu.configure(internal_error_rate=1.0)
        resume = run(emu, manifest, output, run_id=RESUME)
        emu.configure(internal_error_rate=0.0)
        kept = sorted(failed - {"r1", "r9"})[0]
        retry = run(
            emu,
            manifest,
            output,
            run_id=RETRY,
            retry_failed_of=FIRST,
            select_ids=tuple(sorted(failed - {kept})),
        )
    finally:
        emu.configure(internal_error_rate=0.0, fault_seed=0)
    yield History(
        manifest=manifest,
        output=output,
        summaries={FIRST: first, RESUME: resume, RETRY: retry},
        first_failed=failed,
        first_succeeded=succeeded,
        kept_failed=kept,
    )


def by_id(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in table.to_pylist()}


# --- list_runs, run_detail ----------------------------------------------------------------------


@integration
def test_list_runs_newest_first_with_states_and_counts(history: History) -> None:
    runs = rh.list_runs(LocalStorage(history.output))
    assert [r.run_id for r in runs] == [RETRY, RESUME, FIRST]
    states = {r.run_id: r.state for r in runs}
    assert states == {
        FIRST: rh.STATE_ROWS_FAILED,
        RESUME: rh.STATE_ROWS_FAILED,
        RETRY: rh.STATE_COMPLETE,
    }
    for r in runs:
        summary = history.summaries[r.run_id]
        assert r.rows == 9
        assert r.by_status == summary.by_status
        assert r.skipped_by_reason == summary.skipped_by_reason
        assert r.cost_usd == pytest.approx(summary.cost_usd)
        assert r.manifest == str(history.manifest)
        assert r.has_summary and r.has_results
        assert r.started_at is not None and r.finished_at is not None and r.duration_s
    first, resume = runs[2], runs[1]
    assert first.by_status["invalid"] == 2
    assert first.failed == len(history.first_failed)
    assert resume.skipped_by_reason == {"done": len(history.first_succeeded)}


@integration
def test_run_detail_groups_failures_with_an_example_and_builds_the_retry_command(
    history: History,
) -> None:
    storage = LocalStorage(history.output)
    detail = rh.run_detail(storage, FIRST)
    assert detail.run.run_id == FIRST
    groups = {(g.status, g.error_code): g for g in detail.failures}
    assert set(groups) == {("failed", "INTERNAL_ERROR"), ("invalid", "source_error")}
    failed = groups["failed", "INTERNAL_ERROR"]
    assert failed.count == len(history.first_failed)
    # The example failed on its own (not a duplicate pointing at another row).
    assert failed.example_id in history.first_failed
    assert failed.example_message is not None
    assert failed.example_message.startswith("HTTP 500")
    assert len(failed.example_message) <= 200
    invalid = groups["invalid", "source_error"]
    assert (invalid.count, invalid.example_row, invalid.example_id) == (2, 7, "r7")
    assert invalid.example_column == "image"
    assert detail.failures[0] == failed  # the largest group first
    assert detail.results_uri == str(history.output / "runs" / FIRST / "results.parquet")
    assert detail.summary_uri == str(history.output / "runs" / FIRST / "summary.json")
    assert detail.retry_command == shlex.join(
        [
            "imgedit",
            "run",
            str(history.manifest),
            "--output",
            str(history.output),
            "--retry-failed-of",
            FIRST,
        ]
    )
    # No run id: the newest run, which has nothing to retry.
    latest = rh.run_detail(storage)
    assert latest.run.run_id == RETRY and latest.failures == [] and latest.retry_command is None
    assert latest.skipped_by_reason["not_selected"] == 9 - len(history.first_failed) + 1
    with pytest.raises(rh.HistoryError, match="no run 'nope'"):
        rh.run_detail(storage, "nope")
    with pytest.raises(rh.HistoryError):
        rh.run_detail(storage, "../etc")


def test_retry_command_is_shell_quoted() -> None:
    command = rh.retry_command("my manifest's.csv", "s3://b/out dir", "r-1")
    assert shlex.split(command) == [
        "imgedit",
        "run",
        "my manifest's.csv",
        "--output",
        "s3://b/out dir",
        "--retry-failed-of",
        "r-1",
    ]


# --- the latest state of each row ---------------------------------------------------------------


@integration
def test_row_status_gives_the_state_that_matters_per_row(history: History) -> None:
    storage = LocalStorage(history.output)
    table = rh.row_status(storage)
    assert table.schema.equals(rh.STATUS_SCHEMA)
    assert table.column("row").to_pylist() == list(range(1, 10))
    rows = by_id(table)
    retried = history.first_failed - {history.kept_failed}
    for row_id in history.first_succeeded:
        # Edited in the first run, then `skipped: done` twice: succeeded by the first run.
        r = rows[row_id]
        assert r["state"] == "succeeded" and r["reason"] is None
        assert (r["state_run_id"], r["last_run_id"], r["runs_seen"]) == (FIRST, RETRY, 3)
        assert len(r["output_uris"]) == 1 and Path(r["output_uris"][0]).is_file()
    for row_id in retried:
        # Failed in the first run and the resume, succeeded (or shared it) in the retry.
        r = rows[row_id]
        assert r["state"] == "succeeded", r
        assert r["state_run_id"] == RETRY and r["error_code"] is None
        assert len(r["output_uris"]) == 1 and Path(r["output_uris"][0]).is_file()
    kept = rows[history.kept_failed]
    assert kept["state"] == "failed"
    assert (kept["state_run_id"], kept["last_run_id"]) == (RESUME, RETRY)  # not_selected last
    assert kept["error_code"] == "INTERNAL_ERROR"
    for row_id in ("r7", "r8"):
        assert rows[row_id]["state"] == "invalid"
        assert rows[row_id]["error_code"] == "source_error"
    assert rh.state_counts(table) == {
        "succeeded": 6,
        "failed": 1,
        "invalid": 2,
        "never_run": 0,
    }


@integration
def test_row_status_with_a_manifest_counts_rows_in_no_run_as_never_run(
    history: History,
) -> None:
    bigger = write_manifest(history.manifest.parent, extra_rows=2)
    table = rh.row_status(LocalStorage(history.output), str(bigger))
    assert table.num_rows == 11
    rows = by_id(table)
    for row_id in ("x0", "x1"):
        assert rows[row_id]["state"] == rh.NEVER_RUN
        assert rows[row_id]["runs_seen"] == 0 and rows[row_id]["output_uris"] == []
        assert rows[row_id]["last_run_id"] is None
    assert rh.state_counts(table)["never_run"] == 2
    assert rh.state_counts(table)["succeeded"] == 6


@integration
def test_row_status_written_as_parquet(history: History, tmp_path: Path) -> None:
    storage = LocalStorage(history.output)
    table = rh.row_status(storage)
    where = rh.write_status(storage, table, str(tmp_path / "sub" / "status.parquet"))
    assert pq.read_table(where).equals(table)
    assert not (history.output / rh.STATUS_KEY).exists()


@integration
def test_the_duckdb_query_agrees_with_row_status(history: History) -> None:
    glob = str(history.output / "runs" / "*" / "results.parquet")
    with duckdb.connect() as con:
        sql = rh.latest_state_sql(glob)
        got = con.sql(sql).to_arrow_table()
        counts = dict(con.sql(f"select state, count(*) from ({sql}) group by state").fetchall())
        naive = dict(con.sql(f"select status, count(*) from '{glob}' group by status").fetchall())
    expected = rh.row_status(LocalStorage(history.output))
    columns = [
        "row",
        "id",
        "state",
        "reason",
        "job_key",
        "error_code",
        "state_run_id",
        "last_run_id",
    ]
    assert got.select(columns).to_pylist() == expected.select(columns).to_pylist()
    assert got.column("runs_seen").to_pylist() == expected.column("runs_seen").to_pylist()
    assert counts == {"succeeded": 6, "failed": 1, "invalid": 2}
    # The naive query counts each row once per run it appears in.
    assert sum(naive.values()) == 27


def put_results(storage: LocalStorage, run_id: str, rows: list[ResultRow]) -> None:
    storage.put_bytes(layout.results_key(run_id), table_to_parquet_bytes(rows_to_table(rows)))


def test_row_status_edge_cases_agree_with_duckdb(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    t1 = t0 + timedelta(hours=1)
    # The older run is named after the newer one: time decides, not names.
    put_results(
        storage,
        "run-b",
        [
            ResultRow(1, "a", "succeeded", job_key="k1", output_uris=["/o/images/k1-0.png"]),
            ResultRow(2, "b", "failed", error_code="E1", error_message="first"),
            ResultRow(3, "c", "skipped", reason="budget"),
            ResultRow(4, "d", "skipped", reason="not_selected"),
            ResultRow(5, "e", "failed", error_code="E5"),
            ResultRow(7, "g", "skipped", reason="stopped", error_code="AUTH"),
        ],
    )
    put_results(
        storage,
        "run-a",
        [
            ResultRow(1, "a", "skipped", reason="done", job_key="k1"),
            ResultRow(2, "b", "failed", error_code="E2", error_message="second"),
            ResultRow(3, "c", "invalid", error_code="invalid_row"),
            ResultRow(5, "e", "skipped", reason="not_selected"),
            ResultRow(6, "f", "skipped", reason="done", job_key="k1"),
            ResultRow(7, "g", "skipped", reason="interrupted"),
        ],
    )
    for run_id, start in (("run-b", t0), ("run-a", t1)):
        table = pq.read_table(tmp_path / "out" / "runs" / run_id / "results.parquet")
        times = pa.array([start] * table.num_rows, pa.timestamp("ms", tz="UTC"))
        table = table.set_column(table.schema.get_field_index("started_at"), "started_at", times)
        storage.put_bytes(layout.results_key(run_id), table_to_parquet_bytes(table))
    got = by_id(rh.row_status(storage))
    assert {k: (r["state"], r["reason"], r["state_run_id"]) for k, r in got.items()} == {
        "a": ("succeeded", None, "run-b"),
        "b": ("failed", None, "run-a"),
        "c": ("invalid", None, "run-a"),
        "d": (rh.NEVER_RUN, None, "run-b"),
        "e": ("failed", None, "run-b"),
        "f": ("succeeded", "done", "run-a"),
        "g": ("skipped", "interrupted", "run-a"),
    }
    assert got["b"]["error_message"] == "second"
    # A row done in every run that listed it gets its job's outputs from another row.
    assert got["f"]["output_uris"] == ["/o/images/k1-0.png"]
    assert got["a"]["last_run_id"] == "run-a" and got["a"]["runs_seen"] == 2
    glob = str(tmp_path / "out" / "runs" / "*" / "results.parquet")
    with duckdb.connect() as con:
        sql_rows = con.sql(rh.latest_state_sql(glob)).to_arrow_table().to_pylist()
    columns = ("state", "reason", "state_run_id", "last_run_id", "runs_seen", "error_code")
    for r in sql_rows:
        assert {c: r[c] for c in columns} == {c: got[r["id"]][c] for c in columns}, r["id"]


@integration
def test_a_killed_run_is_counted_from_its_parts(history: History, tmp_path: Path) -> None:
    output = tmp_path / "killed"
    parts = sorted((history.output / "runs" / FIRST / "parts").glob("*.parquet"))
    assert parts
    (output / "runs" / "killed-run" / "parts").mkdir(parents=True)
    for part in parts:
        shutil.copy(part, output / "runs" / "killed-run" / "parts" / part.name)
    storage = LocalStorage(output)
    (info,) = rh.list_runs(storage)
    assert info.state == rh.STATE_INCOMPLETE and not info.has_summary
    assert info.rows == 9 and info.by_status == history.summaries[FIRST].by_status
    assert info.parts == len(parts)
    detail = rh.run_detail(storage, "killed-run")
    assert detail.retry_command is None and detail.results_uri is None
    assert detail.parts_uri is not None
    assert {g.error_code for g in detail.failures} == {"INTERNAL_ERROR", "source_error"}
    counts = rh.state_counts(rh.row_status(storage))
    assert counts["invalid"] == 2 and counts["failed"] == len(history.first_failed)
    result = cli(["show", str(output)])
    assert result.exit_code == 0, result.output
    assert "incomplete (no summary)" in result.stdout and "killed" in result.stdout


# --- the commands -------------------------------------------------------------------------------


def cli(args: list[str], columns: int = 200) -> Any:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    return CliRunner().invoke(app, args, env={"COLUMNS": str(columns)})


@integration
def test_runs_command(history: History) -> None:
    result = cli(["runs", str(history.output)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    order = [next(i for i, line in enumerate(lines) if r in line) for r in (RETRY, RESUME, FIRST)]
    assert order == sorted(order)
    first_line = next(line for line in lines if FIRST in line)
    assert "rows failed" in first_line and f" {len(history.first_failed)} " in first_line
    result = cli(["runs", str(history.output), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["run_id"] for r in data] == [RETRY, RESUME, FIRST]
    assert data[1]["skipped_by_reason"] == {"done": len(history.first_succeeded)}


@integration
def test_show_command(history: History) -> None:
    result = cli(["show", str(history.output), FIRST])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "INTERNAL_ERROR" in out and "source_error" in out
    assert "row 7 (r7): column image: file not found" in out
    assert f"retry the {len(history.first_failed)} failed rows:" in out
    assert str(history.output / "runs" / FIRST / "results.parquet") in out
    # The retry command is one line however narrow the terminal, to copy and paste.
    command = rh.retry_command(str(history.manifest), str(history.output), FIRST)
    assert command in out.splitlines()
    assert command in cli(["show", str(history.output), FIRST], columns=40).stdout.splitlines()
    data = json.loads(cli(["show", str(history.output), "--json"]).stdout)
    assert data["run"]["run_id"] == RETRY and data["retry_command"] is None


@integration
def test_status_command(history: History, tmp_path: Path) -> None:
    result = cli(["status", str(history.output), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["rows"] == 9 and data["runs"] == 3
    assert data["states"] == {"succeeded": 6, "failed": 1, "invalid": 2, "never_run": 0}
    bigger = write_manifest(history.manifest.parent, extra_rows=3)
    target = tmp_path / "status.parquet"
    result = cli(["status", str(history.output), str(bigger), "--write", str(target)])
    assert result.exit_code == 0, result.output
    assert "never_run" in result.stdout and f"written: {target}" in result.stdout
    assert pq.read_table(target).num_rows == 12
    copy = tmp_path / "copy"
    shutil.copytree(history.output / "runs", copy / "runs")
    result = cli(["status", str(copy), "--write-default"])
    assert result.exit_code == 0, result.output
    assert pq.read_table(copy / "status.parquet").num_rows == 9


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["runs", "{missing}"], "no such output folder"),
        (["show", "{missing}"], "no such output folder"),
        (["status", "{missing}"], "no such output folder"),
        (["runs", "{empty}"], "no runs under"),
        (["show", "{empty}"], "no runs under"),
        (["status", "{empty}"], "no runs under"),
        (["show", "{output}", "no-such-run"], "no run 'no-such-run'"),
        (["show", "{output}", "../x"], "run id must be"),
        (["status", "{output}", "--write", "a", "--write-default"], "not both"),
        (["serve", "{output}", "--host", "0.0.0.0"], "--public"),
        (["serve", "{missing}"], "no such output folder"),
    ],
)
@integration
def test_command_errors_are_one_red_line_and_exit_2(
    history: History, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    names = {
        "missing": str(tmp_path / "missing"),
        "empty": str(tmp_path / "empty"),
        "output": str(history.output),
    }
    result = cli([a.format(**names) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_commands_load_without_prefect() -> None:
    code = (
        "import sys, flows.history_cli; "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('prefect', 'boto3', "
        "'pyarrow', 'fastapi')], sorted(sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- on S3 --------------------------------------------------------------------------------------


@integration
def test_history_of_an_s3_output(
    tmp_path: Path, emulator: EmulatorProcess, moto_endpoint: str
) -> None:
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket="edits")
    manifest = write_manifest(tmp_path)
    output = "s3://edits/team/out"
    s3 = {"s3_endpoint_url": moto_endpoint}
    first = run(emulator, manifest, output, run_id="s3-first", **s3)
    run(emulator, manifest, output, run_id="s3-again", **s3)
    storage = rh.open_output(output, endpoint_url=moto_endpoint)
    runs = rh.list_runs(storage)
    assert [r.run_id for r in runs] == ["s3-again", "s3-first"]
    assert runs[0].skipped_by_reason == {"done": VALID + 1}  # r1..r6, and r9 (r1 again)
    assert runs[1].by_status == first.by_status and runs[1].state == rh.STATE_ROWS_FAILED
    detail = rh.run_detail(storage, "s3-first")
    assert detail.results_uri == f"{output}/runs/s3-first/results.parquet"
    assert detail.retry_command is None  # invalid rows only: nothing to retry
    table = rh.row_status(storage)
    assert rh.state_counts(table) == {"succeeded": 7, "failed": 0, "invalid": 2, "never_run": 0}
    for r in table.to_pylist():
        if r["state"] == "succeeded":
            (uri,) = r["output_uris"]
            assert uri.startswith(f"{output}/images/")
            key = rh.image_key_of_uri(uri)
            assert key is not None and storage.exists(key)
    result = cli(
        ["status", output, "--s3-endpoint-url", moto_endpoint, "--write-default", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["written"] == f"{output}/{rh.STATUS_KEY}"
    assert pq.read_table(pa.BufferReader(storage.get_bytes(rh.STATUS_KEY))).equals(table)
    result = cli(["runs", "s3://edits/elsewhere", "--s3-endpoint-url", moto_endpoint])
    assert result.exit_code == 2 and "no runs under s3://edits/elsewhere" in result.stderr
