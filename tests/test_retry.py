"""Retry policy: what is retried, how long it waits, when it gives up."""

from __future__ import annotations

import math
import random

import pytest
from tenacity import RetryCallState

from pipeline import constants, errors
from pipeline.engine.retry import (
    MAX_BACKOFF_S,
    MAX_RETRY_AFTER_S,
    RetryPolicy,
    is_retryable,
    retrying,
    wait_retry_after_or_backoff,
)


def state_after(exc: BaseException, attempt: int) -> RetryCallState:
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


def rate_limited(after: float | None) -> errors.RateLimitError:
    return errors.RateLimitError("slow down", status=429, code="RATE_LIMITED", retry_after=after)


def test_retry_after_is_honoured_and_capped() -> None:
    wait = wait_retry_after_or_backoff(0.5, 30.0, random.Random(1))
    assert 7.0 <= wait(state_after(rate_limited(7.0), 1)) <= 8.0
    assert MAX_RETRY_AFTER_S <= wait(state_after(rate_limited(9999.0), 1)) <= MAX_RETRY_AFTER_S + 1


def test_the_cap_lives_in_spec_and_is_applied_where_the_value_is_made() -> None:
    assert MAX_RETRY_AFTER_S == constants.MAX_RETRY_AFTER_S == 120.0
    # Every user of `retry_after` (a fixed limit's closed slot too) sees a capped value.
    asked = errors.parse_retry_after({"Retry-After": "999999"})
    assert asked == MAX_RETRY_AFTER_S
    assert rate_limited(1e9).retry_after == MAX_RETRY_AFTER_S
    assert rate_limited(math.inf).retry_after == MAX_RETRY_AFTER_S
    assert rate_limited(math.nan).retry_after is None
    assert rate_limited(-3.0).retry_after is None
    wait = wait_retry_after_or_backoff(0.5, 30.0, random.Random(3))
    assert MAX_RETRY_AFTER_S <= wait(state_after(rate_limited(asked), 1)) <= MAX_RETRY_AFTER_S + 1


def test_garbage_retry_after_falls_back_to_backoff() -> None:
    wait = wait_retry_after_or_backoff(0.5, 30.0, random.Random(4))
    for after in (math.nan, -3.0):
        waited = wait(state_after(rate_limited(after), 1))
        assert math.isfinite(waited) and 0.25 <= waited <= 0.5


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    wait = wait_retry_after_or_backoff(0.5, MAX_BACKOFF_S, random.Random(2))
    exc = errors.ServerError("boom", status=500)
    first = [wait(state_after(exc, 1)) for _ in range(50)]
    assert all(0.25 <= w <= 0.5 for w in first)
    assert len({round(w, 6) for w in first}) > 1  # jittered
    late = [wait(state_after(exc, 30)) for _ in range(50)]
    assert all(MAX_BACKOFF_S / 2 <= w <= MAX_BACKOFF_S for w in late)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (errors.BadRequestError("bad", status=400), False),
        (errors.AuthenticationError("key", status=401), False),
        (errors.InsufficientBalanceError("money", status=402), False),
        (errors.RequestTimeoutError("t", status=408), True),
        (errors.ConflictError("c", status=409), True),
        (rate_limited(None), True),
        (errors.ServerError("s", status=503), True),
        (errors.ProvidersExhaustedError("p", status=502), True),
        (errors.APIConnectionError("dropped"), True),
        (errors.APIResponseError("not json"), True),
        (errors.ResponseTooLargeError("huge"), False),
        (ValueError("a bug"), False),
    ],
)
def test_what_is_retried(exc: BaseException, expected: bool) -> None:
    assert is_retryable(exc) is expected


async def test_gives_up_after_max_attempts_and_reraises_the_last_error() -> None:
    calls = 0
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.001, max_backoff_s=0.002)
    with pytest.raises(errors.ServerError, match="attempt 3"):
        async for attempt in retrying(policy):
            with attempt:
                calls += 1
                raise errors.ServerError(f"attempt {calls}", status=500)
    assert calls == 3


async def test_an_external_stop_ends_retries_at_once() -> None:
    calls: list[int] = []
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.001, max_backoff_s=0.002)
    with pytest.raises(errors.ServerError):
        async for attempt in retrying(policy, should_stop=lambda: len(calls) >= 2):
            with attempt:
                calls.append(1)
                raise errors.ServerError("boom", status=500)
    assert len(calls) == 2


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(max_seconds=0)
