"""S3 addressing and clients: `endpoint_url` is the only switch between AWS, MinIO, R2, moto."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
else:  # boto3-stubs is a dev dependency only
    S3Client = Any

# Enough connections for a high-concurrency run; botocore's default pool is 10.
DEFAULT_MAX_POOL_CONNECTIONS = 128


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
