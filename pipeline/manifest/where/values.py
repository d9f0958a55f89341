"""Columns of values for the `where` evaluator: a batch's cells as typed arrays with a null mask,
whatever the column's dtype, and the conversions `num()` and `text()` make."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipeline.manifest.where.language import BOOL, MIXED, NULL, NUMBER, TEXT, fail, shorten

BoolArray = npt.NDArray[np.bool_]
AnyArray = npt.NDArray[Any]

INT64_LIMIT: Final = 2**63
_EXACT_FLOAT_INT: Final = 2**53


@dataclass(frozen=True)
class Val:
    """A column of values: `data` holds a placeholder where `null` is true."""

    kind: str
    data: AnyArray
    null: BoolArray


def null_val(n: int) -> Val:
    return Val(NULL, np.zeros(n, dtype=object), np.ones(n, dtype=bool))


def unknown(kind: str, n: int) -> Val:
    """n nulls of `kind` (a value computed from nulls)."""
    if kind == BOOL:
        return bool_val(np.zeros(n, dtype=bool), np.ones(n, dtype=bool))
    if kind == NUMBER:
        return Val(NUMBER, np.zeros(n, dtype=np.float64), np.ones(n, dtype=bool))
    return Val(kind, np.zeros(n, dtype=object), np.ones(n, dtype=bool))


def bool_val(data: BoolArray, null: BoolArray) -> Val:
    return Val(BOOL, data, null)


def _float_text(data: npt.NDArray[np.float64]) -> AnyArray:
    out: AnyArray = data.astype(str).astype(object)
    whole = np.isfinite(data) & (np.abs(data) < _EXACT_FLOAT_INT)
    whole[whole] = data[whole] == np.floor(data[whole])
    out[whole] = data[whole].astype(np.int64).astype(str).astype(object)
    return out


def _cell_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return str(_float_text(np.array([value], dtype=np.float64))[0])
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _from_objects(objects: AnyArray, null: BoolArray) -> Val:
    """Classify an object array (nulls marked in `null`) by the values it holds."""
    inferred = pd.api.types.infer_dtype(objects, skipna=True)
    if inferred == "empty" or bool(null.all()):
        return null_val(len(objects))
    if inferred == "string":
        text = objects.copy()
        text[null] = ""
        return Val(TEXT, text, null)
    if inferred == "boolean":
        return Val(BOOL, np.asarray(np.where(null, False, objects), dtype=bool), null)
    if inferred == "integer":
        filled = np.where(null, 0, objects)
        try:
            return Val(NUMBER, np.asarray(filled, dtype=np.int64), null)
        except OverflowError:
            return Val(NUMBER, np.asarray(filled, dtype=np.float64), null)
    if inferred in ("floating", "mixed-integer-float", "decimal"):
        floats = np.asarray(np.where(null, np.nan, objects), dtype=np.float64)
        return Val(NUMBER, floats, null | np.isnan(floats))
    if inferred in ("datetime", "datetime64", "date", "time", "timedelta", "period"):
        text = np.array(
            [_cell_text(v) if not isnull else "" for v, isnull in zip(objects, null, strict=True)]
        )
        return Val(TEXT, text.astype(object), null)
    return Val(MIXED, objects, null)


def normalise(series: pd.Series[Any]) -> Val:
    """One manifest column as a Val, whatever its dtype (numpy, nullable, Arrow, object)."""
    dtype = series.dtype
    n = len(series)
    if isinstance(dtype, np.dtype):
        if dtype.kind == "b":
            return Val(BOOL, series.to_numpy(dtype=bool), np.zeros(n, dtype=bool))
        if dtype.kind in "iu":
            ints = series.to_numpy()
            if dtype.kind == "u" and n and int(ints.max()) >= INT64_LIMIT:
                return Val(NUMBER, ints.astype(np.float64), np.zeros(n, dtype=bool))
            return Val(NUMBER, ints.astype(np.int64), np.zeros(n, dtype=bool))
        if dtype.kind == "f":
            floats = series.to_numpy(dtype=np.float64)
            return Val(NUMBER, floats, np.isnan(floats))
    null = np.asarray(series.isna().to_numpy(), dtype=bool)
    objects = series.to_numpy(dtype=object, copy=True)
    objects[null] = None
    return _from_objects(objects, null)


def to_number(value: Val) -> Val:
    """`num()`: the values as numbers, null where they are not one."""
    if value.kind == NUMBER:
        return value
    if value.kind == BOOL:
        return Val(NUMBER, value.data.astype(np.int64), value.null.copy())
    if value.kind != TEXT:  # mixed values: one by one
        floats = np.array([_cell_number(v) for v in value.data.tolist()], dtype=np.float64)
        return Val(NUMBER, floats, value.null | np.isnan(floats))
    numbers = pd.to_numeric(pd.Series(value.data, dtype=object).str.strip(), errors="coerce")
    if numbers.dtype.kind == "i":
        return Val(NUMBER, numbers.to_numpy(dtype=np.int64), value.null.copy())
    floats = np.asarray(numbers.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    return Val(NUMBER, floats, value.null | np.isnan(floats))


def _cell_number(value: object) -> float:
    if isinstance(value, bool | np.bool_ | int | float | np.integer | np.floating):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return float("nan")
    return float("nan")


def to_text(value: Val) -> Val:
    """`text()`: the values as text (whole numbers without `.0`, true/false in words)."""
    null = value.null.copy()
    data = value.data
    if value.kind == TEXT:
        return value
    if value.kind == BOOL:
        text: AnyArray = np.where(data.astype(bool), "true", "false").astype(object)
    elif value.kind == NUMBER and data.dtype.kind == "i":
        text = data.astype(str).astype(object)
    elif value.kind == NUMBER:
        text = _float_text(data.astype(np.float64))
    else:
        text = np.array([_cell_text(v) for v in data.tolist()], dtype=object)
    text[null] = ""
    return Val(TEXT, text, null)


class Env:
    """One evaluation: the batch and its columns, each normalised once."""

    def __init__(self, frame: pd.DataFrame, expression: str) -> None:
        self.frame = frame
        self.n = len(frame)
        self.expression = expression
        self._columns: dict[str, Val] = {}

    def column(self, name: str) -> Val:
        found = self._columns.get(name)
        if found is None:
            if name not in self.frame.columns:
                raise fail(f"the rows have no column {name!r}", shorten(self.expression))
            series = self.frame[name]
            if not isinstance(series, pd.Series):
                raise fail(f"the rows have the column {name!r} twice")
            found = self._columns[name] = normalise(series)
        return found
