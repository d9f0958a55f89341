"""Safe row filters (`where`) for choosing manifest rows: a small language, checked before use.

An expression is parsed with Python's own parser (`ast`, never compiled or run) into this
package's nodes, checked against an allow-list, and evaluated with pandas/numpy operations over
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

The package: `language` (limits, functions, kinds, messages), `scan` (the text made ready for
the parser), `refuse` (the allow-list and the size caps), `parse` (text -> this package's
nodes, `nodes`), `kinds` (the type checks), `values` and `evaluate` (the vectorised
evaluation), `expression` (`Where`, `parse_where`, `compile_where`).
"""

from __future__ import annotations

from pipeline.manifest.where.expression import Where, compile_where, parse_where
from pipeline.manifest.where.language import (
    FUNCTIONS,
    MAX_LIST_ITEMS,
    MAX_WHERE_CHARS,
    MAX_WHERE_DEPTH,
    MAX_WHERE_NODES,
)

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
