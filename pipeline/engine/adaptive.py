"""How many edit requests a run keeps in flight when it adapts: AIMD, as TCP does.

`AimdLimit` is pure bookkeeping (no I/O, no event loop): the run's request slots
(`pipeline.engine.run_control.RequestSlots`) ask it for the current limit and tell it how each
request started and ended.

- It starts low (`min(START_LIMIT, ceiling)`) or at a given start (a value learned before).
- An overload signal (a 429; or a burst of 503s / 502 ALL_PROVIDERS_EXHAUSTED: two in one
  window) cuts the limit to `limit * BACKOFF`, at most once per window: only a request that
  started after the last cut can cut again, so one burst of answers to the same wave of
  requests counts once.
- Until the first cut it climbs fast ("slow start", as TCP): one more slot for every request
  answered that started with every slot taken, so the limit doubles each round trip and a
  healthy API reaches the ceiling within a few dozen answers instead of thousands.
- After that, while clear, it climbs by one for every `limit` such answers (an idle run
  proves nothing about the API, so it does not climb).
- Never below 1, never above the ceiling (`concurrency`, or fewer leased global slots).

It keeps a curve of (seconds since it began, limit) points, one a change, downsampled to at
most `max_points` so a run of a million rows does not grow it without bound.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

START_LIMIT = 4
BACKOFF = 0.7
# 5xx overload answers (503, 502 ALL_PROVIDERS_EXHAUSTED) in one window before a cut: a lone
# one is a provider's hiccup, not a sign the run asks too much.
SERVER_OVERLOADS_TO_CUT = 2
MAX_CURVE_POINTS = 200


@dataclass(frozen=True)
class Ticket:
    """What the limit needs to know of one request when it ends: when it started."""

    seq: int
    saturated: bool


class AimdLimit:
    """The current limit on requests in flight, additive increase, multiplicative decrease."""

    def __init__(
        self,
        ceiling: int,
        *,
        start: int | None = None,
        backoff: float = BACKOFF,
        max_points: int = MAX_CURVE_POINTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ceiling < 1:
            raise ValueError("ceiling must be at least 1")
        if not 0 < backoff < 1:
            raise ValueError("backoff must be between 0 and 1")
        if max_points < 4:
            raise ValueError("max_points must be at least 4")
        self.ceiling = ceiling
        self.backoff = backoff
        self.max_points = max_points
        self._clock = clock
        self._t0 = clock()
        self.limit = self._clamp(START_LIMIT if start is None else start)
        self._started = 0  # requests started so far (each one's Ticket.seq)
        self._window_start = 0  # first seq that may cut again
        self._successes = 0  # saturated successes since the last step up or cut
        self._server_overloads = 0  # 5xx overloads in the current window
        self.slow_start = True  # until the first cut
        self.cuts = 0
        self.curve: list[tuple[float, int]] = [(0.0, self.limit)]

    def _clamp(self, value: int) -> int:
        return max(1, min(int(value), self.ceiling))

    def begin(self) -> None:
        """The run's requests start now: the curve's clock starts again."""
        self._t0 = self._clock()
        self.curve = [(0.0, self.limit)]

    def set_ceiling(self, ceiling: int) -> None:
        """A new ceiling (the global slots leased): the limit comes down to it if above."""
        if ceiling < 1:
            raise ValueError("ceiling must be at least 1")
        self.ceiling = ceiling
        self._set(self._clamp(self.limit))

    def started(self, in_flight: int) -> Ticket:
        """A request starts with `in_flight` others already in flight."""
        seq = self._started
        self._started += 1
        return Ticket(seq, in_flight + 1 >= self.limit)

    def succeeded(self, ticket: Ticket) -> None:
        """An answered request: a step up after `limit` of them that started saturated."""
        if not ticket.saturated:
            return
        self._successes += 1
        if self.slow_start or self._successes >= self.limit:
            self._successes = 0
            self._server_overloads = 0
            self._set(self._clamp(self.limit + 1))

    def overloaded(self, ticket: Ticket, *, rate_limited: bool = True) -> bool:
        """A 429 (`rate_limited`) or a 5xx overload answer; True when the limit was cut."""
        if ticket.seq < self._window_start:
            return False  # answered to a wave of requests sent before the last cut
        if not rate_limited:
            self._server_overloads += 1
            if self._server_overloads < SERVER_OVERLOADS_TO_CUT:
                return False
        self._window_start = self._started
        self._successes = 0
        self._server_overloads = 0
        self.slow_start = False
        self.cuts += 1
        self._set(self._clamp(math.floor(self.limit * self.backoff)))
        return True

    def _set(self, limit: int) -> None:
        if limit == self.limit:
            return
        self.limit = limit
        self.curve.append((round(self._clock() - self._t0, 3), limit))
        if len(self.curve) > self.max_points:
            self.curve = downsample(self.curve, self.max_points // 2)


def downsample(points: list[tuple[float, int]], target: int) -> list[tuple[float, int]]:
    """About `target` of `points`, evenly spread, the first and the last kept."""
    if len(points) <= target:
        return list(points)
    step = (len(points) - 1) / (target - 1)
    kept = [points[round(i * step)] for i in range(target)]
    kept[-1] = points[-1]
    return kept


__all__ = ["BACKOFF", "MAX_CURVE_POINTS", "START_LIMIT", "AimdLimit", "Ticket", "downsample"]
