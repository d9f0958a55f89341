"""The shapes of the emulator's answers: error answers, JSON bodies, broken and dropped bodies.

ErrorAnswer is the emulator's own: an error response it is about to send, in the gateway's
shape. It is not the client's APIError (pipeline.errors), which is what a client makes of one.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from pipeline.emulator.catalog import emulated
from pipeline.models.schema import profile_to_schema

MODEL_CREATED = 1_751_328_000  # fixed, so /models answers are stable

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


class ErrorAnswer(Exception):
    """An error response the emulator sends, in the gateway's shape; raised to answer with it."""

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

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        """This answer, with `headers` (the request's own) under the error's."""
        return JSONResponse(
            self.body(), status_code=self.status, headers={**(headers or {}), **self.headers}
        )


def invalid(message: str, param: str | None = None) -> ErrorAnswer:
    """A 400 INVALID_REQUEST answer."""
    return ErrorAnswer(400, "INVALID_REQUEST", message, param=param)


class IntentionalDrop(Exception):
    """Raised mid-response to make uvicorn close the connection, as a dropped answer."""


class DroppingResponse(Response):
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
        raise IntentionalDrop("connection dropped on purpose")


def json_bytes(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def b64_body(doc: dict[str, Any], images: Sequence[bytes], bad: str | None) -> bytes:
    """The JSON body with each image inline; `bad` replaces every payload when set.

    Base64 needs no JSON escaping, so the payloads are spliced into the dumped document at
    placeholders instead of going through json.dumps (megabytes per image).
    """
    if bad is not None:
        for item in doc["data"]:
            item["b64_json"] = bad
        return json_bytes(doc)
    marks = [f"{_B64_MARK}{i}" for i in range(len(images))]
    for item, mark in zip(doc["data"], marks, strict=True):
        item["b64_json"] = mark
    pieces: list[bytes] = []
    rest = json_bytes(doc)
    for mark, data in zip(marks, images, strict=True):
        head, rest = rest.split(mark.encode(), 1)
        pieces += (head, base64.b64encode(data))
    pieces.append(rest)
    return b"".join(pieces)


def model_doc(model: str, with_schema: bool) -> dict[str, Any]:
    """A /v1/models entry; with its parameter schema when asked (`?schema=true`)."""
    profile = emulated(model).profile
    doc: dict[str, Any] = {
        "id": model,
        "object": "model",
        "created": MODEL_CREATED,
        "owned_by": profile.owned_by,
    }
    if with_schema:
        doc["schema"] = profile_to_schema(profile)
        if profile.cost.source != "tokens":
            doc["pricing"] = {"per_image": profile.cost.price_per_image_usd}
    return doc
