"""Where a run's wall time went, from the emulator's request log: lead, idle slots, tail, trail."""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def greedy_makespan(service_s: Iterable[float], slots: int) -> float:
    """The wall time of these requests, in this order, each started the moment a slot is free.

    No client does better without sending some request twice (or knowing latencies ahead):
    beside `sum / slots` it shows what the last wave's stragglers cost any scheduler.
    """
    free = [0.0] * slots
    for s in service_s:
        heapq.heapreplace(free, free[0] + s)
    return max(free)


def _busy_between(spans: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(end, hi) - max(start, lo)) for start, end in spans)


def breakdown(
    records: Sequence[Mapping[str, Any]], slots: int, run_started: float, run_ended: float
) -> dict[str, float]:
    """A run's wall time split by what the API was doing, from its request log.

    - lead: run start to its first request (manifest, plan, first sources);
    - sending: first to last request started; `idle_slots` is how many of the `slots`
      stood empty on average meanwhile (backoff, pauses, the client's own work);
    - tail: last request started to last answer (stragglers, nothing left to start);
    - trail: last answer to run end (storing the last images, results, summary).
    """
    spans = sorted(
        (float(r["time"]), float(r["time"]) + float(r["service_s"] or 0.0))
        for r in records
        if r.get("time") is not None
    )
    if not spans:
        return {}
    first = spans[0][0]
    last_start = spans[-1][0]
    last_end = max(end for _, end in spans)
    sending = last_start - first
    busy = _busy_between(spans, first, last_start)
    return {
        "lead_s": round(first - run_started, 2),
        "sending_s": round(sending, 2),
        "idle_slots": round(slots - busy / sending, 2) if sending > 0 else 0.0,
        "tail_s": round(last_end - last_start, 2),
        "trail_s": round(run_ended - last_end, 2),
        "bound_s": round(greedy_makespan((e - s for s, e in spans), slots), 2),
    }
