"""The `where` filter language: documented forms, three-valued logic, typed frames, refusals."""

from __future__ import annotations

import ast
import builtins
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline.errors import ConfigError
from pipeline.manifest.where import (
    MAX_WHERE_CHARS,
    MAX_WHERE_DEPTH,
    Where,
    compile_where,
    parse_where,
)

COLUMNS = [
    "id",
    "image",
    "prompt",
    "seed",
    "size",
    "output_format",
    "mask",
    "quality",
    "param.turbo",
]
NUMERIC = ["seed"]
ROWS: list[dict[str, Any]] = [
    {
        "id": "cat-1",
        "image": "a.png",
        "prompt": "a blue sky",
        "seed": "1",
        "size": "1024x1024",
        "output_format": "png",
        "quality": "3",
        "param.turbo": "true",
    },
    {
        "id": "cat-2",
        "image": "b.png",
        "prompt": "night",
        "seed": "20",
        "size": "AUTO",
        "output_format": "png",
        "mask": "m.png",
        "quality": "1",
        "param.turbo": "false",
    },
    {
        "image": "c.png",
        "prompt": "sky high",
        "size": "1024X1024",
        "output_format": "jpeg",
        "quality": "x",
    },
    {
        "id": "dog-1",
        "image": "d.png",
        "prompt": "dog",
        "seed": "15",
        "size": "1024x1024",
        "output_format": "png",
        "mask": "m2.png",
        "quality": " 2 ",
        "param.turbo": "false",
    },
    {
        "id": "dog-2",
        "image": "e.png",
        "seed": "abc",
        "size": "512x512",
        "param.turbo": "false",
    },
]


def csv_frame(rows: Sequence[dict[str, Any]] = ROWS) -> pd.DataFrame:
    """A batch as pipeline.manifest.select builds it: object columns, `seed` made numeric."""
    data = {c: [r.get(c) for r in rows] for c in COLUMNS}
    frame = pd.DataFrame(data, columns=COLUMNS, dtype=object)
    for column in NUMERIC:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def selected(where: Where | str, frame: pd.DataFrame | None = None) -> list[int]:
    """1-based numbers of the rows the expression keeps."""
    frame = csv_frame() if frame is None else frame
    if isinstance(where, str):
        where = compile_where(where, [str(c) for c in frame.columns], NUMERIC)
    mask = where.mask(frame)
    assert mask.dtype == bool
    assert mask.shape == (len(frame),)
    return [i + 1 for i, keep in enumerate(mask) if keep]


# --- documented forms ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ('seed > 10 and output_format == "png"', [2, 4]),
        ('id in ["cat-1", "dog-2"]', [1, 5]),
        ('id not in ("cat-1", "dog-2")', [2, 4]),  # the row without id is unknown: not kept
        ("not isnull(mask)", [2, 4]),
        ("notnull(mask)", [2, 4]),
        ('contains(prompt, "sky")', [1, 3]),
        ('startswith(id, "cat-")', [1, 2]),
        ('endswith(image, "d.png")', [4]),
        ('lower(size) == "1024x1024"', [1, 3, 4]),
        ('size == "1024x1024"', [1, 4]),  # exact: no case folding
        ('upper(size) == "AUTO"', [2]),
        ('strip(quality) == "2"', [4]),
        ("length(prompt) > 5", [1, 3]),
        ('`param.turbo` == "false"', [2, 4, 5]),
        ('col("param.turbo") == "false"', [2, 4, 5]),
        ('`param.turbo` == "false" and `param.turbo` != "true"', [2, 4, 5]),
        ("1 < seed < 20", [4]),
        ("1 <= seed <= 20 != seed + 1", [1, 2, 4]),
        ("seed % 2 == 0", [2]),
        ("seed * 2 - 1 >= 29", [2, 4]),
        ("seed / 2 == 0.5", [1]),
        ("seed // 10 == 1", [4]),
        ("-seed < -10", [2, 4]),
        ("num(quality) >= 2", [1, 4]),
        ("isnull(num(quality))", [3, 5]),
        ('text(seed) == "20"', [2]),
        ('text(seed) in ["1", "15"]', [1, 4]),
        ("seed in [1, 15.0, 99]", [1, 4]),
        ('output_format == "png" or seed > 10', [1, 2, 4]),
        ('(output_format == "png" or seed > 10) and not (id == "cat-1")', [2, 4]),
        ("True", [1, 2, 3, 4, 5]),
        ("False", []),
        ("1 == 1", [1, 2, 3, 4, 5]),
        ('"a" < "b"', [1, 2, 3, 4, 5]),
        ("(seed > 1) == True", [2, 4]),
        ("seed / 0 > 1000", [1, 2, 4]),  # x / 0 is inf: no error
        ("seed - seed != 0", []),
        ("(seed - seed) / 0 != 1", [1, 2, 4]),  # NaN != 1 is true (IEEE); null stays null
        ("isnull((seed - seed) / 0)", [3, 5]),
        ('prompt >= "night"', [2, 3]),
        ("seed > 10 # a comment", [2, 4]),
        ("seed > 10\n and seed < 16", [4]),
        ("  seed > 10\r\n\tand seed < 16  # comment\n", [4]),
        ('contains(image, "\\d") or contains(prompt, "\\\\d")', []),  # no escape warnings
        ("seed>10and seed<16", [4]),
    ],
)
def test_documented_forms(where: str, expected: list[int]) -> None:
    assert selected(where) == expected


def test_null_cells_follow_three_valued_logic() -> None:
    # Row 3 has no seed; row 5's seed "abc" is not a number: both are null.
    assert selected("seed > 10") == [2, 4]
    assert selected("not (seed > 10)") == [1]
    assert selected("isnull(seed)") == [3, 5]
    assert selected("seed > 10 or isnull(seed)") == [2, 3, 4, 5]
    assert selected("seed > 10 or seed <= 10") == [1, 2, 4]
    assert selected("not (seed > 100 and seed > 0)") == [1, 2, 4]
    assert selected("not (seed > 0 or seed > 100)") == []
    assert selected("isnull(seed) or not (seed > 0 and isnull(seed))") == [1, 2, 3, 4, 5]
    assert selected('prompt == "dog"') == [4]
    assert selected('prompt != "dog"') == [1, 2, 3]  # row 5 has no prompt


def test_kleene_truth_table() -> None:
    values = {"t": True, "f": False, "n": None}
    rows = [{"a": a, "b": b} for a in values.values() for b in values.values()]
    frame = pd.DataFrame(rows, dtype=object)
    frame = frame.astype({"a": "boolean", "b": "boolean"})
    names = ["a", "b"]

    def truth(where: str) -> list[bool]:
        return list(compile_where(where, names).mask(frame))

    def kleene_and(x: bool | None, y: bool | None) -> bool | None:
        if x is False or y is False:
            return False
        return None if x is None or y is None else True

    def kleene_or(x: bool | None, y: bool | None) -> bool | None:
        if x is True or y is True:
            return True
        return None if x is None or y is None else False

    pairs = [(r["a"], r["b"]) for r in rows]
    assert truth("a == True and b == True") == [kleene_and(x, y) is True for x, y in pairs]
    assert truth("a == True or b == True") == [kleene_or(x, y) is True for x, y in pairs]
    assert truth("not (a == True and b == True)") == [kleene_and(x, y) is False for x, y in pairs]
    assert truth("not (a == True or b == True)") == [kleene_or(x, y) is False for x, y in pairs]


def test_literal_only_expressions_broadcast() -> None:
    where = parse_where("2 > 1")
    assert where.columns == frozenset()
    assert list(where.mask(csv_frame())) == [True] * len(ROWS)
    assert len(parse_where("False").mask(csv_frame())) == len(ROWS)


def test_empty_batch_gives_an_empty_mask() -> None:
    mask = compile_where("seed > 1", COLUMNS, NUMERIC).mask(csv_frame([]))
    assert mask.dtype == bool
    assert mask.shape == (0,)


def test_where_reports_its_columns_and_can_be_reused() -> None:
    where = compile_where(
        'seed > 1 and `param.turbo` == "false" or col("id") == "x"', COLUMNS, NUMERIC
    )
    assert where.text.startswith("seed > 1")
    assert where.columns == frozenset({"seed", "param.turbo", "id"})
    frame = csv_frame()
    assert list(where.mask(frame)) == list(where.mask(frame))
    assert "seed > 1" in repr(where)


def test_backticks_inside_strings_are_characters() -> None:
    rows = [{"id": "a`b"}, {"id": "`x`"}, {"id": "c"}]
    frame = csv_frame(rows)
    assert selected('id == "a`b"', frame) == [1]
    assert selected("id == '`x`'", frame) == [2]
    assert selected('id == "\\"`"  or id == "c"', frame) == [3]


def test_backtick_names_need_not_be_identifiers() -> None:
    rows = [{"odd name": "1", "x": "1"}, {"odd name": "2", "x": "1"}]
    frame = pd.DataFrame(rows, dtype=object)
    where = compile_where('`odd name` == "2" and `x` == "1"', ["odd name", "x"])
    assert list(where.mask(frame)) == [False, True]
    where = compile_where('col("odd name") == "1"', ["odd name", "x"])
    assert list(where.mask(frame)) == [True, False]


def test_a_column_named_like_a_placeholder_is_not_confused() -> None:
    frame = pd.DataFrame({"_w0q0": ["a", "b"], "a.b": ["b", "b"]}, dtype=object)
    where = compile_where("_w0q0 == `a.b`", ["_w0q0", "a.b"])
    assert where.columns == frozenset({"_w0q0", "a.b"})
    assert list(where.mask(frame)) == [False, True]


# --- typed (Parquet-like) frames ----------------------------------------------------------


def typed_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "n": pd.array([1, None, 3, 4], dtype="Int64"),
            "big": pd.Series([2**62, 2**53 + 1, -(2**62), 7], dtype="int64"),
            "score": pd.Series([0.5, np.nan, 2.5, 1.0], dtype="float64"),
            "flag": pd.Series([True, False, True, False], dtype=bool),
            "maybe": pd.array([True, None, False, True], dtype="boolean"),
            "arrow": pd.Series(["Cat", None, "dog", "cat"], dtype=pd.ArrowDtype(pa.string())),
            "string": pd.Series(["x", "y", None, "x"], dtype="string"),
            "arrow_int": pd.Series([10, None, 30, 40], dtype=pd.ArrowDtype(pa.int64())),
            "arrow_bool": pd.Series([None, True, False, True], dtype=pd.ArrowDtype(pa.bool_())),
            "when": pd.to_datetime(pd.Series(["2024-01-02", None, "2023-12-31", "2024-06-01"])),
            "cat": pd.Series(["a", "b", None, "a"], dtype="category"),
            "objint": pd.Series([1, None, 3, 4], dtype=object),
            "mixed": pd.Series([1, "two", None, 4.5], dtype=object),
        }
    )


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("n >= 3", [3, 4]),
        ("isnull(n)", [2]),
        ("not (n > 1)", [1]),
        ("n in [1, 4]", [1, 4]),
        ("big == 9007199254740993", [2]),  # int64 kept exact (not rounded to a float)
        ("big == 9007199254740992", []),
        ("big + big > 0", [1, 2, 4]),  # overflow avoided: computed as floats
        ("big % 2 == 1", [2, 4]),
        ("n // 0 > 0", [1, 3, 4]),  # integer division by zero: inf, no error
        ("n % 0 == n % 0", []),  # NaN
        ("-big < 0", [1, 2, 4]),
        ("score >= 1", [3, 4]),
        ("isnull(score)", [2]),
        ("flag == True", [1, 3]),
        ("flag != True", [2, 4]),
        ("maybe == False", [3]),
        ("not (maybe == True)", [3]),
        ("arrow == 'cat'", [4]),
        ("lower(arrow) == 'cat'", [1, 4]),
        ("contains(arrow, 'o')", [3]),
        ("string == 'x'", [1, 4]),
        ("isnull(string)", [3]),
        ("arrow_int > 15", [3, 4]),
        ("arrow_int + n > 40", [4]),
        ("arrow_bool == True", [2, 4]),
        ("when >= '2024'", [1, 4]),
        ("startswith(text(when), '2024-01-02')", [1]),
        ("cat == 'a'", [1, 4]),
        ("objint > 2", [3, 4]),
        ("text(mixed) in ['1', 'two']", [1, 2]),
        ("num(mixed) > 2", [4]),
        ("isnull(mixed)", [3]),
        ("text(flag) == 'true'", [1, 3]),
        ("text(score) == '0.5'", [1]),
        ("text(n) == '3'", [3]),
        ("num(flag) == 1", [1, 3]),
    ],
)
def test_typed_columns(where: str, expected: list[int]) -> None:
    frame = typed_frame()
    numeric = ["n", "big", "score", "arrow_int", "objint"]
    assert selected(compile_where(where, list(frame.columns), numeric), frame) == expected


def test_mixed_or_mistyped_values_are_explained_at_evaluation() -> None:
    frame = typed_frame()
    columns = list(frame.columns)
    with pytest.raises(ConfigError, match=r"column 'mixed' holds mixed values.*num\(mixed\)"):
        parse_where("mixed > 2").mask(frame)
    # `flag` is not named numeric, so it passes as "text" until its rows show true/false.
    with pytest.raises(ConfigError, match="cannot compare true/false with a number"):
        compile_where("flag > 0", columns, ["flag"]).mask(frame)
    with pytest.raises(ConfigError, match=r"lower\(\) needs text, but column 'n' is a number"):
        compile_where("lower(n) == 'x'", columns).mask(frame)
    # A CSV text column compared with True: refused once the rows show it is text.
    with pytest.raises(ConfigError, match="column 'id' is text"):
        compile_where("id == True", COLUMNS).mask(csv_frame())
    with pytest.raises(ConfigError, match=r"column 'quality' is text.*num\(quality\)"):
        parse_where("quality > 2").mask(csv_frame())
    with pytest.raises(ConfigError, match=r"arithmetic \(\+\) needs numbers.*'prompt' is text"):
        parse_where("prompt + 1 > 2").mask(csv_frame())


def test_a_column_missing_from_the_rows_is_an_error() -> None:
    with pytest.raises(ConfigError, match="the rows have no column 'nope'"):
        parse_where("nope == 1").mask(csv_frame())


# --- compile-time checks ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("sede > 3", "unknown column 'sede' \\(did you mean 'seed'\\?\\)"),
        ("`param.turob` == 'x'", "did you mean 'param.turbo'"),
        ("SEED > 3", "did you mean 'seed'"),
        ("quality > 2", "column 'quality' is text \\(use num\\(quality\\)"),
        ("`param.turbo` > 2", "use num\\(`param.turbo`\\)"),
        ("seed == '5'", "column 'seed' holds numbers"),
        ("prompt * 2 > 1", "arithmetic \\(\\*\\) needs numbers, but column 'prompt' is text"),
        ("-prompt < 0", "needs numbers"),
        ("contains(seed, '1')", "contains\\(\\) needs text, but column 'seed' is a number"),
        ("length(seed) > 1", "use length\\(text\\(seed\\)"),
        ("id in [1, 2]", "cannot compare text with a number"),
        ("seed in ['1']", "column 'seed' holds numbers"),
    ],
)
def test_compile_time_checks(where: str, message: str) -> None:
    parse_where(where)  # fine without the columns
    with pytest.raises(ConfigError, match=message):
        compile_where(where, COLUMNS, NUMERIC)


def test_unknown_column_lists_at_most_fifty_columns() -> None:
    columns = [f"column_{i}" for i in range(120)]
    with pytest.raises(ConfigError) as info:
        compile_where("nothing_like_it == 1", columns)
    message = str(info.value)
    assert "column_49" in message
    assert "column_50," not in message
    assert "and 70 more" in message
    assert "did you mean" not in message


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("", "empty"),
        ("   \n ", "empty"),
        ("size ==", "is not valid: invalid syntax \\(at the end\\): size =="),
        ("size == == 1", "is not valid: invalid syntax \\(at character 9\\)"),
        ("`a.b` `c` == 1", "is not valid: invalid syntax \\(at character 7\\)"),
        ("seed > 1 )", "is not valid: unmatched '\\)' \\(at character 10\\)"),
        ("`a b` == (", "is not valid: '\\(' was never closed \\(at character 10\\)"),
        ("seed", "must be a condition"),
        ("seed + 1", "must be a condition"),
        ("lower(size)", "must be a condition"),
        ("None", "must be a condition"),
        ("seed > 1 and seed", "each side of and must be a condition"),
        ("not seed", "operand of not must be a condition"),
        ("seed == None", "comparing with None is never true"),
        ("id in ['a', None]", "None in a list never matches"),
        ("id in 'abc'", "list of literals.*contains"),
        ("id in [seed]", "list of literals"),
        ("id in ['a', 1]", "mixes kinds"),
        ("[1] == seed", "only allowed after in"),
        ("seed is None", "'is' / 'is not' are not allowed: seed is None \\(use isnull"),
        ("seed is not None", "isnull"),
        ("seed & 1 == 1", "bitwise operator & is not allowed: .* \\(use and / or / not\\)"),
        ("seed | 1", "bitwise operator \\|"),
        ("~seed", "bitwise operator ~"),
        ("seed ^ 1", "bitwise operator \\^"),
        ("seed << 1", "bitwise operator <<"),
        ("seed >> 1", "bitwise operator >>"),
        ("seed ** 2 > 1", "power operator \\*\\* is not allowed"),
        ("seed @ seed", "not allowed"),
        ("lenght(prompt) > 1", "lenght\\(\\) is not a supported function .*did you mean length\\?"),
        ("contains(prompt)", "contains\\(\\) takes 2 arguments"),
        ("isnull(seed, id)", "isnull\\(\\) takes 1 argument"),
        ("contains(prompt, id)", "second argument of contains\\(\\) must be quoted text"),
        ("contains(prompt, x='a')", "keyword arguments are not allowed"),
        ("isnull(*seed)", "starred"),
        ("col(seed) == 1", "col\\(\\) takes a quoted column name"),
        ("col('') == 1", "col\\(\\) takes a quoted column name"),
        ("(seed)(1)", "is not a supported function"),
        ("'x'(1)", "only the functions can be called"),
        ("b'x' == seed", "bytes literals are not allowed"),
        ("1j == seed", "complex numbers are not allowed"),
        ("... == seed", "this literal is not allowed"),
        ("seed > 1000000000000000000", "19 digits"),
        ("seed > -1000000000000000000", "19 digits"),
        ("`oops == 1", "unclosed backtick at character 1"),
        ("`` == 1", "empty column name in backticks"),
        ("a__b == 1", "names containing __ are not allowed"),
        ("seed > 1 and 'x\x00' == 'y'", "NUL character"),
        ("True + 1 > 1", "arithmetic \\(\\+\\) needs numbers"),
        ("'a' > 1", "cannot compare text with a number"),
        ("lower(1) == 'a'", "lower\\(\\) needs text"),
        ('"é€" == `naïve col`.x', "attribute access is not allowed: `naïve col`.x"),
        ("lower(size) > 3", "cannot compare text with a number: column 'size' is text"),
        ("(seed > 1) > 0", "cannot compare true/false with a number"),
    ],
)
def test_refused_before_any_row_is_read(where: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_where(where)


# --- hostile input ------------------------------------------------------------------------

DEEP = 200
HOSTILE: list[tuple[str, str]] = [
    (
        "seed.__class__.__init__.__globals__['sys'].modules['os'].system('touch CANARY') == 0",
        "attribute access is not allowed: seed.__class__",
    ),
    ("__import__('os').system('touch CANARY')", "attribute access is not allowed"),
    ("__import__('os')", "__import__\\(\\) is not a supported function"),
    ("[x for x in seed]", "comprehensions are not allowed"),
    ("any(x for x in seed)", "not a supported function"),
    ("(x for x in seed)", "comprehensions"),
    ("{x for x in seed}", "comprehensions"),
    ("{x: 1 for x in seed}", "comprehensions"),
    ("(lambda: 1)()", "lambda is not allowed"),
    ("seed[0]", "subscripts and slices \\(x\\[...\\]\\) are not allowed: seed\\[0\\]"),
    ("seed[1:2] == 1", "subscripts"),
    ('prompt.upper() == "X"', "attribute access is not allowed: prompt.upper"),
    ('id.str.startswith("cat")', "attribute access is not allowed: id.str"),
    ('f"{seed}" == "1"', "f-strings are not allowed"),
    ('open("/etc/passwd")', "open\\(\\) is not a supported function"),
    ('getattr(seed, "x")', "getattr\\(\\) is not a supported function"),
    ("eval('1')", "not a supported function"),
    ("(x := 1)", "assignment expressions \\(:=\\) are not allowed"),
    ("{1: 2}", "dict literals are not allowed"),
    ("{1, 2}", "set literals are not allowed"),
    ("seed ** 99999999", "power operator"),
    ("seed if seed else 1", "conditional expressions \\(a if b else c\\) are not allowed"),
    ("x.__class__", "attribute access"),
    ("__builtins__", "names containing __ are not allowed"),
    ("seed == 1 or __debug__", "names containing __"),
    ("(yield)", "yield is not allowed"),
    ("await seed", "await is not allowed"),
    ("seed == 1 and [*seed] == 1", "starred"),
    ("'x' * 10**9 == 'y'", "power operator"),
    ("9" * 1000 + " > seed", "19 digits"),
    ("1" + " + 1" * 400 + " > seed", "too deep|too many parts"),
    (" or ".join(["seed==1"] * 180), "too many parts"),
    ("x" * 100_000, "too long"),
    ("(" * DEEP + "seed" + ")" * DEEP + " > 1", "too deep"),
    ("[" * DEEP + "]" * DEEP, "too deep"),
    ("not " * DEEP + "seed > 1", "too deep"),
    ("- " * DEEP + "1 > seed", "too deep"),
    ("-" * (MAX_WHERE_CHARS - 10) + "1 > seed", "too deep"),
    ("not " * (MAX_WHERE_CHARS // 4 - 5) + "True", "too deep"),
]


@pytest.mark.parametrize(("where", "message"), HOSTILE)
def test_hostile_expressions_are_refused_and_run_nothing(
    where: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    canary = tmp_path / "CANARY"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=message) as info:
        parse_where(where)
    with pytest.raises(ConfigError):
        compile_where(where, COLUMNS, NUMERIC)
    assert time.monotonic() - started < 2
    assert not canary.exists()
    assert not os.path.exists("CANARY")
    assert len(str(info.value)) < 400


def test_long_expression_is_refused_fast_and_not_echoed() -> None:
    text = "seed == 1 or " * 8000 + "seed == 2"
    started = time.monotonic()
    with pytest.raises(ConfigError, match=f"too long \\({len(text)} characters; at most 2000\\)"):
        parse_where(text)
    assert time.monotonic() - started < 0.5
    with pytest.raises(ConfigError) as info:
        parse_where("x" * 100_000)
    assert len(str(info.value)) < 300


def test_depth_limits() -> None:
    depth = MAX_WHERE_DEPTH
    parse_where("(" * (depth - 1) + "seed > 1" + ")" * (depth - 1))
    with pytest.raises(ConfigError, match="too deep"):
        parse_where("(" * (depth + 1) + "seed > 1" + ")" * (depth + 1))
    parse_where("not " * (depth - 3) + "seed > 1")
    with pytest.raises(ConfigError, match="too deep"):
        parse_where("not " * (depth + 1) + "seed > 1")


def test_messages_show_only_the_expression(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "canary-" + "secret-1234"
    monkeypatch.setenv("IMGEDIT_API_KEY", secret)
    monkeypatch.setenv("LUMENFALL_API_KEY", secret)
    probes = [where for where, _ in HOSTILE] + [
        "IMGEDIT_API_KEY == 1",
        "environ['IMGEDIT_API_KEY'] == 1",
        "os.environ.get('IMGEDIT_API_KEY') == 1",
        "getenv('IMGEDIT_API_KEY') == 'x'",
        "IMGEDIT_API_KEY > ",
        "quality > 2",
        "mixed > 2",
    ]
    for where in probes:
        with pytest.raises(ConfigError) as info:
            compile_where(where, COLUMNS, NUMERIC).mask(csv_frame())
        message = str(info.value)
        assert secret not in message
        assert "object at 0x" not in message
        assert "Traceback" not in message


def test_nothing_is_compiled_to_code_or_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only AST-only compilation (ast.parse) may happen; eval, exec and pandas eval never."""
    real_compile = builtins.compile

    def ast_only(source: Any, filename: Any, mode: str, flags: int = 0, *a: Any, **k: Any) -> Any:
        assert flags & ast.PyCF_ONLY_AST, "compiled to code"
        return real_compile(source, filename, mode, flags, *a, **k)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("evaluated as Python or pandas code")

    monkeypatch.setattr(builtins, "compile", ast_only)
    for name in ("eval", "exec"):
        monkeypatch.setattr(builtins, name, refuse)
    monkeypatch.setattr(pd.DataFrame, "eval", refuse)
    monkeypatch.setattr(pd.DataFrame, "query", refuse)
    assert selected('seed > 10 and output_format == "png"') == [2, 4]
    assert selected('contains(prompt, "sky") or num(quality) >= 2') == [1, 3, 4]
    for where, _ in HOSTILE:
        with pytest.raises(ConfigError):
            compile_where(where, COLUMNS, NUMERIC)
