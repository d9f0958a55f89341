"""Row validation for manifests: one row's cells become a ManifestRow or an InvalidRow.

The column rules themselves are documented in `pipeline.manifest.open`. This module does no I/O:
sources are resolved to absolute paths or URIs here and read (and checked) later.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote, urlsplit

from pipeline import spec
from pipeline.errors import SpecValueError
from pipeline.manifest.types import (
    ROW_COLUMN,
    EditParams,
    FieldError,
    InvalidRow,
    ManifestRow,
    ParsedRow,
)

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

MAX_ID_CHARS = 256
MIN_SEED = 0
MAX_SEED = 2**63 - 1
# The column name FieldErrors use for problems of the whole row (a ragged CSV row).
# Values quoted in reasons are cut to this length so one bad cell cannot flood a report.
MAX_SHOWN_CHARS = 60
# Integers written with more digits than this are out of every range we accept; checking the
# length first keeps int() away from pathological inputs.
MAX_INT_DIGITS = 30
# A `params` (or JSON `images`) cell is a form field too: size, members and nesting capped.
MAX_PARAMS_CHARS = 16 * 1024
MAX_PARAMS_MEMBERS = 64
MAX_PARAMS_DEPTH = 8
# One `param.<name>` cell, as text.
MAX_PARAM_VALUE_CHARS = 4096
ID_DIGEST_BYTES = 8
# Plain ASCII digit strings shorter than this are parsed without further ado.
MAX_FAST_DIGITS = 19
# Values of the enumerated columns (n, size, output_format...) repeat across rows; their
# checks are remembered up to this many distinct values per pass.
MEMO_ENTRIES = 4096

_INT_RE = re.compile(r"^[+-]?\d+$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BAD_ID_CHARS_RE = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def show(value: object) -> str:
    """A value quoted for a reason, cut to MAX_SHOWN_CHARS."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_SHOWN_CHARS:
        text = text[: MAX_SHOWN_CHARS - 3] + "..."
    return repr(text) if isinstance(value, str) else text


class _Problem(ValueError):
    """One reason a value is invalid (the message is the reason)."""


@dataclass(frozen=True)
class SourceBase:
    """Where relative sources resolve: a local directory, or an S3 bucket and key prefix."""

    local_dir: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""

    @classmethod
    def for_manifest(cls, uri: str) -> SourceBase:
        """The base of a manifest at a local absolute path or an `s3://bucket/key` URI."""
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://") :].partition("/")
            return cls(s3_bucket=bucket, s3_prefix=posixpath.dirname(key))
        return cls(local_dir=os.path.dirname(os.path.abspath(uri)))

    def resolve(self, source: str) -> str:
        """An absolute local path, an s3:// URI or an http(s):// URL for `source`.

        Raises _Problem with the reason when the source cannot be one.
        """
        if "\x00" in source:
            raise _Problem(f"{show(source)} contains a NUL character")
        m = _SCHEME_RE.match(source)
        if m:
            scheme = m.group(1).lower()
            if scheme in ("http", "https"):
                if not urlsplit(source).netloc:
                    raise _Problem(f"{show(source)} has no host")
                return source
            if scheme == "s3":
                bucket, _, key = source[len("s3://") :].partition("/")
                if not bucket or not key:
                    raise _Problem(f"{show(source)} needs a bucket and a key (s3://bucket/key)")
                return source
            if scheme == "file":
                parts = urlsplit(source)
                if parts.netloc not in ("", "localhost"):
                    raise _Problem(f"{show(source)} names another host; file:// must be local")
                path = unquote(parts.path)
                if not path or path == "/":
                    raise _Problem(f"{show(source)} has no path")
                return os.path.normpath(path)
            raise _Problem(
                f"unsupported scheme {scheme!r} in {show(source)}; expected a local path, "
                "file://, s3:// or http(s)://"
            )
        # Most paths are already normal; normpath is only needed for `.`, `..` and `//`.
        plain = not source.startswith(".") and "/." not in source and "//" not in source
        plain = plain and not source.endswith("/")
        if source.startswith("/"):
            return source if plain else os.path.normpath(source)
        if self.s3_bucket is not None:
            if plain:
                key = f"{self.s3_prefix}/{source}" if self.s3_prefix else source
            else:
                key = posixpath.normpath(posixpath.join(self.s3_prefix, source))
                if key in (".", "..") or key.startswith("../"):
                    raise _Problem(f"relative path {show(source)} leads outside the bucket")
            return f"s3://{self.s3_bucket}/{key}"
        base = self.local_dir or os.getcwd()
        if plain:
            return f"{base}/{source}" if base != "/" else f"/{source}"
        return os.path.normpath(os.path.join(base, source))


def _text(value: object) -> str | None:
    """A cell as stripped text; empty and missing both mean "not set"."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = value.strip() if isinstance(value, str) else str(value).strip()
    return text or None


def _is_unset(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | tuple):
        return not value
    return isinstance(value, float) and math.isnan(value)


def parse_int(column: str, value: object, low: int, high: int) -> int | None:
    """An integer cell within low..high, None when unset; raises _Problem otherwise.

    Accepts 42, "42", 42.0 and "42.0" (a spreadsheet or pandas float column), not 4.5.
    """
    result: int
    if type(value) is str and value.isascii() and value.isdigit() and len(value) < MAX_FAST_DIGITS:
        result = int(value)
        if not low <= result <= high:
            raise _Problem(f"{column} {result} is out of range {low}..{high}")
        return result
    if value is None:
        return None
    if isinstance(value, bool):
        raise _Problem(f"{column} {value} is not an integer")
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        # NaN is a value here, not "missing": pyarrow stores pandas' missing floats as null.
        if not value.is_integer():
            raise _Problem(f"{column} {value} is not an integer")
        result = int(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        if _INT_RE.match(text):
            if len(text) > MAX_INT_DIGITS:
                raise _Problem(f"{column} {show(text)} is out of range {low}..{high}")
            result = int(text)
        else:
            try:
                number = Decimal(text)
            except InvalidOperation:
                raise _Problem(f"{column} {show(text)} is not an integer") from None
            if not number.is_finite() or number != number.to_integral_value():
                raise _Problem(f"{column} {show(text)} is not an integer")
            if number.adjusted() >= MAX_INT_DIGITS:
                raise _Problem(f"{column} {show(text)} is out of range {low}..{high}")
            result = int(number)
    if not low <= result <= high:
        raise _Problem(f"{column} {result} is out of range {low}..{high}")
    return result


def check_id(value: str) -> None:
    """Raise _Problem unless `value` is a usable id (a label; never part of a storage key)."""
    if len(value) > MAX_ID_CHARS:
        raise _Problem(f"id is {len(value)} characters; the limit is {MAX_ID_CHARS}")
    m = _BAD_ID_CHARS_RE.search(value)
    if m:
        char = m.group(0)
        what = repr(char) if char in "/\\" else "a control character"
        raise _Problem(f"id {show(value)} contains {what}")
    if value in (".", ".."):
        raise _Problem(f"id {value!r} is not allowed")


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


# JSON without NaN/Infinity (which are not JSON, and no API field takes them).
_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_JSON_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}


def param_value(value: object) -> Any:
    """A `param.<name>` cell: a JSON scalar when it parses as one, else the text; None = unset."""
    if _is_unset(value):
        return None
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text in _JSON_LITERALS:
        return _JSON_LITERALS[text]
    try:
        parsed = _JSON.decode(text)
    except ValueError:
        return text
    if isinstance(parsed, float) and not math.isfinite(parsed):
        return text  # 1e999: no API field takes an infinity
    if parsed is None or isinstance(parsed, str | int | float | bool):
        return parsed
    return text


def _json_depth(obj: object) -> int:
    """How deeply lists and objects nest in `obj` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, Mapping):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_PARAMS_DEPTH:
            break
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _decode_json_cell(column: str, text: str, kind: str = "valid JSON") -> object:
    """A JSON cell decoded within the size cap; _Problem naming the column otherwise."""
    if len(text) > MAX_PARAMS_CHARS:
        raise _Problem(f"{column} is {len(text)} characters; the limit is {MAX_PARAMS_CHARS}")
    try:
        return _JSON.decode(text)
    except json.JSONDecodeError as exc:
        raise _Problem(f"{column} is not {kind}: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise _Problem(f"{column} nests deeper than {MAX_PARAMS_DEPTH} levels") from None
    except ValueError:
        raise _Problem(f"{column} is not {kind}: NaN and Infinity are not allowed") from None


def _parse_params(value: object) -> dict[str, Any]:
    """The `params` cell as a dict (null members dropped); raises _Problem otherwise."""
    obj: object = dict(value) if isinstance(value, Mapping) else None
    if obj is None:
        obj = _decode_json_cell("params", str(value).strip())
    if not isinstance(obj, dict):
        raise _Problem(f"params must be a JSON object, not {type(obj).__name__} {show(value)}")
    if len(obj) > MAX_PARAMS_MEMBERS:
        raise _Problem(f"params has {len(obj)} members; the limit is {MAX_PARAMS_MEMBERS}")
    if _json_depth(obj) > MAX_PARAMS_DEPTH:
        raise _Problem(f"params nests deeper than {MAX_PARAMS_DEPTH} levels")
    if isinstance(value, Mapping) and len(json.dumps(obj, default=str)) > MAX_PARAMS_CHARS:
        raise _Problem(f"params is over {MAX_PARAMS_CHARS} characters as JSON")
    return {str(k): v for k, v in obj.items() if v is not None}


def _split_images(value: object) -> list[object]:
    """The `images` cell as a list: a JSON array, `a|b|c`, or a Parquet list."""
    if isinstance(value, list | tuple):
        return list(value)
    text = str(value).strip()
    if text.startswith("["):
        parsed = _decode_json_cell("images", text, "a valid JSON array")
        if not isinstance(parsed, list):
            raise _Problem("images is not a valid JSON array")
        return parsed
    return [part.strip() for part in text.split("|")]


def _id_key(value: str) -> int:
    digest = hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=ID_DIGEST_BYTES)
    return int.from_bytes(digest.digest(), "little")


Check = Callable[[object], tuple[Any, str | None]]
"""A column check: a cell (not None, not "") -> (value or None when unset, reason or None)."""


def _int_check(column: str, low: int, high: int) -> Check:
    def check(value: object) -> tuple[Any, str | None]:
        try:
            return parse_int(column, value, low, high), None
        except _Problem as exc:
            return None, str(exc)

    return check


def _text_check(convert: Callable[[str], Any]) -> Check:
    """A check for a text column: `convert` returns the value or raises SpecValueError."""

    def check(value: object) -> tuple[Any, str | None]:
        text = _text(value)
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


def _simple_checks() -> dict[str, Check]:
    """The checks of the optional scalar columns (whose values become plain fields)."""
    return {
        "seed": _int_check("seed", MIN_SEED, MAX_SEED),
        "n": _memoized(_int_check("n", spec.MIN_N, spec.MAX_N)),
        "output_compression": _memoized(
            _int_check("output_compression", spec.MIN_COMPRESSION, spec.MAX_COMPRESSION)
        ),
        "size": _memoized(_text_check(_keep(spec.check_size))),
        "aspect_ratio": _memoized(_text_check(_keep(spec.check_aspect_ratio))),
        "resolution": _memoized(_text_check(_keep(spec.check_resolution))),
        "output_format": _memoized(_text_check(spec.normalize_output_format)),
        "quality": _text_check(str),
        "user": _text_check(str),
    }


class RowValidator:
    """Validates the rows of one pass over a manifest, in order (it remembers ids seen).

    `columns` are the canonical column names present (see KNOWN_COLUMNS, `param.<name>`).
    Ids are remembered as 8-byte digests mapped to their first row (about 100 bytes per row
    in a dict, whatever the ids' length); a manifest without an id column needs nothing,
    since derived ids (`row-<n>`) cannot repeat.
    """

    def __init__(self, columns: list[str], base: SourceBase) -> None:
        self._base = base
        self._has_id = "id" in columns
        self._has_image = "image" in columns
        self._has_images = "images" in columns
        self._has_mask = "mask" in columns
        self._checks = [(c, check) for c, check in _simple_checks().items() if c in columns]
        self._params = [(c, c[len(PARAM_PREFIX) :]) for c in columns if c.startswith(PARAM_PREFIX)]
        self._has_params_json = "params" in columns
        self._seen: dict[int, int] = {}

    def validate(
        self, row: int, cells: Mapping[str, object], problems: tuple[FieldError, ...] = ()
    ) -> ParsedRow:
        """The row's ManifestRow, or an InvalidRow with `problems` and every problem found."""
        errors: list[FieldError] = list(problems)
        get = cells.get

        row_id = self._check_id(row, get("id"), errors)
        images = self._images(get("image"), get("images"), errors)

        prompt = get("prompt")
        prompt_text = prompt.strip() if isinstance(prompt, str) else None
        if prompt is None:
            errors.append(FieldError("prompt", "prompt is missing"))
        elif not prompt_text:
            errors.append(FieldError("prompt", "prompt is empty"))
        elif len(prompt_text) > spec.MAX_PROMPT_CHARS:
            errors.append(
                FieldError(
                    "prompt",
                    f"prompt is {len(prompt_text)} characters; the limit is "
                    f"{spec.MAX_PROMPT_CHARS}",
                )
            )

        mask: str | None = None
        if self._has_mask:
            mask_text = _text(get("mask"))
            if mask_text is not None:
                try:
                    mask = self._base.resolve(mask_text)
                except _Problem as exc:
                    errors.append(FieldError("mask", str(exc)))

        fields: dict[str, Any] = {}
        for column, check in self._checks:
            value = get(column)
            if value is None or value == "":
                continue
            result, reason = check(value)
            if reason is not None:
                errors.append(FieldError(column, reason))
            elif result is not None:
                fields[column] = result

        extra = self._extras(cells, errors) if self._params or self._has_params_json else {}

        if errors:
            return InvalidRow(row=row, id=row_id, errors=tuple(errors))
        assert prompt_text is not None  # no errors means the prompt was checked
        field = fields.get
        return ManifestRow(
            row=row,
            id=row_id or f"row-{row}",
            images=tuple(images),
            images_column="images" if _is_unset(cells.get("image")) else "image",
            prompt=prompt_text,
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
        )

    def _check_id(self, row: int, value: object, errors: list[FieldError]) -> str | None:
        if not self._has_id:
            return f"row-{row}"
        text = _text(value)
        if text is None:
            text = f"row-{row}"
        else:
            try:
                check_id(text)
            except _Problem as exc:
                errors.append(FieldError("id", str(exc)))
                return None
        key = _id_key(text)
        first = self._seen.setdefault(key, row)
        if first != row:
            errors.append(FieldError("id", f"duplicate id {show(text)} (first at row {first})"))
        return text

    def _images(self, image: object, images: object, errors: list[FieldError]) -> list[str]:
        one_set = not _is_unset(image)
        many_set = not _is_unset(images)
        if one_set and not many_set:
            text = _text(image)
            assert text is not None
            # A list here is a mix-up of the two columns, not a strange file name.
            if "|" in text or (text.startswith("[") and isinstance(_json_or_none(text), list)):
                errors.append(
                    FieldError("image", "image holds one source; put a list in the images column")
                )
                return []
            try:
                return [self._base.resolve(text)]
            except _Problem as exc:
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
            items = _split_images(images)
        except _Problem as exc:
            errors.append(FieldError("images", str(exc)))
            return []
        if not items:
            errors.append(FieldError("images", "images is an empty list; no image"))
            return []
        if len(items) > spec.MAX_IMAGES:
            errors.append(
                FieldError("images", f"{len(items)} images; the limit is {spec.MAX_IMAGES}")
            )
            return []
        resolved: list[str] = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, str) or not item.strip():
                what = "empty" if item is None or isinstance(item, str) else "not a string"
                errors.append(FieldError("images", f"image {i} of {len(items)} is {what}"))
                continue
            try:
                resolved.append(self._base.resolve(item.strip()))
            except _Problem as exc:
                errors.append(FieldError("images", f"image {i}: {exc}"))
        return resolved

    def _extras(self, cells: Mapping[str, object], errors: list[FieldError]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self._has_params_json:
            raw = cells.get("params")
            if not _is_unset(raw):
                try:
                    extra = _parse_params(raw)
                except _Problem as exc:
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


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def ragged_row(row: int, expected: int, found: int, text: str | None) -> InvalidRow:
    """The InvalidRow for a CSV row with the wrong number of fields."""
    reason = f"expected {expected} fields, found {found}"
    if text and "\n" in text:
        reason += "; the row spans several lines, so a quote may be unclosed"
    return InvalidRow(row=row, id=None, errors=(FieldError(ROW_COLUMN, reason),))
