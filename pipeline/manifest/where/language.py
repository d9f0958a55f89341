"""The `where` language's vocabulary: its limits, its functions, the kinds of values, and how
its messages quote the expression."""

from __future__ import annotations

import keyword
from collections.abc import Mapping
from typing import Final

from pipeline.errors import ConfigError

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
PREDICATES: Final = frozenset({"contains", "startswith", "endswith"})
NULL_TESTS: Final = frozenset({"isnull", "notnull"})
TEXT_ARGUMENT: Final = frozenset({"lower", "upper", "strip", "length"}) | PREDICATES
# Functions whose value comes from their argument's column (named in hints).
SAME_COLUMN: Final = frozenset({"lower", "upper", "strip", "text", "num"})
ALLOWED_FUNCTIONS: Final = ", ".join(sorted(FUNCTIONS))

# Kinds of values. ANY: not known before the rows are seen.
NUMBER: Final = "number"
TEXT: Final = "text"
BOOL: Final = "bool"
NULL: Final = "null"
MIXED: Final = "mixed"
ANY: Final = "any"
KIND_WORDS: Final[Mapping[str, str]] = {
    NUMBER: "a number",
    TEXT: "text",
    BOOL: "true/false",
    NULL: "empty",
    MIXED: "mixed values (text, numbers...)",
    ANY: "a value",
}

Scalar = str | int | float | bool
"""A literal's value (None aside)."""


def literal_kind(value: object) -> str:
    """The kind of a literal's value."""
    if value is None:
        return NULL
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int | float):
        return NUMBER
    return TEXT


def shorten(text: str) -> str:
    """A part of the expression for a message: one line, at most SHOWN_CHARS characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= SHOWN_CHARS else flat[: SHOWN_CHARS - 3] + "..."


def fail(reason: str, part: str | None = None, hint: str = "") -> ConfigError:
    """The ConfigError for a problem with the expression, quoting `part` of it."""
    shown = f": {part}" if part else ""
    return ConfigError(f"where expression: {reason}{shown}{f' ({hint})' if hint else ''}")


def raise_if(problem: ConfigError | None) -> None:
    """Raise `problem`, if there is one."""
    if problem is not None:
        raise problem


def ref(name: str) -> str:
    """How to write column `name` in an expression."""
    if name.isidentifier() and not keyword.iskeyword(name) and "__" not in name:
        return name
    if "`" not in name:
        return f"`{name}`"
    return f"col({name!r})"
