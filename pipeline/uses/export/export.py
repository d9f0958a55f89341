"""One export: a run's succeeded rows, streamed from its results table into dataset files."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import HistoryError
from pipeline.io.allowed_roots import AllowedRoots, check_allowed
from pipeline.io.netguard import source_policy
from pipeline.io.storage import Storage, open_storage
from pipeline.io.uri import UriReader
from pipeline.uses.export.destination import Destination
from pipeline.uses.export.metadata import METADATA_SCHEMA
from pipeline.uses.export.options import ExportFormat, ExportOptions
from pipeline.uses.export.parquet import ParquetParts
from pipeline.uses.export.report import ExportReport
from pipeline.uses.export.run_rows import RunRows
from pipeline.uses.export.samples import RowError, SampleLoader, ordered_map
from pipeline.uses.export.webdataset import TarShards
from pipeline.uses.run_history import list_runs, open_output

__all__ = ["export_run", "newest_run"]

log = logging.getLogger(__name__)

# Tar members' modification time: fixed, so the same run exported twice gives the same bytes.
TAR_MTIME = 0.0


def newest_run(storage: Storage) -> str:
    """The id of the output's newest run; HistoryError when it has none."""
    runs = list_runs(storage)
    if not runs:
        raise HistoryError(f"no runs under {storage.root_uri}")
    return runs[0].run_id


def export_run(
    output: str,
    run_id: str | None,
    options: ExportOptions,
    *,
    endpoint_url: str | None = None,
) -> ExportReport:
    """Export run `run_id` of `output` (default: its newest run) as `options` say.

    Only `succeeded` rows are exported, one sample per result image; the others are counted
    by status. A succeeded row whose image is missing or unreadable is a counted error
    (`ExportReport.errors`), and the export goes on. Raises HistoryError (no such output or
    run), ConfigError (a destination outside the allowed roots) or StorageError (the
    results cannot be read, or the destination cannot be written).
    """
    roots = AllowedRoots.from_env()
    check_allowed(output, "output", roots)
    check_allowed(options.to, "export destination", roots)
    storage = open_output(output, endpoint_url=endpoint_url)
    run_id = run_id or newest_run(storage)
    rows = RunRows(storage, run_id, batch_rows=options.batch_rows)
    target = open_storage(options.to, endpoint_url=endpoint_url)
    report = ExportReport(run_id, options.format.value, target.root_uri, complete_run=rows.complete)
    reader = (
        UriReader(
            endpoint_url=endpoint_url,
            policy=source_policy(options.allow_private_sources),
            roots=roots,
        )
        if options.with_sources
        else None
    )
    loader = SampleLoader(storage, run_id, reader)
    try:
        with Destination(target) as dest:
            writer: TarShards | ParquetParts = (
                TarShards(dest, options.shard_bytes, TAR_MTIME)
                if options.format is ExportFormat.webdataset
                else ParquetParts(
                    dest,
                    options.shard_bytes,
                    options.row_group_bytes,
                    with_sources=options.with_sources,
                )
            )
            for loaded in ordered_map(loader.load, _results(rows), options.read_workers):
                if isinstance(loaded, RowError):
                    log.warning("row %d not exported: %s", loaded.row, loaded.message)
                    report.add_error(loaded)
                    continue
                report.rows_exported += 1
                for sample in loaded:
                    writer.add(sample)
                    report.samples += 1
            writer.close()
            report.rows = rows.rows
            report.not_exported = rows.not_exported
            report.files = len(dest.files)
            report.bytes = sum(f.bytes for f in dest.files)
            report.index_uri = dest.finish(_index(report, storage, options))
    finally:
        if reader is not None:
            reader.close()
    return report


def _results(rows: RunRows) -> Iterator[dict[str, Any]]:
    for batch in rows:
        yield from batch


def _index(report: ExportReport, storage: Storage, options: ExportOptions) -> dict[str, Any]:
    return {
        "format": report.format,
        "run_id": report.run_id,
        "output": storage.root_uri,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete_run": report.complete_run,
        "shard_bytes": options.shard_bytes,
        "with_sources": options.with_sources,
        "samples": report.samples,
        "rows_exported": report.rows_exported,
        "rows": report.rows,
        "not_exported": dict(report.not_exported),
        "errors": dict(report.errors),
        "metadata_columns": METADATA_SCHEMA.names,
    }
