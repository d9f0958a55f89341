"""Where a manifest's bytes are: a local file, or an S3 object read through `pipeline.io.s3`.

An S3 manifest is pinned to the ETag its first read saw: a manifest replaced between the
check and the run (or between two passes) would otherwise give rows nobody checked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import ManifestError, StorageNotFound
from pipeline.io.s3 import (
    S3_ERRORS,
    download_object,
    http_status,
    make_s3_client,
    open_object,
    s3_error,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:  # boto3-stubs is a dev dependency only
    S3Client = Any

__all__ = ["ManifestFile"]

# What S3 answers a read pinned to a version (If-Match) that is no longer the object's.
HTTP_PRECONDITION = 412


class ManifestFile:
    """A manifest's bytes: a local file or an S3 object (pinned to the ETag first seen)."""

    def __init__(
        self, uri: str, *, endpoint_url: str | None = None, etag: str | None = None
    ) -> None:
        self.uri = uri
        self.bucket: str | None = None
        self.key = ""
        self.path = ""
        # Given: another reader of this run saw this version first; every read must see it.
        self._etag: str | None = etag
        self._client: S3Client | None = None
        self._endpoint_url = endpoint_url
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://") :].partition("/")
            if not bucket or not key or key.endswith("/"):
                raise ManifestError(f"manifest URI {uri} must name an object: s3://bucket/key")
            self.bucket, self.key = bucket, key
        elif uri.lower().startswith("file://"):
            parts = urlsplit(uri)
            if parts.netloc not in ("", "localhost"):
                raise ManifestError(f"manifest URI {uri} names another host; file:// is local")
            self.path = os.path.abspath(unquote(parts.path))
            self._check_local()
        elif "://" in uri:
            raise ManifestError(
                f"unsupported manifest location {uri}: expected a local path, file:// or s3://"
            )
        else:
            self.path = os.path.abspath(uri)
            self._check_local()

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None

    @property
    def etag(self) -> str | None:
        """The S3 version every read of this manifest is pinned to (None: local, or unread)."""
        return self._etag

    def _check_local(self) -> None:
        try:
            os.stat(self.path)
        except FileNotFoundError:
            raise ManifestError(f"manifest not found: {self.path}") from None
        except OSError as exc:
            raise ManifestError(f"cannot read manifest {self.path}: {exc.strerror}") from exc
        if os.path.isdir(self.path):
            raise ManifestError(f"manifest {self.path} is a directory, not a file")
        if not os.access(self.path, os.R_OK):
            raise ManifestError(f"cannot read manifest {self.path}: permission denied")

    def _s3(self) -> S3Client:
        if self._client is None:
            self._client = make_s3_client(self._endpoint_url)
        return self._client

    def _s3_error(self, exc: ClientError | BotoCoreError) -> ManifestError:
        assert self.bucket is not None
        if self._etag and isinstance(exc, ClientError) and http_status(exc) == HTTP_PRECONDITION:
            return ManifestError(
                f"manifest {self.uri} changed since this run first read it: the run reads one "
                "version from its plan to its end; run it again to read the new one"
            )
        err = s3_error(exc, self.bucket, self.key, action="read manifest")
        if isinstance(err, StorageNotFound):
            return ManifestError(f"manifest not found: {self.uri}")
        return ManifestError(str(err))

    def open(self) -> pa.NativeFile:
        """A fresh stream over the raw bytes, from the start."""
        if not self.is_s3:
            try:
                return pa.OSFile(self.path, mode="r")
            except OSError as exc:
                raise ManifestError(f"cannot read manifest {self.path}: {exc}") from exc
        assert self.bucket is not None
        try:
            # Every pass must read the same object: a manifest replaced between validation
            # and the run would otherwise give rows that were never validated.
            body, etag = open_object(self._s3(), self.bucket, self.key, if_match=self._etag)
        except S3_ERRORS as exc:
            raise self._s3_error(exc) from exc
        self._etag = self._etag or etag
        return pa.PythonFile(body, mode="r")

    def download(self) -> str:
        """The object in a temporary file (the caller deletes it)."""
        assert self.bucket is not None
        fd, path = tempfile.mkstemp(prefix="imgedit-manifest-", suffix=".parquet")
        try:
            with os.fdopen(fd, "wb") as out:
                etag = download_object(self._s3(), self.bucket, self.key, out, if_match=self._etag)
            self._etag = self._etag or etag
        except (*S3_ERRORS, OSError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            if isinstance(exc, OSError):
                raise ManifestError(f"cannot download manifest {self.uri}: {exc}") from exc
            raise self._s3_error(exc) from exc
        return path
