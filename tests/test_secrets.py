"""No secret leaks: a whole Prefect flow run (S3 in and out, retries, bad rows, a 401) with
sentinel credentials, then every output object, log line, artifact and run record searched.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import pytest
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError
from prefect.logging.handlers import APILogHandler

from flows.edit_manifest import edit_manifest
from pipeline.emulator.process import EmulatorProcess
from tests.conftest import served_moto

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("prefect_harness"),  # the session's temporary Prefect server
    # Prefect 3.8's run engine leaves one client socket to its own API server unclosed.
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

# Distinctive enough that a hit can only be a leak, random so no fixture could hard-code it.
API_KEY = "sk-imgedit-SENTINEL-" + secrets.token_hex(12)
AWS_KEY_ID = "AKIASENTINEL" + secrets.token_hex(4).upper()
AWS_SECRET = "aws-secret-SENTINEL/" + secrets.token_hex(12)
AWS_TOKEN = "aws-token-SENTINEL+" + secrets.token_hex(12)
SECRETS = (API_KEY, AWS_SECRET, AWS_TOKEN)
ROWS = 8


def encodings(secret: str) -> list[bytes]:
    """The forms a leaked secret could take in bytes: plain, URL-quoted, base64, JSON-escaped."""
    raw = secret.encode()
    return [
        raw,
        quote(secret, safe="").encode(),
        base64.b64encode(raw),
        json.dumps(secret).encode()[1:-1],
    ]


def assert_clean(where: str, data: str | bytes) -> None:
    blob = data.encode("utf-8", "replace") if isinstance(data, str) else data
    for secret in SECRETS:
        for form in encodings(secret):
            assert form not in blob, f"a secret ({secret[:14]}...) leaked into {where}"


@pytest.fixture
def sentinel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGEDIT_API_KEY", API_KEY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "LUMENFALL_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@dataclass
class S3:
    endpoint: str
    client: Any
    bucket: str


@pytest.fixture
def s3(sentinel_env: None) -> Iterator[S3]:
    with served_moto() as endpoint:
        client = boto3.client("s3", endpoint_url=endpoint)
        # moto keeps its state per process, across servers: a fresh bucket for each test.
        bucket = "edits-" + secrets.token_hex(4)
        client.create_bucket(Bucket=bucket)
        try:
            yield S3(endpoint, client, bucket)
        finally:
            client.close()


class _InRunOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            get_run_context()
        except MissingContextError:
            return False
        return True


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything at INFO, our own code and Prefect's at DEBUG, pipeline logs sent to the API.

    Third-party libraries stay at INFO: botocore's DEBUG output prints request headers (the
    session token among them) by design, and no run configures it.
    """
    caplog.set_level(logging.INFO)
    for name in ("pipeline", "flows", "prefect"):
        caplog.set_level(logging.DEBUG, logger=name)
    # As a deployment with PREFECT_LOGGING_EXTRA_LOGGERS=pipeline would.
    api = APILogHandler()
    api.addFilter(_InRunOnly())
    logger = logging.getLogger("pipeline")
    logger.addHandler(api)
    try:
        yield caplog
    finally:
        logger.removeHandler(api)


def png_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def put_manifest(s3: S3) -> str:
    """Sources and manifest on S3: good rows, an invalid one, one whose source is missing."""
    s3.client.put_object(Bucket=s3.bucket, Key="in/a.png", Body=png_bytes())
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "image", "prompt", "seed"])
    for i in range(ROWS):
        writer.writerow([f"r{i}", "a.png", f"edit {i}", i])  # relative: beside the manifest
    writer.writerow(["bad-seed", "a.png", "edit", "x"])
    writer.writerow(["gone", f"s3://{s3.bucket}/in/gone.png", "edit", 99])
    s3.client.put_object(Bucket=s3.bucket, Key="in/manifest.csv", Body=buf.getvalue().encode())
    return f"s3://{s3.bucket}/in/manifest.csv"


@dataclass
class Searched:
    objects: int
    logs: int
    artifacts: int


async def search_everything(
    flow_run_id: Any, s3: S3, caplog: pytest.LogCaptureFixture, capfd: Any, emu: Any
) -> Searched:
    # Every object the run wrote, byte for byte (results, summary, sidecars, parts, images).
    listed = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="out/").get("Contents", [])
    for obj in listed:
        body = s3.client.get_object(Bucket=s3.bucket, Key=obj["Key"])["Body"].read()
        assert_clean(f"s3://{s3.bucket}/{obj['Key']}", body)
        assert_clean("an object key", obj["Key"])

    # The flow run's logs, artifacts, parameters, state and task runs, from the Prefect API.
    await APILogHandler.aflush()
    async with get_client() as prefect:
        logs = await prefect.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
        artifacts = await prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        flow_run = await prefect.read_flow_run(flow_run_id)
        task_runs = await prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    for log in logs:
        assert_clean(f"Prefect log {log.name}", log.message)
    for artifact in artifacts:
        assert_clean(f"artifact {artifact.key}", artifact.model_dump_json())
    assert_clean("the flow run record", flow_run.model_dump_json())
    for task_run in task_runs:
        assert_clean(f"task run {task_run.name}", task_run.model_dump_json())

    # This process's log records and everything printed, the emulator's included.
    for record in caplog.records:
        assert_clean(f"log record {record.name}", record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            assert_clean(f"exception in {record.name}", repr(record.exc_info[1]))
    assert_clean("the captured logs", caplog.text)
    out, err = capfd.readouterr()
    assert_clean("stdout", out)
    assert_clean("stderr", err)
    assert_clean("the emulator's stderr", "\n".join(emu.stderr_lines()))
    return Searched(objects=len(listed), logs=len(logs), artifacts=len(artifacts))


async def test_a_whole_flow_run_leaks_no_secret(
    tmp_path: Path,
    emulator: EmulatorProcess,
    s3: S3,
    captured_logs: pytest.LogCaptureFixture,
    capfd: Any,
) -> None:
    # The key is required, so a run that did not send it could not pass; a few faults make
    # retries (and their log lines) happen.
    emulator.configure(api_key=API_KEY, internal_error_rate=0.2, drop_rate=0.1, fault_seed=4)
    state = await edit_manifest(
        manifest=put_manifest(s3),
        output=f"s3://{s3.bucket}/out",
        api_base=emulator.base_url,
        s3_endpoint_url=s3.endpoint,
        concurrency=4,
        max_attempts=10,
        response_format="url",
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = await state.result()
    assert summary["by_status"]["succeeded"] == ROWS
    assert summary["by_status"]["invalid"] == 2
    assert emulator.stats()["by_status"].get("401", 0) == 0
    assert emulator.stats()["faults"]  # retries happened
    assert_clean("the flow's result", json.dumps(summary))
    assert_clean("the final state", repr(state))

    found = await search_everything(
        state.state_details.flow_run_id, s3, captured_logs, capfd, emulator
    )
    # The search saw real material: objects, forwarded logs, the summary artifact.
    assert found.objects >= 2 * ROWS + 3
    assert found.logs >= 3 and found.artifacts >= 1
    assert any(r.name.startswith("pipeline") for r in captured_logs.records)


async def test_a_run_failing_with_401_leaks_no_secret(
    tmp_path: Path,
    emulator: EmulatorProcess,
    s3: S3,
    captured_logs: pytest.LogCaptureFixture,
    capfd: Any,
) -> None:
    emulator.configure(api_key="the-key-the-server-wants-" + secrets.token_hex(8))
    state = await edit_manifest(
        manifest=put_manifest(s3),
        output=f"s3://{s3.bucket}/out",
        api_base=emulator.base_url,
        s3_endpoint_url=s3.endpoint,
        concurrency=2,
        return_state=True,
    )
    assert state.is_failed()
    error = await state.result(raise_on_failure=False)
    message = str(error)
    assert "401" in message
    assert emulator.stats()["by_status"].get("401", 0) >= 1
    assert_clean("the failure message", message)
    assert_clean("the failure's repr", repr(error))
    assert_clean("the final state", repr(state))

    found = await search_everything(
        state.state_details.flow_run_id, s3, captured_logs, capfd, emulator
    )
    assert found.logs >= 1
    errors = [r for r in captured_logs.records if r.levelno >= logging.ERROR]
    assert any("401" in r.getMessage() for r in errors)
