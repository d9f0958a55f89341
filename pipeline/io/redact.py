"""Locations as they may be shown: in messages, logs, results tables and sidecars.

A URI can carry secrets in two places: the user-info (`https://user:password@host/...`, an
endpoint URL with credentials) and the query string (a pre-signed URL's access key id and
signature). Both go; the query is shown as `?...` so a reader still sees there was one.
Local paths are shown as they are.
"""

from __future__ import annotations

import contextlib
import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["redact_text", "redact_uri"]

# `scheme:` at the start of a URI (two characters at least: `c:` is a Windows drive).
_SCHEME_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]+:")
# A URL quoted somewhere in a text (an exception's message, a server's answer).
_URL_IN_TEXT_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_uri(uri: str) -> str:
    """`uri` without `user:password@`, its query string replaced by `...`, no fragment.

    Anything that does not start with a scheme (a local path, even one holding `?` or `#`)
    is returned unchanged. A URL that does not parse (`http://[::1/x?k=v`) is cut by hand
    the same way.
    """
    if not _SCHEME_RE.match(uri):
        return uri
    with contextlib.suppress(ValueError):
        parts = urlsplit(uri)
        netloc = parts.netloc.rpartition("@")[2]
        query = "..." if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    shown = uri.split("?", 1)[0].split("#", 1)[0]
    if "://" in shown:
        scheme, _, rest = shown.partition("://")
        authority, slash, path = rest.partition("/")
        shown = f"{scheme}://{authority.rpartition('@')[2]}{slash}{path}"
    return shown + ("?..." if "?" in uri else "")


def redact_text(text: str) -> str:
    """`text` with every URL in it passed through `redact_uri`."""
    return _URL_IN_TEXT_RE.sub(lambda m: redact_uri(m.group(0)), text)
