"""Where a manifest's relative sources resolve, and a source cell made an absolute local path,
an s3:// URI or an http(s):// URL (nothing is read here)."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from pipeline.manifest.cells import CellProblem, show

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


@dataclass(frozen=True)
class SourceBase:
    """Where relative sources resolve: a local directory, or an S3 bucket and key prefix."""

    local_dir: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""

    @classmethod
    def for_manifest(cls, uri: str) -> SourceBase:
        """The base of a manifest at a local absolute path or an `s3://bucket/key` URI."""
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://") :].partition("/")
            return cls(s3_bucket=bucket, s3_prefix=posixpath.dirname(key))
        return cls(local_dir=os.path.dirname(os.path.abspath(uri)))

    def resolve(self, source: str) -> str:
        """An absolute local path, an s3:// URI or an http(s):// URL for `source`.

        Raises CellProblem with the reason when the source cannot be one.
        """
        if "\x00" in source:
            raise CellProblem(f"{show(source)} contains a NUL character")
        m = _SCHEME_RE.match(source)
        if m:
            try:
                return self._resolve_url(source, m.group(1).lower())
            except ValueError as exc:  # urlsplit: an unbalanced "[" of an IPv6 host, say
                if isinstance(exc, CellProblem):
                    raise
                raise CellProblem(f"{show(source)} is not a valid URL: {exc}") from None
        return self._resolve_path(source)

    @staticmethod
    def _resolve_url(source: str, scheme: str) -> str:
        if scheme in ("http", "https"):
            if not urlsplit(source).netloc:
                raise CellProblem(f"{show(source)} has no host")
            return source
        if scheme == "s3":
            bucket, _, key = source[len("s3://") :].partition("/")
            if not bucket or not key:
                raise CellProblem(f"{show(source)} needs a bucket and a key (s3://bucket/key)")
            return source
        if scheme == "file":
            parts = urlsplit(source)
            if parts.netloc not in ("", "localhost"):
                raise CellProblem(f"{show(source)} names another host; file:// must be local")
            path = unquote(parts.path)
            if not path or path == "/":
                raise CellProblem(f"{show(source)} has no path")
            return os.path.normpath(path)
        raise CellProblem(
            f"unsupported scheme {scheme!r} in {show(source)}; expected a local path, "
            "file://, s3:// or http(s)://"
        )

    def _resolve_path(self, source: str) -> str:
        # Most paths are already normal; normpath is only needed for `.`, `..` and `//`.
        plain = not source.startswith(".") and "/." not in source and "//" not in source
        plain = plain and not source.endswith("/")
        if source.startswith("/"):
            return source if plain else os.path.normpath(source)
        if self.s3_bucket is not None:
            if plain:
                key = f"{self.s3_prefix}/{source}" if self.s3_prefix else source
            else:
                key = posixpath.normpath(posixpath.join(self.s3_prefix, source))
                if key in (".", "..") or key.startswith("../"):
                    raise CellProblem(f"relative path {show(source)} leads outside the bucket")
            return f"s3://{self.s3_bucket}/{key}"
        base = self.local_dir or os.getcwd()
        if plain:
            return f"{base}/{source}" if base != "/" else f"/{source}"
        return os.path.normpath(os.path.join(base, source))
