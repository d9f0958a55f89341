"""Source digests kept in the output store: a run knows a source's SHA-256 from its version (a
stat, an S3 HEAD) without reading it, so a resume of rows that each have their own source
does not read every source again to find its job done.

A job key is derived from the sources' bytes (`engine.jobkey`), so without this a resume reads
and hashes every source whose bytes it has not seen in this process: for a catalogue of a
million products, a million GETs before the first row is known done. Each run files the
digest of every source it reads under (URI, version), version being what changes whenever
the bytes do (`UriReader.aversion`: size, mtime, ctime, inode and device of a local file; the
ETag and size of an S3 object; http(s) sources have none and are always read):

    index/sources/<run>.<chunk>.<seq>.parquet    fingerprint (16 bytes), sha256 (32 bytes)

A fingerprint is a 128-bit BLAKE2b of the URI and the version. It is a cache: a segment that
is missing, unreadable or malformed is skipped, and a source it does not know is read as
before. It is used only to find a job done (`runner`): a row whose job is not done reads its
sources as it always did, so a stale digest can never send wrong bytes, and a digest is
filed only with the version taken before the bytes were read.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine.results import table_to_parquet_bytes
from pipeline.errors import StorageError
from pipeline.io.storage import DEFAULT_LIST_WORKERS, Storage

log = logging.getLogger(__name__)

PREFIX = "index/sources/"
SUFFIX = ".parquet"
FINGERPRINT_BYTES = 16
DIGEST_BYTES = 32
SCHEMA = pa.schema(
    [
        pa.field("fingerprint", pa.binary(FINGERPRINT_BYTES), nullable=False),
        pa.field("sha256", pa.binary(DIGEST_BYTES), nullable=False),
    ]
)
# Above this many segments a run that loads them writes them as one and deletes the rest.
COMPACT_AT = 128
# At most this many digests are held (48 bytes each): past it, segments are left unread.
MAX_DIGESTS = 10_000_000
# Asking sources' versions costs a stat or an S3 HEAD a row. A run that finds few of its jobs
# done that way (a re-edit with a new prompt over sources the output knows) stops asking once
# it has asked this many rows and fewer than USEFUL_SHARE of them were found done.
TRIES_BEFORE_JUDGING = 256
USEFUL_SHARE = 0.1

Fingerprints = npt.NDArray[np.uint64]


def fingerprint(uri: str, version: str) -> bytes:
    return hashlib.blake2b(
        f"{uri}\0{version}".encode("utf-8", "surrogatepass"), digest_size=FINGERPRINT_BYTES
    ).digest()


class SourceDigests:
    """The digests an output knows (sorted arrays, 48 bytes each) and those this run read,
    until a chunk files them."""

    def __init__(self, fingerprints: bytes = b"", digests: bytes = b"") -> None:
        count = len(fingerprints) // FINGERPRINT_BYTES
        pairs = np.frombuffer(fingerprints, dtype="<u8").reshape(count, 2)
        shas = np.frombuffer(digests, dtype=np.uint8).reshape(count, DIGEST_BYTES)
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        self._high: Fingerprints = pairs[order, 0].astype(np.uint64)
        self._low: Fingerprints = pairs[order, 1].astype(np.uint64)
        self._shas = shas[order]
        self._new: dict[bytes, bytes] = {}
        self.segments: list[str] = []  # the keys they were read from
        self.hits = 0  # rows found done from here (for the run's log)
        self.tries = 0  # rows whose sources' versions were asked

    def worth_asking(self) -> bool:
        """Whether a row should ask its sources' versions: some digests are known, and the
        rows that asked so far were found done often enough to pay for the asking."""
        if not len(self._high):
            return False
        return self.tries < TRIES_BEFORE_JUDGING or self.hits >= USEFUL_SHARE * self.tries

    def __len__(self) -> int:
        return len(self._high)

    def get(self, uri: str, version: str) -> str | None:
        """The SHA-256 (hex) of the source at `uri` as of `version`, if known."""
        if not len(self._high):
            return None
        fp = np.frombuffer(fingerprint(uri, version), dtype="<u8")
        high, low = np.uint64(fp[0]), np.uint64(fp[1])
        at = int(np.searchsorted(self._high, high))
        while at < len(self._high) and self._high[at] == high:
            if self._low[at] == low:
                return bytes(self._shas[at]).hex()
            at += 1
        return None

    def add(self, uri: str, version: str, sha256: str) -> None:
        """A source this run read: filed with the next segment a chunk writes."""
        self._new[fingerprint(uri, version)] = bytes.fromhex(sha256)

    def table(self) -> pa.Table:
        """Every digest read from the output, as a segment's table (built from the arrays,
        not a Python object a digest: a million merge in tens of MB)."""
        pairs = np.empty((len(self._high), 2), dtype="<u8")
        pairs[:, 0], pairs[:, 1] = self._high, self._low
        count = len(pairs)
        fps = pa.Array.from_buffers(
            pa.binary(FINGERPRINT_BYTES), count, [None, pa.py_buffer(pairs.tobytes())]
        )
        shas = pa.Array.from_buffers(
            pa.binary(DIGEST_BYTES), count, [None, pa.py_buffer(self._shas.tobytes())]
        )
        return pa.table([fps, shas], schema=SCHEMA)

    def take_new(self) -> dict[bytes, bytes]:
        new, self._new = self._new, {}
        return new


def segment_bytes(entries: dict[bytes, bytes]) -> bytes:
    """A segment of the digests a run read (fingerprint -> SHA-256)."""
    table = pa.table(
        [
            pa.array(list(entries), pa.binary(FINGERPRINT_BYTES)),
            pa.array(list(entries.values()), pa.binary(DIGEST_BYTES)),
        ],
        schema=SCHEMA,
    )
    return table_to_parquet_bytes(table)


def write_segment(storage: Storage, name: str, entries: dict[bytes, bytes]) -> bool:
    """File `entries` as one segment; False (and a warning) when it cannot be written: a
    later run reads those sources again, nothing else."""
    if not entries:
        return True
    try:
        storage.put_bytes(f"{PREFIX}{name}{SUFFIX}", segment_bytes(entries))
    except StorageError as exc:
        log.warning("source digests not kept (%s): a later run reads those sources again", exc)
        return False
    return True


def _fixed_bytes(column: pa.ChunkedArray, width: int) -> bytes:
    """The values of a fixed-size binary column, end to end."""
    array = column.combine_chunks()
    if array.null_count:
        raise ValueError("null values")
    data = array.buffers()[1]
    if data is None:
        return b""
    start = array.offset * width
    values: bytes = data.to_pybytes()[start : start + len(array) * width]
    return values


def _read_segment(storage: Storage, key: str) -> tuple[bytes, bytes] | None:
    try:
        table = pq.read_table(pa.BufferReader(storage.get_bytes(key)))
        if not table.schema.equals(SCHEMA):
            raise ValueError(f"schema {table.schema}")
        fps = _fixed_bytes(table.column("fingerprint"), FINGERPRINT_BYTES)
        shas = _fixed_bytes(table.column("sha256"), DIGEST_BYTES)
    except (StorageError, pa.ArrowException, ValueError, OSError) as exc:
        log.warning("source digests %s skipped: %s", key, exc)
        return None
    return fps, shas


def load(storage: Storage, workers: int = DEFAULT_LIST_WORKERS) -> SourceDigests:
    """Every digest the output keeps (none when it keeps none or cannot be listed)."""
    try:
        keys = sorted(k for k in storage.list_keys(PREFIX) if k.endswith(SUFFIX))
    except StorageError as exc:
        log.warning("source digests not read (%s): every source is read", exc)
        return SourceDigests()
    if not keys:
        return SourceDigests()
    with ThreadPoolExecutor(max(1, min(workers, len(keys)))) as pool:
        read = list(pool.map(lambda k: _read_segment(storage, k), keys))
    fps: list[bytes] = []
    shas: list[bytes] = []
    count = 0
    used: list[str] = []
    for key, got in zip(keys, read, strict=True):
        if got is None:
            continue
        n = len(got[0]) // FINGERPRINT_BYTES
        if count + n > MAX_DIGESTS:
            log.warning("more than %d source digests: the rest are left unread", MAX_DIGESTS)
            break
        fps.append(got[0])
        shas.append(got[1])
        used.append(key)
        count += n
    digests = SourceDigests(b"".join(fps), b"".join(shas))
    digests.segments = used
    return digests


def compact(storage: Storage, digests: SourceDigests) -> None:
    """Past COMPACT_AT segments, write what was read as one and delete the segments it
    came from (a run reading one meanwhile skips it: a cache)."""
    if len(digests.segments) <= COMPACT_AT:
        return
    key = f"{PREFIX}merged-{secrets.token_hex(8)}{SUFFIX}"
    try:
        storage.put_bytes(key, table_to_parquet_bytes(digests.table()))
    except StorageError as exc:
        log.warning("source digests not merged (%s)", exc)
        return
    try:
        storage.delete_many(digests.segments)
    except StorageError as exc:
        log.warning("source digests not deleted after merging: %s", exc)


__all__ = [
    "COMPACT_AT",
    "PREFIX",
    "SourceDigests",
    "compact",
    "fingerprint",
    "load",
    "segment_bytes",
    "write_segment",
]
