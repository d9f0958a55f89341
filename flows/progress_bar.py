"""A terminal progress bar for runs: rows done and failed, spend, rate, the limit of requests in
flight and ETA (rich)."""

from __future__ import annotations

import threading
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from pipeline.engine import progress
from pipeline.engine.results import ResultRow


class RunProgressBar:
    """Subscribes to pipeline progress events while entered and draws them on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ok {task.fields[ok]}  skipped {task.fields[skipped]}"),
            TextColumn("[red]failed {task.fields[failed]}"),
            TextColumn("${task.fields[spend]:.2f}"),
            TextColumn("{task.fields[rate]:.1f} rows/s"),
            TextColumn("{task.fields[concurrency]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._lock = threading.Lock()
        self._counts = {"ok": 0, "skipped": 0, "failed": 0}
        self._spend = 0.0
        self._concurrency = ""
        self._unsubscribe: object = None

    def __enter__(self) -> RunProgressBar:
        self._progress.start()
        self._unsubscribe = progress.subscribe(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if callable(self._unsubscribe):
            self._unsubscribe()
        self._progress.stop()

    def on_plan(self, run_id: str, total_rows: int, estimated_cost_usd: float) -> None:
        with self._lock:
            if self._task is None:
                self._task = self._progress.add_task(
                    f"run {run_id}",
                    total=total_rows,
                    rate=0.0,
                    spend=0.0,
                    ok=0,
                    skipped=0,
                    failed=0,
                    concurrency=self._concurrency,
                )

    def on_row(self, run_id: str, result: ResultRow) -> None:
        with self._lock:
            if self._task is None:
                return
            if result.status == "succeeded":
                self._counts["ok"] += 1
            elif result.status == "skipped":
                self._counts["skipped"] += 1
            else:
                self._counts["failed"] += 1
            self._spend += result.cost or 0.0
            task = self._progress.tasks[self._task]
            elapsed = task.elapsed or 0.0
            rate = (task.completed + 1) / elapsed if elapsed > 0 else 0.0
            self._progress.update(
                self._task,
                advance=1,
                spend=self._spend,
                rate=rate,
                ok=self._counts["ok"],
                skipped=self._counts["skipped"],
                failed=self._counts["failed"],
            )

    def on_concurrency(self, run_id: str, limit: int, ceiling: int, mode: str) -> None:
        with self._lock:
            # The adaptive limit of requests in flight now, of its ceiling.
            self._concurrency = (
                f"limit {limit}/{ceiling}" if mode == "adaptive" else f"limit {ceiling} fixed"
            )
            if self._task is not None:
                self._progress.update(self._task, concurrency=self._concurrency)
