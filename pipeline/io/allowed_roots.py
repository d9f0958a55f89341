"""Which local folders and s3:// prefixes a run may read and write (`IMGEDIT_ALLOWED_ROOTS`).

A shared worker holds credentials for whole buckets and a filesystem full of other people's
files, while anyone who may start a run types its `manifest` and `output` in a form. The
worker's operator sets `IMGEDIT_ALLOWED_ROOTS` to a comma-separated list of local folders and
`s3://bucket[/prefix]` roots; a manifest, an output, a catalogue prefix and every local or S3
source and mask must then lie under one of them, or the run (for a source: the row) is
refused with a message. Unset, nothing is restricted (the CLI on a laptop).

Local paths are compared after resolving symlinks and `..`, so a link inside a root that
points outside it is outside. S3 roots match whole key segments: `s3://b/team` allows
`s3://b/team/x.png`, not `s3://b/teammate/x.png`. `http(s)://` sources are not paths: the
address rules of `pipeline.io.netguard` govern them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.errors import PathNotAllowedError

ENV_ALLOWED_ROOTS = "IMGEDIT_ALLOWED_ROOTS"
# Roots quoted in a refusal; more are counted, so a long list cannot flood a log line.
MAX_SHOWN_ROOTS = 8


@dataclass(frozen=True)
class AllowedRoots:
    """The roots a run may touch; `check` raises PathNotAllowedError for anything else."""

    local: tuple[str, ...] = ()
    s3: tuple[tuple[str, str], ...] = ()  # (bucket, key prefix without trailing '/')

    @classmethod
    def parse(cls, text: str) -> AllowedRoots:
        """Roots from `a,b,c`: absolute local folders, `file://` URIs and `s3://` roots."""
        local: list[str] = []
        s3: list[tuple[str, str]] = []
        for raw in text.replace("\n", ",").split(","):
            item = raw.strip()
            if not item:
                continue
            if item.startswith("s3://"):
                bucket, _, prefix = item[len("s3://") :].partition("/")
                if not bucket:
                    raise PathNotAllowedError(f"{ENV_ALLOWED_ROOTS}: {item!r} names no bucket")
                s3.append((bucket, prefix.strip("/")))
                continue
            path = _local_path(item) if item.startswith("file:") else os.path.expanduser(item)
            if path is None or not os.path.isabs(path):
                raise PathNotAllowedError(
                    f"{ENV_ALLOWED_ROOTS}: {item!r} is neither an absolute folder nor s3://"
                )
            local.append(os.path.realpath(path))
        if not (local or s3):
            raise PathNotAllowedError(f"{ENV_ALLOWED_ROOTS} is set but lists no root")
        return cls(tuple(local), tuple(s3))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AllowedRoots | None:
        """The worker's roots, or None when `IMGEDIT_ALLOWED_ROOTS` is unset or empty."""
        text = (os.environ if environ is None else environ).get(ENV_ALLOWED_ROOTS, "")
        return cls.parse(text) if text.strip() else None

    def describe(self) -> str:
        roots = [*self.local, *(f"s3://{b}/{p}".rstrip("/") for b, p in self.s3)]
        shown = ", ".join(roots[:MAX_SHOWN_ROOTS])
        more = f" and {len(roots) - MAX_SHOWN_ROOTS} more" if len(roots) > MAX_SHOWN_ROOTS else ""
        return shown + more

    def reason(self, uri: str) -> str | None:
        """Why `uri` is outside every root, or None when a root holds it (or it is http)."""
        if uri.startswith(("http://", "https://")):
            return None
        if uri.startswith("s3://"):
            bucket, _, key = uri[len("s3://") :].partition("/")
            for root_bucket, prefix in self.s3:
                if bucket == root_bucket and (
                    not prefix or key == prefix or key.startswith(prefix + "/")
                ):
                    return None
            return f"outside the allowed roots ({ENV_ALLOWED_ROOTS}: {self.describe()})"
        path = _local_path(uri)
        if path is None:
            return f"not a local path or s3:// URI (allowed roots: {self.describe()})"
        real = os.path.realpath(path)
        for root in self.local:
            if real == root or Path(real).is_relative_to(root):
                return None
        return f"outside the allowed roots ({ENV_ALLOWED_ROOTS}: {self.describe()})"

    def check(self, uri: str, what: str) -> None:
        """Raise PathNotAllowedError naming `what` (e.g. "output") unless a root holds `uri`."""
        reason = self.reason(uri)
        if reason is not None:
            raise PathNotAllowedError(f"{what} {_shown(uri)} is {reason}")


def check_allowed(uri: str, what: str, roots: AllowedRoots | None) -> None:
    """`roots.check(uri, what)`, or nothing when no roots are configured."""
    if roots is not None:
        roots.check(uri, what)


def _local_path(uri: str) -> str | None:
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            return None
        return unquote(parts.path)
    if "://" in uri:
        return None
    return os.path.abspath(os.path.expanduser(uri))


def _shown(uri: str) -> str:
    return repr(uri if len(uri) <= 200 else uri[:200] + "...")


__all__ = ["ENV_ALLOWED_ROOTS", "AllowedRoots", "check_allowed"]
