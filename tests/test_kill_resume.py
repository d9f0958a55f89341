"""Kill -9 and resume: a run killed at any point and run again ends with every row done once,
no partial object taken for a result, and no finished job requested (or paid for) again.

The engine runs in a subprocess (the engine alone, not the Prefect flow: a Prefect server per
process start would cost ~10 s each, and the resume logic lives in the engine).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipeline.emulator.process import EmulatorProcess

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
ROWS = 48
CONCURRENCY = 4
# Enough latency that a run takes a few seconds and a kill lands mid-run.
LATENCY_S = 0.25
LATENCY_JITTER_S = 0.1
POLL_S = 0.01
RUN_DEADLINE_S = 60.0
TEMP_PREFIX = ".tmp-"

ENGINE_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from pipeline.engine.options import RunOptions
    from pipeline.engine.run import run_manifest

    manifest, output, api_base = sys.argv[1:4]
    summary = asyncio.run(
        run_manifest(
            RunOptions(
                manifest=manifest,
                output=output,
                api_base=api_base,
                concurrency={concurrency},
                chunk_size=16,
                response_format="url",
                max_attempts=8,
            )
        )
    )
    print(summary.results_uri)
    """
).format(concurrency=CONCURRENCY)


def sidecars(output: Path) -> dict[str, Path]:
    """Job key -> sidecar path, for every finished (renamed into place) sidecar."""
    jobs = output / "jobs"
    if not jobs.exists():
        return {}
    return {p.stem: p for p in jobs.rglob("*.json") if not p.name.startswith(TEMP_PREFIX)}


class Runs:
    """Starts the engine in a subprocess and kills it with SIGKILL at chosen points."""

    def __init__(self, tmp_path: Path, manifest: Path, output: Path, api_base: str) -> None:
        self.tmp_path = tmp_path
        self.args = [sys.executable, "-c", ENGINE_SCRIPT, str(manifest), str(output), api_base]
        self.output = output
        self.count = 0
        # (wall-clock start of the run, job keys whose sidecar existed when it started)
        self.starts: list[tuple[float, set[str]]] = []
        self.killed = 0

    def start(self) -> subprocess.Popen[bytes]:
        self.count += 1
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.starts.append((time.time(), set(sidecars(self.output))))
        with (self.tmp_path / f"run{self.count}.log").open("wb") as log:
            return subprocess.Popen(
                self.args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def log_of(self, number: int) -> str:
        return (self.tmp_path / f"run{number}.log").read_text(errors="replace")

    def kill_when(self, proc: subprocess.Popen[bytes], ready: Callable[[], bool]) -> bool:
        """SIGKILL `proc` once `ready()` is true; False if it ended on its own first."""
        deadline = time.monotonic() + RUN_DEADLINE_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                assert proc.returncode == -signal.SIGKILL
                self.killed += 1
                return True
            time.sleep(POLL_S)
        proc.kill()
        proc.wait()
        pytest.fail(
            f"run {self.count} neither finished nor reached its kill point:\n"
            + self.log_of(self.count)
        )

    def finish(self, proc: subprocess.Popen[bytes]) -> str:
        try:
            proc.wait(timeout=RUN_DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.returncode == 0, self.log_of(self.count)
        return self.log_of(self.count).strip().splitlines()[-1]


def write_manifest(path: Path, sources: dict[str, Path]) -> list[tuple[str, int]]:
    names = ["square.png", "wide.jpg", "tall.png", "ref.webp"]
    jobs = []
    lines = ["id,image,prompt,seed,output_format"]
    for i in range(ROWS):
        prompt = f"resume edit {i}"
        lines.append(f"r{i},{sources[names[i % len(names)]]},{prompt},{i},jpeg")
        jobs.append((prompt, i))
    path.write_text("\n".join(lines) + "\n")
    return jobs


def test_killed_runs_resume_to_every_row_done_once_and_nothing_paid_twice(
    tmp_path: Path, sources: dict[str, Path], emulator: EmulatorProcess
) -> None:
    emulator.configure(latency=LATENCY_S, latency_jitter=LATENCY_JITTER_S, fault_seed=3)
    manifest = tmp_path / "m.csv"
    jobs = write_manifest(manifest, sources)
    output = tmp_path / "out"
    runs = Runs(tmp_path, manifest, output, emulator.base_url)
    rng = random.Random(7)

    # 1: killed as soon as the first job is done.
    runs.kill_when(runs.start(), lambda: len(sidecars(output)) >= 1)
    # 2: killed after a random delay: while starting, listing, editing or storing.
    delay_until = time.monotonic() + rng.uniform(1.5, 3.0)
    runs.kill_when(
        runs.start(), lambda: len(sidecars(output)) >= ROWS or time.monotonic() >= delay_until
    )
    # 3 and 4: killed once more than half, then all but a few jobs are done.
    runs.kill_when(runs.start(), lambda: len(sidecars(output)) >= ROWS // 2 + 4)
    runs.kill_when(runs.start(), lambda: len(sidecars(output)) >= ROWS - 6)
    # 5: killed the moment the last job is done: while it writes its results table.
    runs.kill_when(runs.start(), lambda: len(sidecars(output)) >= ROWS)
    # 6: runs to the end, finding every job done.
    results_uri = runs.finish(runs.start())

    assert runs.killed >= 4, "most kills must land before the run ended on its own"
    done_at_start = [len(done) for _, done in runs.starts]
    assert done_at_start == sorted(done_at_start), "a kill lost a finished job"
    assert len(set(done_at_start)) >= 4, f"too few runs made progress: {done_at_start}"

    # Every row exactly once in the final results, done now or found done.
    results = pd.read_parquet(results_uri)
    assert sorted(results["row"]) == list(range(1, ROWS + 1))
    assert results["id"].is_unique
    done_before_last = runs.starts[-1][1]
    for _, r in results.iterrows():
        if r["job_key"] in done_before_last:
            assert (r["status"], r["reason"]) == ("skipped", "done"), r.to_dict()
        else:
            assert r["status"] == "succeeded", r.to_dict()

    # One sidecar per job, each naming whole, decodable images; no temp file taken for one.
    found = sidecars(output)
    assert len(found) == ROWS
    assert set(found) == set(results["job_key"])
    by_job: dict[str, tuple[str, int]] = {}
    for key, path in found.items():
        sidecar = json.loads(path.read_text())
        assert sidecar["job_key"] == key
        by_job[key] = (sidecar["request"]["prompt"], sidecar["request"]["seed"])
        for out in sidecar["outputs"]:
            image = Path(out["uri"])
            assert not image.name.startswith(TEMP_PREFIX)
            assert image.stat().st_size == out["bytes"]
            with Image.open(image) as im:
                im.load()
                assert f"{im.width}x{im.height}" == out["size"]
    assert sorted(by_job.values()) == sorted(jobs)
    # Every result image on disk decodes (a killed write leaves only `.tmp-` files).
    for image in (output / "images").rglob("*"):
        if image.is_file() and not image.name.startswith(TEMP_PREFIX):
            with Image.open(image) as im:
                im.load()
    for part in (output / "runs").rglob("*.parquet"):
        if not part.name.startswith(TEMP_PREFIX):
            pd.read_parquet(part)  # whole, or absent: never half-written

    # No job done before a run started was requested by that run (nor by any later one).
    # Requests of killed runs finish at the emulator on their own time: let them.
    deadline = time.monotonic() + 5 * (LATENCY_S + LATENCY_JITTER_S)
    while emulator.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(POLL_S)
    # A request whose upload a kill cut short never got its form read (nor a charge).
    requests = [r for r in emulator.requests() if "fields" in r]
    assert requests
    for number, (started, done) in enumerate(runs.starts, 1):
        done_jobs = {by_job[k] for k in done}
        again = [
            (r["fields"]["prompt"], int(r["fields"]["seed"]))
            for r in requests
            if r["time"] >= started
            and (r["fields"]["prompt"], int(r["fields"]["seed"])) in done_jobs
        ]
        assert not again, f"run {number} requested finished jobs again: {again}"

    # And the ledger: each job charged at least once; more only where an answer was lost
    # to a kill (in flight when the process died), never for a job already stored.
    charged = Counter(
        (r["fields"]["prompt"], int(r["fields"]["seed"])) for r in requests if r["charged"]
    )
    assert set(charged) == set(jobs)
    extra = sum(charged.values()) - len(jobs)
    assert extra <= runs.killed * CONCURRENCY
