"""What the chunks of one run share in one process: its config, clients, limits and claims."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline import spec
from pipeline.constants import DEFAULT_CONCURRENCY
from pipeline.engine import layout, progress
from pipeline.engine.claims import Claims
from pipeline.engine.client import EditClient, ResponseFormat
from pipeline.engine.done_keys import DoneKeys
from pipeline.engine.results import KeptParts, ResultRow
from pipeline.engine.retry import RetryPolicy
from pipeline.engine.run_control import (
    ApiHealth,
    BatchedPermits,
    Budget,
    RequestSlots,
    RunStop,
    StorageHealth,
)
from pipeline.engine.source_digests import SourceDigests
from pipeline.engine.sources import SourceLoader
from pipeline.io.local_storage import LocalStorage
from pipeline.io.storage import Storage
from pipeline.models.profile import ModelProfile

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

T = TypeVar("T")

# Rows being loaded or stored besides those waiting on the API, per unit of concurrency.
WORKERS_PER_SLOT = 2


@dataclass(frozen=True)
class RunConfig:
    # The most requests in flight; unless `fixed_concurrency`, the ceiling of an adaptive
    # limit that starts low, backs off on 429s and climbs while the API keeps up.
    concurrency: int = DEFAULT_CONCURRENCY
    fixed_concurrency: bool = False
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    response_format: ResponseFormat = "b64_json"
    overwrite: bool = False
    price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD
    max_cost_usd: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.max_cost_usd is not None and self.max_cost_usd < 0:
            raise ValueError("max_cost_usd must not be negative")


class RunContext:
    """What the chunks of one run share in one process: clients, limits, claims, the done set."""

    def __init__(
        self,
        *,
        run_id: str,
        storage: Storage,
        client: EditClient,
        loader: SourceLoader,
        config: RunConfig,
        done_keys: DoneKeys | None = None,
        check_unindexed: bool = False,
        io_executor: ThreadPoolExecutor | None = None,
        only_rows: set[int] | None = None,
        claims: Claims | None = None,
        profile: ModelProfile | None = None,
        orphaned: set[str] | None = None,
        learned_concurrency: int | None = None,
        source_digests: SourceDigests | None = None,
    ) -> None:
        self.run_id = layout.check_run_id(run_id)
        # The run's model profile: what each request may send (see edit.fit_request).
        self.profile = profile or client.profile
        self.storage = storage
        self.client = client
        self.loader = loader
        self.config = config
        self.done_keys = done_keys if done_keys is not None else DoneKeys()
        # The done index may miss jobs that a chunk without claims committed: check a job's
        # sidecar before editing it (see pipeline.engine.done_index).
        self.check_unindexed = check_unindexed
        # Jobs a dead holder had claimed and may have paid for (see done_index.DoneJobs).
        self.orphaned: set[str] = orphaned or set()
        self.stop = RunStop()
        self.storage_health = StorageHealth(self.stop)
        self.api_health = ApiHealth(self.stop)
        self.budget = Budget(config.max_cost_usd)
        # The edit requests in flight (see run_control.RequestSlots, pipeline.engine.adaptive).
        self.slots = RequestSlots(
            config.concurrency,
            adaptive=not config.fixed_concurrency,
            learned=learned_concurrency,
        )
        self.slots.on_change = self._publish_concurrency
        self.stop.on_trip.append(self.slots.reopen)
        self._inflight: dict[str, asyncio.Future[ResultRow]] = {}
        self.io_executor = io_executor or io_thread_pool(config.concurrency)
        # When set, rows not in it end `skipped` (not selected) without any I/O.
        self.only_rows = only_rows
        # When set, every request takes a permit first (a shared rate limit).
        self.permits: BatchedPermits | None = None
        # One claim per job edited, across runs; None: this run is the output's only writer.
        self.claims = claims
        # Results parts that could not be written: kept here, written with the final table.
        self.unwritten_parts: dict[str, bytes] = {}
        # Index upkeep to run beside the rows (see done_index.DoneJobs.merge), or None.
        self.index_upkeep: Callable[[], None] | None = None
        # The digests of sources the output knows, and those this run read (source_digests).
        self.source_digests = source_digests if source_digests is not None else SourceDigests()
        # Results parts written, kept to merge the run's table from memory (see KeptParts);
        # not from a local folder, where reading one back costs what holding it would save.
        self.kept_parts = KeptParts(0 if isinstance(storage, LocalStorage) else None)

    def start(self) -> None:
        """Start what runs beside the rows: the renewal of claims and open markers."""
        self.slots.begin()
        if self.claims is not None:
            self.claims.start()

    def _publish_concurrency(self, limit: int) -> None:
        progress.publish_concurrency(self.run_id, limit, self.slots.ceiling, self.slots.mode)

    def set_concurrency(self, limit: int) -> None:
        """Change the most requests in flight (e.g. to the global slots leased): an adaptive
        limit keeps adapting below it."""
        self.config = replace(self.config, concurrency=limit)
        self.slots.set_ceiling(limit)

    async def io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self.io_executor, partial(fn, *args, **kwargs)
        )

    def close(self) -> None:
        self.stop.close()
        self.io_executor.shutdown(wait=True)


def io_thread_pool(concurrency: int) -> ThreadPoolExecutor:
    """Threads for blocking storage and source I/O (boto3, files), sized to the concurrency.

    asyncio's default pool has only cpu+4 threads: at concurrency 64 writes would queue.
    """
    return ThreadPoolExecutor(
        max_workers=max(8, concurrency * WORKERS_PER_SLOT), thread_name_prefix="imgedit-io"
    )


# --- result rows ---------------------------------------------------------------------------
