"""Arrow's memory for this process: which allocator it uses, and giving back what it freed."""

from __future__ import annotations

import pyarrow as pa

# Names the pool pyarrow uses; read once, when pyarrow is imported (later changes do nothing:
# `pa.set_memory_pool` changes only pyarrow's own calls, not Parquet's and CSV's C++ work).
# `pipeline/__init__.py` sets it to "system" unless the environment chose: importing any part
# of pipeline before pyarrow (as the CLI, the flows and their workers do) is enough.
#
# Why: pyarrow's wheels default to mimalloc, which keeps a heap per thread and holds on to
# the pages each thread freed. A run does Arrow work now and then in many threads (128 I/O
# threads encode index and digest segments, the plan reads the manifest in its own).
# Measured on the 2-core VM, 2026-12-01: the runner editing 40,000 rows grew from 230 to
# 283 MB with mimalloc (each segment write giving back its thread's pages) and from 203 to
# 213 MB with the system pool; a resume of a million done rows took no longer (30.1 and
# 32.7 s against 32.8 and 33.9 s, alternated).
POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def release_arrow_memory() -> None:
    """Give back to the system the memory Arrow's allocator holds free.

    With mimalloc (a process that imported pyarrow before pipeline, or POOL_ENV=mimalloc)
    that is the calling thread's heap: Arrow work done in each of a run's 128 I/O threads
    left a little in every one (RSS grew ~2 KB an edited row, all of it in mimalloc's arena
    while Arrow's own count of bytes in use stayed under 5 MB). With the system pool it trims
    glibc's heap. Call this after such work, in the thread that did it, once its Arrow
    objects are gone.
    """
    pa.default_memory_pool().release_unused()
