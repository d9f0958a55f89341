"""A run's defaults, in one light module: the CLI's help reads them without importing the engine."""

from __future__ import annotations

# Edit requests in flight at once (a run's own limit; a shared Prefect limit may lower it).
DEFAULT_CONCURRENCY = 16
# Rows per chunk: a chunk is one Prefect task running many rows concurrently.
DEFAULT_CHUNK_SIZE = 1000
# Two chunks in flight share one request limit, so the API stays busy while a chunk drains.
DEFAULT_CHUNKS_IN_FLIGHT = 2
# Attempts per row, the first included, and the time one row may spend retrying.
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_MAX_RETRY_SECONDS = 600.0
# The provider's p95 is 4-7 s; a batch can afford to wait far longer than an interactive app
# before calling an attempt lost, but not the SDK's 600 s.
DEFAULT_TIMEOUT_S = 120.0
# How long a claim or an open marker lives without renewal (see pipeline.engine.claims).
DEFAULT_LEASE_S = 90.0
# The Prefect global concurrency limit every run and worker shares.
DEFAULT_LIMIT_NAME = "imgedit-api"
