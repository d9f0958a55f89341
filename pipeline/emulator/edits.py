"""POST /v1/images/edits: one edit request from its arrival to its answer.

The request is admitted (unless the overloaded weather refuses it at the door), logged, read
and validated; a dry run answers the estimate; otherwise its cost is reserved, its fault and
latency drawn, the edit rendered and charged, and the answer (or the drawn fault's broken one)
sent once its time has come. Cheap work stays on the event loop; decoding, rendering and big
bodies run in the state's thread pool; waits are asyncio sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
import uuid
from typing import Any

from fastapi.responses import Response
from starlette.requests import ClientDisconnect, Request

from pipeline import spec
from pipeline.emulator.answers import (
    BAD_BASE64,
    NOT_IMAGE_BYTES,
    NOT_JSON_BODY,
    DroppingResponse,
    ErrorAnswer,
    b64_body,
    invalid,
    json_bytes,
)
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
    fingerprint,
    revised_prompt,
)
from pipeline.emulator.render import Base, render_variant
from pipeline.emulator.state import EmulatorState
from pipeline.emulator.validate import Edit, Form, check_auth, is_true, read_form, validate
from pipeline.emulator.weather import retry_after
from pipeline.errors import InvalidImageError

log = logging.getLogger(__name__)

PROVIDER = "replicate"
PROVIDER_NAME = "Replicate"
EXECUTED_MODEL_PREFIX = "replicate/prunaai/"
REQUEST_ID_PREFIX = "req_"


async def handle_edit(state: EmulatorState, request: Request) -> Response:
    """The answer to one edit request, logged in the state's request log."""
    request_id = REQUEST_ID_PREFIX + uuid.uuid4().hex[:24]
    record: dict[str, Any] = {
        "id": request_id,
        "time": time.time(),
        "query": dict(request.query_params),
        "user_agent": request.headers.get("user-agent"),
        # Which host sent it: tests of several hosts tell their workers apart by it.
        "client": request.client.host if request.client else None,
        "status": None,
        "code": None,
        "fault": None,
        "charged": False,
        "cost_usd": 0.0,
        "dry_run": False,
        "service_s": None,
    }
    headers = {
        "X-Lumenfall-Request-Id": request_id,
        "X-Lumenfall-Provider": PROVIDER,
    }
    if _key_accepted(state, request) and not state.admits():
        # Refused at the door, before the body is read: not in flight, not served, not charged.
        # A request without a valid key is not asked to wait: it goes on to its 401.
        state.refused(record)
        return _rate_limited(retry_after(state.config)).response(headers)
    state.request_started(record)
    started = time.monotonic()
    status: int | None = None
    try:
        response = await _answer_or_error(state, request, record, headers)
        status = response.status_code
        return response
    finally:
        state.request_ended(record, status, time.monotonic() - started)


def _key_accepted(state: EmulatorState, request: Request) -> bool:
    try:
        check_auth(state.config.api_key, request)
    except ErrorAnswer:
        return False
    return True


async def _answer_or_error(
    state: EmulatorState, request: Request, record: dict[str, Any], headers: dict[str, str]
) -> Response:
    try:
        return await _edit(state, request, record, headers)
    except ErrorAnswer as err:
        record["code"] = err.code
        return err.response(headers)
    except ClientDisconnect:
        record["code"] = "CLIENT_DISCONNECTED"
        return Response(status_code=499)
    except Exception:
        # A bug in the emulator, not an injected fault: keep its traceback in the log.
        log.exception("edit request %s failed", headers["X-Lumenfall-Request-Id"])
        failure = ErrorAnswer(500, "INTERNAL_ERROR", "the emulator failed on this request")
        record["code"] = failure.code
        return failure.response(headers)


def _record_form(record: dict[str, Any], form: Form) -> None:
    """What the request sent, for the request log (file contents as sizes and digests)."""
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
    image_files = form.image_parts()
    record["image_part_names"] = [f.name for f in image_files]
    record["n_images"] = len(image_files)
    record["image_sha256"] = [f.sha256 for f in image_files]
    record["mask_sha256"] = next((f.sha256 for f in form.files if f.name == "mask"), None)


async def _edit(
    state: EmulatorState, request: Request, record: dict[str, Any], headers: dict[str, str]
) -> Response:
    arrival = time.monotonic()
    form = await read_form(request)
    _record_form(record, form)
    check_auth(state.config.api_key, request)
    model = form.first("model")
    if model:
        headers["X-Lumenfall-Model"] = model
    config = state.config
    edit = validate(form, config)
    if edit.served is not None:
        headers["X-Lumenfall-Provider"] = edit.served.provider
    record["n"] = edit.n
    record["output_size"] = f"{edit.width}x{edit.height}"

    query = request.query_params
    if is_true(query.get("dryRun")) or is_true(query.get("dry_run")):
        record["dry_run"] = True
        state.dry_runs += 1
        return Response(json_bytes(_estimate(edit)), media_type="application/json", headers=headers)

    fp = fingerprint(form.fields, [(f.name, f.sha256) for f in form.files], query.multi_items())
    # The balance is checked before any draw: a 402 is not an attempt at the edit.
    state.reserve(edit)
    try:
        decision = state.draw(fp, edit.response_format)
        record.update(
            fingerprint=fp, attempt=decision.attempt, latency_s=round(decision.latency, 4)
        )
        if decision.step is not None:
            record["weather_step"] = decision.step
        if decision.fault is not None:
            record["fault"] = decision.fault
            state.faults[decision.fault] += 1
        # The latency is the time to answer as a client sees it, from the request's arrival:
        # decoding, rendering and building the body happen within it, not on top of it, so
        # the emulator does not inflate the N*L/C bound a benchmark measures.
        deadline = arrival + decision.latency
        await _uncharged_fault(decision, config, edit, deadline)
        images = await _render(state, edit, deadline)
    except BaseException:
        state.release(edit)
        raise
    state.charge(edit)
    state.images_rendered += len(images)
    record["charged"] = True
    record["cost_usd"] = edit.cost_micros / spec.MICROS_PER_USD
    return await _answer(state, request, edit, images, decision, fp, headers, deadline)


async def _uncharged_fault(
    decision: Draw, config: EmulatorConfig, edit: Edit, deadline: float
) -> None:
    """Raises the error answer of a fault that comes instead of the edit (nothing charged)."""
    if decision.fault == RATE_LIMITED:
        raise _rate_limited(retry_after(config))
    if decision.fault == INTERNAL_ERROR:
        await _sleep_until(deadline)
        raise ErrorAnswer(500, "INTERNAL_ERROR", "Internal error while processing the request")
    if decision.fault == PROVIDERS_EXHAUSTED:
        await _sleep_until(deadline)
        raise ErrorAnswer(
            502,
            "ALL_PROVIDERS_EXHAUSTED",
            f"All providers for {edit.model} failed or timed out",
        )


def _rate_limited(wait: float) -> ErrorAnswer:
    """The gateway's 429, asking the client to wait `wait` seconds."""
    return ErrorAnswer(
        429,
        "RATE_LIMITED",
        f"Rate limit exceeded; retry after {wait:g} s",
        headers={
            "Retry-After": str(math.ceil(wait)),
            "retry-after-ms": str(round(wait * 1000)),
        },
    )


async def _render(state: EmulatorState, edit: Edit, deadline: float) -> list[bytes]:
    """The edit's n encoded images; 400 (at the deadline) when a source cannot be decoded."""
    try:
        base = await state.base(edit)
    except InvalidImageError as exc:
        await _sleep_until(deadline)
        raise invalid(f"image could not be decoded: {exc}", "image") from exc
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(state.executor, _render_all, base, edit)


def _render_all(base: Base, edit: Edit) -> list[bytes]:
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


async def _answer(
    state: EmulatorState,
    request: Request,
    edit: Edit,
    images: list[bytes],
    decision: Draw,
    fp: str,
    headers: dict[str, str],
    deadline: float,
) -> Response:
    """The performed edit's answer: whole, or broken as a charged fault would have it."""
    fault = decision.fault or ""
    malformed = fault[len(MALFORMED_PREFIX) :] if fault.startswith(MALFORMED_PREFIX) else None
    if decision.fault == SLOW:
        deadline += state.config.slow_seconds
    if malformed == "not_json":
        return await _finish(NOT_JSON_BODY, "text/html; charset=utf-8", decision, headers, deadline)

    rewrite = revised_prompt(edit.prompt, fp, _rewrite_rate(edit, state.config))
    served = edit.served
    provider = served.provider if served is not None else PROVIDER
    prefix = served.executed_prefix if served is not None else EXECUTED_MODEL_PREFIX
    doc: dict[str, Any] = {
        "id": headers["X-Lumenfall-Request-Id"],
        "created": int(time.time()),
        "size": f"{edit.width}x{edit.height}",
        "output_format": edit.output_format,
        "data": [{} for _ in images],
        "metadata": {
            "model": edit.model,
            "executed_model": prefix + edit.model,
            "provider": provider,
            "provider_name": PROVIDER_NAME if provider == PROVIDER else provider,
            "cost": edit.cost_micros / spec.MICROS_PER_USD,
            "cost_currency": spec.CURRENCY,
        },
    }
    if edit.usage is not None:
        # A token-billed model reports its tokens, not a cost: the client prices them.
        doc["usage"] = edit.usage
        del doc["metadata"]["cost"]
    if malformed == "no_data":
        del doc["data"]
        return await _finish(json_bytes(doc), "application/json", decision, headers, deadline)
    if rewrite is not None:
        for item in doc["data"]:
            item["revised_prompt"] = rewrite
    if edit.response_format == "b64_json":
        bad = BAD_BASE64 if malformed == "bad_base64" else None
        if malformed == "not_image":
            bad = base64.b64encode(NOT_IMAGE_BYTES).decode("ascii")
        body = await asyncio.get_running_loop().run_in_executor(
            state.executor, b64_body, doc, images, bad
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
    return await _finish(json_bytes(doc), "application/json", decision, headers, deadline)


def _rewrite_rate(edit: Edit, config: EmulatorConfig) -> float:
    """How often the answer carries a revised_prompt: always with prompt enhancement on,
    never with it off or for a model that does not rewrite, else the configured share."""
    served = edit.served
    if served is not None and not served.profile.revised_prompt:
        return 0.0
    if edit.enhance is not None:
        return 1.0 if edit.enhance else 0.0
    return config.revised_prompt_rate


async def _finish(
    body: bytes, media_type: str, decision: Draw, headers: dict[str, str], deadline: float
) -> Response:
    """The answer, once its time has come (the drawn latency, plus a slow fault's delay)."""
    await _sleep_until(deadline)
    if decision.fault == DROPPED:
        return DroppingResponse(body, cut=decision.cut, media_type=media_type, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


async def _sleep_until(deadline: float) -> None:
    """Sleep until time.monotonic() reaches `deadline` (at once if it has)."""
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _estimate(edit: Edit) -> dict[str, Any]:
    """A dry run's answer: what the edit would cost."""
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
                "unit_price": edit.cost_micros / max(edit.n, 1) / spec.MICROS_PER_USD,
                "total_cost": edit.cost_micros,
            }
        ],
    }
