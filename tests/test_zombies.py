"""The zombie automation: a flow run silent for three heartbeats is marked Crashed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture

from flows.zombies import ZOMBIE_HEARTBEATS, setup_zombie_automation, zombie_automation


def test_the_automation_crashes_runs_silent_for_three_heartbeats() -> None:
    automation = zombie_automation(40)
    trigger = automation.trigger
    assert isinstance(trigger, EventTrigger)
    assert trigger.posture == Posture.Proactive
    assert trigger.within == timedelta(seconds=ZOMBIE_HEARTBEATS * 40)
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    # A run that ends (any final state) is not a zombie.
    assert {"prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"}
    (action,) = automation.actions
    assert isinstance(action, ChangeFlowRunState) and action.state == StateType.CRASHED
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=40" in (automation.description or "")


async def test_a_heartbeat_below_prefects_lowest_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 30"):
        await setup_zombie_automation(10)
