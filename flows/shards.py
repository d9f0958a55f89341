"""One shard of a scaled-out run as a child flow run: started again when its host dies.

A shard whose worker host died ends Crashed (see flows.zombies); the parent then starts it
again, up to SHARD_ATTEMPTS times, and the new child resumes where the dead one stopped (done
rows are in the done index, the dead run's claims expire with their lease). Idempotency keys
carry the parent's flow run id, so a retry of the parent flow run finds its children again,
while a new parent run with the same run id (a re-trigger after a crash) starts new children
for the shards that did not finish and leaves finished ones alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from prefect.deployments import arun_deployment

from pipeline.io.storage import Storage
from pipeline.uses.run_history.runs import read_summary

# Starts of one shard within one parent run: the first and two restarts after a crash.
SHARD_ATTEMPTS = 3
SHARD_POLL_SECONDS = 2.0


@dataclass(frozen=True)
class ShardOutcome:
    """How one shard ended, as the parent reports it."""

    run_id: str
    flow_run: str | None
    state: str | None
    attempts: int
    completed: bool


def finished_earlier(storage: Storage, shard_id: str) -> bool:
    """True when an earlier run of this shard went through: its summary is stored and says
    it was neither stopped nor left rows failed (so there is nothing to redo)."""
    summary = read_summary(storage, shard_id)
    if summary is None or summary.get("stopped_by"):
        return False
    by_status = summary.get("by_status")
    return isinstance(by_status, dict) and not by_status.get("failed")


async def run_shard(
    deployment: str,
    parameters: dict[str, Any],
    *,
    shard_id: str,
    name: str,
    parent_key: str,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> ShardOutcome:
    """Run the shard as a child flow run of `deployment`; start it again if it crashed."""
    child = None
    for attempt in range(1, SHARD_ATTEMPTS + 1):
        suffix = "" if attempt == 1 else f"-attempt-{attempt}"
        child = await arun_deployment(
            deployment,
            parameters=parameters,
            flow_run_name=f"{name}{suffix}",
            idempotency_key=f"imgedit-{shard_id}-{parent_key}{suffix}",
            timeout=None,
            poll_interval=SHARD_POLL_SECONDS,
        )
        state = child.state
        if state is None or not state.is_crashed():
            break
        if attempt < SHARD_ATTEMPTS:
            logger.warning(
                "shard %s crashed (%s): starting it again (attempt %d of %d); it resumes "
                "from its done rows",
                name,
                state.message or "no message",
                attempt + 1,
                SHARD_ATTEMPTS,
            )
    assert child is not None
    state = child.state
    return ShardOutcome(
        run_id=shard_id,
        flow_run=child.name,
        state=state.name if state else None,
        attempts=attempt,
        completed=bool(state and state.is_completed()),
    )
