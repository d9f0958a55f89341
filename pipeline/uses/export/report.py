"""What an export did: samples and files written, rows left out and why, rows that failed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.uses.export.samples import RowError

__all__ = ["ExportReport"]

# Failed rows kept as examples, per error code.
EXAMPLES_PER_CODE = 3


@dataclass
class ExportReport:
    """One export's outcome. `not_exported` counts rows that did not succeed in the run
    (`failed`, `invalid`, `skipped: done`...): they have no image of this run. `errors`
    counts succeeded rows whose images could not be exported, by code."""

    run_id: str
    format: str
    to: str
    index_uri: str = ""
    complete_run: bool = True
    rows: int = 0
    rows_exported: int = 0
    samples: int = 0
    bytes: int = 0
    files: int = 0
    not_exported: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[RowError]] = field(default_factory=dict)

    @property
    def failed_rows(self) -> int:
        return sum(self.errors.values())

    def add_error(self, error: RowError) -> None:
        self.errors[error.code] += 1
        shown = self.examples.setdefault(error.code, [])
        if len(shown) < EXAMPLES_PER_CODE:
            shown.append(error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "format": self.format,
            "to": self.to,
            "index_uri": self.index_uri,
            "complete_run": self.complete_run,
            "rows": self.rows,
            "rows_exported": self.rows_exported,
            "samples": self.samples,
            "bytes": self.bytes,
            "files": self.files,
            "not_exported": dict(self.not_exported),
            "errors": dict(self.errors),
            "error_examples": {
                code: [{"row": e.row, "id": e.id, "message": e.message} for e in shown]
                for code, shown in self.examples.items()
            },
        }

    def lines(self) -> list[str]:
        """The report in a few lines of plain text."""
        out = [
            f"exported {self.samples} images of {self.rows_exported} rows of run {self.run_id} "
            f"as {self.format}: {self.files} files, {self.bytes} bytes, to {self.to}",
            f"index: {self.index_uri}",
        ]
        if not self.complete_run:
            out.append("the run has no results table yet (killed or running): its parts so far")
        if self.not_exported:
            detail = ", ".join(f"{k} {n}" for k, n in sorted(self.not_exported.items()))
            out.append(
                f"not exported: {sum(self.not_exported.values())} rows that did not succeed in "
                f"this run ({detail}); `skipped: done`/`duplicate` rows' images are earlier "
                "runs' results: export those runs"
            )
        if self.errors:
            detail = ", ".join(f"{k} {n}" for k, n in sorted(self.errors.items()))
            out.append(
                f"errors: {self.failed_rows} succeeded rows could not be exported ({detail})"
            )
            for shown in self.examples.values():
                for e in shown:
                    out.append(f"  row {e.row} (id {e.id}): {e.code}: {e.message}")
        return out
