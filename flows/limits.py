"""One API limit across runs and workers: Prefect global concurrency slots, leased in blocks.

An acquire plus release costs 55-100 ms on a local Prefect server, so a slot per request would
cost more than the request. A run (or a shard of one) instead leases k slots once
(`concurrency(name, occupy=k)`), runs up to k requests under its own local limit (an adaptive
one stays at or below k, see pipeline.engine.adaptive), and gives the slots back when it ends.
Prefect renews the lease while the holder lives and frees the slots when a crashed holder's
lease expires, so the sum of held slots never passes the limit and nothing stays stuck.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prefect.client.orchestration import get_client
from prefect.concurrency.asyncio import concurrency, rate_limit
from prefect.exceptions import ObjectNotFound

from pipeline.engine.run_control import BatchedPermits

# Renewed by Prefect in the background; short enough that a crashed holder's slots come back
# within a minute or two.
LEASE_SECONDS = 60.0

_warned: set[str] = set()


def rate_limit_name(name: str) -> str:
    return f"{name}-rpm"


async def read_limit(name: str, *, decaying: bool = False) -> int | None:
    """The active global limit called `name` (with slot decay if asked), or None."""
    async with get_client() as client:
        try:
            limit = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None
    if not limit.active or (decaying and not limit.slot_decay_per_second):
        return None
    return int(limit.limit)


async def rate_permits(name: str | None, batch: int) -> BatchedPermits | None:
    """Requests-per-minute permits from the `<name>-rpm` rate limit, taken `batch` at a time."""
    if not name:
        return None
    rpm_name = rate_limit_name(name)
    limit = await read_limit(rpm_name, decaying=True)
    if limit is None:
        return None

    async def take(n: int) -> None:
        await rate_limit(rpm_name, occupy=n, strict=True)

    return BatchedPermits(take, batch=max(1, min(batch, limit)))


@asynccontextmanager
async def api_slots(
    name: str | None, wanted: int, logger: logging.Logger | logging.LoggerAdapter[logging.Logger]
) -> AsyncIterator[int]:
    """Lease up to `wanted` slots of the global limit `name`; yields how many to use at once.

    Without such a limit on the Prefect API (the ephemeral API has none unless created),
    the run keeps its local limit of `wanted` and says so once per process.
    """
    if not name:
        yield wanted
        return
    limit = await read_limit(name)
    if limit is None:
        if name not in _warned:
            _warned.add(name)
            logger.warning(
                "no global concurrency limit %r on this Prefect API: this run limits itself to "
                "%d requests in flight (create one with `imgedit setup --limit N`)",
                name,
                wanted,
            )
        yield wanted
        return
    k = max(1, min(wanted, limit))
    logger.info("waiting for %d of the %d slots of global limit %r", k, limit, name)
    async with concurrency(name, occupy=k, lease_duration=LEASE_SECONDS, strict=True):
        logger.info("holding %d slots of %r", k, name)
        yield k


async def setup_limit(name: str, limit: int, requests_per_minute: float | None = None) -> None:
    """Create or update the global limit (and, optionally, a requests-per-minute rate limit)."""
    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(name, limit)
        if requests_per_minute:
            await client.upsert_global_concurrency_limit_by_name(
                rate_limit_name(name),
                max(1, int(requests_per_minute)),
                slot_decay_per_second=requests_per_minute / 60.0,
            )
