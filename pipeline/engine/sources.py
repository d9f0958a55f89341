"""Loading a row's source images and mask from local paths, s3:// or http(s):// URIs, cached."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import re
import stat
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

import httpx
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from PIL import Image

from pipeline.errors import BlockedAddressError, ConfigError, InvalidImageError, SourceError
from pipeline.imageinfo import ImageInfo, probe
from pipeline.io.allowed_roots import AllowedRoots
from pipeline.io.netguard import MAX_REDIRECTS, AddressPolicy, guarded_transport, open_stream
from pipeline.io.s3 import make_s3_client, parse_s3_uri
from pipeline.spec import INPUT_FORMATS

T = TypeVar("T")

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:  # boto3-stubs is a dev dependency only
    S3Client = Any

DEFAULT_HTTP_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 50 * 2**20
DEFAULT_CACHE_BYTES = 256 * 2**20
READ_CHUNK = 2**20

_FORMAT_NAMES = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WebP", "avif": "AVIF"}
_ACCEPTED = ", ".join(sorted(_FORMAT_NAMES[f] for f in INPUT_FORMATS))
_S3_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_S3_DENIED = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
_S3_BAD_CREDENTIALS = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
_URL_IN_TEXT_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


@dataclass(frozen=True)
class Source:
    """One loaded source file: its bytes, their SHA-256 (hex) and what the header says."""

    uri: str
    data: bytes = field(repr=False)
    sha256: str
    info: ImageInfo

    def __repr__(self) -> str:
        return (
            f"Source(uri={redact_uri(self.uri)!r}, {self.info.format} {self.info.size}, "
            f"{len(self.data)} bytes, sha256={self.sha256[:12]}...)"
        )


class _LoadFailure(Exception):
    """A failed read, column-free: each waiter re-raises it as its own SourceError."""


class SourceLoader:
    """Reads source files once each: an LRU cache by URI, and one read per URI in flight.

    Local and S3 reads run in a worker thread (one shared, lazily created boto3 client);
    http(s) goes through one shared httpx client, streaming with a size cap. Use from one
    event loop; `aclose()` when done.
    """

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        http_timeout: float = DEFAULT_HTTP_TIMEOUT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        executor: Executor | None = None,
        roots: AllowedRoots | None = None,
        policy: AddressPolicy | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url
        # Local and S3 sources must lie under these (IMGEDIT_ALLOWED_ROOTS); None: anywhere.
        self.roots = roots
        # Which addresses http(s) sources may come from (default: public ones only).
        self.policy = policy or AddressPolicy()
        # None: asyncio's default pool (cpu+4 threads); a run passes its own, sized to its
        # concurrency, so S3 reads do not queue behind a handful of threads.
        self._executor = executor
        self.http_timeout = http_timeout
        self.max_bytes = max_bytes
        self.cache_bytes = cache_bytes
        self._transport = transport
        self._http: httpx.AsyncClient | None = None
        self._s3: S3Client | None = None
        self._s3_lock = threading.Lock()
        self._cache: OrderedDict[str, Source] = OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[str, asyncio.Task[Source]] = {}
        # Counters for logs and tests: reads actually made, loads answered from the cache.
        self.reads = 0
        self.cache_hits = 0

    async def __aenter__(self) -> SourceLoader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def load(self, uri: str, *, column: str = "image") -> Source:
        """The source at `uri`, validated as an accepted input image; SourceError if not."""
        cached = self._cache.get(uri)
        if cached is not None:
            self._cache.move_to_end(uri)
            self.cache_hits += 1
            return cached
        task = self._inflight.get(uri)
        if task is None:
            task = asyncio.create_task(self._read_and_check(uri))
            self._inflight[uri] = task
            task.add_done_callback(lambda t: self._finish(uri, t))
        try:
            # Shielded: one waiter being cancelled must not cancel the read the others share.
            return await asyncio.shield(task)
        except _LoadFailure as exc:
            raise SourceError(str(exc), column=column, uri=redact_uri(uri)) from exc.__cause__

    async def load_mask(self, uri: str, first: Source) -> Source:
        """The mask at `uri`: a PNG of the same dimensions as `first` (the edited image)."""
        mask = await self.load(uri, column="mask")
        problem = mask_problem(uri, mask.info, first.info)
        if problem is not None:
            raise SourceError(problem, column="mask", uri=redact_uri(uri))
        return mask

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        self._cache.clear()
        self._cached_bytes = 0
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        with self._s3_lock:
            s3, self._s3 = self._s3, None
        if s3 is not None:
            s3.close()

    # --- cache ---------------------------------------------------------------------------

    def _finish(self, uri: str, task: asyncio.Task[Source]) -> None:
        if self._inflight.get(uri) is task:
            del self._inflight[uri]
        if task.cancelled() or task.exception() is not None:
            return  # failures are not cached: the next row tries again
        self._remember(task.result())

    def _remember(self, source: Source) -> None:
        size = len(source.data)
        if size > self.cache_bytes or source.uri in self._cache:
            return
        self._cache[source.uri] = source
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= len(old.data)

    # --- reading -------------------------------------------------------------------------

    async def _read_and_check(self, uri: str) -> Source:
        self.reads += 1
        try:
            return await self._read_and_check_inner(uri)
        except _LoadFailure:
            raise
        except Exception as exc:
            # A bug or an error nobody foresaw still fails one row with a sentence, not a
            # traceback; the chained cause keeps the details for a debugger.
            raise _LoadFailure(
                f"cannot load {redact_uri(uri)}: unexpected {type(exc).__name__}"
            ) from exc

    async def _read_and_check_inner(self, uri: str) -> Source:
        if self.roots is not None and (reason := self.roots.reason(uri)) is not None:
            raise _LoadFailure(f"{redact_uri(uri)} is {reason}")
        if uri.startswith(("http://", "https://")):
            data = await self._read_http(uri)
        elif uri.startswith("s3://"):
            data = await self._in_thread(self._read_s3, uri)
        elif uri.startswith("file:") or uri.startswith("/"):
            data = await self._in_thread(self._read_local, uri)
        else:
            raise _LoadFailure(_unsupported_location(uri))
        return await self._in_thread(_check_image, uri, data)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _read_local(self, uri: str) -> bytes:
        path = _local_path(uri)
        try:
            # A FIFO or a device would block the worker thread or never end: files only.
            mode = os.stat(path).st_mode
            if stat.S_ISDIR(mode):
                raise _LoadFailure(f"is a directory, not a file: {path}")
            if not stat.S_ISREG(mode):
                raise _LoadFailure(f"not a regular file: {path}")
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > self.max_bytes:
                    raise _LoadFailure(self._too_large(str(path)))
                # Read one byte past the cap in case the file grew since fstat.
                data = f.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise _LoadFailure(f"file not found: {path}") from None
        except IsADirectoryError:
            raise _LoadFailure(f"is a directory, not a file: {path}") from None
        except NotADirectoryError:
            raise _LoadFailure(f"file not found: {path}") from None
        except PermissionError:
            raise _LoadFailure(f"permission denied reading {path}") from None
        except OSError as exc:
            raise _LoadFailure(
                f"cannot read {path}: {exc.strerror or type(exc).__name__}"
            ) from None
        if len(data) > self.max_bytes:
            raise _LoadFailure(self._too_large(str(path)))
        return data

    def _s3_client(self) -> S3Client:
        with self._s3_lock:
            if self._s3 is None:
                self._s3 = make_s3_client(self.endpoint_url)
            return self._s3

    def _read_s3(self, uri: str) -> bytes:
        try:
            loc = parse_s3_uri(uri)
        except ConfigError as exc:
            raise _LoadFailure(str(exc)) from None
        if not loc.key:
            raise _LoadFailure(f"s3 URI names no object: {uri}")
        try:
            resp = self._s3_client().get_object(Bucket=loc.bucket, Key=loc.key)
            body = resp["Body"]
            try:
                if int(resp.get("ContentLength") or 0) > self.max_bytes:
                    raise _LoadFailure(self._too_large(uri))
                data: bytes = body.read(self.max_bytes + 1)
            finally:
                body.close()
        except NoCredentialsError:
            raise _LoadFailure(f"no AWS credentials found to read {uri}") from None
        except ClientError as exc:
            raise _LoadFailure(_s3_reason(exc, uri, loc.bucket)) from None
        except BotoCoreError as exc:
            raise _LoadFailure(f"cannot read {uri}: {redact_text(str(exc))}") from None
        if len(data) > self.max_bytes:
            raise _LoadFailure(self._too_large(uri))
        return data

    def _http_client(self) -> httpx.AsyncClient:
        if self._http is None:
            # Redirects are followed by netguard.open_stream, each hop checked; an injected
            # transport (tests) replaces the guarded one, not the URL checks.
            self._http = httpx.AsyncClient(
                follow_redirects=False,
                timeout=httpx.Timeout(self.http_timeout),
                transport=self._transport or guarded_transport(self.policy),
            )
        return self._http

    async def _read_http(self, uri: str) -> bytes:
        shown = redact_uri(uri)
        client = self._http_client()
        try:
            # The timeout bounds the whole fetch too, so a server dripping bytes cannot hold
            # a row forever.
            async with asyncio.timeout(self.http_timeout):
                return await self._fetch(client, uri, shown)
        except (TimeoutError, httpx.TimeoutException):
            raise _LoadFailure(
                f"timed out after {self.http_timeout:g} s fetching {shown}"
            ) from None
        except BlockedAddressError as exc:
            raise _LoadFailure(str(exc)) from None
        except httpx.ConnectError as exc:
            raise _LoadFailure(f"cannot connect fetching {shown}: {_http_reason(exc)}") from None
        except httpx.HTTPError as exc:
            raise _LoadFailure(f"error fetching {shown}: {_http_reason(exc)}") from None

    async def _fetch(self, client: httpx.AsyncClient, uri: str, shown: str) -> bytes:
        async with open_stream(client, uri, max_redirects=MAX_REDIRECTS) as resp:
            if resp.status_code != 200:
                raise _LoadFailure(f"{shown} answered {resp.status_code}")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > self.max_bytes:
                raise _LoadFailure(self._too_large(shown))
            buf = io.BytesIO()
            async for chunk in resp.aiter_bytes(READ_CHUNK):
                buf.write(chunk)
                # Stop at the cap, whatever the headers said (or did not say).
                if buf.tell() > self.max_bytes:
                    raise _LoadFailure(self._too_large(shown))
            return buf.getvalue()

    def _too_large(self, where: str) -> str:
        return f"larger than {human_size(self.max_bytes)}: {where}"


def mask_problem(uri: str, mask: ImageInfo, first: ImageInfo | None) -> str | None:
    """Why the mask at `uri` does not fit the first image (None: it does): a PNG of the same
    dimensions. Without `first` (it could not be loaded) only the format is checked."""
    if mask.format != "png":
        return f"mask must be a PNG, got {_FORMAT_NAMES[mask.format]}: {redact_uri(uri)}"
    if first is not None and (mask.width, mask.height) != (first.width, first.height):
        return f"mask is {mask.size} but the first image is {first.size}"
    return None


def _check_image(uri: str, data: bytes) -> Source:
    """Hash and probe `data` (in a worker thread: hashing 50 MiB takes a while)."""
    shown = redact_uri(uri)
    try:
        info = probe(data)
    except InvalidImageError as exc:
        reason = str(exc)
        if reason == "unsupported image format":
            name = _pil_format(data)
            reason = f"unsupported image format{f' {name}' if name else ''} (accepted: {_ACCEPTED})"
        raise _LoadFailure(f"{reason}: {shown}") from None
    if info.format not in INPUT_FORMATS:
        raise _LoadFailure(
            f"unsupported image format {_FORMAT_NAMES.get(info.format, info.format)} "
            f"(accepted: {_ACCEPTED}): {shown}"
        )
    return Source(uri=uri, data=data, sha256=hashlib.sha256(data).hexdigest(), info=info)


def _pil_format(data: bytes) -> str | None:
    """Pillow's name for the format of `data`, for a refusal message (header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                return im.format
    except Exception:  # only a nicer message is at stake
        return None


def _local_path(uri: str) -> Path:
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise _LoadFailure(f"file URI on another host is not supported: {uri}")
        return Path(url2pathname(parts.path))
    return Path(uri)


def _unsupported_location(uri: str) -> str:
    scheme = urlsplit(uri).scheme if "://" in uri else ""
    if scheme:
        return (
            f"unsupported URI scheme {scheme!r} in {redact_uri(uri)} "
            "(expected an absolute path, file://, s3://, http:// or https://)"
        )
    return (
        f"not an absolute path: {uri!r} "
        "(expected an absolute path, file://, s3://, http:// or https://)"
    )


def _s3_reason(exc: ClientError, uri: str, bucket: str) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code == "NoSuchBucket":
        return f"s3 bucket not found: {bucket} ({uri})"
    if code in _S3_NOT_FOUND:
        return f"s3 object not found: {uri}"
    if code in _S3_DENIED:
        return f"access denied reading {uri}"
    if code in _S3_BAD_CREDENTIALS:
        return f"AWS credentials refused ({code}) reading {uri}"
    message = redact_text(str(error.get("Message") or ""))
    return f"s3 error {code or 'unknown'} reading {uri}" + (f": {message}" if message else "")


def _http_reason(exc: httpx.HTTPError) -> str:
    text = redact_text(str(exc).strip())
    return text or type(exc).__name__


def redact_uri(uri: str) -> str:
    """`uri` without credentials: no `user:password@`, no query string (presigned URLs carry
    the access key id and signature there)."""
    if "://" not in uri:
        return uri
    with contextlib.suppress(ValueError):
        parts = urlsplit(uri)
        netloc = parts.netloc.rpartition("@")[2]
        query = "..." if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    return uri.split("?", 1)[0]


def redact_text(text: str) -> str:
    """`text` with every URL in it passed through `redact_uri`."""
    return _URL_IN_TEXT_RE.sub(lambda m: redact_uri(m.group(0)), text)


def human_size(n: int) -> str:
    """`52428800` -> `50 MiB`; exact units when they fit, else one decimal."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if n % scale == 0 else f"{value:.1f} {unit}"
    return f"{n} bytes"
