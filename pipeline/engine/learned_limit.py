"""The adaptive limit a run ended at, kept in the output store for the next run against the
same API and model to start from (instead of slow start from a few requests).

One small JSON object per API and model under `index/concurrency/`. It is a hint, read
defensively: anything missing, unreadable, too large or out of range is ignored (the run
starts low, as without it), and the value is capped by the new run's ceiling. A run writes it
only when it learned something: adaptive, with enough answers that its limit was tested.
Two runs writing it at once: the last one wins, which is as good a hint as the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import StorageError
from pipeline.io.redact import redact_uri
from pipeline.io.storage import Storage

log = logging.getLogger(__name__)

PREFIX = "index/concurrency/"
VERSION = 1
MAX_BYTES = 4096
# Answers a run's limit must have had before its final value says anything (a resume of done
# rows, or a run of three rows, ends where it started).
MIN_ANSWERS = 32


def learned_key(api_base: str, model: str) -> str:
    """Where the limit learned against this API and model is kept (the key hides the URL)."""
    digest = hashlib.sha256(f"{redact_uri(api_base)}\n{model}".encode()).hexdigest()[:24]
    return f"{PREFIX}{digest}.json"


def read_learned(storage: Storage, api_base: str, model: str) -> int | None:
    """The limit the last run against this API and model ended at, or None."""
    key = learned_key(api_base, model)
    try:
        data = storage.get_bytes(key)
    except StorageError:
        return None  # none yet (or unreadable: start low, as the first run did)
    try:
        if len(data) > MAX_BYTES:
            raise ValueError(f"{len(data)} bytes")
        doc = json.loads(data)
        final = doc["final"] if isinstance(doc, dict) and doc.get("version") == VERSION else None
        if type(final) is not int or final < 1:
            raise ValueError(f"final {final!r}")
    except (ValueError, KeyError) as exc:
        log.warning("ignoring the learned concurrency at %s: %s", storage.uri_for(key), exc)
        return None
    return final


def write_learned(
    storage: Storage, api_base: str, model: str, report: dict[str, Any], run_id: str
) -> bool:
    """Keep an adaptive run's final limit for the next run; False when there was nothing
    learned (fixed, too few answers) or it could not be written (a hint: never an error)."""
    if report.get("mode") != "adaptive" or int(report.get("answers", 0)) < MIN_ANSWERS:
        return False
    doc = {
        "version": VERSION,
        "final": int(report["final"]),
        "ceiling": int(report["ceiling"]),
        "cuts": int(report.get("cuts", 0)),
        "model": model,
        "api": redact_uri(api_base),
        "run_id": run_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    try:
        storage.put_bytes(
            learned_key(api_base, model), json.dumps(doc).encode(), "application/json"
        )
    except StorageError as exc:
        log.warning("the learned concurrency was not kept (%s)", exc)
        return False
    return True


__all__ = ["MIN_ANSWERS", "learned_key", "read_learned", "write_learned"]
