"""imgedit's engine: manifest, edit API client, runner and storage, with no orchestrator in it."""

import os

# Arrow picks its allocator once, when pyarrow is imported: set here, before any of it, this
# makes it glibc's malloc rather than mimalloc's heap per thread, unless the environment
# already chose (see pipeline.io.arrow_memory).
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

__version__ = "0.1.0"
