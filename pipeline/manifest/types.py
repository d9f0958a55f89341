"""The types a manifest row becomes: a valid edit job's fields, or the reasons it is invalid."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class EditParams:
    """Every request field of one edit besides the prompt, the images and the mask.

    `None` means "not sent": the API's default applies. `extra` holds provider fields
    (turbo, disable_safety_checker, replicate_weights, ...) passed through untouched.
    """

    n: int | None = None
    size: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    quality: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def image_count(self) -> int:
        return self.n or 1


# The "column" of a problem with a whole row (a ragged CSV line), not with one cell.
ROW_COLUMN = "(row)"


@dataclass(frozen=True)
class FieldError:
    column: str
    reason: str

    def __str__(self) -> str:
        return self.reason if self.column == ROW_COLUMN else f"column {self.column}: {self.reason}"


@dataclass(frozen=True)
class ManifestRow:
    """A valid manifest row. `row` is 1-based and counts data rows (the header is not a row)."""

    row: int
    id: str
    images: tuple[str, ...]  # absolute local paths, s3:// or https:// URIs; the first is edited
    prompt: str
    seed: int | None = None
    mask: str | None = None
    params: EditParams = field(default_factory=EditParams)
    # The column the sources came from, so an error loading one names it.
    images_column: str = "image"
    # Fields the row sets that the run's model does not take: they are not sent.
    dropped: tuple[str, ...] = ()


@dataclass(frozen=True)
class InvalidRow:
    """A row that cannot become a request; it still ends as one (invalid) result row."""

    row: int
    id: str | None
    errors: tuple[FieldError, ...]

    @property
    def message(self) -> str:
        return f"row {self.row}: " + "; ".join(str(e) for e in self.errors)


ParsedRow = ManifestRow | InvalidRow
