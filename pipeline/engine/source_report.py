"""What checking a manifest's sources found (`SourceReport`, one `SourceProblem` per row with an
unusable source or mask), and folding it into the manifest's cell report (`merge_into`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from pipeline.manifest.open import MAX_REPORTED_ERRORS, ValidationReport
from pipeline.manifest.types import InvalidRow

__all__ = ["SourceProblem", "SourceReport", "merge_into"]


@dataclass(frozen=True)
class SourceProblem(InvalidRow):
    """A valid row with an unusable source or mask: an InvalidRow, plus the output images it
    asked for (which leave the cost estimate when the row becomes invalid)."""

    images: int = 1


@dataclass
class SourceReport:
    """The outcome of checking the sources of a manifest's valid rows."""

    uri: str
    rows: int = 0  # rows seen (valid or not) in the range
    rows_checked: int = 0  # valid rows whose sources were checked
    invalid: int = 0  # of those, rows with at least one problem
    invalid_images: int = 0  # output images those rows asked for
    problems: list[SourceProblem] = field(default_factory=list)  # the first max_errors
    problems_by_column: Counter[str] = field(default_factory=Counter)  # rows per column
    sources_read: int = 0  # reads made: distinct sources, unless evicted and seen again
    cache_hits: int = 0  # sources answered by an earlier or in-flight read
    cached_verdicts: int = 0  # verdicts held at the end (at most the cap)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.invalid == 0

    @property
    def truncated(self) -> bool:
        return self.invalid > len(self.problems)

    def add(self, problem: SourceProblem | None, *, max_errors: int) -> None:
        """Count one checked row, with its problem (None: its sources are usable)."""
        self.rows_checked += 1
        if problem is None:
            return
        self.invalid += 1
        self.invalid_images += problem.images
        if len(self.problems) < max_errors:
            self.problems.append(problem)
        for column in {e.column for e in problem.errors}:
            self.problems_by_column[column] += 1


def merge_into(
    report: ValidationReport, sources: SourceReport, *, max_errors: int = MAX_REPORTED_ERRORS
) -> ValidationReport:
    """`report` with the rows whose sources are unusable counted invalid (a new report).

    A row invalid for its cells and its sources is one invalid row (its problems joined);
    rows that become invalid leave `valid` and their images leave the estimate. The errors
    stay in row order, the first `max_errors` of both lists.
    """
    listed = {r.row: r for r in report.errors}
    overlap = [p for p in sources.problems if p.row in listed]
    fresh = sources.invalid - len(overlap)
    by_column = Counter(report.errors_by_column)
    by_column.update(sources.problems_by_column)
    merged: dict[int, InvalidRow] = dict(listed)
    for problem in sources.problems:
        old = listed.get(problem.row)
        if old is None:
            merged[problem.row] = problem
            continue
        old_columns = {e.column for e in old.errors}
        for column in {e.column for e in problem.errors} & old_columns:
            by_column[column] -= 1  # this row is already counted under that column
        merged[problem.row] = InvalidRow(old.row, old.id, old.errors + problem.errors)
    # Each list holds only its first rows when truncated: past its last one, the other list
    # alone would not be "the first errors" of the manifest.
    cutoff: float = float("inf")
    if report.errors_truncated:
        cutoff = report.errors[-1].row if report.errors else 0
    if sources.truncated:
        cutoff = min(cutoff, sources.problems[-1].row if sources.problems else 0)
    errors = [merged[r] for r in sorted(merged) if r <= cutoff][:max_errors]
    freed_images = sources.invalid_images - sum(p.images for p in overlap)
    return replace(
        report,
        valid=max(0, report.valid - fresh),
        invalid=report.invalid + fresh,
        images=max(0, report.images - freed_images),
        errors=errors,
        errors_by_column=+by_column,
        sources_checked=(report.sources_checked or 0) + sources.rows_checked,
        source_invalid=report.source_invalid + sources.invalid,
    )
