"""When and how long to retry an edit: tenacity over the `retryable` flag of the error tree."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_any,
    stop_before_delay,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from pipeline.constants import DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_RETRY_SECONDS
from pipeline.constants import MAX_RETRY_AFTER_S as MAX_RETRY_AFTER_S  # re-exported
from pipeline.errors import APIError, APIStatusError

INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
# Full jitter on top of the exponential step, so many workers do not retry in lockstep.
JITTER_FRACTION = 0.5
# MAX_RETRY_AFTER_S (from spec, re-exported here): a server asking for more is treated as
# asking for that; errors.parse_retry_after applies it already, retry_after_of once more.


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_seconds: float = DEFAULT_MAX_RETRY_SECONDS
    initial_backoff_s: float = INITIAL_BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.max_seconds <= 0:
            raise ValueError("max_seconds must be positive")


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, APIError) and exc.retryable


def retry_after_of(exc: BaseException | None) -> float | None:
    """The wait the server asked for (Retry-After / retry-after-ms), capped, if any."""
    if isinstance(exc, APIStatusError) and exc.retry_after is not None:
        return min(exc.retry_after, MAX_RETRY_AFTER_S)
    return None


class wait_retry_after_or_backoff(wait_base):
    """Honour the server's Retry-After; otherwise capped exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.rng = rng or random.Random()

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        asked = retry_after_of(exc)
        if asked is not None:
            # A little jitter past the asked time keeps waiters from arriving together.
            return asked + self.rng.uniform(0, min(1.0, asked * 0.1 + 0.05))
        step = min(self.maximum, self.initial * 2.0 ** (retry_state.attempt_number - 1))
        jitter: float = self.rng.uniform(0, step * JITTER_FRACTION)
        return step * (1 - JITTER_FRACTION) + jitter


class _stop_when(stop_base):
    def __init__(self, predicate: Callable[[], bool] | None) -> None:
        self.predicate = predicate

    def __call__(self, retry_state: RetryCallState) -> bool:
        return bool(self.predicate and self.predicate())


def retrying(
    policy: RetryPolicy,
    *,
    should_stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncRetrying:
    """An AsyncRetrying for one row: retryable errors only, the last error re-raised.

    `should_stop` lets the run end retries early (a run-fatal error elsewhere, a budget), and
    `sleep` (the run's, cut short when it stops) keeps a stopped run from waiting out a
    backoff or a Retry-After. The time limit counts the coming backoff too, so a row never
    sleeps past its budget.
    """

    stop = stop_any(
        stop_after_attempt(policy.max_attempts),
        stop_before_delay(policy.max_seconds),
        _stop_when(should_stop),
    )
    return AsyncRetrying(
        sleep=asyncio.sleep if sleep is None else sleep,
        stop=stop,
        wait=wait_retry_after_or_backoff(policy.initial_backoff_s, policy.max_backoff_s),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )
