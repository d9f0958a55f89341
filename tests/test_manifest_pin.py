"""The manifest is opened once per run and pinned to one version from plan to finalize."""

from __future__ import annotations

import io
import time
from pathlib import Path

import boto3
import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto import mock_aws

from pipeline.engine.options import RunOptions
from pipeline.engine.plan import plan_run
from pipeline.engine.run import RunParts, execute
from pipeline.errors import ManifestError
from tests.conftest import image_bytes
from tests.test_money import API, ScriptedAPI, answer


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGEDIT_API_KEY", "scripted-" + "api-key")


def csv_bytes(src: Path, prompts: list[str]) -> bytes:
    lines = ["image,prompt", *(f"{src},{p}" for p in prompts)]
    return ("\n".join(lines) + "\n").encode()


def parquet_bytes(src: Path, prompts: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [str(src)] * len(prompts), "prompt": prompts}), buf)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
async def test_a_manifest_replaced_during_a_run_is_never_read_half_new(
    tmp_path: Path, aws_credentials: None, fmt: str
) -> None:
    src = tmp_path / "src.png"
    src.write_bytes(image_bytes((32, 32), (5, 6, 7)))
    write = csv_bytes if fmt == "csv" else parquet_bytes
    api = ScriptedAPI(lambda i, r: httpx.Response(200, json=answer()))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="manifests")
        key = f"m.{fmt}"
        s3.put_object(Bucket="manifests", Key=key, Body=write(src, ["a", "b", "c"]))
        opts = RunOptions(
            manifest=f"s3://manifests/{key}", output=str(tmp_path / "out"), api_base=API
        )
        started = time.perf_counter()
        plan = plan_run(opts, "pinned")
        assert plan.opened is not None and plan.opened.file.etag
        # Replaced between the plan (which checked three rows) and the edits.
        s3.put_object(Bucket="manifests", Key=key, Body=write(src, ["x"] * 50))
        parts = RunParts(api_transport=api.transport)
        if fmt == "csv":
            # Streamed again for the chunks: the pinned version is gone, the run stops.
            with pytest.raises(ManifestError, match="changed since this run first read it"):
                await execute(opts, plan, parts=parts, started_at=plan_time(), started=started)
            assert api.requests == 0
        else:
            # Downloaded once by the plan: the run edits exactly the rows it checked.
            summary = await execute(
                opts, plan, parts=parts, started_at=plan_time(), started=started
            )
            assert summary.rows == 3 and summary.by_status["succeeded"] == 3
            assert api.requests == 3


def test_shards_read_the_version_their_parent_planned(
    tmp_path: Path, aws_credentials: None
) -> None:
    """A scaled-out run hands its shards the ETag its plan read (`manifest_version`): a shard
    starting after the manifest was replaced refuses it instead of editing other rows."""
    src = tmp_path / "src.png"
    src.write_bytes(image_bytes((32, 32), (5, 6, 7)))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="manifests")
        s3.put_object(Bucket="manifests", Key="m.csv", Body=csv_bytes(src, ["a", "b"]))
        parent = RunOptions(manifest="s3://manifests/m.csv", output=str(tmp_path / "out"))
        planned = plan_run(parent, "parent")
        assert planned.opened is not None
        version = planned.opened.file.etag
        planned.opened.close()
        shard = parent.replace(manifest_version=version, row_start=1, row_end=2)
        same = plan_run(shard, "shard-0")
        assert same.opened is not None and same.opened.file.etag == version
        same.opened.close()
        for strict in (False, True):
            s3.put_object(Bucket="manifests", Key="m.csv", Body=csv_bytes(src, ["x"] * 9))
            with pytest.raises(ManifestError, match="changed since this run first read it"):
                plan_run(shard.replace(strict=strict), "shard-1")


def plan_time():  # type: ignore[no-untyped-def]
    from pipeline.engine.results import utcnow

    return utcnow()
