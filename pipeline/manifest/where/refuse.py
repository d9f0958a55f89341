"""What a `where` expression may hold of Python's syntax: the allow-list, and the refusal of
everything else by name (before anything is built from it), and the caps on its size."""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable, Mapping
from typing import Final

from pipeline.errors import ConfigError
from pipeline.manifest.where.language import (
    ALLOWED_FUNCTIONS,
    FUNCTIONS,
    MAX_INT_LITERAL,
    MAX_LIST_ITEMS,
    MAX_WHERE_DEPTH,
    MAX_WHERE_NODES,
    fail,
    shorten,
)

Seg = Callable[[ast.AST], str]
"""The user's text of a node, shortened for a message."""

COMPARE_OPS: Final[Mapping[type[ast.cmpop], str]] = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
ARITH_OPS: Final[Mapping[type[ast.operator], str]] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
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


def measure(tree: ast.Expression) -> None:
    """Pass 1: ConfigError when the tree is too deep, too large or has too long a list
    (without recursion)."""
    stack: list[tuple[ast.AST, int, bool]] = [(tree.body, 1, False)]
    count = 0
    while stack:
        node, depth, in_list = stack.pop()
        if depth > MAX_WHERE_DEPTH:
            raise fail(f"too deep (more than {MAX_WHERE_DEPTH} levels of nesting)")
        if isinstance(node, ast.expr) and not (in_list and isinstance(node, ast.Constant)):
            count += 1
            if count > MAX_WHERE_NODES:
                raise fail(f"too many parts (more than {MAX_WHERE_NODES})")
        is_list = isinstance(node, ast.List | ast.Tuple | ast.Set)
        if is_list and len(getattr(node, "elts", ())) > MAX_LIST_ITEMS:
            raise fail(f"a list has more than {MAX_LIST_ITEMS} items")
        for child in ast.iter_child_nodes(node):
            step = 1 if isinstance(child, ast.expr) else 0
            stack.append((child, depth + step, is_list))


def refuse(node: ast.AST, seg: Seg) -> None:
    """ConfigError naming the first construct of `node` the language does not allow."""
    problem = _refusal(node, seg)
    if problem is not None:
        raise problem
    for child in ast.iter_child_nodes(node):
        refuse(child, seg)


def _refusal(node: ast.AST, seg: Seg) -> ConfigError | None:
    if isinstance(node, ast.Attribute | ast.Subscript):
        return _chain_refusal(node, seg)
    reason = _REFUSED.get(type(node))
    if reason is not None:
        return fail(reason, seg(node))
    if isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow):
            return fail("the power operator ** is not allowed", seg(node))
        bitwise = _BITWISE.get(type(node.op))
        if bitwise is not None:
            return fail(
                f"the bitwise operator {bitwise} is not allowed",
                seg(node),
                "use and / or / not",
            )
        if type(node.op) not in ARITH_OPS:
            return fail("this operator is not allowed", seg(node))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        return fail("the bitwise operator ~ is not allowed", seg(node), "use not")
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if isinstance(op, ast.Is | ast.IsNot):
                return fail(
                    "'is' / 'is not' are not allowed",
                    seg(node),
                    "use isnull(x) or notnull(x), or == and !=",
                )
    elif isinstance(node, ast.Name):
        if "__" in node.id:
            return fail("names containing __ are not allowed", seg(node))
    elif isinstance(node, ast.Call):
        return _call_refusal(node, seg)
    elif isinstance(node, ast.Constant):
        return _constant_refusal(node, seg)
    elif isinstance(node, ast.expr) and not isinstance(node, _ALLOWED_NODES):
        return fail("this kind of expression is not allowed", seg(node))
    return None


def _chain_refusal(node: ast.Attribute | ast.Subscript, seg: Seg) -> ConfigError:
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
        return fail(
            "attribute access is not allowed",
            seg(target),
            'use the functions instead, e.g. isnull(col) or startswith(col, "x"); '
            "a column whose name has a dot goes in backticks",
        )
    return fail(_REFUSED[ast.Subscript], seg(target))


def _call_refusal(node: ast.Call, seg: Seg) -> ConfigError | None:
    if node.keywords:
        return fail("keyword arguments are not allowed", seg(node))
    func = node.func
    if isinstance(func, ast.Name):
        if "__" in func.id:
            return fail(
                f"{shorten(func.id)}() is not a supported function (names containing __ "
                "are not allowed)",
                seg(node),
            )
        if func.id not in FUNCTIONS:
            close = difflib.get_close_matches(func.id, list(FUNCTIONS), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            return fail(
                f"{shorten(func.id)}() is not a supported function (not allowed)",
                seg(node),
                f"{hint}the functions are: {ALLOWED_FUNCTIONS}",
            )
        return None
    if isinstance(func, ast.Attribute | ast.Subscript) or type(func) in _REFUSED:
        return None  # refused when its own node is visited, by name
    return fail(
        f"only the functions can be called ({ALLOWED_FUNCTIONS}); this call is not allowed",
        seg(node),
    )


def _constant_refusal(node: ast.Constant, seg: Seg) -> ConfigError | None:
    value = node.value
    if isinstance(value, bool) or value is None or isinstance(value, str | float):
        return None
    if isinstance(value, int):
        if abs(value) >= MAX_INT_LITERAL:
            return fail("numbers of 19 digits or more are not allowed", seg(node))
        return None
    if isinstance(value, bytes):
        return fail("bytes literals are not allowed", seg(node))
    if isinstance(value, complex):
        return fail("complex numbers are not allowed", seg(node))
    return fail("this literal is not allowed", seg(node))
