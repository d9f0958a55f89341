"""In-process progress events of runs, for whoever listens (a terminal progress bar, a test)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from pipeline.engine.results import ResultRow

log = logging.getLogger(__name__)


class ProgressListener(Protocol):
    def on_plan(self, run_id: str, total_rows: int, estimated_cost_usd: float) -> None: ...

    def on_row(self, run_id: str, result: ResultRow) -> None: ...

    def on_concurrency(self, run_id: str, limit: int, ceiling: int, mode: str) -> None:
        """The most requests the run may have in flight now, of its ceiling: at the start, and
        each time an adaptive limit moves (mode "adaptive" or "fixed")."""


_lock = threading.Lock()
_listeners: list[ProgressListener] = []


def subscribe(listener: ProgressListener) -> Callable[[], None]:
    """Register a listener; call the returned function to unregister it."""
    with _lock:
        _listeners.append(listener)

    def unsubscribe() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return unsubscribe


def _each(call: Callable[[ProgressListener], None]) -> None:
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            call(listener)
        except Exception:  # a broken progress display must never break a run
            log.exception("progress listener failed")


def publish_plan(run_id: str, total_rows: int, estimated_cost_usd: float) -> None:
    _each(lambda listener: listener.on_plan(run_id, total_rows, estimated_cost_usd))


def listening() -> bool:
    """Whether any listener wants rows (a row's result can then be skipped when not)."""
    return bool(_listeners)


def publish_row(run_id: str, result: ResultRow) -> None:
    if _listeners:
        _each(lambda listener: listener.on_row(run_id, result))


def publish_concurrency(run_id: str, limit: int, ceiling: int, mode: str) -> None:
    if _listeners:
        _each(lambda listener: listener.on_concurrency(run_id, limit, ceiling, mode))
