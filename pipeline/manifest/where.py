"""Safe row filters (`where`) for choosing manifest rows: a small language, checked before use.

An expression is parsed with Python's own parser (`ast`, never compiled or run) into this
module's nodes, checked against an allow-list, and evaluated with pandas/numpy operations over
a batch of rows. Nothing in it can reach Python objects, attributes, modules or the
environment. `parse_where` checks the syntax and the allow-list (no columns needed), so a
flow can refuse a hostile string before it opens the manifest; `compile_where` also checks
the column names and, from the column kinds, the types; `Where.mask` answers one bool per row.

Grammar (Python expression syntax, but only these parts)::

    condition  := value OP value [OP value ...]    OP: == != < <= > >=  (a < b < c: a<b and b<c)
                | value in [literal, ...]  |  value not in (literal, ...)
                | condition and condition  |  condition or condition  |  not condition
                | ( condition )  |  True  |  False
                | contains(value, "x") | startswith(value, "x") | endswith(value, "x")
                | isnull(value) | notnull(value)
    value      := column | literal | ( value ) | -value | +value
                | value + value | value - value | value * value | value / value
                | value // value | value % value            (numbers only)
                | lower(value) | upper(value) | strip(value) | length(value)
                | num(value) | text(value) | col("column name")
    column     := a name (seed, size, prompt)  |  `any column name` (e.g. `param.turbo`)
    literal    := "text" | 'text' | 12 | -3.5 | 1e3 | True | False

Functions:

- `col("name")`: the column called name (any characters; same as `` `name` ``).
- `contains(t, "x")`, `startswith(t, "x")`, `endswith(t, "x")`: text tests, exact (no
  patterns, no case folding); the second argument is a quoted literal.
- `isnull(v)`, `notnull(v)`: the cell is empty (or not a number, after `num`).
- `lower(t)`, `upper(t)`, `strip(t)`: the text lower-cased, upper-cased, without surrounding
  white space. `length(t)`: its number of characters.
- `num(v)`: text read as a number, empty when it is not one (`num(quality) >= 2` for a CSV
  column, which is text). `text(v)`: the value as text (whole numbers without `.0`, true/false
  as `true`/`false`).

Meaning:

- In a CSV manifest every column is text except the numeric ones the caller names (`seed`,
  `n`, `output_compression` in pipeline.manifest.select); a Parquet column keeps its type. Text
  compared with a number is an error (use `num(col)` or quote the number); so is arithmetic on
  text. `==` on text is exact: `lower(size) == "auto"` folds case.
- An empty cell is null. A comparison with a null is unknown; `and`, `or`, `not` follow SQL's
  three-valued logic, and a row whose condition is unknown is not selected: with an empty
  seed, `seed > 10` and `not (seed > 10)` are both false and `isnull(seed)` is true.
- `in` / `not in` take a list or tuple of literals (`id in ["a", "b"]`); for text search use
  `contains`. Compare with None through `isnull` / `notnull`.
- Division by zero gives inf or NaN (no error); comparisons with those follow IEEE.
- A column whose name is not a plain identifier, is a Python keyword or contains `__` goes
  in backticks or `col("...")`.

Refused, each with a ConfigError naming the part: attribute access (`a.b`), subscripts,
names containing `__`, lambdas, comprehensions, f-strings, `:=`, `*`, dict/set literals,
`a if b else c`, `is`, bitwise operators (`& | ~ ^ << >>`), `**`, keyword arguments, calls of
anything but the functions above, unknown columns, an expression that is not a condition,
expressions longer than MAX_WHERE_CHARS characters, nested deeper than MAX_WHERE_DEPTH, with
more than MAX_WHERE_NODES parts, integers of 19 digits or more, lists over MAX_LIST_ITEMS.
"""

from __future__ import annotations

import ast
import difflib
import keyword
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from pipeline.errors import ConfigError

__all__ = [
    "FUNCTIONS",
    "MAX_LIST_ITEMS",
    "MAX_WHERE_CHARS",
    "MAX_WHERE_DEPTH",
    "MAX_WHERE_NODES",
    "Where",
    "compile_where",
    "parse_where",
]

MAX_WHERE_CHARS: Final = 2000
MAX_WHERE_DEPTH: Final = 32
MAX_WHERE_NODES: Final = 500
MAX_LIST_ITEMS: Final = 10_000
# Integer literals must stay below this in magnitude (they then fit an int64).
MAX_INT_LITERAL: Final = 10**18
# Parts of the expression quoted in messages are cut to this many characters.
SHOWN_CHARS: Final = 60
# Columns listed when a name is unknown.
MAX_SHOWN_COLUMNS: Final = 50

FUNCTIONS: Final[Mapping[str, str]] = {
    "col": 'col("name"): the column called name',
    "contains": 'contains(text, "x"): the text contains x',
    "startswith": 'startswith(text, "x"): the text starts with x',
    "endswith": 'endswith(text, "x"): the text ends with x',
    "isnull": "isnull(value): the cell is empty",
    "notnull": "notnull(value): the cell is not empty",
    "lower": "lower(text): the text in lower case",
    "upper": "upper(text): the text in upper case",
    "strip": "strip(text): the text without surrounding white space",
    "length": "length(text): the number of characters",
    "num": "num(value): the value as a number, empty when it is not one",
    "text": "text(value): the value as text",
}
_PREDICATES: Final = frozenset({"contains", "startswith", "endswith"})
_NULL_TESTS: Final = frozenset({"isnull", "notnull"})
_TEXT_ARGUMENT: Final = frozenset({"lower", "upper", "strip", "length"}) | _PREDICATES
_ALLOWED_FUNCTIONS: Final = ", ".join(sorted(FUNCTIONS))

BoolArray = npt.NDArray[np.bool_]
AnyArray = npt.NDArray[Any]

# Kinds of values. ANY: not known before the rows are seen.
NUMBER: Final = "number"
TEXT: Final = "text"
BOOL: Final = "bool"
NULL: Final = "null"
MIXED: Final = "mixed"
ANY: Final = "any"
_KIND_WORDS: Final[Mapping[str, str]] = {
    NUMBER: "a number",
    TEXT: "text",
    BOOL: "true/false",
    NULL: "empty",
    MIXED: "mixed values (text, numbers...)",
    ANY: "a value",
}

_INT64_LIMIT: Final = 2**63
_EXACT_FLOAT_INT: Final = 2**53

_COMPARE_OPS: Final[Mapping[type[ast.cmpop], str]] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_COMPARE_FUNCS: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_ARITH_OPS: Final[Mapping[type[ast.operator], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
}
_ARITH_FUNCS: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.true_divide,
    "//": np.floor_divide,
    "%": np.remainder,
}
_BITWISE: Final[Mapping[type[ast.operator], str]] = {
    ast.BitAnd: "&",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.LShift: "<<",
    ast.RShift: ">>",
}
# Constructs refused outright, with the words used in the message.
_REFUSED: Final[Mapping[type[ast.AST], str]] = {
    ast.Subscript: "subscripts and slices (x[...]) are not allowed",
    ast.Slice: "subscripts and slices (x[...]) are not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions (generator expressions) are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.FormattedValue: "f-strings are not allowed",
    ast.NamedExpr: "assignment expressions (:=) are not allowed",
    ast.Starred: "starred arguments (*) are not allowed",
    ast.Dict: "dict literals are not allowed",
    ast.Set: "set literals are not allowed",
    ast.IfExp: "conditional expressions (a if b else c) are not allowed",
    ast.Await: "await is not allowed",
    ast.Yield: "yield is not allowed",
    ast.YieldFrom: "yield is not allowed",
}
_ALLOWED_NODES: Final = (
    ast.BoolOp,
    ast.BinOp,
    ast.UnaryOp,
    ast.Compare,
    ast.Call,
    ast.Name,
    ast.Constant,
    ast.List,
    ast.Tuple,
)


# --- messages -------------------------------------------------------------------------------


def _shorten(text: str) -> str:
    """A part of the expression for a message: one line, at most SHOWN_CHARS characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= SHOWN_CHARS else flat[: SHOWN_CHARS - 3] + "..."


def _fail(reason: str, part: str | None = None, hint: str = "") -> ConfigError:
    shown = f": {part}" if part else ""
    return ConfigError(f"where expression: {reason}{shown}{f' ({hint})' if hint else ''}")


def _ref(name: str) -> str:
    """How to write column `name` in an expression."""
    if name.isidentifier() and not keyword.iskeyword(name) and "__" not in name:
        return name
    if "`" not in name:
        return f"`{name}`"
    return f"col({name!r})"


# --- values -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Val:
    """A column of values: `data` holds a placeholder where `null` is true."""

    kind: str
    data: AnyArray
    null: BoolArray


def _null_val(n: int) -> _Val:
    return _Val(NULL, np.zeros(n, dtype=object), np.ones(n, dtype=bool))


def _bool_val(data: BoolArray, null: BoolArray) -> _Val:
    return _Val(BOOL, data, null)


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


def _from_objects(objects: AnyArray, null: BoolArray) -> _Val:
    """Classify an object array (nulls marked in `null`) by the values it holds."""
    inferred = pd.api.types.infer_dtype(objects, skipna=True)
    if inferred == "empty" or bool(null.all()):
        return _null_val(len(objects))
    if inferred == "string":
        text = objects.copy()
        text[null] = ""
        return _Val(TEXT, text, null)
    if inferred == "boolean":
        return _Val(BOOL, np.asarray(np.where(null, False, objects), dtype=bool), null)
    if inferred == "integer":
        filled = np.where(null, 0, objects)
        try:
            return _Val(NUMBER, np.asarray(filled, dtype=np.int64), null)
        except OverflowError:
            return _Val(NUMBER, np.asarray(filled, dtype=np.float64), null)
    if inferred in ("floating", "mixed-integer-float", "decimal"):
        floats = np.asarray(np.where(null, np.nan, objects), dtype=np.float64)
        return _Val(NUMBER, floats, null | np.isnan(floats))
    if inferred in ("datetime", "datetime64", "date", "time", "timedelta", "period"):
        text = np.array(
            [_cell_text(v) if not isnull else "" for v, isnull in zip(objects, null, strict=True)]
        )
        return _Val(TEXT, text.astype(object), null)
    return _Val(MIXED, objects, null)


def _normalise(series: pd.Series[Any]) -> _Val:
    """One manifest column as a _Val, whatever its dtype (numpy, nullable, Arrow, object)."""
    dtype = series.dtype
    n = len(series)
    if isinstance(dtype, np.dtype):
        if dtype.kind == "b":
            return _Val(BOOL, series.to_numpy(dtype=bool), np.zeros(n, dtype=bool))
        if dtype.kind in "iu":
            ints = series.to_numpy()
            if dtype.kind == "u" and n and int(ints.max()) >= _INT64_LIMIT:
                return _Val(NUMBER, ints.astype(np.float64), np.zeros(n, dtype=bool))
            return _Val(NUMBER, ints.astype(np.int64), np.zeros(n, dtype=bool))
        if dtype.kind == "f":
            floats = series.to_numpy(dtype=np.float64)
            return _Val(NUMBER, floats, np.isnan(floats))
    null = np.asarray(series.isna().to_numpy(), dtype=bool)
    objects = series.to_numpy(dtype=object, copy=True)
    objects[null] = None
    return _from_objects(objects, null)


# --- nodes --------------------------------------------------------------------------------


class _Env:
    """One evaluation: the batch and its columns, each normalised once."""

    def __init__(self, frame: pd.DataFrame, expression: str) -> None:
        self.frame = frame
        self.n = len(frame)
        self.expression = expression
        self._columns: dict[str, _Val] = {}

    def column(self, name: str) -> _Val:
        found = self._columns.get(name)
        if found is None:
            if name not in self.frame.columns:
                raise _fail(f"the rows have no column {name!r}", _shorten(self.expression))
            series = self.frame[name]
            if not isinstance(series, pd.Series):
                raise _fail(f"the rows have the column {name!r} twice")
            found = self._columns[name] = _normalise(series)
        return found


class _Node:
    """A checked part of an expression. `src` is its text (shortened) for messages."""

    __slots__ = ("src",)

    def __init__(self, src: str) -> None:
        self.src = src

    @property
    def is_condition(self) -> bool:
        return False

    def column_refs(self) -> Iterator[tuple[str, str]]:
        """(column name, text of the reference) for each column used, in order."""
        for child in self.children():
            yield from child.column_refs()

    def children(self) -> Sequence[_Node]:
        return ()

    def check(self, kinds: Mapping[str, str]) -> str:
        """The kind of value this part gives; ConfigError when kinds do not fit."""
        raise NotImplementedError

    def evaluate(self, env: _Env) -> _Val:
        raise NotImplementedError


def _column_of(node: _Node) -> str | None:
    """The column a value comes from, through functions that keep it (for hints)."""
    if isinstance(node, _Column):
        return node.name
    if isinstance(node, _Call) and node.func in ("lower", "upper", "strip", "text", "num"):
        return _column_of(node.args[0])
    return None


class _Column(_Node):
    __slots__ = ("name",)

    def __init__(self, src: str, name: str) -> None:
        super().__init__(src)
        self.name = name

    def column_refs(self) -> Iterator[tuple[str, str]]:
        yield self.name, self.src

    def check(self, kinds: Mapping[str, str]) -> str:
        return kinds.get(self.name, ANY)

    def evaluate(self, env: _Env) -> _Val:
        return env.column(self.name)


class _Literal(_Node):
    __slots__ = ("value",)

    def __init__(self, src: str, value: str | int | float | bool | None) -> None:
        super().__init__(src)
        self.value = value

    @property
    def is_condition(self) -> bool:
        return isinstance(self.value, bool)

    def check(self, kinds: Mapping[str, str]) -> str:
        return _literal_kind(self.value)

    def evaluate(self, env: _Env) -> _Val:
        n, value = env.n, self.value
        no_null = np.zeros(n, dtype=bool)
        if value is None:
            return _null_val(n)
        if isinstance(value, bool):
            return _Val(BOOL, np.full(n, value, dtype=bool), no_null)
        if isinstance(value, int):
            return _Val(NUMBER, np.full(n, value, dtype=np.int64), no_null)
        if isinstance(value, float):
            return _Val(NUMBER, np.full(n, value, dtype=np.float64), no_null)
        return _Val(TEXT, np.full(n, value, dtype=object), no_null)


def _literal_kind(value: object) -> str:
    if value is None:
        return NULL
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int | float):
        return NUMBER
    return TEXT


def _compare_problem(
    left: _Node, lk: str, right: _Node, rk: str, src: str, *, runtime: bool
) -> ConfigError | None:
    """Why values of kinds lk and rk cannot be compared (None when they can)."""
    if ANY in (lk, rk) or NULL in (lk, rk) or lk == rk:
        return None
    for node, kind in ((left, lk), (right, rk)):
        if kind == MIXED:
            column = _column_of(node)
            named = f"column {column!r}" if column else node.src
            hint = f"; use text({_ref(column)}) or num({_ref(column)})" if column else ""
            return _fail(f"{named} holds mixed values (text, numbers...){hint}", src)
    kinds = {lk, rk}
    if kinds == {NUMBER, TEXT}:
        text_side, number_side = (left, right) if lk == TEXT else (right, left)
        column = _column_of(text_side)
        if column is not None:
            ref = _ref(column)
            return _fail(
                f"cannot compare text with a number: column {column!r} is text "
                f"(use num({ref}) to read it as a number, or quote the number)",
                src,
            )
        column = _column_of(number_side)
        if column is not None:
            return _fail(
                f"cannot compare a number with text: column {column!r} holds numbers "
                f"(compare it with an unquoted number, or use text({_ref(column)}))",
                src,
            )
        return _fail("cannot compare text with a number", src)
    if kinds == {BOOL, TEXT}:
        text_side = left if lk == TEXT else right
        if not runtime and isinstance(text_side, _Column):
            return None  # a true/false Parquet column is "text" until its rows are seen
        column = _column_of(text_side)
        if column is not None:
            return _fail(
                f"cannot compare text with true/false: column {column!r} is text "
                f'(compare it with quoted text, e.g. {_ref(column)} == "true")',
                src,
            )
        return _fail("cannot compare text with true/false", src)
    return _fail(f"cannot compare {_KIND_WORDS[lk]} with {_KIND_WORDS[rk]}", src)


class _Compare(_Node):
    __slots__ = ("left", "op", "right")

    def __init__(self, src: str, op: str, left: _Node, right: _Node) -> None:
        super().__init__(src)
        self.op, self.left, self.right = op, left, right

    @property
    def is_condition(self) -> bool:
        return True

    def children(self) -> Sequence[_Node]:
        return (self.left, self.right)

    def check(self, kinds: Mapping[str, str]) -> str:
        lk, rk = self.left.check(kinds), self.right.check(kinds)
        problem = _compare_problem(self.left, lk, self.right, rk, self.src, runtime=False)
        if problem is not None:
            raise problem
        return BOOL

    def evaluate(self, env: _Env) -> _Val:
        a, b = self.left.evaluate(env), self.right.evaluate(env)
        problem = _compare_problem(self.left, a.kind, self.right, b.kind, self.src, runtime=True)
        if problem is not None:
            raise problem
        null = a.null | b.null
        if NULL in (a.kind, b.kind):
            return _bool_val(np.zeros(env.n, dtype=bool), np.ones(env.n, dtype=bool))
        result = np.asarray(_COMPARE_FUNCS[self.op](a.data, b.data), dtype=bool)
        return _bool_val(result, null)


class _In(_Node):
    __slots__ = ("left", "list_kind", "negate", "values")

    def __init__(
        self, src: str, left: _Node, values: tuple[str | int | float | bool, ...], negate: bool
    ) -> None:
        super().__init__(src)
        self.left, self.values, self.negate = left, values, negate
        kinds = {_literal_kind(v) for v in values}
        self.list_kind = kinds.pop() if len(kinds) == 1 else ANY

    @property
    def is_condition(self) -> bool:
        return True

    def children(self) -> Sequence[_Node]:
        return (self.left,)

    def _problem(self, kind: str, *, runtime: bool) -> ConfigError | None:
        items = _Literal(self.src, None)  # stands for the list in messages
        return _compare_problem(self.left, kind, items, self.list_kind, self.src, runtime=runtime)

    def check(self, kinds: Mapping[str, str]) -> str:
        problem = self._problem(self.left.check(kinds), runtime=False)
        if problem is not None:
            raise problem
        return BOOL

    def evaluate(self, env: _Env) -> _Val:
        a = self.left.evaluate(env)
        if a.kind == NULL:
            return _bool_val(np.zeros(env.n, dtype=bool), np.ones(env.n, dtype=bool))
        problem = self._problem(a.kind, runtime=True)
        if problem is not None:
            raise problem
        if not self.values:
            found = np.zeros(env.n, dtype=bool)
        elif a.kind == TEXT:
            found = pd.Series(a.data, dtype=object).isin(list(self.values)).to_numpy(dtype=bool)
        else:
            found = np.isin(a.data, np.array(self.values))
        return _bool_val(~found if self.negate else found, a.null.copy())


class _Logic(_Node):
    """`and` / `or` over conditions, with Kleene (SQL) three-valued logic."""

    __slots__ = ("is_and", "parts")

    def __init__(self, src: str, is_and: bool, parts: tuple[_Node, ...]) -> None:
        super().__init__(src)
        self.is_and, self.parts = is_and, parts

    @property
    def is_condition(self) -> bool:
        return True

    def children(self) -> Sequence[_Node]:
        return self.parts

    def check(self, kinds: Mapping[str, str]) -> str:
        for part in self.parts:
            part.check(kinds)
        return BOOL

    def evaluate(self, env: _Env) -> _Val:
        true = np.full(env.n, self.is_and, dtype=bool)
        false = np.full(env.n, not self.is_and, dtype=bool)
        for part in self.parts:
            value = part.evaluate(env)
            known = ~value.null
            is_true = value.data.astype(bool) & known
            is_false = ~value.data.astype(bool) & known
            if self.is_and:
                true &= is_true
                false |= is_false
            else:
                true |= is_true
                false &= is_false
        return _bool_val(true, ~(true | false))


class _Not(_Node):
    __slots__ = ("operand",)

    def __init__(self, src: str, operand: _Node) -> None:
        super().__init__(src)
        self.operand = operand

    @property
    def is_condition(self) -> bool:
        return True

    def children(self) -> Sequence[_Node]:
        return (self.operand,)

    def check(self, kinds: Mapping[str, str]) -> str:
        self.operand.check(kinds)
        return BOOL

    def evaluate(self, env: _Env) -> _Val:
        value = self.operand.evaluate(env)
        return _bool_val(~value.data.astype(bool), value.null.copy())


def _number_problem(node: _Node, kind: str, what: str) -> ConfigError | None:
    if kind in (NUMBER, ANY, NULL):
        return None
    column = _column_of(node)
    hint = ""
    if column is not None and kind in (TEXT, MIXED):
        hint = f" (use num({_ref(column)}) to read it as a number)"
    named = f"column {column!r}" if isinstance(node, _Column) else node.src
    return _fail(f"{what} needs numbers, but {named} is {_KIND_WORDS[kind]}{hint}", node.src)


def _max_abs(values: AnyArray, null: BoolArray) -> int:
    known = values[~null]
    if known.size == 0:
        return 0
    return max(abs(int(known.min())), abs(int(known.max())))


class _Arith(_Node):
    __slots__ = ("left", "op", "right")

    def __init__(self, src: str, op: str, left: _Node, right: _Node) -> None:
        super().__init__(src)
        self.op, self.left, self.right = op, left, right

    def children(self) -> Sequence[_Node]:
        return (self.left, self.right)

    def check(self, kinds: Mapping[str, str]) -> str:
        for node in (self.left, self.right):
            problem = _number_problem(node, node.check(kinds), f"arithmetic ({self.op})")
            if problem is not None:
                raise problem
        return NUMBER

    def evaluate(self, env: _Env) -> _Val:
        a, b = self.left.evaluate(env), self.right.evaluate(env)
        for node, value in ((self.left, a), (self.right, b)):
            problem = _number_problem(node, value.kind, f"arithmetic ({self.op})")
            if problem is not None:
                raise problem
        null = a.null | b.null
        if NULL in (a.kind, b.kind):
            return _Val(NUMBER, np.zeros(env.n, dtype=np.float64), np.ones(env.n, dtype=bool))
        x, y = a.data, b.data
        if x.dtype.kind == "i" and y.dtype.kind == "i" and self.op != "/":
            ax, ay = _max_abs(x, a.null), _max_abs(y, b.null)
            if self.op in ("+", "-"):
                exact = ax + ay < _INT64_LIMIT
            elif self.op == "*":
                exact = ax * ay < _INT64_LIMIT
            else:  # // and %: no zero divisor (IEEE gives inf/NaN then) and no INT64_MIN // -1
                y = np.where(b.null, 1, y)
                exact = ax < _INT64_LIMIT and not bool(np.any(y == 0))
            if exact:
                return _Val(NUMBER, np.asarray(_ARITH_FUNCS[self.op](x, y)), null)
        result = _ARITH_FUNCS[self.op](x.astype(np.float64), y.astype(np.float64))
        return _Val(NUMBER, np.asarray(result, dtype=np.float64), null)


class _Sign(_Node):
    """Unary minus (negate) or plus."""

    __slots__ = ("negate", "operand")

    def __init__(self, src: str, operand: _Node, negate: bool) -> None:
        super().__init__(src)
        self.operand, self.negate = operand, negate

    def children(self) -> Sequence[_Node]:
        return (self.operand,)

    def check(self, kinds: Mapping[str, str]) -> str:
        problem = _number_problem(self.operand, self.operand.check(kinds), "a sign (-, +)")
        if problem is not None:
            raise problem
        return NUMBER

    def evaluate(self, env: _Env) -> _Val:
        value = self.operand.evaluate(env)
        problem = _number_problem(self.operand, value.kind, "a sign (-, +)")
        if problem is not None:
            raise problem
        if value.kind == NULL:
            return _Val(NUMBER, np.zeros(env.n, dtype=np.float64), np.ones(env.n, dtype=bool))
        data = value.data
        if not self.negate:
            return value
        if data.dtype.kind == "i" and _max_abs(data, value.null) >= _INT64_LIMIT:
            data = data.astype(np.float64)
        return _Val(NUMBER, np.negative(data), value.null.copy())


class _Call(_Node):
    __slots__ = ("args", "func", "pattern")

    def __init__(self, src: str, func: str, args: tuple[_Node, ...], pattern: str | None) -> None:
        super().__init__(src)
        self.func, self.args, self.pattern = func, args, pattern

    @property
    def is_condition(self) -> bool:
        return self.func in _PREDICATES or self.func in _NULL_TESTS

    def children(self) -> Sequence[_Node]:
        return self.args

    def _result_kind(self) -> str:
        if self.is_condition:
            return BOOL
        if self.func in ("length", "num"):
            return NUMBER
        return TEXT

    def _problem(self, kind: str) -> ConfigError | None:
        if self.func not in _TEXT_ARGUMENT or kind in (TEXT, ANY, NULL):
            return None
        arg = self.args[0]
        column = _column_of(arg)
        named = f"column {column!r}" if isinstance(arg, _Column) else arg.src
        hint = ""
        if column is not None and kind != MIXED:
            hint = f" (use {self.func}(text({_ref(column)})...) to use it as text)"
        elif column is not None:
            hint = f" (use text({_ref(column)}) to make it text)"
        return _fail(
            f"{self.func}() needs text, but {named} is {_KIND_WORDS[kind]}{hint}", self.src
        )

    def check(self, kinds: Mapping[str, str]) -> str:
        problem = self._problem(self.args[0].check(kinds))
        if problem is not None:
            raise problem
        return self._result_kind()

    def evaluate(self, env: _Env) -> _Val:
        value = self.args[0].evaluate(env)
        problem = self._problem(value.kind)
        if problem is not None:
            raise problem
        func, n = self.func, env.n
        if func in _NULL_TESTS:
            nulls = value.null.copy()
            return _bool_val(nulls if func == "isnull" else ~nulls, np.zeros(n, dtype=bool))
        if value.kind == NULL:
            kind = self._result_kind()
            if kind == BOOL:
                return _bool_val(np.zeros(n, dtype=bool), np.ones(n, dtype=bool))
            return _Val(kind, np.zeros(n, dtype=object), np.ones(n, dtype=bool))
        if func == "num":
            return _to_number(value)
        if func == "text":
            return _to_text(value)
        strings = pd.Series(value.data, dtype=object).str
        if func in _PREDICATES:
            pattern = self.pattern or ""
            if func == "contains":
                found = strings.contains(pattern, regex=False)
            elif func == "startswith":
                found = strings.startswith(pattern)
            else:
                found = strings.endswith(pattern)
            return _bool_val(found.to_numpy(dtype=bool), value.null.copy())
        if func == "length":
            return _Val(NUMBER, strings.len().to_numpy(dtype=np.int64), value.null.copy())
        if func == "lower":
            changed = strings.lower()
        elif func == "upper":
            changed = strings.upper()
        else:
            changed = strings.strip()
        return _Val(TEXT, changed.to_numpy(dtype=object), value.null.copy())


def _to_number(value: _Val) -> _Val:
    if value.kind == NUMBER:
        return value
    if value.kind == BOOL:
        return _Val(NUMBER, value.data.astype(np.int64), value.null.copy())
    if value.kind != TEXT:  # mixed values: one by one
        floats = np.array([_cell_number(v) for v in value.data.tolist()], dtype=np.float64)
        return _Val(NUMBER, floats, value.null | np.isnan(floats))
    numbers = pd.to_numeric(pd.Series(value.data, dtype=object).str.strip(), errors="coerce")
    if numbers.dtype.kind == "i":
        return _Val(NUMBER, numbers.to_numpy(dtype=np.int64), value.null.copy())
    floats = np.asarray(numbers.to_numpy(dtype=np.float64, na_value=np.nan), dtype=np.float64)
    return _Val(NUMBER, floats, value.null | np.isnan(floats))


def _cell_number(value: object) -> float:
    if isinstance(value, bool | np.bool_ | int | float | np.integer | np.floating):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return float("nan")
    return float("nan")


def _to_text(value: _Val) -> _Val:
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
    return _Val(TEXT, text, null)


# --- parsing ------------------------------------------------------------------------------


# Blanks outside string literals, replaced by spaces before parsing.
_BLANKS: Final = "\t\n\r\f\v"


def _placeholder_prefix(text: str) -> str:
    """A prefix of identifiers for backtick names that appears nowhere in `text`."""
    k = 0
    while f"_w{k}q" in text:
        k += 1
    return f"_w{k}q"


def _string_end(text: str, start: int) -> int:
    """The index just after the string literal opening at `start` (or the end of the text)."""
    quote = text[start]
    delim = quote * 3 if text.startswith(quote * 3, start) else quote
    i = start + len(delim)
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if text.startswith(delim, i):
            return i + len(delim)
        if len(delim) == 1 and ch in "\r\n":
            return i  # unterminated: the parser reports it
        i += 1
    return len(text)


@dataclass
class _Source:
    """The text given to the parser, and how its positions map back to the user's text."""

    text: str  # what the user wrote
    python: str  # with backtick names replaced by placeholders
    origin: list[int]  # index in `text` of each index of `python` (and of its end)
    names: dict[str, str]  # placeholder -> column name

    @classmethod
    def scan(cls, text: str) -> _Source:
        prefix = _placeholder_prefix(text)
        out: list[str] = []
        origin: list[int] = []
        names: dict[str, str] = {}
        placeholders: dict[str, str] = {}
        depth = 0
        i = 0
        while i < len(text):
            ch = text[i]
            if ch in "'\"":
                end = _string_end(text, i)
            elif ch == "#" or ch in _BLANKS:
                # A comment or a line break: blanked, so the expression may span lines.
                newline = text.find("\n", i) if ch == "#" else -1
                end = i + 1 if ch != "#" else len(text) if newline < 0 else newline
                out.append(" " * (end - i))
                origin.extend(range(i, end))
                i = end
                continue
            elif ch == "`":
                close = text.find("`", i + 1)
                if close < 0:
                    raise _fail(f"unclosed backtick at character {i + 1}", _shorten(text))
                name = text[i + 1 : close]
                if not name:
                    raise _fail(f"empty column name in backticks at character {i + 1}")
                placeholder = placeholders.get(name)
                if placeholder is None:
                    placeholder = placeholders[name] = f"{prefix}{len(names)}"
                    names[placeholder] = name
                # Spaces keep the placeholder a token of its own.
                out.append(f" {placeholder} ")
                origin.extend([i] * (len(placeholder) + 1))
                origin.append(close + 1)
                i = close + 1
                continue
            else:
                if ch in "([{":
                    depth += 1
                    if depth > MAX_WHERE_DEPTH:
                        raise _fail(f"too deep (more than {MAX_WHERE_DEPTH} nested brackets)")
                elif ch in ")]}":
                    depth = max(0, depth - 1)
                end = i + 1
            out.append(text[i:end])
            origin.extend(range(i, end))
            i = end
        origin.append(len(text))
        python = "".join(out)
        lead = len(python) - len(python.lstrip(" "))  # the parser refuses an indent
        return cls(text, python[lead:], origin[lead:], names)

    def line_starts(self) -> list[int]:
        """Index in `python` of each line's start, lines split as the parser splits them."""
        starts = [0]
        i = 0
        source = self.python
        while i < len(source):
            if source[i] == "\r" and source.startswith("\r\n", i):
                i += 2
                starts.append(i)
                continue
            if source[i] in "\r\n":
                starts.append(i + 1)
            i += 1
        return starts

    def index(self, lineno: int, col_bytes: int, starts: list[int]) -> int:
        """Index in `python` of a parser position (1-based line, UTF-8 byte column)."""
        if lineno < 1 or lineno > len(starts):
            return len(self.python)
        start = starts[lineno - 1]
        end = starts[lineno] if lineno < len(starts) else len(self.python)
        line = self.python[start:end]
        chars = len(line.encode("utf-8")[:col_bytes].decode("utf-8", errors="ignore"))
        return min(start + chars, len(self.python))


class _Parser:
    def __init__(self, source: _Source) -> None:
        self.source = source
        self.starts = source.line_starts()

    def raw(self, node: ast.AST) -> str:
        """The user's own text of a node (backtick names as written)."""
        lineno = getattr(node, "lineno", None)
        end_lineno = getattr(node, "end_lineno", None)
        col = getattr(node, "col_offset", None)
        end_col = getattr(node, "end_col_offset", None)
        if lineno is None or end_lineno is None or col is None or end_col is None:
            return self.source.text
        start = self.source.index(lineno, col, self.starts)
        end = self.source.index(end_lineno, end_col, self.starts)
        text = self.source.text[self.source.origin[start] : self.source.origin[end]]
        return text or self.source.text

    def seg(self, node: ast.AST) -> str:
        return _shorten(self.raw(node))

    # -- pass 1: size and depth, without recursion ---------------------------------------

    def measure(self, tree: ast.Expression) -> None:
        stack: list[tuple[ast.AST, int, bool]] = [(tree.body, 1, False)]
        count = 0
        while stack:
            node, depth, in_list = stack.pop()
            if depth > MAX_WHERE_DEPTH:
                raise _fail(f"too deep (more than {MAX_WHERE_DEPTH} levels of nesting)")
            if isinstance(node, ast.expr) and not (in_list and isinstance(node, ast.Constant)):
                count += 1
                if count > MAX_WHERE_NODES:
                    raise _fail(f"too many parts (more than {MAX_WHERE_NODES})")
            is_list = isinstance(node, ast.List | ast.Tuple | ast.Set)
            if is_list and len(getattr(node, "elts", ())) > MAX_LIST_ITEMS:
                raise _fail(f"a list has more than {MAX_LIST_ITEMS} items")
            for child in ast.iter_child_nodes(node):
                step = 1 if isinstance(child, ast.expr) else 0
                stack.append((child, depth + step, is_list))

    # -- pass 2: refuse what is not allowed (pre-order: the outermost offence first) -----

    def refuse(self, node: ast.AST) -> None:
        problem = self._refusal(node)
        if problem is not None:
            raise problem
        for child in ast.iter_child_nodes(node):
            self.refuse(child)

    def _refusal(self, node: ast.AST) -> ConfigError | None:
        if isinstance(node, ast.Attribute | ast.Subscript):
            return self._chain_refusal(node)
        reason = _REFUSED.get(type(node))
        if reason is not None:
            return _fail(reason, self.seg(node))
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                return _fail("the power operator ** is not allowed", self.seg(node))
            bitwise = _BITWISE.get(type(node.op))
            if bitwise is not None:
                return _fail(
                    f"the bitwise operator {bitwise} is not allowed",
                    self.seg(node),
                    "use and / or / not",
                )
            if type(node.op) not in _ARITH_OPS:
                return _fail("this operator is not allowed", self.seg(node))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
            return _fail("the bitwise operator ~ is not allowed", self.seg(node), "use not")
        elif isinstance(node, ast.Compare):
            for op in node.ops:
                if isinstance(op, ast.Is | ast.IsNot):
                    return _fail(
                        "'is' / 'is not' are not allowed",
                        self.seg(node),
                        "use isnull(x) or notnull(x), or == and !=",
                    )
        elif isinstance(node, ast.Name):
            if "__" in node.id:
                return _fail("names containing __ are not allowed", self.seg(node))
        elif isinstance(node, ast.Call):
            return self._call_refusal(node)
        elif isinstance(node, ast.Constant):
            return self._constant_refusal(node)
        elif isinstance(node, ast.expr) and not isinstance(node, _ALLOWED_NODES):
            return _fail("this kind of expression is not allowed", self.seg(node))
        return None

    def _chain_refusal(self, node: ast.Attribute | ast.Subscript) -> ConfigError:
        """Refuse a.b[c].d(...) naming its innermost access (seed.__class__)."""
        target: ast.Attribute | ast.Subscript = node
        while True:
            inner: ast.expr = target.value
            if isinstance(inner, ast.Call):
                inner = inner.func
            if not isinstance(inner, ast.Attribute | ast.Subscript):
                break
            target = inner
        if isinstance(target, ast.Attribute):
            return _fail(
                "attribute access is not allowed",
                self.seg(target),
                'use the functions instead, e.g. isnull(col) or startswith(col, "x"); '
                "a column whose name has a dot goes in backticks",
            )
        return _fail(_REFUSED[ast.Subscript], self.seg(target))

    def _call_refusal(self, node: ast.Call) -> ConfigError | None:
        if node.keywords:
            return _fail("keyword arguments are not allowed", self.seg(node))
        func = node.func
        if isinstance(func, ast.Name):
            if "__" in func.id:
                return _fail(
                    f"{_shorten(func.id)}() is not a supported function (names containing __ "
                    "are not allowed)",
                    self.seg(node),
                )
            if func.id not in FUNCTIONS:
                close = difflib.get_close_matches(func.id, list(FUNCTIONS), n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                return _fail(
                    f"{_shorten(func.id)}() is not a supported function (not allowed)",
                    self.seg(node),
                    f"{hint}the functions are: {_ALLOWED_FUNCTIONS}",
                )
            return None
        if isinstance(func, ast.Attribute | ast.Subscript) or type(func) in _REFUSED:
            return None  # refused when its own node is visited, by name
        return _fail(
            f"only the functions can be called ({_ALLOWED_FUNCTIONS}); this call is not allowed",
            self.seg(node),
        )

    def _constant_refusal(self, node: ast.Constant) -> ConfigError | None:
        value = node.value
        if isinstance(value, bool) or value is None or isinstance(value, str | float):
            return None
        if isinstance(value, int):
            if abs(value) >= MAX_INT_LITERAL:
                return _fail("numbers of 19 digits or more are not allowed", self.seg(node))
            return None
        if isinstance(value, bytes):
            return _fail("bytes literals are not allowed", self.seg(node))
        if isinstance(value, complex):
            return _fail("complex numbers are not allowed", self.seg(node))
        return _fail("this literal is not allowed", self.seg(node))

    # -- pass 3: build this module's nodes -----------------------------------------------

    def condition(self, node: ast.expr, role: str) -> _Node:
        built = self.build(node)
        if not built.is_condition:
            raise _fail(
                f"{role} must be a condition (true or false for each row)",
                built.src,
                "e.g. seed > 10 or isnull(mask); for a true/false column write col == True",
            )
        return built

    def build(self, node: ast.expr) -> _Node:
        src = self.seg(node)
        if isinstance(node, ast.Constant):
            value = node.value
            assert isinstance(value, str | int | float | bool) or value is None
            return _Literal(src, value)
        if isinstance(node, ast.Name):
            name = self.source.names.get(node.id)
            return _Column(src, name if name is not None else self.raw(node))
        if isinstance(node, ast.List | ast.Tuple):
            raise _fail('a list is only allowed after in / not in (e.g. id in ["a", "b"])', src)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return _Not(src, self.condition(node.operand, "the operand of not"))
            literal = self._signed_number(node)
            if literal is not None:
                return _Literal(src, literal)
            return _Sign(src, self.build(node.operand), isinstance(node.op, ast.USub))
        if isinstance(node, ast.BinOp):
            op = _ARITH_OPS[type(node.op)]
            return _Arith(src, op, self.build(node.left), self.build(node.right))
        if isinstance(node, ast.BoolOp):
            word = "and" if isinstance(node.op, ast.And) else "or"
            parts = tuple(self.condition(v, f"each side of {word}") for v in node.values)
            return _Logic(src, word == "and", parts)
        if isinstance(node, ast.Compare):
            return self._compare(node, src)
        if isinstance(node, ast.Call):
            return self._call(node, src)
        raise _fail("this kind of expression is not allowed", src)  # pragma: no cover

    def _signed_number(self, node: ast.UnaryOp) -> int | float | None:
        operand = node.operand
        if not isinstance(node.op, ast.USub | ast.UAdd) or not isinstance(operand, ast.Constant):
            return None
        value = operand.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return -value if isinstance(node.op, ast.USub) else value

    def _compare(self, node: ast.Compare, src: str) -> _Node:
        operands = [node.left, *node.comparators]
        built: dict[int, _Node] = {}

        def operand(i: int) -> _Node:
            if i not in built:
                built[i] = self.build(operands[i])
            return built[i]

        pairs: list[_Node] = []
        for i, op in enumerate(node.ops):
            left, right = operands[i], operands[i + 1]
            symbol = _COMPARE_OPS.get(type(op)) or ("in" if isinstance(op, ast.In) else "not in")
            pair_src = src
            if len(node.ops) > 1:
                pair_src = _shorten(f"{self.raw(left)} {symbol} {self.raw(right)}")
            if isinstance(op, ast.In | ast.NotIn):
                values = self._literal_list(right)
                pairs.append(_In(pair_src, operand(i), values, isinstance(op, ast.NotIn)))
                continue
            for side in (left, right):
                if isinstance(side, ast.Constant) and side.value is None:
                    raise _fail(
                        "comparing with None is never true (use isnull(x) or notnull(x))", src
                    )
            pairs.append(_Compare(pair_src, _COMPARE_OPS[type(op)], operand(i), operand(i + 1)))
        return pairs[0] if len(pairs) == 1 else _Logic(src, True, tuple(pairs))

    def _literal_list(self, node: ast.expr) -> tuple[str | int | float | bool, ...]:
        usage = 'the right side of in / not in must be a list of literals, e.g. id in ["a", "b"]'
        if not isinstance(node, ast.List | ast.Tuple):
            raise _fail(f'{usage} (to search text use contains(col, "x"))', self.seg(node))
        values: list[str | int | float | bool] = []
        for item in node.elts:
            value: object = None
            if isinstance(item, ast.Constant):
                value = item.value
            elif isinstance(item, ast.UnaryOp):
                value = self._signed_number(item)
            if value is None and isinstance(item, ast.Constant):
                raise _fail("None in a list never matches (use isnull(x))", self.seg(item))
            if not isinstance(value, str | int | float | bool):
                raise _fail(usage, self.seg(item))
            values.append(value)
        kinds = {_literal_kind(v) for v in values}
        if len(kinds) > 1:
            raise _fail("a list mixes kinds of values (text, numbers, true/false)", self.seg(node))
        return tuple(values)

    def _call(self, node: ast.Call, src: str) -> _Node:
        assert isinstance(node.func, ast.Name)
        func = node.func.id
        wanted = 2 if func in _PREDICATES else 1
        if len(node.args) != wanted:
            raise _fail(
                f"{func}() takes {wanted} argument{'s' if wanted > 1 else ''}: "
                f"{FUNCTIONS[func].split(':')[0]}",
                src,
            )
        if func == "col":
            arg = node.args[0]
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)) or not arg.value:
                raise _fail('col() takes a quoted column name, e.g. col("param.turbo")', src)
            return _Column(src, arg.value)
        pattern: str | None = None
        if func in _PREDICATES:
            second = node.args[1]
            if not (isinstance(second, ast.Constant) and isinstance(second.value, str)):
                raise _fail(
                    f'the second argument of {func}() must be quoted text, e.g. {func}(col, "x")',
                    src,
                )
            pattern = second.value
        return _Call(src, func, (self.build(node.args[0]),), pattern)


# --- public API ---------------------------------------------------------------------------


class Where:
    """A checked `where` expression: `mask(frame)` answers one bool per row."""

    __slots__ = ("_root", "columns", "text")

    text: str
    columns: frozenset[str]

    def __init__(self, text: str, root: _Node) -> None:
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
        env = _Env(frame, self.text)
        try:
            with np.errstate(all="ignore"):
                value = self._root.evaluate(env)
        except ConfigError:
            raise
        except Exception as exc:  # a bug or an odd cell type: one clear message, no traceback
            raise _fail(
                f"cannot be evaluated on these rows ({type(exc).__name__})", _shorten(self.text)
            ) from exc
        return np.asarray(value.data.astype(bool) & ~value.null, dtype=bool)

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
    source = _Source.scan(text)
    try:
        with warnings.catch_warnings():
            # "\d" in a literal warns (DeprecationWarning, SyntaxWarning in 3.12): it stays "\d".
            warnings.simplefilter("ignore")
            tree = ast.parse(source.python, mode="eval")
    except SyntaxError as exc:
        starts = source.line_starts()
        line, offset = exc.lineno or 1, exc.offset or 0
        where = len(source.python)  # the parser gives offset 0 for "at the end"
        if 1 <= line <= len(starts) and offset > 0:
            where = min(starts[line - 1] + offset - 1, where)
        at = source.origin[where] + 1
        position = f"at character {at}" if at <= len(text) else "at the end"
        message = exc.msg or "invalid syntax"
        if "null bytes" in message:
            message = "it contains a NUL character"
        raise ConfigError(
            f"where expression is not valid: {message} ({position}): {_shorten(text)}"
        ) from None
    except (RecursionError, MemoryError):
        raise _fail("too deep or too large to read") from None
    except ValueError:
        raise ConfigError("where expression is not valid: it contains a NUL character") from None
    parser = _Parser(source)
    parser.measure(tree)
    parser.refuse(tree.body)
    root = parser.condition(tree.body, "the where expression")
    root.check({})
    return Where(text, root)


def _unknown_column(name: str, columns: Sequence[str]) -> ConfigError:
    lowered = {c.lower(): c for c in columns}
    close = difflib.get_close_matches(name, list(columns), n=1)
    hint = lowered.get(name.lower()) or (close[0] if close else None)
    did_you_mean = f" (did you mean {hint!r}?)" if hint else ""
    shown = ", ".join(_shorten(c) for c in columns[:MAX_SHOWN_COLUMNS])
    if len(columns) > MAX_SHOWN_COLUMNS:
        shown += f" and {len(columns) - MAX_SHOWN_COLUMNS} more"
    return _fail(
        f"unknown column {_shorten(name)!r}{did_you_mean}; the manifest's columns are: "
        f"{shown or '(none)'}"
    )


def compile_where(text: str, columns: Sequence[str], numeric: Iterable[str] = ()) -> Where:
    """`parse_where`, then check every column exists and the kinds fit (`numeric` columns are
    numbers, the others text until the rows say otherwise); ConfigError if not."""
    where = parse_where(text)
    known = list(columns)
    present = set(known)
    for name, _ in where._root.column_refs():
        if name not in present:
            raise _unknown_column(name, known)
    numbers = set(numeric)
    where._root.check({c: NUMBER if c in numbers else TEXT for c in known})
    return where
