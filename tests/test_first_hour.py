"""The first hour: checks that catch what a run would fail on, answers a person can act on.

Validation that reads sources, a run without a key or with an unreachable API, estimates that
count only what is left, exit statuses, trying a few rows first, the end-of-run report and the
run's log, and a help that answers without loading Prefect.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.plan import plan_run
from pipeline.engine.run import run_manifest
from tests.conftest import image_bytes

ROOT = Path(__file__).resolve().parents[1]


def env(**extra: str) -> dict[str, str]:
    keys = ("IMGEDIT_API_KEY", "LUMENFALL_API_KEY")
    base = {k: v for k, v in os.environ.items() if k not in keys}
    return {**base, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **extra}


def cli(*args: str, timeout: float = 240, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=ROOT, env=env(**extra), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def manifest(tmp_path: Path, rows: int) -> Path:
    src = tmp_path / "src.png"
    src.write_bytes(image_bytes((48, 48), (10, 80, 160)))
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "prompt"])
        for i in range(rows):
            w.writerow([f"r{i}", src, f"edit {i}"])
    return path


def test_validate_reads_the_sources_a_run_would_fail_on(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    good.write_bytes(image_bytes((64, 48), (1, 2, 3)))
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    small_mask = tmp_path / "mask.png"
    small_mask.write_bytes(image_bytes((32, 32), (0, 0, 0, 0)))
    path = tmp_path / "m.csv"
    path.write_text(
        "image,prompt,mask\n"
        f"{good},fine,\n"
        f"{tmp_path / 'missing.png'},no file,\n"
        f"{text},a text file,\n"
        f"{good},wrong mask,{small_mask}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(path), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "row 2, column image" in result.output and "not found" in result.output
    assert "row 3, column image" in result.output
    assert "row 4, column mask" in result.output and "32x32" in result.output
    assert "row 1" not in result.output
    quick = CliRunner().invoke(app, ["validate", str(path), "--no-sources"])
    assert quick.exit_code == 0, quick.output  # the cells alone are fine


@pytest.mark.integration
def test_validate_with_an_output_says_what_is_left(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    m = manifest(tmp_path, 4)
    out = tmp_path / "out"
    import asyncio

    asyncio.run(
        run_manifest(RunOptions(manifest=str(m), output=str(out), api_base=emulator.base_url))
    )
    result = CliRunner().invoke(app, ["validate", str(m), "--output", str(out), "--no-sources"])
    assert result.exit_code == 0, result.output
    assert "left to edit: 0 of 4 valid rows" in result.output


def test_a_run_without_a_key_against_a_remote_api_refuses_at_once(tmp_path: Path) -> None:
    proc = cli(
        "run", str(manifest(tmp_path, 2)), "--output", str(tmp_path / "out"),
        "--api-base", "https://api.example.test/v1", "--no-progress", timeout=10,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no API key" in proc.stderr and "nothing was sent" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


async def test_an_unreachable_api_stops_the_run_after_a_few_attempts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGEDIT_API_KEY", "k" * 12)
    opts = RunOptions(
        manifest=str(manifest(tmp_path, 40)),
        output=str(tmp_path / "out"),
        api_base="http://imgedit-unresolvable.invalid/v1",
        concurrency=4,
    )
    summary = await run_manifest(opts)
    assert summary.stop_kind == "stopped" and "cannot be reached" in (summary.stopped_by or "")
    table = pd.read_parquet(summary.results_uri)
    # At most the rows that were already trying when the third failure came.
    assert table["attempts"].sum() <= 3 + 2 * 4
    assert table["status"].isin(["failed", "skipped"]).all()
    assert (table[table["status"] == "skipped"]["reason"] == "stopped").all()


async def test_the_estimate_counts_only_what_is_left(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    m = manifest(tmp_path, 6)
    opts = RunOptions(manifest=str(m), output=str(tmp_path / "out"), api_base=emulator.base_url)
    first = plan_run(opts, "first")
    assert first.rows_left == 6 and first.estimated_cost_usd == pytest.approx(0.06)
    await run_manifest(opts.replace(limit=4))
    again = plan_run(opts, "again")
    assert again.rows_done == 4 and again.rows_left == 2
    assert again.estimated_cost_usd == pytest.approx(0.02)


async def test_limit_edits_only_the_first_rows(tmp_path: Path, emulator: EmulatorProcess) -> None:
    summary = await run_manifest(
        RunOptions(
            manifest=str(manifest(tmp_path, 12)),
            output=str(tmp_path / "out"),
            api_base=emulator.base_url,
            limit=5,
        )
    )
    assert summary.by_status["succeeded"] == 5
    assert summary.skipped_by_reason == {"not_selected": 7}
    assert emulator.stats()["requests"] == 5


@pytest.mark.integration
def test_the_end_of_a_run_says_what_to_do_and_where_things_are(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    m = tmp_path / "m.csv"
    src = tmp_path / "src.png"
    src.write_bytes(image_bytes((48, 48), (10, 80, 160)))
    m.write_text(f"id,image,prompt\na,{src},fine\nb,{tmp_path / 'gone.png'},missing\n")
    out = tmp_path / "out"
    secret = "sk-" + "canary" + "-0123456789"
    proc = cli(
        "run", str(m), "--output", str(out), "--api-base", emulator.base_url, "--no-progress",
        "--concurrency", "2", IMGEDIT_API_KEY=secret,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    text = proc.stdout
    assert "source_error: 1, e.g. row 2" in text
    assert "contact sheet:" in text and "run log:" in text
    [run_dir] = (out / "runs").iterdir()
    log = (run_dir / "run.log").read_text()
    assert "rows left to edit" in log and secret not in log
    assert secret not in proc.stdout + proc.stderr
    # Trying a few rows first and the budget: exit 3 when the budget leaves rows undone.
    budget = cli(
        "run", str(manifest(tmp_path, 6)), "--output", str(tmp_path / "out2"),
        "--api-base", emulator.base_url, "--no-progress", "--max-cost", "0.02",
        "--concurrency", "1",
    )  # fmt: skip
    assert budget.returncode == 3, budget.stderr[-3000:]
    assert "incomplete" in budget.stderr
    summary = json.loads(next((tmp_path / "out2" / "runs").glob("*/summary.json")).read_text())
    assert summary["skipped_by_reason"]["budget"] == 4


def test_help_and_version_load_neither_prefect_nor_the_emulator_app() -> None:
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flows.cli import app\n"
        "for args in (['--help'], ['run', '--help'], ['validate', '--help'], ['--version']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0, args\n"
        "loaded = [m for m in ('prefect', 'pipeline.emulator.app', 'fastapi', 'boto3') "
        "if m in sys.modules]\n"
        "print(loaded)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env(), capture_output=True, text=True,
        check=False, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("imgedit ")
