"""The type checks of a `where` expression: which kind of value each part gives, and why two
kinds do not fit (text compared with a number, arithmetic on text...).

`check` runs before any row is read, from the column kinds the caller knows (a CSV column is
text unless named numeric); the evaluator asks the same questions of the kinds the rows have.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import ConfigError
from pipeline.manifest.where.language import (
    ANY,
    BOOL,
    KIND_WORDS,
    MIXED,
    NULL,
    NUMBER,
    TEXT,
    TEXT_ARGUMENT,
    fail,
    literal_kind,
    raise_if,
    ref,
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
    column_of,
)


def check(node: Node, kinds: Mapping[str, str]) -> str:
    """The kind of value `node` gives; ConfigError when kinds do not fit.

    `kinds`: column name -> kind; a column it does not name is ANY.
    """
    match node:
        case Column():
            return kinds.get(node.name, ANY)
        case Literal():
            return literal_kind(node.value)
        case Compare():
            lk, rk = check(node.left, kinds), check(node.right, kinds)
            raise_if(compare_problem(node.left, lk, node.right, rk, node.src, runtime=False))
            return BOOL
        case In():
            raise_if(in_problem(node, check(node.left, kinds), runtime=False))
            return BOOL
        case Logic():
            for part in node.parts:
                check(part, kinds)
            return BOOL
        case Not():
            check(node.operand, kinds)
            return BOOL
        case Arith():
            for side in (node.left, node.right):
                raise_if(number_problem(side, check(side, kinds), f"arithmetic ({node.op})"))
            return NUMBER
        case Sign():
            raise_if(number_problem(node.operand, check(node.operand, kinds), "a sign (-, +)"))
            return NUMBER
        case Call():
            raise_if(call_problem(node, check(node.args[0], kinds)))
            return call_kind(node)
    raise TypeError(f"not a where node: {node!r}")  # pragma: no cover


def compare_problem(
    left: Node, lk: str, right: Node, rk: str, src: str, *, runtime: bool
) -> ConfigError | None:
    """Why values of kinds lk and rk cannot be compared (None when they can)."""
    if ANY in (lk, rk) or NULL in (lk, rk) or lk == rk:
        return None
    for node, kind in ((left, lk), (right, rk)):
        if kind == MIXED:
            column = column_of(node)
            named = f"column {column!r}" if column else node.src
            hint = f"; use text({ref(column)}) or num({ref(column)})" if column else ""
            return fail(f"{named} holds mixed values (text, numbers...){hint}", src)
    kinds = {lk, rk}
    if kinds == {NUMBER, TEXT}:
        text_side, number_side = (left, right) if lk == TEXT else (right, left)
        return _text_number_problem(text_side, number_side, src)
    if kinds == {BOOL, TEXT}:
        text_side = left if lk == TEXT else right
        if not runtime and isinstance(text_side, Column):
            return None  # a true/false Parquet column is "text" until its rows are seen
        column = column_of(text_side)
        if column is not None:
            return fail(
                f"cannot compare text with true/false: column {column!r} is text "
                f'(compare it with quoted text, e.g. {ref(column)} == "true")',
                src,
            )
        return fail("cannot compare text with true/false", src)
    return fail(f"cannot compare {KIND_WORDS[lk]} with {KIND_WORDS[rk]}", src)


def _text_number_problem(text_side: Node, number_side: Node, src: str) -> ConfigError:
    column = column_of(text_side)
    if column is not None:
        return fail(
            f"cannot compare text with a number: column {column!r} is text "
            f"(use num({ref(column)}) to read it as a number, or quote the number)",
            src,
        )
    column = column_of(number_side)
    if column is not None:
        return fail(
            f"cannot compare a number with text: column {column!r} holds numbers "
            f"(compare it with an unquoted number, or use text({ref(column)}))",
            src,
        )
    return fail("cannot compare text with a number", src)


def in_problem(node: In, kind: str, *, runtime: bool) -> ConfigError | None:
    """Why values of `kind` cannot be looked up in the node's list (None when they can)."""
    items = Literal(node.src, None)  # stands for the list in messages
    return compare_problem(node.left, kind, items, node.list_kind, node.src, runtime=runtime)


def number_problem(node: Node, kind: str, what: str) -> ConfigError | None:
    """Why `what` (arithmetic, a sign) cannot take `node`'s values of `kind`, or None."""
    if kind in (NUMBER, ANY, NULL):
        return None
    column = column_of(node)
    hint = ""
    if column is not None and kind in (TEXT, MIXED):
        hint = f" (use num({ref(column)}) to read it as a number)"
    named = f"column {column!r}" if isinstance(node, Column) else node.src
    return fail(f"{what} needs numbers, but {named} is {KIND_WORDS[kind]}{hint}", node.src)


def call_problem(node: Call, kind: str) -> ConfigError | None:
    """Why the function cannot take an argument of `kind` (None when it can)."""
    if node.func not in TEXT_ARGUMENT or kind in (TEXT, ANY, NULL):
        return None
    arg = node.args[0]
    column = column_of(arg)
    named = f"column {column!r}" if isinstance(arg, Column) else arg.src
    hint = ""
    if column is not None and kind != MIXED:
        hint = f" (use {node.func}(text({ref(column)})...) to use it as text)"
    elif column is not None:
        hint = f" (use text({ref(column)}) to make it text)"
    return fail(f"{node.func}() needs text, but {named} is {KIND_WORDS[kind]}{hint}", node.src)


def call_kind(node: Call) -> str:
    """The kind of value the function gives."""
    if node.is_condition:
        return BOOL
    if node.func in ("length", "num"):
        return NUMBER
    return TEXT
