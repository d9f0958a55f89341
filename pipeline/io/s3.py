"""S3: addressing, clients, the object calls, and the one mapping of S3 failures.

`endpoint_url` is the only switch between AWS, MinIO, R2 and moto. Every GetObject and
PutObject of the pipeline is made here (`read_object`, `open_object`, `write_object`), and
every failed S3 call becomes an error of `pipeline.errors` through `s3_error`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from enum import Enum
from typing import IO, TYPE_CHECKING, Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from botocore.response import StreamingBody

from pipeline.errors import ConfigError, StorageError, StorageNotFound
from pipeline.io.redact import redact_text

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:  # boto3-stubs is a dev dependency only
    S3Client = Any

# Enough connections for a high-concurrency run; botocore's default pool is 10.
DEFAULT_MAX_POOL_CONNECTIONS = 128


# Bytes read at a time when a whole object is streamed to a file.
DOWNLOAD_CHUNK = 8 * 2**20


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def is_s3_uri(uri: str) -> bool:
    return uri.startswith("s3://")


def parse_s3_uri(uri: str) -> S3Location:
    if not is_s3_uri(uri):
        raise ConfigError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ConfigError(f"s3 URI without a bucket: {uri!r}")
    return S3Location(bucket, key)


def resolve_endpoint_url(endpoint_url: str | None = None) -> str | None:
    """The argument, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, else AWS itself."""
    return (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


@functools.cache
def _shared_loader(data_path: str | None) -> botocore.loaders.Loader:
    return botocore.loaders.create_loader(data_path)


def make_s3_client(
    endpoint_url: str | None = None,
    *,
    max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
) -> S3Client:
    """A boto3 S3 client on boto3's own credential chain, with a pool sized for concurrency.

    Retries use botocore's standard mode, which already backs off on throttling and 5xx.
    """
    config = Config(
        max_pool_connections=max_pool_connections,
        retries={"max_attempts": 5, "mode": "standard"},
        # Path-style works on MinIO and moto without DNS for bucket subdomains.
        s3={"addressing_style": "path"} if resolve_endpoint_url(endpoint_url) else None,
    )
    core = botocore.session.get_session()
    # A new session reads botocore's endpoint and model files again (~0.2 s of JSON each
    # time, and a run makes several clients); the shared loader reads them once per process.
    # Credentials are still resolved per client, from the environment at that moment.
    core.register_component("data_loader", _shared_loader(core.get_config_variable("data_path")))
    # Listings parse each key's LastModified with dateutil (~70 us a key, 7 s of CPU for a
    # 100k-job resume); nothing here reads S3 timestamps, so they stay text.
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    client: S3Client = boto3.session.Session(botocore_session=core).client(
        "s3", endpoint_url=resolve_endpoint_url(endpoint_url), config=config
    )
    return client


# --- object calls ------------------------------------------------------------------------

# What a failed S3 call raises; `s3_error` turns each into an error of the tree.
S3_ERRORS = (ClientError, BotoCoreError)


@dataclass(frozen=True)
class S3Object:
    """A whole object read: its bytes and ETag; `over` when it is larger than the limit asked
    (then `data` holds only what was read before the limit stopped the read)."""

    data: bytes
    etag: str | None
    over: bool = False


def read_object(
    client: S3Client,
    bucket: str,
    key: str,
    *,
    limit: int | None = None,
    if_match: str | None = None,
) -> S3Object:
    """The object's bytes; with `limit`, at most `limit + 1` bytes are read whatever the
    object's declared length, and `over` says it is larger. Raises S3_ERRORS."""
    args: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if if_match:
        args["IfMatch"] = if_match
    resp = client.get_object(**args)
    body = resp["Body"]
    etag = resp.get("ETag")
    try:
        if limit is not None and int(resp.get("ContentLength") or 0) > limit:
            return S3Object(b"", etag, over=True)
        data: bytes = body.read() if limit is None else body.read(limit + 1)
    finally:
        body.close()
    return S3Object(data, etag, over=limit is not None and len(data) > limit)


def open_object(
    client: S3Client, bucket: str, key: str, *, if_match: str | None = None
) -> tuple[StreamingBody, str | None]:
    """A stream over the object's bytes (the caller closes it) and its ETag. Raises S3_ERRORS."""
    args: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if if_match:
        args["IfMatch"] = if_match
    resp = client.get_object(**args)
    return resp["Body"], resp.get("ETag")


def download_object(
    client: S3Client, bucket: str, key: str, out: IO[bytes], *, if_match: str | None = None
) -> str | None:
    """The object into `out`, streamed; its ETag. With `if_match`, only that version (S3
    answers 412 for any other). Raises S3_ERRORS."""
    body, etag = open_object(client, bucket, key, if_match=if_match)
    try:
        while chunk := body.read(DOWNLOAD_CHUNK):
            out.write(chunk)
    finally:
        body.close()
    return etag


def write_object(
    client: S3Client,
    bucket: str,
    key: str,
    data: bytes,
    *,
    content_type: str | None = None,
    if_none_match: str | None = None,
    if_match: str | None = None,
) -> str | None:
    """Write the object whole; its ETag as S3 reports it (None if it does not). Raises
    S3_ERRORS; a failed condition is a ClientError with a PRECONDITION_CODES code, or 409/412."""
    extra: dict[str, Any] = {}
    if content_type:
        extra["ContentType"] = content_type
    if if_none_match:
        extra["IfNoneMatch"] = if_none_match
    if if_match:
        extra["IfMatch"] = if_match
    resp = client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
    etag = resp.get("ETag")
    return str(etag) if etag else None


# --- failures ----------------------------------------------------------------------------


class S3Problem(Enum):
    """What a failed S3 call means, whatever the service called it."""

    NOT_FOUND = "not found"
    NO_BUCKET = "no such bucket"
    DENIED = "access denied"
    BAD_CREDENTIALS = "credentials refused"
    NO_CREDENTIALS = "no credentials"
    PRECONDITION = "condition failed"
    OTHER = "other"


NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
NO_BUCKET_CODES = frozenset({"NoSuchBucket"})
DENIED_CODES = frozenset({"AccessDenied", "403", "Forbidden", "AllAccessDisabled"})
BAD_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)
# A conditional call whose condition failed (412), or lost a race with another (409).
PRECONDITION_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
# Problems no later call can get past either: a run stops spending on them.
_FATAL = frozenset(
    {S3Problem.NO_BUCKET, S3Problem.DENIED, S3Problem.BAD_CREDENTIALS, S3Problem.NO_CREDENTIALS}
)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if isinstance(status, int) else None


def s3_problem(exc: ClientError | BotoCoreError, *, missing_on_404: bool = True) -> S3Problem:
    """The one reading of S3's error codes. A bare 404 (a HEAD has no body, so no code) is
    NOT_FOUND when `missing_on_404` (reads and checks), OTHER otherwise."""
    if isinstance(exc, NoCredentialsError):
        return S3Problem.NO_CREDENTIALS
    if not isinstance(exc, ClientError):
        return S3Problem.OTHER
    code, status = error_code(exc), http_status(exc)
    if code in NO_BUCKET_CODES:
        return S3Problem.NO_BUCKET
    if code in NOT_FOUND_CODES or (status == 404 and missing_on_404):
        return S3Problem.NOT_FOUND
    if code in DENIED_CODES or (status == 403 and not code):
        return S3Problem.DENIED
    if code in BAD_CREDENTIAL_CODES:
        return S3Problem.BAD_CREDENTIALS
    if code in PRECONDITION_CODES or status == 412:
        return S3Problem.PRECONDITION
    return S3Problem.OTHER


def s3_error(
    exc: ClientError | BotoCoreError, bucket: str, key: str, *, action: str | None = None
) -> StorageError:
    """The error of the tree for a failed call on `s3://bucket/key`, in words, never quoting
    credentials: StorageNotFound when nothing is there, `fatal` when no later call can work.

    With `action` ("write", "list", "read manifest"...), worded for an operation on a store:
    `cannot write s3://b/k: access denied`. Without, for a read of an object someone named
    (a source image, a sidecar): `s3 object not found: s3://b/k`.
    """
    where = f"s3://{bucket}/{key}"
    verb = (action or "read").split(" ", 1)[0]
    problem = s3_problem(exc, missing_on_404=verb in ("read", "check"))
    fatal = problem in _FATAL
    code = error_code(exc) if isinstance(exc, ClientError) else ""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        detail = redact_text(str(error.get("Message") or ""))
    else:
        detail = redact_text(str(exc))
    if action is None:
        message = _named_object_message(
            problem, where, bucket, code, detail, isinstance(exc, ClientError)
        )
    else:
        message = f"cannot {action} {where}: {_store_reason(problem, bucket, code, detail, exc)}"
    if problem is S3Problem.NOT_FOUND:
        return StorageNotFound(message if action is None else f"not found: {where}")
    return StorageError(message, fatal=fatal)


def _store_reason(problem: S3Problem, bucket: str, code: str, detail: str, exc: Exception) -> str:
    if problem is S3Problem.NO_CREDENTIALS:
        return "no AWS credentials found (environment, shared config, or instance role)"
    if problem is S3Problem.NO_BUCKET:
        return f"bucket {bucket!r} does not exist"
    if problem is S3Problem.DENIED:
        return "access denied"
    if problem is S3Problem.BAD_CREDENTIALS:
        return f"credentials refused ({code})"
    if problem is S3Problem.PRECONDITION:
        return "it changed while it was being read; start again"
    if not isinstance(exc, ClientError):
        return detail
    status = http_status(exc)
    return f"{code or 'error'}: {detail or code or f'HTTP {status}'}"


def _named_object_message(
    problem: S3Problem, where: str, bucket: str, code: str, detail: str, client_error: bool
) -> str:
    if problem is S3Problem.NOT_FOUND:
        return f"s3 object not found: {where}"
    if problem is S3Problem.NO_BUCKET:
        return f"s3 bucket not found: {bucket} ({where})"
    if problem is S3Problem.DENIED:
        return f"access denied reading {where}"
    if problem is S3Problem.BAD_CREDENTIALS:
        return f"AWS credentials refused ({code}) reading {where}"
    if problem is S3Problem.NO_CREDENTIALS:
        return f"no AWS credentials found to read {where}"
    if problem is S3Problem.PRECONDITION:
        return f"{where} changed while it was being read"
    if not client_error:
        return f"cannot read {where}: {detail}"
    return f"s3 error {code or 'unknown'} reading {where}" + (f": {detail}" if detail else "")
