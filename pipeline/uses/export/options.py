"""What an export is asked for: the format, where it goes, how large each file may grow."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from pipeline.errors import ConfigError

__all__ = [
    "DEFAULT_READ_WORKERS",
    "DEFAULT_ROW_GROUP_BYTES",
    "DEFAULT_SHARD_BYTES",
    "ExportFormat",
    "ExportOptions",
    "parse_size",
]

# A shard (tar) or Parquet file closes before the sample that would take it past this.
DEFAULT_SHARD_BYTES = 256 * 2**20
# A Parquet row group is written once its buffered samples reach this (memory stays flat).
DEFAULT_ROW_GROUP_BYTES = 32 * 2**20
# Result rows of the table read at a time.
DEFAULT_BATCH_ROWS = 512
# Rows whose images are read at once (S3 latency, not CPU, is what they wait on).
DEFAULT_READ_WORKERS = 8
MIN_SHARD_BYTES = 4096

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 2**10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 2**20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 2**30,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


class ExportFormat(StrEnum):
    """The dataset formats an export writes."""

    webdataset = "webdataset"
    parquet = "parquet"


def parse_size(text: str) -> int:
    """Bytes from `268435456`, `256MiB`, `500MB`, `1GB`; ConfigError for anything else."""
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ConfigError(f"not a size: {text!r} (bytes, or a number with KB, MB, GB, MiB...)")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < MIN_SHARD_BYTES:
        raise ConfigError(f"size {text!r} is below the minimum of {MIN_SHARD_BYTES} bytes")
    return size


@dataclass(frozen=True)
class ExportOptions:
    """One export: the format, the destination URI, file sizes, and whether sources go too.

    `shard_bytes` bounds each shard (tar) or Parquet file: it closes before the sample that
    would take it past the size (a sample larger than that alone gets a file of its own).
    """

    format: ExportFormat
    to: str
    shard_bytes: int = DEFAULT_SHARD_BYTES
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES
    with_sources: bool = False
    allow_private_sources: bool = False
    batch_rows: int = DEFAULT_BATCH_ROWS
    read_workers: int = DEFAULT_READ_WORKERS

    def __post_init__(self) -> None:
        if self.shard_bytes < MIN_SHARD_BYTES:
            raise ConfigError(f"shard size must be at least {MIN_SHARD_BYTES} bytes")
        if self.row_group_bytes < 1 or self.batch_rows < 1 or self.read_workers < 1:
            raise ConfigError("row group size, batch rows and read workers must be positive")
        if not self.to.strip():
            raise ConfigError("no destination given (--to)")
