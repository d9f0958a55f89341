"""Security: hostile where strings, templates and params, internal addresses, allowed roots.

Every path a form or a manifest reaches: the CLI, the four flows and the engine. A hostile
`where` must be refused before any row is read and run nothing (a canary file is never
created); an http(s) source on an internal address is a row error whose server never sees
a request; a run outside IMGEDIT_ALLOWED_ROOTS fails before any API call.
"""

from __future__ import annotations

import csv
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest
from pipeline.errors import ConfigError, ManifestError, PathNotAllowedError
from pipeline.io.allowed_roots import ENV_ALLOWED_ROOTS, AllowedRoots
from pipeline.io.netguard import ENV_ALLOW_PRIVATE_SOURCES, source_policy
from pipeline.manifest.open import validate_manifest
from pipeline.uses.augment import fill_template
from tests.conftest import image_bytes

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
# Built from parts so nothing secret-shaped is committed; random enough to be a leak if seen.
CANARY_SECRET = "canary-" + "secret-" + os.urandom(6).hex()


def hostile_wheres(canary: Path) -> list[str]:
    touch = f"'touch {canary}'"
    return [
        f"seed.__class__.__init__.__globals__['sys'].modules['os'].system({touch}) == 0",
        f"__import__('os').system({touch}) == 0",
        f"prompt.format({touch}) == 1",
        "[x for x in seed] == []",
        "(lambda: 1)() == 1",
        "seed[0] == 1",
        "int(os.environ['IMGEDIT_API_KEY']) == 1",
        "open('/etc/passwd') == 1",
        "getattr(seed, 'x') == 1",
        "x" * 100_000 + " == 1",
        "(" * 200 + "seed > 1" + ")" * 200,
        "not " * 200 + "isnull(seed)",
        "seed ** 99999999 > 1",
    ]


class _ImageServer:
    """A real HTTP server on 127.0.0.1 serving one PNG; counts every request it receives."""

    def __init__(self) -> None:
        self.requests = 0
        png = image_bytes((64, 64), (10, 200, 10))
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/img.png"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def image_server() -> Iterator[_ImageServer]:
    server = _ImageServer()
    yield server
    server.close()


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


async def run(manifest: Path, output: Path, emu: EmulatorProcess, **kw: Any) -> pd.DataFrame:
    summary = await run_manifest(
        RunOptions(manifest=str(manifest), output=str(output), api_base=emu.base_url, **kw)
    )
    return pd.read_parquet(summary.results_uri).set_index("id")


# --- sources on internal addresses -------------------------------------------------------


async def test_a_loopback_source_is_a_row_error_and_its_server_sees_nothing(
    tmp_path: Path, emulator: EmulatorProcess, image_server: _ImageServer, sources: dict[str, Path]
) -> None:
    manifest = write_csv(
        tmp_path / "m.csv",
        ["id", "image", "prompt"],
        [["internal", image_server.url, "edit"], ["local", sources["square.png"], "edit"]],
    )
    results = await run(manifest, tmp_path / "out", emulator)
    bad = results.loc["internal"]
    assert bad["status"] == "invalid" and bad["error_column"] == "image"
    assert "row 1" in bad["error_message"] and "loopback address" in bad["error_message"]
    assert "--allow-private-sources" in bad["error_message"]
    assert results.loc["local", "status"] == "succeeded"
    assert image_server.requests == 0
    assert emulator.stats()["requests"] == 1  # only the good row was sent


async def test_the_opt_in_fetches_from_loopback(
    tmp_path: Path, emulator: EmulatorProcess, image_server: _ImageServer
) -> None:
    manifest = write_csv(tmp_path / "m.csv", ["image", "prompt"], [[image_server.url, "edit"]])
    results = await run(manifest, tmp_path / "out", emulator, allow_private_sources=True)
    assert list(results["status"]) == ["succeeded"]
    assert image_server.requests == 1


def test_the_worker_decides_whether_a_form_may_lift_the_address_rule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert not source_policy(False, {}).allow_private
    assert source_policy(True, {}).allow_private  # a laptop: the flag is enough
    assert source_policy(False, {ENV_ALLOW_PRIVATE_SOURCES: "1"}).allow_private
    locked = {ENV_ALLOWED_ROOTS: "/srv/imgedit"}
    assert not source_policy(True, locked).allow_private  # a locked-down worker ignores it
    assert "ignored" in caplog.text
    assert source_policy(True, {**locked, ENV_ALLOW_PRIVATE_SOURCES: "1"}).allow_private


# --- allowed roots -----------------------------------------------------------------------


def test_allowed_roots_follow_symlinks_and_whole_key_segments(tmp_path: Path) -> None:
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "escape").symlink_to(outside)
    roots = AllowedRoots.parse(f"{inside}, s3://bucket/team")
    assert roots.reason(str(inside / "a.csv")) is None
    assert roots.reason(f"file://{inside}/a.csv") is None
    assert roots.reason(str(inside / "escape" / "a.csv")) is not None
    assert roots.reason(str(inside / ".." / "outside" / "a.csv")) is not None
    assert roots.reason("s3://bucket/team/x.png") is None
    assert roots.reason("s3://bucket/team") is None
    assert roots.reason("s3://bucket/teammate/x.png") is not None
    assert roots.reason("s3://other/team/x.png") is not None
    assert roots.reason("https://example.com/x.png") is None  # addresses, not roots
    with pytest.raises(PathNotAllowedError, match="neither an absolute folder"):
        AllowedRoots.parse("relative/folder")
    assert AllowedRoots.from_env({}) is None


async def test_a_run_outside_the_allowed_roots_fails_before_any_api_call(
    tmp_path: Path,
    emulator: EmulatorProcess,
    sources: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    manifest = write_csv(allowed / "m.csv", ["image", "prompt"], [[sources["square.png"], "x"]])
    monkeypatch.setenv(ENV_ALLOWED_ROOTS, str(allowed))
    with pytest.raises(PathNotAllowedError, match=r"output .* is outside the allowed roots"):
        await run(manifest, tmp_path / "elsewhere", emulator)
    outside_manifest = write_csv(tmp_path / "m.csv", ["image", "prompt"], [["a.png", "x"]])
    with pytest.raises(PathNotAllowedError, match=r"manifest .* is outside the allowed roots"):
        await run(outside_manifest, allowed / "out", emulator)
    assert emulator.stats()["requests"] == 0
    # Inside: the manifest and output are fine, but its source (in tmp_path/src) is not.
    results = await run(manifest, allowed / "out", emulator)
    row = results.iloc[0]
    assert row["status"] == "invalid" and "outside the allowed roots" in row["error_message"]
    assert emulator.stats()["requests"] == 0


# --- templates and params ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("{c:>50000000}", "width 50000000 is over the limit"),
        ("{c:.99999999f}", "precision 99999999 is over the limit"),
        ("{c:" + "x" * 50 + "}", "invalid format"),
        ("{c}" * 51, "more than 50 fields"),
        ("x" * 5000 + "{c}", "the limit is 4000"),
        ("{c.__class__}", "is empty"),  # a field names a column whole: no attribute access
    ],
)
def test_prompt_templates_are_capped(template: str, match: str) -> None:
    with pytest.raises((ValueError, ConfigError, ManifestError), match=match):
        fill_template(template, {"c": "value"}, row=3)


def test_params_cells_are_capped(tmp_path: Path, sources: dict[str, Path]) -> None:
    image = str(sources["square.png"])
    rows = [
        [image, "p", '{"turbo": false}', ""],
        [image, "p", "[" * 5000 + "]" * 5000, ""],
        [image, "p", '{"a":' * 20 + "1" + "}" * 20, ""],
        [image, "p", '{"a": "' + "x" * 20_000 + '"}', ""],
        [image, "p", "{" + ",".join(f'"k{i}": 1' for i in range(100)) + "}", ""],
        [image, "p", "", "y" * 5000],
    ]
    manifest = write_csv(tmp_path / "m.csv", ["image", "prompt", "params", "param.x"], rows)
    report = validate_manifest(str(manifest))
    reasons = {e.row: " ".join(err.reason for err in e.errors) for e in report.errors}
    assert report.valid == 1
    assert "nests deeper than 8" in reasons[2] and "nests deeper than 8" in reasons[3]
    assert "the limit is 16384" in reasons[4]
    assert "100 members; the limit is 64" in reasons[5]
    assert "5000 characters; the limit is 4096" in reasons[6]


# --- secrets -----------------------------------------------------------------------------


def test_no_error_path_puts_an_environment_value_into_a_message(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    canary_file = tmp_path / "CANARY"
    png = tmp_path / "text.png"
    png.write_text("not an image")
    manifest = write_csv(
        tmp_path / "m.csv",
        ["image", "prompt", "params"],
        [
            [sources["square.png"], "x", ""],
            [str(png), "x", ""],
            ["http://169.254.169.254/latest/meta-data/", "x", ""],
            [sources["square.png"], "x", "{bad json"],
        ],
    )
    env = {
        **os.environ,
        "IMGEDIT_API_KEY": CANARY_SECRET,
        "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
        "IMGEDIT_CANARY": CANARY_SECRET,
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    outputs: list[str] = []
    for where in [
        *hostile_wheres(canary_file)[:9],
        "IMGEDIT_CANARY == 1",
        "int(IMGEDIT_API_KEY) == 1",
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", str(manifest), "--output",
             str(tmp_path / "out"), "--api-base", emulator.base_url, "--where", where,
             "--no-progress"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=180, check=False,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "where expression" in proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    # A run that goes through: a text file named .png, an internal URL, bad JSON.
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", str(manifest), "--output",
         str(tmp_path / "out"), "--api-base", emulator.base_url, "--no-progress"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    outputs.append(proc.stdout + proc.stderr)
    results = pd.read_parquet(next((tmp_path / "out" / "runs").glob("*/results.parquet")))
    outputs.append(results.to_csv())
    assert not canary_file.exists()
    for text in outputs:
        assert CANARY_SECRET not in text
