"""The Prefect UI: a `backfill` run started from its deployment's form, in headless Chromium.

Debian's Chromium is driven by Playwright (no browser download); the server is a real
`prefect server` set up by infra/setup.sh, with one process worker and the emulator as the API.
"""

from __future__ import annotations

import asyncio
import csv
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pandas as pd
import pytest

from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.results import SKIP_NOT_SELECTED
from tests.prefect_stack import PrefectStack, collecting_leaks, prefect_stack

if TYPE_CHECKING:
    from playwright.async_api import Locator, Page

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = os.environ.get("IMGEDIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Headless and offline: nothing of Chromium's own may try to reach beyond loopback.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ROWS = 6
WHERE = "seed >= 4 and prompt != 'skip me'"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
CHOSEN = {"r4", "r6"}  # r5's prompt is "skip me"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _collect_leaks() -> Iterator[None]:
    with collecting_leaks():
        yield


@pytest.fixture
def stack(tmp_path: Path, emulator: EmulatorProcess) -> Iterator[PrefectStack]:
    # Workers find the API in their environment, as in production (infra/.env.example).
    with prefect_stack(tmp_path, {"IMGEDIT_API_BASE": emulator.base_url}) as s:
        yield s


@pytest.fixture
def api(stack: PrefectStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, timeout=10) as client:
        yield client


def write_manifest(path: Path, sources: dict[str, Path]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "prompt", "seed", "output_format"])
        for i in range(1, ROWS + 1):
            prompt = "skip me" if i == 5 else f"a starry sky, take {i}"
            w.writerow([f"r{i}", sources["square.png" if i % 2 else "wide.jpg"], prompt, i, "jpeg"])


def field(page: Page, label: str) -> Locator:
    """The form's block for one parameter, found by its visible label."""
    title = page.locator(".schema-form-property__label").filter(
        has_text=re.compile(rf"^\s*{re.escape(label)}\s*$")
    )
    return page.locator(".schema-form-property").filter(has=title).last


async def wait_for_end(api: httpx.Client, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        run: dict[str, Any] = api.get(f"/flow_runs/{run_id}").json()
        if run["state"]["type"] in FINAL_STATES:
            return run
        await asyncio.sleep(1)
    raise AssertionError(f"flow run {run_id} did not end in 300 s: {run['state']}")


async def test_a_backfill_started_from_the_ui_form_edits_only_the_chosen_rows(
    tmp_path: Path,
    sources: dict[str, Path],
    stack: PrefectStack,
    api: httpx.Client,
    emulator: EmulatorProcess,
) -> None:
    manifest = tmp_path / "catalogue.csv"
    write_manifest(manifest, sources)
    output = tmp_path / "out"
    stack.setup(api_limit=4)
    stack.start_worker("ui", "imgedit")
    deployment = api.get("/deployments/name/backfill/backfill").json()
    ui = stack.api_url.removesuffix("/api")

    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 2000})
            try:
                await page.goto(f"{ui}/deployments/deployment/{deployment['id']}/run")
                await field(page, "manifest").locator("textarea, input").first.fill(str(manifest))
                await field(page, "output").locator("textarea, input").first.fill(str(output))
                where = field(page, "where (Optional)")
                await where.get_by_role("button", name="str", exact=True).click()
                await where.locator("textarea, input").first.fill(WHERE)
                # The form explains each field (from the flow's docstring); the UI renders
                # descriptions as markdown a moment after the field itself.
                description = where.locator(".schema-form-property__description")
                await description.filter(has_text="not Python").wait_for(timeout=30_000)
                # A field of the nested `run` settings model.
                await field(page, "Concurrency (Optional)").locator("input").fill("3")
                await page.get_by_role("button", name="Submit", exact=True).click()
                # The UI goes back to the deployment, which lists the new run: open it.
                await page.locator("a[href*='/runs/flow-run/']").first.click(timeout=60_000)
                await page.wait_for_url(re.compile(r"/runs/flow-run/[0-9a-f-]{36}"), timeout=30_000)
                run_id = page.url.rstrip("/").rsplit("/", 1)[-1]
                run = await wait_for_end(api, run_id)
                # The run's page shows where it ended, as a user watching it would see.
                await page.reload()
                badge = page.locator(".page-heading-flow-run .state-badge")
                await badge.filter(has_text=run["state"]["name"]).wait_for(timeout=60_000)
            except Exception:
                await page.screenshot(path=str(tmp_path / "ui-failure.png"), full_page=True)
                raise
        finally:
            await browser.close()

    assert run["state"]["type"] == "COMPLETED", (run["state"], stack.log_text("ui")[-3000:])
    assert run["deployment_id"] == deployment["id"]
    # What the form sent is what the run got.
    assert run["parameters"]["manifest"] == str(manifest)
    assert run["parameters"]["output"] == str(output)
    assert run["parameters"]["where"] == WHERE
    assert run["parameters"]["run"]["concurrency"] == 3
    (results_file,) = output.glob("runs/*/results.parquet")
    table = pd.read_parquet(results_file).set_index("id")
    assert len(table) == ROWS
    done = table[table["status"] == "succeeded"]
    assert set(done.index) == CHOSEN
    others = table.drop(index=list(CHOSEN))
    assert (others["status"] == "skipped").all()
    assert (others["reason"] == SKIP_NOT_SELECTED).all()
    assert emulator.stats()["requests"] == len(CHOSEN)
    for row_id, row in done.iterrows():
        assert row["seed"] == int(str(row_id)[1:])
        (uri,) = row["output_uris"]
        assert Path(str(uri)).is_file()
