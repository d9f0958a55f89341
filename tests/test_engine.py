"""The engine without Prefect: manifest -> the emulator in process -> local or S3 storage."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pytest
from PIL import Image

from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.engine.summary import RunSummary
from tests.conftest import DEFAULT_EMULATOR_CONFIG
from tests.inprocess_emulator import InProcessEmulator

pytestmark = pytest.mark.integration


@pytest.fixture
def emulator() -> Iterator[InProcessEmulator]:
    """A fresh emulator app for each test, reached through its ASGI transport."""
    emu = InProcessEmulator()
    yield emu
    emu.close()


@pytest.fixture
def socket_emulator(emulator_process: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The session's emulator subprocess under uvicorn, for faults only a socket shows."""
    emulator_process.reset()
    emulator_process.configure(**DEFAULT_EMULATOR_CONFIG)
    yield emulator_process
    emulator_process.configure(**DEFAULT_EMULATOR_CONFIG)


COLUMNS = [
    "id",
    "images",
    "prompt",
    "seed",
    "mask",
    "n",
    "size",
    "aspect_ratio",
    "resolution",
    "quality",
    "user",
    "output_format",
    "output_compression",
    "param.turbo",
    "param.disable_safety_checker",
    "param.replicate_weights",
]


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return path


def results_of(summary: RunSummary) -> pd.DataFrame:
    return pd.read_parquet(summary.results_uri).set_index("id")


async def run(
    manifest: Path, output: Path | str, emu: InProcessEmulator | EmulatorProcess, **kw: Any
) -> RunSummary:
    opts = RunOptions(
        manifest=str(manifest),
        output=str(output),
        api_base=emu.base_url,
        concurrency=kw.pop("concurrency", 8),
        **kw,
    )
    parts = emu.parts() if isinstance(emu, InProcessEmulator) else None
    return await run_manifest(opts, parts)


async def test_every_parameter_reaches_the_server_as_sent(
    tmp_path: Path, sources: dict[str, Path], emulator: InProcessEmulator
) -> None:
    manifest = write_manifest(
        tmp_path / "m.csv",
        [
            {
                "id": "all",
                "images": json.dumps([str(sources["square.png"]), str(sources["ref.webp"])]),
                "prompt": "make it blue",
                "seed": 1234,
                "n": 2,
                "size": "1920x1080",
                "aspect_ratio": "16:9",
                "resolution": "1K",
                "quality": "high",
                "user": "team-a",
                "output_format": "webp",
                "output_compression": 70,
                "param.turbo": "false",
                "param.disable_safety_checker": "true",
                "param.replicate_weights": "style-v2",
            }
        ],
    )
    summary = await run(manifest, tmp_path / "out", emulator)
    assert summary.by_status["succeeded"] == 1
    (req,) = emulator.requests()
    fields = req["fields"]
    assert fields["model"] == "p-image-edit"
    assert fields["prompt"] == "make it blue"
    assert fields["seed"] == "1234"
    assert fields["n"] == "2"
    assert fields["size"] == "1920x1080"
    assert fields["aspect_ratio"] == "16:9"
    assert fields["resolution"] == "1K"
    assert fields["quality"] == "high"
    assert fields["user"] == "team-a"
    assert fields["output_format"] == "webp"
    assert fields["output_compression"] == "70"
    assert fields["response_format"] == "b64_json"
    assert fields["turbo"] == "false"
    assert fields["disable_safety_checker"] == "true"
    assert fields["replicate_weights"] == "style-v2"
    # A multi-image request: both files, in order, byte for byte.
    assert req["n_images"] == 2 and req["image_part_names"] == ["image[]", "image[]"]
    assert req["image_sha256"] == [
        hashlib.sha256(sources[n].read_bytes()).hexdigest() for n in ("square.png", "ref.webp")
    ]
    row = results_of(summary).loc["all"]
    assert row["n_outputs"] == 2 and len(row["output_uris"]) == 2
    assert row["actual_size"] == "1365x768" and row["output_format"] == "webp"
    for uri in row["output_uris"]:
        with Image.open(uri) as im:
            assert im.format == "WEBP" and im.size == (1365, 768)


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
async def test_size_mapping_and_both_response_formats(
    tmp_path: Path, sources: dict[str, Path], emulator: InProcessEmulator, response_format: str
) -> None:
    cases = {
        "fhd": ({"size": "1920x1080"}, "1365x768"),
        "ratio-in-size": ({"size": "2:3"}, "836x1254"),
        "aspect": ({"aspect_ratio": "3:4", "resolution": "1K"}, "887x1182"),
        "square": ({"size": "1024x1024"}, "1024x1024"),
        "auto-tall": ({"size": "auto", "images": str(sources["tall.png"])}, "887x1182"),
        "default-wide": ({"images": str(sources["wide.jpg"])}, "1365x768"),
        "near-4-3": ({"size": "1200x900"}, "1183x887"),
    }
    rows = [
        {"id": name, "images": str(sources["square.png"]), "prompt": "p", "seed": 1, **fields}
        for name, (fields, _) in cases.items()
    ]
    summary = await run(
        write_manifest(tmp_path / "m.csv", rows),
        tmp_path / "out",
        emulator,
        response_format=response_format,
    )
    results = results_of(summary)
    assert (results["status"] == "succeeded").all(), results[["status", "error_message"]]
    for name, (_, expected) in cases.items():
        assert results.loc[name, "actual_size"] == expected, name
    stats = emulator.stats()
    if response_format == "url":
        assert stats["downloads"] == len(cases)
    else:
        assert stats["downloads"] == 0


async def test_invalid_rows_are_reported_while_the_others_succeed(
    tmp_path: Path, sources: dict[str, Path], emulator: InProcessEmulator
) -> None:
    ok = {"images": str(sources["square.png"]), "prompt": "fine", "seed": 1}
    rows = [
        {"id": "good-1", **ok},
        {"id": "no-prompt", **ok, "prompt": ""},
        {"id": "bad-seed", **ok, "seed": "forty"},
        {"id": "missing-file", **ok, "images": str(tmp_path / "nope.png")},
        {"id": "good-2", **ok, "seed": 2},
    ]
    summary = await run(write_manifest(tmp_path / "m.csv", rows), tmp_path / "out", emulator)
    results = results_of(summary)
    assert len(results) == 5
    assert results.loc["good-1", "status"] == "succeeded"
    assert results.loc["good-2", "status"] == "succeeded"
    for name, column, words in [
        ("no-prompt", "prompt", "prompt"),
        ("bad-seed", "seed", "forty"),
        ("missing-file", "images", "not found"),
    ]:
        row = results.loc[name]
        assert row["status"] == "invalid", name
        assert row["error_column"] == column, name
        assert words in row["error_message"], (name, row["error_message"])
    assert results.loc["no-prompt", "error_message"].startswith("row 2")
    assert emulator.stats()["requests"] == 2


async def test_retries_through_429_5xx_and_dropped_connections(
    tmp_path: Path, sources: dict[str, Path], socket_emulator: EmulatorProcess
) -> None:
    # A dropped connection needs a real one: this test talks to the emulator over loopback.
    emulator = socket_emulator
    emulator.configure(
        rate_limited_rate=0.15,
        retry_after=0,
        internal_error_rate=0.1,
        exhausted_rate=0.1,
        drop_rate=0.1,
        fault_seed=5,
    )
    rows = [
        {"id": f"r{i}", "images": str(sources["square.png"]), "prompt": "p", "seed": i}
        for i in range(40)
    ]
    summary = await run(
        write_manifest(tmp_path / "m.csv", rows),
        tmp_path / "out",
        emulator,
        max_attempts=12,
    )
    results = results_of(summary)
    assert (results["status"] == "succeeded").all(), results["error_message"].dropna()
    stats = emulator.stats()
    faults = stats["faults"]
    assert faults.get("rate_limited") and faults.get("internal_error")
    assert faults.get("providers_exhausted") and faults.get("dropped")
    assert results["attempts"].sum() == stats["requests"]
    assert (results["attempts"] > 1).any()
    # Every charge is either a recorded cost or a reported possible double charge.
    assert stats["charged_usd"] == pytest.approx(
        summary.cost_usd + summary.possible_double_charge_usd
    )
    assert summary.possible_double_charges == faults["dropped"]


async def test_a_rerun_skips_done_rows_without_calling_the_api(
    tmp_path: Path, sources: dict[str, Path], emulator: InProcessEmulator
) -> None:
    rows = [
        {"id": f"r{i}", "images": str(sources["wide.jpg"]), "prompt": "p", "seed": i}
        for i in range(6)
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    first = await run(manifest, tmp_path / "out", emulator)
    assert first.by_status["succeeded"] == 6
    before = emulator.stats()["requests"]
    second = await run(manifest, tmp_path / "out", emulator)
    assert emulator.stats()["requests"] == before
    assert second.by_status["skipped"] == 6 and second.skipped_by_reason == {"done": 6}
    assert second.results_uri != first.results_uri


async def test_rows_with_the_same_job_are_edited_once(
    tmp_path: Path, sources: dict[str, Path], emulator: InProcessEmulator
) -> None:
    row = {"images": str(sources["square.png"]), "prompt": "same", "seed": 9}
    manifest = write_manifest(tmp_path / "m.csv", [{"id": "a", **row}, {"id": "b", **row}])
    summary = await run(manifest, tmp_path / "out", emulator)
    results = results_of(summary)
    assert emulator.stats()["requests"] == 1
    assert sorted(results["status"]) == ["skipped", "succeeded"]
    assert results.loc["a", "job_key"] == results.loc["b", "job_key"]


async def test_a_run_fatal_error_stops_the_run_and_a_rerun_continues(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: InProcessEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    emulator.configure(api_key="right-key")
    monkeypatch.setenv("IMGEDIT_API_KEY", "wrong-key")
    rows = [
        {"id": f"r{i}", "images": str(sources["square.png"]), "prompt": "p", "seed": i}
        for i in range(30)
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    stopped = await run(manifest, tmp_path / "out", emulator, concurrency=2)
    assert stopped.stopped_by and "401" in stopped.stopped_by
    assert stopped.by_status["succeeded"] == 0
    assert stopped.skipped_by_reason.get("stopped", 0) >= 25
    assert emulator.stats()["requests"] <= 2  # those in flight when it stopped, no more
    monkeypatch.setenv("IMGEDIT_API_KEY", "right-key")
    resumed = await run(manifest, tmp_path / "out", emulator)
    assert resumed.by_status["succeeded"] == 30 and resumed.stopped_by is None


async def test_s3_output_carries_actual_size_revised_prompt_and_cost(
    tmp_path: Path, sources: dict[str, Path], emulator: InProcessEmulator, moto_endpoint: str
) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="edits")
    rows = [
        {"id": f"r{i}", "images": str(sources["tall.png"]), "prompt": f"prompt {i}", "seed": i}
        for i in range(8)
    ]
    manifest = write_manifest(tmp_path / "m.csv", rows)
    summary = await run(manifest, "s3://edits/out", emulator, s3_endpoint_url=moto_endpoint)
    assert summary.results_uri.startswith("s3://edits/out/runs/")
    key = summary.results_uri.removeprefix("s3://edits/")
    table = pd.read_parquet(io.BytesIO(s3.get_object(Bucket="edits", Key=key)["Body"].read()))
    assert (table["status"] == "succeeded").all()
    assert (table["actual_size"] == "887x1182").all()
    assert table["cost"].sum() == pytest.approx(0.08)
    assert table["revised_prompt"].notna().any()
    for _, row in table.iterrows():
        sidecar_key = row["sidecar_uri"].removeprefix("s3://edits/")
        sidecar = json.loads(s3.get_object(Bucket="edits", Key=sidecar_key)["Body"].read())
        assert sidecar["actual_size"] == "887x1182"
        assert sidecar["cost"] == pytest.approx(0.01)
        assert sidecar["revised_prompt"] == (
            None if pd.isna(row["revised_prompt"]) else row["revised_prompt"]
        )
        out_key = row["output_uris"][0].removeprefix("s3://edits/")
        data = s3.get_object(Bucket="edits", Key=out_key)["Body"].read()
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (887, 1182)


def simple_rows(
    sources: dict[str, Path], count: int, image: str = "square.png"
) -> list[dict[str, Any]]:
    return [
        {"id": f"r{i}", "images": str(sources[image]), "prompt": f"p{i}", "seed": i}
        for i in range(count)
    ]


async def test_a_budget_stops_new_requests_and_a_later_run_continues(
    tmp_path: Path, sources: dict[str, Path], emulator: InProcessEmulator
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", simple_rows(sources, 20))
    capped = await run(manifest, tmp_path / "out", emulator, concurrency=3, max_cost_usd=0.05)
    assert emulator.stats()["charged_usd"] <= 0.05 + 1e-9
    assert capped.by_status["succeeded"] == 5
    assert capped.skipped_by_reason == {"budget": 15}
    assert capped.cost_usd == pytest.approx(0.05)
    rest = await run(manifest, tmp_path / "out", emulator)
    assert rest.by_status["succeeded"] == 15 and rest.skipped_by_reason == {"done": 5}
    assert emulator.stats()["charged_usd"] == pytest.approx(0.20)


async def test_only_the_failures_of_an_earlier_run_are_redone(
    tmp_path: Path, sources: dict[str, Path], emulator: InProcessEmulator
) -> None:
    manifest = write_manifest(tmp_path / "m.csv", simple_rows(sources, 30))
    emulator.configure(internal_error_rate=0.3, fault_seed=11)
    first = await run(manifest, tmp_path / "out", emulator, max_attempts=1)
    failed = first.by_status["failed"]
    assert 0 < failed < 30
    emulator.configure(internal_error_rate=0.0)
    emulator.reset()
    again = await run(manifest, tmp_path / "out", emulator, retry_failed_of=first.run_id)
    assert emulator.stats()["requests"] == failed
    assert again.by_status["succeeded"] == failed
    assert again.skipped_by_reason == {"not_selected": 30 - failed}
    before = set(results_of(first).query("status == 'failed'")["row"])
    after = set(results_of(again).query("status == 'succeeded'")["row"])
    assert before == after


async def test_a_dry_run_prices_the_run_and_proves_the_key_first(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: InProcessEmulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = simple_rows(sources, 4)
    rows[0]["n"] = 3
    manifest = write_manifest(tmp_path / "m.csv", rows)
    summary = await run(manifest, tmp_path / "out", emulator, dry_run_estimate=True)
    assert emulator.stats()["dry_runs"] == 1
    assert summary.estimated_cost_usd == pytest.approx(0.06)
    assert summary.cost_usd == pytest.approx(0.06)

    from pipeline.errors import AuthenticationError

    emulator.reset()
    emulator.configure(api_key="right")
    monkeypatch.setenv("IMGEDIT_API_KEY", "wrong")
    with pytest.raises(AuthenticationError):
        await run(manifest, tmp_path / "out2", emulator, dry_run_estimate=True)
    assert emulator.stats()["charged_usd"] == 0
