"""The augmented dataset table: a run's results (and its expanded manifest) as one row per
output image, with its source, prompt, seed, size and what this run paid for it."""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.engine.results import SKIP_DONE, SKIP_DUPLICATE
from pipeline.errors import ConfigError, ImgEditError
from pipeline.io.s3 import is_s3_uri, parse_s3_uri
from pipeline.io.storage import open_storage
from pipeline.io.uri import UriReader
from pipeline.uses.catalogue import (
    ParquetBatches,
    iter_parquet_batches,
    write_parquet_atomically,
)

log = logging.getLogger(__name__)

DATASET_READ_ROWS = 4096
# Parallel sidecar reads for `done` rows (S3 latency, not CPU, is what they wait on).
SIDECAR_READ_WORKERS = 16

DATASET_SCHEMA = pa.schema(
    [
        pa.field("row", pa.int64(), nullable=False),
        pa.field("id", pa.string()),
        pa.field("source_id", pa.string()),
        pa.field("prompt_index", pa.int64()),
        pa.field("source_uri", pa.string()),
        pa.field("source_uris", pa.list_(pa.string())),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("variant", pa.int32(), nullable=False),
        pa.field("output_uri", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("revised_prompt", pa.string()),
        pa.field("cost", pa.float64()),
        pa.field("job_key", pa.string()),
        pa.field("sidecar_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),
    ]
)
DATASET_STATUSES: tuple[str, ...] = ("succeeded", "done", "duplicate")
_RESULT_COLUMNS: tuple[str, ...] = (
    "row",
    "id",
    "status",
    "reason",
    "prompt",
    "seed",
    "source_uris",
    "output_uris",
    "sidecar_uri",
    "actual_size",
    "output_format",
    "revised_prompt",
    "cost",
    "job_key",
)
_MANIFEST_COLUMNS: tuple[str, ...] = ("id", "source_id", "prompt_index")


@dataclass
class DatasetInfo:
    """The dataset table written: where, its rows (images), and what each result row gave."""

    uri: str
    rows: int
    jobs: int
    by_status: dict[str, int] = field(default_factory=dict)  # images by dataset status
    excluded: int = 0  # result rows without an image: failed, invalid, not run
    missing_sidecars: int = 0  # `done` rows whose sidecar could not be read


def _manifest_rows(path: Path | str | None, reader: UriReader) -> Iterator[dict[str, Any]]:
    """The expanded manifest's rows in order, numbered from 1 (id, source_id, prompt_index)."""
    if path is None:
        return
    number = 0
    for batch in iter_parquet_batches(path, reader, DATASET_READ_ROWS, _MANIFEST_COLUMNS):
        for record in batch.to_pylist():
            number += 1
            record["row"] = number
            yield record


def _size(text: str | None) -> tuple[int | None, int | None]:
    if not text or "x" not in text:
        return None, None
    w, _, h = text.partition("x")
    return (int(w), int(h)) if w.isdigit() and h.isdigit() else (None, None)


def _sidecar_outputs(reader: UriReader, uri: str | None) -> list[dict[str, Any]] | None:
    if not uri:
        return None
    try:
        doc = json.loads(reader.read(uri))
        outputs = doc["outputs"]
        return [
            {
                "output_uri": str(o["uri"]),
                "width": o.get("width"),
                "height": o.get("height"),
                "format": o.get("format"),
                "revised_prompt": o.get("revised_prompt") or doc.get("revised_prompt"),
            }
            for o in outputs
        ]
    except (ImgEditError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read the outputs of sidecar %s: %s", uri, exc)
        return None


def _result_outputs(r: dict[str, Any]) -> list[dict[str, Any]]:
    width, height = _size(r["actual_size"])
    return [
        {
            "output_uri": uri,
            "width": width,
            "height": height,
            "format": r["output_format"],
            "revised_prompt": r["revised_prompt"],
        }
        for uri in r["output_uris"] or []
    ]


def _dataset_status(r: dict[str, Any]) -> str | None:
    if r["status"] == "succeeded":
        return "succeeded"
    if r["status"] == "skipped" and r["reason"] == SKIP_DONE:
        return "done"
    if r["status"] == "skipped" and r["reason"] == SKIP_DUPLICATE and r["output_uris"]:
        return "duplicate"
    return None


class _ManifestRows:
    """The expanded manifest's rows, walked beside the results table (both in row order)."""

    def __init__(self, path: Path | str | None, reader: UriReader) -> None:
        self.path = path
        self._rows = _manifest_rows(path, reader)
        self._current: dict[str, Any] | None = None

    def match(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """The manifest row of result row `r` (None without a manifest); ConfigError if the
        manifest has no such row or another id there."""
        if self.path is None:
            return None
        current = self._current
        while current is None or current["row"] < r["row"]:
            current = self._current = next(self._rows, None)
            if current is None:
                raise ConfigError(
                    f"the results have row {r['row']}, which manifest {self.path} does not"
                )
        if current["row"] != r["row"] or (r["id"] is not None and current["id"] != r["id"]):
            raise ConfigError(
                f"the results do not belong to manifest {self.path}: "
                f"row {r['row']} is {r['id']!r} in the results and "
                f"{current['id']!r} in the manifest"
            )
        return current


def _dataset_rows(
    r: dict[str, Any], status: str, m: dict[str, Any] | None, outputs: list[dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """The dataset rows of one result row (`m`: its manifest row): one per output image."""
    sources = list(r["source_uris"] or [])
    paid = r["cost"] if status == "succeeded" and r["cost"] is not None else 0.0
    for variant, o in enumerate(outputs):
        yield {
            "row": r["row"],
            "id": r["id"],
            "source_id": m["source_id"] if m else r["id"],
            "prompt_index": m["prompt_index"] if m else None,
            "source_uri": sources[0] if sources else None,
            "source_uris": sources,
            "prompt": r["prompt"],
            "seed": r["seed"],
            "variant": variant,
            "cost": round(paid / len(outputs), 9),
            "job_key": r["job_key"],
            "sidecar_uri": r["sidecar_uri"],
            "status": status,
            **o,
        }


class _DatasetWriter:
    """Turns batches of result rows into dataset rows, reading `done` rows' sidecars in parallel."""

    def __init__(
        self,
        out: ParquetBatches,
        manifest: _ManifestRows,
        reader: UriReader,
        pool: ThreadPoolExecutor,
        info: DatasetInfo,
        by_status: Counter[str],
    ) -> None:
        self.out = out
        self.manifest = manifest
        self.reader = reader
        self.pool = pool
        self.info = info
        self.by_status = by_status  # images by dataset status
        self._last_row = 0

    def add(self, records: list[dict[str, Any]]) -> None:
        kept: list[tuple[dict[str, Any], str, dict[str, Any] | None]] = []
        for r in records:
            if r["row"] <= self._last_row:
                raise ConfigError("the results table is not in row order")
            self._last_row = r["row"]
            m = self.manifest.match(r)
            status = _dataset_status(r)
            if status is None:
                self.info.excluded += 1
                continue
            kept.append((r, status, m))
        sidecars = self._sidecars([r["sidecar_uri"] for r, s, _ in kept if s == "done"])
        for r, status, m in kept:
            if status == "done":
                outputs = sidecars.get(r["sidecar_uri"])
                if outputs is None:
                    self.info.missing_sidecars += 1
                    continue
            else:
                outputs = _result_outputs(r)
            self.info.jobs += 1
            for row in _dataset_rows(r, status, m, outputs):
                self.out.add(row)
                self.by_status[status] += 1

    def _sidecars(self, uris: list[str]) -> dict[str, list[dict[str, Any]] | None]:
        read = self.pool.map(lambda u: _sidecar_outputs(self.reader, u), uris)
        return dict(zip(uris, read, strict=True))


def _publish(local_out: Path, out: str, endpoint_url: str | None) -> str:
    """Where the table written at `local_out` ends: uploaded to `out` when it is s3://."""
    if not is_s3_uri(out):
        return str(local_out.expanduser().absolute())
    loc = parse_s3_uri(out)
    storage = open_storage(f"s3://{loc.bucket}", endpoint_url=endpoint_url)
    return storage.put_file(loc.key, local_out, "application/vnd.apache.parquet")


def write_dataset_table(
    results: pa.Table | Path | str,
    expanded_manifest: Path | str | None,
    out: Path | str,
    *,
    endpoint_url: str | None = None,
    reader: UriReader | None = None,
) -> DatasetInfo:
    """Write the augmented dataset table (DATASET_SCHEMA) to a local path or s3:// URI.

    `results` is a run's results table (a pyarrow Table, or its Parquet file: local path or
    s3:// URI); `expanded_manifest` the manifest that run ran (for source ids and prompt
    indexes; None uses the row id as the source id). ConfigError when the two do not match.
    """
    own_reader = reader is None
    uri_reader = reader or UriReader(endpoint_url=endpoint_url)
    out_text = str(out)
    to_s3 = is_s3_uri(out_text)
    local_out = Path(out_text)
    if to_s3:
        local_out = Path(tempfile.mkdtemp(prefix="imgedit-dataset-")) / "dataset.parquet"
    info = DatasetInfo(uri=out_text, rows=0, jobs=0)
    by_status: Counter[str] = Counter()
    try:
        with (
            ThreadPoolExecutor(SIDECAR_READ_WORKERS, thread_name_prefix="imgedit-sidecar") as pool,
            write_parquet_atomically(local_out, DATASET_SCHEMA) as writer,
        ):
            table_out = ParquetBatches(writer, DATASET_SCHEMA, DATASET_READ_ROWS)
            manifest = _ManifestRows(expanded_manifest, uri_reader)
            dataset = _DatasetWriter(table_out, manifest, uri_reader, pool, info, by_status)
            for batch in iter_parquet_batches(
                results, uri_reader, DATASET_READ_ROWS, _RESULT_COLUMNS
            ):
                dataset.add(batch.to_pylist())
            table_out.flush()
            info.rows = table_out.written
        info.uri = _publish(local_out, out_text, endpoint_url)
    finally:
        if to_s3:
            local_out.unlink(missing_ok=True)
            local_out.parent.rmdir()
        if own_reader:
            uri_reader.close()
    info.by_status = {s: by_status.get(s, 0) for s in DATASET_STATUSES}
    if info.missing_sidecars:
        log.warning("%d done rows left out: their sidecars are unreadable", info.missing_sidecars)
    return info
