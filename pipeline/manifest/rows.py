"""Row validation for manifests: one row's cells become a ManifestRow or an InvalidRow.

The column rules themselves are documented in `pipeline.manifest.open`. This module does no I/O:
sources are resolved to absolute paths or URIs here (`source_base`) and read (and checked)
later; each cell's own checks are in `cells`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

from pipeline import spec
from pipeline.errors import SpecValueError
from pipeline.manifest.cells import (
    MAX_ID_CHARS,
    CellProblem,
    cell_text,
    check_id,
    is_unset,
    json_or_none,
    param_value,
    parse_int,
    parse_params,
    show,
    split_images,
)
from pipeline.manifest.source_base import SourceBase
from pipeline.manifest.types import (
    ROW_COLUMN,
    EditParams,
    FieldError,
    InvalidRow,
    ManifestRow,
    ParsedRow,
)
from pipeline.models import check as model_check
from pipeline.models.profile import (
    BACKGROUND,
    EXTRA_PARAMS,
    QUALITY,
    ModelProfile,
    canonical_param,
)
from pipeline.models.registry import DEFAULT_PROFILE

__all__ = [
    "CLIENT_FIELDS",
    "FIXED_FIELDS",
    "KNOWN_COLUMNS",
    "MAX_ID_CHARS",
    "MAX_PARAM_VALUE_CHARS",
    "MAX_SEED",
    "MIN_SEED",
    "PARAM_PREFIX",
    "Check",
    "RowValidator",
    "SourceBase",
    "fixed_param_column_reason",
    "ragged_row",
]

# The columns with a meaning of their own; every other column is ignored (and reported),
# except `param.<name>` columns, which are provider extras.
KNOWN_COLUMNS: tuple[str, ...] = (
    "id",
    "image",
    "images",
    "prompt",
    "seed",
    "mask",
    "n",
    "size",
    "aspect_ratio",
    "resolution",
    "output_format",
    "output_compression",
    "quality",
    "user",
    "params",
)
PARAM_PREFIX = "param."
# Request fields the client sets itself; extras may not set them either.
CLIENT_FIELDS: tuple[str, ...] = ("model", "response_format", "image[]", "stream")
FIXED_FIELDS: frozenset[str] = frozenset(KNOWN_COLUMNS) | frozenset(CLIENT_FIELDS)

MIN_SEED = 0
MAX_SEED = 2**63 - 1
# One `param.<name>` cell, as text.
MAX_PARAM_VALUE_CHARS = 4096
ID_DIGEST_BYTES = 8
# Values of the enumerated columns (n, size, output_format...) repeat across rows; their
# checks are remembered up to this many distinct values per pass.
MEMO_ENTRIES = 4096


def _id_key(value: str) -> int:
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=ID_DIGEST_BYTES)
    return int.from_bytes(digest.digest(), "little")


Check = Callable[[object], tuple[Any, str | None]]
"""A column check: a cell (not None, not "") -> (value or None when unset, reason or None)."""


def _int_check(column: str, low: int, high: int) -> Check:
    def check(value: object) -> tuple[Any, str | None]:
        try:
            return parse_int(column, value, low, high), None
        except CellProblem as exc:
            return None, str(exc)

    return check


def _text_check(convert: Callable[[str], Any]) -> Check:
    """A check for a text column: `convert` returns the value or raises SpecValueError."""

    def check(value: object) -> tuple[Any, str | None]:
        text = cell_text(value)
        if text is None:
            return None, None
        try:
            return convert(text), None
        except SpecValueError as exc:
            return None, str(exc)

    return check


def _keep(check: Callable[[str], None]) -> Callable[[str], str]:
    def convert(text: str) -> str:
        check(text)
        return text

    return convert


def _memoized(check: Check) -> Check:
    """`check` remembering its answers for the values of one pass (they repeat a lot)."""
    memo: dict[tuple[type, object], tuple[Any, str | None]] = {}

    def cached(value: object) -> tuple[Any, str | None]:
        key = (type(value), value)
        try:
            return memo[key]
        except KeyError:
            pass
        except TypeError:  # unhashable
            return check(value)
        answer = check(value)
        if len(memo) >= MEMO_ENTRIES:
            memo.clear()
        memo[key] = answer
        return answer

    return cached


def _for(profile: ModelProfile, check: Callable[[ModelProfile, str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return check(profile, text)

    return convert


def _enum_text(profile: ModelProfile, name: str) -> Callable[[str], str]:
    def convert(text: str) -> str:
        model_check.check_enum(profile, name, text)
        return text

    return convert


def _simple_checks(profile: ModelProfile) -> dict[str, Check]:
    """The checks of the optional scalar columns (whose values become plain fields), by the
    rules of the run's model."""
    return {
        "seed": _int_check("seed", MIN_SEED, MAX_SEED),
        "n": _memoized(_int_check("n", profile.min_n, profile.max_n)),
        "output_compression": _memoized(
            _int_check("output_compression", spec.MIN_COMPRESSION, spec.MAX_COMPRESSION)
        ),
        "size": _memoized(_text_check(_keep(_for(profile, model_check.check_size)))),
        "aspect_ratio": _memoized(
            _text_check(_keep(_for(profile, model_check.check_aspect_ratio)))
        ),
        "resolution": _memoized(_text_check(_keep(_for(profile, model_check.check_resolution)))),
        "output_format": _memoized(_text_check(_for(profile, model_check.normalize_output_format))),
        "quality": _memoized(_text_check(_enum_text(profile, QUALITY))),
        "user": _text_check(str),
    }


class RowValidator:
    """Validates the rows of one pass over a manifest, in order (it remembers ids seen).

    `columns` are the canonical column names present (see KNOWN_COLUMNS, `param.<name>`).
    Ids are remembered as 8-byte digests mapped to their first row (about 100 bytes per row
    in a dict, whatever the ids' length); a manifest without an id column needs nothing,
    since derived ids (`row-<n>`) cannot repeat.
    """

    def __init__(
        self, columns: list[str], base: SourceBase, profile: ModelProfile | None = None
    ) -> None:
        self._base = base
        self._profile = profile or DEFAULT_PROFILE
        self._has_id = "id" in columns
        self._has_image = "image" in columns
        self._has_images = "images" in columns
        self._has_mask = "mask" in columns
        checks = _simple_checks(self._profile).items()
        self._checks = [(c, check) for c, check in checks if c in columns]
        self._params = [(c, c[len(PARAM_PREFIX) :]) for c in columns if c.startswith(PARAM_PREFIX)]
        self._has_params_json = "params" in columns
        self._seen: dict[int, int] = {}

    @property
    def profile(self) -> ModelProfile:
        return self._profile

    @property
    def base(self) -> SourceBase:
        return self._base

    @property
    def checks(self) -> list[tuple[str, Check]]:
        """The optional scalar columns present and their checks, in the order rows use."""
        return list(self._checks)

    def count_problem(self, count: int) -> str | None:
        """Why `count` sources are not what the model takes, or None when they are."""
        return self._count_problem(count)

    def validate(
        self,
        row: int,
        cells: Mapping[str, object],
        problems: tuple[FieldError, ...] = (),
        *,
        id_first: int | None = None,
    ) -> ParsedRow:
        """The row's ManifestRow, or an InvalidRow with `problems` and every problem found.

        `id_first`: the first row with this row's id, when the caller keeps the ids seen
        (see `pipeline.manifest.batch`); this validator's own memory is then left alone.
        """
        errors: list[FieldError] = list(problems)
        get = cells.get
        row_id = self._check_id(row, get("id"), errors, id_first)
        images = self._images(get("image"), get("images"), errors)
        prompt = _prompt(get("prompt"), errors, self._profile)
        mask = self._mask(get("mask"), errors)
        fields = self._fields(cells, errors)
        extra = self._extras(cells, errors) if self._params or self._has_params_json else {}
        self._check_extras(extra, fields.get("output_format"), errors)
        if errors:
            return InvalidRow(row=row, id=row_id, errors=tuple(errors))
        assert prompt is not None  # no errors means the prompt was checked
        field = fields.get
        return ManifestRow(
            row=row,
            id=row_id or f"row-{row}",
            images=tuple(images),
            images_column="images" if is_unset(cells.get("image")) else "image",
            prompt=prompt,
            seed=field("seed"),
            mask=mask,
            params=EditParams(
                n=field("n"),
                size=field("size"),
                aspect_ratio=field("aspect_ratio"),
                resolution=field("resolution"),
                quality=field("quality"),
                output_format=field("output_format"),
                output_compression=field("output_compression"),
                user=field("user"),
                extra=extra,
            ),
            dropped=model_check.dropped(self._profile, [*fields, *extra]),
        )

    def _check_extras(
        self, extra: dict[str, Any], output_format: str | None, errors: list[FieldError]
    ) -> None:
        """The values of the extras the profile enumerates (thinking, background...)."""
        profile = self._profile
        for key, value in extra.items():
            name = canonical_param(key)
            if name not in EXTRA_PARAMS or not profile.takes(name):
                continue
            try:
                model_check.check_enum(profile, key, value)
                if name == BACKGROUND:
                    model_check.check_transparent(profile, value, output_format)
            except SpecValueError as exc:
                errors.append(FieldError(self._extra_column(key), str(exc)))

    def _extra_column(self, key: str) -> str:
        column = PARAM_PREFIX + key
        return column if any(c == column for c, _ in self._params) else "params"

    def _mask(self, value: object, errors: list[FieldError]) -> str | None:
        if not self._has_mask:
            return None
        text = cell_text(value)
        if text is None:
            return None
        if not self._profile.mask.accepted:
            errors.append(FieldError("mask", f"{self._profile.model} takes no mask"))
            return None
        try:
            return self._base.resolve(text)
        except CellProblem as exc:
            errors.append(FieldError("mask", str(exc)))
            return None

    def _fields(self, cells: Mapping[str, object], errors: list[FieldError]) -> dict[str, Any]:
        """The optional scalar columns' values (unset ones left out)."""
        fields: dict[str, Any] = {}
        for column, check in self._checks:
            value = cells.get(column)
            if value is None or value == "":
                continue
            result, reason = check(value)
            if reason is not None:
                errors.append(FieldError(column, reason))
            elif result is not None:
                fields[column] = result
        return fields

    def _check_id(
        self, row: int, value: object, errors: list[FieldError], first: int | None = None
    ) -> str | None:
        if not self._has_id:
            return f"row-{row}"
        text = cell_text(value)
        if text is None:
            text = f"row-{row}"
        else:
            try:
                check_id(text)
            except CellProblem as exc:
                errors.append(FieldError("id", str(exc)))
                return None
        if first is None:
            first = self._seen.setdefault(_id_key(text), row)
        if first != row:
            errors.append(FieldError("id", f"duplicate id {show(text)} (first at row {first})"))
        return text

    def _images(self, image: object, images: object, errors: list[FieldError]) -> list[str]:
        one_set = not is_unset(image)
        many_set = not is_unset(images)
        if one_set and not many_set:
            text = cell_text(image)
            assert text is not None
            # A list here is a mix-up of the two columns, not a strange file name.
            if "|" in text or (text.startswith("[") and isinstance(json_or_none(text), list)):
                errors.append(
                    FieldError("image", "image holds one source; put a list in the images column")
                )
                return []
            problem = self._count_problem(1)
            if problem is not None:
                errors.append(FieldError("image", problem))
                return []
            try:
                return [self._base.resolve(text)]
            except CellProblem as exc:
                errors.append(FieldError("image", str(exc)))
                return []
        if one_set and many_set:
            errors.append(FieldError("images", "both image and images are set; use one of them"))
            return []
        if not many_set:
            column = "image" if self._has_image or not self._has_images else "images"
            errors.append(FieldError(column, "no image; set image or images"))
            return []
        try:
            items = split_images(images)
        except CellProblem as exc:
            errors.append(FieldError("images", str(exc)))
            return []
        if not items:
            errors.append(FieldError("images", "images is an empty list; no image"))
            return []
        problem = self._count_problem(len(items))
        if problem is not None:
            errors.append(FieldError("images", problem))
            return []
        resolved: list[str] = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, str) or not item.strip():
                what = "empty" if item is None or isinstance(item, str) else "not a string"
                errors.append(FieldError("images", f"image {i} of {len(items)} is {what}"))
                continue
            try:
                resolved.append(self._base.resolve(item.strip()))
            except CellProblem as exc:
                errors.append(FieldError("images", f"image {i}: {exc}"))
        return resolved

    def _count_problem(self, count: int) -> str | None:
        try:
            model_check.check_image_count(self._profile, count)
        except SpecValueError as exc:
            return str(exc)
        return None

    def _extras(self, cells: Mapping[str, object], errors: list[FieldError]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self._has_params_json:
            raw = cells.get("params")
            if not is_unset(raw):
                try:
                    extra = parse_params(raw)
                except CellProblem as exc:
                    errors.append(FieldError("params", str(exc)))
                for key in extra:
                    if key.strip().lower() in FIXED_FIELDS:
                        errors.append(FieldError("params", _fixed_reason("params", key)))
        for column, name in self._params:
            raw = cells.get(column)
            if isinstance(raw, str) and len(raw) > MAX_PARAM_VALUE_CHARS:
                errors.append(
                    FieldError(
                        column, f"{len(raw)} characters; the limit is {MAX_PARAM_VALUE_CHARS}"
                    )
                )
                continue
            value = param_value(raw)
            if value is None:
                continue
            if name in extra:
                errors.append(
                    FieldError(column, f"{name} is set in both params and {column}; keep one")
                )
                continue
            extra[name] = value
        return extra


def _prompt(value: object, errors: list[FieldError], profile: ModelProfile) -> str | None:
    """The prompt, stripped; None (and an error) when it is missing, empty or too long."""
    text = value.strip() if isinstance(value, str) else None
    if value is None:
        errors.append(FieldError("prompt", "prompt is missing"))
    elif not text:
        errors.append(FieldError("prompt", "prompt is empty"))
    else:
        try:
            model_check.check_prompt(profile, text)
        except SpecValueError as exc:
            errors.append(FieldError("prompt", str(exc)))
    return text


def _fixed_reason(where: str, key: str) -> str:
    canonical = key.strip().lower()
    if canonical in KNOWN_COLUMNS:
        return f"{where} sets {key!r}, which has its own column; use the {canonical} column"
    return f"{where} sets {key!r}, which the client sets itself"


def fixed_param_column_reason(column: str) -> str | None:
    """Why a `param.<name>` column may not exist, or None when it may."""
    name = column[len(PARAM_PREFIX) :]
    if not name.strip():
        return f"column {column!r} names no parameter"
    if name.strip().lower() in FIXED_FIELDS:
        return _fixed_reason(f"column {column!r}", name)
    return None


def ragged_row(row: int, expected: int, found: int, text: str | None) -> InvalidRow:
    """The InvalidRow for a CSV row with the wrong number of fields."""
    reason = f"expected {expected} fields, found {found}"
    if text and "\n" in text:
        reason += "; the row spans several lines, so a quote may be unclosed"
    return InvalidRow(row=row, id=None, errors=(FieldError(ROW_COLUMN, reason),))
