"""The Prefect UI shows a run's contact sheet: its markdown artifact's image, in Chromium.

A real `prefect server` (tests/prefect_stack.py) records an `edit-manifest` run of a tiny
manifest against the emulator; Debian's Chromium, driven by Playwright, goes from the run's
page to its Artifacts tab and on to the contact sheet's page, where the embedded JPEG must
load. Prefect 3.8 serves two UIs, both checked: V1 (the run links Prefect prints,
`/runs/flow-run/<id>`) and V2 (`/v2/...`, where the server's root leads). Neither renders
artifacts on the run's tab itself, only a card per artifact that leads to its page.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import httpx
import pytest

from flows.artifacts import CONTACT_SHEET_ARTIFACT_KEY
from pipeline.emulator.process import EmulatorProcess
from tests.prefect_stack import ROOT, PrefectStack, collecting_leaks, prefect_stack

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
SHEET_IMG = "img[src^='data:image']"
UI_STEP_TIMEOUT_MS = 60_000
# The flow, run as a script would run it: its own process, the stack's PREFECT_API_URL.
RUN_FLOW = """
import asyncio, json, sys
from flows.edit_manifest import edit_manifest
state = asyncio.run(edit_manifest(
    manifest=sys.argv[1], output=sys.argv[2], api_base=sys.argv[3], api_limit=None,
    return_state=True,
))
print(json.dumps({"flow_run_id": str(state.state_details.flow_run_id), "type": state.type.value}))
"""

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed"),
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _collect_leaks() -> Iterator[None]:
    with collecting_leaks():
        yield


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[PrefectStack]:
    with prefect_stack(tmp_path) as s:
        yield s


def run_flow(stack: PrefectStack, manifest: Path, output: Path, api_base: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", RUN_FLOW, str(manifest), str(output), api_base],
        env=stack.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


async def follow(page: Page, link: Locator) -> None:
    """Open the page `link` points to. Read and opened rather than clicked: artifact cards
    arrive in any order and move as they do, so a click can land on a neighbour."""
    await link.wait_for()
    href = await link.get_attribute("href")
    assert href, await link.evaluate("a => a.outerHTML")
    await page.goto(urljoin(page.url, href))


async def open_contact_sheet(page: Page, run_url: str) -> str:
    """From the run's page, by its links, to its contact sheet artifact's page; its URL."""
    await page.goto(run_url)
    await page.get_by_role("tablist").get_by_text("Artifacts", exact=True).click()
    card = page.locator("a[href*='/artifacts/']").filter(has_text=CONTACT_SHEET_ARTIFACT_KEY)
    await follow(page, card.first)
    if "/artifacts/key/" in page.url:  # V2: the key's page lists its versions, newest first
        await follow(page, page.locator("a[href*='/artifacts/artifact/']").first)
    return page.url


async def sheet_width(page: Page) -> int:
    """The natural width of the page's data-URI image once the browser is done with it (0 if
    it could not decode it). Asked afresh each time: the UI may render the markdown again."""
    await page.locator(SHEET_IMG).wait_for()
    done = await page.wait_for_function(
        f"""() => {{
            const img = document.querySelector({json.dumps(SHEET_IMG)});
            return img !== null && img.complete ? {{ width: img.naturalWidth }} : null;
        }}"""
    )
    width: int = (await done.json_value())["width"]
    return width


async def test_the_run_page_leads_to_the_contact_sheet_image(
    tmp_path: Path, sources: dict[str, Path], stack: PrefectStack, emulator: EmulatorProcess
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,image,prompt,seed\n"
        + "".join(
            f"{name.split('.')[0]},{sources[name]},make it a night scene,{i}\n"
            for i, name in enumerate(("square.png", "wide.jpg", "tall.png"), 1)
        )
    )
    output = tmp_path / "out"
    ran = run_flow(stack, manifest, output, emulator.base_url)
    assert ran["type"] == "COMPLETED", ran
    run_id = ran["flow_run_id"]

    with httpx.Client(base_url=stack.api_url, timeout=10) as api:
        found = api.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}
        ).json()
    (artifact,) = [a for a in found if a["key"] == CONTACT_SHEET_ARTIFACT_KEY]
    assert artifact["type"] == "markdown"
    markdown = artifact["data"]
    (sheet,) = output.glob("runs/*/contact-sheet.png")
    assert markdown.count("](data:image/jpeg;base64,") == 1
    assert f"`{sheet}`" in markdown  # the full sheet's path, as text
    assert "all 3 succeeded rows" in markdown

    ui = stack.api_url.removesuffix("/api")
    widths = {}
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1200})
            # ~20 s in all on an idle machine; the UI's first render can take far longer on
            # two cores shared with other work, which should not fail the test.
            page.set_default_timeout(UI_STEP_TIMEOUT_MS)
            console: list[str] = []  # kept beside the screenshot when something fails
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"page error: {e}"))
            page.on("crash", lambda _: console.append("the page crashed"))
            page.on("requestfailed", lambda r: console.append(f"failed: {r.method} {r.url}"))
            page.on(
                "response",
                lambda r: (
                    console.append(f"HTTP {r.status}: {r.request.method} {r.url}")
                    if r.status >= 400
                    else None
                ),
            )
            try:
                for name, base in (("v1", ui), ("v2", f"{ui}/v2")):
                    url = await open_contact_sheet(page, f"{base}/runs/flow-run/{run_id}")
                    assert artifact["id"] in url
                    widths[name] = await sheet_width(page)
                    shot = tmp_path / f"ui-contact-sheet-{name}.png"
                    await page.screenshot(path=str(shot), full_page=True)
            except Exception as exc:
                console[:0] = [page.url, f"{type(exc).__name__}: {exc}"]
                (tmp_path / "ui-console.txt").write_text("\n".join(console))
                await page.screenshot(path=str(tmp_path / "ui-failure.png"), full_page=True)
                raise
        finally:
            await browser.close()
    assert widths["v1"] > 0 and widths["v2"] > 0, widths
