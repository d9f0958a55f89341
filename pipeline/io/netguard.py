"""Server-side request forgery guard for fetching untrusted http(s) URLs (sources, masks, results).

Rules, for every URL fetched through `guarded_transport` and `open_stream`:

1. Only `http` and `https`; any other scheme is refused, naming it.
2. The host is resolved (an injectable async resolver, by default the system's getaddrinfo) and
   the fetch is refused if ANY address it resolves to is not public (`pipeline.io.addresses`):
   loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local, carrier-grade NAT
   (100.64/10), multicast, broadcast, unspecified, reserved and other special-purpose ranges,
   IPv4-mapped, IPv4-compatible, NAT64 (64:ff9b::/96) and 6to4 (2002::/16) addresses embedding
   such an IPv4 address. IP literals in any form getaddrinfo accepts (`127.1`, `2130706433`,
   `0x7f000001`, `[::ffff:127.0.0.1]`) are caught because what is checked is the resolver's
   answer, never the text of the URL.
3. The connection goes to exactly an address that was checked: the check happens inside the
   network backend at connect time, with one lookup per connection, so DNS rebinding between
   a check and a connect is impossible. TLS still verifies the certificate against (and sends
   SNI for) the URL's host name. Proxies (and the proxy environment variables) are not used.
4. Redirects are followed by `open_stream`, not by httpx: at most `MAX_REDIRECTS` hops, each
   hop's URL checked again (its address is checked by the transport when it connects).
5. `AddressPolicy(allow_private=True)` lifts rule 2 (tests, on-premise stores); schemes and
   the redirect cap still apply. `AddressPolicy(extra_allowed=...)` lifts it for named hosts.
6. Every refusal is a `BlockedAddressError` naming the URL (without user-info or query string),
   the host and the reason; no message ever contains a fetched body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from typing import TypeAlias

import httpcore
import httpx

from pipeline.errors import BlockedAddressError
from pipeline.io.addresses import address_reason, parse_ip
from pipeline.io.allowed_roots import ENV_ALLOWED_ROOTS
from pipeline.io.redact import redact_uri as redact_url

log = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_SCHEMES",
    "MAX_REDIRECTS",
    "AddressPolicy",
    "BlockedAddressError",
    "Resolver",
    "check_url",
    "guarded_transport",
    "open_stream",
    "redact_url",
    "source_policy",
    "system_resolver",
]

MAX_REDIRECTS = 5
ALLOWED_SCHEMES = frozenset({"http", "https"})
DEFAULT_HINT = "set --allow-private-sources to allow"

Resolver: TypeAlias = Callable[[str, int], Awaitable[list[str]]]
"""`(host, port) -> IP address strings`; raise `OSError` (e.g. `socket.gaierror`) on failure."""

# A host name as httpx leaves it (lower case, IDNA already applied); `%` and the like refused.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")

# How httpcore's exceptions become httpx's (as httpx's own AsyncHTTPTransport maps them).
_HTTPCORE_TO_HTTPX: dict[type[Exception], type[httpx.HTTPError]] = {
    httpcore.TimeoutException: httpx.TimeoutException,
    httpcore.ConnectTimeout: httpx.ConnectTimeout,
    httpcore.ReadTimeout: httpx.ReadTimeout,
    httpcore.WriteTimeout: httpx.WriteTimeout,
    httpcore.PoolTimeout: httpx.PoolTimeout,
    httpcore.NetworkError: httpx.NetworkError,
    httpcore.ConnectError: httpx.ConnectError,
    httpcore.ReadError: httpx.ReadError,
    httpcore.WriteError: httpx.WriteError,
    httpcore.ProxyError: httpx.ProxyError,
    httpcore.UnsupportedProtocol: httpx.UnsupportedProtocol,
    httpcore.ProtocolError: httpx.ProtocolError,
    httpcore.LocalProtocolError: httpx.LocalProtocolError,
    httpcore.RemoteProtocolError: httpx.RemoteProtocolError,
}


async def system_resolver(host: str, port: int) -> list[str]:
    """The system resolver: every IPv4/IPv6 address `getaddrinfo` gives for `host`."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for family, _, _, _, sockaddr in infos:
        if family == socket.AF_INET:
            addresses.append(str(sockaddr[0]))
        elif family == socket.AF_INET6:
            scope = sockaddr[3] if len(sockaddr) > 3 else 0
            addresses.append(f"{sockaddr[0]}%{scope}" if scope else str(sockaddr[0]))
    return addresses


def _normal_host(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a guarded transport may connect to.

    - `allow_private`: accept every address (schemes and the redirect cap still apply).
    - `resolver`: `(host, port) -> [ip, ...]`; None uses the system resolver.
    - `extra_allowed`: host names (as in the URL; case and a trailing dot ignored) whose
      addresses are accepted whatever they are: an allow-list for an on-premise store, or
      for tests. It matches the URL's host text exactly, never the address: listing
      `store.internal` does not allow `http://10.0.0.5/` even if that is its address, and
      listing `127.0.0.1` allows only URLs spelling that host exactly so.
    - `hint`: appended to refusals of private addresses, to tell the user how to allow them.
    """

    allow_private: bool = False
    resolver: Resolver | None = None
    extra_allowed: frozenset[str] = field(default_factory=frozenset)
    hint: str = DEFAULT_HINT

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "extra_allowed", frozenset(_normal_host(h) for h in self.extra_allowed)
        )

    def check_ip(self, ip: str) -> str | None:
        """None if `ip` may be connected to, else the reason (`"a loopback address"`)."""
        if self.allow_private:
            return None
        return address_reason(ip)

    def check_host_ip(self, host: str, ip: str) -> str | None:
        """`check_ip`, unless `host` is in `extra_allowed`."""
        if _normal_host(host) in self.extra_allowed:
            return None
        return self.check_ip(ip)

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to check and connect to for `host` (an IP literal is itself)."""
        literal = parse_ip(_normal_host(host))
        if literal is not None:
            return [str(literal)]
        resolver = self.resolver or system_resolver
        return list(dict.fromkeys(await resolver(host, port)))

    def refusal(
        self, host: str, port: int, ip: str, reason: str, *, hint: bool = True
    ) -> BlockedAddressError:
        """The error refusing `host`, which is or resolves to `ip`, for `reason`."""
        shown_hint = f" ({self.hint})" if self.hint and hint else ""
        if parse_ip(_normal_host(host)) is not None:
            detail = f"{host} is {reason}{shown_hint}"
        else:
            detail = f"{host} resolves to {ip}, {reason}{shown_hint}"
        return BlockedAddressError(detail, host=f"{host}:{port}", address=ip)


def check_url(url: str) -> None:
    """Refuse (`BlockedAddressError`) a URL that is not http(s) or has no usable host.

    Syntax only: addresses are checked when the guarded transport connects.
    """
    shown = redact_url(url)
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise BlockedAddressError(f"not a valid URL ({exc})", url=shown) from None
    scheme = parsed.scheme
    if scheme not in ALLOWED_SCHEMES:
        what = f"scheme {scheme!r}" if scheme else "a URL without a scheme"
        raise BlockedAddressError(f"{what} is not allowed (only http and https)", url=shown)
    host = parsed.raw_host.decode("ascii", "replace")
    if not host:
        raise BlockedAddressError("no host in the URL", url=shown)
    if parse_ip(host) is None and not _HOST_NAME_RE.fullmatch(host):
        raise BlockedAddressError(f"invalid host name {host!r}", url=shown)


class _GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves once, checks every address, connects to a checked one (by its IP)."""

    def __init__(
        self, policy: AddressPolicy, inner: httpcore.AsyncNetworkBackend | None = None
    ) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def _resolve(self, host: str, port: int, timeout: float | None) -> list[str]:
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._policy.resolve(host, port)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out resolving {host}") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"cannot resolve {host}: no address")
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        deadline = None if timeout is None else time.monotonic() + timeout
        addresses: list[str] = []
        for answer in await self._resolve(host, port, timeout):
            parsed = parse_ip(answer)
            if parsed is None:
                # Refused even when private addresses are allowed: connecting to a name
                # would mean a second, unchecked lookup.
                invalid = "not a valid IP address"
                raise self._policy.refusal(host, port, answer, invalid, hint=False)
            ip = str(parsed)
            reason = self._policy.check_host_ip(host, ip)
            if reason is not None:
                raise self._policy.refusal(host, port, ip, reason)
            addresses.append(ip)
        # Every address passed: try them in order, by address, so no second lookup happens.
        last: httpcore.ConnectError | None = None
        for ip in addresses:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise httpcore.ConnectTimeout(f"timed out connecting to {host}")
            try:
                return await self._inner.connect_tcp(
                    ip,
                    port,
                    timeout=remaining,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except httpcore.ConnectError as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddressError("unix sockets are not allowed", host=path)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@contextlib.contextmanager
def _map_httpcore_exceptions() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        mapped: type[httpx.HTTPError] | None = None
        for from_exc, to_exc in _HTTPCORE_TO_HTTPX.items():
            # The most specific match: httpcore.ReadTimeout -> httpx.ReadTimeout.
            if isinstance(exc, from_exc) and (mapped is None or issubclass(to_exc, mapped)):
                mapped = to_exc
        if mapped is None:
            raise
        raise mapped(str(exc)) from exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _map_httpcore_exceptions():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()


class _GuardedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool whose network backend is `_GuardedBackend`."""

    def __init__(
        self,
        policy: AddressPolicy,
        *,
        max_connections: int = 64,
        verify: ssl.SSLContext | bool = True,
        inner_backend: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        if isinstance(verify, ssl.SSLContext):
            ssl_context = verify
        else:
            # As httpx does: SSL_CERT_FILE / SSL_CERT_DIR are honoured (a private CA).
            ssl_context = httpx.create_ssl_context(verify=verify)
        self.policy = policy
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=5.0,
            network_backend=_GuardedBackend(policy, inner_backend),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        check_url(url)
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            with _map_httpcore_exceptions():
                response = await self._pool.handle_async_request(core_request)
        except BlockedAddressError as exc:
            raise exc.for_url(redact_url(url)) from None
        assert isinstance(response.stream, AsyncIterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


def guarded_transport(
    policy: AddressPolicy,
    *,
    max_connections: int = 64,
    verify: ssl.SSLContext | bool = True,
) -> httpx.AsyncBaseTransport:
    """An httpx transport that connects only to addresses `policy` accepts.

    Use it as `httpx.AsyncClient(transport=guarded_transport(policy), follow_redirects=False)`
    and fetch with `open_stream`. The client's own `verify`, `limits` and proxy settings do
    not apply to a given transport: pass `verify` (a shared `ssl.SSLContext` saves loading
    the CA bundle again) and `max_connections` here. No proxy is ever used: httpx ignores
    the proxy environment variables for a client given a transport (do not pass the client
    `proxy=` or `mounts=`, which would bypass this transport).
    """
    return _GuardedTransport(policy, max_connections=max_connections, verify=verify)


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return (url.scheme, url.host, url.port)


@contextlib.asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient, url: str, *, max_redirects: int = MAX_REDIRECTS
) -> AsyncIterator[httpx.Response]:
    """GET `url`, following at most `max_redirects` redirects, each hop checked again.

    Yields the final response with its body not read (stream it, with a size cap); a 3xx
    without a Location comes back as it is. Relative Locations are resolved against the
    current URL; every hop is a GET. The client's auth is dropped once a redirect leaves the
    first URL's origin. Raises `BlockedAddressError` for a refused scheme or address and for
    more than `max_redirects` redirects, httpx errors for network and protocol failures.
    """
    check_url(url)
    first = httpx.URL(url)
    current = first
    for hop in range(max_redirects + 1):
        same_origin = _origin(current) == _origin(first)
        request = client.build_request("GET", current)
        if same_origin:
            response = await client.send(request, stream=True, follow_redirects=False)
        else:
            response = await client.send(request, stream=True, follow_redirects=False, auth=None)
        try:
            location = response.headers.get("location") if response.is_redirect else None
            if location is None:
                yield response
                return
            if hop == max_redirects:
                raise BlockedAddressError(
                    f"more than {max_redirects} redirects", url=redact_url(url)
                )
            try:
                target = current.join(location).copy_with(fragment=None)
            except httpx.InvalidURL:
                raise httpx.RemoteProtocolError(
                    f"invalid redirect Location from {redact_url(str(current))}"
                ) from None
        finally:
            await response.aclose()
        try:
            check_url(str(target))
        except BlockedAddressError as exc:
            raise BlockedAddressError(
                f"{exc.detail} (redirected from {redact_url(str(current))})",
                url=exc.url,
            ) from None
        current = target
    raise AssertionError("unreachable")  # pragma: no cover


ENV_ALLOW_PRIVATE_SOURCES = "IMGEDIT_ALLOW_PRIVATE_SOURCES"
_TRUE = frozenset({"1", "true", "yes", "on"})


def source_policy(
    requested: bool = False, environ: Mapping[str, str] | None = None
) -> AddressPolicy:
    """The address policy of a run's sources: private addresses refused unless opted in.

    The worker's `IMGEDIT_ALLOW_PRIVATE_SOURCES=1` allows them. A run's own request (the
    `--allow-private-sources` flag, a flow parameter) allows them only on a worker without
    `IMGEDIT_ALLOWED_ROOTS`: whoever fills a form on a locked-down worker cannot lift it.
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_ALLOW_PRIVATE_SOURCES, "").strip().lower() in _TRUE:
        return AddressPolicy(allow_private=True)
    if requested and env.get(ENV_ALLOWED_ROOTS, "").strip():
        log.warning(
            "allow_private_sources is ignored: this worker limits runs with %s (its operator "
            "can set %s=1)",
            ENV_ALLOWED_ROOTS,
            ENV_ALLOW_PRIVATE_SOURCES,
        )
        return AddressPolicy()
    return AddressPolicy(allow_private=requested)
