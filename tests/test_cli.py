"""The imgedit command line: validate in-process, and the README's run command for real."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "example.csv"


def test_validate_reports_a_good_manifest() -> None:
    result = CliRunner().invoke(app, ["validate", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "6 rows" in result.output and "6 valid" in result.output


def test_validate_names_row_column_and_reason(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,prompt,seed\nok,a.png,fine,1\nbad,a.png,fine,forty\n")
    result = CliRunner().invoke(app, ["validate", str(manifest)])
    assert result.exit_code == 1
    assert "row 2, column seed" in result.output and "forty" in result.output


def test_validate_refuses_a_manifest_without_prompts(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image\nx,a.png\n")
    result = CliRunner().invoke(app, ["validate", str(manifest)])
    assert result.exit_code == 2
    assert "prompt" in result.output


@pytest.mark.integration
def test_the_readme_run_command_edits_the_example_manifest(tmp_path: Path) -> None:
    """`imgedit run manifests/example.csv --emulator --output DIR`, as a user runs it."""
    imgedit = shutil.which("imgedit", path=str(Path(sys.executable).parent))
    command = [imgedit] if imgedit else [sys.executable, "-m", "flows.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    proc = subprocess.run(
        [*command, "run", str(EXAMPLE), "--emulator", "--output", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "results table" in proc.stdout
    (results_path,) = out.glob("runs/*/results.parquet")
    results = pd.read_parquet(results_path)
    assert len(results) == 6 and (results["status"] == "succeeded").all()
    assert len(list(out.glob("jobs/*/*.json"))) == 6
    # room-window asks for n=2: seven images in all.
    assert len(list(out.glob("images/*/*"))) == 7


def test_the_command_to_run_again_keeps_the_concurrency_options() -> None:
    from flows.cli import _retry_command

    params = {"concurrency": 8, "fixed_concurrency": True, "response_format": "b64_json"}
    command = _retry_command("m.csv", "out", params, api_base=None, emulator=True)
    assert shlex.split(command) == [
        "imgedit", "run", "m.csv", "--output", "out", "--emulator",
        "--concurrency", "8", "--fixed-concurrency",
    ]  # fmt: skip
    params["fixed_concurrency"] = False
    command = _retry_command("m.csv", "out", params, api_base=None, emulator=True)
    assert "--fixed-concurrency" not in shlex.split(command)
