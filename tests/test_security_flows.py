"""Security through the flows on a Prefect server: hostile `where` strings, allowed roots.

Each of edit-manifest, backfill, augment-dataset and catalogue-reedit refuses a hostile
`where` before any row is read (nothing runs, nothing is sent), and the documented forms
work; a run under IMGEDIT_ALLOWED_ROOTS with a manifest or output outside fails before any
API call.
"""

from __future__ import annotations

import csv
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from flows.augment_dataset import augment_dataset
from flows.backfill import backfill
from flows.catalogue_reedit import catalogue_reedit
from flows.edit_manifest import edit_manifest
from flows.settings import RunSettings
from pipeline.emulator.process import EmulatorProcess
from pipeline.errors import ConfigError
from pipeline.io.allowed_roots import ENV_ALLOWED_ROOTS
from tests.test_security import hostile_wheres

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

FlowCall = Callable[[Path, str, EmulatorProcess], Awaitable[Any]]


def manifest_of(tmp_path: Path, sources: dict[str, Path]) -> Path:
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "image", "prompt", "seed", "output_format", "mask"])
        for i in range(6):
            mask = sources["square.png"] if i in (2, 3) else ""
            fmt = "png" if i % 2 == 0 else "jpeg"
            writer.writerow([f"r{i}", sources["square.png"], f"p{i} sky", i * 5, fmt, mask])
    return path


def settings(emulator: EmulatorProcess) -> RunSettings:
    return RunSettings(api_base=emulator.base_url, concurrency=4)


async def _edit_manifest(tmp: Path, where: str, emu: EmulatorProcess) -> Any:
    return await edit_manifest(
        manifest=str(tmp / "m.csv"),
        output=str(tmp / "out"),
        api_base=emu.base_url,
        select_where=where,
    )


async def _backfill(tmp: Path, where: str, emu: EmulatorProcess) -> Any:
    return await backfill(
        manifest=str(tmp / "m.csv"), output=str(tmp / "out"), where=where, run=settings(emu)
    )


async def _augment(tmp: Path, where: str, emu: EmulatorProcess) -> Any:
    return await augment_dataset(
        manifest=str(tmp / "m.csv"),
        output=str(tmp / "out"),
        prompts=["on a beach"],
        where=where,
        run=settings(emu),
    )


async def _catalogue(tmp: Path, where: str, emu: EmulatorProcess) -> Any:
    return await catalogue_reedit(
        output=str(tmp / "out"),
        source_prefix=str(tmp / "src"),
        prompt="on white",
        where=where,
        run=settings(emu),
    )


FLOWS: dict[str, FlowCall] = {
    "edit-manifest": _edit_manifest,
    "backfill": _backfill,
    "augment-dataset": _augment,
    "catalogue-reedit": _catalogue,
}
HOSTILE = range(len(hostile_wheres(Path("x"))))


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("index", HOSTILE)
async def test_each_flow_refuses_hostile_where_strings_and_runs_nothing(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    flow: str,
    index: int,
) -> None:
    manifest_of(tmp_path, sources)
    canary = tmp_path / "CANARY"
    where = hostile_wheres(canary)[index]
    with pytest.raises(ConfigError, match="where expression") as info:
        await FLOWS[flow](tmp_path, where, emulator)
    assert len(str(info.value)) < 600  # a 100 kB expression is not echoed back
    assert not canary.exists()
    assert emulator.stats()["requests"] == 0
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ('seed > 10 and output_format == "png"', {"r4"}),
        ('id in ["r0", "r5"]', {"r0", "r5"}),
        ("not isnull(mask)", {"r2", "r3"}),
        ('contains(prompt, "p1") or startswith(id, "r5")', {"r1", "r5"}),
    ],
)
async def test_the_documented_forms_select_rows_through_backfill(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    where: str,
    expected: set[str],
) -> None:
    manifest_of(tmp_path, sources)
    summary = await _backfill(tmp_path, where, emulator)
    results = pd.read_parquet(summary["results_uri"]).set_index("id")
    assert set(results.index[results["status"] == "succeeded"]) == expected
    assert emulator.stats()["requests"] == len(expected)


@pytest.mark.parametrize("outside", ["manifest", "output"])
async def test_a_flow_outside_the_allowed_roots_fails_before_any_api_call(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
    outside: str,
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    manifest = manifest_of(tmp_path, sources)
    monkeypatch.setenv(ENV_ALLOWED_ROOTS, f"{allowed},{sources['square.png'].parent}")
    if outside == "output":
        manifest = manifest.rename(allowed / "m.csv")
    output = tmp_path / "out" if outside == "output" else allowed / "out"
    with pytest.raises(ConfigError, match=f"{outside} .* is outside the allowed roots"):
        await edit_manifest(manifest=str(manifest), output=str(output), api_base=emulator.base_url)
    with pytest.raises(ConfigError, match="outside the allowed roots"):
        await backfill(
            manifest=str(manifest), output=str(output), ids=["r1"], run=settings(emulator)
        )
    assert emulator.stats()["requests"] == 0
