"""Output storage under an S3 prefix (AWS, MinIO, R2, moto: `endpoint_url` picks which).

Objects are read and written through `pipeline.io.s3` (the one place GetObject and PutObject
are called) and every failure is worded by its one mapping, `s3_error`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.errors import StorageError, StorageNotFound
from pipeline.io.keys import ShardedListing, check_key, check_prefix
from pipeline.io.local_storage import md5_etag
from pipeline.io.s3 import (
    DENIED_CODES,
    NOT_FOUND_CODES,
    PRECONDITION_CODES,
    S3_ERRORS,
    error_code,
    http_status,
    read_object,
    s3_error,
    write_object,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:  # boto3-stubs is a dev dependency only
    S3Client = Any

__all__ = ["MULTIPART_THRESHOLD", "S3_LIST_PAGE_SIZE", "S3Storage"]

# list_objects_v2 returns at most 1000 keys per call whatever is asked.
S3_LIST_PAGE_SIZE = 1000
# Files above this go up as a multipart upload (S3 caps a single PUT at 5 GiB).
MULTIPART_THRESHOLD = 64 * 2**20


class S3Storage(ShardedListing):
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
        try:
            write_object(self.client, self.bucket, s3_key, data, content_type=content_type)
        except S3_ERRORS as exc:
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
            reason = exc.strerror or type(exc).__name__
            raise StorageError(f"cannot read {path} to store it: {reason}") from exc
        return f"s3://{self.bucket}/{s3_key}"

    def get_bytes(self, key: str) -> bytes:
        return self.get_with_etag(key)[0]

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

    def _conditional_put(
        self,
        key: str,
        data: bytes,
        *,
        if_none_match: str | None = None,
        if_match: str | None = None,
    ) -> str | None:
        s3_key = self._key(key)
        try:
            etag = write_object(
                self.client,
                self.bucket,
                s3_key,
                data,
                if_none_match=if_none_match,
                if_match=if_match,
            )
        except ClientError as exc:
            if error_code(exc) in PRECONDITION_CODES or http_status(exc) in (409, 412):
                return None
            if if_match and error_code(exc) in NOT_FOUND_CODES:
                return None
            raise self._error("write", s3_key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("write", s3_key, exc) from exc
        return etag or md5_etag(data)

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        """Create `key` unless it exists (`If-None-Match: *`); its ETag, or None if it existed."""
        return self._conditional_put(key, data, if_none_match="*")

    def put_if_match(self, key: str, data: bytes, etag: str) -> str | None:
        """Replace `key` if its ETag is `etag` (`If-Match`); the new ETag, or None."""
        return self._conditional_put(key, data, if_match=etag)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        s3_key = self._key(key)
        try:
            obj = read_object(self.client, self.bucket, s3_key)
        except S3_ERRORS as exc:
            raise self._error("read", s3_key, exc) from exc
        return obj.data, obj.etag or md5_etag(obj.data)

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
                    fatal=str(first.get("Code")) in DENIED_CODES,
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
        return s3_error(exc, self.bucket, s3_key, action=action)
