"""The deployments' flows (catalogue-reedit, augment-dataset, backfill) on a Prefect server."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from flows.augment_dataset import augment_dataset
from flows.backfill import backfill
from flows.catalogue_reedit import catalogue_reedit
from flows.settings import EditSettings, RunSettings
from pipeline.emulator.process import EmulatorProcess
from tests.conftest import image_bytes

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("prefect_harness"),
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def settings(emulator: EmulatorProcess, **kw: object) -> RunSettings:
    return RunSettings(api_base=emulator.base_url, concurrency=4, **kw)  # type: ignore[arg-type]


async def test_catalogue_reedit_pays_only_for_changed_sources(
    tmp_path: Path, emulator: EmulatorProcess
) -> None:
    catalogue = tmp_path / "catalogue"
    (catalogue / "shoes").mkdir(parents=True)
    (catalogue / "a.png").write_bytes(image_bytes((40, 40), (200, 0, 0)))
    (catalogue / "b.jpg").write_bytes(image_bytes((60, 40), (0, 200, 0), "JPEG"))
    (catalogue / "shoes" / "c.png").write_bytes(image_bytes((40, 60), (0, 0, 200)))
    (catalogue / "notes.txt").write_text("not an image")
    kwargs = {
        "output": str(tmp_path / "out"),
        "source_prefix": str(catalogue),
        "prompt": "on a white background",
        "edit": EditSettings(output_format="jpeg", size="1:1"),
        "run": settings(emulator),
    }
    first = await catalogue_reedit(**kwargs)  # type: ignore[arg-type]
    assert first["by_status"]["succeeded"] == 3
    assert emulator.stats()["requests"] == 3

    second = await catalogue_reedit(**kwargs)  # type: ignore[arg-type]
    assert second["skipped_by_reason"] == {"done": 3}
    assert emulator.stats()["requests"] == 3  # an unchanged catalogue costs no API call

    (catalogue / "b.jpg").write_bytes(image_bytes((60, 40), (250, 250, 0), "JPEG"))
    third = await catalogue_reedit(**kwargs)  # type: ignore[arg-type]
    assert third["by_status"]["succeeded"] == 1 and third["skipped_by_reason"] == {"done": 2}
    assert emulator.stats()["requests"] == 4  # exactly one more: the changed source


async def test_augment_dataset_writes_a_table_and_a_contact_sheet(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    manifest = tmp_path / "products.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "product"])
        w.writerow(["p1", sources["square.png"], "red mug"])
        w.writerow(["p2", sources["tall.png"], "blue vase"])
    result = await augment_dataset(
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        prompt_template="Put the {product} on a beach",
        seeds=[1, 2],
        edit=EditSettings(n=2, output_format="png"),
        run=settings(emulator),
    )
    assert result["by_status"]["succeeded"] == 4  # 2 sources x 2 seeds
    table = pd.read_parquet(result["dataset_uri"])
    assert len(table) == 8  # n=2 variants each
    for column in ("source_id", "prompt", "seed", "variant", "output_uri", "width", "height"):
        assert column in table.columns
    assert set(table["prompt"]) == {"Put the red mug on a beach", "Put the blue vase on a beach"}
    assert sorted(set(table["seed"])) == [1, 2] and sorted(set(table["variant"])) == [0, 1]
    for _, row in table.iterrows():
        with Image.open(row["output_uri"]) as im:
            assert im.size == (row["width"], row["height"])

    sheet = tmp_path / "out" / "runs" / result["run_id"] / "contact-sheet.png"
    with Image.open(io.BytesIO(sheet.read_bytes())) as im:
        im.load()
        assert im.format == "PNG" and im.width > im.height / 4


async def test_backfill_edits_only_the_chosen_rows(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "prompt", "seed", "output_format"])
        for i in range(10):
            w.writerow([f"r{i}", sources["square.png"], f"p{i}", i, "png" if i < 5 else "jpeg"])
    by_id = await backfill(
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        ids=["r1", "r7"],
        run=settings(emulator),
    )
    results = pd.read_parquet(by_id["results_uri"]).set_index("id")
    assert sorted(results.index[results["status"] == "succeeded"]) == ["r1", "r7"]
    assert by_id["skipped_by_reason"] == {"not_selected": 8}

    by_filter = await backfill(
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        where='output_format == "jpeg" and seed >= 8',
        run=settings(emulator),
    )
    results = pd.read_parquet(by_filter["results_uri"]).set_index("id")
    assert sorted(results.index[results["status"] == "succeeded"]) == ["r8", "r9"]
    assert emulator.stats()["requests"] == 4
