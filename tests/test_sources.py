"""Source images and masks: local, s3 (moto) and http (a real server on 127.0.0.1), cached."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Coroutine, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import boto3
import httpx
import pytest
from moto import mock_aws
from PIL import Image

from pipeline.engine.sources import Source, SourceLoader, human_size, redact_uri
from pipeline.errors import SourceError
from pipeline.io.netguard import AddressPolicy

T = TypeVar("T")
# Built from parts so the source holds nothing shaped like a real key id.
FAKE_KEY_ID = "AKIA" + "FAKEKEYID1234567"
FAKE_SECRET = "fake/secret+key/do-not-print-0123456789"
SLOW_SECONDS = 0.4

# The test servers listen on loopback, which sources may reach only by opting in.
LOOPBACK = AddressPolicy(allow_private=True)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 30, 30) if mode == "RGB" else 0).save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically complete PNG declaring `width`x`height` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


PNG = image_bytes("PNG")
JPEG = image_bytes("JPEG")
# Noise, so most of the file is scan data and cutting it in half leaves a readable header.
_noise = io.BytesIO()
Image.frombytes("L", (128, 128), bytes(range(256)) * 64).save(_noise, "JPEG", quality=95)
BIG_JPEG = _noise.getvalue()


# --- a real HTTP server ------------------------------------------------------------------------


class _Server:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.stop = threading.Event()
        self.streamed = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, ctype: str = "image/png") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.hits[path] += 1
                if path.startswith("/img"):
                    self._send(200, PNG)
                elif path == "/jpeg.jpg":
                    self._send(200, JPEG, "image/jpeg")
                elif path == "/slow-ok.png":
                    server.stop.wait(SLOW_SECONDS)
                    self._send(200, PNG)
                elif path == "/hang.png":
                    server.stop.wait(10)
                    self._send(200, PNG)
                elif path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/img-target.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path == "/declared-huge.png":
                    self.send_response(200)
                    self.send_header("Content-Length", str(10 * 2**30))
                    self.end_headers()
                    self.wfile.write(PNG)
                elif path == "/endless.png":
                    # No length: the body ends when the connection closes, which is never
                    # unless the client hangs up.
                    self.send_response(200)
                    self.end_headers()
                    chunk = b"\x89PNG" + b"\x00" * (64 * 1024 - 4)
                    try:
                        for _ in range(2000):  # 125 MiB at most
                            self.wfile.write(chunk)
                            with server.lock:
                                server.streamed += len(chunk)
                    except OSError:
                        pass
                elif path == "/text.txt":
                    self._send(200, b"hello, not an image", "text/plain")
                else:
                    self._send(404, b"not found", "text/plain")

        return Handler

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture(scope="module")
def http_server() -> Iterator[_Server]:
    server = _Server()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stop.set()
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def server(http_server: _Server) -> _Server:
    http_server.hits.clear()
    return http_server


async def _load(uri: str, **kw: Any) -> Source:
    async with SourceLoader(**{"policy": LOOPBACK, **kw}) as loader:
        return await loader.load(uri)


def _error(uri: str, **kw: Any) -> SourceError:
    with pytest.raises(SourceError) as info:
        run(_load(uri, **kw))
    return info.value


# --- local files -------------------------------------------------------------------------------


def test_local_png_is_loaded_with_hash_and_info(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    src = run(_load(str(path)))
    assert src.data == PNG
    assert src.sha256 == hashlib.sha256(PNG).hexdigest()
    assert (src.info.format, src.info.width, src.info.height) == ("png", 64, 48)
    assert src.uri == str(path)
    assert "bytes" in repr(src) and "\\x89PNG" not in repr(src)  # no image bytes in the repr

    via_uri = run(_load(path.as_uri()))
    assert via_uri.data == PNG


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "jpeg"), ("WEBP", "webp"), ("GIF", "gif")])
def test_other_accepted_formats(tmp_path: Path, fmt: str, name: str) -> None:
    path = tmp_path / f"a.{name}"
    path.write_bytes(image_bytes(fmt, mode="RGB" if fmt != "GIF" else "P"))
    assert run(_load(str(path))).info.format == name


def test_local_failures_name_the_problem(tmp_path: Path) -> None:
    missing = tmp_path / "missing.png"
    assert str(_error(str(missing))) == f"file not found: {missing}"
    assert "is a directory" in str(_error(str(tmp_path)))
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it would block the worker thread forever
    assert str(_error(str(fifo))) == f"not a regular file: {fifo}"
    assert "not an absolute path: 'relative/a.png'" in str(_error("relative/a.png"))
    assert "unsupported URI scheme 'ftp'" in str(_error("ftp://host/a.png"))

    err = _error(str(missing))
    assert err.column == "image"
    assert err.uri == str(missing)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello, I am text", "not an image"),
        (b"", "empty file"),
        (PNG[: len(PNG) // 2], "truncated PNG data"),
        (BIG_JPEG[: len(BIG_JPEG) // 2], "truncated JPEG data"),
        (JPEG[:200], "unreadable image header"),
        (png_header_only(30_000, 30_000), "image dimensions exceed the safety limit"),
        (image_bytes("BMP"), "unsupported image format BMP (accepted: GIF, JPEG, PNG, WebP)"),
        (image_bytes("AVIF"), "unsupported image format AVIF (accepted: GIF, JPEG, PNG, WebP)"),
    ],
    ids=["text", "empty", "truncated-png", "truncated-jpeg", "cut-header", "bomb", "bmp", "avif"],
)
def test_unusable_images_are_refused(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "x.img"
    path.write_bytes(data)
    err = _error(str(path))
    assert message in str(err)
    assert str(err).endswith(str(path))
    assert "Traceback" not in str(err)


def test_bomb_limit_follows_pillow_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(image_bytes("PNG", size=(200, 200)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    assert "safety limit" in str(_error(str(path)))


def test_local_file_over_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(PNG)
    err = _error(str(path), max_bytes=100)
    assert str(err) == f"larger than 100 bytes: {path}"
    assert human_size(50 * 2**20) == "50 MiB"
    assert human_size(1536) == "1.5 KiB"


# --- masks -------------------------------------------------------------------------------------


def test_masks(tmp_path: Path) -> None:
    first = tmp_path / "first.png"
    first.write_bytes(image_bytes("PNG", size=(640, 480)))
    good = tmp_path / "mask.png"
    good.write_bytes(image_bytes("PNG", size=(640, 480), mode="RGBA"))
    wrong_size = tmp_path / "small.png"
    wrong_size.write_bytes(image_bytes("PNG", size=(512, 512), mode="RGBA"))
    jpeg = tmp_path / "mask.jpg"
    jpeg.write_bytes(image_bytes("JPEG", size=(640, 480)))

    async def main() -> list[Any]:
        async with SourceLoader(policy=LOOPBACK) as loader:
            image = await loader.load(str(first))
            out: list[Any] = [await loader.load_mask(str(good), image)]
            for uri in (wrong_size, jpeg, tmp_path / "none.png"):
                try:
                    await loader.load_mask(str(uri), image)
                except SourceError as exc:
                    out.append(exc)
            return out

    mask, size_err, fmt_err, missing_err = run(main())
    assert mask.info.mode == "RGBA"
    assert str(size_err) == "mask is 512x512 but the first image is 640x480"
    assert str(fmt_err).startswith("mask must be a PNG, got JPEG")
    assert str(missing_err).startswith("file not found")
    assert {size_err.column, fmt_err.column, missing_err.column} == {"mask"}


# --- S3 ----------------------------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="src")
        client.put_object(Bucket="src", Key="dir/a.png", Body=PNG)
        client.put_object(Bucket="src", Key="dir/text.txt", Body=b"plain text")
        yield client


def test_s3_sources(s3: Any) -> None:
    async def main() -> tuple[Source, list[SourceError]]:
        errors = []
        async with SourceLoader(policy=LOOPBACK, max_bytes=len(PNG) + 10) as loader:
            src = await loader.load("s3://src/dir/a.png")
            for uri in (
                "s3://src/dir/missing.png",
                "s3://no-such-bucket/a.png",
                "s3://src/dir/text.txt",
                "s3://src",
            ):
                try:
                    await loader.load(uri, column="image[1]")
                except SourceError as exc:
                    errors.append(exc)
        async with SourceLoader(policy=LOOPBACK, max_bytes=100) as small:
            try:
                await small.load("s3://src/dir/a.png")
            except SourceError as exc:
                errors.append(exc)
        return src, errors

    src, errors = run(main())
    assert src.data == PNG and src.info.format == "png"
    assert [str(e) for e in errors] == [
        "s3 object not found: s3://src/dir/missing.png",
        "s3 bucket not found: no-such-bucket (s3://no-such-bucket/a.png)",
        "not an image (unrecognised bytes): s3://src/dir/text.txt",
        "s3 URI names no object: s3://src",
        "larger than 100 bytes: s3://src/dir/a.png",
    ]
    assert [e.column for e in errors[:4]] == ["image[1]"] * 4
    for exc in errors:
        assert FAKE_KEY_ID not in str(exc) and FAKE_SECRET not in str(exc)


# --- HTTP --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_http_200_and_redirect(server: _Server) -> None:
    src = run(_load(server.url("/img-a.png")))
    assert src.data == PNG
    redirected = run(_load(server.url("/redirect")))
    assert redirected.data == PNG
    assert server.hits["/redirect"] == 1 and server.hits["/img-target.png"] == 1


@pytest.mark.integration
def test_http_error_status(server: _Server) -> None:
    uri = server.url("/missing.png")
    err = _error(uri)
    assert str(err) == f"{uri} answered 404"
    assert err.uri == uri


@pytest.mark.integration
def test_http_not_an_image(server: _Server) -> None:
    assert "not an image" in str(_error(server.url("/text.txt")))


@pytest.mark.integration
def test_http_timeout(server: _Server) -> None:
    uri = server.url("/hang.png")
    err = _error(uri, http_timeout=0.3)
    assert str(err) == f"timed out after 0.3 s fetching {uri}"


@pytest.mark.integration
def test_http_declared_oversize_is_refused_before_reading(server: _Server) -> None:
    err = _error(server.url("/declared-huge.png"), max_bytes=2**20)
    assert str(err).startswith("larger than 1 MiB: ")


@pytest.mark.integration
def test_http_endless_body_is_cut_at_the_cap(server: _Server) -> None:
    server.streamed = 0
    err = _error(server.url("/endless.png"), max_bytes=2**20)
    assert str(err).startswith("larger than 1 MiB: ")
    # The client hung up near the cap; the server could not push the whole 125 MiB.
    assert server.streamed < 32 * 2**20


@pytest.mark.integration
def test_http_credentials_never_appear_in_errors(server: _Server) -> None:
    secret_query = f"?X-Amz-Credential={FAKE_KEY_ID}%2F20240101&X-Amz-Signature=abcdef"
    uri = server.url("/missing.png") + secret_query
    err = _error(uri)
    assert FAKE_KEY_ID not in str(err) and FAKE_KEY_ID not in str(err.uri)
    assert "answered 404" in str(err)

    with_userinfo = uri.replace("http://", "http://user:hunter2@")
    err = _error(with_userinfo)
    assert "hunter2" not in str(err) and FAKE_KEY_ID not in str(err)
    assert redact_uri("https://u:p@h/x.png?sig=1") == "https://h/x.png?..."


@pytest.mark.integration
def test_cache_reads_a_source_once(server: _Server) -> None:
    uri = server.url("/img-cached.png")

    async def main() -> SourceLoader:
        async with SourceLoader(policy=LOOPBACK) as loader:
            a = await loader.load(uri)
            b = await loader.load(uri, column="image[1]")
            assert a is b
            return loader

    loader = run(main())
    assert server.hits["/img-cached.png"] == 1
    assert (loader.reads, loader.cache_hits) == (1, 1)


@pytest.mark.integration
def test_cache_is_bounded_by_bytes(server: _Server) -> None:
    a, b = server.url("/img-1.png"), server.url("/img-2.png")

    async def main() -> None:
        # Room for one image only: loading b evicts a.
        async with SourceLoader(policy=LOOPBACK, cache_bytes=len(PNG) + 1) as loader:
            await loader.load(a)
            await loader.load(a)
            await loader.load(b)
            await loader.load(a)

    run(main())
    assert server.hits["/img-1.png"] == 2 and server.hits["/img-2.png"] == 1


@pytest.mark.integration
def test_concurrent_loads_share_one_read(server: _Server) -> None:
    uri = server.url("/slow-ok.png")
    missing = server.url("/missing-shared.png")

    async def main() -> tuple[list[Source], list[BaseException]]:
        async with SourceLoader(policy=LOOPBACK) as loader:
            sources = await asyncio.gather(*(loader.load(uri) for _ in range(8)))
            failures = await asyncio.gather(
                *(loader.load(missing, column=f"image[{i}]") for i in range(4)),
                return_exceptions=True,
            )
            return list(sources), list(failures)

    sources, failures = run(main())
    assert server.hits["/slow-ok.png"] == 1
    assert all(s is sources[0] for s in sources)
    assert server.hits["/missing-shared.png"] == 1
    assert all(isinstance(f, SourceError) for f in failures)
    assert [f.column for f in failures if isinstance(f, SourceError)] == [
        f"image[{i}]" for i in range(4)
    ]


@pytest.mark.integration
def test_failures_are_not_cached(server: _Server) -> None:
    uri = server.url("/missing-twice.png")

    async def main() -> None:
        async with SourceLoader(policy=LOOPBACK) as loader:
            for _ in range(2):
                with pytest.raises(SourceError):
                    await loader.load(uri)

    run(main())
    assert server.hits["/missing-twice.png"] == 2


@pytest.mark.integration
def test_a_cancelled_waiter_does_not_cancel_the_shared_read(server: _Server) -> None:
    uri = server.url("/slow-ok.png")

    async def main() -> Source:
        async with SourceLoader(policy=LOOPBACK) as loader:
            first = asyncio.create_task(loader.load(uri))
            second = asyncio.create_task(loader.load(uri))
            await asyncio.sleep(0.05)
            first.cancel()
            src = await second
            assert first.cancelled()
            return src

    assert run(main()).data == PNG
    assert server.hits["/slow-ok.png"] == 1


def test_transport_is_used_for_http() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(str(request.url))
        if request.url.path == "/ok.png":
            return httpx.Response(200, content=PNG)
        return httpx.Response(503, text="busy")

    transport = httpx.MockTransport(handler)
    assert run(_load("https://images.example/ok.png", transport=transport)).data == PNG
    err = _error("https://images.example/busy.png", transport=transport)
    assert str(err) == "https://images.example/busy.png answered 503"
    assert calls == ["https://images.example/ok.png", "https://images.example/busy.png"]
