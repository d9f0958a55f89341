"""Many hosts: a sharded run over three worker hosts, one of them killed mid-shard.

Hosts are network namespaces on one bridge (tests/netns_hosts.py): the S3 host (moto's
server), the API host (the emulator, whose latency stands in for the network's: this kernel
has no netem), three worker hosts with a process worker each, and the root namespace as the
Prefect server host (PostgreSQL on its loopback when it answers). Skipped, with the reason,
where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.deployments import arun_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from pipeline.engine import layout
from pipeline.engine.results import SKIP_DONE
from tests.netns_hosts import Hosts, hosts, unavailable, wait_for
from tests.prefect_stack import ROOT, PrefectStack, collecting_leaks, prefect_stack

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(1200),
    pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

WHY_NOT = unavailable()
# Which host dies: by default one that runs a shard but not the parent (else, by half the rows,
# the parent's); IMGEDIT_TEST_KILL=parent kills the parent's host, to walk the re-trigger path.
KILL_PARENT = os.environ.get("IMGEDIT_TEST_KILL") == "parent"
ROWS = 3000
SHARDS = 3
LIMIT = 6
HEARTBEAT_S = 30  # Prefect's lowest: a dead host's runs are Crashed after 3 x 30 s
WORKERS = ("w1", "w2", "w3")
S3_PORT, API_PORT = 5000, 8765
CREDS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def net() -> Iterator[Hosts]:
    if WHY_NOT:
        pytest.skip(f"no network namespaces: {WHY_NOT}")
    with collecting_leaks(), hosts(["s3", "api", *WORKERS]) as made:
        yield made


@pytest.fixture
def stack(tmp_path: Path, net: Hosts) -> Iterator[PrefectStack]:
    """The Prefect server host: this (root) namespace, listening on the bridge."""
    with prefect_stack(
        tmp_path,
        {
            **CREDS,
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
            # The API is on another host: a key is required (the emulator takes any).
            "IMGEDIT_API_KEY": "emulator-accepts-any-key",
        },
        host=net.gateway,
    ) as s:
        yield s


def _manifest() -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "image", "prompt", "seed", "output_format", "output_compression"])
    for i in range(ROWS):
        w.writerow([f"r{i}", f"src/{'a.png' if i % 2 else 'b.jpg'}", f"prompt {i}", i, "jpeg", 30])
    return buf.getvalue().encode()


def _stats(api: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{api}/_emulator/stats", timeout=10).json()
    return data


async def _runs_by_worker(stack: PrefectStack) -> tuple[dict[str, set[str]], set[str], set[str]]:
    """Flow run ids each worker submitted; the parent's; the shards' still running."""
    ran_by = {}
    for w in WORKERS:
        text = stack.log_text(w)
        # Two workers may both try a run: the one the server refused logs "Aborted".
        tried = set(re.findall(r"submitting flow run '([0-9a-f-]+)'", text))
        ran_by[w] = tried - set(re.findall(r"Aborted submission of flow run '([0-9a-f-]+)'", text))
    async with get_client() as client:
        runs = await client.read_flow_runs()
    parents = {str(r.id) for r in runs if "-shard-" not in r.name}
    running = {
        str(r.id)
        for r in runs
        if "-shard-" in r.name and r.state is not None and r.state.is_running()
    }
    return ran_by, parents, running


async def test_a_worker_host_killed_mid_shard_loses_no_row_and_pays_none_twice_unreported(
    tmp_path: Path, net: Hosts, stack: PrefectStack, sources: dict[str, Path]
) -> None:
    env = {
        **os.environ,
        **CREDS,
        "PYTHONPATH": str(ROOT),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    s3_url = f"http://{net.addresses['s3']}:{S3_PORT}"
    api_root = f"http://{net.addresses['api']}:{API_PORT}"
    net.start(
        "s3",
        [sys.executable, "-m", "moto.server", "-H", "0.0.0.0", "-p", str(S3_PORT)],
        env,
        ROOT,
        tmp_path / "s3.log",
    )
    net.start(
        "api",
        [sys.executable, "-m", "pipeline.emulator.process"],
        {
            **env,
            "IMGEDIT_EMULATOR_HOST": "0.0.0.0",
            "IMGEDIT_EMULATOR_PORT": str(API_PORT),
            # The API host's answer time, network included.
            "IMGEDIT_EMULATOR_LATENCY": "0.08",
            "IMGEDIT_EMULATOR_LATENCY_JITTER": "0.04",
        },
        ROOT,
        tmp_path / "api.log",
    )
    wait_for(f"{s3_url}/")
    wait_for(f"{api_root}/_emulator/stats")

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name="us-east-1",
        aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket="cat")
    s3.put_object(Bucket="cat", Key="src/a.png", Body=sources["square.png"].read_bytes())
    s3.put_object(Bucket="cat", Key="src/b.jpg", Body=sources["wide.jpg"].read_bytes())
    s3.put_object(Bucket="cat", Key="manifest.csv", Body=_manifest())

    setup_out = stack.setup(LIMIT)
    assert "zombie automation created" in setup_out, setup_out
    parameters = {
        "manifest": "s3://cat/manifest.csv",
        "output": "s3://cat/out",
        "s3_endpoint_url": s3_url,
        "api_base": f"{api_root}/v1",
        "concurrency": 8,
        "fixed_concurrency": True,
        "chunk_size": 50,
        "shards": SHARDS,
        # A killed run's claims are taken over after this (and clock skew).
        "lease_seconds": 20,
    }
    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        for w in WORKERS:
            stack.start_worker(w, "imgedit", limit=2, prefix=net.prefix(w))
        parent_run = asyncio.create_task(
            arun_deployment(
                "edit-manifest/edit-manifest",
                parameters=parameters,
                timeout=1000,
                poll_interval=2,
            )
        )
        victim, killed_runs, had_parent = await _kill_a_shard_host(stack, net, api_root, parent_run)
        parent = await parent_run
        if had_parent:
            # The parent died with its host and was marked Crashed: started again with the
            # same run id, as the README says, it resumes the shards that did not finish.
            assert parent.state is not None and parent.state.is_crashed(), parent.state
            (run_id,) = {
                layout.shard_parent(o["Key"].split("/")[2])
                for o in s3.list_objects_v2(Bucket="cat", Prefix="out/runs/")["Contents"]
            } - {None}
            parent = await arun_deployment(
                "edit-manifest/edit-manifest",
                parameters={**parameters, "run_id": run_id},
                timeout=1000,
                poll_interval=2,
            )

    stats = _stats(api_root)
    assert parent.state is not None and parent.state.is_completed(), (
        parent.state,
        {w: stack.log_text(w)[-2000:] for w in WORKERS},
    )
    # One limit across three hosts: never more requests in flight than its slots.
    assert stats["max_in_flight"] <= LIMIT

    runs = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket="cat", Prefix="out/runs/")["Contents"]
        if o["Key"].endswith("/summary.json")
    ]
    (summary_key,) = [k for k in runs if layout.shard_parent(k.split("/")[2]) is None]
    summary = json.loads(s3.get_object(Bucket="cat", Key=summary_key)["Body"].read())
    assert summary["stopped_by"] is None
    attempts = [s["attempts"] for s in summary["extra"]["shards"]]
    if had_parent:  # shards that went through were left alone, the dead host's started again
        assert 0 in attempts, attempts
        assert any(a >= 1 for a in attempts) or not killed_runs, (killed_runs, attempts)
    else:  # the parent started the dead host's shard again
        assert any(a > 1 for a in attempts), (victim, killed_runs, attempts)

    table = pd.read_parquet(
        io.BytesIO(s3.get_object(Bucket="cat", Key=summary["results_uri"][len("s3://cat/") :])[
            "Body"
        ].read())
    )  # fmt: skip
    # Every row exactly once; the dead shard's finished rows are found done by its restart.
    assert sorted(table["row"]) == list(range(1, ROWS + 1))
    succeeded = table["status"] == "succeeded"
    done_before = (table["status"] == "skipped") & (table["reason"] == SKIP_DONE)
    assert (succeeded | done_before).all(), table[~(succeeded | done_before)].head()
    sidecars = s3.get_paginator("list_objects_v2").paginate(Bucket="cat", Prefix="out/jobs/")
    assert sum(len(page.get("Contents", [])) for page in sidecars) == ROWS
    # Paid once per row, except what the run reported as possibly paid twice: the edits the
    # dead host had in flight (their claims taken over) and answers lost on the way.
    doubles = int(table["possible_double_charges"].sum())
    assert ROWS <= stats["charged_images"] <= ROWS + doubles, (stats, doubles)
    # For the README (pytest -s): what the kill cost.
    print(
        f"killed {victim} ({len(killed_runs)} shard runs); shards {summary['extra']['shards']}; "
        f"charged {stats['charged_images']} for {ROWS} rows, possible double charges {doubles}; "
        f"done before the kill {int(done_before.sum())}; run {summary['elapsed_s']:.0f} s"
    )


async def _kill_a_shard_host(
    stack: PrefectStack, net: Hosts, api_root: str, parent_run: asyncio.Task[Any]
) -> tuple[str, set[str], bool]:
    """Once a third of the rows are paid, SIGKILL every process of a worker host with edit
    requests in flight: one that does not run the parent if there is one by half the rows,
    else the parent's too. The host, its running shard runs, and whether it ran the parent."""
    host_of = {address: name for name, address in net.addresses.items()}
    deadline = time.monotonic() + 600
    seen: Any = None
    while True:
        assert not parent_run.done(), ("no host to kill was found", seen)
        assert time.monotonic() < deadline, ("the run never got going", seen)
        charged = _stats(api_root)["charged_images"]
        if charged >= ROWS // 3:
            ran_by, parents, running = await _runs_by_worker(stack)
            log = httpx.get(f"{api_root}/_emulator/requests", timeout=10).json()["requests"]
            editing = {host_of.get(r.get("client")) for r in log if r.get("status") is None}
            seen = (ran_by, parents, running, editing)
            candidates = [w for w, ids in ran_by.items() if w in editing and ids & running]
            spare = [w for w in candidates if not ran_by[w] & parents]
            chosen = spare or (candidates if charged >= ROWS // 2 else [])
            if KILL_PARENT:
                chosen = [w for w, ids in ran_by.items() if ids & parents]
            if chosen:
                worker = chosen[0]
                assert net.kill(worker) > 0
                return worker, ran_by[worker] & running, bool(ran_by[worker] & parents)
        await asyncio.sleep(0.2)
