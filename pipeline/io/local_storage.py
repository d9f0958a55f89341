"""Output storage in a local (or mounted) folder: atomic writes, flock-guarded conditional
writes, listings that never show temporary files."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

from pipeline.errors import StorageError, StorageNotFound
from pipeline.io.keys import TEMP_PREFIX, ShardedListing, check_key, check_prefix

__all__ = ["COPY_CHUNK", "LocalStorage", "md5_etag"]

COPY_CHUNK = 2**20


class LocalStorage(ShardedListing):
    """A folder on a local (or mounted) filesystem; every write is atomic.

    With `fsync`, data reaches the disk before the rename, which survives a power loss too;
    without it a write still survives a crash (SIGKILL) of this process, and is much cheaper.
    """

    def __init__(self, root: Path | str, *, fsync: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        self.root_uri = str(self.root)
        self.fsync = fsync
        # mkstemp creates 0600 files; outputs get the usual permissions instead. The umask
        # can only be read by setting it, so it is read once here rather than per write.
        umask = os.umask(0o022)
        os.umask(umask)
        self._file_mode = 0o666 & ~umask

    def __repr__(self) -> str:
        return f"LocalStorage({self.root_uri!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def uri_for(self, key: str) -> str:
        return str(self._path(key))

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        self._atomic_write(path, lambda f: f.write(data))
        return str(path)

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        target = self._path(key)
        try:
            src = open(path, "rb")  # noqa: SIM115 - closed below, errors translated apart
        except OSError as exc:
            raise StorageError(f"cannot read {path} to store it: {_os_reason(exc)}") from exc
        with src:
            self._atomic_write(target, lambda f: shutil.copyfileobj(src, f, COPY_CHUNK))
        return str(target)

    def _atomic_write(self, path: Path, write: Callable[[IO[bytes]], object]) -> None:
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), self._file_mode)
                write(f)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            raise StorageError(
                f"cannot write {path}: {_os_reason(exc)}", fatal=_os_fatal(exc)
            ) from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    # --- conditional writes: claims and leases (see pipeline.engine.claims) ----------------------

    @contextlib.contextmanager
    def _cas(self, path: Path) -> Iterator[None]:
        """One compare-and-swap at a time on `path`, across processes: an flock on its folder
        (a lock file would be litter in the output)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StorageError(
                f"cannot lock {path.parent}: {_os_reason(exc)}", fatal=_os_fatal(exc)
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_etag(self, path: Path) -> str | None:
        try:
            return md5_etag(path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {_os_reason(exc)}") from exc

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create `key` with `data` unless it exists; its ETag, or None when it existed."""
        path = self._path(key)
        with self._cas(path):
            if path.exists():
                return None
            self._atomic_write(path, lambda f: f.write(data))
        return md5_etag(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace `key` if its ETag is still `etag`; the new ETag, or None when it changed."""
        path = self._path(key)
        with self._cas(path):
            if self._read_etag(path) != etag:
                return None
            self._atomic_write(path, lambda f: f.write(data))
        return md5_etag(data)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, md5_etag(data)

    def delete_many(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.delete(key)

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete `key` if its ETag is still `etag`; False when it changed or is gone."""
        path = self._path(key)
        with self._cas(path):
            if self._read_etag(path) != etag:
                return False
            self.delete(key)
        return True

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageNotFound(f"not found: {path}") from exc
        except IsADirectoryError as exc:
            raise StorageNotFound(f"not found (a directory): {path}") from exc
        except NotADirectoryError as exc:
            raise StorageNotFound(f"not found: {path}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {_os_reason(exc)}") from exc

    def exists(self, key: str) -> bool:
        try:
            return self._path(key).is_file()
        except OSError as exc:
            raise StorageError(f"cannot check {self._path(key)}: {_os_reason(exc)}") from exc

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with `prefix` (a plain string prefix, as on S3), directory by directory."""
        check_prefix(prefix)
        dir_part, _, name_prefix = prefix.rpartition("/")
        base = self.root.joinpath(*dir_part.split("/")) if dir_part else self.root
        key_base = f"{dir_part}/" if dir_part else ""
        try:
            yield from self._walk(base, key_base, name_prefix)
        except OSError as exc:
            raise StorageError(f"cannot list {base}: {_os_reason(exc)}") from exc

    def _walk(self, directory: Path, key_base: str, name_prefix: str = "") -> Iterator[str]:
        try:
            with os.scandir(directory) as it:
                entries = sorted(
                    (e for e in it if e.name.startswith(name_prefix)), key=lambda e: e.name
                )
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            # Symlinked directories are not followed: a link loop must not hang a listing.
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), f"{key_base}{entry.name}/")
            elif entry.is_file():
                yield key_base + entry.name

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError as exc:
            raise StorageError(f"cannot delete {path}: it is a directory") from exc
        except OSError as exc:
            raise StorageError(f"cannot delete {path}: {_os_reason(exc)}") from exc


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# No later write can succeed while these last: stop spending on edits that cannot be stored.
_FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _os_fatal(exc: OSError) -> bool:
    return exc.errno in _FATAL_ERRNOS


def md5_etag(data: bytes) -> str:
    # What S3 gives a single-part PUT: the MD5 of the bytes, quoted.
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'
