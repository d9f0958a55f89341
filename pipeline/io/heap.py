"""glibc's malloc set for a long run: large blocks mapped and unmapped, not kept in the heap."""

from __future__ import annotations

import ctypes
import os

# glibc starts mapping blocks of 128 kB and more, but raises that threshold (up to 32 MB)
# each time a mapped block is freed: after the first request bodies and decoded images, such
# blocks come from the heap, between small objects that live on, and the heap grows by
# fragmentation however little is in use. Fixing the threshold (which also stops the dynamic
# trim threshold) maps them every time. Measured on the 2-core VM, 2026-12-01, the runner
# editing 100,000 rows in one process: heap 68 -> 105 MB and peak RSS 236 MB with glibc's
# default; heap 54 -> 70 MB and peak 220 MB with the threshold fixed, no slower (451 against
# 467 s).
MMAP_THRESHOLD_BYTES = 128 * 1024
# glibc reads this at start-up: a process started with it set has made its own choice.
ENV = "MALLOC_MMAP_THRESHOLD_"
_M_MMAP_THRESHOLD = -3  # malloc.h


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # not a GNU libc
        return False


def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES; True if it was set here (False on
    another libc, or when the environment chose)."""
    if ENV in os.environ or not is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # this process's own glibc
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
