"""`imgedit serve`: the read-only page over a real output, in Debian's Chromium and over httpx.

The output is made by the engine against the emulator: 53 rows edited (one prompt is
`<script>alert(1)</script>`), one row whose source file is missing and one whose source is an
http URL on loopback (refused by the engine; the page must only link to it). The app runs in
uvicorn on a free loopback port in a thread of this process.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.serve import create_app, make_server
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.engine.summary import RunSummary
from pipeline.io.storage import LocalStorage

# Tests that start servers (the emulator, uvicorn, moto) are marked `integration`.
integration = pytest.mark.integration

CHROMIUM = os.environ.get("IMGEDIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
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
RUN = "gallery-run"
EDITED = 52
SCRIPT_PROMPT = "<script>alert(1)</script>"
SCRIPT_ROW = EDITED + 1
PAGE = 50


class _Recorder(BaseHTTPRequestHandler):
    """An http source host that counts what reached it (nothing should)."""

    hits: list[str] = []  # noqa: RUF012 - shared on purpose, read by the tests

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, "PNG")
        self.wfile.write(buf.getvalue())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Site:
    url: str
    output: Path
    summary: RunSummary
    results: list[dict[str, Any]]
    remote: str


@pytest.fixture(scope="module")
def recorder() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def build_output(folder: Path, emu: EmulatorProcess, remote: str) -> RunSummary:
    colours = [(200, 40, 40), (40, 160, 60), (40, 60, 200)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (96, 64), colour).save(folder / f"s{i}.png")
    rows = [["id", "image", "prompt", "seed"]]
    rows += [
        [f"r{i}", str(folder / f"s{i % 3}.png"), f"a starry sky, take {i}", str(i)]
        for i in range(1, EDITED + 1)
    ]
    rows.append(["scripted", str(folder / "s0.png"), SCRIPT_PROMPT, "999"])
    rows.append(["missing", str(folder / "missing.png"), "sky", "1"])
    rows.append(["remote", remote, "sky", "2"])
    manifest = folder / "m.csv"
    with manifest.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    emu.reset()
    opts = RunOptions(
        manifest=str(manifest),
        output=str(folder / "out"),
        api_base=emu.base_url,
        concurrency=8,
        run_id=RUN,
    )
    return asyncio.run(run_manifest(opts))


@pytest.fixture(scope="module")
def site(
    tmp_path_factory: pytest.TempPathFactory,
    emulator_process: EmulatorProcess,
    recorder: ThreadingHTTPServer,
) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("serve")
    remote = f"http://127.0.0.1:{recorder.server_address[1]}/remote.png"
    summary = build_output(folder, emulator_process, remote)
    assert summary.by_status["succeeded"] == EDITED + 1, summary.by_status
    results = pq.read_table(summary.results_uri).to_pylist()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(create_app(LocalStorage(folder / "out")), "127.0.0.1", port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        yield Site(f"http://127.0.0.1:{port}", folder / "out", summary, results, remote)
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


@pytest.fixture
def http(site: Site) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=site.url, timeout=30) as client:
        yield client


# --- in the browser -----------------------------------------------------------------------------


@integration
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
async def test_runs_gallery_filter_and_thumbnails_in_chromium(site: Site, tmp_path: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    dialogs: list[str] = []
    requested: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("dialog", lambda d: dialogs.append(d.message))
            page.on("request", lambda r: requested.append(r.url))
            try:
                await page.goto(f"{site.url}/")
                runs = page.locator("tr.run")
                assert await runs.count() == 1
                assert await runs.first.get_attribute("data-run") == RUN
                assert "rows failed" in (await runs.first.inner_text())
                await page.get_by_role("link", name=RUN, exact=True).click()
                await page.wait_for_url(f"**/runs/{RUN}")
                gallery = page.locator("table.gallery tbody tr")
                assert await gallery.count() == PAGE
                assert "page 1 of 2" in await page.locator(".pager").first.inner_text()
                # Every row of page 1 was edited: its result and source thumbnails load.
                sizes = await page.evaluate(
                    "Array.from(document.querySelectorAll('img.result, img.source'))"
                    ".map(i => [i.className, i.complete, i.naturalWidth, i.naturalHeight])"
                )
                assert len(sizes) == 2 * PAGE
                for kind, complete, width, height in sizes:
                    assert complete and 0 < width <= 256 and 0 < height <= 256, kind
                shot = tmp_path / "gallery.png"
                await page.screenshot(path=str(shot))
                # The status filter: only the invalid rows.
                await page.locator(".filters a", has_text="invalid").click()
                await page.wait_for_url("**status=invalid**")
                assert await gallery.count() == 2
                assert set(
                    await page.locator("tr.row").evaluate_all(
                        "rows => rows.map(r => r.dataset.row)"
                    )
                ) == {str(SCRIPT_ROW + 1), str(SCRIPT_ROW + 2)}
                assert await page.locator("img.result").count() == 0
                missing = page.locator(f'tr[data-row="{SCRIPT_ROW + 1}"] td.img').first
                assert await missing.inner_text() == "missing"
                remote = page.locator("a.remote")
                assert await remote.get_attribute("href") == site.remote
                # Succeeded, page 2: the last three, the scripted prompt shown as text.
                await page.locator(".filters a", has_text="succeeded").click()
                await page.wait_for_url("**status=succeeded**")
                await page.get_by_role("link", name="next").first.click()
                await page.wait_for_url("**page=2**")
                assert await gallery.count() == EDITED + 1 - PAGE
                cell = page.locator(f'tr[data-row="{SCRIPT_ROW}"] td.prompt')
                assert await cell.inner_text() == SCRIPT_PROMPT
            except Exception:
                await page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                raise
        finally:
            await browser.close()
    assert dialogs == []
    # Nothing but this server was asked for anything: no CDN, no http source.
    assert requested and all(url.startswith(site.url + "/") for url in requested), requested
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    with Image.open(shot) as im:
        assert im.size == (1400, 1000)


# --- over plain HTTP ----------------------------------------------------------------------------


def result_keys(site: Site) -> list[str]:
    keys = []
    for r in site.results:
        for uri in r["output_uris"] or ():
            keys.append(Path(uri).relative_to(site.output).as_posix())
    return keys


@integration
def test_result_images_are_served_as_thumbnails_or_whole(site: Site, http: httpx.Client) -> None:
    key = result_keys(site)[0]
    thumb = http.get("/image", params={"key": key})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.format == "JPEG" and max(im.size) <= 256
    whole = http.get("/image", params={"key": key, "full": 1})
    assert whole.status_code == 200 and whole.content == (site.output / key).read_bytes()
    assert whole.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "images/../../../etc/passwd",
        "images/ab/../../runs/" + RUN + "/summary.json",
        "..%2F..%2Fetc%2Fpasswd",
        "runs/" + RUN + "/summary.json",
        "runs/" + RUN + "/results.parquet",
        "index/root.json",
        "images\\ab\\x.png",
        "images/ab/" + "0" * 32 + "-0.png",  # the right shape, not there
        "",
    ],
)
@integration
def test_image_route_serves_nothing_but_result_images(http: httpx.Client, key: str) -> None:
    assert http.get("/image", params={"key": key}).status_code == 404
    assert http.get("/image", params={"key": key, "full": 1}).status_code == 404


@integration
def test_job_sidecars_are_not_served(site: Site, http: httpx.Client) -> None:
    sidecars = sorted(site.output.glob("jobs/*/*.json"))
    assert sidecars
    for path in sidecars[:3]:
        key = path.relative_to(site.output).as_posix()
        assert http.get("/image", params={"key": key}).status_code == 404
        assert http.get("/image", params={"key": key, "full": 1}).status_code == 404
    assert http.get(f"/{sidecars[0].relative_to(site.output).as_posix()}").status_code == 404


@integration
def test_sources_are_local_files_only_and_http_sources_are_never_fetched(
    site: Site, http: httpx.Client, recorder: ThreadingHTTPServer
) -> None:
    ok = http.get("/source", params={"run": RUN, "row": 1})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/jpeg"
    remote_row = SCRIPT_ROW + 2
    assert http.get("/source", params={"run": RUN, "row": remote_row}).status_code == 404
    assert _Recorder.hits == []
    for params in (
        {"run": RUN, "row": 10_000},
        {"run": "../../etc", "row": 1},
        {"run": "no-such-run", "row": 1},
        {"run": RUN, "row": SCRIPT_ROW + 1},  # its file is missing
    ):
        assert http.get("/source", params=params).status_code == 404, params


@integration
def test_user_strings_are_escaped(site: Site, http: httpx.Client) -> None:
    page = http.get(f"/runs/{RUN}", params={"status": "succeeded", "page": 2})
    assert page.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "<script" not in page.text.lower()
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp


@integration
def test_pages_and_filters_over_http(site: Site, http: httpx.Client) -> None:
    index = http.get("/")
    assert index.status_code == 200 and f'data-run="{RUN}"' in index.text
    counts = {
        None: EDITED + 3,
        "succeeded": EDITED + 1,
        "invalid": 2,
        "failed": 0,
    }
    for status, total in counts.items():
        rows: list[str] = []
        for page_number in (1, 2):
            page = http.get(f"/runs/{RUN}", params={"status": status, "page": page_number})
            assert page.status_code == 200
            rows += re.findall(r'<tr class="row status-[a-z]+" data-row="(\d+)"', page.text)
        assert len(set(rows)) == total, status
    assert http.get(f"/runs/{RUN}", params={"status": "bogus"}).status_code == 400
    assert http.get("/runs/no-such-run").status_code == 404
    # (httpx itself resolves a literal `/runs/..`; these reach the server as they are.)
    for path in ("/runs/%2e%2e", "/runs/%2e%2e%2fetc", "/runs/.hidden", "/runs/a%00b"):
        assert http.get(path).status_code == 404, path


@integration
def test_only_get_and_only_this_host(site: Site, http: httpx.Client) -> None:
    assert http.post("/").status_code == 405
    assert http.delete(f"/runs/{RUN}").status_code == 405
    # A page elsewhere that rebinds its DNS name to 127.0.0.1 names itself in Host.
    assert http.get("/", headers={"host": "attacker.example"}).status_code == 400
    assert http.get("/", headers={"host": "localhost:1234"}).status_code == 200
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert http.get(path).status_code == 404


# --- an S3 output -------------------------------------------------------------------------------


@integration
def test_an_s3_output_shows_sources_of_its_own_bucket_only(
    tmp_path: Path, emulator: EmulatorProcess, moto_endpoint: str
) -> None:
    import boto3
    from fastapi.testclient import TestClient

    from pipeline.uses.run_history import image_key_of_uri, open_output

    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    for bucket in ("edits", "other"):
        s3.create_bucket(Bucket=bucket)
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (10, 200, 90)).save(buf, "PNG")
    s3.put_object(Bucket="edits", Key="src/a.png", Body=buf.getvalue())
    s3.put_object(Bucket="other", Key="b.png", Body=buf.getvalue())
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,image,prompt,seed\nown,s3://edits/src/a.png,p,1\nforeign,s3://other/b.png,p,2\n"
    )
    output = "s3://edits/out"
    opts = RunOptions(
        manifest=str(manifest),
        output=output,
        api_base=emulator.base_url,
        run_id="s3-run",
        s3_endpoint_url=moto_endpoint,
    )
    summary = asyncio.run(run_manifest(opts))
    assert summary.by_status["succeeded"] == 2, summary.by_status
    storage = open_output(output, endpoint_url=moto_endpoint)
    app = create_app(storage, endpoint_url=moto_endpoint)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        page = client.get("/runs/s3-run")
        assert page.status_code == 200
        assert page.text.count("<img class=source") == 1
        assert page.text.count("<img class=result") == 2
        assert 'title="s3://other/b.png">not shown</span>' in page.text
        own = client.get("/source", params={"run": "s3-run", "row": 1})
        assert own.status_code == 200 and own.headers["content-type"] == "image/jpeg"
        assert client.get("/source", params={"run": "s3-run", "row": 2}).status_code == 404
        for row in pq.read_table(
            pa.BufferReader(storage.get_bytes("runs/s3-run/results.parquet"))
        ).to_pylist():
            key = image_key_of_uri(row["output_uris"][0])
            assert key is not None
            assert client.get("/image", params={"key": key}).status_code == 200


def test_the_source_policy(tmp_path: Path) -> None:
    from flows.serve import OutputSite

    site = OutputSite(LocalStorage(tmp_path))
    picture = tmp_path / "a.png"
    Image.new("RGB", (300, 200), (1, 2, 3)).save(picture)
    assert site.source_allowed(str(picture)) and site.source_present(str(picture))
    with Image.open(io.BytesIO(site.source_thumbnail(picture.as_uri()))) as im:
        assert im.format == "JPEG" and im.size == (256, 171)
    for uri in (
        "http://127.0.0.1/a.png",
        "https://example.com/a.png",
        "s3://any-bucket/a.png",  # a local output has no bucket of its own
        "relative/a.png",
        "",
    ):
        assert not site.source_allowed(uri), uri
    # Allowed, but not regular files: never read (a device would be read forever).
    for uri in ("/dev/zero", "/dev/urandom", str(tmp_path), str(tmp_path / "missing.png")):
        assert not site.source_present(uri), uri
        with pytest.raises(ValueError):
            site.source_thumbnail(uri)
