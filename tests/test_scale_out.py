"""Scale-out on a real Prefect server: a work pool, two process workers, a sharded run.

The server uses PostgreSQL when it answers on 127.0.0.1:5432 (as production does), else SQLite.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import boto3
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.deployments import arun_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from pipeline.emulator.process import EmulatorProcess
from tests.prefect_stack import PrefectStack, collecting_leaks, prefect_stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

ROWS = 48
SHARDS = 4
LIMIT = 5


@pytest.fixture(autouse=True)
def _collect_leaks() -> Iterator[None]:
    with collecting_leaks():
        yield


@pytest.fixture
def stack(tmp_path: Path, moto_endpoint: str) -> Iterator[PrefectStack]:
    creds = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with prefect_stack(tmp_path, creds) as s:
        yield s


async def test_a_sharded_run_spreads_over_two_workers_under_one_limit(
    tmp_path: Path,
    sources: dict[str, Path],
    stack: PrefectStack,
    moto_endpoint: str,
    emulator: EmulatorProcess,
) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_endpoint)
    s3.create_bucket(Bucket="cat")
    s3.put_object(Bucket="cat", Key="src/a.png", Body=sources["square.png"].read_bytes())
    s3.put_object(Bucket="cat", Key="src/b.jpg", Body=sources["wide.jpg"].read_bytes())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "image", "prompt", "seed", "output_format"])
    for i in range(ROWS):
        w.writerow([f"r{i}", f"src/{'a.png' if i % 2 else 'b.jpg'}", f"prompt {i}", i, "jpeg"])
    s3.put_object(Bucket="cat", Key="manifest.csv", Body=buf.getvalue().encode())
    emulator.configure(latency=0.15)

    # What infra/setup.sh does for a team: the work pool, the API limit, the deployments.
    assert f"'imgedit-api': {LIMIT} requests in flight" in stack.setup(LIMIT)
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        # Each worker takes at most 3 flow runs at once (the parent and 4 shards are 5),
        # as workers sized for their machine would.
        stack.start_worker("w1", "imgedit", limit=3)
        stack.start_worker("w2", "imgedit", limit=3)
        parent = await arun_deployment(
            "edit-manifest/edit-manifest",
            parameters={
                "manifest": "s3://cat/manifest.csv",
                "output": "s3://cat/out",
                "s3_endpoint_url": moto_endpoint,
                "api_base": emulator.base_url,
                "concurrency": 8,
                "chunk_size": 5,
                "shards": SHARDS,
            },
            timeout=480,
            poll_interval=2,
        )
        async with get_client() as client:
            children = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])
                )
            )
            limit = await client.read_global_concurrency_limit_by_name("imgedit-api")
            catalogue = await client.read_deployment_by_name("catalogue-reedit/catalogue-reedit")

    logs = {name: stack.log_text(name) for name in ("w1", "w2")}
    assert parent.state is not None and parent.state.is_completed(), (
        parent.state,
        logs,
        stack.log_text("server")[-3000:],
    )
    assert len(children) == SHARDS
    assert all(c.state and c.state.is_completed() for c in children)
    # Both workers ran shards: each submitted at least one of the children.
    # (A worker that tried a run another got logs "Aborted submission" for it.)
    ran_by = {
        name: set(re.findall(r"submitting flow run '([0-9a-f-]+)'", text))
        - set(re.findall(r"Aborted submission of flow run '([0-9a-f-]+)'", text))
        for name, text in logs.items()
    }
    child_ids = {str(c.id) for c in children}
    assert ran_by["w1"] & child_ids and ran_by["w2"] & child_ids, ran_by
    # One limit across all of them: never more requests in flight than its slots.
    stats = emulator.stats()
    assert stats["max_in_flight"] <= LIMIT
    assert stats["requests"] == ROWS
    assert limit.active_slots == 0
    # prefect.yaml scheduled the catalogue re-edit nightly, in a named time zone.
    (schedule,) = catalogue.schedules
    assert schedule.active
    assert schedule.schedule.cron == "0 2 * * *"  # type: ignore[union-attr]
    assert schedule.schedule.timezone == "Europe/Berlin"  # type: ignore[union-attr]
    # The parent merged the shards' tables: every row once.
    (results_key,) = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket="cat", Prefix="out/runs/")["Contents"]
        if o["Key"].endswith("/results.parquet") and ".s0" not in o["Key"]
    ]
    table = pd.read_parquet(io.BytesIO(s3.get_object(Bucket="cat", Key=results_key)["Body"].read()))
    assert sorted(table["row"]) == list(range(1, ROWS + 1))
    assert (table["status"] == "succeeded").all()

    # Started again with the same run id (as after a crash of the parent): the shards that
    # went through are not started again, nothing is requested, the merged table stays.
    run_id = results_key.split("/")[2]
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        again = await arun_deployment(
            "edit-manifest/edit-manifest",
            parameters={
                "manifest": "s3://cat/manifest.csv",
                "output": "s3://cat/out",
                "s3_endpoint_url": moto_endpoint,
                "api_base": emulator.base_url,
                "shards": SHARDS,
                "run_id": run_id,
            },
            timeout=300,
            poll_interval=2,
        )
    assert again.state is not None and again.state.is_completed(), again.state
    summary = json.loads(
        s3.get_object(Bucket="cat", Key=f"out/runs/{run_id}/summary.json")["Body"].read()
    )
    assert [s["attempts"] for s in summary["extra"]["shards"]] == [0] * SHARDS
    assert emulator.stats()["requests"] == ROWS
    again_table = pd.read_parquet(
        io.BytesIO(s3.get_object(Bucket="cat", Key=results_key)["Body"].read())
    )
    assert (again_table["status"] == "succeeded").all() and len(again_table) == ROWS
