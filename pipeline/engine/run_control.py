"""What stops or holds back a run's requests: the stop switch, the budget, the request slots.

- `RunStop`: once tripped, no request of the run starts. A run-fatal API error (401, 402,
  unknown model), storage that keeps failing (`StorageHealth`) and an interrupt (Ctrl-C,
  SIGTERM) trip it. An interrupt lets the requests in flight finish for DRAIN_GRACE_S, then
  abandons them (each counted as a possible charge).
- `Budget`: no request starts once spent plus in flight could pass `--max-cost`.
- `BatchedPermits`: a shared requests-per-minute limit, fetched a batch at a time.
- `RequestSlots`: the requests in flight, at most `concurrency` (fixed), or at most what the
  AIMD limit of `pipeline.engine.adaptive` allows now (adaptive), through a `ResizableGate`.
  A 429 with Retry-After answers a fixed limit by keeping the slot it came back on closed
  for the wait (an adaptive limit cuts itself instead); either way the refused row waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pipeline import constants
from pipeline.engine.adaptive import AimdLimit, Ticket
from pipeline.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    ProvidersExhaustedError,
    RateLimitError,
    StorageError,
)

log = logging.getLogger(__name__)

# Why rows not attempted were skipped (the results' `reason`).
STOPPED = "stopped"
INTERRUPTED = "interrupted"
# After an interrupt, requests in flight get this long to answer and be stored; past it they
# are abandoned (the API may still charge them: each counts as a possible double charge).
DRAIN_GRACE_S = 30.0
# Storage failures of any kind in a row before the run stops starting edits it could not
# store; a fatal one (no space, read-only, access denied) stops it at once.
STORAGE_FAILURES_TO_STOP = 3
# Connection failures in a row (nothing sent) before any answer that stop the run.
UNREACHABLE_TO_STOP = 3


class RunStopped(Exception):
    """Internal: the run stopped before this row's next attempt could start."""


class BudgetExhausted(Exception):
    """Internal: starting this request could pass the run's --max-cost."""


class Abandoned(Exception):
    """Internal: an interrupted run stopped waiting for this request's answer."""


class RunStop:
    """The run's stop switch: why it tripped, and the requests in flight it may abandon."""

    def __init__(self, drain_grace_s: float = DRAIN_GRACE_S) -> None:
        self.kind: str | None = None  # STOPPED or INTERRUPTED
        self.reason: str | None = None
        self.code: str | None = None
        self.error: BaseException | None = None
        self.drain_grace_s = drain_grace_s
        self.abandoning = False
        self._in_flight: set[asyncio.Task[object]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._tripped = asyncio.Event()
        # Called once when it trips: what holds rows back must let them see the stop.
        self.on_trip: list[Callable[[], None]] = []

    @property
    def stopped(self) -> bool:
        return self.kind is not None

    @property
    def interrupted(self) -> bool:
        return self.kind == INTERRUPTED

    def _trip(self, kind: str, reason: str, code: str, error: BaseException | None) -> bool:
        if self.kind is not None:
            return False
        self.kind, self.reason, self.code, self.error = kind, reason, code, error
        self._tripped.set()
        for callback in self.on_trip:
            callback()
        return True

    async def sleep(self, seconds: float) -> None:
        """A row's wait between attempts (backoff, Retry-After): cut short when it trips."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tripped.wait(), max(0.0, seconds))

    def trip(self, exc: APIError) -> None:
        """A run-fatal API error (401, 402, unknown model)."""
        if self._trip(STOPPED, str(exc), exc.error_code, exc):
            log.error("run stopped: %s", exc)

    def trip_storage(self, exc: StorageError, failures: int) -> None:
        """Storage that cannot take results: every edit from now on would be paid for nothing."""
        why = "a fatal storage error" if exc.fatal else f"{failures} storage failures in a row"
        if self._trip(STOPPED, f"{why}: {exc}", "storage_error", exc):
            log.error("run stopped starting edits after %s: %s", why, exc)

    def trip_unreachable(self, exc: APIError, failures: int) -> None:
        """The API could not be reached `failures` times in a row before any answer."""
        reason = f"the API cannot be reached ({failures} attempts in a row, none answered): {exc}"
        if self._trip(STOPPED, reason, "api_unreachable", exc):
            log.error("run stopped: %s", reason)

    def interrupt(self, reason: str) -> None:
        """Stop starting requests; abandon those in flight after the drain grace."""
        if not self._trip(INTERRUPTED, reason, "interrupted", None):
            return
        log.warning(
            "%s: no new requests; waiting up to %g s for the %d in flight",
            reason,
            self.drain_grace_s,
            len(self._in_flight),
        )
        with contextlib.suppress(RuntimeError):  # no running loop: nothing is in flight
            self._timer = asyncio.get_running_loop().call_later(
                self.drain_grace_s, self.abandon_in_flight
            )

    def abandon_in_flight(self) -> None:
        """Cancel every request still waiting for its answer (see `request`)."""
        self.abandoning = True
        for task in list(self._in_flight):
            task.cancel()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around one request: abandoned (raises Abandoned) if the drain grace runs out."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        if self.abandoning:
            raise Abandoned
        self._in_flight.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if not self.abandoning:
                raise
            task.uncancel()
            raise Abandoned from None
        finally:
            self._in_flight.discard(task)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class StorageHealth:
    """Counts storage failures in a row; trips the stop switch when writing is hopeless."""

    def __init__(self, stop: RunStop, limit: int = STORAGE_FAILURES_TO_STOP) -> None:
        self.stop = stop
        self.limit = limit
        self.failures = 0

    def ok(self) -> None:
        self.failures = 0

    def failed(self, exc: StorageError) -> None:
        self.failures += 1
        if exc.fatal or self.failures >= self.limit:
            self.stop.trip_storage(exc, self.failures)


class ApiHealth:
    """Before the API has answered once, an API that cannot be reached stops the run.

    A host that does not resolve or refuses connections UNREACHABLE_TO_STOP times in a row,
    while no request of the run has yet been answered, is a wrong API base or a network
    without a route to it: every row would fail after all its attempts. Nothing was sent, so
    nothing was paid. Once the API has answered, such errors are passing weather: retried.
    """

    def __init__(self, stop: RunStop, limit: int = UNREACHABLE_TO_STOP) -> None:
        self.stop = stop
        self.limit = limit
        self.answered = False
        self.unreachable = 0

    def failed(self, exc: APIError) -> None:
        if self.answered or exc.may_have_charged or not isinstance(exc, APIConnectionError):
            self.unreachable = 0
            return
        self.unreachable += 1
        if self.unreachable >= self.limit:
            self.stop.trip_unreachable(exc, self.unreachable)


class Budget:
    """`--max-cost`: no request starts once spent plus in flight could pass the limit.

    Each attempt reserves its worst case (n x price) before it starts and settles to what
    the API reported, or to the worst case when the answer was lost or its cost is not
    trusted: no answer can make the run spend more than the limit.
    """

    def __init__(self, max_cost_usd: float | None) -> None:
        self.max_cost_usd = max_cost_usd
        self.spent = 0.0
        self.in_flight = 0.0
        self.refused = False

    @property
    def exhausted(self) -> bool:
        return self.refused

    def reserve(self, amount: float) -> bool:
        if self.max_cost_usd is not None and (
            self.spent + self.in_flight + amount > self.max_cost_usd + 1e-9
        ):
            self.refused = True
            return False
        self.in_flight += amount
        return True

    def settle(self, reserved: float, charged: float | None) -> None:
        self.in_flight -= reserved
        if charged is None or not math.isfinite(charged) or charged < 0:
            charged = reserved
        self.spent += charged


class BatchedPermits:
    """Permits for requests (e.g. a requests-per-minute limit) fetched `batch` at a time.

    Fetching a permit from a remote limiter costs a round trip; one fetch per batch keeps that
    off the per-request path.
    """

    def __init__(self, take: Callable[[int], Awaitable[None]], batch: int) -> None:
        self._take = take
        self.batch = batch
        self._left = 0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            if self._left == 0:
                await self._take(self.batch)
                self._left = self.batch
            self._left -= 1


class ResizableGate:
    """A semaphore whose capacity can change: waiters are let in when it rises; when it drops,
    those inside stay and no one enters until below it.

    Waiters enter by `rank` (lowest first), then in arrival order; all of the same rank: first
    come, first served. The run's slots rank a retry before rows not sent yet, and among those
    the lower row number first (see `RequestSlots.slot`).
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self.in_flight = 0
        self.max_in_flight = 0
        self._waiters: list[tuple[tuple[int, ...], int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()
        self.waiting = 0  # waiters not cancelled (the heap keeps cancelled ones until popped)

    @property
    def capacity(self) -> int:
        return self._capacity

    def resize(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._wake()

    async def acquire(self, rank: tuple[int, ...] = ()) -> None:
        if not self.waiting and self.in_flight < self._capacity:
            self._enter()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._arrivals), waiter))
        self.waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # let in just as it was cancelled: hand the place on
            else:
                waiter.cancel()  # left in the heap, skipped when it comes up
                self.waiting -= 1
            raise

    def release(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _enter(self) -> None:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _wake(self) -> None:
        while self._waiters and self.in_flight < self._capacity:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                self.waiting -= 1
                self._enter()
                waiter.set_result(None)


ConcurrencyMode = Literal["adaptive", "fixed"]


def is_overload(exc: BaseException) -> bool | None:
    """True for a 429, False for a 5xx overload (503, 502 ALL_PROVIDERS_EXHAUSTED), None for
    anything else (no sign the run asks too much)."""
    if isinstance(exc, RateLimitError):
        return True
    if isinstance(exc, ProvidersExhaustedError) or (
        isinstance(exc, APIStatusError) and exc.status == 503
    ):
        return False
    return None


@dataclass
class Slot:
    """One request's place among the run's slots: its ticket for the adaptive limit, and how
    long the place stays closed after the request (a fixed limit's answer to a 429)."""

    ticket: Ticket
    closed_for: float = 0.0


class RequestSlots:
    """The run's edit requests in flight: at most `ceiling` (fixed), or at most the AIMD
    limit's current value (adaptive), which never passes the ceiling."""

    def __init__(
        self,
        ceiling: int,
        *,
        adaptive: bool = True,
        start: int | None = None,
        learned: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.aimd = (
            AimdLimit(ceiling, start=start, learned=learned, clock=clock) if adaptive else None
        )
        self._ceiling = ceiling
        self.gate = ResizableGate(self.limit)
        self._closed: set[asyncio.TimerHandle] = set()
        self._may_close = True  # until the run stops (see `reopen`)
        # Told the limit each time it changes (and at `begin`): progress events.
        self.on_change: Callable[[int], None] | None = None

    @property
    def mode(self) -> ConcurrencyMode:
        return "fixed" if self.aimd is None else "adaptive"

    @property
    def fixed(self) -> bool:
        return self.aimd is None

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @property
    def limit(self) -> int:
        """How many requests may be in flight now."""
        return self._ceiling if self.aimd is None else self.aimd.limit

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

    def begin(self) -> None:
        """The run's requests start now (the adaptive curve's time zero)."""
        if self.aimd is not None:
            self.aimd.begin()
        self._changed()

    def _changed(self) -> None:
        self.gate.resize(self.limit)
        if self.on_change is not None:
            self.on_change(self.limit)

    def set_ceiling(self, ceiling: int) -> None:
        """The most requests in flight from now on (the global slots the run leased)."""
        self._ceiling = ceiling
        if self.aimd is not None:
            self.aimd.set_ceiling(ceiling)
        self._changed()

    @contextlib.asynccontextmanager
    async def slot(self, *, retry: bool = False, row: int = 0) -> AsyncIterator[Slot]:
        """One request's place in flight; `answered` or `failed` with it after the request.

        The next free place goes to a `retry` first (its row waited its backoff already, and
        at the run's end the rows with the longest chains of attempts decide when it ends),
        then to the lowest `row`: the run's oldest chunk finishes its rows while the next one
        fills the slots it leaves, instead of both sharing them and ending together, each end
        leaving slots empty while its last answers come in.
        """
        await self.gate.acquire((0 if retry else 1, row))
        held = Slot(Ticket(0, True))
        try:
            others = self.gate.in_flight - 1
            if self.aimd is not None:
                held = Slot(self.aimd.started(others))
            yield held
        finally:
            if held.closed_for > 0:
                # The place comes back when the server's wait is over, whatever the row does.
                handle: asyncio.TimerHandle | None = None

                def reopen() -> None:
                    self._closed.discard(handle)
                    self.gate.release()

                handle = asyncio.get_running_loop().call_later(held.closed_for, reopen)
                self._closed.add(handle)
            else:
                self.gate.release()

    def reopen(self) -> None:
        """Every place a 429 closed opens now, and none closes from now on (the run stopped:
        rows waiting for a place must get one to see it)."""
        self._may_close = False
        for handle in list(self._closed):
            handle.cancel()
            self._closed.discard(handle)
            self.gate.release()

    def answered(self, slot: Slot) -> None:
        if self.aimd is not None:
            before = self.aimd.limit
            self.aimd.succeeded(slot.ticket)
            if self.aimd.limit != before:
                self._changed()

    def failed(self, slot: Slot, exc: BaseException) -> None:
        overload = is_overload(exc)
        if overload is None:
            return
        if self.aimd is None:
            if isinstance(exc, RateLimitError) and exc.retry_after and self._may_close:
                # A fixed limit's answer to "wait": this place stays closed for the wait, the
                # others go on. Against a storm that refuses a few requests in passing it
                # costs a slot for a second; against a real rate limit it still sends at most
                # one request per slot per Retry-After (a pause of the whole run cost ~4% of
                # the gateway weather's ideal: every slot that freed during it stood idle).
                slot.closed_for = min(exc.retry_after, constants.MAX_RETRY_AFTER_S)
            return
        before = self.aimd.limit
        if self.aimd.overloaded(slot.ticket, rate_limited=overload):
            log.info(
                "API overloaded (%s): at most %d requests in flight now (was %d)",
                exc,
                self.aimd.limit,
                before,
            )
        if self.aimd.limit != before:
            self._changed()

    def report(self) -> dict[str, Any]:
        """What the summary says of the run's concurrency."""
        report: dict[str, Any] = {
            "mode": self.mode,
            "ceiling": self._ceiling,
            "final": self.limit,
            "curve": [] if self.aimd is None else [[t, n] for t, n in self.aimd.curve],
        }
        if self.aimd is not None:
            # Why the curve moved: push-back counted as load, and push-back judged weather.
            report["cuts"] = self.aimd.cuts
            report["storms"] = self.aimd.storms
            report["start"] = self.aimd.start
            report["learned"] = self.aimd.learned
            report["answers"] = self.aimd.answers
        return report


__all__ = [
    "DRAIN_GRACE_S",
    "INTERRUPTED",
    "STOPPED",
    "Abandoned",
    "ApiHealth",
    "BatchedPermits",
    "Budget",
    "BudgetExhausted",
    "ConcurrencyMode",
    "RequestSlots",
    "ResizableGate",
    "RunStop",
    "RunStopped",
    "Slot",
    "StorageHealth",
]
