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
# Seconds to fetch one http(s) source image before its row fails.
DEFAULT_HTTP_TIMEOUT_S = 30.0
# How long a claim or an open marker lives without renewal (see pipeline.engine.claims).
DEFAULT_LEASE_S = 90.0
# The Prefect global concurrency limit every run and worker shares.
DEFAULT_LIMIT_NAME = "imgedit-api"

# --- what the API answers is capped -----------------------------------------------------

# A reported cost over this many times the list price of the images asked is absurd: a
# gateway bug or a lie, never counted against a budget.
MAX_TRUSTED_COST_FACTOR = 100.0

# Caps on text the API sends back, applied before it reaches sidecars, tables or logs.
MAX_API_TEXT_CHARS = 8192  # revised_prompt, error messages
# ids, error codes, provider and model names, currency, request ids, sizes, output formats
MAX_API_SHORT_TEXT_CHARS = 256
MAX_METADATA_JSON_CHARS = 16_384  # `metadata` of an answer, the body of an error
# A server asking for a longer wait than this is treated as asking for this (the OpenAI
# SDK's cap): one Retry-After must not freeze a run.
MAX_RETRY_AFTER_S = 120.0

# --- model profiles (pipeline.models) ----------------------------------------------------

# A model's `?schema=true` answer is read only this far (bytes), and only this much of it:
# properties, values of one enum, characters of one value, and the bounds a limit may take.
MAX_SCHEMA_BYTES = 1024 * 1024
MAX_SCHEMA_PROPERTIES = 128
MAX_SCHEMA_ENUM_VALUES = 64
MAX_SCHEMA_VALUE_CHARS = 64
MAX_SCHEMA_IMAGES = 64
MAX_SCHEMA_PROMPT_CHARS = 100_000
MAX_SCHEMA_SIDE = 16_384
# A model's price per image read from a schema is believed up to this (USD).
MAX_SCHEMA_PRICE_USD = 10.0
# What a permissive profile (a model whose schema cannot be read) lets through.
PERMISSIVE_MAX_IMAGES = 16
PERMISSIVE_MAX_PROMPT_CHARS = 32_000
# `usage` token counts over this are not believed (a cost from them is not trusted).
MAX_USAGE_TOKENS = 100_000_000
# Models listed by `imgedit models` (each may cost a schema request).
MAX_LISTED_MODELS = 200
