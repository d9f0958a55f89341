"""The vectorised evaluator of a checked `where` expression: one pass of array operations per
part over a whole batch of rows, nulls carried beside the values (SQL's three-valued logic)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from typing import Any, Final

import numpy as np
import pandas as pd

from pipeline.manifest.where.kinds import (
    call_kind,
    call_problem,
    compare_problem,
    in_problem,
    number_problem,
)
from pipeline.manifest.where.language import (
    BOOL,
    NULL,
    NULL_TESTS,
    NUMBER,
    PREDICATES,
    TEXT,
    raise_if,
)
from pipeline.manifest.where.nodes import (
    Arith,
    Call,
    Column,
    Compare,
    In,
    Literal,
    Logic,
    Node,
    Not,
    Sign,
)
from pipeline.manifest.where.values import (
    INT64_LIMIT,
    AnyArray,
    BoolArray,
    Env,
    Val,
    bool_val,
    null_val,
    to_number,
    to_text,
    unknown,
)

_COMPARE_FUNCS: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_ARITH_FUNCS: Final[Mapping[str, Callable[[Any, Any], Any]]] = {
    "+": np.add,
    "-": np.subtract,
    "*": np.multiply,
    "/": np.true_divide,
    "//": np.floor_divide,
    "%": np.remainder,
}


def evaluate(node: Node, env: Env) -> Val:
    """The values of `node` over the batch of `env`; ConfigError when a value does not fit."""
    match node:
        case Column():
            return env.column(node.name)
        case Literal():
            return _literal(node, env.n)
        case Compare():
            return _compare(node, env)
        case In():
            return _in(node, env)
        case Logic():
            return _logic(node, env)
        case Not():
            value = evaluate(node.operand, env)
            return bool_val(~value.data.astype(bool), value.null.copy())
        case Arith():
            return _arith(node, env)
        case Sign():
            return _sign(node, env)
        case Call():
            return _call(node, env)
    raise TypeError(f"not a where node: {node!r}")  # pragma: no cover


def _literal(node: Literal, n: int) -> Val:
    value = node.value
    no_null = np.zeros(n, dtype=bool)
    if value is None:
        return null_val(n)
    if isinstance(value, bool):
        return Val(BOOL, np.full(n, value, dtype=bool), no_null)
    if isinstance(value, int):
        return Val(NUMBER, np.full(n, value, dtype=np.int64), no_null)
    if isinstance(value, float):
        return Val(NUMBER, np.full(n, value, dtype=np.float64), no_null)
    return Val(TEXT, np.full(n, value, dtype=object), no_null)


def _compare(node: Compare, env: Env) -> Val:
    a, b = evaluate(node.left, env), evaluate(node.right, env)
    raise_if(compare_problem(node.left, a.kind, node.right, b.kind, node.src, runtime=True))
    if NULL in (a.kind, b.kind):
        return unknown(BOOL, env.n)
    result = np.asarray(_COMPARE_FUNCS[node.op](a.data, b.data), dtype=bool)
    return bool_val(result, a.null | b.null)


def _in(node: In, env: Env) -> Val:
    a = evaluate(node.left, env)
    if a.kind == NULL:
        return unknown(BOOL, env.n)
    raise_if(in_problem(node, a.kind, runtime=True))
    if not node.values:
        found = np.zeros(env.n, dtype=bool)
    elif a.kind == TEXT:
        found = pd.Series(a.data, dtype=object).isin(list(node.values)).to_numpy(dtype=bool)
    else:
        found = np.isin(a.data, np.array(node.values))
    return bool_val(~found if node.negate else found, a.null.copy())


def _logic(node: Logic, env: Env) -> Val:
    true = np.full(env.n, node.is_and, dtype=bool)
    false = np.full(env.n, not node.is_and, dtype=bool)
    for part in node.parts:
        value = evaluate(part, env)
        known = ~value.null
        is_true = value.data.astype(bool) & known
        is_false = ~value.data.astype(bool) & known
        if node.is_and:
            true &= is_true
            false |= is_false
        else:
            true |= is_true
            false &= is_false
    return bool_val(true, ~(true | false))


def _max_abs(values: AnyArray, null: BoolArray) -> int:
    known = values[~null]
    if known.size == 0:
        return 0
    return max(abs(int(known.min())), abs(int(known.max())))


def _arith(node: Arith, env: Env) -> Val:
    a, b = evaluate(node.left, env), evaluate(node.right, env)
    for side, value in ((node.left, a), (node.right, b)):
        raise_if(number_problem(side, value.kind, f"arithmetic ({node.op})"))
    null = a.null | b.null
    if NULL in (a.kind, b.kind):
        return unknown(NUMBER, env.n)
    x, y = a.data, b.data
    if x.dtype.kind == "i" and y.dtype.kind == "i" and node.op != "/":
        ax, ay = _max_abs(x, a.null), _max_abs(y, b.null)
        if node.op in ("+", "-"):
            exact = ax + ay < INT64_LIMIT
        elif node.op == "*":
            exact = ax * ay < INT64_LIMIT
        else:  # // and %: no zero divisor (IEEE gives inf/NaN then) and no INT64_MIN // -1
            y = np.where(b.null, 1, y)
            exact = ax < INT64_LIMIT and not bool(np.any(y == 0))
        if exact:
            return Val(NUMBER, np.asarray(_ARITH_FUNCS[node.op](x, y)), null)
    result = _ARITH_FUNCS[node.op](x.astype(np.float64), y.astype(np.float64))
    return Val(NUMBER, np.asarray(result, dtype=np.float64), null)


def _sign(node: Sign, env: Env) -> Val:
    value = evaluate(node.operand, env)
    raise_if(number_problem(node.operand, value.kind, "a sign (-, +)"))
    if value.kind == NULL:
        return unknown(NUMBER, env.n)
    data = value.data
    if not node.negate:
        return value
    if data.dtype.kind == "i" and _max_abs(data, value.null) >= INT64_LIMIT:
        data = data.astype(np.float64)
    return Val(NUMBER, np.negative(data), value.null.copy())


def _call(node: Call, env: Env) -> Val:
    value = evaluate(node.args[0], env)
    raise_if(call_problem(node, value.kind))
    func, n = node.func, env.n
    if func in NULL_TESTS:
        nulls = value.null.copy()
        return bool_val(nulls if func == "isnull" else ~nulls, np.zeros(n, dtype=bool))
    if value.kind == NULL:
        return unknown(call_kind(node), n)
    if func == "num":
        return to_number(value)
    if func == "text":
        return to_text(value)
    strings = pd.Series(value.data, dtype=object).str
    if func in PREDICATES:
        pattern = node.pattern or ""
        if func == "contains":
            found = strings.contains(pattern, regex=False)
        elif func == "startswith":
            found = strings.startswith(pattern)
        else:
            found = strings.endswith(pattern)
        return bool_val(found.to_numpy(dtype=bool), value.null.copy())
    if func == "length":
        return Val(NUMBER, strings.len().to_numpy(dtype=np.int64), value.null.copy())
    if func == "lower":
        changed = strings.lower()
    elif func == "upper":
        changed = strings.upper()
    else:
        changed = strings.strip()
    return Val(TEXT, changed.to_numpy(dtype=object), value.null.copy())
