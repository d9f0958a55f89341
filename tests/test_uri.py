"""The one reader of whole objects (`pipeline.io.uri`): local, file://, s3 (moto), http (a
real server on 127.0.0.1), its caps and refusals, redaction, and the one S3 error mapping."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from moto import mock_aws

from pipeline.errors import (
    BlockedAddressError,
    PathNotAllowedError,
    StorageError,
    StorageNotFound,
)
from pipeline.io.allowed_roots import AllowedRoots
from pipeline.io.netguard import AddressPolicy
from pipeline.io.redact import redact_text, redact_uri
from pipeline.io.s3 import S3Problem, s3_error, s3_problem
from pipeline.io.uri import UriReader, human_size

# Built from parts so the source holds nothing shaped like a real key id.
FAKE_KEY_ID = "AKIA" + "FAKEKEYID7654321"
SIGNED_QUERY = f"?X-Amz-Credential={FAKE_KEY_ID}%2F20240101&X-Amz-Signature=0123abcd"
BODY = b"some bytes, not an image: the reader does not care"
# The test server is on loopback, which http(s) reads may reach only by opting in.
LOOPBACK = AddressPolicy(allow_private=True)


# --- a real HTTP server --------------------------------------------------------------------


class _Server:
    def __init__(self) -> None:
        self.stop = threading.Event()
        self.streamed = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/ok":
                    self._send(200, BODY)
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/ok")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/busy":
                    self._send(503, b"busy")
                elif path == "/hang":
                    server.stop.wait(10)
                    self._send(200, BODY)
                elif path == "/declared-huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 * 2**30))
                    self.end_headers()
                    self.wfile.write(BODY)
                elif path == "/endless":
                    # No length: the body ends when the connection closes, which is never
                    # unless the client hangs up.
                    self.send_response(200)
                    self.end_headers()
                    chunk = b"\0" * (64 * 1024)
                    try:
                        for _ in range(2000):  # 125 MiB at most
                            self.wfile.write(chunk)
                            server.streamed += len(chunk)
                    except OSError:
                        pass
                else:
                    self._send(404, b"not found")

        return Handler

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture(scope="module")
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.httpd.shutdown()
        srv.httpd.server_close()
        thread.join(timeout=5)


# --- local paths and file:// ---------------------------------------------------------------


def test_local_path_and_file_uri(tmp_path: Path) -> None:
    path = tmp_path / "a b.bin"
    path.write_bytes(BODY)
    with UriReader() as read:
        assert read(str(path)) == BODY
        assert read.read(path.as_uri()) == BODY  # percent-encoded: `a%20b.bin`
        assert read(f"file://localhost{path}") == BODY
        with pytest.raises(StorageError, match="another host"):
            read(f"file://elsewhere{path}")
        with pytest.raises(StorageError, match="unsupported scheme 'ftp'"):
            read("ftp://host/a.bin")


def test_relative_paths_are_read_from_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "rel.bin").write_bytes(BODY)
    monkeypatch.chdir(tmp_path)
    assert UriReader()("rel.bin") == BODY


def test_local_failures_name_the_problem(tmp_path: Path) -> None:
    read = UriReader()
    missing = tmp_path / "missing.bin"
    with pytest.raises(StorageNotFound) as info:
        read(str(missing))
    assert str(info.value) == f"file not found: {missing}"
    with pytest.raises(StorageNotFound):
        read(str(missing / "below"))
    with pytest.raises(StorageError, match="is a directory, not a file") as dir_info:
        read(str(tmp_path))
    assert not isinstance(dir_info.value, StorageNotFound)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    with pytest.raises(StorageError) as info:
        UriReader()(str(fifo))
    assert str(info.value) == f"not a regular file: {fifo}"
    with pytest.raises(StorageError, match="not a regular file"):
        asyncio.run(UriReader().aread(fifo.as_uri()))


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_a_device_is_refused() -> None:
    # A device reports size 0 and would be read forever (up to the cap).
    with pytest.raises(StorageError, match="not a regular file: /dev/zero"):
        UriReader()("/dev/zero")


def test_local_cap(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 2048)
    assert UriReader(max_bytes=2048)(str(path)) == b"x" * 2048
    with pytest.raises(StorageError) as info:
        UriReader(max_bytes=1024)(str(path))
    assert str(info.value) == f"larger than 1 KiB: {path}"
    assert (human_size(1536), human_size(50 * 2**20), human_size(100)) == (
        "1.5 KiB",
        "50 MiB",
        "100 bytes",
    )


def test_allowed_roots(tmp_path: Path) -> None:
    inside = tmp_path / "in"
    inside.mkdir()
    (inside / "a.bin").write_bytes(BODY)
    (tmp_path / "out.bin").write_bytes(BODY)
    read = UriReader(roots=AllowedRoots.parse(f"{inside},s3://team/photos"))
    assert read(str(inside / "a.bin")) == BODY
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        read(str(tmp_path / "out.bin"))
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        read("s3://team/photos-old/a.bin")  # refused before any S3 call


# --- async ------------------------------------------------------------------------------------


def test_async_reads_run_in_the_given_executor(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "a.bin"
    path.write_bytes(BODY)
    seen: list[str] = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kw: Any) -> Any:
            seen.append(getattr(fn, "__name__", "?"))
            return super().submit(fn, *args, **kw)

    async def main() -> bytes:
        with Recording(2) as pool:
            async with UriReader(executor=pool) as reader:
                return await reader.aread(str(path))

    assert asyncio.run(main()) == BODY
    assert seen == ["_read_local"]


# --- S3 ---------------------------------------------------------------------------------------


@pytest.fixture
def s3(aws_credentials: None) -> Iterator[Any]:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bkt")
        client.put_object(Bucket="bkt", Key="dir/a.bin", Body=BODY)
        yield client


def test_s3_reads_and_failures(s3: Any) -> None:
    async def aread(uri: str) -> bytes:
        async with UriReader() as reader:
            return await reader.aread(uri)

    with UriReader() as read:
        assert read("s3://bkt/dir/a.bin") == BODY
        with pytest.raises(StorageNotFound) as missing:
            read("s3://bkt/dir/nope.bin")
        with pytest.raises(StorageError) as no_bucket:
            read("s3://no-such-bucket/a.bin")
        with pytest.raises(StorageError) as no_key:
            read("s3://bkt")
    assert asyncio.run(aread("s3://bkt/dir/a.bin")) == BODY
    assert str(missing.value) == "s3 object not found: s3://bkt/dir/nope.bin"
    assert str(no_bucket.value) == "s3 bucket not found: no-such-bucket (s3://no-such-bucket/a.bin)"
    assert no_bucket.value.fatal and not isinstance(no_bucket.value, StorageNotFound)
    assert str(no_key.value) == "s3 URI names no object: s3://bkt"


def test_s3_cap_stops_the_read(s3: Any) -> None:
    with pytest.raises(StorageError) as info:
        UriReader(max_bytes=10)("s3://bkt/dir/a.bin")
    assert str(info.value) == "larger than 10 bytes: s3://bkt/dir/a.bin"
    assert UriReader(max_bytes=len(BODY))("s3://bkt/dir/a.bin") == BODY


def _client_error(code: str, status: int, message: str = "") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")


@pytest.mark.parametrize(
    ("exc", "problem", "named", "stored", "fatal"),
    [
        (
            _client_error("NoSuchKey", 404),
            S3Problem.NOT_FOUND,
            "s3 object not found: s3://b/k",
            "not found: s3://b/k",
            False,
        ),
        (
            _client_error("404", 404),
            S3Problem.NOT_FOUND,
            "s3 object not found: s3://b/k",
            "not found: s3://b/k",
            False,
        ),
        (
            _client_error("NoSuchBucket", 404),
            S3Problem.NO_BUCKET,
            "s3 bucket not found: b (s3://b/k)",
            "cannot read s3://b/k: bucket 'b' does not exist",
            True,
        ),
        (
            _client_error("AccessDenied", 403),
            S3Problem.DENIED,
            "access denied reading s3://b/k",
            "cannot read s3://b/k: access denied",
            True,
        ),
        (
            _client_error("403", 403),
            S3Problem.DENIED,
            "access denied reading s3://b/k",
            "cannot read s3://b/k: access denied",
            True,
        ),
        (
            _client_error("InvalidAccessKeyId", 403),
            S3Problem.BAD_CREDENTIALS,
            "AWS credentials refused (InvalidAccessKeyId) reading s3://b/k",
            "cannot read s3://b/k: credentials refused (InvalidAccessKeyId)",
            True,
        ),
        (
            NoCredentialsError(),
            S3Problem.NO_CREDENTIALS,
            "no AWS credentials found to read s3://b/k",
            "cannot read s3://b/k: no AWS credentials found",
            True,
        ),
        (
            _client_error("PreconditionFailed", 412),
            S3Problem.PRECONDITION,
            "s3://b/k changed while it was being read",
            "cannot read s3://b/k: it changed while it was being read",
            False,
        ),
        (
            _client_error("SlowDown", 503, "Please reduce your request rate."),
            S3Problem.OTHER,
            "s3 error SlowDown reading s3://b/k: Please reduce your request rate.",
            "cannot read s3://b/k: SlowDown: Please reduce your request rate.",
            False,
        ),
        (
            EndpointConnectionError(endpoint_url="https://user:pw@minio.test/b/k?sig=1"),
            S3Problem.OTHER,
            "cannot read s3://b/k: Could not connect to the endpoint URL",
            "cannot read s3://b/k: Could not connect to the endpoint URL",
            False,
        ),
    ],
    ids=lambda v: v.name if isinstance(v, S3Problem) else None,
)
def test_the_one_s3_error_mapping(
    exc: Any, problem: S3Problem, named: str, stored: str, fatal: bool
) -> None:
    assert s3_problem(exc) is problem
    for err, text in (
        (s3_error(exc, "b", "k"), named),
        (s3_error(exc, "b", "k", action="read"), stored),
    ):
        assert str(err).startswith(text)
        assert err.fatal is fatal
        assert isinstance(err, StorageNotFound) is (problem is S3Problem.NOT_FOUND)
        assert "pw" not in str(err) and "sig=1" not in str(err)


def test_a_bare_404_is_missing_only_for_reads() -> None:
    bare = _client_error("", 404)
    assert isinstance(s3_error(bare, "b", "k", action="check"), StorageNotFound)
    written = s3_error(bare, "b", "k", action="write")
    assert not isinstance(written, StorageNotFound)
    assert str(written) == "cannot write s3://b/k: error: HTTP 404"


# --- HTTP -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_http_needs_the_opt_in_for_loopback(server: _Server) -> None:
    with pytest.raises(BlockedAddressError, match="loopback"):
        UriReader(policy=AddressPolicy())(server.url("/ok"))

    async def refused() -> None:
        async with UriReader(policy=AddressPolicy()) as reader:
            await reader.aread(server.url("/ok"))

    with pytest.raises(BlockedAddressError, match="loopback"):
        asyncio.run(refused())
    assert UriReader(policy=LOOPBACK)(server.url("/ok")) == BODY


@pytest.mark.integration
def test_http_reads_sync_and_async(server: _Server) -> None:
    read = UriReader(policy=LOOPBACK)
    assert read(server.url("/redirect")) == BODY

    async def main() -> list[bytes]:
        async with UriReader(policy=LOOPBACK) as reader:
            return list(await asyncio.gather(*(reader.aread(server.url("/ok")) for _ in range(4))))

    assert asyncio.run(main()) == [BODY] * 4


@pytest.mark.integration
def test_http_failures(server: _Server) -> None:
    read = UriReader(policy=LOOPBACK, timeout=0.3)
    with pytest.raises(StorageNotFound) as missing:
        read(server.url("/nope"))
    assert str(missing.value) == f"{server.url('/nope')} answered 404"
    with pytest.raises(StorageError) as busy:
        read(server.url("/busy"))
    assert str(busy.value) == f"{server.url('/busy')} answered 503"
    assert not isinstance(busy.value, StorageNotFound)
    with pytest.raises(StorageError) as slow:
        read(server.url("/hang"))
    assert str(slow.value) == f"timed out after 0.3 s fetching {server.url('/hang')}"


@pytest.mark.integration
def test_http_caps(server: _Server) -> None:
    read = UriReader(policy=LOOPBACK, max_bytes=2**20)
    with pytest.raises(StorageError, match=r"^larger than 1 MiB: "):
        read(server.url("/declared-huge"))
    server.streamed = 0
    with pytest.raises(StorageError, match=r"^larger than 1 MiB: "):
        read(server.url("/endless"))
    # The reader hung up near the cap; the server could not push its 125 MiB.
    assert server.streamed < 32 * 2**20


@pytest.mark.integration
def test_a_presigned_query_never_reaches_a_message(server: _Server) -> None:
    uri = server.url("/nope") + SIGNED_QUERY
    with pytest.raises(StorageNotFound) as info:
        UriReader(policy=LOOPBACK)(uri)
    assert FAKE_KEY_ID not in str(info.value)
    assert str(info.value) == f"{server.url('/nope')}?... answered 404"
    with_userinfo = uri.replace("http://", "http://user:hunter2@")
    with pytest.raises(BlockedAddressError) as refused:
        UriReader(policy=AddressPolicy())(with_userinfo)
    assert "hunter2" not in str(refused.value) and FAKE_KEY_ID not in str(refused.value)


# --- redaction --------------------------------------------------------------------------------


def test_redaction() -> None:
    assert (
        redact_uri("https://u:p@h.test:8443/a/b.png?sig=1#f") == "https://h.test:8443/a/b.png?..."
    )
    assert redact_uri("s3://bucket/key.png") == "s3://bucket/key.png"
    assert redact_uri("file:///etc/passwd") == "file:///etc/passwd"
    assert redact_uri("http://[::1/x?k=v") == "http://[::1/x?..."
    # Local paths are shown as they are, even with `?` or `#` in a name.
    assert redact_uri("/data/what?.png") == "/data/what?.png"
    assert redact_uri("photos/#1.png") == "photos/#1.png"
    text = f"cannot GET https://bucket.s3.test/k.png{SIGNED_QUERY} via http://me:pw@proxy.test/"
    shown = redact_text(text)
    assert FAKE_KEY_ID not in shown and "pw@" not in shown
    assert shown == "cannot GET https://bucket.s3.test/k.png?... via http://proxy.test/"
