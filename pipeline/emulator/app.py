"""The emulator's FastAPI app: the edit API under /v1, plus a ledger and controls under /_emulator.

Request handling stays on the event loop only for cheap work (parsing, hashing, header
probes); decoding, rendering, encoding and big JSON bodies run in a thread pool, and every
wait (latency, slow answers) is an asyncio sleep.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from pipeline import spec
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.faults import (
    DROPPED,
    INTERNAL_ERROR,
    MALFORMED_PREFIX,
    PROVIDERS_EXHAUSTED,
    RATE_LIMITED,
    SLOW,
    TRUNCATED,
    Draw,
    draw,
    fingerprint,
    revised_prompt,
)
from pipeline.emulator.render import Base, BaseCache, build_base, render_variant
from pipeline.emulator.store import FileStore
from pipeline.errors import ConfigError, InvalidImageError, SpecValueError
from pipeline.imageinfo import probe

log = logging.getLogger(__name__)

PROVIDER = "replicate"
PROVIDER_NAME = "Replicate"
EXECUTED_MODEL_PREFIX = "replicate/prunaai/"
MODEL_OWNER = "prunaai"
MODEL_CREATED = 1_751_328_000  # fixed, so /models answers are stable
PRICE_MICROS = round(spec.PRICE_PER_IMAGE_USD * spec.MICROS_PER_USD)
REQUEST_ID_PREFIX = "req_"

# Multipart limits: 5 images + a mask + room for stray parts; many provider fields.
MAX_FORM_FILES = 32
MAX_FORM_FIELDS = 256
MAX_FIELD_BYTES = 1024 * 1024
MAX_SEED = 2**63
# Attempt counts kept per request fingerprint, for replayable fault draws.
FINGERPRINT_MEMORY = 1_000_000
IMAGE_PART_RE = re.compile(r"^image(\[\d*\])?$")
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_balance",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
}

NOT_JSON_BODY = (
    b"<html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>upstream sent an invalid response</p></body></html>"
)
# After dropping the characters a lenient decoder ignores, 9 are left: never valid base64.
BAD_BASE64 = "!!notbase64!!"
# Placeholder for a base64 payload: random per process, so no prompt can collide with it.
_B64_MARK = f"b64-{uuid.uuid4().hex}-"
NOT_IMAGE_BYTES = b"this is not an image: the provider returned text where pixels belong\n"


class _IntentionalDrop(Exception):
    """Raised mid-response to make uvicorn close the connection, as a dropped answer."""


class _QuietDrops(logging.Filter):
    """Keeps uvicorn's log free of tracebacks that are no fault: the drops the emulator makes
    on purpose, and requests cancelled at shutdown (slow answers still waiting)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not _is_expected(exc)


def _is_expected(exc: BaseException | None) -> bool:
    if isinstance(exc, _IntentionalDrop | asyncio.CancelledError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_expected(e) for e in exc.exceptions)
    return False


_QUIET_DROPS = _QuietDrops()


class ApiError(Exception):
    """An error answer in the gateway's shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "api_error"),
                "code": self.code,
                "param": self.param,
            }
        }


def _invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "INVALID_REQUEST", message, param=param)


class _DroppingResponse(Response):
    """Announces the whole body, sends `cut` of it, then breaks the connection."""

    def __init__(self, content: bytes, *, cut: float, media_type: str, headers: dict[str, str]):
        super().__init__(content=content, media_type=media_type, headers=headers)
        self.cut = cut

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        part = self.body[: max(1, int(len(self.body) * self.cut))]
        await send({"type": "http.response.body", "body": part, "more_body": True})
        raise _IntentionalDrop("connection dropped on purpose")


@dataclass
class _Edit:
    """A validated edit request."""

    model: str
    prompt: str
    images: list[bytes]
    image_sha: list[str]
    mask: bytes | None
    mask_sha: str | None
    n: int
    width: int
    height: int
    response_format: str
    output_format: str
    compression: int | None
    seed: int | None

    @property
    def cost_micros(self) -> int:
        return self.n * PRICE_MICROS


class EmulatorState:
    """Config, ledger, request log, caches: everything one emulator instance remembers."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        threads = config.render_threads or os.cpu_count() or 2
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="render")
        self.bases = BaseCache(config.base_cache_size)
        self._pending_bases: dict[tuple[object, ...], asyncio.Future[Base]] = {}
        self.files = FileStore(config.file_store_bytes, config.file_ttl)
        self.log: deque[dict[str, Any]] = deque(maxlen=config.request_log_size)
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.charged_requests = 0
        self.charged_images = 0
        self.charged_micros = 0
        self.dry_runs = 0
        self.downloads = 0
        self.downloads_truncated = 0
        self.downloads_missing = 0
        self.images_rendered = 0
        self.by_status: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.seen: dict[str, int] = {}
        self.reserved_micros = 0
        self.balance_micros = _micros(self.config.balance_usd)
        self.log.clear()

    def apply_config(self, changes: Mapping[str, Any]) -> None:
        self.config = self.config.updated(changes)
        self.bases.max_entries = self.config.base_cache_size
        self.files.max_bytes = self.config.file_store_bytes
        self.files.ttl = self.config.file_ttl
        if self.log.maxlen != self.config.request_log_size:
            self.log = deque(self.log, maxlen=self.config.request_log_size)
        if "balance_usd" in changes:
            self.balance_micros = _micros(self.config.balance_usd)

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "charged_requests": self.charged_requests,
            "charged_images": self.charged_images,
            "charged_usd": round(self.charged_micros / spec.MICROS_PER_USD, 6),
            "charged_micros": self.charged_micros,
            "dry_runs": self.dry_runs,
            "downloads": self.downloads,
            "downloads_truncated": self.downloads_truncated,
            "downloads_missing": self.downloads_missing,
            "images_rendered": self.images_rendered,
            "by_status": dict(sorted(self.by_status.items())),
            "faults": dict(sorted(self.faults.items())),
            "balance_usd": (
                None
                if self.balance_micros is None
                else round(self.balance_micros / spec.MICROS_PER_USD, 6)
            ),
            "files_stored": len(self.files),
            "file_bytes": self.files.bytes,
            "base_cache": {
                "entries": len(self.bases),
                "hits": self.bases.hits,
                "misses": self.bases.misses,
            },
        }

    def draw(self, fp: str, response_format: str) -> Draw:
        """This request's fault and latency; counts it as one more attempt of `fp`."""
        attempt = self.seen.get(fp, 0)
        self.seen[fp] = attempt + 1
        if len(self.seen) > FINGERPRINT_MEMORY:
            # Forget the fingerprint first seen longest ago (dicts keep insertion order).
            del self.seen[next(iter(self.seen))]
        return draw(self.config, fp, attempt, response_format=response_format)

    async def base(self, edit: _Edit) -> Base:
        """The cached base for this edit, built once even when many requests want it at once."""
        key: tuple[object, ...] = (tuple(edit.image_sha), edit.mask_sha, edit.width, edit.height)
        found = self.bases.get(key)
        if found is not None:
            return found
        pending = self._pending_bases.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(
                self.executor, build_base, edit.images, edit.mask, edit.width, edit.height
            )
            self._pending_bases[key] = pending
            pending.add_done_callback(partial(self._base_done, key))
        return await asyncio.shield(pending)

    def _base_done(self, key: tuple[object, ...], future: asyncio.Future[Base]) -> None:
        self._pending_bases.pop(key, None)
        if not future.cancelled() and future.exception() is None:
            self.bases.put(key, future.result())


def _micros(usd: float | None) -> int | None:
    return None if usd is None else round(usd * spec.MICROS_PER_USD)


def _usd(micros: int) -> str:
    return f"${micros / spec.MICROS_PER_USD:.2f}"


# --- request parsing and validation ----------------------------------------------------------


@dataclass(frozen=True)
class _File:
    name: str
    upload: UploadFile
    data: bytes
    sha256: str


@dataclass
class _Form:
    fields: list[tuple[str, str]]
    files: list[_File]

    def first(self, name: str) -> str | None:
        for key, value in self.fields:
            if key == name:
                return value
        return None


async def _read_form(request: Request) -> _Form:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise _invalid(
            f"expected a multipart/form-data body, got {content_type or 'no content type'!r}"
        )
    try:
        form = await request.form(
            max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
    except StarletteHTTPException as exc:
        raise _invalid(f"unreadable multipart body: {exc.detail}") from exc
    try:
        fields: list[tuple[str, str]] = []
        files: list[_File] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                files.append(_File(key, value, data, hashlib.sha256(data).hexdigest()))
            else:
                fields.append((key, value))
        return _Form(fields, files)
    finally:
        await form.close()


def _int_field(form: _Form, name: str, low: int | None, high: int | None) -> int | None:
    raw = form.first(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise _invalid(f"{name} must be an integer, got {raw[:40]!r}", name) from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise _invalid(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _text_field(form: _Form, name: str) -> str | None:
    raw = form.first(name)
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()


def _validate(form: _Form, config: EmulatorConfig) -> _Edit:
    model = _text_field(form, "model")
    if model is None:
        raise _invalid("model: Invalid input: expected string, received undefined", "model")
    if model not in config.models:
        raise ApiError(404, "MODEL_NOT_FOUND", f"Model '{model}' not found", param="model")
    if model in config.disabled_models:
        raise ApiError(404, "MODEL_DISABLED", f"Model '{model}' is disabled", param="model")

    prompt = form.first("prompt")
    if prompt is None:
        raise _invalid("prompt: Invalid input: expected string, received undefined", "prompt")
    if not prompt.strip():
        raise _invalid("prompt: Too small: expected string to have >=1 characters", "prompt")
    if len(prompt) > spec.MAX_PROMPT_CHARS:
        raise _invalid(
            f"prompt: Too big: expected string to have <={spec.MAX_PROMPT_CHARS} characters",
            "prompt",
        )

    for key, _ in form.fields:
        if IMAGE_PART_RE.match(key) or key == "mask":
            raise _invalid(f"{key} must be a file upload, got a text field", key)
    parts = [f for f in form.files if IMAGE_PART_RE.match(f.name)]
    if not parts:
        raise _invalid("image: at least one image file is required", "image")
    if len(parts) > spec.MAX_IMAGES:
        raise _invalid(
            f"image: {model} accepts at most {spec.MAX_IMAGES} images, got {len(parts)}", "image"
        )
    dims: list[tuple[int, int]] = []
    for i, part in enumerate(parts, start=1):
        key, data = part.name, part.data
        if len(data) > config.max_image_bytes:
            raise _invalid(
                f"image {i} is {len(data)} bytes, more than the {config.max_image_bytes} allowed",
                key,
            )
        try:
            info = probe(data)
        except InvalidImageError as exc:
            raise _invalid(f"image {i} is not a valid image: {exc}", key) from exc
        if info.format not in spec.INPUT_FORMATS:
            accepted = ", ".join(sorted(spec.INPUT_FORMATS))
            raise _invalid(
                f"image {i} has unsupported format {info.format}; expected {accepted}", key
            )
        dims.append((info.width, info.height))

    mask_parts = [f for f in form.files if f.name == "mask"]
    if len(mask_parts) > 1:
        raise _invalid("mask: at most one mask may be sent", "mask")
    mask = mask_parts[0] if mask_parts else None
    if mask is not None:
        try:
            mask_info = probe(mask.data)
        except InvalidImageError as exc:
            raise _invalid(f"mask is not a valid image: {exc}", "mask") from exc
        if mask_info.format != "png":
            raise _invalid(f"mask must be a PNG image, got {mask_info.format}", "mask")
        if (mask_info.width, mask_info.height) != dims[0]:
            raise _invalid(
                f"mask is {mask_info.size} but the first image is {dims[0][0]}x{dims[0][1]}; "
                "they must have the same dimensions",
                "mask",
            )

    n = _int_field(form, "n", spec.MIN_N, spec.MAX_N) or 1
    compression = _int_field(form, "output_compression", spec.MIN_COMPRESSION, spec.MAX_COMPRESSION)
    seed = _int_field(form, "seed", -MAX_SEED, MAX_SEED - 1)

    response_format = _text_field(form, "response_format") or "url"
    if response_format not in spec.RESPONSE_FORMATS:
        raise _invalid(
            f"response_format must be one of {', '.join(spec.RESPONSE_FORMATS)}, "
            f"got {response_format!r}",
            "response_format",
        )
    output_format = "png"
    raw_format = _text_field(form, "output_format")
    if raw_format is not None:
        try:
            output_format = spec.normalize_output_format(raw_format)
        except SpecValueError as exc:
            raise _invalid(str(exc), "output_format") from exc
    quality = _text_field(form, "quality")
    if quality is not None and quality.lower() not in spec.QUALITY_VALUES:
        raise _invalid(
            f"quality must be one of {', '.join(spec.QUALITY_VALUES)}, got {quality!r}",
            "quality",
        )

    size = _text_field(form, "size")
    aspect_ratio = _text_field(form, "aspect_ratio")
    resolution = _text_field(form, "resolution")
    for name, value, check in (
        ("size", size, spec.check_size),
        ("aspect_ratio", aspect_ratio, spec.check_aspect_ratio),
        ("resolution", resolution, spec.check_resolution),
    ):
        if value is not None:
            try:
                check(value)
            except SpecValueError as exc:
                raise _invalid(str(exc), name) from exc
    try:
        out = spec.resolve_output_size(size, aspect_ratio, resolution, first_image=dims[0])
    except SpecValueError as exc:
        raise _invalid(str(exc), "size") from exc

    return _Edit(
        model=model,
        prompt=prompt,
        images=[p.data for p in parts],
        image_sha=[p.sha256 for p in parts],
        mask=mask.data if mask is not None else None,
        mask_sha=mask.sha256 if mask is not None else None,
        n=n,
        width=out.width,
        height=out.height,
        response_format=response_format,
        output_format=output_format,
        compression=compression,
        seed=seed,
    )


# --- the app -------------------------------------------------------------------------------


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in TRUE_VALUES


def _error_response(err: ApiError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        err.body(), status_code=err.status, headers={**(headers or {}), **err.headers}
    )


async def _sleep_until(deadline: float) -> None:
    """Sleep until time.monotonic() reaches `deadline` (at once if it has)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _render_all(base: Base, edit: _Edit) -> list[bytes]:
    return [
        render_variant(
            base,
            prompt=edit.prompt,
            seed=edit.seed,
            variant=i,
            n=edit.n,
            output_format=edit.output_format,
            compression=edit.compression,
        )
        for i in range(edit.n)
    ]


def _b64_body(doc: dict[str, Any], images: Sequence[bytes], bad: str | None) -> bytes:
    """The JSON body with each image inline; `bad` replaces every payload when set.

    Base64 needs no JSON escaping, so the payloads are spliced into the dumped document at
    placeholders instead of going through json.dumps (megabytes per image).
    """
    if bad is not None:
        for item in doc["data"]:
            item["b64_json"] = bad
        return _json_bytes(doc)
    marks = [f"{_B64_MARK}{i}" for i in range(len(images))]
    for item, mark in zip(doc["data"], marks, strict=True):
        item["b64_json"] = mark
    pieces: list[bytes] = []
    rest = _json_bytes(doc)
    for mark, data in zip(marks, images, strict=True):
        head, rest = rest.split(mark.encode(), 1)
        pieces += (head, base64.b64encode(data))
    pieces.append(rest)
    return b"".join(pieces)


def _model_doc(model: str, with_schema: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": model,
        "object": "model",
        "created": MODEL_CREATED,
        "owned_by": MODEL_OWNER,
    }
    if with_schema:
        doc["schema"] = {
            "prompt": {"type": "string", "maxLength": spec.MAX_PROMPT_CHARS, "required": True},
            "image": {"type": "file", "minItems": spec.MIN_IMAGES, "maxItems": spec.MAX_IMAGES},
            "mask": {"type": "file", "format": "png"},
            "n": {"type": "integer", "minimum": spec.MIN_N, "maximum": spec.MAX_N},
            "size": {"type": "string", "enum": ["auto", *(str(s) for s in spec.SUPPORTED_SIZES)]},
            "aspect_ratio": {
                "type": "string",
                "enum": ["auto", *(s.aspect for s in spec.SUPPORTED_SIZES)],
            },
            "resolution": {"type": "string", "enum": ["auto", *spec.RESOLUTION_TIERS]},
            "output_format": {"type": "string", "enum": list(spec.OUTPUT_FORMATS)},
            "output_compression": {
                "type": "integer",
                "minimum": spec.MIN_COMPRESSION,
                "maximum": spec.MAX_COMPRESSION,
            },
            "response_format": {"type": "string", "enum": list(spec.RESPONSE_FORMATS)},
            "seed": {"type": "integer"},
            "turbo": {"type": "boolean", "default": True},
            "disable_safety_checker": {"type": "boolean", "default": False},
            "replicate_weights": {"type": "string"},
        }
    return doc


def create_app(config: EmulatorConfig | None = None) -> FastAPI:
    """The emulator as an ASGI app. Its state lives in `app.state.emulator`."""
    state = EmulatorState(config or EmulatorConfig())
    logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # uvicorn configures logging before startup; make sure the filter is on.
        logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)
        yield
        state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="imgedit edit-API emulator",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.emulator = state

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "INVALID_REQUEST")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _error_response(_invalid(f"invalid request: {exc.errors()}"))

    def check_auth(request: Request) -> None:
        key = state.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), key.encode()
        ):
            raise ApiError(
                401,
                "AUTHENTICATION_FAILED",
                "Invalid API key" if header else "Missing API key: send Authorization: Bearer",
            )

    def charge(edit: _Edit) -> None:
        state.charged_requests += 1
        state.charged_images += edit.n
        state.charged_micros += edit.cost_micros
        if state.balance_micros is not None:
            state.balance_micros -= edit.cost_micros
            state.reserved_micros -= edit.cost_micros

    def reserve(edit: _Edit) -> None:
        if state.balance_micros is None:
            return
        available = state.balance_micros - state.reserved_micros
        if edit.cost_micros > available:
            raise ApiError(
                402,
                "INSUFFICIENT_BALANCE",
                f"Insufficient balance: {_usd(edit.cost_micros)} required, "
                f"{_usd(max(0, available))} available",
            )
        state.reserved_micros += edit.cost_micros

    def release(edit: _Edit) -> None:
        if state.balance_micros is not None:
            state.reserved_micros -= edit.cost_micros

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> Response:
        request_id = REQUEST_ID_PREFIX + uuid.uuid4().hex[:24]
        record: dict[str, Any] = {
            "id": request_id,
            "time": time.time(),
            "query": dict(request.query_params),
            "user_agent": request.headers.get("user-agent"),
            "status": None,
            "code": None,
            "fault": None,
            "charged": False,
            "cost_usd": 0.0,
            "dry_run": False,
        }
        state.log.append(record)
        state.requests += 1
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        headers = {
            "X-Lumenfall-Request-Id": request_id,
            "X-Lumenfall-Provider": PROVIDER,
        }
        try:
            response = await _edit(request, record, headers)
        except ApiError as err:
            record["code"] = err.code
            response = _error_response(err, headers)
        except ClientDisconnect:
            record["code"] = "CLIENT_DISCONNECTED"
            response = Response(status_code=499)
        except Exception:
            # A bug in the emulator, not an injected fault: keep its traceback in the log.
            log.exception("edit request %s failed", request_id)
            failure = ApiError(500, "INTERNAL_ERROR", "the emulator failed on this request")
            record["code"] = failure.code
            response = _error_response(failure, headers)
        finally:
            state.in_flight -= 1
        record["status"] = response.status_code
        state.by_status[str(response.status_code)] += 1
        return response

    async def _edit(request: Request, record: dict[str, Any], headers: dict[str, str]) -> Response:
        arrival = time.monotonic()
        form = await _read_form(request)
        text_fields: dict[str, str | list[str]] = {}
        for key, value in form.fields:
            prior = text_fields.get(key)
            if prior is None:
                text_fields[key] = value
            else:
                text_fields[key] = [*(prior if isinstance(prior, list) else [prior]), value]
        record["fields"] = text_fields
        record["files"] = [
            {
                "name": f.name,
                "filename": f.upload.filename,
                "content_type": f.upload.content_type,
                "bytes": len(f.data),
                "sha256": f.sha256,
            }
            for f in form.files
        ]
        image_files = [f for f in form.files if IMAGE_PART_RE.match(f.name)]
        record["image_part_names"] = [f.name for f in image_files]
        record["n_images"] = len(image_files)
        record["image_sha256"] = [f.sha256 for f in image_files]
        record["mask_sha256"] = next((f.sha256 for f in form.files if f.name == "mask"), None)
        check_auth(request)
        model = form.first("model")
        if model:
            headers["X-Lumenfall-Model"] = model
        config = state.config
        edit = _validate(form, config)
        record["n"] = edit.n
        record["output_size"] = f"{edit.width}x{edit.height}"

        query = request.query_params
        if _is_true(query.get("dryRun")) or _is_true(query.get("dry_run")):
            record["dry_run"] = True
            state.dry_runs += 1
            return Response(
                _json_bytes(_estimate(edit)), media_type="application/json", headers=headers
            )

        fp = fingerprint(form.fields, [(f.name, f.sha256) for f in form.files], query.multi_items())
        # The balance is checked before any draw: a 402 is not an attempt at the edit.
        reserve(edit)
        try:
            decision = state.draw(fp, edit.response_format)
            record.update(
                fingerprint=fp, attempt=decision.attempt, latency_s=round(decision.latency, 4)
            )
            if decision.fault is not None:
                record["fault"] = decision.fault
                state.faults[decision.fault] += 1
            if decision.fault == RATE_LIMITED:
                wait = config.retry_after
                raise ApiError(
                    429,
                    "RATE_LIMITED",
                    f"Rate limit exceeded; retry after {wait:g} s",
                    headers={
                        "Retry-After": str(math.ceil(wait)),
                        "retry-after-ms": str(round(wait * 1000)),
                    },
                )
            # The latency is the time to answer as a client sees it, from the request's
            # arrival: decoding, rendering and building the body happen within it, not on top
            # of it, so the emulator does not inflate the N*L/C bound a benchmark measures.
            deadline = arrival + decision.latency
            if decision.fault == INTERNAL_ERROR:
                await _sleep_until(deadline)
                raise ApiError(500, "INTERNAL_ERROR", "Internal error while processing the request")
            if decision.fault == PROVIDERS_EXHAUSTED:
                await _sleep_until(deadline)
                raise ApiError(
                    502,
                    "ALL_PROVIDERS_EXHAUSTED",
                    f"All providers for {edit.model} failed or timed out",
                )
            try:
                base = await state.base(edit)
            except InvalidImageError as exc:
                await _sleep_until(deadline)
                raise _invalid(f"image could not be decoded: {exc}", "image") from exc
            loop = asyncio.get_running_loop()
            images = await loop.run_in_executor(state.executor, _render_all, base, edit)
        except BaseException:
            release(edit)
            raise
        charge(edit)
        state.images_rendered += len(images)
        record["charged"] = True
        record["cost_usd"] = edit.cost_micros / spec.MICROS_PER_USD
        return await _answer(request, edit, images, decision, fp, headers, deadline)

    async def _answer(
        request: Request,
        edit: _Edit,
        images: list[bytes],
        decision: Draw,
        fp: str,
        headers: dict[str, str],
        deadline: float,
    ) -> Response:
        fault = decision.fault or ""
        malformed = fault[len(MALFORMED_PREFIX) :] if fault.startswith(MALFORMED_PREFIX) else None
        if decision.fault == SLOW:
            deadline += state.config.slow_seconds
        if malformed == "not_json":
            return await _finish(
                NOT_JSON_BODY, "text/html; charset=utf-8", decision, headers, deadline
            )

        rewrite = revised_prompt(edit.prompt, fp, state.config.revised_prompt_rate)
        doc: dict[str, Any] = {
            "id": headers["X-Lumenfall-Request-Id"],
            "created": int(time.time()),
            "size": f"{edit.width}x{edit.height}",
            "output_format": edit.output_format,
            "data": [{} for _ in images],
            "metadata": {
                "model": edit.model,
                "executed_model": EXECUTED_MODEL_PREFIX + edit.model,
                "provider": PROVIDER,
                "provider_name": PROVIDER_NAME,
                "cost": edit.cost_micros / spec.MICROS_PER_USD,
                "cost_currency": spec.CURRENCY,
            },
        }
        if malformed == "no_data":
            del doc["data"]
            return await _finish(_json_bytes(doc), "application/json", decision, headers, deadline)
        if rewrite is not None:
            for item in doc["data"]:
                item["revised_prompt"] = rewrite
        if edit.response_format == "b64_json":
            bad = BAD_BASE64 if malformed == "bad_base64" else None
            if malformed == "not_image":
                bad = base64.b64encode(NOT_IMAGE_BYTES).decode("ascii")
            body = await asyncio.get_running_loop().run_in_executor(
                state.executor, _b64_body, doc, images, bad
            )
            return await _finish(body, "application/json", decision, headers, deadline)

        base_url = state.config.public_base_url or f"{request.url.scheme}://{request.url.netloc}"
        ext = edit.output_format
        content_type = spec.CONTENT_TYPES[ext]
        truncate_at = decision.cut if decision.fault == TRUNCATED else None
        for item, data in zip(doc["data"], images, strict=True):
            payload = NOT_IMAGE_BYTES if malformed == "not_image" else data
            name = state.files.put(payload, ext, content_type, truncate_at=truncate_at)
            item["url"] = f"{base_url.rstrip('/')}/v1/files/{name}"
        return await _finish(_json_bytes(doc), "application/json", decision, headers, deadline)

    async def _finish(
        body: bytes, media_type: str, decision: Draw, headers: dict[str, str], deadline: float
    ) -> Response:
        """The answer, once its time has come (the drawn latency, plus a slow fault's delay)."""
        await _sleep_until(deadline)
        if decision.fault == DROPPED:
            return _DroppingResponse(body, cut=decision.cut, media_type=media_type, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    def _estimate(edit: _Edit) -> dict[str, Any]:
        return {
            "estimated": True,
            "model": edit.model,
            "provider": PROVIDER,
            "total_cost_micros": edit.cost_micros,
            "currency": spec.CURRENCY,
            "components": [
                {
                    "type": "output",
                    "metric": "image",
                    "quantity": edit.n,
                    "billable_quantity": edit.n,
                    "unit_price": spec.PRICE_PER_IMAGE_USD,
                    "total_cost": edit.cost_micros,
                }
            ],
        }

    @app.get("/v1/files/{name}")
    async def download(name: str) -> Response:
        entry = state.files.get(name)
        if entry is None:
            state.downloads_missing += 1
            return _error_response(
                ApiError(404, "NOT_FOUND", f"File {name!r} not found or expired")
            )
        state.downloads += 1
        if entry.truncate_at is not None:
            cut = entry.truncate_at
            # Only the first download breaks, as a transient transfer failure would.
            entry.truncate_at = None
            state.downloads_truncated += 1
            return _DroppingResponse(entry.data, cut=cut, media_type=entry.content_type, headers={})
        return Response(entry.data, media_type=entry.content_type)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            check_auth(request)
        except ApiError as err:
            return _error_response(err)
        with_schema = _is_true(request.query_params.get("schema"))
        return JSONResponse(
            {"object": "list", "data": [_model_doc(m, with_schema) for m in state.config.models]}
        )

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        try:
            check_auth(request)
        except ApiError as err:
            return _error_response(err)
        if model_id not in state.config.models:
            return _error_response(
                ApiError(404, "MODEL_NOT_FOUND", f"Model '{model_id}' not found", param="model")
            )
        return JSONResponse(_model_doc(model_id, _is_true(request.query_params.get("schema"))))

    @app.get("/_emulator/stats")
    async def stats() -> Response:
        return JSONResponse(state.stats())

    @app.post("/_emulator/reset")
    async def reset() -> Response:
        state.reset()
        return JSONResponse(state.stats())

    @app.get("/_emulator/config")
    async def get_config() -> Response:
        return JSONResponse(state.config.public_dict())

    @app.post("/_emulator/config")
    async def set_config(request: Request) -> Response:
        try:
            changes = await request.json()
        except ValueError:
            return _error_response(_invalid("config update must be a JSON object"))
        if not isinstance(changes, dict):
            return _error_response(_invalid("config update must be a JSON object"))
        try:
            state.apply_config(changes)
        except ConfigError as exc:
            return _error_response(_invalid(str(exc)))
        return JSONResponse(state.config.public_dict())

    @app.get("/_emulator/requests")
    async def requests_log(request: Request) -> Response:
        entries = list(state.log)
        limit = request.query_params.get("limit")
        if limit and limit.isdigit():
            entries = entries[-int(limit) :] if int(limit) else []
        return JSONResponse({"total": len(state.log), "requests": entries})

    return app
