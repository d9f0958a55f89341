"""Row validation a batch at a time: Arrow compute over whole columns, and the per-row path
(`RowValidator`) only for the rows the batch checks cannot pass.

A row passes here only when every one of its cells is one the per-row path certainly accepts
as it stands: text without surrounding whitespace, integers written as plain digits (or stored
as numbers), the usual forms of sources (a path, `http(s)://host...`, `s3://bucket/key`),
values of the enumerated columns whose check (the same, remembered, function the per-row path
calls) passed, no provider extras. Every other row (an error, a duplicate id, or just a form
not worth vectorising: a JSON `images` list, `file://`, a prompt starting with a space...) is
validated by `RowValidator`, so its errors (row, column, reason) are exactly the per-row
ones. The ids of every row are remembered here, in order, as 64-bit digests in sorted arrays
(16 bytes per row), and each row's first occurrence handed to `RowValidator`.

What a valid row contributes to a report (its row number, its output images, the fields the
model does not take) comes back as arrays (`FastRows`), never as ManifestRow objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import spec
from pipeline.manifest.cells import MAX_ID_CHARS, CellProblem, cell_text, check_id
from pipeline.manifest.columns import RawBatch
from pipeline.manifest.rows import ID_DIGEST_BYTES, MAX_SEED, MIN_SEED, PARAM_PREFIX, RowValidator
from pipeline.manifest.types import ParsedRow

__all__ = ["NOT_SPACE", "BatchValidator", "CheckedBatch", "FastRows", "SeenIds"]

Mask = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]

# One character `str.strip()` keeps (not `str.isspace()`), as an RE2 class.
NOT_SPACE = (
    r"[^\t-\r\x1c-\x20\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}"
    r"\x{205f}\x{3000}]"
)
_STARTS_CLEAN = "^" + NOT_SPACE
_ENDS_CLEAN = NOT_SPACE + "$"
# Plain digits: the per-row path's own fast case (fewer than 19, so within 0..2**63-1).
_DIGITS = r"^[0-9]{1,18}$"
_SCHEME = r"^[A-Za-z][A-Za-z0-9+.\-]*://"
# A URL whose host is certainly there (urlsplit: the netloc is what follows `//` up to `/?#`).
_HTTP = r"^(?i:https?)://[A-Za-z0-9._~%!$&'()*+,;=:@-]"
_S3 = r"(?s)^(?i:s3)://[^/]+/."
_BAD_ID_CHARS = r"[/\\\x00-\x1f\x{7f}-\x{9f}\x{2028}\x{2029}]"
# Floats within this are integers exactly.
_MAX_EXACT_FLOAT = 2.0**53
_INT64_MAX = 2**63 - 1


@dataclass
class FastRows:
    """The rows of a batch that are valid by the batch checks alone (in order)."""

    rows: Ints
    images: Ints  # output images each asks for (n, default 1)
    # Per field the model does not take: which of `rows` set it (in the order rows list them).
    dropped: dict[str, Mask] = field(default_factory=dict)


@dataclass
class CheckedBatch:
    """A batch through the batch checks: which rows they could not pass (`need`), and what
    the others hold, as arrays over the whole batch (meaningful where `need` is False)."""

    batch: RawBatch
    rows: Ints
    need: Mask
    sets: dict[str, Mask]  # per optional scalar column: the rows setting it
    values: dict[str, Ints]  # per integer column: its values
    accepted: dict[str, dict[str, Any]]  # per enumerated column: a value -> its checked form
    id_first: Ints | None  # the first row with each row's id
    id_text: pa.Array | None  # the ids as text
    images: Ints  # output images each asks for (n, default 1)


class SeenIds:
    """The first row of every id seen, as 64-bit digests: sorted runs of (digest, row) arrays,
    merged as they grow (about 16 bytes per id, whatever the ids' length)."""

    def __init__(self) -> None:
        self._runs: list[tuple[npt.NDArray[np.uint64], Ints]] = []

    @staticmethod
    def digests(ids: Iterable[bytes | None]) -> npt.NDArray[np.uint64]:
        """The ids' (UTF-8) digests: the per-row path's (`rows._id_key`)."""
        blake2b = hashlib.blake2b
        joined = b"".join([blake2b(i or b"", digest_size=ID_DIGEST_BYTES).digest() for i in ids])
        return np.frombuffer(joined, dtype="<u8").astype(np.uint64)

    def first_rows(self, keys: npt.NDArray[np.uint64], rows: Ints) -> Ints:
        """For each (key, row), rows ascending: the first row seen with that key (it may be
        the row itself); the new keys are remembered."""
        if not len(keys):
            return rows.copy()
        order = np.argsort(keys, kind="stable")
        sorted_keys, sorted_rows = keys[order], rows[order]
        starts = np.ones(len(sorted_keys), dtype=bool)
        starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
        group = np.cumsum(starts) - 1
        unique_keys, first = sorted_keys[starts], sorted_rows[starts].copy()
        found = np.zeros(len(unique_keys), dtype=bool)
        for run_keys, run_rows in self._runs:
            at = np.minimum(np.searchsorted(run_keys, unique_keys), len(run_keys) - 1)
            hit = run_keys[at] == unique_keys
            first[hit] = run_rows[at[hit]]
            found |= hit
        self._add(unique_keys[~found], first[~found])
        result = np.empty(len(keys), dtype=np.int64)
        result[order] = first[group]
        return result

    def _add(self, keys: npt.NDArray[np.uint64], rows: Ints) -> None:
        if not len(keys):
            return
        self._runs.append((keys, rows))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            # Two sorted runs of distinct keys merged in place of both, in linear memory.
            (old_keys, old_rows), (new_keys, new_rows) = self._runs[-2], self._runs[-1]
            at = np.searchsorted(old_keys, new_keys) + np.arange(len(new_keys))
            total = len(old_keys) + len(new_keys)
            keys = np.empty(total, dtype=np.uint64)
            rows_out = np.empty(total, dtype=np.int64)
            rest = np.ones(total, dtype=bool)
            rest[at] = False
            keys[at], rows_out[at] = new_keys, new_rows
            keys[rest], rows_out[rest] = old_keys, old_rows
            self._runs[-2:] = [(keys, rows_out)]


def _np(mask: Any) -> Mask:
    """An Arrow boolean array as a numpy one, null as False."""
    out: Mask = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    return out


def _text(array: pa.Array) -> pa.Array | None:
    """The array as plain strings (dictionaries decoded), or None when it is not text."""
    t = array.type
    if pa.types.is_dictionary(t):
        return _text(array.dictionary_decode())
    if pa.types.is_string(t):
        return array
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return array.cast(pa.string())
    return None


def _unset(text: pa.Array) -> Mask:
    """Null or the empty string: what the per-row path skips without a check."""
    return _np(pc.or_kleene(pc.is_null(text), pc.equal(text, "")))


def _clean(text: pa.Array) -> Mask:
    """Text that `str.strip()` leaves as it is, and not empty."""
    return _np(
        pc.and_(
            pc.match_substring_regex(text, _STARTS_CLEAN),
            pc.match_substring_regex(text, _ENDS_CLEAN),
        )
    )


def _has(text: pa.Array, pattern: str) -> Mask:
    return _np(pc.match_substring(text, pattern))


def _matches(text: pa.Array, regex: str) -> Mask:
    return _np(pc.match_substring_regex(text, regex))


class BatchValidator:
    """Validates RawBatches in order for one pass (it remembers the ids seen)."""

    def __init__(self, validator: RowValidator) -> None:
        self._validator = validator
        self._profile = validator.profile
        self._s3_base = validator.base.s3_bucket is not None
        self._checks = validator.checks
        self._seen = SeenIds()

    def validate(self, batch: RawBatch) -> tuple[Iterator[ParsedRow], FastRows]:
        """The rows that need the per-row path, validated by it as they are iterated (in
        order; iterate them before the next batch), and the others, valid."""
        checked = self.check(batch)
        fast = ~checked.need
        dropped = {
            column: checked.sets[column][fast]
            for column, _ in self._checks
            if not self._profile.takes(column)
        }
        return self.slow(checked), FastRows(
            rows=checked.rows[fast], images=checked.images[fast], dropped=dropped
        )

    def check(self, batch: RawBatch) -> CheckedBatch:
        """The batch checks of every row (see CheckedBatch); the ids are remembered."""
        n = batch.length
        rows = np.arange(batch.row, batch.row + n, dtype=np.int64)
        cols = batch.columns
        need = np.zeros(n, dtype=bool)
        for index in batch.problems:
            need[index] = True
        need |= self._prompt(cols["prompt"], n)
        need |= self._sources(cols.get("image"), cols.get("images"), n)
        if "mask" in cols:
            need |= self._mask(cols["mask"])
        sets: dict[str, Mask] = {}
        values: dict[str, Ints] = {}
        accepted: dict[str, dict[str, Any]] = {}
        for column, check in self._checks:
            array = cols[column]
            limits = self._int_range(column)
            if limits is not None:
                bad, is_set, ints = self._ints(array, n, *limits)
                values[column] = ints
            elif column == "user":
                bad, is_set = self._free_text(array, n)
            else:
                bad, is_set, accepted[column] = self._enumerated(array, n, check)
            need |= bad
            sets[column] = is_set
        for column, array in cols.items():
            if column == "params" or column.startswith(PARAM_PREFIX):
                need |= self._extra_set(array, n)
        id_first, id_text = self._ids(cols["id"], rows, need) if "id" in cols else (None, None)
        images = np.ones(n, dtype=np.int64)
        if "n" in values:
            wanted = sets["n"] & (values["n"] != 0)
            images[wanted] = values["n"][wanted]
        return CheckedBatch(
            batch=batch,
            rows=rows,
            need=need,
            sets=sets,
            values=values,
            accepted=accepted,
            id_first=id_first,
            id_text=id_text,
            images=images,
        )

    @property
    def validator(self) -> RowValidator:
        return self._validator

    def _int_range(self, column: str) -> tuple[int, int] | None:
        """The range of an integer column (as the per-row checks have it), else None."""
        if column == "n":
            return self._profile.min_n, self._profile.max_n
        if column == "output_compression":
            return spec.MIN_COMPRESSION, spec.MAX_COMPRESSION
        if column == "seed":
            return MIN_SEED, MAX_SEED
        return None

    # --- the checks: each returns the rows the per-row path must see -----------------------

    def _prompt(self, array: pa.Array, n: int) -> Mask:
        text = _text(array)
        if text is None:
            return np.ones(n, dtype=bool)
        short = _np(pc.less_equal(pc.utf8_length(text), self._profile.max_prompt_chars))
        return ~(_clean(text) & short)

    def _source_ok(self, text: pa.Array) -> Mask:
        """Sources `SourceBase.resolve` certainly accepts (of clean text)."""
        scheme = _matches(text, _SCHEME)
        plain = ~scheme
        if self._s3_base:
            # Only `..` (or a leading `.`) can lead outside the bucket.
            plain &= ~_has(text, "..") & ~_np(pc.starts_with(text, "."))
        http = (
            _matches(text, _HTTP)
            & _np(pc.string_is_ascii(text))
            & ~_has(text, "[")
            & ~_has(text, "]")
        )
        s3 = _matches(text, _S3)
        ok: Mask = ~_has(text, "\x00") & (plain | http | s3)
        return ok

    def _sources(self, image: pa.Array | None, images: pa.Array | None, n: int) -> Mask:
        one_unset = np.ones(n, dtype=bool)
        one_ok = np.zeros(n, dtype=bool)
        text = None if image is None else _text(image)
        if image is not None and text is None and not pa.types.is_null(image.type):
            return np.ones(n, dtype=bool)
        if text is not None:
            one_unset = _unset(text)
            single = self._validator.count_problem(1) is None
            one_ok = (
                _clean(text)
                & ~_has(text, "|")
                & ~_np(pc.starts_with(text, "["))
                & self._source_ok(text)
                & single
            )
        many_unset = np.ones(n, dtype=bool)
        many_ok = np.zeros(n, dtype=bool)
        if images is not None:
            many_unset, many_ok = self._images(images, n)
        ok = (one_ok & many_unset) | (one_unset & many_ok)
        return ~ok

    def _images(self, array: pa.Array, n: int) -> tuple[Mask, Mask]:
        """(unset, certainly valid) of an `images` column: `a|b` text or a list of text."""
        t = array.type
        if pa.types.is_dictionary(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
            text = _text(array)
            assert text is not None
            unset = _unset(text)
            lists = pc.split_pattern(text, "|")
            whole_ok = _clean(text) & ~_np(pc.starts_with(text, "["))
        elif pa.types.is_list(t) or pa.types.is_large_list(t):
            lists = array
            unset = _np(pc.or_kleene(pc.is_null(array), pc.equal(pc.list_value_length(array), 0)))
            whole_ok = np.ones(n, dtype=bool)
        elif pa.types.is_null(t):
            return np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
        else:
            return _np(pc.is_null(array)), np.zeros(n, dtype=bool)
        items = pc.list_flatten(lists)
        parents = np.asarray(pc.list_parent_indices(lists).to_numpy(zero_copy_only=False))
        item_text = _text(items)
        if item_text is None:
            return unset, np.zeros(n, dtype=bool)
        item_bad = ~(_clean(item_text) & self._source_ok(item_text))
        bad_items = np.bincount(parents[item_bad], minlength=n)[:n] > 0
        count = np.asarray(
            pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
        )
        profile = self._profile
        counted = (count >= max(1, profile.min_images)) & (count <= profile.max_images)
        return unset, ~unset & whole_ok & ~bad_items & counted

    def _mask(self, array: pa.Array) -> Mask:
        text = _text(array)
        if text is None:
            return ~_np(pc.is_null(array))
        unset = _unset(text)
        if not self._profile.mask.accepted:
            return ~unset
        return ~unset & ~(_clean(text) & self._source_ok(text))

    def _ints(self, array: pa.Array, n: int, low: int, high: int) -> tuple[Mask, Mask, Ints]:
        """(needs the per-row path, set, value) of an integer column."""
        t = array.type
        if pa.types.is_dictionary(t):
            array = array.dictionary_decode()
            t = array.type
        values = np.zeros(n, dtype=np.int64)
        if pa.types.is_null(t):
            return np.zeros(n, dtype=bool), np.zeros(n, dtype=bool), values
        text = _text(array)
        if text is not None:
            unset = _unset(text)
            ok = _matches(text, _DIGITS)
            digits = pc.if_else(pa.array(ok), text, "0")
            parsed = np.asarray(digits.cast(pa.int64()).to_numpy(zero_copy_only=False))
        elif pa.types.is_integer(t):
            unset = _np(pc.is_null(array))
            ok = ~unset
            if pa.types.is_unsigned_integer(t):
                ok &= ~_np(pc.greater(array, pa.scalar(_INT64_MAX, pa.uint64())))
            safe = pc.if_else(pa.array(ok), array, pa.scalar(0, t)).cast(pa.int64())
            parsed = np.asarray(pc.fill_null(safe, 0).to_numpy(zero_copy_only=False))
        elif pa.types.is_floating(t):
            unset = _np(pc.is_null(array))
            as_float = array.cast(pa.float64())
            ok = (
                ~unset
                & _np(pc.is_finite(as_float))
                & _np(pc.equal(pc.floor(as_float), as_float))
                & _np(pc.less_equal(pc.abs(as_float), _MAX_EXACT_FLOAT))
            )
            safe = pc.if_else(pa.array(ok), as_float, 0.0)
            parsed = np.asarray(pc.fill_null(safe, 0.0).to_numpy(zero_copy_only=False)).astype(
                np.int64
            )
        else:
            is_null = _np(pc.is_null(array))
            return ~is_null, np.zeros(n, dtype=bool), values
        ok &= (parsed >= low) & (parsed <= high)
        values[ok] = parsed[ok]
        return ~unset & ~ok, ok, values

    def _free_text(self, array: pa.Array, n: int) -> tuple[Mask, Mask]:
        text = _text(array)
        if text is None:
            is_null = _np(pc.is_null(array))
            return ~is_null, np.zeros(n, dtype=bool)
        unset = _unset(text)
        clean = _clean(text)
        return ~unset & ~clean, ~unset & clean

    def _enumerated(self, array: pa.Array, n: int, check: Any) -> tuple[Mask, Mask, dict[str, Any]]:
        """A column whose (remembered) check is run once per distinct value of the batch;
        also each accepted value's checked form."""
        text = _text(array)
        if text is None:
            is_null = _np(pc.is_null(array))
            return ~is_null, np.zeros(n, dtype=bool), {}
        unset = _unset(text)
        bad: list[str] = []
        empty: list[str] = []
        accepted: dict[str, Any] = {}
        for value in pc.unique(text).to_pylist():
            if value is None or value == "":
                continue
            result, reason = check(value)
            if reason is not None:
                bad.append(value)
            elif result is None:
                empty.append(value)
            else:
                accepted[value] = result
        need = _np(pc.is_in(text, value_set=pa.array(bad, pa.string())))
        blank = _np(pc.is_in(text, value_set=pa.array(empty, pa.string())))
        return need, ~unset & ~need & ~blank, accepted

    def _extra_set(self, array: pa.Array, n: int) -> Mask:
        """Provider extras are left to the per-row path: rows that set any."""
        text = _text(array)
        if text is not None:
            return ~_unset(text)
        if pa.types.is_null(array.type):
            return np.zeros(n, dtype=bool)
        return ~_np(pc.is_null(array))

    def _ids(self, array: pa.Array, rows: Ints, need: Mask) -> tuple[Ints, pa.Array | None]:
        """Every row's id remembered in order; rows with a repeated id, an id to fix or one
        read by the per-row rules are marked in `need` (in place). Returns, for each row, the
        first row with its id, and the ids as text (None when the column is not text)."""
        n = len(rows)
        if pa.types.is_dictionary(array.type):
            array = array.dictionary_decode()
        t = array.type
        if pa.types.is_integer(t):
            array = array.cast(pa.string())
        text = _text(array)
        if text is None and pa.types.is_null(t):
            text = pa.nulls(n, pa.string())
        cells: list[Any] | None = None
        if text is None:
            cells = array.to_pylist()
            encoded: list[bytes | None] = [None] * n
            quick = np.zeros(n, dtype=bool)
            unset = np.zeros(n, dtype=bool)
        else:
            unset = _unset(text)
            quick = (
                _clean(text)
                & _np(pc.less_equal(pc.utf8_length(text), MAX_ID_CHARS))
                & ~_matches(text, _BAD_ID_CHARS)
                & ~_np(pc.is_in(text, value_set=pa.array([".", ".."])))
            )
            encoded = text.cast(pa.binary()).to_pylist()
        registered = np.ones(n, dtype=bool)
        slow = ~unset & ~quick
        for index in np.flatnonzero(unset).tolist():
            encoded[index] = f"row-{rows[index]}".encode()
        for index in np.flatnonzero(slow).tolist():
            value = cells[index] if cells is not None else text[index].as_py()  # type: ignore[index]
            cell = cell_text(value)
            if cell is None:
                encoded[index] = f"row-{rows[index]}".encode()
                continue
            try:
                check_id(cell)
            except CellProblem:
                registered[index] = False
                continue
            encoded[index] = cell.encode("utf-8", "surrogatepass")
        need |= slow
        first = rows.copy()
        if registered.all():
            keys = SeenIds.digests(encoded)
        else:
            keys = SeenIds.digests(compress(encoded, registered.tolist()))
        first[registered] = self._seen.first_rows(keys, rows[registered])
        need |= first != rows
        return first, text

    def slow(self, checked: CheckedBatch) -> Iterator[ParsedRow]:
        """The rows the batch checks did not pass, validated by the per-row path, in order
        (lazily: one row's objects at a time, as the per-row pass had them)."""
        batch, id_first = checked.batch, checked.id_first
        indices = np.flatnonzero(checked.need)
        if not len(indices):
            return iter(())
        names = list(batch.columns)
        arrays = list(batch.columns.values())
        if len(indices) < batch.length:
            taken = pa.array(indices)
            arrays = [array.take(taken) for array in arrays]
        columns = [array.to_pylist() for array in arrays]
        firsts: list[int | None] = (
            [None] * len(indices) if id_first is None else id_first[indices].tolist()
        )
        validate = self._validator.validate
        problems = batch.problems
        first_row = batch.row
        return (
            validate(
                first_row + index,
                dict(zip(names, values, strict=True)),
                problems.get(index, ()),
                id_first=first,
            )
            for index, first, values in zip(
                indices.tolist(), firsts, zip(*columns, strict=True), strict=True
            )
        )
