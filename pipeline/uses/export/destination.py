"""Where an export's files go: staged in a local temporary folder, each put whole, then indexed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.io.local_storage import COPY_CHUNK
from pipeline.io.storage import Storage

__all__ = ["INDEX_NAME", "Destination", "FileEntry"]

INDEX_NAME = "index.json"
# Every data file an export writes; a re-run deletes those its new index does not list.
_DATA_FILE_RE = re.compile(r"^(?:shard-[0-9]{6}\.tar|part-[0-9]{6}\.parquet)$")
_DATA_PREFIXES = ("shard-", "part-")


@dataclass(frozen=True)
class FileEntry:
    """A data file of the export, as its index lists it."""

    name: str
    samples: int
    bytes: int
    sha256: str


class Destination:
    """The export's destination store. Each data file is written to a local temporary file,
    then put under its final name in one write (a local store renames it into place, S3 gets
    one PUT or multipart upload): nothing half-written is ever visible under a final name.
    `finish` writes the index last and deletes files an earlier export left that it does not
    list, so re-running an export replaces it whole."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.files: list[FileEntry] = []
        self._staging = tempfile.TemporaryDirectory(prefix="imgedit-export-")

    def staging_path(self, name: str) -> Path:
        return Path(self._staging.name) / name

    def publish(self, name: str, path: Path, samples: int, content_type: str) -> FileEntry:
        """Put the finished local file `path` as `name`; its index entry."""
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        self.storage.put_file(name, path, content_type=content_type)
        path.unlink()
        entry = FileEntry(name, samples, size, digest.hexdigest())
        self.files.append(entry)
        return entry

    def finish(self, index: dict[str, Any]) -> str:
        """Write the index (with the files published) and delete stale data files; the
        index's URI."""
        doc = {**index, "files": [asdict(f) for f in self.files]}
        uri = self.storage.put_bytes(
            INDEX_NAME,
            json.dumps(doc, indent=2, default=str).encode(),
            content_type="application/json",
        )
        keep = {f.name for f in self.files}
        stale = [
            key
            for prefix in _DATA_PREFIXES
            for key in self.storage.list_keys(prefix)
            if _DATA_FILE_RE.match(key) and key not in keep
        ]
        if stale:
            self.storage.delete_many(stale)
        return uri

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._staging.cleanup()

    def __enter__(self) -> Destination:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
