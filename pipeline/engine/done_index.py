"""The done index: which jobs are done under an output, from a few files, not a listing of all.

A sidecar marks a job done (see `layout`), but listing every sidecar costs one request per
1,000 jobs (and on moto, the whole bucket's CPU per request). So each chunk, once its
sidecars are written, also writes a *segment*: a Parquet file of the job keys it committed.
A resume reads the segments instead of listing `jobs/`.

    index/root.json                  the index covers every job (written once, see below)
    index/done/<name>.parquet        a segment: job keys whose sidecars exist
    index/open/<run_id>.<chunk>      a chunk that may have committed jobs no segment holds yet

Safety after a kill: a chunk writes a leased open marker before its first commit, renews it
while it lives (with the claims, see `claims`), and deletes it after its last segment. A
chunk indexes its committed jobs every few seconds and only then gives back their claims, so
a job committed but not yet indexed always has a claim. A run that starts finds dead
markers and dead claims (their lease ran out, or their process is gone from this host),
indexes the jobs whose sidecars those claims point at, and removes both; a live marker or
claim is left alone (its jobs' claims make this run wait for them). A marker without a lease
(an older version's) still makes a run check each job missing from the index for its sidecar
before editing it, as does any marker when the store cannot do claims.
`rebuild_index` (`imgedit reindex`) lists every sidecar, on the user's word that no run is
writing to the output, and clears every marker and claim.

An output without `index/root.json` (written before the index existed, or by a run that did
not finish its first listing) is listed in full once; the listing becomes a segment and the
root is written, so later runs read the index.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.engine import layout
from pipeline.engine.claims import CLAIMS_PREFIX, PROBE_PREFIX, LeaseBody, dead_claims
from pipeline.engine.done_keys import DoneKeys
from pipeline.engine.results import table_to_parquet_bytes, utcnow
from pipeline.errors import StorageError, StorageNotFound
from pipeline.io.arrow_memory import release_arrow_memory
from pipeline.io.storage import DEFAULT_LIST_WORKERS, Storage

log = logging.getLogger(__name__)

INDEX_PREFIX = "index/"
SEGMENTS_PREFIX = f"{INDEX_PREFIX}done/"
OPEN_PREFIX = f"{INDEX_PREFIX}open/"
# Jobs whose dead claims were cleared without a result: whoever edits one may pay twice.
ORPHANS_PREFIX = f"{INDEX_PREFIX}orphans/"
ROOT_KEY = f"{INDEX_PREFIX}root.json"
SEGMENT_SUFFIX = ".parquet"
INDEX_VERSION = 1
# Above this many segments a reader merges them into one. Each chunk that edits leaves one
# (100 for a run of 100k rows at the default chunk size); reading 128 in parallel costs
# about as much as listing 16 pages.
COMPACT_AT = 128
# A concurrent compaction can delete a segment between our listing and our read: list again.
READ_ATTEMPTS = 3
# Listing shards of the job sidecars: the first hex digit of the job key.
JOB_KEY_SHARDS: tuple[str, ...] = tuple("0123456789abcdef")
SEGMENT_SCHEMA = pa.schema([pa.field("job_key", pa.string(), nullable=False)])


@dataclass
class DoneJobs:
    """The jobs done under an output when a run starts, and how far to trust their absence."""

    # Compact (16 bytes a key, see done_keys): a resume of a million jobs holds them all.
    keys: DoneKeys
    # Some chunk may have committed jobs no segment holds: check the sidecar of a job
    # missing from `keys` before editing it.
    check_unindexed: bool = False
    # "index", or "listing" when the sidecars had to be listed (no index root yet).
    source: str = "index"
    # Open chunks of other runs that may still be writing (live, or without a lease).
    open_chunks: int = 0
    # Jobs that dead chunks had committed without indexing, found and indexed now.
    recovered: int = 0
    # Jobs whose dead claims were cleared without a stored result: their holder (a killed run
    # or host) may have paid for them, so editing them now may pay twice.
    orphaned: set[str] = field(default_factory=set)
    # With `load_done(compact_later=True)` and more than COMPACT_AT segments: writes their
    # merged segment (already encoded) and deletes them, for the caller to run when it likes.
    merge: Callable[[], None] | None = None


def segment_key(name: str) -> str:
    return f"{SEGMENTS_PREFIX}{layout.check_run_id(name)}{SEGMENT_SUFFIX}"


def chunk_segment_key(run_id: str, chunk: int, seq: int = 0) -> str:
    return segment_key(f"{layout.check_run_id(run_id)}.{chunk:06d}.{seq:04d}")


def open_marker_key(run_id: str, chunk: int) -> str:
    return f"{OPEN_PREFIX}{layout.check_run_id(run_id)}.{chunk:06d}"


def segment_bytes(job_keys: Iterable[str] | DoneKeys) -> bytes:
    # A DoneKeys (a merge of every segment) sorts and encodes itself without a Python string
    # per key; a chunk's few thousand keys go through a set.
    keys = job_keys.to_arrow() if isinstance(job_keys, DoneKeys) else sorted(set(job_keys))
    table = pa.table({"job_key": pa.array(keys, pa.string())}, SEGMENT_SCHEMA)
    return table_to_parquet_bytes(table)


def read_segment(data: bytes) -> list[str]:
    keys: list[str] = read_segment_column(data).to_pylist()
    return keys


def read_segment_column(data: bytes) -> pa.ChunkedArray:
    """A segment's job keys as Arrow strings (no Python object per key)."""
    return pq.read_table(pa.BufferReader(data), columns=["job_key"]).column(0)


def write_segment(storage: Storage, key: str, job_keys: Iterable[str] | DoneKeys) -> None:
    storage.put_bytes(key, segment_bytes(job_keys), "application/vnd.apache.parquet")


def mark_open(storage: Storage, run_id: str, chunk: int, body: bytes | None = None) -> None:
    """The chunk's open marker: `body` is a leased one (see claims), renewed while it lives."""
    if body is None:
        legacy = {"run_id": run_id, "chunk": chunk, "opened_at": utcnow().isoformat()}
        body = json.dumps(legacy).encode()
    storage.put_bytes(open_marker_key(run_id, chunk), body, "application/json")


def write_chunk_segment(
    storage: Storage, run_id: str, chunk: int, seq: int, committed: Sequence[str]
) -> bool:
    """Index jobs a chunk committed. False when the segment could not be written: the chunk's
    marker and the jobs' claims then stay, and later runs find the jobs through them."""
    try:
        write_segment(storage, chunk_segment_key(run_id, chunk, seq), committed)
    except StorageError as exc:
        log.warning("chunk %d: cannot index %d jobs (%s)", chunk, len(committed), exc)
        return False
    finally:
        # Run in one of the run's I/O threads: with mimalloc what Arrow freed here would
        # stay in this thread's heap, one more heap a thread (see arrow_memory).
        release_arrow_memory()
    return True


def close_marker(storage: Storage, run_id: str, chunk: int) -> None:
    try:
        storage.delete(open_marker_key(run_id, chunk))
    except StorageError as exc:
        log.warning("chunk %d: cannot remove its open marker (%s)", chunk, exc)


def list_sidecars(storage: Storage) -> set[str]:
    """Job keys whose sidecar exists, from 16 listings in parallel (no request per row).

    One listing per first hex digit of the key (`jobs/0`...`jobs/f`): 16 requests for a
    small store, pages of 1000 in parallel for a large one. A single paginated listing of
    100k sidecars is 100 sequential requests (on moto each one also sorts the whole bucket).
    """
    done: set[str] = set()
    for key in storage.list_keys_sharded(layout.JOBS_PREFIX, shards=JOB_KEY_SHARDS):
        job = layout.job_key_of_sidecar(key)
        if job:
            done.add(job)
    return done


def _read_segments(
    storage: Storage, keys: Sequence[str], workers: int = DEFAULT_LIST_WORKERS
) -> DoneKeys:
    if not keys:
        return DoneKeys()
    with ThreadPoolExecutor(max(1, min(workers, len(keys))), "index-read") as pool:
        columns = list(pool.map(lambda k: read_segment_column(storage.get_bytes(k)), keys))
    # Decoded all at once: about 36 bytes a key while read, 16 once decoded.
    return DoneKeys.from_arrays(columns)


def _list_index(storage: Storage) -> tuple[list[str], list[str], bool]:
    segments, markers, rooted = [], [], False
    for key in storage.list_keys(INDEX_PREFIX):
        if key == ROOT_KEY:
            rooted = True
        elif key.startswith(SEGMENTS_PREFIX) and key.endswith(SEGMENT_SUFFIX):
            segments.append(key)
        elif key.startswith(OPEN_PREFIX):
            markers.append(key)
    return sorted(segments), markers, rooted


@dataclass
class _Markers:
    live: list[str]
    dead: list[tuple[str, str]]  # (key, etag)
    legacy: list[str]  # written by a version without leases: alive or dead, nobody knows


def _classify(storage: Storage, markers: Sequence[str]) -> _Markers:
    out = _Markers([], [], [])
    for key in markers:
        try:
            data, etag = storage.get_with_etag(key)
        except StorageNotFound:
            continue  # its chunk ended meanwhile
        body = LeaseBody.decode(data)
        if body is None:
            out.legacy.append(key)
        elif body.dead():
            out.dead.append((key, etag))
        else:
            out.live.append(key)
    return out


def _recover_dead(
    storage: Storage, dead_markers: Sequence[tuple[str, str]]
) -> tuple[set[str], set[str]]:
    """Index the jobs dead holders committed (found through their dead claims), then clear
    the dead claims and markers; the jobs recovered, and those left without a result. A live
    marker or claim is never touched."""
    recovered: set[str] = set()
    orphaned: set[str] = set()
    claims = dead_claims(storage)
    for _key, job, _etag in claims:
        if job is None:
            continue
        if storage.exists(layout.sidecar_key(job)):
            recovered.add(job)
        else:
            orphaned.add(job)
    if recovered:
        write_segment(storage, segment_key(_new_segment_name("recovered")), recovered)
    if orphaned:
        # Kept in storage before the claims go: whichever run edits these jobs (another
        # shard restarted at the same time, a later run) counts the possible double charge,
        # not only the run that happened to clear them.
        record = "\n".join(sorted(orphaned)).encode()
        storage.put_bytes(f"{ORPHANS_PREFIX}{_new_segment_name('orphans')}.txt", record)
    for key, _job, etag in claims:
        storage.delete_if_match(key, etag)
    for key, etag in dead_markers:
        storage.delete_if_match(key, etag)
    if claims or dead_markers:
        log.info(
            "cleared %d dead claims and %d dead open markers under %s; %d of their jobs were "
            "done and are now indexed",
            len(claims),
            len(dead_markers),
            storage.root_uri,
            len(recovered),
        )
    return recovered, orphaned


def _recorded_orphans(storage: Storage) -> dict[str, set[str]]:
    """Every job a cleared dead claim left without a result, as recorded under ORPHANS_PREFIX,
    by the record naming it."""
    records: dict[str, set[str]] = {}
    for key in storage.list_keys(ORPHANS_PREFIX):
        try:
            text = storage.get_bytes(key).decode("utf-8", "replace")
        except StorageNotFound:  # pruned by another run meanwhile
            continue
        records[key] = {j for j in text.split() if layout.is_job_key(j)}
    return records


def _prune_orphan_records(
    storage: Storage, records: Mapping[str, set[str]], done: DoneKeys
) -> None:
    """Delete the records whose every job is done: a done job is never edited again, so what
    they warn of (a possible double charge) can no longer happen. Without this every run
    would read every record an output ever had."""
    spent = [key for key, jobs in records.items() if all(job in done for job in jobs)]
    try:
        _delete_all(storage, spent)
    except StorageError as exc:  # read again next time: slower, never wrong
        log.warning("cannot remove %d spent orphan records: %s", len(spent), exc)


def _write_root(storage: Storage, how: str) -> None:
    body = {"version": INDEX_VERSION, "created_at": utcnow().isoformat(), "from": how}
    storage.put_bytes(ROOT_KEY, json.dumps(body).encode(), "application/json")


def _new_segment_name(what: str) -> str:
    return f"{what}-{utcnow():%Y%m%dT%H%M%S}-{secrets.token_hex(4)}"


def _compact(storage: Storage, segments: Sequence[str], jobs: DoneKeys) -> None:
    _write_merged(storage, segments, segment_bytes(jobs))


def _write_merged(storage: Storage, segments: Sequence[str], merged: bytes) -> None:
    try:
        storage.put_bytes(
            segment_key(_new_segment_name("merged")), merged, "application/vnd.apache.parquet"
        )
        # Only now: a reader in between sees a job twice, never not at all.
        _delete_all(storage, segments)
    except StorageError as exc:  # the index stays correct, only slower to read
        log.warning("cannot merge %d index segments: %s", len(segments), exc)


def _delete_all(storage: Storage, keys: Sequence[str]) -> None:
    # One DeleteObjects per 1,000 keys on S3: a thousand single deletes cost the run ~3 ms
    # of botocore CPU each, beside rows that need the GIL.
    if keys:
        storage.delete_many(keys)


def load_done(storage: Storage, *, claims: bool = True, compact_later: bool = False) -> DoneJobs:
    """The jobs done under `storage`'s output, from its index (built first if missing).

    With `claims` (the run claims its jobs), dead chunks are cleaned up here: the jobs their
    dead claims committed are indexed, and dead claims and markers removed; live ones need
    nothing, as their jobs' claims make this run wait for them. Without claims (a store
    without conditional writes), any marker means each job missing from the index must be
    checked for its sidecar first (`check_unindexed`), as must a marker without a lease.
    With `compact_later`, segments to merge are merged by `DoneJobs.merge` (a run calls it
    beside its rows: a thousand deletes need not hold them up), not here.
    """
    for attempt in range(READ_ATTEMPTS):
        segments, markers, rooted = _list_index(storage)
        try:
            indexed = _read_segments(storage, segments)
            break
        except StorageNotFound:
            if attempt == READ_ATTEMPTS - 1:
                raise
            log.info("an index segment went away while read (merged by another run); again")
    found = _classify(storage, markers)
    recovered, orphaned = _recover_dead(storage, found.dead) if claims else (set(), set())
    records = _recorded_orphans(storage)
    for jobs in records.values():
        orphaned |= jobs
    check = bool(found.legacy) or (not claims and bool(found.dead or found.live))
    others = len(found.live) + len(found.legacy) + (0 if claims else len(found.dead))
    if not rooted:
        listed = list_sidecars(storage)
        log.info("no done index under %s: listed %d sidecars", storage.root_uri, len(listed))
        new = {job for job in listed if job not in indexed}
        if new:
            write_segment(storage, segment_key(_new_segment_name("listing")), new)
        _write_root(storage, "listing")
        _add_all(indexed, listed | recovered)
        _prune_orphan_records(storage, records, indexed)
        return DoneJobs(
            indexed, check, "listing", others, len(recovered), _not_in(orphaned, indexed)
        )
    merge = None
    if len(segments) > COMPACT_AT:
        if compact_later:
            # Encoded now, before the run adds keys to `indexed`.
            merge = partial(_write_merged, storage, segments, segment_bytes(indexed))
        else:
            _compact(storage, segments, indexed)
    _add_all(indexed, recovered)
    _prune_orphan_records(storage, records, indexed)
    orphans = _not_in(orphaned, indexed)
    return DoneJobs(indexed, check, "index", others, len(recovered), orphans, merge)


def _add_all(done: DoneKeys, more: Iterable[str]) -> None:
    for job in more:
        done.add(job)


def _not_in(jobs: set[str], done: DoneKeys) -> set[str]:
    return {job for job in jobs if job not in done}


def rebuild_index(storage: Storage) -> DoneJobs:
    """List every sidecar, replace the index with that listing and clear every open marker.

    Only when no run is writing to the output: a live chunk's marker would be cleared too.
    """
    segments, markers, _ = _list_index(storage)
    claims = [k for k in storage.list_keys(CLAIMS_PREFIX) if not k.startswith(PROBE_PREFIX)]
    listed = list_sidecars(storage)
    write_segment(storage, segment_key(_new_segment_name("rebuilt")), listed)
    _write_root(storage, "rebuild")
    _delete_all(storage, [*segments, *markers, *claims])
    return DoneJobs(DoneKeys(listed), False, "listing", 0)
