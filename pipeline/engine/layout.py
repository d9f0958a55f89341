"""Where things live under an output root: result images, job sidecars, per-run tables.

images/<k[:2]>/<key>-<i>.<ext>     result image i of a job (written first)
jobs/<k[:2]>/<key>.json            the job's sidecar, written last: it marks the job done
runs/<run_id>/parts/<chunk>-<seq>.parquet  results of a chunk's rows, every few seconds
runs/<run_id>/results.parquet      the run's results table, one row per manifest row
runs/<run_id>/summary.json         the run's summary
runs/<run_id>/contact-sheet.png    before/after thumbnails of a sample of the run's rows
runs/<run_id>/run.log              the run's log (no secrets)
index/...                          the done index (see `done_index`)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

JOBS_PREFIX = "jobs/"
IMAGES_PREFIX = "images/"
RUNS_PREFIX = "runs/"
SIDECAR_SUFFIX = ".json"
_KEY_RE = re.compile(r"^[0-9a-f]{8,64}$")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHARD_RUN_ID_RE = re.compile(r"^(?P<parent>.+)\.s(?P<index>[0-9]{3,})$")


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ValueError(f"not a job key: {key!r}")
    return key


def is_job_key(text: str) -> bool:
    return bool(_KEY_RE.match(text))


def check_run_id(run_id: str) -> str:
    if not _RUN_ID_RE.match(run_id):
        raise ValueError(f"run id must be letters, digits, '.', '_' or '-': {run_id!r}")
    return run_id


def sidecar_key(job_key: str) -> str:
    k = _check_key(job_key)
    return f"{JOBS_PREFIX}{k[:2]}/{k}{SIDECAR_SUFFIX}"


def sidecar_uris(uri_for: Callable[[str], str], job_keys: Sequence[str]) -> list[str]:
    """`[uri_for(sidecar_key(k)) for k in job_keys]`, the storage asked once for where the
    jobs live instead of once a key (a resume's million done rows each name their sidecar)."""
    probe = "0" * 32
    tail = sidecar_key(probe)[len(JOBS_PREFIX) :]
    template = uri_for(sidecar_key(probe))
    if not template.endswith(tail):  # a storage whose URIs do not end with the key
        return [uri_for(sidecar_key(k)) for k in job_keys]
    head = template[: -len(tail)]
    return [f"{head}{k[:2]}/{_check_key(k)}{SIDECAR_SUFFIX}" for k in job_keys]


def image_key(job_key: str, index: int, ext: str) -> str:
    k = _check_key(job_key)
    return f"{IMAGES_PREFIX}{k[:2]}/{k}-{index}.{ext}"


def job_key_of_sidecar(key: str) -> str | None:
    """The job key a listed storage key is the sidecar of, or None."""
    if not key.startswith(JOBS_PREFIX) or not key.endswith(SIDECAR_SUFFIX):
        return None
    name = key.rsplit("/", 1)[-1][: -len(SIDECAR_SUFFIX)]
    return name if _KEY_RE.match(name) else None


def shard_run_id(parent: str, index: int) -> str:
    """The run id of shard `index` of a scaled-out run."""
    return check_run_id(f"{check_run_id(parent)}.s{index:03d}")


def shard_parent(run_id: str) -> str | None:
    """The scaled-out run a shard's run id belongs to, or None for a run of its own."""
    m = _SHARD_RUN_ID_RE.match(run_id)
    return m.group("parent") if m else None


def run_prefix(run_id: str) -> str:
    return f"{RUNS_PREFIX}{check_run_id(run_id)}/"


def part_key(run_id: str, chunk: int, seq: int = 0) -> str:
    """Results part `seq` of a chunk: a chunk writes one every few seconds as rows finish."""
    return f"{run_prefix(run_id)}parts/{chunk:06d}-{seq:04d}.parquet"


def parts_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}parts/"


def results_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}results.parquet"


def summary_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}summary.json"


def run_log_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}run.log"


def contact_sheet_key(run_id: str) -> str:
    return f"{run_prefix(run_id)}contact-sheet.png"
