"""Flow runs whose host died are marked Crashed: Prefect's heartbeat automation, set up once.

A worker host that loses power or is killed leaves its flow runs `Running` forever: nothing is
left to report their end. Flow runs started by a deployment send a heartbeat event every
`PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds (180 by default, 30 at least); this automation
(the one Prefect documents for self-hosted servers, "detect zombie flows") marks a run Crashed
when no heartbeat or final state follows within `ZOMBIE_HEARTBEATS` heartbeats. A sharded
run's parent then starts the crashed shard again (see flows.shards), and the shard resumes:
its done rows are indexed, and the dead run's claims expire with their lease.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import Automation
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound

ZOMBIE_AUTOMATION = "imgedit: crash flow runs that stopped sending heartbeats"
# Missed heartbeats before a run is called dead: one late heartbeat on a busy host is not death.
ZOMBIE_HEARTBEATS = 3
DEFAULT_HEARTBEAT_S = 180
MIN_HEARTBEAT_S = 30  # Prefect's own lower bound for PREFECT_FLOWS_HEARTBEAT_FREQUENCY

_FINAL = (
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
)


def zombie_automation(heartbeat_s: int) -> Automation:
    """The automation: no heartbeat nor final state within ZOMBIE_HEARTBEATS heartbeats."""
    return Automation(
        name=ZOMBIE_AUTOMATION,
        description=(
            f"Marks a flow run Crashed when it sent no heartbeat for {ZOMBIE_HEARTBEATS} x "
            f"{heartbeat_s} s: its worker host died (workers must set "
            f"PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat_s}). Created by `imgedit setup`."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *_FINAL},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=ZOMBIE_HEARTBEATS * heartbeat_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"no heartbeat for {ZOMBIE_HEARTBEATS * heartbeat_s} s: its worker host "
                    "is gone (imgedit's zombie automation)"
                ),
            )
        ],
    )


async def setup_zombie_automation(heartbeat_s: int = DEFAULT_HEARTBEAT_S) -> str:
    """Create the automation, or bring an existing one to `heartbeat_s`; what was done."""
    if heartbeat_s < MIN_HEARTBEAT_S:
        raise ValueError(f"heartbeat must be at least {MIN_HEARTBEAT_S} s, got {heartbeat_s}")
    wanted = zombie_automation(heartbeat_s)
    try:
        existing = await Automation.aread(name=ZOMBIE_AUTOMATION)
    except (ObjectNotFound, ValueError):
        existing = None
    if existing is None:
        await wanted.acreate()
        return "created"
    wanted.id = existing.id
    await wanted.aupdate()
    return "updated"
