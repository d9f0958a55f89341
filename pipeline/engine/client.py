"""Async client of the OpenAI-compatible `POST /images/edits` API: one attempt a call."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import ipaddress
import json
import math
import os
import reprlib
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from pipeline import constants, spec
from pipeline.constants import DEFAULT_TIMEOUT_S
from pipeline.errors import (
    JSON_SEPARATOR_CHARS,
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
    json_chars,
    short_scalars,
)
from pipeline.imageinfo import ImageInfo, probe
from pipeline.io.netguard import AddressPolicy, guarded_transport, open_stream
from pipeline.manifest.types import EditParams

ENV_API_BASE = "IMGEDIT_API_BASE"
ENV_API_KEYS = ("IMGEDIT_API_KEY", "LUMENFALL_API_KEY")
ENV_MODEL = "IMGEDIT_MODEL"

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
# A reported cost we do not trust is kept as text for a person, this long at most.
MAX_COST_RAW_CHARS = 64

REQUEST_ID_HEADERS = ("x-lumenfall-request-id", "x-request-id")
# Form fields the client sets itself; provider extras may not override them.
RESERVED_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "image",
        "image[]",
        "mask",
        "n",
        "size",
        "aspect_ratio",
        "resolution",
        "quality",
        "response_format",
        "output_format",
        "output_compression",
        "seed",
        "user",
    }
)

ResponseFormat = Literal["url", "b64_json"]


@dataclass(frozen=True)
class ImagePart:
    """One uploaded file: the bytes and what to call them in the multipart body."""

    filename: str
    data: bytes
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class EditRequest:
    prompt: str
    images: Sequence[ImagePart]
    mask: ImagePart | None = None
    seed: int | None = None
    params: EditParams = field(default_factory=EditParams)
    response_format: ResponseFormat = "b64_json"


@dataclass(frozen=True)
class OutputImage:
    data: bytes
    info: ImageInfo
    revised_prompt: str | None
    url: str | None = None  # where it was downloaded from, for `url` responses


@dataclass(frozen=True)
class EditResponse:
    """One answer, every text in it cut to the caps in `spec`.

    `images` may be fewer than `n_asked` (the runner decides what to do with a short answer),
    never more. `cost` is only a trusted reported cost: a finite number, not negative, at
    most MAX_TRUSTED_COST_FACTOR times the list price of the images asked; a cost reported
    but not trusted is in `cost_raw`, as text. `warnings` has one short sentence per thing
    distrusted or cut.
    """

    id: str | None
    created: int | None
    size: str | None  # as the API reports it; each image's `info` has what the bytes say
    output_format: str | None
    images: list[OutputImage]
    cost: float | None
    currency: str | None
    provider: str | None
    executed_model: str | None
    model: str | None
    request_id: str | None
    metadata: dict[str, Any]  # as sent, or its short scalar members when its JSON is too long
    latency_s: float
    n_asked: int = 1
    cost_raw: str | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class CostEstimate:
    total_cost_micros: int
    currency: str
    model: str | None
    provider: str | None
    components: list[dict[str, Any]]

    @property
    def total_cost_usd(self) -> float:
        return self.total_cost_micros / spec.MICROS_PER_USD


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


def form_value(value: Any) -> str:
    """How a field travels in multipart form data: JSON for bools, lists and objects."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def build_form(request: EditRequest, model: str) -> dict[str, str]:
    """Every request field as form text; `None` fields are not sent."""
    p = request.params
    fields: dict[str, Any] = {
        "model": model,
        "prompt": request.prompt,
        "n": p.n,
        "size": p.size,
        "aspect_ratio": p.aspect_ratio,
        "resolution": p.resolution,
        "quality": p.quality,
        "response_format": request.response_format,
        "output_format": p.output_format,
        "output_compression": p.output_compression,
        "seed": request.seed,
        "user": p.user,
    }
    form = {k: form_value(v) for k, v in fields.items() if v is not None}
    for key, value in p.extra.items():
        if key in RESERVED_FIELDS:
            raise ValueError(f"provider extra {key!r} would override a request field")
        if value is not None:
            form[key] = form_value(value)
    return form


def build_files(request: EditRequest) -> list[tuple[str, tuple[str, bytes, str]]]:
    """One file is a part named `image`, several are `image[]` parts (as the OpenAI SDK does)."""
    if not request.images:
        raise ValueError("an edit needs at least one image")
    name = "image" if len(request.images) == 1 else "image[]"
    files = [(name, (im.filename, im.data, im.content_type)) for im in request.images]
    if request.mask is not None:
        m = request.mask
        files.append(("mask", (m.filename, m.data, m.content_type)))
    return files


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
    ) -> None:
        if not (math.isfinite(price_per_image_usd) and price_per_image_usd >= 0):
            raise ValueError(
                f"price per image must be a finite USD amount >= 0, got {price_per_image_usd!r}"
            )
        # The list price a reported cost (and a dry-run estimate) is checked against.
        self.price_per_image_usd = price_per_image_usd
        self.base_url = resolve_api_base(base_url)
        self.model = model or os.environ.get(ENV_MODEL) or spec.DEFAULT_MODEL
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
                return await http.send(request)
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
        return constants.MAX_TRUSTED_COST_FACTOR * self.price_per_image_usd * n_asked

    @staticmethod
    def _request_id(response: httpx.Response, body: Any = None) -> str | None:
        """Uncut: an error cuts it (APIError does), `edit` cuts it with a warning."""
        for name in REQUEST_ID_HEADERS:
            value = response.headers.get(name)
            if value:
                return str(value)
        if isinstance(body, Mapping) and isinstance(body.get("id"), str):
            return str(body["id"])
        return None

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
            request_id=self._request_id(response, body),
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
        request_id = _capped(self._request_id(response, body), "request id", warnings)
        n_asked = request.params.image_count()
        try:
            images = await self._images(body, n_asked, warnings)
        except APIError as exc:
            exc.request_id = exc.request_id or request_id
            exc.status = exc.status or response.status_code
            raise
        meta = body.get("metadata")
        reported: Mapping[str, Any] = meta if isinstance(meta, Mapping) else {}
        headers = response.headers
        answer_id = _capped(body.get("id"), "id", warnings)
        size = _capped(body.get("size"), "size", warnings)
        output_format = _capped(body.get("output_format"), "output_format", warnings)
        currency = _capped(
            reported.get("cost_currency") or reported.get("currency"), "currency", warnings
        )
        provider = _capped(
            reported.get("provider") or headers.get("x-lumenfall-provider"), "provider", warnings
        )
        executed_model = _capped(reported.get("executed_model"), "executed_model", warnings)
        model = _capped(
            reported.get("model") or headers.get("x-lumenfall-model"), "model", warnings
        )
        cost, cost_raw, distrust = trusted_cost(
            reported.get("cost"), self._cost_ceiling_usd(n_asked), n_asked
        )
        if distrust:
            warnings.append(distrust)
        metadata = _capped_metadata(reported, warnings)
        return EditResponse(
            id=answer_id,
            created=_opt_int(body.get("created")),
            size=size,
            output_format=output_format,
            images=images,
            cost=cost,
            currency=currency,
            provider=provider,
            executed_model=executed_model,
            model=model,
            request_id=request_id,
            metadata=metadata,
            latency_s=time.perf_counter() - started,
            n_asked=n_asked,
            cost_raw=cost_raw,
            warnings=tuple(warnings),
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
        micros = self._estimate_micros(body.get("total_cost_micros"), n_asked)
        components = body.get("components")
        short = constants.MAX_API_SHORT_TEXT_CHARS
        return CostEstimate(
            total_cost_micros=micros,
            currency=cut_text(_opt_str(body.get("currency")) or spec.CURRENCY, short),
            model=_opt_short(body.get("model")),
            provider=_opt_short(body.get("provider")),
            components=_capped_components(components) if isinstance(components, list) else [],
        )

    def _estimate_micros(self, micros: Any, n_asked: int) -> int:
        """A dry run's `total_cost_micros`, when it is a price we can plan a budget with.

        Anything else is a 2xx we cannot use: not retried (the same question gets the same
        answer) and not charged (a dry run charges nothing).
        """
        ceiling = self._cost_ceiling_usd(n_asked) * spec.MICROS_PER_USD
        value = micros if isinstance(micros, int | float) and not isinstance(micros, bool) else None
        number = _as_float(value) if value is not None else None
        if micros is None:
            problem = "has no total_cost_micros"
        elif number is None:
            shown = repr(_raw_text(micros)) if isinstance(micros, str) else _raw_text(micros)
            problem = f"total_cost_micros {shown} is not a number"
        elif not math.isfinite(number):
            problem = f"total_cost_micros {number!r} is not a finite number"
        elif number < 0:
            problem = f"total_cost_micros {number!r} is negative"
        elif number > ceiling:
            problem = (
                f"total_cost_micros {number!r} is over {constants.MAX_TRUSTED_COST_FACTOR:g}x the "
                f"list price of {n_asked} image(s)"
            )
        else:
            return int(number)
        err = APIResponseError(
            f"dry-run answer {problem}: a 2xx answer we cannot use (not retried)"
        )
        err.retryable = False
        err.may_have_charged = False
        raise err

    async def list_models(self) -> list[dict[str, Any]]:
        response = await self._send("GET", "models")
        self._raise_for_status(response)
        data = self._json_object(response).get("data")
        return [dict(m) for m in data if isinstance(m, Mapping)] if isinstance(data, list) else []

    async def get_model(self, model_id: str) -> dict[str, Any]:
        response = await self._send("GET", f"models/{model_id}")
        self._raise_for_status(response)
        return self._json_object(response)

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
            revised = _capped(
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
                source_url = _capped(url, f"url{which}", warnings, constants.MAX_API_TEXT_CHARS)
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

    @contextlib.asynccontextmanager
    async def _open_download(self, url: str) -> AsyncIterator[httpx.Response]:
        """The API's own origin through its pools (it is where we send edits anyway); any
        other host through netguard: checked addresses, checked redirect hops, no API key."""
        if self._same_origin(url):
            with self._pool() as http:
                async with http.stream("GET", url) as response:
                    yield response
            return
        async with open_stream(self._download_client(), url) as response:
            yield response

    async def _download_once(self, url: str) -> bytes:
        where = urlsplit(url).netloc
        try:
            async with self._open_download(url) as response:
                if response.status_code >= 400:
                    err = DownloadError(
                        f"result download from {where} answered HTTP {response.status_code}",
                        status=response.status_code,
                    )
                    # Expired or missing will not come back; a 5xx might.
                    err.retryable = response.status_code >= 500 or response.status_code == 429
                    raise err
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_image_bytes:
                    raise ResponseTooLargeError(
                        f"result at {where} is {declared} bytes, over the "
                        f"{self.max_image_bytes} byte cap"
                    )
                chunks: list[bytes] = []
                total = 0
                async for chunk in response.aiter_bytes():
                    total += len(chunk)
                    if total > self.max_image_bytes:
                        raise ResponseTooLargeError(
                            f"result at {where} is over the {self.max_image_bytes} byte cap"
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except BlockedAddressError as exc:
            raise UnsafeURLError(f"refusing to download a result: {exc}") from None
        except httpx.TimeoutException as exc:
            raise DownloadError(f"timed out downloading a result from {where}") from exc
        except httpx.HTTPError as exc:
            raise DownloadError(
                f"result download from {where} failed: {type(exc).__name__}: {exc}"
            ) from exc


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _opt_short(value: Any) -> str | None:
    text = _opt_str(value)
    return cut_text(text, constants.MAX_API_SHORT_TEXT_CHARS) if text is not None else None


def _opt_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return int(value)


def _exc_text(exc: BaseException) -> str:
    """An exception's text for our own message: it may quote a server, so it is cut."""
    return cut_text(str(exc), constants.MAX_API_SHORT_TEXT_CHARS)


def _capped(
    value: Any,
    what: str,
    warnings: list[str],
    limit: int = constants.MAX_API_SHORT_TEXT_CHARS,
) -> str | None:
    """A text field of an answer cut to `limit`, with a warning when it had to be cut."""
    text = _opt_str(value)
    if text is None or len(text) <= limit:
        return text
    warnings.append(f"{what} cut from {len(text)} to {limit} characters")
    return cut_text(text, limit)


def _capped_metadata(metadata: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """`metadata` as sent, or its short scalar members (with a warning) when it is too long."""
    chars = json_chars(metadata)
    if chars <= constants.MAX_METADATA_JSON_CHARS:
        return dict(metadata)
    kept = short_scalars(metadata, constants.MAX_METADATA_JSON_CHARS)
    warnings.append(
        f"metadata cut: {chars} characters of JSON, over the {constants.MAX_METADATA_JSON_CHARS} "
        f"cap; kept {len(kept)} of {len(metadata)} members"
    )
    return kept


def _capped_components(components: list[Any]) -> list[dict[str, Any]]:
    """A dry run's cost components, each cut like metadata, all within the metadata cap."""
    out: list[dict[str, Any]] = []
    used = json_chars(out)
    for item in components:
        if not isinstance(item, Mapping):
            continue
        part = short_scalars(item, constants.MAX_METADATA_JSON_CHARS)
        size = json_chars(part) + (JSON_SEPARATOR_CHARS if out else 0)
        if used + size > constants.MAX_METADATA_JSON_CHARS:
            break
        out.append(part)
        used += size
    return out


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int too large for a float
        return math.inf


def _raw_text(value: Any) -> str:
    """A reported value as text for a person: a string as it is, anything else repr-like
    (reprlib: a huge list or number stays short); cut to MAX_COST_RAW_CHARS."""
    text = value if isinstance(value, str) else reprlib.repr(value)
    return cut_text(text, MAX_COST_RAW_CHARS)


def trusted_cost(
    value: Any, ceiling_usd: float, n_asked: int
) -> tuple[float | None, str | None, str | None]:
    """(cost, cost_raw, warning) for a reported `metadata.cost`.

    Trusted (cost set, the rest None): a finite int, float or numeric string, >= 0 and at
    most `ceiling_usd`. Not trusted: cost None, cost_raw the value as text, and a warning.
    Missing (None): all three None. Booleans are not numbers.
    """
    if value is None:
        return None, None, None
    raw = _raw_text(value)
    shown = repr(raw) if isinstance(value, str) else raw
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = _as_float(value)
        shown = repr(number)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None:
        reason = "is not a number"
    elif not math.isfinite(number):
        reason = "is not a finite number"
    elif number < 0:
        reason = "is negative"
    elif number > ceiling_usd:
        reason = (
            f"is over {constants.MAX_TRUSTED_COST_FACTOR:g}x the list price of {n_asked} image(s)"
        )
    else:
        return number + 0.0, None, None  # + 0.0: -0.0 becomes 0.0
    return None, raw, f"reported cost {shown} {reason}: not trusted"


__all__ = [
    "CostEstimate",
    "EditClient",
    "EditRequest",
    "EditResponse",
    "ImagePart",
    "OutputImage",
    "build_files",
    "build_form",
]
