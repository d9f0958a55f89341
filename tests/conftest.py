"""Shared fixtures: offline Prefect settings, the emulator on loopback, sample images, fake AWS."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Before anything imports prefect: no network here, and no state left in ~/.prefect.
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="imgedit-prefect-home-"))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
for _name in ("IMGEDIT_API_BASE", "IMGEDIT_API_KEY", "LUMENFALL_API_KEY", "IMGEDIT_MODEL"):
    os.environ.pop(_name, None)

from PIL import Image  # noqa: E402

from pipeline.emulator.config import DEFAULT_RETRY_AFTER_S, DEFAULT_SLOW_S  # noqa: E402
from pipeline.emulator.process import EmulatorProcess  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (SQLite) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(autouse=True)
def _collect_prefect_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Collect garbage after each test on the Prefect harness, under that test's marks.

    Prefect 3.8's client leaves a socket unclosed; collected during a later module's test,
    it would fail that test outside the filterwarnings marks that excuse it.
    """
    yield
    if "prefect_harness" in request.fixturenames:
        gc.collect()


@pytest.fixture(scope="session")
def emulator_process() -> Iterator[EmulatorProcess]:
    with EmulatorProcess() as emu:
        yield emu


@pytest.fixture
def emulator(emulator_process: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The session's emulator, with its ledger cleared and its faults off for this test."""
    emulator_process.reset()
    emulator_process.configure(**DEFAULT_EMULATOR_CONFIG)
    yield emulator_process
    emulator_process.configure(**DEFAULT_EMULATOR_CONFIG)


DEFAULT_EMULATOR_CONFIG: dict[str, object] = {
    "latency": 0.0,
    "latency_jitter": 0.0,
    "fault_seed": 0,
    "rate_limited_rate": 0.0,
    "internal_error_rate": 0.0,
    "exhausted_rate": 0.0,
    "drop_rate": 0.0,
    "slow_rate": 0.0,
    "malformed_rate": 0.0,
    "truncate_rate": 0.0,
    "api_key": None,
    "balance_usd": None,
    "retry_after": DEFAULT_RETRY_AFTER_S,
    "slow_seconds": DEFAULT_SLOW_S,
    "public_base_url": None,
}


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials so boto3 never looks for real ones."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def served_moto() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port), as its endpoint URL, stopped after."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def moto_endpoint(aws_credentials: None) -> Iterator[str]:
    """moto's S3 server for one test: a real endpoint (`endpoint_url`)."""
    with served_moto() as endpoint:
        yield endpoint


def image_bytes(
    size: tuple[int, int] = (64, 48),
    colour: tuple[int, int, int] = (200, 120, 40),
    fmt: str = "PNG",
) -> bytes:
    buf = io.BytesIO()
    mode = "RGBA" if fmt == "PNG" and len(colour) == 4 else "RGB"
    Image.new(mode, size, colour).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, Path]:
    """A few small source images on disk, of different shapes and formats."""
    files = {
        "square.png": image_bytes((64, 64), (200, 30, 30)),
        "wide.jpg": image_bytes((96, 54), (30, 160, 40), "JPEG"),
        "tall.png": image_bytes((48, 64), (30, 30, 200)),
        "ref.webp": image_bytes((40, 40), (220, 220, 20), "WEBP"),
    }
    out = {}
    for name, data in files.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out[name] = path
    return out
