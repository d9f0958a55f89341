"""Parsing a `where` expression: its text, through Python's own parser (never compiled or run),
into this package's nodes, with every refusal (syntax, allow-list, size) as a ConfigError
quoting the user's own text."""

from __future__ import annotations

import ast
import warnings

from pipeline.errors import ConfigError
from pipeline.manifest.where.language import (
    FUNCTIONS,
    PREDICATES,
    Scalar,
    fail,
    literal_kind,
    shorten,
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
from pipeline.manifest.where.refuse import ARITH_OPS, COMPARE_OPS, measure, refuse
from pipeline.manifest.where.scan import ScannedText


def parse(text: str) -> Node:
    """The root condition of `text` (not yet type-checked); ConfigError if it is refused."""
    source = ScannedText.scan(text)
    tree = _syntax_tree(source)
    parser = Parser(source)
    measure(tree)
    refuse(tree.body, parser.seg)
    return parser.condition(tree.body, "the where expression")


def _syntax_tree(source: ScannedText) -> ast.Expression:
    """Python's parse of the scanned text; ConfigError pointing at the user's character."""
    text = source.text
    try:
        with warnings.catch_warnings():
            # "\d" in a literal warns (DeprecationWarning, SyntaxWarning in 3.12): it stays "\d".
            warnings.simplefilter("ignore")
            return ast.parse(source.python, mode="eval")
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
            f"where expression is not valid: {message} ({position}): {shorten(text)}"
        ) from None
    except (RecursionError, MemoryError):
        raise fail("too deep or too large to read") from None
    except ValueError:
        raise ConfigError("where expression is not valid: it contains a NUL character") from None


class Parser:
    """Builds nodes from a parsed tree, quoting the user's text of each part."""

    def __init__(self, source: ScannedText) -> None:
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
        return shorten(self.raw(node))

    # -- building this package's nodes (after `measure` and `refuse`) -------------------

    def condition(self, node: ast.expr, role: str) -> Node:
        built = self.build(node)
        if not built.is_condition:
            raise fail(
                f"{role} must be a condition (true or false for each row)",
                built.src,
                "e.g. seed > 10 or isnull(mask); for a true/false column write col == True",
            )
        return built

    def build(self, node: ast.expr) -> Node:
        src = self.seg(node)
        if isinstance(node, ast.Constant):
            value = node.value
            assert isinstance(value, str | int | float | bool) or value is None
            return Literal(src, value)
        if isinstance(node, ast.Name):
            name = self.source.names.get(node.id)
            return Column(src, name if name is not None else self.raw(node))
        if isinstance(node, ast.List | ast.Tuple):
            raise fail('a list is only allowed after in / not in (e.g. id in ["a", "b"])', src)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return Not(src, self.condition(node.operand, "the operand of not"))
            literal = self._signed_number(node)
            if literal is not None:
                return Literal(src, literal)
            return Sign(src, self.build(node.operand), isinstance(node.op, ast.USub))
        if isinstance(node, ast.BinOp):
            op = ARITH_OPS[type(node.op)]
            return Arith(src, op, self.build(node.left), self.build(node.right))
        if isinstance(node, ast.BoolOp):
            word = "and" if isinstance(node.op, ast.And) else "or"
            parts = tuple(self.condition(v, f"each side of {word}") for v in node.values)
            return Logic(src, word == "and", parts)
        if isinstance(node, ast.Compare):
            return self._compare(node, src)
        if isinstance(node, ast.Call):
            return self._call(node, src)
        raise fail("this kind of expression is not allowed", src)  # pragma: no cover

    def _signed_number(self, node: ast.UnaryOp) -> int | float | None:
        operand = node.operand
        if not isinstance(node.op, ast.USub | ast.UAdd) or not isinstance(operand, ast.Constant):
            return None
        value = operand.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return -value if isinstance(node.op, ast.USub) else value

    def _compare(self, node: ast.Compare, src: str) -> Node:
        operands = [node.left, *node.comparators]
        built: dict[int, Node] = {}

        def operand(i: int) -> Node:
            if i not in built:
                built[i] = self.build(operands[i])
            return built[i]

        pairs: list[Node] = []
        for i, op in enumerate(node.ops):
            left, right = operands[i], operands[i + 1]
            symbol = COMPARE_OPS.get(type(op)) or ("in" if isinstance(op, ast.In) else "not in")
            pair_src = src
            if len(node.ops) > 1:
                pair_src = shorten(f"{self.raw(left)} {symbol} {self.raw(right)}")
            if isinstance(op, ast.In | ast.NotIn):
                values = self._literal_list(right)
                pairs.append(In(pair_src, operand(i), values, isinstance(op, ast.NotIn)))
                continue
            for side in (left, right):
                if isinstance(side, ast.Constant) and side.value is None:
                    raise fail(
                        "comparing with None is never true (use isnull(x) or notnull(x))", src
                    )
            pairs.append(Compare(pair_src, COMPARE_OPS[type(op)], operand(i), operand(i + 1)))
        return pairs[0] if len(pairs) == 1 else Logic(src, True, tuple(pairs))

    def _literal_list(self, node: ast.expr) -> tuple[Scalar, ...]:
        usage = 'the right side of in / not in must be a list of literals, e.g. id in ["a", "b"]'
        if not isinstance(node, ast.List | ast.Tuple):
            raise fail(f'{usage} (to search text use contains(col, "x"))', self.seg(node))
        values: list[Scalar] = []
        for item in node.elts:
            value: object = None
            if isinstance(item, ast.Constant):
                value = item.value
            elif isinstance(item, ast.UnaryOp):
                value = self._signed_number(item)
            if value is None and isinstance(item, ast.Constant):
                raise fail("None in a list never matches (use isnull(x))", self.seg(item))
            if not isinstance(value, str | int | float | bool):
                raise fail(usage, self.seg(item))
            values.append(value)
        kinds = {literal_kind(v) for v in values}
        if len(kinds) > 1:
            raise fail("a list mixes kinds of values (text, numbers, true/false)", self.seg(node))
        return tuple(values)

    def _call(self, node: ast.Call, src: str) -> Node:
        assert isinstance(node.func, ast.Name)
        func = node.func.id
        wanted = 2 if func in PREDICATES else 1
        if len(node.args) != wanted:
            raise fail(
                f"{func}() takes {wanted} argument{'s' if wanted > 1 else ''}: "
                f"{FUNCTIONS[func].split(':')[0]}",
                src,
            )
        if func == "col":
            arg = node.args[0]
            if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)) or not arg.value:
                raise fail('col() takes a quoted column name, e.g. col("param.turbo")', src)
            return Column(src, arg.value)
        pattern: str | None = None
        if func in PREDICATES:
            second = node.args[1]
            if not (isinstance(second, ast.Constant) and isinstance(second.value, str)):
                raise fail(
                    f'the second argument of {func}() must be quoted text, e.g. {func}(col, "x")',
                    src,
                )
            pattern = second.value
        return Call(src, func, (self.build(node.args[0]),), pattern)
