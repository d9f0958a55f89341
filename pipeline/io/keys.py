"""Storage keys and listing: what a key may be, and listing many shards at once.

Keys are relative, `/`-separated paths under a storage's root; nothing a key says can reach
outside that root. `ShardedListing` gives a store with `list_keys` a parallel listing of
`prefix + shard` for many shards (job records live under two-hex-character shards).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from pipeline.errors import InvalidKeyError

__all__ = [
    "DEFAULT_LIST_WORKERS",
    "HEX_SHARDS",
    "TEMP_PREFIX",
    "ShardedListing",
    "check_key",
    "check_prefix",
]

# Temp files of in-progress local writes; listing never shows them.
TEMP_PREFIX = ".tmp-"
# Job records are sharded under two-hex-character prefixes (`jobs/ab/<key>.json`).
HEX_SHARDS: tuple[str, ...] = tuple(f"{i:02x}" for i in range(256))
# Parallel list calls for sharded listing: enough to hide S3 latency, few enough not to
# trip request-rate limits (S3 allows thousands of LISTs per second per prefix).
DEFAULT_LIST_WORKERS = 16


def check_key(key: str) -> str:
    """`key` itself if it is a clean relative path, else InvalidKeyError naming the problem."""
    _check_path_text(key, what="key")
    if not key:
        raise InvalidKeyError("empty storage key")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"storage key {key!r} has an empty, '.' or '..' segment")
    if key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
        raise InvalidKeyError(f"storage key {key!r} uses the reserved prefix {TEMP_PREFIX!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: like a key, but may be empty, end with `/` or stop mid-name."""
    _check_path_text(prefix, what="prefix")
    segments = prefix.split("/")
    for segment in segments[:-1]:
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"storage prefix {prefix!r} has an empty, '.' or '..' segment")
    if segments[-1] in (".", ".."):
        raise InvalidKeyError(f"storage prefix {prefix!r} ends with '.' or '..'")
    return prefix


def _check_path_text(text: str, *, what: str) -> None:
    if "\x00" in text:
        raise InvalidKeyError(f"storage {what} contains a NUL character")
    if "\\" in text:
        raise InvalidKeyError(f"storage {what} {text!r} contains a backslash")
    if text.startswith("/"):
        raise InvalidKeyError(f"storage {what} {text!r} is absolute; keys are relative")


def _check_shards(shards: Sequence[str]) -> list[str]:
    ordered = sorted(set(shards))
    for shard in ordered:
        _check_path_text(shard, what="shard")
        if not shard:
            raise InvalidKeyError("empty shard")
    # A shard that prefixes another would list the other's keys twice.
    for a, b in itertools.pairwise(ordered):
        if b.startswith(a):
            raise InvalidKeyError(f"shard {a!r} is a prefix of shard {b!r}")
    return ordered


class ShardedListing:
    """`list_keys_sharded` on top of `list_keys`: one listing per shard in a small pool."""

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        raise NotImplementedError

    def _list_if_small(self, prefix: str) -> list[str] | None:
        """Every key under `prefix` if one request returns them all, else None (no probe)."""
        return None

    def list_keys_sharded(
        self,
        prefix: str,
        shards: Sequence[str] = HEX_SHARDS,
        *,
        workers: int = DEFAULT_LIST_WORKERS,
    ) -> Iterator[str]:
        """Every key under `prefix + shard` for each shard, each once, in no set order.

        Keys under `prefix` that start with none of the shards are not listed. Each shard
        is listed whole in a worker thread; the keys come out shard by shard as they finish.
        A store that returns all of `prefix` in one request (S3: up to 1000 keys) is listed
        with that one request instead of one per shard.
        """
        check_prefix(prefix)
        ordered = _check_shards(shards)
        if not ordered:
            return
        small = self._list_if_small(prefix)
        if small is not None:
            starts = tuple(prefix + shard for shard in ordered)
            yield from (key for key in small if key.startswith(starts))
            return
        pool = ThreadPoolExecutor(
            max_workers=max(1, min(workers, len(ordered))), thread_name_prefix="storage-list"
        )
        try:
            pending: set[Future[list[str]]] = {
                pool.submit(lambda p: list(self.list_keys(p)), prefix + shard) for shard in ordered
            }
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield from fut.result()
        finally:
            # A consumer that stops early (or an error) must not leave listings running.
            pool.shutdown(wait=True, cancel_futures=True)
