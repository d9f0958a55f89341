"""Output storage behind one small synchronous interface: a local folder or an S3 prefix.

The async runner calls it through `asyncio.to_thread`. Keys are relative, `/`-separated paths
under the storage's root; nothing a key says can reach outside that root.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from pipeline.errors import ConfigError, InvalidKeyError, StorageError, StorageNotFound
from pipeline.io.s3 import DEFAULT_MAX_POOL_CONNECTIONS, make_s3_client, parse_s3_uri

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:  # boto3-stubs is a dev dependency only
    S3Client = Any

# Temp files of in-progress local writes; listing never shows them.
TEMP_PREFIX = ".tmp-"
# Job records are sharded under two-hex-character prefixes (`jobs/ab/<key>.json`).
HEX_SHARDS: tuple[str, ...] = tuple(f"{i:02x}" for i in range(256))
# Parallel list calls for sharded listing: enough to hide S3 latency, few enough not to
# trip request-rate limits (S3 allows thousands of LISTs per second per prefix).
DEFAULT_LIST_WORKERS = 16
# list_objects_v2 returns at most 1000 keys per call whatever is asked.
S3_LIST_PAGE_SIZE = 1000
# Files above this go up as a multipart upload (S3 caps a single PUT at 5 GiB).
MULTIPART_THRESHOLD = 64 * 2**20
COPY_CHUNK = 2**20

_CLIENT_CODES_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_CLIENT_CODES_NO_BUCKET = frozenset({"NoSuchBucket"})
_CLIENT_CODES_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
_CLIENT_CODES_BAD_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
# A conditional write whose condition failed (412), or lost a race with another (409).
_CLIENT_CODES_PRECONDITION = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
# `scheme://user:password@host` in an endpoint URL quoted by an error message.
_USERINFO_RE = re.compile(r"(?<=://)[^/@\s]+@")


class Storage(Protocol):
    """What the runner needs from an output store. Every method may raise StorageError."""

    root_uri: str

    def uri_for(self, key: str) -> str: ...
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str: ...
    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list_keys(self, prefix: str = "") -> Iterator[str]: ...
    def list_keys_sharded(
        self,
        prefix: str,
        shards: Sequence[str] = HEX_SHARDS,
        *,
        workers: int = DEFAULT_LIST_WORKERS,
    ) -> Iterator[str]: ...
    def delete(self, key: str) -> None: ...
    def put_if_absent(self, key: str, data: bytes) -> str | None: ...
    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None: ...
    def get_with_etag(self, key: str) -> tuple[bytes, str]: ...
    def delete_if_match(self, key: str, etag: str) -> bool: ...
    def delete_many(self, keys: Sequence[str]) -> None: ...


def check_key(key: str) -> str:
    """`key` itself if it is a clean relative path, else InvalidKeyError naming the problem."""
    _check_path_text(key, what="key")
    if not key:
        raise InvalidKeyError("empty storage key")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"storage key {key!r} has an empty, '.' or '..' segment")
    if key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
        raise InvalidKeyError(f"storage key {key!r} uses the reserved prefix {TEMP_PREFIX!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: like a key, but may be empty, end with `/` or stop mid-name."""
    _check_path_text(prefix, what="prefix")
    segments = prefix.split("/")
    for segment in segments[:-1]:
        if segment in ("", ".", ".."):
            raise InvalidKeyError(f"storage prefix {prefix!r} has an empty, '.' or '..' segment")
    if segments[-1] in (".", ".."):
        raise InvalidKeyError(f"storage prefix {prefix!r} ends with '.' or '..'")
    return prefix


def _check_path_text(text: str, *, what: str) -> None:
    if "\x00" in text:
        raise InvalidKeyError(f"storage {what} contains a NUL character")
    if "\\" in text:
        raise InvalidKeyError(f"storage {what} {text!r} contains a backslash")
    if text.startswith("/"):
        raise InvalidKeyError(f"storage {what} {text!r} is absolute; keys are relative")


def _check_shards(shards: Sequence[str]) -> list[str]:
    ordered = sorted(set(shards))
    for shard in ordered:
        _check_path_text(shard, what="shard")
        if not shard:
            raise InvalidKeyError("empty shard")
    # A shard that prefixes another would list the other's keys twice.
    for a, b in itertools.pairwise(ordered):
        if b.startswith(a):
            raise InvalidKeyError(f"shard {a!r} is a prefix of shard {b!r}")
    return ordered


class _ShardedListing:
    """`list_keys_sharded` on top of `list_keys`: one listing per shard in a small pool."""

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        raise NotImplementedError

    def _list_if_small(self, prefix: str) -> list[str] | None:
        """Every key under `prefix` if one request returns them all, else None (no probe)."""
        return None

    def list_keys_sharded(
        self,
        prefix: str,
        shards: Sequence[str] = HEX_SHARDS,
        *,
        workers: int = DEFAULT_LIST_WORKERS,
    ) -> Iterator[str]:
        """Every key under `prefix + shard` for each shard, each once, in no set order.

        Keys under `prefix` that start with none of the shards are not listed. Each shard
        is listed whole in a worker thread; the keys come out shard by shard as they finish.
        A store that returns all of `prefix` in one request (S3: up to 1000 keys) is listed
        with that one request instead of one per shard.
        """
        check_prefix(prefix)
        ordered = _check_shards(shards)
        if not ordered:
            return
        small = self._list_if_small(prefix)
        if small is not None:
            starts = tuple(prefix + shard for shard in ordered)
            yield from (key for key in small if key.startswith(starts))
            return
        pool = ThreadPoolExecutor(
            max_workers=max(1, min(workers, len(ordered))), thread_name_prefix="storage-list"
        )
        try:
            pending: set[Future[list[str]]] = {
                pool.submit(lambda p: list(self.list_keys(p)), prefix + shard) for shard in ordered
            }
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield from fut.result()
        finally:
            # A consumer that stops early (or an error) must not leave listings running.
            pool.shutdown(wait=True, cancel_futures=True)


# --- local folder ------------------------------------------------------------------------


class LocalStorage(_ShardedListing):
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
            return _etag(path.read_bytes())
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
        return _etag(data)

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace `key` if its ETag is still `etag`; the new ETag, or None when it changed."""
        path = self._path(key)
        with self._cas(path):
            if self._read_etag(path) != etag:
                return None
            self._atomic_write(path, lambda f: f.write(data))
        return _etag(data)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, _etag(data)

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


def _etag(data: bytes) -> str:
    # What S3 gives a single-part PUT: the MD5 of the bytes, quoted.
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


# --- S3 ----------------------------------------------------------------------------------


class S3Storage(_ShardedListing):
    """A prefix in an S3 bucket (AWS, MinIO, R2, moto: `endpoint_url` picks which).

    The client is shared by every thread: boto3 clients are thread-safe.
    """

    def __init__(self, bucket: str, prefix: str, client: S3Client) -> None:
        prefix = prefix.strip("/")
        if prefix:
            check_prefix(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.client = client
        self.root_uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self._transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.root_uri!r})"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        s3_key = self._key(key)
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=s3_key, Body=data, **extra)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("write", s3_key, exc) from exc
        return f"s3://{self.bucket}/{s3_key}"

    def put_file(self, key: str, path: Path, content_type: str | None = None) -> str:
        s3_key = self._key(key)
        if not Path(path).is_file():
            raise StorageError(f"cannot read {path} to store it: no such file")
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        try:
            self.client.upload_file(
                str(path), self.bucket, s3_key, ExtraArgs=extra, Config=self._transfer
            )
        except S3UploadFailedError as exc:
            # boto3 wraps the ClientError in a message-only exception; the original is the
            # implicit context, which carries the error code.
            cause = exc.__context__
            if isinstance(cause, (ClientError, BotoCoreError)):
                raise self._error("write", s3_key, cause) from exc
            raise StorageError(f"cannot write s3://{self.bucket}/{s3_key}: upload failed") from exc
        except (ClientError, BotoCoreError) as exc:
            raise self._error("write", s3_key, exc) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path} to store it: {_os_reason(exc)}") from exc
        return f"s3://{self.bucket}/{s3_key}"

    def get_bytes(self, key: str) -> bytes:
        s3_key = self._key(key)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=s3_key)
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data
        except (ClientError, BotoCoreError) as exc:
            raise self._error("read", s3_key, exc) from exc

    def exists(self, key: str) -> bool:
        s3_key = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=s3_key)
        except (ClientError, BotoCoreError) as exc:
            err = self._error("check", s3_key, exc)
            if isinstance(err, StorageNotFound):
                return False
            raise err from exc
        return True

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Keys under `prefix`, relative to the root, page by page (1000 keys per request)."""
        check_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=root + prefix,
            PaginationConfig={"PageSize": S3_LIST_PAGE_SIZE},
        )
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(root) :]
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", root + prefix, exc) from exc

    def _list_if_small(self, prefix: str) -> list[str] | None:
        # One request: a fresh or small output (the common case) needs no fan-out, and a
        # large one pays a single extra page.
        root = f"{self.prefix}/" if self.prefix else ""
        try:
            page = self.client.list_objects_v2(
                Bucket=self.bucket, Prefix=root + prefix, MaxKeys=S3_LIST_PAGE_SIZE
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._error("list", root + prefix, exc) from exc
        if page.get("IsTruncated"):
            return None
        return [obj["Key"][len(root) :] for obj in page.get("Contents", ())]

    def delete(self, key: str) -> None:
        s3_key = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=s3_key)
        except (ClientError, BotoCoreError) as exc:
            raise self._error("delete", s3_key, exc) from exc

    # --- conditional writes: claims and leases (see pipeline.engine.claims) ----------------------

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> str | None:
        s3_key = self._key(key)
        extra: dict[str, Any] = dict(condition)
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=s3_key, Body=data, **extra)
        except ClientError as exc:
            if _client_code(exc) in _CLIENT_CODES_PRECONDITION or _status(exc) in (409, 412):
                return None
            if "IfMatch" in condition and _client_code(exc) in _CLIENT_CODES_NOT_FOUND:
                return None
            raise self._error("write", s3_key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("write", s3_key, exc) from exc
        return str(resp.get("ETag") or _etag(data))

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create `key` unless it exists (`If-None-Match: *`); its ETag, or None if it existed."""
        return self._conditional_put(key, data, IfNoneMatch="*")

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace `key` if its ETag is `etag` (`If-Match`); the new ETag, or None."""
        return self._conditional_put(key, data, IfMatch=etag)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        s3_key = self._key(key)
        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=s3_key)
            body = resp["Body"]
            try:
                data: bytes = body.read()
            finally:
                body.close()
            return data, str(resp.get("ETag") or _etag(data))
        except (ClientError, BotoCoreError) as exc:
            raise self._error("read", s3_key, exc) from exc

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete `keys` with one request per 1000 (S3's DeleteObjects)."""
        for start in range(0, len(keys), S3_LIST_PAGE_SIZE):
            batch: list[Any] = [
                {"Key": self._key(k)} for k in keys[start : start + S3_LIST_PAGE_SIZE]
            ]
            try:
                resp = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error("delete", batch[0]["Key"], exc) from exc
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"cannot delete {len(errors)} of {len(batch)} objects, e.g. "
                    f"s3://{self.bucket}/{first.get('Key')}: {first.get('Code')}",
                    fatal=str(first.get("Code")) in _CLIENT_CODES_DENIED,
                )

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete `key` if its ETag is still `etag`; False when it changed or is gone.

        Read, compare, delete: S3's conditional DELETE is not everywhere yet, and the window
        only matters for a claim taken over in the same instant (see pipeline.engine.claims).
        """
        try:
            _, current = self.get_with_etag(key)
        except StorageNotFound:
            return False
        if current != etag:
            return False
        self.delete(key)
        return True

    def _error(self, action: str, s3_key: str, exc: ClientError | BotoCoreError) -> StorageError:
        """A StorageError for a failed call, saying what failed in words (no credentials)."""
        where = f"s3://{self.bucket}/{s3_key}"
        if isinstance(exc, NoCredentialsError):
            return StorageError(
                f"cannot {action} {where}: no AWS credentials found "
                "(environment, shared config, or instance role)",
                fatal=True,
            )
        if isinstance(exc, BotoCoreError):
            return StorageError(f"cannot {action} {where}: {redact_text(str(exc))}")
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _CLIENT_CODES_NO_BUCKET:
            return StorageError(
                f"cannot {action} {where}: bucket {self.bucket!r} does not exist", fatal=True
            )
        if code in _CLIENT_CODES_NOT_FOUND or (status == 404 and action in ("read", "check")):
            return StorageNotFound(f"not found: {where}")
        if code in _CLIENT_CODES_DENIED:
            return StorageError(f"cannot {action} {where}: access denied", fatal=True)
        if code in _CLIENT_CODES_BAD_CREDENTIALS:
            return StorageError(
                f"cannot {action} {where}: credentials refused ({code})", fatal=True
            )
        message = redact_text(str(error.get("Message") or code or f"HTTP {status}"))
        return StorageError(f"cannot {action} {where}: {code or 'error'}: {message}")


def _client_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if isinstance(status, int) else None


def redact_text(text: str) -> str:
    """`text` without any `user:password@` part of a URL it quotes."""
    return _USERINFO_RE.sub("***@", text)


# --- opening -----------------------------------------------------------------------------


def open_storage(
    uri: str,
    *,
    endpoint_url: str | None = None,
    max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
) -> LocalStorage | S3Storage:
    """The storage at `uri`: `s3://bucket[/prefix]`, `file:///path`, or a local path.

    Relative paths are taken from the current directory. For S3, `endpoint_url` (else
    AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) selects the service; credentials come from
    boto3's own chain.
    """
    uri = uri.strip()
    if not uri:
        raise ConfigError("empty output URI")
    if uri.startswith("s3://"):
        loc = parse_s3_uri(uri)
        try:
            check_prefix(loc.key)
        except InvalidKeyError as exc:
            raise ConfigError(f"bad prefix in output URI {uri!r}: {exc}") from exc
        try:
            client = make_s3_client(endpoint_url, max_pool_connections=max_pool_connections)
        except (BotoCoreError, ValueError) as exc:
            raise ConfigError(f"cannot create an S3 client: {redact_text(str(exc))}") from exc
        return S3Storage(loc.bucket, loc.key, client)
    if uri.startswith("file:"):
        return LocalStorage(_file_uri_path(uri))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(
            f"unsupported output URI scheme {scheme!r}: use a local path, file:// or s3://"
        )
    return LocalStorage(uri)


def _file_uri_path(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise ConfigError(f"file URI on another host is not supported: {uri!r}")
    path = url2pathname(parsed.path)
    if not path:
        raise ConfigError(f"file URI without a path: {uri!r}")
    return Path(path)
