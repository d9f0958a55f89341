"""The SSRF guard: schemes, address checks at connect time, redirects, TLS by host name.

Every server here listens on 127.0.0.1 only; public-looking addresses are only ever
answered by injected resolvers and never connected to (a mock backend stands in).
"""

from __future__ import annotations

import datetime
import io
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpcore
import httpx
import pytest
from PIL import Image

from pipeline.errors import ImgEditError
from pipeline.io.netguard import (
    MAX_REDIRECTS,
    AddressPolicy,
    BlockedAddressError,
    Resolver,
    _GuardedTransport,
    check_url,
    guarded_transport,
    open_stream,
    redact_url,
)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (200, 30, 60)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


# --- a real server on 127.0.0.1 ------------------------------------------------------------


class _Server:
    """Serves `/img.png`, `/redirect-to?u=...` and `/hop/N` (N hops to `/img.png`)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.hits: list[tuple[str, str]] = []  # (path with query, Host header)
        self._lock = threading.Lock()
        self.httpd = _HTTPServer(("127.0.0.1", 0), self._handler(), tls)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.hits]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with server._lock:
                    server.hits.append((self.path, self.headers.get("Host", "")))
                parts = urlsplit(self.path)
                if parts.path == "/img.png":
                    self._send(200, PNG, Content_Type="image/png")
                elif parts.path == "/redirect-to":
                    self._send(302, Location=parse_qs(parts.query)["u"][0])
                elif parts.path.startswith("/hop/"):
                    n = int(parts.path.rsplit("/", 1)[1])
                    # Relative Locations, resolved against the current URL by the client.
                    self._send(302, Location=str(n - 1) if n > 1 else "/img.png")
                else:
                    self._send(404, b"not found")

        return Handler

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


class _HTTPServer(ThreadingHTTPServer):
    """Does the TLS handshake (if any) in the request's own thread, quietly."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        tls: ssl.SSLContext | None,
    ) -> None:
        self.tls = tls
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        wrapped = self.tls.wrap_socket(request, server_side=True)
        try:
            super().finish_request(wrapped, client_address)
        finally:
            wrapped.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # failed handshakes are what some tests provoke


@pytest.fixture(scope="module")
def http_server() -> Iterator[_Server]:
    with _Server() as server:
        yield server


@pytest.fixture
def server(http_server: _Server) -> _Server:
    with http_server._lock:
        http_server.hits.clear()
    return http_server


# --- helpers ---------------------------------------------------------------------------------


def mapping_resolver(
    table: dict[str, list[str]], calls: list[str] | None = None
) -> Callable[[str, int], Awaitable[list[str]]]:
    async def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(table[host])

    return resolve


def client_for(
    policy: AddressPolicy, *, transport: httpx.AsyncBaseTransport | None = None, **kw: Any
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=transport or guarded_transport(policy, **kw),
        follow_redirects=False,
        timeout=httpx.Timeout(5.0),
    )


async def fetch(url: str, policy: AddressPolicy, **kw: Any) -> tuple[int, bytes]:
    async with client_for(policy, **kw) as client, open_stream(client, url) as response:
        return response.status_code, await response.aread()


async def refused(url: str, policy: AddressPolicy | None = None, **kw: Any) -> str:
    with pytest.raises(BlockedAddressError) as info:
        await fetch(url, policy or AddressPolicy(), **kw)
    return str(info.value)


@dataclass
class _RecordingBackend(httpcore.AsyncNetworkBackend):
    """Stands in for the network: records where it is asked to connect, answers 200 "ok"."""

    fail: frozenset[str] = frozenset()
    connects: list[tuple[str, int]] = field(default_factory=list)

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connects.append((host, port))
        if host in self.fail:
            raise httpcore.ConnectError(f"[Errno 111] Connection refused ({host})")
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
        return httpcore.AsyncMockStream([answer])

    async def sleep(self, seconds: float) -> None:
        pass


# --- default policy against the real server --------------------------------------------------


async def test_loopback_refused_by_default_without_a_request(server: _Server) -> None:
    message = await refused(server.url("/img.png"))
    assert message == (
        f"refused http://127.0.0.1:{server.port}/img.png: 127.0.0.1 is a loopback address "
        "(set --allow-private-sources to allow)"
    )
    assert server.hits == []


async def test_allow_private_fetches_the_bytes(server: _Server) -> None:
    status, body = await fetch(server.url("/img.png"), AddressPolicy(allow_private=True))
    assert (status, body) == (200, PNG)
    assert server.paths == ["/img.png"]


async def test_refusal_hides_user_info_and_query(server: _Server) -> None:
    url = f"http://alice:s3cret@127.0.0.1:{server.port}/img.png?X-Amz-Signature=abcdef"
    message = await refused(url)
    assert f"http://127.0.0.1:{server.port}/img.png?..." in message
    assert "s3cret" not in message and "alice" not in message and "abcdef" not in message
    assert server.hits == []


@pytest.mark.parametrize(
    "host",
    ["127.1", "2130706433", "0x7f000001", "[::1]", "[::ffff:127.0.0.1]", "localhost"],
)
async def test_ip_literal_forms_refused_without_a_request(server: _Server, host: str) -> None:
    url = server.url("/img.png", host=host)
    with pytest.raises(BlockedAddressError) as info:
        await fetch(url, AddressPolicy())
    assert "loopback" in str(info.value)
    assert info.value.url == url
    assert server.hits == []


async def test_proxy_environment_is_ignored(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Were the "proxy" (our server) used, it would see an absolute-form request target.
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, server.url(""))
    policy = AddressPolicy(allow_private=True, resolver=_to_loopback("named.test"))
    url = server.url("/img.png", host="named.test")
    client = httpx.AsyncClient(transport=guarded_transport(policy))  # trust_env left on
    async with client, open_stream(client, url) as response:
        assert await response.aread() == PNG
    assert server.hits == [("/img.png", f"named.test:{server.port}")]


async def test_plain_client_get_is_guarded_too(server: _Server) -> None:
    # The transport checks by itself: callers not using open_stream are protected as well.
    async with client_for(AddressPolicy()) as client:
        with pytest.raises(BlockedAddressError, match="loopback"):
            await client.get(server.url("/img.png"))
    assert server.hits == []


def test_blocked_address_error_is_an_imgedit_error() -> None:
    assert issubclass(BlockedAddressError, ImgEditError)
    assert not issubclass(BlockedAddressError, httpx.HTTPError)


# --- injected resolvers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.7", "a private address"),
        ("169.254.169.254", "a link-local address"),
        ("::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
        ("100.64.1.1", "a carrier-grade NAT"),
        ("fd00::1", "a private (unique local) address"),
        ("0.0.0.0", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
    ],
)
async def test_name_resolving_to_a_non_public_address_is_refused(address: str, reason: str) -> None:
    backend = _RecordingBackend()
    policy = AddressPolicy(resolver=mapping_resolver({"images.example.test": [address]}))
    transport = _GuardedTransport(policy, inner_backend=backend)
    async with client_for(policy, transport=transport) as client:
        with pytest.raises(BlockedAddressError) as info:
            async with open_stream(client, "http://images.example.test/x.png?sig=1"):
                pass
    message = str(info.value)
    assert message.startswith(
        "refused http://images.example.test/x.png?...: images.example.test resolves to "
    )
    assert reason in message
    assert info.value.address is not None and info.value.host == "images.example.test:80"
    assert backend.connects == []


async def test_any_non_public_answer_refuses_the_host() -> None:
    backend = _RecordingBackend()
    resolver = mapping_resolver({"mixed.test": ["8.8.8.8", "10.1.2.3"]})
    policy = AddressPolicy(resolver=resolver)
    transport = _GuardedTransport(policy, inner_backend=backend)
    async with client_for(policy, transport=transport) as client:
        with pytest.raises(BlockedAddressError, match=r"10\.1\.2\.3, a private address"):
            await client.get("http://mixed.test/x.png")
    assert backend.connects == []


async def test_name_resolving_to_the_test_server_is_refused_without_a_request(
    server: _Server,
) -> None:
    policy = AddressPolicy(resolver=mapping_resolver({"images.example.test": ["127.0.0.1"]}))
    message = await refused(server.url("/img.png", host="images.example.test"), policy)
    assert "images.example.test resolves to 127.0.0.1, a loopback address" in message
    assert server.hits == []


async def test_connects_by_checked_address_keeping_the_host_name(server: _Server) -> None:
    calls: list[str] = []
    policy = AddressPolicy(
        allow_private=True, resolver=mapping_resolver({"named.test": ["127.0.0.1"]}, calls)
    )
    url = server.url("/img.png", host="named.test")
    async with client_for(policy) as client, open_stream(client, url) as response:
        stream = response.extensions["network_stream"]
        assert stream.get_extra_info("server_addr") == ("127.0.0.1", server.port)
        assert await response.aread() == PNG
    assert calls == ["named.test"]  # one lookup for the one connection
    assert server.hits == [("/img.png", f"named.test:{server.port}")]


async def test_dns_rebinding_answer_is_checked_not_used_unchecked() -> None:
    # First answer public, then loopback: each connection looks up once and connects to
    # exactly what it checked; the rebound answer is refused, never connected to.
    answers = [["93.184.216.34"], ["127.0.0.1"]]
    calls: list[str] = []

    async def rebinding(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[min(len(calls), len(answers)) - 1]

    backend = _RecordingBackend()
    policy = AddressPolicy(resolver=rebinding)
    transport = _GuardedTransport(policy, inner_backend=backend)
    async with client_for(policy, transport=transport) as client:
        async with open_stream(client, "http://rebind.test/x.png") as response:
            assert await response.aread() == b"ok"
        assert backend.connects == [("93.184.216.34", 80)]
        with pytest.raises(BlockedAddressError, match=r"resolves to 127\.0\.0\.1, a loopback"):
            await client.get("http://rebind.test/x.png")
    assert calls == ["rebind.test", "rebind.test"]
    assert backend.connects == [("93.184.216.34", 80)]


async def test_next_checked_address_tried_when_the_first_refuses_the_connection() -> None:
    resolver = mapping_resolver({"dual.test": ["2606:4700::1111", "1.1.1.1"]})
    policy = AddressPolicy(resolver=resolver)
    backend = _RecordingBackend(fail=frozenset({"2606:4700::1111"}))
    transport = _GuardedTransport(policy, inner_backend=backend)
    async with client_for(policy, transport=transport) as client:
        response = await client.get("http://dual.test:8080/x.png")
    assert (response.status_code, response.content) == (200, b"ok")
    assert backend.connects == [("2606:4700::1111", 8080), ("1.1.1.1", 8080)]


async def test_resolver_failure_is_a_connect_error() -> None:
    policy = AddressPolicy(resolver=mapping_resolver({}))
    async with client_for(policy) as client:
        with pytest.raises(httpx.ConnectError, match=r"cannot resolve nowhere\.test"):
            await client.get("http://nowhere.test/x.png")


async def test_resolver_answering_a_name_is_refused_even_when_private_allowed() -> None:
    # Connecting to "localhost" would mean a second, unchecked lookup.
    backend = _RecordingBackend()
    policy = AddressPolicy(
        allow_private=True, resolver=mapping_resolver({"odd.test": ["localhost"]})
    )
    transport = _GuardedTransport(policy, inner_backend=backend)
    async with client_for(policy, transport=transport) as client:
        with pytest.raises(BlockedAddressError) as info:
            await client.get("http://odd.test/x.png")
    assert str(info.value) == (
        "refused http://odd.test/x.png: odd.test resolves to localhost, not a valid IP address"
    )
    assert backend.connects == []


async def test_slow_resolver_is_a_connect_timeout() -> None:
    import asyncio

    async def hang(host: str, port: int) -> list[str]:
        await asyncio.sleep(30)
        return []

    transport = guarded_transport(AddressPolicy(resolver=hang))
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(5.0, connect=0.1)) as c:
        with pytest.raises(httpx.ConnectTimeout):
            await c.get("http://slow.test/x.png")


# --- redirects ------------------------------------------------------------------------------


async def test_redirect_to_an_ip_literal_is_refused(server: _Server) -> None:
    # public.test is allow-listed by name (it really is 127.0.0.1): its redirect to the bare
    # loopback address must still be refused, after exactly one request.
    policy = AddressPolicy(
        resolver=mapping_resolver({"public.test": ["127.0.0.1"]}),
        extra_allowed=frozenset({"public.test"}),
    )
    target = server.url("/img.png")
    first = server.url(f"/redirect-to?u={target}", host="public.test")
    message = await refused(first, policy)
    assert message.startswith(f"refused {target}: 127.0.0.1 is a loopback address")
    assert server.paths == [f"/redirect-to?u={target}"]


async def test_redirect_within_an_allowed_host_is_followed(server: _Server) -> None:
    policy = AddressPolicy(
        resolver=mapping_resolver({"public.test": ["127.0.0.1"]}),
        extra_allowed=frozenset({"PUBLIC.test."}),
    )
    target = server.url("/img.png", host="public.test")
    status, body = await fetch(server.url(f"/redirect-to?u={target}", host="public.test"), policy)
    assert (status, body) == (200, PNG)
    assert server.paths == [f"/redirect-to?u={target}", "/img.png"]


async def test_five_relative_redirects_are_followed(server: _Server) -> None:
    status, body = await fetch(server.url("/hop/5"), AddressPolicy(allow_private=True))
    assert (status, body) == (200, PNG)
    assert server.paths == ["/hop/5", "/hop/4", "/hop/3", "/hop/2", "/hop/1", "/img.png"]


async def test_redirect_chain_is_cut_at_the_cap(server: _Server) -> None:
    message = await refused(server.url("/hop/10"), AddressPolicy(allow_private=True))
    assert message == f"refused {server.url('/hop/10')}: more than {MAX_REDIRECTS} redirects"
    assert server.paths == [f"/hop/{n}" for n in range(10, 10 - MAX_REDIRECTS - 1, -1)]


async def test_redirect_cap_is_adjustable(server: _Server) -> None:
    async with client_for(AddressPolicy(allow_private=True)) as client:
        with pytest.raises(BlockedAddressError, match="more than 1 redirects"):
            async with open_stream(client, server.url("/hop/2"), max_redirects=1):
                pass
        with pytest.raises(BlockedAddressError, match="more than 0 redirects"):
            async with open_stream(client, server.url("/hop/1"), max_redirects=0):
                pass
        async with open_stream(client, server.url("/img.png"), max_redirects=0) as response:
            assert await response.aread() == PNG


async def test_redirect_to_a_file_url_is_refused(server: _Server) -> None:
    first = server.url("/redirect-to?u=file:///etc/passwd")
    message = await refused(first, AddressPolicy(allow_private=True))
    assert message.startswith("refused file:///etc/passwd: scheme 'file' is not allowed")
    assert f"redirected from http://127.0.0.1:{server.port}/redirect-to?..." in message
    assert server.paths == ["/redirect-to?u=file:///etc/passwd"]


# --- schemes and URL syntax ------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd", "ftp://example.test/x.png", "gopher://example.test:70/_x", "x.png"],
)
async def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(BlockedAddressError) as info:
        check_url(url)
    scheme = urlsplit(url).scheme
    assert (f"scheme {scheme!r} is not allowed" if scheme else "without a scheme") in str(
        info.value
    )
    message = await refused(url, AddressPolicy(allow_private=True))
    assert message == str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "http:///x.png",
        "http://exa mple.test/",
        "http://evil.test%2f.x/",
        "http://a..b/",
        "https://[::1/",
    ],
)
def test_urls_without_a_usable_host_are_refused(url: str) -> None:
    with pytest.raises(BlockedAddressError):
        check_url(url)


@pytest.mark.parametrize("url", ["http://images.example.test/x.png", "https://[2001:db8::1]/"])
def test_check_url_accepts_http_and_https(url: str) -> None:
    check_url(url)


def test_redact_url() -> None:
    assert (
        redact_url("https://u:p@h.test:8443/a/b.png?sig=1#f") == "https://h.test:8443/a/b.png?..."
    )
    assert redact_url("http://h.test/a.png") == "http://h.test/a.png"
    assert redact_url("file:///etc/passwd") == "file:///etc/passwd"
    assert redact_url("http://[::1/x?k=v") == "http://[::1/x?..."


# --- AddressPolicy.check_ip ------------------------------------------------------------------


@pytest.mark.parametrize(
    "ip",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "64:ff9b::808:808",  # NAT64 of a public address
        "2002:808:808::1",  # 6to4 of a public address
    ],
)
def test_check_ip_allows_public_addresses(ip: str) -> None:
    assert AddressPolicy().check_ip(ip) is None


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.0.9", "a loopback address"),
        ("10.0.0.7", "a private address"),
        ("172.16.0.1", "a private address"),
        ("172.31.255.254", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a link-local address"),
        ("100.64.1.1", "a carrier-grade NAT (100.64.0.0/10) address"),
        ("100.127.255.254", "a carrier-grade NAT (100.64.0.0/10) address"),
        ("0.0.0.0", "an unspecified address"),
        ("0.1.2.3", "a 'this network' (0.0.0.0/8) address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("255.255.255.255", "a broadcast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.2.10", "a special-purpose (non-public) address"),
        ("198.18.0.1", "a special-purpose (non-public) address"),
        ("::", "an unspecified address"),
        ("::1", "a loopback address"),
        ("fe80::1", "a link-local address"),
        ("fe80::1%1", "a link-local address"),
        ("fec0::1", "a site-local address"),
        ("fd00::1", "a private (unique local) address"),
        ("fc00::1", "a private (unique local) address"),
        ("ff02::1", "a multicast address"),
        ("::ffff:127.0.0.1", "a loopback address (IPv4-mapped 127.0.0.1)"),
        ("::ffff:10.0.0.1", "a private address (IPv4-mapped 10.0.0.1)"),
        ("::ffff:169.254.169.254", "a link-local address (IPv4-mapped 169.254.169.254)"),
        ("::127.0.0.1", "an IPv4-compatible IPv6 address (127.0.0.1)"),
        ("::8.8.8.8", "an IPv4-compatible IPv6 address (8.8.8.8)"),
        ("64:ff9b::127.0.0.1", "a loopback address (NAT64 of 127.0.0.1)"),
        ("64:ff9b::a9fe:a9fe", "a link-local address (NAT64 of 169.254.169.254)"),
        ("64:ff9b:1::1", "a local-use NAT64 address"),
        ("2002:7f00:1::1", "a loopback address (6to4 of 127.0.0.1)"),
        ("2002:c0a8:101::1", "a private address (6to4 of 192.168.1.1)"),
        ("2001:db8::1", "a special-purpose (non-public) address"),
        ("2001::1", "a special-purpose (non-public) address"),
        ("100::1", "a reserved address"),
        ("not-an-ip", "not a valid IP address"),
        ("127.1", "not a valid IP address"),
    ],
)
def test_check_ip_refuses_non_public_addresses(ip: str, reason: str) -> None:
    assert AddressPolicy().check_ip(ip) == reason
    assert AddressPolicy(allow_private=True).check_ip(ip) is None


def test_extra_allowed_matches_host_names_not_addresses() -> None:
    policy = AddressPolicy(extra_allowed=frozenset({"Store.Internal."}))
    assert policy.check_host_ip("store.internal", "10.0.0.5") is None
    assert policy.check_host_ip("10.0.0.5", "10.0.0.5") == "a private address"
    assert policy.check_ip("10.0.0.5") == "a private address"


# --- TLS --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Certs:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> _Certs:
    """A throwaway CA and a certificate for `tls.test` signed by it."""
    pytest.importorskip("cryptography")
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("netguard test CA"))
        .issuer_name(name("netguard test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("tls.test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("tls.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(ca_key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("netguard-tls")
    cert_file = directory / "tls.test.pem"
    key_file = directory / "tls.test.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return _Certs(ca.public_bytes(serialization.Encoding.PEM), cert_file, key_file)


@pytest.fixture(scope="module")
def tls_module_server(certs: _Certs) -> Iterator[_Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    with _Server(tls=context) as server:
        yield server


@pytest.fixture
def tls_server(tls_module_server: _Server) -> _Server:
    with tls_module_server._lock:
        tls_module_server.hits.clear()
    return tls_module_server


def _trusting(certs: _Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cadata=certs.ca_pem.decode())


def _to_loopback(*names: str) -> Resolver:
    return mapping_resolver({name: ["127.0.0.1"] for name in names})


async def test_tls_verifies_the_certificate_against_the_host_name(
    tls_server: _Server, certs: _Certs
) -> None:
    # Connected by IP, yet SNI and the certificate check use the URL's name.
    policy = AddressPolicy(allow_private=True, resolver=_to_loopback("tls.test"))
    url = tls_server.url("/img.png", host="tls.test", scheme="https")
    status, body = await fetch(url, policy, verify=_trusting(certs))
    assert (status, body) == (200, PNG)
    assert tls_server.hits == [("/img.png", f"tls.test:{tls_server.port}")]


async def test_tls_refuses_a_certificate_for_another_name(
    tls_server: _Server, certs: _Certs
) -> None:
    policy = AddressPolicy(allow_private=True, resolver=_to_loopback("other.test"))
    url = tls_server.url("/img.png", host="other.test", scheme="https")
    with pytest.raises(httpx.ConnectError, match=r"(?i)hostname|certificate"):
        await fetch(url, policy, verify=_trusting(certs))
    assert tls_server.paths == []


async def test_tls_refuses_an_untrusted_certificate_by_default(tls_server: _Server) -> None:
    policy = AddressPolicy(allow_private=True, resolver=_to_loopback("tls.test"))
    url = tls_server.url("/img.png", host="tls.test", scheme="https")
    with pytest.raises(httpx.ConnectError, match=r"(?i)certificate"):
        await fetch(url, policy)  # verify=True: the system's CAs
    assert tls_server.paths == []


async def test_https_to_a_plain_http_server_is_a_connect_error(server: _Server) -> None:
    policy = AddressPolicy(allow_private=True)
    with pytest.raises(httpx.ConnectError):
        await fetch(server.url("/img.png", scheme="https"), policy)
