"""WebDataset tar shards: per sample `<key>.<ext>` (the stored bytes), `<key>.json`, sources."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from pipeline.uses.export.destination import Destination
from pipeline.uses.export.samples import Sample

__all__ = ["TarShards", "shard_name"]

TAR_BLOCK = 512
_CONTENT_TYPE = "application/x-tar"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _archive_bytes(size: int) -> int:
    """What a tar of `size` bytes of members and end blocks takes, padded to whole records."""
    return -(-size // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _member_bytes(size: int) -> int:
    """What a member takes in a tar: its header and its data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


class TarShards:
    """Samples appended to tar shards, each at most `shard_bytes` (unless a single sample is
    larger); a full shard is published and the next begun. Memory: one sample at a time."""

    def __init__(self, dest: Destination, shard_bytes: int, mtime: float) -> None:
        self.dest = dest
        self.shard_bytes = shard_bytes
        self.mtime = int(mtime)
        self._index = 0
        self._tar: tarfile.TarFile | None = None
        self._path: Path | None = None
        self._size = 0
        self._samples = 0

    def add(self, sample: Sample) -> None:
        members = self._members(sample)
        size = sum(_member_bytes(len(data)) for _, data in members)
        full = _archive_bytes(self._size + size) > self.shard_bytes
        if self._tar is not None and self._samples and full:
            self._close_shard()
        tar = self._tar or self._open_shard()
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = self.mtime
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        self._size += size
        self._samples += 1

    def close(self) -> None:
        """Publish the last shard (if it holds any sample)."""
        if self._tar is not None:
            self._close_shard()

    @staticmethod
    def _members(sample: Sample) -> list[tuple[str, bytes]]:
        meta = json.dumps(sample.metadata, ensure_ascii=False, default=str).encode()
        members = [(f"{sample.key}.{sample.ext}", sample.image), (f"{sample.key}.json", meta)]
        for i, (ext, data) in enumerate(sample.sources):
            suffix = "src" if i == 0 else f"src{i}"
            members.append((f"{sample.key}.{suffix}.{ext}", data))
        return members

    def _open_shard(self) -> tarfile.TarFile:
        self._path = self.dest.staging_path(shard_name(self._index))
        # Closed by _close_shard, once the shard is full or the export ends.
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self._size = 2 * TAR_BLOCK  # the end-of-archive blocks
        self._samples = 0
        return self._tar

    def _close_shard(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        self.dest.publish(shard_name(self._index), self._path, self._samples, _CONTENT_TYPE)
        self._tar, self._path = None, None
        self._index += 1
