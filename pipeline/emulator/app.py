"""The emulator's FastAPI app: the edit API under /v1, plus a ledger and controls under /_emulator.

`create_app(config)` is the entry point. The edit request is handled in edits, checked in
validate, answered in the shapes of answers; what the emulator remembers is its state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.emulator.answers import (
    DroppingResponse,
    ErrorAnswer,
    IntentionalDrop,
    invalid,
    model_doc,
)
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.edits import handle_edit
from pipeline.emulator.state import EmulatorState
from pipeline.emulator.validate import check_auth, is_true
from pipeline.errors import ConfigError


class _QuietDrops(logging.Filter):
    """Keeps uvicorn's log free of tracebacks that are no fault: the drops the emulator makes
    on purpose, and requests cancelled at shutdown (slow answers still waiting)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not _is_expected(exc)


def _is_expected(exc: BaseException | None) -> bool:
    if isinstance(exc, IntentionalDrop | asyncio.CancelledError):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_expected(e) for e in exc.exceptions)
    return False


_QUIET_DROPS = _QuietDrops()


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
        return ErrorAnswer(exc.status_code, code, str(exc.detail)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return invalid(f"invalid request: {exc.errors()}").response()

    @app.post("/v1/images/edits")
    async def images_edits(request: Request) -> Response:
        return await handle_edit(state, request)

    _add_files_and_models(app, state)
    _add_controls(app, state)
    return app


def _add_files_and_models(app: FastAPI, state: EmulatorState) -> None:
    """GET /v1/files/{name} (stored results) and /v1/models."""

    @app.get("/v1/files/{name}")
    async def download(name: str) -> Response:
        entry = state.files.get(name)
        if entry is None:
            state.downloads_missing += 1
            return ErrorAnswer(404, "NOT_FOUND", f"File {name!r} not found or expired").response()
        state.downloads += 1
        if entry.truncate_at is not None:
            cut = entry.truncate_at
            # Only the first download breaks, as a transient transfer failure would.
            entry.truncate_at = None
            state.downloads_truncated += 1
            return DroppingResponse(entry.data, cut=cut, media_type=entry.content_type, headers={})
        return Response(entry.data, media_type=entry.content_type)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            check_auth(state.config.api_key, request)
        except ErrorAnswer as err:
            return err.response()
        with_schema = is_true(request.query_params.get("schema"))
        return JSONResponse(
            {"object": "list", "data": [model_doc(m, with_schema) for m in state.config.models]}
        )

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> Response:
        try:
            check_auth(state.config.api_key, request)
        except ErrorAnswer as err:
            return err.response()
        if model_id not in state.config.models:
            return ErrorAnswer(
                404, "MODEL_NOT_FOUND", f"Model '{model_id}' not found", param="model"
            ).response()
        return JSONResponse(model_doc(model_id, is_true(request.query_params.get("schema"))))


def _add_controls(app: FastAPI, state: EmulatorState) -> None:
    """The /_emulator controls: stats, reset, config, the request log."""

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
            return invalid("config update must be a JSON object").response()
        if not isinstance(changes, dict):
            return invalid("config update must be a JSON object").response()
        try:
            state.apply_config(changes)
        except ConfigError as exc:
            return invalid(str(exc)).response()
        return JSONResponse(state.config.public_dict())

    @app.get("/_emulator/requests")
    async def requests_log(request: Request) -> Response:
        entries = list(state.log)
        limit = request.query_params.get("limit")
        if limit and limit.isdigit():
            entries = entries[-int(limit) :] if int(limit) else []
        return JSONResponse({"total": len(state.log), "requests": entries})
