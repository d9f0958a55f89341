"""What one emulator instance remembers: its config, the ledger (balance, reservations,
charges, service time), the request log and counters, the fault draws' attempt counts, the
weather's chain, the cache of decoded sources and the stored result files."""

from __future__ import annotations

import asyncio
import os
from collections import Counter, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from pipeline import spec
from pipeline.emulator.answers import ErrorAnswer
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.faults import Draw, draw
from pipeline.emulator.render import Base, BaseCache, build_base
from pipeline.emulator.store import FileStore
from pipeline.emulator.validate import Edit
from pipeline.emulator.weather import OVERLOAD, GatewayChain, admits, weathered

# Attempt counts kept per request fingerprint, for replayable fault draws.
FINGERPRINT_MEMORY = 1_000_000


class EmulatorState:
    """Config, ledger, request log, caches: everything one emulator instance remembers.

    Used from the event loop only (the render threads get copies of what they need).
    """

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        threads = config.render_threads or os.cpu_count() or 2
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="render")
        self.bases = BaseCache(config.base_cache_size)
        self._pending_bases: dict[tuple[object, ...], asyncio.Future[Base]] = {}
        self.files = FileStore(config.file_store_bytes, config.file_ttl)
        self.log: deque[dict[str, Any]] = deque(maxlen=config.request_log_size)
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.charged_requests = 0
        self.charged_images = 0
        self.charged_micros = 0
        self.dry_runs = 0
        self.downloads = 0
        self.downloads_truncated = 0
        self.downloads_missing = 0
        self.images_rendered = 0
        self.service_seconds = 0.0
        self.rate_limited_overload = 0
        self.gateway = GatewayChain(self.config.fault_seed)
        self.by_status: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.seen: dict[str, int] = {}
        self.reserved_micros = 0
        self.balance_micros = _micros(self.config.balance_usd)
        self.log.clear()

    def apply_config(self, changes: Mapping[str, Any]) -> None:
        """Validates and applies `changes` at once; raises ConfigError naming the problem."""
        self.config = self.config.updated(changes)
        self.bases.max_entries = self.config.base_cache_size
        self.files.max_bytes = self.config.file_store_bytes
        self.files.ttl = self.config.file_ttl
        if self.log.maxlen != self.config.request_log_size:
            self.log = deque(self.log, maxlen=self.config.request_log_size)
        if "balance_usd" in changes:
            self.balance_micros = _micros(self.config.balance_usd)
        if "weather" in changes or "fault_seed" in changes:
            # A new weather or seed starts its storms afresh, so a run replays from here.
            self.gateway = GatewayChain(self.config.fault_seed)

    # --- the request log ---------------------------------------------------------------------

    def request_started(self, record: dict[str, Any]) -> None:
        """Logs an edit request (`record` is filled in as it goes) and counts it in flight."""
        self.log.append(record)
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def admits(self) -> bool:
        """Whether an edit request arriving now may start (the overloaded weather's gate)."""
        return admits(self.config, self.in_flight)

    def refused(self, record: dict[str, Any]) -> None:
        """Logs an edit request the overloaded weather refused: a 429, never in flight."""
        record.update(status=429, code="RATE_LIMITED", fault=OVERLOAD, service_s=0.0)
        self.log.append(record)
        self.requests += 1
        self.rate_limited_overload += 1
        self.by_status["429"] += 1

    def request_ended(self, record: dict[str, Any], status: int | None, service_s: float) -> None:
        """The request is no longer in flight; `status` is its answer's (None: it had none),
        `service_s` the time it was in flight."""
        self.in_flight -= 1
        self.service_seconds += service_s
        record["service_s"] = round(service_s, 6)
        if status is not None:
            record["status"] = status
            self.by_status[str(status)] += 1

    # --- the ledger --------------------------------------------------------------------------

    def reserve(self, edit: Edit) -> None:
        """Holds the edit's cost against the balance; 402 when it would overdraw it.

        Every reservation ends in exactly one charge() or release().
        """
        if self.balance_micros is None:
            return
        available = self.balance_micros - self.reserved_micros
        if edit.cost_micros > available:
            raise ErrorAnswer(
                402,
                "INSUFFICIENT_BALANCE",
                f"Insufficient balance: {_usd(edit.cost_micros)} required, "
                f"{_usd(max(0, available))} available",
            )
        self.reserved_micros += edit.cost_micros

    def charge(self, edit: Edit) -> None:
        """The edit was performed: its reservation becomes a charge."""
        self.charged_requests += 1
        self.charged_images += edit.n
        self.charged_micros += edit.cost_micros
        if self.balance_micros is not None:
            self.balance_micros -= edit.cost_micros
            self.reserved_micros -= edit.cost_micros

    def release(self, edit: Edit) -> None:
        """The edit was not performed: its reservation is given back."""
        if self.balance_micros is not None:
            self.reserved_micros -= edit.cost_micros

    # --- faults and sources ------------------------------------------------------------------

    def draw(self, fp: str, response_format: str) -> Draw:
        """This request's fault and latency, as the weather has them; counts it as one more
        attempt of `fp`."""
        attempt = self.seen.get(fp, 0)
        self.seen[fp] = attempt + 1
        if len(self.seen) > FINGERPRINT_MEMORY:
            # Forget the fingerprint first seen longest ago (dicts keep insertion order).
            del self.seen[next(iter(self.seen))]
        base = draw(self.config, fp, attempt, response_format=response_format)
        return weathered(self.config, self.gateway, fp, base)

    async def base(self, edit: Edit) -> Base:
        """The cached base for this edit, built once even when many requests want it at once."""
        key: tuple[object, ...] = (tuple(edit.image_sha), edit.mask_sha, edit.width, edit.height)
        found = self.bases.get(key)
        if found is not None:
            return found
        pending = self._pending_bases.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(
                self.executor, build_base, edit.images, edit.mask, edit.width, edit.height
            )
            self._pending_bases[key] = pending
            pending.add_done_callback(partial(self._base_done, key))
        return await asyncio.shield(pending)

    def _base_done(self, key: tuple[object, ...], future: asyncio.Future[Base]) -> None:
        self._pending_bases.pop(key, None)
        if not future.cancelled() and future.exception() is None:
            self.bases.put(key, future.result())

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "charged_requests": self.charged_requests,
            "charged_images": self.charged_images,
            "charged_usd": round(self.charged_micros / spec.MICROS_PER_USD, 6),
            "charged_micros": self.charged_micros,
            "dry_runs": self.dry_runs,
            "downloads": self.downloads,
            "downloads_truncated": self.downloads_truncated,
            "downloads_missing": self.downloads_missing,
            "images_rendered": self.images_rendered,
            # Ideal wall time of a run at concurrency C: service_seconds_total / C.
            "service_seconds_total": round(self.service_seconds, 6),
            "rate_limited_overload": self.rate_limited_overload,
            "by_status": dict(sorted(self.by_status.items())),
            "faults": dict(sorted(self.faults.items())),
            "balance_usd": (
                None
                if self.balance_micros is None
                else round(self.balance_micros / spec.MICROS_PER_USD, 6)
            ),
            "files_stored": len(self.files),
            "file_bytes": self.files.bytes,
            "base_cache": {
                "entries": len(self.bases),
                "hits": self.bases.hits,
                "misses": self.bases.misses,
            },
        }


def _micros(usd: float | None) -> int | None:
    return None if usd is None else round(usd * spec.MICROS_PER_USD)


def _usd(micros: int) -> str:
    return f"${micros / spec.MICROS_PER_USD:.2f}"
