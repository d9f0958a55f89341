"""The one reader of whole objects by URI: local paths, `file://`, `s3://` and `http(s)://`.

Every read, whatever the location:

- stops at `max_bytes`: a declared size over the cap is refused before reading, and the read
  itself stops one byte past the cap whatever the size said;
- is bounded in time: `timeout` covers a whole http(s) fetch (a server dripping bytes cannot
  hold it), S3 calls have botocore's own timeouts and retries;
- names its location redacted (`pipeline.io.redact`): no user-info, no query string;
- for http(s), goes through `pipeline.io.netguard` under `policy` (public addresses only
  unless the policy allows more; each redirect hop checked); an injected `transport` (tests)
  replaces the guarded transport, not the URL checks;
- with `roots`, refuses local and S3 locations outside the allowed roots
  (`pipeline.io.allowed_roots`);
- reads regular files only for local paths: a FIFO would block forever, a device reports
  size 0 and never ends.

Errors are those of `pipeline.errors`: StorageError (StorageNotFound when nothing is there),
PathNotAllowedError outside the allowed roots, BlockedAddressError for a refused address.
S3 failures are worded by the one mapping, `pipeline.io.s3.s3_error`.

`read(uri)` is the synchronous entry point (thread-safe; contact sheets, sidecars, results
tables); `await aread(uri)` the asynchronous one (the source loader): local and S3 reads run
in a worker thread of `executor`, http(s) on the event loop through one shared client.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit
from urllib.request import url2pathname

import httpx

from pipeline.errors import (
    ConfigError,
    ImgEditError,
    PathNotAllowedError,
    StorageError,
    StorageNotFound,
)
from pipeline.io.allowed_roots import AllowedRoots
from pipeline.io.http import get_capped
from pipeline.io.netguard import AddressPolicy, guarded_transport, source_policy
from pipeline.io.redact import redact_text, redact_uri
from pipeline.io.s3 import S3_ERRORS, make_s3_client, parse_s3_uri, read_object, s3_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:  # boto3-stubs is a dev dependency only
    S3Client = Any

T = TypeVar("T")

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_TIMEOUT",
    "UriReader",
    "human_size",
    "is_http",
    "local_path",
]

DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 256 * 2**20
HTTP_SCHEMES = ("http://", "https://")
EXPECTED = "a local path, file://, s3://, http:// or https://"


class UriReader:
    """Reads whole objects by URI, synchronously (`read`) or asynchronously (`aread`).

    One lazily created boto3 client is shared by every thread; the asynchronous http(s)
    client is created on first use and bound to that event loop. `close()` (or `aclose()`
    from the loop that used `aread`) when done.
    """

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        policy: AddressPolicy | None = None,
        roots: AllowedRoots | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self.max_bytes = max_bytes
        # Which addresses http(s) may come from; by default the worker's source policy.
        self.policy = policy if policy is not None else source_policy()
        # Local and S3 locations must lie under these; None: anywhere.
        self.roots = roots
        # None: asyncio's default pool; a run passes its own, sized to its concurrency.
        self._executor = executor
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._s3: S3Client | None = None
        self._s3_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"UriReader(max_bytes={self.max_bytes}, timeout={self.timeout:g})"

    # --- entry points --------------------------------------------------------------------

    def read(self, uri: str) -> bytes:
        """The bytes at `uri` (see the module doc for the rules and errors)."""
        self._check_roots(uri)
        if uri.startswith(HTTP_SCHEMES):
            return self._read_http_sync(uri)
        if uri.startswith("s3://"):
            return self._read_s3(uri)[0]
        return self._read_local(uri)[0]

    __call__ = read

    async def aread(self, uri: str) -> bytes:
        """`read`, without blocking the event loop."""
        return (await self.aread_versioned(uri))[0]

    async def aread_versioned(self, uri: str) -> tuple[bytes, str | None]:
        """`aread`, and the version of the object the bytes are (see `version`), or None for
        http(s): its bytes are those of that version or a later one, never an earlier one."""
        self._check_roots(uri)
        if uri.startswith(HTTP_SCHEMES):
            return await self._read_http(uri, self._http_client()), None
        if uri.startswith("s3://"):
            return await self._in_thread(self._read_s3, uri)
        # Checked before the thread: an unsupported location costs no thread hop.
        local_path(uri)
        return await self._in_thread(self._read_local, uri)

    async def aversion(self, uri: str) -> str | None:
        """What changes whenever the object at `uri` changes, without reading it: a local
        file's size, mtime, ctime, inode and device (its ctime moves on every write, and no
        one can set it back), an S3 object's ETag and size (a HEAD). None for http(s) or when
        it cannot be had (the object is then read as usual)."""
        if uri.startswith(HTTP_SCHEMES):
            return None
        try:
            self._check_roots(uri)
            if uri.startswith("s3://"):
                return await self._in_thread(self._version_s3, uri)
            local_path(uri)
            return await self._in_thread(self._version_local, uri)
        except (ImgEditError, OSError):
            return None

    def close(self) -> None:
        """Close the S3 client (an asynchronous http client needs `aclose`)."""
        with self._s3_lock:
            s3, self._s3 = self._s3, None
        if s3 is not None:
            s3.close()

    async def aclose(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()
        self.close()

    def __enter__(self) -> UriReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> UriReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- each kind of location -----------------------------------------------------------

    def _check_roots(self, uri: str) -> None:
        if self.roots is not None and (reason := self.roots.reason(uri)) is not None:
            raise PathNotAllowedError(f"{redact_uri(uri)} is {reason}")

    async def _in_thread(self, fn: Callable[[str], T], uri: str) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, uri)

    def _too_large(self, where: str) -> str:
        return f"larger than {human_size(self.max_bytes)}: {where}"

    def _read_local(self, uri: str) -> tuple[bytes, str]:
        path = local_path(uri)
        try:
            # A FIFO or a device would block the thread or never end: regular files only.
            # Checked before opening (opening a device can do things), and again on the
            # opened file (non-blocking, so a FIFO swapped in between cannot hang the open).
            _check_regular(path, os.stat(path).st_mode)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                info = os.fstat(f.fileno())
                _check_regular(path, info.st_mode)
                if info.st_size > self.max_bytes:
                    raise StorageError(self._too_large(str(path)))
                # Taken before reading: a write after it moves the ctime, so these bytes are
                # never filed under a version they are not.
                version = _local_version(info)
                # One byte past the cap, in case the file grew since fstat.
                data = f.read(self.max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise StorageNotFound(f"file not found: {path}") from None
        except IsADirectoryError:
            raise StorageError(f"is a directory, not a file: {path}") from None
        except PermissionError:
            raise StorageError(f"permission denied reading {path}") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise StorageError(f"cannot read {path}: {reason}") from None
        if len(data) > self.max_bytes:
            raise StorageError(self._too_large(str(path)))
        return data, version

    def _version_local(self, uri: str) -> str | None:
        path = local_path(uri)
        info = os.stat(path)
        return _local_version(info) if stat.S_ISREG(info.st_mode) else None

    def _version_s3(self, uri: str) -> str | None:
        loc = parse_s3_uri(uri)
        if not loc.key:
            return None
        try:
            head = self._s3_client().head_object(Bucket=loc.bucket, Key=loc.key)
        except S3_ERRORS:
            return None
        etag = head.get("ETag")
        return f"s3:{etag}:{head.get('ContentLength')}" if etag else None

    def _s3_client(self) -> S3Client:
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = make_s3_client(self.endpoint_url)
            return self._s3

    def _read_s3(self, uri: str) -> tuple[bytes, str | None]:
        try:
            loc = parse_s3_uri(uri)
        except ConfigError as exc:
            raise StorageError(str(exc)) from None
        if not loc.key:
            raise StorageError(f"s3 URI names no object: {uri}")
        try:
            obj = read_object(self._s3_client(), loc.bucket, loc.key, limit=self.max_bytes)
        except S3_ERRORS as exc:
            # The message says what failed; no chained cause that could quote a request.
            raise s3_error(exc, loc.bucket, loc.key) from None
        if obj.over:
            raise StorageError(self._too_large(uri))
        return obj.data, f"s3:{obj.etag}:{len(obj.data)}" if obj.etag else None

    def _new_http_client(self) -> httpx.AsyncClient:
        # Redirects are followed by netguard.open_stream, each hop checked.
        return httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(self.timeout),
            transport=self._transport or guarded_transport(self.policy),
        )

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = self._new_http_client()
        return self._http

    def _read_http_sync(self, uri: str) -> bytes:
        # A synchronous caller (a contact sheet in a worker thread) gets a fetch on a
        # short-lived loop and thread of its own, so it works whether or not a loop runs here.
        async def fetch() -> bytes:
            async with self._new_http_client() as client:
                return await self._read_http(uri, client)

        with ThreadPoolExecutor(1, thread_name_prefix="imgedit-http") as pool:
            return pool.submit(asyncio.run, fetch()).result()

    async def _read_http(self, uri: str, client: httpx.AsyncClient) -> bytes:
        shown = redact_uri(uri)

        def check_status(response: httpx.Response) -> None:
            if response.status_code == 404:
                raise StorageNotFound(f"{shown} answered 404")
            if response.status_code != 200:
                raise StorageError(f"{shown} answered {response.status_code}")

        def too_large(declared: int | None) -> Exception:
            return StorageError(self._too_large(shown))

        try:
            # The timeout bounds the whole fetch, not just each network operation.
            async with asyncio.timeout(self.timeout):
                return await get_capped(
                    client,
                    uri,
                    max_bytes=self.max_bytes,
                    check_status=check_status,
                    too_large=too_large,
                )
        except (TimeoutError, httpx.TimeoutException):
            raise StorageError(f"timed out after {self.timeout:g} s fetching {shown}") from None
        except httpx.ConnectError as exc:
            raise StorageError(f"cannot connect fetching {shown}: {_http_reason(exc)}") from None
        except httpx.HTTPError as exc:
            raise StorageError(f"error fetching {shown}: {_http_reason(exc)}") from None


def is_http(uri: str) -> bool:
    return uri.startswith(HTTP_SCHEMES)


def local_path(uri: str) -> Path:
    """The local path a location names: a path as it is, or a `file://` URI on this host.

    StorageError for a `file://` URI of another host and for any other scheme.
    """
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URI on another host is not supported: {redact_uri(uri)}")
        return Path(url2pathname(parts.path))
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(
            f"cannot read {redact_uri(uri)}: unsupported scheme {scheme!r} (expected {EXPECTED})"
        )
    return Path(uri)


def _local_version(info: os.stat_result) -> str:
    return f"file:{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}:{info.st_dev}"


def _check_regular(path: Path, mode: int) -> None:
    """StorageError naming what `path` is unless `mode` is a regular file's."""
    if stat.S_ISDIR(mode):
        raise StorageError(f"is a directory, not a file: {path}")
    if not stat.S_ISREG(mode):
        raise StorageError(f"not a regular file: {path}")


def _http_reason(exc: httpx.HTTPError) -> str:
    text = redact_text(str(exc).strip())
    return text or type(exc).__name__


def human_size(n: int) -> str:
    """`52428800` -> `50 MiB`; exact units when they fit, else one decimal."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if n % scale == 0 else f"{value:.1f} {unit}"
    return f"{n} bytes"
