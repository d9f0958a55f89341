"""Row sets: one sorted array answering as a set of ints would, a row or a batch at a time."""

from __future__ import annotations

import random

import numpy as np

from pipeline.manifest.row_sets import RowSet, RowsLeft


def test_a_row_set_answers_as_a_set_of_the_same_rows_would() -> None:
    rng = random.Random(3)
    rows = [rng.randrange(1, 5000) for _ in range(2000)]  # with repeats, unsorted
    expected = set(rows)
    held = RowSet(np.array(rows, dtype=np.int64))
    assert len(held) == len(expected) and len(RowSet(rows)) == len(expected)
    asked = list(range(-2, 5003))
    assert [r in held for r in asked] == [r in expected for r in asked]
    assert held.isin(np.array(asked, dtype=np.int64)).tolist() == [r in expected for r in asked]
    assert np.int64(rows[0]) in held and "1" not in held and None not in held
    empty = RowSet()
    assert not len(empty) and 1 not in empty
    assert empty.isin(np.array([1, 2], dtype=np.int64)).tolist() == [False, False]


def test_rows_left_are_selected_and_not_done_one_at_a_time_or_at_once() -> None:
    done = RowSet([2, 3, 5, 8])
    rows = np.arange(0, 12, dtype=np.int64)
    for only in (None, {1, 2, 5, 9, 11}):
        left = RowsLeft(only, done)
        one_by_one = [(only is None or r in only) and r not in {2, 3, 5, 8} for r in range(12)]
        assert [left(r) for r in range(12)] == one_by_one
        assert left.mask(rows).tolist() == one_by_one
