"""The checked parts of a `where` expression: this package's own tree, built by the parser.

Nodes only hold what was written (and its text, for messages); the kinds are checked by
`kinds`, the values computed by `evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from pipeline.manifest.where.language import (
    ANY,
    NULL_TESTS,
    PREDICATES,
    SAME_COLUMN,
    Scalar,
    literal_kind,
)


class Node:
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

    def children(self) -> Sequence[Node]:
        return ()


class Column(Node):
    __slots__ = ("name",)

    def __init__(self, src: str, name: str) -> None:
        super().__init__(src)
        self.name = name

    def column_refs(self) -> Iterator[tuple[str, str]]:
        yield self.name, self.src


class Literal(Node):
    __slots__ = ("value",)

    def __init__(self, src: str, value: Scalar | None) -> None:
        super().__init__(src)
        self.value = value

    @property
    def is_condition(self) -> bool:
        return isinstance(self.value, bool)


class Compare(Node):
    """`left op right`, op one of == != < <= > >=."""

    __slots__ = ("left", "op", "right")

    def __init__(self, src: str, op: str, left: Node, right: Node) -> None:
        super().__init__(src)
        self.op, self.left, self.right = op, left, right

    @property
    def is_condition(self) -> bool:
        return True

    def children(self) -> Sequence[Node]:
        return (self.left, self.right)


class In(Node):
    """`left in [...]` or `left not in [...]` (a list of literals of one kind)."""

    __slots__ = ("left", "list_kind", "negate", "values")

    def __init__(self, src: str, left: Node, values: tuple[Scalar, ...], negate: bool) -> None:
        super().__init__(src)
        self.left, self.values, self.negate = left, values, negate
        kinds = {literal_kind(v) for v in values}
        self.list_kind = kinds.pop() if len(kinds) == 1 else ANY

    @property
    def is_condition(self) -> bool:
        return True

    def children(self) -> Sequence[Node]:
        return (self.left,)


class Logic(Node):
    """`and` / `or` over conditions, with Kleene (SQL) three-valued logic."""

    __slots__ = ("is_and", "parts")

    def __init__(self, src: str, is_and: bool, parts: tuple[Node, ...]) -> None:
        super().__init__(src)
        self.is_and, self.parts = is_and, parts

    @property
    def is_condition(self) -> bool:
        return True

    def children(self) -> Sequence[Node]:
        return self.parts


class Not(Node):
    __slots__ = ("operand",)

    def __init__(self, src: str, operand: Node) -> None:
        super().__init__(src)
        self.operand = operand

    @property
    def is_condition(self) -> bool:
        return True

    def children(self) -> Sequence[Node]:
        return (self.operand,)


class Arith(Node):
    """`left op right`, op one of + - * / // %."""

    __slots__ = ("left", "op", "right")

    def __init__(self, src: str, op: str, left: Node, right: Node) -> None:
        super().__init__(src)
        self.op, self.left, self.right = op, left, right

    def children(self) -> Sequence[Node]:
        return (self.left, self.right)


class Sign(Node):
    """Unary minus (negate) or plus."""

    __slots__ = ("negate", "operand")

    def __init__(self, src: str, operand: Node, negate: bool) -> None:
        super().__init__(src)
        self.operand, self.negate = operand, negate

    def children(self) -> Sequence[Node]:
        return (self.operand,)


class Call(Node):
    """One of the language's functions; `pattern` is the quoted text of a predicate."""

    __slots__ = ("args", "func", "pattern")

    def __init__(self, src: str, func: str, args: tuple[Node, ...], pattern: str | None) -> None:
        super().__init__(src)
        self.func, self.args, self.pattern = func, args, pattern

    @property
    def is_condition(self) -> bool:
        return self.func in PREDICATES or self.func in NULL_TESTS

    def children(self) -> Sequence[Node]:
        return self.args


def column_of(node: Node) -> str | None:
    """The column a value comes from, through functions that keep it (for hints)."""
    if isinstance(node, Column):
        return node.name
    if isinstance(node, Call) and node.func in SAME_COLUMN:
        return column_of(node.args[0])
    return None
