"""Async client of the OpenAI-compatible `POST /images/edits` API: one attempt a call.

What a request sends is in `client_request`; what an answer is believed to say (texts cut,
costs trusted or not) in `client_answer`. Result URLs are fetched with the one capped
download of `pipeline.io.http`: the API's own origin through the API's pools, any other
host through netguard, never with the API key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from pipeline import constants, spec
from pipeline.constants import DEFAULT_TIMEOUT_S
from pipeline.engine.client_answer import (
    CostEstimate,
    EditResponse,
    OutputImage,
    capped,
    cost_ceiling_usd,
    read_answer,
    read_estimate,
    request_id_of,
    trusted_cost,
)
from pipeline.engine.client_request import (
    EditRequest,
    ImagePart,
    ResponseFormat,
    build_files,
    build_form,
)
from pipeline.errors import (
    APIConnectionError,
    APIError,
    APIResponseError,
    APITimeoutError,
    BlockedAddressError,
    ConfigError,
    DownloadError,
    InvalidImageError,
    ResponseTooLargeError,
    UnsafeURLError,
    cut_text,
    error_for_status,
)
from pipeline.imageinfo import probe
from pipeline.io.http import get_capped
from pipeline.io.netguard import AddressPolicy, guarded_transport
from pipeline.io.redact import redact_text
from pipeline.models.profile import ModelProfile
from pipeline.models.registry import ENV_MODEL, builtin_profile, run_model
from pipeline.models.schema import permissive_profile

__all__ = [
    "ENV_MODEL",
    "CostEstimate",
    "EditClient",
    "EditRequest",
    "EditResponse",
    "ImagePart",
    "OutputImage",
    "ResponseFormat",
    "build_files",
    "build_form",
    "check_credentials",
    "resolve_api_base",
    "trusted_cost",
]

ENV_API_BASE = "IMGEDIT_API_BASE"
ENV_API_KEYS = ("IMGEDIT_API_KEY", "LUMENFALL_API_KEY")

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_MAX_CONNECTIONS = 64
# httpcore scans every connection of a pool when a request starts and when it ends: an
# O(connections^2) loop plus a poll() and getpeername() per idle connection. At 64
# connections in one pool that is ~7 ms of CPU per request; pools of 8 cost ~1 ms.
CONNECTIONS_PER_POOL = 8
# A 1 MP PNG is ~2 MB; 50 MiB leaves room for any of the seven sizes in any format.
DEFAULT_MAX_IMAGE_BYTES = 50 * 2**20
# Result URLs live ~60 min: a couple of quick download retries beat re-paying for the edit.
DOWNLOAD_ATTEMPTS = 3
DOWNLOAD_BACKOFF_S = 0.5


def resolve_api_base(base_url: str | None = None) -> str:
    """The argument, else IMGEDIT_API_BASE, else the Lumenfall gateway."""
    return (base_url or os.environ.get(ENV_API_BASE) or spec.DEFAULT_API_BASE).rstrip("/")


def check_credentials(base_url: str | None = None, api_key: str | None = None) -> None:
    """ConfigError when no key is set for an API that is not on this machine (an emulator or
    a gateway on loopback may need none): the run would fail every row, paying nothing, only
    after starting."""
    base = resolve_api_base(base_url)
    if api_key or _env_api_key():
        return
    host = urlsplit(base).hostname or ""
    if host == "localhost" or _is_loopback(host):
        return
    raise ConfigError(
        f"no API key: set {ENV_API_KEYS[0]} (or {ENV_API_KEYS[1]}) for {base}; nothing was sent"
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_api_key() -> str | None:
    for name in ENV_API_KEYS:
        value = os.environ.get(name)
        if value:
            return value
    return None


class EditClient:
    """One attempt per call; the runner decides about retries from the error raised.

    Arguments win over the environment: `IMGEDIT_API_BASE`, `IMGEDIT_API_KEY` (or
    `LUMENFALL_API_KEY`) and `IMGEDIT_MODEL`. The key is sent only to the API base, never
    to result-download hosts, and never appears in a repr or an error.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
        download_policy: AddressPolicy | None = None,
        price_per_image_usd: float = spec.PRICE_PER_IMAGE_USD,
        profile: ModelProfile | None = None,
    ) -> None:
        if not (math.isfinite(price_per_image_usd) and price_per_image_usd >= 0):
            raise ValueError(
                f"price per image must be a finite USD amount >= 0, got {price_per_image_usd!r}"
            )
        # The list price a reported cost (and a dry-run estimate) is checked against.
        self.price_per_image_usd = price_per_image_usd
        self.base_url = resolve_api_base(base_url)
        self.model = run_model(model)
        # How the model answers (its cost from `usage` or from metadata.cost).
        self.profile = (
            profile
            or builtin_profile(self.model)
            or permissive_profile(self.model, "no profile was given to the client")
        )
        self._api_key = api_key or _env_api_key()
        self.max_image_bytes = max_image_bytes
        base = urlsplit(self.base_url)
        if base.scheme not in ("http", "https") or not base.hostname:
            raise ValueError(f"API base must be an http(s) URL, got {self.base_url!r}")
        self._base_origin = (base.scheme, base.hostname, base.port)
        # A given transport (tests) is one object: it gets one pool, not several sharing it.
        pools = 1 if transport is not None else math.ceil(max_connections / CONNECTIONS_PER_POOL)
        per_pool = math.ceil(max_connections / pools)
        # One TLS context for all pools: each would otherwise load the CA bundle (~1 MB).
        tls = httpx.create_ssl_context()
        self._pools = [
            httpx.AsyncClient(
                timeout=httpx.Timeout(timeout, connect=connect_timeout),
                limits=httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool),
                transport=transport,
                verify=tls,
                follow_redirects=False,
            )
            for _ in range(pools)
        ]
        self._in_flight = [0] * pools
        # Result URLs on other hosts than the API's come from an answer we do not trust: they
        # are fetched through netguard (public addresses only, unless the run opted in).
        # A given transport (tests) serves downloads too, unless a policy is given with it.
        self._download_policy = download_policy or AddressPolicy()
        self._download_transport = transport if download_policy is None else None
        self._downloads: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        return f"EditClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key})"

    @property
    def has_api_key(self) -> bool:
        return bool(self._api_key)

    async def __aenter__(self) -> EditClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()
        if self._downloads is not None:
            await self._downloads.aclose()

    @contextlib.contextmanager
    def _pool(self) -> Iterator[httpx.AsyncClient]:
        """The pool with the fewest requests in flight: with at most `max_connections`
        requests in flight, it always has a free connection."""
        index = min(range(len(self._pools)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            yield self._pools[index]
        finally:
            self._in_flight[index] -= 1

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        files: Any = None,
        stream: bool = False,
    ) -> httpx.Response:
        url = f"{self.base_url}/{path.lstrip('/')}"
        try:
            with self._pool() as http:
                request = http.build_request(
                    method, url, params=params, data=data, files=files, headers=self._auth_headers()
                )
                # One buffer, one write: a streamed multipart body goes out as ~30 small
                # writes (each field's header, value and boundary), each a syscall here and a
                # wake-up at the server.
                request.read()
                return await http.send(request, stream=stream)
        except httpx.ConnectTimeout as exc:
            raise APITimeoutError(f"timed out connecting to {url}", sent=False) from exc
        except httpx.PoolTimeout as exc:
            raise APITimeoutError("timed out waiting for a free connection", sent=False) from exc
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"no answer from {url} within the timeout") from exc
        except httpx.ConnectError as exc:
            raise APIConnectionError(
                f"cannot connect to {url}: {_exc_text(exc)}", sent=False
            ) from exc
        except httpx.HTTPError as exc:
            # Reset or dropped after the request went out: the edit may have run.
            raise APIConnectionError(
                f"connection lost: {type(exc).__name__}: {_exc_text(exc)}"
            ) from exc

    def _cost_ceiling_usd(self, n_asked: int) -> float:
        """The most a reported cost of `n_asked` images may be and still be believed."""
        return cost_ceiling_usd(self.price_per_image_usd, n_asked)

    def _raise_for_status(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body: Any = response.json()
        except ValueError:
            body = response.text
        raise error_for_status(
            response.status_code,
            body,
            response.headers,
            request_id=request_id_of(response, body),
        )

    @staticmethod
    def _json_object(response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError as exc:
            raise APIResponseError(
                f"HTTP {response.status_code} answer is not JSON", status=response.status_code
            ) from exc
        if not isinstance(body, dict):
            raise APIResponseError("answer is JSON but not an object", status=response.status_code)
        return body

    async def edit(self, request: EditRequest) -> EditResponse:
        """Send one edit and return it with every result image downloaded and checked."""
        started = time.perf_counter()
        response = await self._send(
            "POST",
            "images/edits",
            data=build_form(request, self.model),
            files=build_files(request),
        )
        self._raise_for_status(response)
        body = self._json_object(response)
        warnings: list[str] = []
        request_id = capped(request_id_of(response, body), "request id", warnings)
        n_asked = request.params.image_count()
        try:
            images = await self._images(body, n_asked, warnings)
        except APIError as exc:
            exc.request_id = exc.request_id or request_id
            exc.status = exc.status or response.status_code
            raise
        return read_answer(
            body,
            response.headers,
            images=images,
            n_asked=n_asked,
            request_id=request_id,
            ceiling_usd=self._cost_ceiling_usd(n_asked),
            latency_s=time.perf_counter() - started,
            warnings=warnings,
            token_prices=self.profile.cost.token_prices
            if self.profile.cost.source == "tokens"
            else None,
        )

    async def estimate(self, request: EditRequest) -> CostEstimate:
        """The API's dry run (`?dryRun=true`): validates and prices, edits and charges nothing."""
        response = await self._send(
            "POST",
            "images/edits",
            params={"dryRun": "true"},
            data=build_form(request, self.model),
            files=build_files(request),
        )
        self._raise_for_status(response)
        body = self._json_object(response)
        n_asked = request.params.image_count()
        return read_estimate(body, n_asked=n_asked, ceiling_usd=self._cost_ceiling_usd(n_asked))

    async def list_models(self, *, schema: bool = False) -> list[dict[str, Any]]:
        """`GET /models` (with `?schema=true`: each with its parameter schema), read within
        MAX_SCHEMA_BYTES."""
        params = {"schema": "true"} if schema else None
        body = await self._get_json_capped("models", params)
        data = body.get("data")
        if not isinstance(data, list):
            return []
        listed = data[: constants.MAX_LISTED_MODELS]
        return [dict(m) for m in listed if isinstance(m, Mapping)]

    async def get_model(self, model_id: str, *, schema: bool = False) -> dict[str, Any]:
        """`GET /models/{id}` (with `?schema=true`: its parameter schema), within the cap."""
        params = {"schema": "true"} if schema else None
        return await self._get_json_capped(f"models/{_model_path(model_id)}", params)

    async def _get_json_capped(self, path: str, params: Mapping[str, str] | None) -> dict[str, Any]:
        """A JSON object from the API, its body read up to MAX_SCHEMA_BYTES (then refused)."""
        cap = constants.MAX_SCHEMA_BYTES
        response = await self._send("GET", path, params=params, stream=True)
        try:
            if _declared(response) > cap:
                raise ResponseTooLargeError(f"the answer of {path} is over {cap} bytes")
            buf = bytearray()
            async for chunk in response.aiter_bytes():
                buf += chunk
                if len(buf) > cap:
                    raise ResponseTooLargeError(f"the answer of {path} is over {cap} bytes")
        except httpx.HTTPError as exc:
            raise APIConnectionError(
                f"reading the answer of {path} failed: {_exc_text(exc)}"
            ) from exc
        finally:
            await response.aclose()
        if response.status_code >= 400:
            # The body is read (decoded) already: an error made from it, headers but those
            # that describe the encoded body.
            kept = {k: v for k, v in response.headers.items() if k.lower() not in _BODY_HEADERS}
            self._raise_for_status(
                httpx.Response(response.status_code, headers=kept, content=bytes(buf))
            )
        try:
            body = json.loads(bytes(buf))
        except ValueError as exc:
            raise APIResponseError(f"the answer of {path} is not JSON") from exc
        if not isinstance(body, dict):
            raise APIResponseError(f"the answer of {path} is not a JSON object")
        return body

    async def _images(
        self, body: Mapping[str, Any], n_asked: int, warnings: list[str]
    ) -> list[OutputImage]:
        """The answer's images, at most `n_asked` of them (extras are neither fetched nor
        decoded); fewer is not an error here."""
        data = body.get("data")
        if not isinstance(data, list) or not data:
            raise APIResponseError("answer has no `data` images")
        if len(data) > n_asked:
            warnings.append(
                f"answer has {len(data)} images for {n_asked} asked: kept the first {n_asked}"
            )
            data = data[:n_asked]
        out: list[OutputImage] = []
        for index, item in enumerate(data):
            if not isinstance(item, Mapping):
                raise APIResponseError(f"data[{index}] is not an object")
            which = "" if len(data) == 1 else f" of image {index + 1}"
            revised = capped(
                item.get("revised_prompt"),
                f"revised_prompt{which}",
                warnings,
                constants.MAX_API_TEXT_CHARS,
            )
            b64 = item.get("b64_json")
            url = item.get("url")
            if isinstance(b64, str) and b64:
                raw = self._decode_b64(b64, index)
                source_url = None
            elif isinstance(url, str) and url:
                raw = await self.download(url)
                source_url = capped(url, f"url{which}", warnings, constants.MAX_API_TEXT_CHARS)
            else:
                raise APIResponseError(f"data[{index}] has neither b64_json nor url")
            try:
                info = probe(raw)
            except InvalidImageError as exc:
                raise APIResponseError(f"data[{index}] is not a usable image: {exc}") from exc
            out.append(OutputImage(raw, info, revised, source_url))
        return out

    def _decode_b64(self, text: str, index: int) -> bytes:
        if len(text) * 3 // 4 > self.max_image_bytes:
            raise ResponseTooLargeError(
                f"data[{index}] is over the {self.max_image_bytes} byte cap"
            )
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise APIResponseError(f"data[{index}].b64_json is not valid base64") from exc

    def check_download_url(self, url: str) -> None:
        """Refuse anything but https, or the API's own origin (the emulator serves http)."""
        parts = urlsplit(url)
        if parts.scheme == "https" and parts.hostname:
            return
        if (parts.scheme, parts.hostname, parts.port) == self._base_origin:
            return
        raise UnsafeURLError(f"refusing to download a result from {parts.scheme}://{parts.netloc}")

    async def download(self, url: str) -> bytes:
        """Fetch a result URL at once (they expire), within the size cap, with quick retries."""
        self.check_download_url(url)
        last: DownloadError | None = None
        for attempt in range(DOWNLOAD_ATTEMPTS):
            if attempt:
                await asyncio.sleep(DOWNLOAD_BACKOFF_S * 2 ** (attempt - 1))
            try:
                return await self._download_once(url)
            except DownloadError as exc:
                last = exc
                if not exc.retryable:
                    break
        assert last is not None
        raise last

    def _same_origin(self, url: str) -> bool:
        parts = urlsplit(url)
        return (parts.scheme, parts.hostname, parts.port) == self._base_origin

    def _download_client(self) -> httpx.AsyncClient:
        if self._downloads is None:
            self._downloads = httpx.AsyncClient(
                timeout=self._pools[0].timeout,
                transport=self._download_transport or guarded_transport(self._download_policy),
                follow_redirects=False,
            )
        return self._downloads

    async def _download_once(self, url: str) -> bytes:
        # Shown without any user-info; the path and query (a signed URL's keys) are not shown.
        where = urlsplit(url).netloc.rpartition("@")[2]
        cap = self.max_image_bytes

        def check_status(response: httpx.Response) -> None:
            if response.status_code >= 400:
                err = DownloadError(
                    f"result download from {where} answered HTTP {response.status_code}",
                    status=response.status_code,
                )
                # Expired or missing will not come back; a 5xx might.
                err.retryable = response.status_code >= 500 or response.status_code == 429
                raise err

        def too_large(declared: int | None) -> Exception:
            if declared is not None:
                return ResponseTooLargeError(
                    f"result at {where} is {declared} bytes, over the {cap} byte cap"
                )
            return ResponseTooLargeError(f"result at {where} is over the {cap} byte cap")

        try:
            if self._same_origin(url):
                # The API's own origin through its pools (it is where we send edits anyway).
                with self._pool() as http:
                    return await get_capped(
                        http,
                        url,
                        max_bytes=cap,
                        check_status=check_status,
                        too_large=too_large,
                        guarded=False,
                    )
            # Any other host through netguard: checked addresses, checked redirect hops,
            # and a client of its own that never carries the API key.
            return await get_capped(
                self._download_client(),
                url,
                max_bytes=cap,
                check_status=check_status,
                too_large=too_large,
            )
        except BlockedAddressError as exc:
            raise UnsafeURLError(f"refusing to download a result: {exc}") from None
        except httpx.TimeoutException as exc:
            raise DownloadError(f"timed out downloading a result from {where}") from exc
        except httpx.HTTPError as exc:
            raise DownloadError(
                f"result download from {where} failed: {type(exc).__name__}: "
                f"{redact_text(str(exc))}"
            ) from exc


_BODY_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def _declared(response: httpx.Response) -> int:
    """The body length the headers declare (0 when they declare none)."""
    declared = response.headers.get("content-length", "")
    return int(declared) if declared.isdigit() and len(declared) < 19 else 0


def _model_path(model_id: str) -> str:
    """A model id as a URL path (ids may hold `/`); ConfigError for one that could escape it."""
    parts = model_id.split("/")
    if not model_id or any(p in ("", ".", "..") for p in parts) or not model_id.isprintable():
        raise ConfigError(f"model id {model_id[:80]!r} is not usable in a URL path")
    return quote(model_id, safe="/")


def _exc_text(exc: BaseException) -> str:
    """An exception's text for our own message: it may quote a server, so it is cut."""
    return cut_text(str(exc), constants.MAX_API_SHORT_TEXT_CHARS)
