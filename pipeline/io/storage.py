"""Output storage behind one small synchronous interface: a local folder or an S3 prefix.

The async runner calls it through `asyncio.to_thread`. Keys are relative, `/`-separated paths
under the storage's root; nothing a key says can reach outside that root (`pipeline.io.keys`).
The two stores: `pipeline.io.local_storage.LocalStorage` and
`pipeline.io.s3_storage.S3Storage`; `open_storage` picks one from a URI.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse
from urllib.request import url2pathname

from botocore.exceptions import BotoCoreError

from pipeline.errors import ConfigError, InvalidKeyError
from pipeline.io.keys import (
    DEFAULT_LIST_WORKERS,
    HEX_SHARDS,
    TEMP_PREFIX,
    check_key,
    check_prefix,
)
from pipeline.io.local_storage import LocalStorage
from pipeline.io.redact import redact_text
from pipeline.io.s3 import DEFAULT_MAX_POOL_CONNECTIONS, make_s3_client, parse_s3_uri
from pipeline.io.s3_storage import S3Storage

__all__ = [
    "DEFAULT_LIST_WORKERS",
    "HEX_SHARDS",
    "TEMP_PREFIX",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "check_key",
    "check_prefix",
    "open_storage",
]


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
