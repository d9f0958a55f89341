"""Money through the real CLI: two runs at once, Ctrl-C and SIGTERM mid-run, and the re-run.

Each `imgedit run` is a real process with its own local Prefect API, against the session's
emulator (its own process, outside the CLI's process group), so the ledger sees every
request across the runs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.emulator.process import EmulatorProcess
from tests.conftest import image_bytes

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
EXIT_INCOMPLETE = 3


def write_manifest(tmp_path: Path, rows: int) -> Path:
    src = tmp_path / "src.jpg"
    src.write_bytes(image_bytes((64, 48), (120, 60, 30), "JPEG"))
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "prompt", "output_format"])
        for i in range(rows):
            writer.writerow([f"r{i:03d}", src, f"edit number {i}", "jpeg"])
    return path


def cli(manifest: Path, out: Path, emulator: EmulatorProcess, concurrency: int) -> list[str]:
    return [
        sys.executable, "-m", "flows.cli", "run", str(manifest), "--output", str(out),
        "--api-base", emulator.base_url, "--concurrency", str(concurrency), "--no-progress",
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a terminal would give it
    )


def summaries(out: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/summary.json"))]


def table_of(summary: dict[str, object]) -> pd.DataFrame:
    return pd.read_parquet(str(summary["results_uri"])).set_index("id")


def test_two_runs_at_once_pay_each_row_once(tmp_path: Path, emulator: EmulatorProcess) -> None:
    emulator.configure(latency=0.3)
    manifest, out = write_manifest(tmp_path, 60), tmp_path / "out"
    procs = [start(cli(manifest, out, emulator, 4)) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (_stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr
    runs = summaries(out)
    assert len(runs) == 2
    doubles = sum(int(str(s["possible_double_charges"])) for s in runs)
    assert emulator.stats()["charged_images"] <= 60 + doubles
    for summary in runs:
        table = table_of(summary)
        assert len(table) == 60 and table.index.is_unique
        assert set(table["status"]) <= {"succeeded", "skipped"}


@pytest.mark.parametrize("how", ["SIGINT to the group", "SIGINT to the process", "SIGTERM"])
def test_an_interrupted_run_keeps_what_was_paid_and_the_rerun_finishes(
    tmp_path: Path, emulator: EmulatorProcess, how: str
) -> None:
    emulator.configure(latency=0.3)
    rows = 300
    manifest, out = write_manifest(tmp_path, rows), tmp_path / "out"
    proc = start(cli(manifest, out, emulator, 16))
    try:
        deadline = time.monotonic() + 180
        while emulator.stats()["charged_images"] < 100:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.05)
        if how == "SIGINT to the group":
            os.killpg(proc.pid, signal.SIGINT)
        elif how == "SIGINT to the process":
            os.kill(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == EXIT_INCOMPLETE, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout
    assert "run the same command again" in stdout + stderr
    [first] = summaries(out)
    assert first["stop_kind"] == "interrupted"
    table = table_of(first)
    assert len(table) == rows and table.index.is_unique
    assert set(table["status"]) <= {"succeeded", "skipped"}
    skipped = table[table["status"] == "skipped"]
    assert (skipped["reason"] == "interrupted").all() and len(skipped) > 0
    assert table["status"].eq("succeeded").sum() >= 100

    again = subprocess.run(
        cli(manifest, out, emulator, 16), cwd=ROOT, env=env(), capture_output=True, text=True,
        timeout=240, check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    runs = summaries(out)
    second = next(s for s in runs if s["run_id"] != first["run_id"])
    assert table_of(second)["status"].isin(["succeeded", "skipped"]).all()
    doubles = sum(int(str(s["possible_double_charges"])) for s in runs)
    assert emulator.stats()["charged_images"] == rows + doubles
