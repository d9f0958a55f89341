"""The set of job keys done under an output, at 16 bytes a key instead of about 130.

A resume of a million done jobs holds a million keys for the whole run. As a `set` of `str`
that is about 130 MB (an 81-byte string and a hash-table slot each) and a second of CPU to
build from the index's segments; here the keys of the usual form (`jobkey.KEY_HEX_CHARS`
lowercase hex digits) are two sorted arrays of their high and low 64 bits, decoded from the
segments' Arrow columns without a Python object per key. A lookup is a binary search, about
a microsecond (`bisect` over `array`s: a numpy call per lookup costs twice that). Keys added
while the run goes on wait in a set until FOLD_AT of them join the sorted part; keys of any
other form (the shorter keys an old output's listing may hold, say) stay in a set.
"""

from __future__ import annotations

import re
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine.jobkey import KEY_HEX_CHARS

__all__ = ["DoneKeys"]

U64 = npt.NDArray[np.uint64]

_HALF = KEY_HEX_CHARS // 2  # hex digits per 64-bit half
# `which` searches the sorted part with numpy from this many keys on (one call's overhead
# is some tens of µs; a lookup alone, about 3).
SEARCH_AT_ONCE_FROM = 16
_HEX_KEY = f"^[0-9a-f]{{{KEY_HEX_CHARS}}}$"
# Python's `$` also matches before a final newline: a lookup uses fullmatch.
_HEX_KEY_RE = re.compile(f"[0-9a-f]{{{KEY_HEX_CHARS}}}")
# ASCII byte -> its hex digit's value (only for bytes `_HEX_KEY` already let through).
_NIBBLE = np.zeros(256, dtype=np.uint64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
# Keys of the usual form added during a run join the sorted part (16 bytes a key) once this
# many wait in their set (~100 bytes a key with its slot): a run editing a million rows held
# them all as strings, ~100 MB. A fold is a linear merge, some ms at a million keys, on the
# event loop every FOLD_AT edits.
FOLD_AT = 16_384


class DoneKeys:
    """Job keys done: a frozen sorted part (from the index) and a small set (the rest)."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._hi: array[int] = array("Q")
        self._lo: array[int] = array("Q")
        self._other: set[str] = set()
        self._new: set[str] = set()  # of the usual form, not yet in the sorted part
        for key in keys:
            self.add(key)

    @classmethod
    def from_arrays(cls, arrays: Sequence[pa.Array | pa.ChunkedArray]) -> DoneKeys:
        """The keys of string arrays (the index's segments), repeats counted once."""
        done = cls()
        his, los = [], []
        for column in arrays:
            chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
            for chunk in chunks:
                chunk = chunk.drop_null()
                usual = pc.match_substring_regex(chunk, _HEX_KEY)
                hi, lo = _decode(chunk.filter(usual))
                his.append(hi)
                los.append(lo)
                done._other.update(chunk.filter(pc.invert(usual)).to_pylist())
        if his:
            hi, lo = _sorted_unique(np.concatenate(his), np.concatenate(los))
            done._hi.frombytes(hi.tobytes())
            done._lo.frombytes(lo.tobytes())
        return done

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if key in self._other or key in self._new:
            return True
        # Only the usual form is in the sorted part ("ABC...", "0_1..." parse as hex too).
        if not self._hi or not _HEX_KEY_RE.fullmatch(key):
            return False
        hi, lo = int(key[:_HALF], 16), int(key[_HALF:], 16)
        i = bisect_left(self._hi, hi)
        # Keys sharing their high 64 bits are neighbours: check each one's low bits.
        while i < len(self._hi) and self._hi[i] == hi:
            if self._lo[i] == lo:
                return True
            i += 1
        return False

    def which(self, keys: Sequence[str]) -> list[bool]:
        """`[key in self for key in keys]`, the sorted part searched for all of them in one
        numpy call (a chunk of a resume: about 2 µs a key against 3 for `in`, at 1M keys)."""
        if len(keys) < SEARCH_AT_ONCE_FROM:  # a row alone: a numpy call costs more
            return [key in self for key in keys]
        hits = [key in self._other or key in self._new for key in keys]
        if not self._hi:
            return hits
        column = pa.array(keys, pa.string())
        usual = pc.match_substring_regex(column, _HEX_KEY).to_numpy(zero_copy_only=False)
        where = np.flatnonzero(usual)
        q_hi, q_lo = _decode(column.filter(pa.array(usual)))
        hi = np.frombuffer(self._hi, np.uint64)
        lo = np.frombuffer(self._lo, np.uint64)
        first = np.searchsorted(hi, q_hi, "left")
        last = np.searchsorted(hi, q_hi, "right")
        single = last - first == 1
        found = np.zeros(len(where), dtype=bool)
        found[single] = lo[first[single]] == q_lo[single]
        for i in where[found].tolist():
            hits[i] = True
        # Keys sharing their high 64 bits (one in 2**32 at a billion keys): one at a time.
        for j in np.flatnonzero(last - first > 1):
            i = int(where[j])
            hits[i] = hits[i] or keys[i] in self
        return hits

    def add(self, key: str) -> None:
        if key in self:
            return
        if not _HEX_KEY_RE.fullmatch(key):
            self._other.add(key)
            return
        self._new.add(key)
        if len(self._new) >= FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """The waiting keys merged into the sorted part (they are not in it: `add` checked)."""
        new_hi, new_lo = _sorted_unique(*_decode(pa.array(list(self._new), pa.string())))
        hi, lo = _merge(
            np.frombuffer(self._hi, np.uint64), np.frombuffer(self._lo, np.uint64), new_hi, new_lo
        )
        self._hi, self._lo = array("Q", hi.tobytes()), array("Q", lo.tobytes())
        self._new.clear()

    def __len__(self) -> int:
        return len(self._hi) + len(self._other) + len(self._new)

    def __iter__(self) -> Iterator[str]:
        width = f"0{_HALF}x"
        for hi, lo in zip(self._hi, self._lo, strict=True):
            yield format(hi, width) + format(lo, width)
        yield from self._other
        yield from self._new

    def __bool__(self) -> bool:
        return len(self) > 0

    def __eq__(self, other: object) -> bool:
        """Equal to another DoneKeys, or to a set, holding the same keys (tests compare)."""
        if isinstance(other, DoneKeys):
            other = set(other)
        if not isinstance(other, (set, frozenset)):
            return NotImplemented
        return len(self) == len(other) and all(k in self for k in other)

    __hash__ = None  # type: ignore[assignment]  # mutable, like a set

    def __repr__(self) -> str:
        return f"DoneKeys({len(self)} keys)"

    def to_arrow(self) -> pa.Array:
        """Every key, sorted, as one string array (a merged segment), built without a Python
        string per key for the sorted part."""
        n = len(self._hi)
        digits = np.empty((n, KEY_HEX_CHARS), dtype=np.uint8)
        hexdigits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
        halves = (np.frombuffer(self._hi, np.uint64), np.frombuffer(self._lo, np.uint64))
        for half, values in enumerate(halves):
            for d in range(_HALF):
                shift = np.uint64(4 * (_HALF - 1 - d))
                nibble = (values >> shift) & np.uint64(0xF)
                digits[:, half * _HALF + d] = hexdigits[nibble.astype(np.intp)]
        offsets = np.arange(0, (n + 1) * KEY_HEX_CHARS, KEY_HEX_CHARS, dtype=np.int32)
        usual = pa.Array.from_buffers(
            pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())]
        )
        rest = self._other | self._new
        if not rest:
            return usual
        every = pa.concat_arrays([usual, pa.array(sorted(rest), pa.string())])
        return pc.take(every, pc.sort_indices(every))


def _decode(usual: pa.Array) -> tuple[U64, U64]:
    """High and low 64 bits of keys that are all `KEY_HEX_CHARS` lowercase hex digits."""
    n = len(usual)
    if not n:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64)
    # A compacted copy (offset 0, no nulls): every value is KEY_HEX_CHARS bytes, back to back.
    usual = pa.concat_arrays([usual])
    offsets = np.frombuffer(usual.buffers()[1], dtype=np.int32, count=n + 1, offset=0)
    start = int(offsets[usual.offset])
    raw = np.frombuffer(usual.buffers()[2], dtype=np.uint8, count=n * KEY_HEX_CHARS, offset=start)
    nibbles = _NIBBLE[raw.reshape(n, KEY_HEX_CHARS)]
    halves = []
    for first in (0, _HALF):
        value = np.zeros(n, dtype=np.uint64)
        for d in range(_HALF):
            value = (value << np.uint64(4)) | nibbles[:, first + d]
        halves.append(value)
    return halves[0], halves[1]


def _merge(hi: U64, lo: U64, new_hi: U64, new_lo: U64) -> tuple[U64, U64]:
    """Two sorted (hi, lo) key arrays with no key in both, merged in order in linear time."""
    at = np.searchsorted(hi, new_hi, "left")
    # Old keys sharing a new key's high bits (one in 2**32 at a billion keys) come before it
    # when their low bits are lower.
    ties = np.searchsorted(hi, new_hi, "right") - at
    for j in np.flatnonzero(ties).tolist():
        start = int(at[j])
        at[j] += int(np.count_nonzero(lo[start : start + int(ties[j])] < new_lo[j]))
    at += np.arange(len(new_hi))
    total = len(hi) + len(new_hi)
    out_hi, out_lo = np.empty(total, np.uint64), np.empty(total, np.uint64)
    old = np.ones(total, dtype=bool)
    old[at] = False
    out_hi[at], out_lo[at] = new_hi, new_lo
    out_hi[old], out_lo[old] = hi, lo
    return out_hi, out_lo


def _sorted_unique(hi: U64, lo: U64) -> tuple[U64, U64]:
    order = np.lexsort((lo, hi))
    hi, lo = hi[order], lo[order]
    if hi.size > 1:
        keep = np.ones(hi.size, dtype=bool)
        keep[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        hi, lo = hi[keep], lo[keep]
    return hi, lo
