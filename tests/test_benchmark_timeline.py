"""The weather benchmark's bound and time split, on request logs worked out by hand."""

from __future__ import annotations

import pytest

from benchmarks.timeline import breakdown, greedy_makespan


def test_the_bound_starts_each_request_as_a_slot_frees() -> None:
    # Two slots: 4 | 1 then 1 then 1 -> the first slot ends at 4, the second at 3.
    assert greedy_makespan([4.0, 1.0, 1.0, 1.0], 2) == pytest.approx(4.0)
    # One long request last: nothing overlaps it, whatever the slots.
    assert greedy_makespan([1.0, 1.0, 1.0, 1.0, 6.0], 4) == pytest.approx(7.0)
    assert greedy_makespan([], 3) == 0.0


def test_breakdown_splits_a_run_by_what_the_api_was_doing() -> None:
    records = [
        {"time": 10.0, "service_s": 2.0},
        {"time": 10.0, "service_s": 4.0},
        {"time": 12.0, "service_s": 1.0},  # the last request started
        {"time": 11.0, "service_s": None},  # refused at once: no service time
    ]
    split = breakdown(records, 2, run_started=9.0, run_ended=15.0)
    assert split["lead_s"] == pytest.approx(1.0)
    assert split["sending_s"] == pytest.approx(2.0)
    # From 10 to 12 both requests that started at 10 are in flight: no slot idle.
    assert split["idle_slots"] == pytest.approx(0.0)
    assert split["tail_s"] == pytest.approx(2.0)  # the 4 s one ends at 14
    assert split["trail_s"] == pytest.approx(1.0)
    assert breakdown([], 2, 0.0, 1.0) == {}
