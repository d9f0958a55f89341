"""One manifest cell at a time: as text, an integer in a range, an id, a JSON scalar, a JSON
object (`params`) or a list of sources (`images`); each check capped so one bad cell cannot
cost much, and each refusal a CellProblem whose message is the reason."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

# An id is a label (never part of a storage key) of at most this many characters.
MAX_ID_CHARS = 256
# Values quoted in reasons are cut to this length so one bad cell cannot flood a report.
MAX_SHOWN_CHARS = 60
# Integers written with more digits than this are out of every range we accept; checking the
# length first keeps int() away from pathological inputs.
MAX_INT_DIGITS = 30
# A `params` (or JSON `images`) cell is a form field too: size, members and nesting capped.
MAX_PARAMS_CHARS = 16 * 1024
MAX_PARAMS_MEMBERS = 64
MAX_PARAMS_DEPTH = 8
# Plain ASCII digit strings shorter than this are parsed without further ado.
MAX_FAST_DIGITS = 19

_INT_RE = re.compile(r"^[+-]?\d+$")
_BAD_ID_CHARS_RE = re.compile(r"[/\\\x00-\x1f\x7f-\x9f\u2028\u2029]")


def show(value: object) -> str:
    """A value quoted for a reason, cut to MAX_SHOWN_CHARS."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_SHOWN_CHARS:
        text = text[: MAX_SHOWN_CHARS - 3] + "..."
    return repr(text) if isinstance(value, str) else text


class CellProblem(ValueError):
    """One reason a value is invalid (the message is the reason)."""


def cell_text(value: object) -> str | None:
    """A cell as stripped text; empty and missing both mean "not set"."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    text = value.strip() if isinstance(value, str) else str(value).strip()
    return text or None


def is_unset(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | tuple):
        return not value
    return isinstance(value, float) and math.isnan(value)


def parse_int(column: str, value: object, low: int, high: int) -> int | None:
    """An integer cell within low..high, None when unset; raises CellProblem otherwise.

    Accepts 42, "42", 42.0 and "42.0" (a spreadsheet or pandas float column), not 4.5.
    """
    result: int
    if type(value) is str and value.isascii() and value.isdigit() and len(value) < MAX_FAST_DIGITS:
        result = int(value)
        if not low <= result <= high:
            raise CellProblem(f"{column} {result} is out of range {low}..{high}")
        return result
    if value is None:
        return None
    if isinstance(value, bool):
        raise CellProblem(f"{column} {value} is not an integer")
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        # NaN is a value here, not "missing": pyarrow stores pandas' missing floats as null.
        if not value.is_integer():
            raise CellProblem(f"{column} {value} is not an integer")
        result = int(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        if _INT_RE.match(text):
            if len(text) > MAX_INT_DIGITS:
                raise CellProblem(f"{column} {show(text)} is out of range {low}..{high}")
            result = int(text)
        else:
            try:
                number = Decimal(text)
            except InvalidOperation:
                raise CellProblem(f"{column} {show(text)} is not an integer") from None
            if not number.is_finite() or number != number.to_integral_value():
                raise CellProblem(f"{column} {show(text)} is not an integer")
            if number.adjusted() >= MAX_INT_DIGITS:
                raise CellProblem(f"{column} {show(text)} is out of range {low}..{high}")
            result = int(number)
    if not low <= result <= high:
        raise CellProblem(f"{column} {result} is out of range {low}..{high}")
    return result


def check_id(value: str) -> None:
    """Raise CellProblem unless `value` is a usable id (a label; never part of a storage key)."""
    if len(value) > MAX_ID_CHARS:
        raise CellProblem(f"id is {len(value)} characters; the limit is {MAX_ID_CHARS}")
    m = _BAD_ID_CHARS_RE.search(value)
    if m:
        char = m.group(0)
        what = repr(char) if char in "/\\" else "a control character"
        raise CellProblem(f"id {show(value)} contains {what}")
    if value in (".", ".."):
        raise CellProblem(f"id {value!r} is not allowed")


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


# JSON without NaN/Infinity (which are not JSON, and no API field takes them).
_JSON = json.JSONDecoder(parse_constant=_reject_constant)
_JSON_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}


def param_value(value: object) -> Any:
    """A `param.<name>` cell: a JSON scalar when it parses as one, else the text; None = unset."""
    if is_unset(value):
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
    """A JSON cell decoded within the size cap; CellProblem naming the column otherwise."""
    if len(text) > MAX_PARAMS_CHARS:
        raise CellProblem(f"{column} is {len(text)} characters; the limit is {MAX_PARAMS_CHARS}")
    try:
        return _JSON.decode(text)
    except json.JSONDecodeError as exc:
        raise CellProblem(f"{column} is not {kind}: {exc.msg} at character {exc.pos}") from None
    except RecursionError:
        raise CellProblem(f"{column} nests deeper than {MAX_PARAMS_DEPTH} levels") from None
    except ValueError:
        raise CellProblem(f"{column} is not {kind}: NaN and Infinity are not allowed") from None


def parse_params(value: object) -> dict[str, Any]:
    """The `params` cell as a dict (null members dropped); raises CellProblem otherwise."""
    obj: object = dict(value) if isinstance(value, Mapping) else None
    if obj is None:
        obj = _decode_json_cell("params", str(value).strip())
    if not isinstance(obj, dict):
        raise CellProblem(f"params must be a JSON object, not {type(obj).__name__} {show(value)}")
    if len(obj) > MAX_PARAMS_MEMBERS:
        raise CellProblem(f"params has {len(obj)} members; the limit is {MAX_PARAMS_MEMBERS}")
    if _json_depth(obj) > MAX_PARAMS_DEPTH:
        raise CellProblem(f"params nests deeper than {MAX_PARAMS_DEPTH} levels")
    if isinstance(value, Mapping) and len(json.dumps(obj, default=str)) > MAX_PARAMS_CHARS:
        raise CellProblem(f"params is over {MAX_PARAMS_CHARS} characters as JSON")
    return {str(k): v for k, v in obj.items() if v is not None}


def split_images(value: object) -> list[object]:
    """The `images` cell as a list: a JSON array, `a|b|c`, or a Parquet list."""
    if isinstance(value, list | tuple):
        return list(value)
    text = str(value).strip()
    if text.startswith("["):
        parsed = _decode_json_cell("images", text, "a valid JSON array")
        if not isinstance(parsed, list):
            raise CellProblem("images is not a valid JSON array")
        return parsed
    return [part.strip() for part in text.split("|")]


def json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None
