"""A checked `where` expression (`Where`), and the two ways to get one: `parse_where` (syntax and
allow-list, no columns needed) and `compile_where` (also the columns and their kinds)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipeline.errors import ConfigError
from pipeline.manifest.where.evaluate import evaluate
from pipeline.manifest.where.kinds import check
from pipeline.manifest.where.language import (
    MAX_SHOWN_COLUMNS,
    MAX_WHERE_CHARS,
    NUMBER,
    TEXT,
    fail,
    shorten,
)
from pipeline.manifest.where.nodes import Node
from pipeline.manifest.where.parse import parse
from pipeline.manifest.where.values import Env


class Where:
    """A checked `where` expression: `mask(frame)` answers one bool per row."""

    __slots__ = ("_root", "columns", "text")

    text: str
    columns: frozenset[str]

    def __init__(self, text: str, root: Node) -> None:
        self.text = text
        self._root = root
        self.columns = frozenset(name for name, _ in root.column_refs())

    def mask(self, frame: pd.DataFrame) -> npt.NDArray[np.bool_]:
        """One bool per row of `frame`: true where the condition holds (unknown is false).

        ConfigError when a value does not fit (text compared with a number, a column the
        frame lacks...).
        """
        n = len(frame)
        if n == 0:
            return np.zeros(0, dtype=bool)
        env = Env(frame, self.text)
        try:
            with np.errstate(all="ignore"):
                value = evaluate(self._root, env)
        except ConfigError:
            raise
        except Exception as exc:  # a bug or an odd cell type: one clear message, no traceback
            raise fail(
                f"cannot be evaluated on these rows ({type(exc).__name__})", shorten(self.text)
            ) from exc
        return np.asarray(value.data.astype(bool) & ~value.null, dtype=bool)

    def check_columns(self, columns: Sequence[str], numeric: Iterable[str] = ()) -> None:
        """ConfigError unless every column used is in `columns` and the kinds fit (`numeric`
        columns are numbers, the others text until the rows say otherwise)."""
        known = list(columns)
        present = set(known)
        for name, _ in self._root.column_refs():
            if name not in present:
                raise _unknown_column(name, known)
        numbers = set(numeric)
        check(self._root, {c: NUMBER if c in numbers else TEXT for c in known})

    def __repr__(self) -> str:
        return f"Where({self.text!r})"


def parse_where(text: str) -> Where:
    """Check the syntax and the allow-list of `text` (no column needed); ConfigError if bad."""
    if not isinstance(text, str):
        raise ConfigError("where expression must be text")
    if len(text) > MAX_WHERE_CHARS:
        raise ConfigError(
            f"where expression is too long ({len(text)} characters; at most {MAX_WHERE_CHARS})"
        )
    if not text.strip():
        raise ConfigError("where expression is empty")
    root = parse(text)
    check(root, {})
    return Where(text, root)


def _unknown_column(name: str, columns: Sequence[str]) -> ConfigError:
    lowered = {c.lower(): c for c in columns}
    close = difflib.get_close_matches(name, list(columns), n=1)
    hint = lowered.get(name.lower()) or (close[0] if close else None)
    did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
    shown = ", ".join(shorten(c) for c in columns[:MAX_SHOWN_COLUMNS])
    if len(columns) > MAX_SHOWN_COLUMNS:
        shown += f" and {len(columns) - MAX_SHOWN_COLUMNS} more"
    return fail(
        f"unknown column {shorten(name)!r}{did_you_mean}; the manifest's columns are: "
        f"{shown or '(none)'}"
    )


def compile_where(text: str, columns: Sequence[str], numeric: Iterable[str] = ()) -> Where:
    """`parse_where`, then check every column exists and the kinds fit (`numeric` columns are
    numbers, the others text until the rows say otherwise); ConfigError if not."""
    where = parse_where(text)
    where.check_columns(columns, numeric)
    return where
