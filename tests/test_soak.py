"""Fault soak in CI: a few hundred rows through 20-30% injected faults lose, double and mis-bill
nothing; untrusted answers (a result URL on a foreign plain-http host) fail a row, not the run.

The same soak runs longer locally: `python -m benchmarks.soak --rows 5000`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.soak import MIN_TOTAL_FAULT_RATE, SoakConfig, soak
from pipeline.emulator.config import DEFAULT_RETRY_AFTER_S, DEFAULT_SLOW_S
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest

pytestmark = [pytest.mark.integration, pytest.mark.soak]

CI_ROWS = 300


@pytest.fixture(autouse=True)
def restore_emulator(emulator: EmulatorProcess) -> Iterator[None]:
    """Put back the settings the conftest fixture does not reset, for the tests that follow."""
    yield
    emulator.configure(
        retry_after=DEFAULT_RETRY_AFTER_S, slow_seconds=DEFAULT_SLOW_S, public_base_url=None
    )


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
async def test_a_faulty_api_loses_doubles_and_misbills_nothing(
    tmp_path: Path, emulator: EmulatorProcess, response_format: str
) -> None:
    config = SoakConfig(rows=CI_ROWS, response_format=response_format)  # type: ignore[arg-type]
    assert config.total_fault_rate >= MIN_TOTAL_FAULT_RATE

    report = await soak(emulator, tmp_path, config)

    assert report.ok, report.text()
    # The headline invariants, spelled out (soak() checks these and more).
    results = report.results
    assert len(results) == CI_ROWS and results["id"].is_unique
    assert (results["status"] == "succeeded").all()
    stats = report.stats
    faulted = sum(stats["faults"].values())
    assert faulted / stats["requests"] >= MIN_TOTAL_FAULT_RATE, stats["faults"]
    kinds = set(stats["faults"])
    assert {"rate_limited", "internal_error", "providers_exhausted", "dropped", "slow"} <= kinds
    assert any(k.startswith("malformed_") for k in kinds)
    if response_format == "url":
        assert stats["downloads_truncated"] > 0
    summary = report.summary
    assert stats["charged_usd"] == pytest.approx(
        summary.cost_usd + summary.possible_double_charge_usd, abs=1e-9
    )
    assert summary.possible_double_charges > 0


async def test_a_result_url_on_a_foreign_plain_http_host_fails_the_row_not_the_run(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    # The answer points the client at http://127.0.0.2:9/...: not https and not the API's own
    # origin, so it must not be fetched (nor the key sent there).
    emulator.configure(public_base_url="http://127.0.0.2:9")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,image,prompt,seed\n"
        + "".join(f"r{i},{sources['square.png']},p{i},{i}\n" for i in range(3))
    )
    summary = await run_manifest(
        RunOptions(
            manifest=str(manifest),
            output=str(tmp_path / "out"),
            api_base=emulator.base_url,
            response_format="url",
            max_attempts=3,
        )
    )
    results = pd.read_parquet(summary.results_uri)
    assert list(results["status"]) == ["failed"] * 3
    assert results["error_message"].str.contains("refusing to download").all()
    # Refused at once, not retried: the same request would be charged again for the same URL.
    assert list(results["attempts"]) == [1, 1, 1]
    stats = emulator.stats()
    assert stats["downloads"] == 0
    # Each edit was charged and its result is unusable: all three reported, none hidden.
    assert summary.possible_double_charges == 3
    assert stats["charged_usd"] == pytest.approx(
        summary.cost_usd + summary.possible_double_charge_usd, abs=1e-9
    )
    assert not list((tmp_path / "out").glob("jobs/**/*.json"))
