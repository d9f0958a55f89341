"""Sets of manifest row numbers as one sorted array, asked about one row or a batch at once."""

from __future__ import annotations

from collections.abc import Container, Iterable

import numpy as np
import numpy.typing as npt

Rows = npt.NDArray[np.int64]


class RowSet:
    """Row numbers, sorted and unique: 8 bytes a row (a `set` of ints takes ~60-90).

    A second resume of a million rows asks which rows the first one finished: as a set that
    was ~90 MB of the run's peak; as this, 8 MB.
    """

    def __init__(self, rows: Rows | Iterable[int] = ()) -> None:
        values = rows if isinstance(rows, np.ndarray) else np.fromiter(rows, dtype=np.int64)
        self._rows: Rows = np.unique(values.astype(np.int64, copy=False))

    def __contains__(self, row: object) -> bool:
        if not isinstance(row, (int, np.integer)) or isinstance(row, bool) or not len(self._rows):
            return False
        at = int(np.searchsorted(self._rows, row))
        return at < len(self._rows) and int(self._rows[at]) == row

    def isin(self, rows: Rows) -> npt.NDArray[np.bool_]:
        """For each row of `rows`, whether it is in the set (one search for all)."""
        if not len(self._rows):
            return np.zeros(len(rows), dtype=bool)
        at = np.minimum(np.searchsorted(self._rows, rows), len(self._rows) - 1)
        found: npt.NDArray[np.bool_] = self._rows[at] == rows
        return found

    def __len__(self) -> int:
        return len(self._rows)


class RowsLeft:
    """Whether a run still has to edit a row: in its selection (None: every row) and not
    among the rows earlier runs finished."""

    def __init__(self, only: Container[int] | None, done: RowSet) -> None:
        self.only, self.done = only, done

    def __call__(self, row: int) -> bool:
        return (self.only is None or row in self.only) and row not in self.done

    def mask(self, rows: Rows) -> npt.NDArray[np.bool_]:
        """`[self(row) for row in rows]` as a mask, the done rows searched for at once."""
        wanted: npt.NDArray[np.bool_] = ~self.done.isin(rows)
        if self.only is not None:
            only = self.only
            wanted &= np.fromiter((r in only for r in rows.tolist()), dtype=bool, count=len(rows))
        return wanted
