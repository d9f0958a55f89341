"""A run's summary: counts, cost and latency from its results table, stored as summary.json."""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import spec
from pipeline.engine import layout
from pipeline.engine.plan import RunPlan
from pipeline.engine.results import (
    STATUSES,
    merge_tables_to_file,
    read_parquet_bytes,
    temp_parquet_path,
    utcnow,
)
from pipeline.engine.run_control import RunStop
from pipeline.io.storage import Storage


@dataclass
class RunSummary:
    run_id: str
    manifest: str
    output: str
    results_uri: str
    summary_uri: str
    rows: int
    by_status: dict[str, int]
    skipped_by_reason: dict[str, int]
    images: int
    cost_usd: float
    currency: str
    possible_double_charges: int
    possible_double_charge_usd: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    elapsed_s: float
    started_at: str
    finished_at: str
    stopped_by: str | None = None
    estimated_cost_usd: float | None = None
    # "stopped" (a run-fatal API error, storage that cannot take results) or "interrupted"
    # (Ctrl-C, SIGTERM); None when the run went through.
    stop_kind: str | None = None
    # Answers without a trusted cost (missing, negative, NaN, absurd...): their images at the
    # run's price, which is what the budget counted them at.
    cost_assumed_usd: float = 0.0
    distrusted_costs: int = 0
    # Rows that waited on another run's claim of their job; requests abandoned unanswered
    # when an interrupted run stopped waiting (each may have been charged).
    claims_waited: int = 0
    abandoned: int = 0
    storage_failures: int = 0
    # How many requests the run kept in flight: {mode: "adaptive" or "fixed", ceiling, final
    # (the limit it ended at: what it learned of the API), curve: [[seconds, limit], ...],
    # and when adaptive cuts and storms (push-back counted as load, and judged weather)};
    # None for a scaled-out run (each shard's summary has its own).
    concurrency: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> list[dict[str, Any]]:
        """The summary as metric/value rows, for a table artifact or a terminal."""
        rows: list[dict[str, Any]] = [{"metric": "rows", "value": self.rows}]
        rows += [{"metric": s, "value": self.by_status.get(s, 0)} for s in STATUSES]
        rows += [
            {"metric": f"skipped: {reason}", "value": n}
            for reason, n in sorted(self.skipped_by_reason.items())
        ]
        rows += [
            {"metric": "images", "value": self.images},
            {"metric": f"cost ({self.currency})", "value": round(self.cost_usd, 4)},
            {"metric": "possible double charges", "value": self.possible_double_charges},
            {
                "metric": f"possible double charge ({self.currency})",
                "value": round(self.possible_double_charge_usd, 4),
            },
            {
                "metric": f"cost assumed, not reported ({self.currency})",
                "value": round(self.cost_assumed_usd, 4),
            },
            {"metric": "costs not trusted", "value": self.distrusted_costs},
            {"metric": "rows that waited on another run", "value": self.claims_waited},
            {"metric": "requests abandoned unanswered", "value": self.abandoned},
            {"metric": "latency p50 (s)", "value": _round(self.latency_p50_s)},
            {"metric": "latency p95 (s)", "value": _round(self.latency_p95_s)},
            {"metric": "elapsed (s)", "value": round(self.elapsed_s, 2)},
        ]
        if self.concurrency:
            rows.append({"metric": "concurrency", "value": describe_concurrency(self.concurrency)})
        rows.append({"metric": "results", "value": self.results_uri})
        if self.stopped_by:
            rows.append({"metric": "stopped by", "value": self.stopped_by})
        return rows


def describe_concurrency(concurrency: Mapping[str, Any] | None) -> str:
    """E.g. "adaptive: ended at 7 of 16, 3 cuts, 12 refusals judged weather" or "fixed: 16";
    "" for none."""
    if not concurrency:
        return ""
    if concurrency.get("mode") == "fixed":
        return f"fixed: {concurrency.get('ceiling')}"
    text = f"adaptive: ended at {concurrency.get('final')} of {concurrency.get('ceiling')}"
    if concurrency.get("learned"):
        text += f" (started at {concurrency.get('start')}, learned by an earlier run)"
    if concurrency.get("cuts") is not None:
        text += (
            f", {concurrency['cuts']} cuts, {concurrency.get('storms', 0)} refusals judged weather"
        )
    return text


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# Results tables read back while the run's table is merged: this many GETs in flight.
READ_AHEAD = 8

# The columns a summary reads.
SUMMARY_COLUMNS = [
    "status",
    "reason",
    "cost",
    "currency",
    "n_outputs",
    "latency_s",
    "possible_double_charges",
    "possible_double_charge_usd",
    "error_code",
    "claim_wait_s",
    "cost_raw",
]


def merge_results(
    storage: Storage,
    table_keys: Sequence[str],
    run_id: str,
    in_memory: dict[str, bytes] | None = None,
) -> tuple[str, SummaryTotals]:
    """Stream result tables (chunk parts, or shards' tables) into the run's results table.

    `in_memory` holds parts to merge from memory (those that could not be written when
    their rows finished, and those the run kept, see results.KeptParts); each is dropped
    from it once merged. Returns the table's URI and its summary's totals.
    """
    held = in_memory if in_memory is not None else {}
    # The summary is totalled from each table as it goes by, not read back from the merged
    # file, and not from columns held until the end: those were ~100 bytes a row (10 MB at
    # 100k edited rows, the largest part of the finalize's peak).
    totals = SummaryTotals()

    def tables() -> Iterator[pa.Table]:
        for data in _read_ahead(storage, table_keys, held):
            table = read_parquet_bytes(data)
            totals.add(table)
            yield table

    path = temp_parquet_path()
    try:
        merge_tables_to_file(tables(), path)
        uri = storage.put_file(layout.results_key(run_id), path)
    finally:
        path.unlink(missing_ok=True)
    return uri, totals


def _read_ahead(storage: Storage, keys: Sequence[str], held: dict[str, bytes]) -> Iterator[bytes]:
    """Each key's bytes, in order: from `held` (dropped once taken), or read up to READ_AHEAD
    keys ahead (a million rows' resume reads back hundreds of parts: GETs beside the merge's
    CPU, not one after another)."""
    with ThreadPoolExecutor(READ_AHEAD, "results-read") as pool:
        ahead: deque[tuple[str, Future[bytes] | None]] = deque()
        upcoming = iter(keys)
        while True:
            while len(ahead) < READ_AHEAD and (key := next(upcoming, None)) is not None:
                ahead.append((key, None if key in held else pool.submit(storage.get_bytes, key)))
            if not ahead:
                return
            key, reading = ahead.popleft()
            yield held.pop(key) if reading is None else reading.result()


class SummaryTotals:
    """A summary's counts and sums, totalled a results table (or part) at a time.

    Only the latencies of succeeded rows are kept (8 bytes each), for exact percentiles.
    """

    def __init__(self) -> None:
        self.rows = 0
        self.by_status = dict.fromkeys(STATUSES, 0)
        self.skipped_by_reason: dict[str, int] = {}
        self.images = 0
        self.cost = 0.0
        # In order of first appearance, as `"/".join` shows them.
        self.currencies: dict[str, None] = {}
        self.possible_double_charges = 0
        self.possible_double_charge_usd = 0.0
        self.unpriced_images = 0
        self.distrusted_costs = 0
        self.claims_waited = 0
        self.abandoned = 0
        self.storage_failures = 0
        self._latencies: list[pa.Array] = []

    def add(self, table: pa.Table) -> SummaryTotals:
        """Fold in one table's rows (any table with the SUMMARY_COLUMNS)."""
        status = table.column("status")
        self.rows += table.num_rows
        for s in STATUSES:
            self.by_status[s] += _sum(pc.equal(status, s))
        # Columns filtered one at a time, never the whole table (a copy of every column).
        is_skipped = pc.equal(status, "skipped")
        reasons = pc.value_counts(table.column("reason").filter(is_skipped).fill_null("unknown"))
        for r in reasons.to_pylist():
            self.skipped_by_reason[r["values"]] = (
                self.skipped_by_reason.get(r["values"], 0) + r["counts"]
            )
        is_succeeded = pc.equal(status, "succeeded")
        latency = table.column("latency_s").filter(is_succeeded).drop_null()
        if len(latency):
            self._latencies.append(latency.combine_chunks())
        for c in pc.unique(table.column("currency").drop_null()).to_pylist():
            if c:
                self.currencies.setdefault(c, None)
        n_outputs = table.column("n_outputs")
        self.images += _sum(n_outputs.filter(is_succeeded))
        self.cost += float(pc.sum(table.column("cost")).as_py() or 0.0)
        self.possible_double_charges += _sum(table.column("possible_double_charges"))
        self.possible_double_charge_usd += float(
            pc.sum(table.column("possible_double_charge_usd")).as_py() or 0.0
        )
        unpriced = pc.and_(pc.is_valid(n_outputs), pc.is_null(table.column("cost")))
        self.unpriced_images += _sum(n_outputs.filter(unpriced))
        self.distrusted_costs += _sum(pc.is_valid(table.column("cost_raw")))
        self.claims_waited += _sum(pc.is_valid(table.column("claim_wait_s")))
        codes = table.column("error_code")
        self.abandoned += _sum(pc.equal(codes, "abandoned"))
        self.storage_failures += _sum(pc.equal(codes, "storage_error"))
        return self

    def result(self, price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD) -> dict[str, Any]:
        """The RunSummary fields these totals give."""
        p50 = p95 = None
        if self._latencies:
            latencies = pa.chunked_array(self._latencies, pa.float64())
            q = pc.quantile(latencies, q=[0.5, 0.95]).to_pylist()
            p50, p95 = q[0], q[1]
        return {
            "rows": self.rows,
            "by_status": dict(self.by_status),
            "skipped_by_reason": dict(self.skipped_by_reason),
            "images": self.images,
            "cost_usd": round(self.cost, 6),
            "currency": "/".join(self.currencies) or spec.CURRENCY,
            "possible_double_charges": self.possible_double_charges,
            "possible_double_charge_usd": round(self.possible_double_charge_usd, 6),
            "latency_p50_s": p50,
            "latency_p95_s": p95,
            "cost_assumed_usd": round(self.unpriced_images * price_per_image_usd, 6),
            "distrusted_costs": self.distrusted_costs,
            "claims_waited": self.claims_waited,
            "abandoned": self.abandoned,
            "storage_failures": self.storage_failures,
        }


def write_summary(
    storage: Storage,
    run_id: str,
    plan: RunPlan,
    results_uri: str,
    totals: SummaryTotals,
    *,
    started_at: datetime,
    started: float,
    stop: RunStop | None = None,
    stopped_by: str | None = None,
    price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD,
    concurrency: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> RunSummary:
    summary = RunSummary(
        **totals.result(price_per_image_usd),
        run_id=run_id,
        manifest=plan.manifest,
        output=plan.output,
        results_uri=results_uri,
        summary_uri=storage.uri_for(layout.summary_key(run_id)),
        elapsed_s=time.perf_counter() - started,
        started_at=started_at.isoformat(),
        finished_at=utcnow().isoformat(),
        stopped_by=stop.reason if stop is not None and stop.stopped else stopped_by,
        stop_kind=stop.kind if stop is not None else ("stopped" if stopped_by else None),
        estimated_cost_usd=plan.estimated_cost_usd,
        concurrency=dict(concurrency) if concurrency is not None else None,
        extra=dict(extra or {}),
    )
    storage.put_bytes(
        layout.summary_key(run_id),
        json.dumps(summary.to_dict(), indent=2).encode(),
        "application/json",
    )
    return summary


def summarize(
    table: pa.Table, price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD
) -> dict[str, Any]:
    """Counts, cost and latency percentiles from a whole results table."""
    return SummaryTotals().add(table).result(price_per_image_usd)


def _sum(column: pa.ChunkedArray | pa.Array) -> int:
    """The sum of an integer column, or the count of True in a mask."""
    return int(pc.sum(column).as_py() or 0)
