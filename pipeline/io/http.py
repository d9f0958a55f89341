"""The one place source images and result images are fetched over HTTP: a capped GET.

`get_capped` streams a body and stops at the cap whatever the headers say (a declared length
over the cap is refused before reading). Untrusted URLs go through `pipeline.io.netguard`
(`open_stream` on a client with a guarded transport: every redirect hop checked); a URL on a
trusted origin (the edit API's own, on its own pools) is fetched plainly, without redirects.
What the caller raises for a bad status or an oversized body is the caller's: a source read
and a result download word them differently.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import httpx

from pipeline.io.netguard import MAX_REDIRECTS, open_stream

__all__ = ["get_capped"]


@contextlib.asynccontextmanager
async def _get(
    client: httpx.AsyncClient, url: str, *, guarded: bool, max_redirects: int
) -> AsyncIterator[httpx.Response]:
    if guarded:
        async with open_stream(client, url, max_redirects=max_redirects) as response:
            yield response
    else:
        async with client.stream("GET", url) as response:
            yield response


async def get_capped(
    client: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int,
    check_status: Callable[[httpx.Response], None],
    too_large: Callable[[int | None], Exception],
    guarded: bool = True,
    max_redirects: int = MAX_REDIRECTS,
) -> bytes:
    """The body at `url`, at most `max_bytes` of it.

    `check_status(response)` raises for a status the caller does not accept (the body is
    then not read); `too_large(declared)` makes the error for a body over the cap, with its
    declared length when the headers gave one over the cap, None when the stream passed it.
    With `guarded`, redirects are followed by netguard (each hop checked); otherwise none is
    followed. httpx errors and BlockedAddressError propagate.
    """
    async with _get(client, url, guarded=guarded, max_redirects=max_redirects) as response:
        check_status(response)
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise too_large(int(declared))
        buf = bytearray()
        async for chunk in response.aiter_bytes():
            buf += chunk
            # Stop at the cap, whatever the headers said (or did not say).
            if len(buf) > max_bytes:
                raise too_large(None)
        return bytes(buf)
