"""How many edit requests a run keeps in flight when it adapts: AIMD, as TCP does.

`AimdLimit` is pure bookkeeping (no I/O, no event loop): the run's request slots
(`pipeline.engine.run_control.RequestSlots`) ask it for the current limit and tell it how each
request started and ended.

- It starts low (`min(START_LIMIT, ceiling)`), at a given start, or at the limit an earlier
  run against the same API and model ended at (`learned`, see `engine.learned_limit`), in
  slow start from there: a limit a passing storm left low climbs back within a round trip or
  two (as if it had been refused there, it would take dozens), and an API that admits K
  refuses one wave above K, as the first run's climb did.
- Only an overload answer the run's own load explains counts: one to a request that started
  at a level (requests in flight besides it) few of the last RECENT_ANSWERS answers reached,
  or at which at least LOAD_SHARE of those were refused (the API's capacity; a limit on
  everything). A storm that refuses a few requests at levels that mostly go through (the
  gateway's bursts of 429s and 502s come so) is weather: those rows retry, the limit stays.
- A counted 429 takes one slot away, and so does each further 429 answered to the same wave
  of requests (those started before the cut), down to WAVE_FLOOR of where the wave began:
  an API that admits K at once refuses about as many requests as the run is over K, so one
  wave finds K without the sawtooth a multiplicative cut leaves (0.7x of K+1 averages 85%
  of K). A limit that refuses everything halves the limit per wave, as a cut would.
- Counted 5xx overload answers (503s / 502 ALL_PROVIDERS_EXHAUSTED: two in one window) say
  nothing of by how much: they cut the limit to `limit * BACKOFF`.
- Either opens a new window: only a request started after the cut can cut again, so one
  burst of answers to the same wave counts once as a cut.
- Until the first cut it climbs fast ("slow start", as TCP): one more slot for every request
  answered that started with every slot taken, so the limit doubles each round trip and a
  healthy API reaches the ceiling within a few dozen answers instead of thousands.
- After a cut it climbs as fast back to the level the cut's wave was refused at (below it
  requests went through), then by one for every `limit` such answers (an idle run proves
  nothing about the API, so it does not climb). As many answers above that level as the
  level itself (about a round trip's worth) with no cut between show the refusal was
  weather, not the API's capacity: slow start again. Without this, one storm early in a
  long-latency run (p50 2.5 s) left it crawling up by one slot a round trip for minutes.
- Never below 1, never above the ceiling (`concurrency`, or fewer leased global slots).

It keeps a curve of (seconds since it began, limit) points, one a change, downsampled to at
most `max_points` so a run of a million rows does not grow it without bound.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

START_LIMIT = 4
# The cut on a burst of 5xx overload answers, which do not say by how much the run is over.
BACKOFF = 0.7
# The refusals (429s) of one wave take the limit down by one each, never below this share
# of where the wave began: the next wave, if still refused, cuts again.
WAVE_FLOOR = 0.5
# Answers remembered to tell an overload the run's load explains from a passing storm. The
# gateway's storms refuse ~9% of requests on average but often two at once within 64 answers
# (a quarter refused: read as load); over 256 they average out, and a real overload (a
# capacity that drops) still shows within about a round trip at C = 64.
RECENT_ANSWERS = 256
# Fewer recent answers at a level than this say too little of it: a refusal there counts.
MIN_RECENT = 8
# The share of recent answers at or above a level refused that makes a refusal there load.
LOAD_SHARE = 0.25
# 5xx overload answers (503, 502 ALL_PROVIDERS_EXHAUSTED) in one window before a cut: a lone
# one is a provider's hiccup, not a sign the run asks too much.
SERVER_OVERLOADS_TO_CUT = 2
MAX_CURVE_POINTS = 200


@dataclass(frozen=True)
class Ticket:
    """What the limit needs to know of one request when it ends: when it started."""

    seq: int
    saturated: bool
    level: int = 0  # requests in flight besides this one when it started


class AimdLimit:
    """The current limit on requests in flight, additive increase, multiplicative decrease."""

    def __init__(
        self,
        ceiling: int,
        *,
        start: int | None = None,
        learned: int | None = None,
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
        if learned is not None:
            start = learned
        self.limit = self._clamp(START_LIMIT if start is None else start)
        self.start = self.limit
        self.learned = learned is not None
        self.answers = 0  # requests answered (went through or refused)
        self._started = 0  # requests started so far (each one's Ticket.seq)
        self._window_start = 0  # first seq that may cut again
        self._wave_floor = 1  # the lowest the refusals of the wave last cut may take it
        # Recent answers: (level, refused), oldest first.
        self._recent: deque[tuple[int, bool]] = deque(maxlen=RECENT_ANSWERS)
        self._clear_above = 0  # answers above the last cut's refused level since that cut
        self.storms = 0  # overload answers not counted: weather, not load
        # The lowest level a request of the last cut's wave was refused at (None: none, or
        # since shown to be weather).
        self._refused_level: int | None = None
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
        return Ticket(seq, in_flight + 1 >= self.limit, in_flight)

    def succeeded(self, ticket: Ticket) -> None:
        """An answered request: a step up after `limit` of them that started saturated."""
        self.answers += 1
        self._recent.append((ticket.level, False))
        refused_at = self._refused_level
        if refused_at is not None and ticket.level > refused_at:
            self._clear_above += 1
            if self._clear_above >= max(MIN_RECENT, refused_at):
                # A round trip's worth answered above where the last cut was refused: that
                # was weather, and the limit may climb fast again.
                self._refused_level = None
                self.slow_start = True
        if not ticket.saturated:
            return
        self._successes += 1
        # Below the level the last cut was refused at, requests went through: climb back fast
        # to it (a limit of L sends at levels up to L - 1), not past it.
        recovering = refused_at is not None and self.limit < refused_at
        if self.slow_start or recovering or self._successes >= self.limit:
            self._successes = 0
            self._server_overloads = 0
            self._set(self._clamp(self.limit + 1))

    def overloaded(self, ticket: Ticket, *, rate_limited: bool = True) -> bool:
        """A 429 (`rate_limited`) or a 5xx overload answer; True when it opened a new cut
        (a 429 to the wave already cut may still take one more slot away)."""
        self.answers += 1
        self._recent.append((ticket.level, True))
        if ticket.seq < self._window_start:
            # Answered to a wave of requests sent before the last cut: a 429 says by how
            # many that wave was over, one each; a 5xx says nothing more.
            if rate_limited and self.limit > self._wave_floor:
                self._set(self.limit - 1)
                if self._refused_level is not None:
                    self._refused_level = min(self._refused_level, ticket.level)
            return False
        if not self._load_explains(ticket):
            self.storms += 1
            return False
        if not rate_limited:
            self._server_overloads += 1
            if self._server_overloads < SERVER_OVERLOADS_TO_CUT:
                return False
        self._window_start = self._started
        self._wave_floor = max(1, math.floor(self.limit * WAVE_FLOOR))
        self._successes = 0
        self._server_overloads = 0
        self.slow_start = False
        self._refused_level = ticket.level
        self._clear_above = 0
        self.cuts += 1
        if rate_limited:
            self._set(self._clamp(self.limit - 1))
        else:
            self._set(self._clamp(math.floor(self.limit * self.backoff)))
        return True

    def _load_explains(self, ticket: Ticket) -> bool:
        """Whether the run asked too much: few recent answers at this level or above, or a
        LOAD_SHARE of them refused (this refusal included)."""
        here = [refused for level, refused in self._recent if level >= ticket.level]
        return len(here) < MIN_RECENT or sum(here) >= LOAD_SHARE * len(here)

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


__all__ = [
    "BACKOFF",
    "LOAD_SHARE",
    "MAX_CURVE_POINTS",
    "RECENT_ANSWERS",
    "START_LIMIT",
    "WAVE_FLOOR",
    "AimdLimit",
    "Ticket",
    "downsample",
]
