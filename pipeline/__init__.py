"""imgedit's engine: manifest, edit API client, runner and storage, with no orchestrator in it."""

import os

from pipeline.io.heap import fix_mmap_threshold

# Arrow picks its allocator once, when pyarrow is imported: set here, before any of it, this
# makes it glibc's malloc rather than mimalloc's heap per thread, unless the environment
# already chose (see pipeline.io.arrow_memory).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
# And glibc's malloc keeps large blocks out of its heap, so a long run's heap does not grow
# by fragmentation (see pipeline.io.heap).
fix_mmap_threshold()

__version__ = "0.1.0"
