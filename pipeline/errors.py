"""Every exception imgedit raises, in one tree, with what each means for a run.

Each API error says three things the runner acts on:
- `retryable`: another attempt may succeed (connection errors, 408, 409, 429, 5xx, bad bodies);
- `run_fatal`: no other row can succeed either (401, 402, unknown model), so the run stops;
- `may_have_charged`: the request reached the server and the answer was lost, so the server
  may have charged for an edit we never received (a retry then risks a double charge).
Anything else fails one row. Messages never contain credentials, and text from the API in
them (messages, codes, request ids, bodies) is cut to the caps in `spec`.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Mapping
from typing import Any

from pipeline.constants import (
    MAX_API_SHORT_TEXT_CHARS,
    MAX_API_TEXT_CHARS,
    MAX_METADATA_JSON_CHARS,
    MAX_RETRY_AFTER_S,
)

# A non-JSON error body is most likely an HTML page: its start says enough.
MAX_TEXT_ERROR_BODY_CHARS = 500
CUT_MARKER = "... [cut, {n} characters]"
MS_PER_S = 1000.0
# "{}" around the members of a JSON object, ", " between two members or items.
_JSON_BRACES_CHARS = len("{}")
JSON_SEPARATOR_CHARS = len(", ")


class ImgEditError(Exception):
    """Base of every error imgedit raises on purpose."""


# --- text from the API ----------------------------------------------------------------------
# Here rather than in the client: the error mapping below needs them too.


def cut_text(text: str, limit: int) -> str:
    """`text` when it fits in `limit` characters, else its start and a marker naming its
    length (`... [cut, 5242880 characters]`): `limit` characters in all."""
    if len(text) <= limit:
        return text
    marker = CUT_MARKER.format(n=len(text))
    if len(marker) >= limit:
        return text[:limit]
    return text[: limit - len(marker)] + marker


def json_chars(value: Any) -> int:
    """How many characters `value` takes as JSON (as a sidecar writes it)."""
    return len(json.dumps(value, default=str))


def _short_scalar(value: Any) -> tuple[bool, Any]:
    """(keep, value): a scalar whose text is short, strings cut to the short cap."""
    if isinstance(value, str):
        return True, cut_text(value, MAX_API_SHORT_TEXT_CHARS)
    if value is None or isinstance(value, bool | float):
        return True, value
    if isinstance(value, int):
        return len(str(value)) <= MAX_API_SHORT_TEXT_CHARS, value
    return False, value


def short_scalars(
    mapping: Mapping[Any, Any], max_json_chars: int = MAX_METADATA_JSON_CHARS
) -> dict[str, Any]:
    """What is left of an oversized object: its scalar members with a short key and a short
    text (strings cut to the short cap), in order, as many as fit in `max_json_chars`."""
    out: dict[str, Any] = {}
    used = _JSON_BRACES_CHARS
    for key, value in mapping.items():
        if not isinstance(key, str) or len(key) > MAX_API_SHORT_TEXT_CHARS:
            continue
        keep, short = _short_scalar(value)
        if not keep:
            continue
        size = json_chars({key: short}) - _JSON_BRACES_CHARS
        if out:
            size += JSON_SEPARATOR_CHARS
        if used + size > max_json_chars:
            break
        out[key] = short
        used += size
    return out


def capped_object(
    mapping: Mapping[Any, Any], max_json_chars: int = MAX_METADATA_JSON_CHARS
) -> dict[str, Any]:
    """`mapping` as it is when its JSON fits in `max_json_chars`, else its short scalars."""
    if json_chars(mapping) <= max_json_chars:
        return dict(mapping)
    return short_scalars(mapping, max_json_chars)


def capped_wait(seconds: float | None) -> float | None:
    """A wait a server asked for, made safe to sleep: None for NaN or a negative value,
    at most MAX_RETRY_AFTER_S (an infinite or absurd wait becomes the cap)."""
    if seconds is None or math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


def _opt_short(text: str | None) -> str | None:
    return cut_text(text, MAX_API_SHORT_TEXT_CHARS) if text is not None else None


# --- input --------------------------------------------------------------------------------


class ManifestError(ImgEditError):
    """The manifest as a whole cannot be used (unreadable, unknown format, no prompt column...).

    Raised before any API call.
    """


class SourceError(ImgEditError):
    """A source image (or mask) of one row could not be read or is not a usable image."""

    def __init__(self, message: str, *, column: str = "image", uri: str | None = None) -> None:
        super().__init__(message)
        self.column = column
        self.uri = uri


class BlockedAddressError(ImgEditError):
    """A URL we refuse to fetch: its scheme, its host's addresses, or too many redirects.

    `url` is the refused URL, redacted (no user-info, query replaced by `...`); `host` and
    `address` are set when an address was refused; `detail` is the message after the URL.
    """

    def __init__(
        self,
        detail: str,
        *,
        url: str | None = None,
        host: str | None = None,
        address: str | None = None,
    ) -> None:
        self.detail = detail
        self.url = url
        self.host = host
        self.address = address
        where = url if url is not None else host
        super().__init__(f"refused {where}: {detail}" if where else f"refused: {detail}")

    def for_url(self, shown_url: str) -> BlockedAddressError:
        """The same refusal, naming `shown_url` (already redacted by the caller)."""
        return BlockedAddressError(self.detail, url=shown_url, host=self.host, address=self.address)


class InvalidImageError(ImgEditError):
    """Bytes that are not a complete, decodable image of a supported format."""


class StorageError(ImgEditError):
    """Reading or writing the output storage failed.

    `fatal`: no other write will succeed either (no space left, a read-only filesystem or
    bucket, access denied, credentials refused, no such bucket): the run stops spending.
    """

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class StorageNotFound(StorageError):
    """The key does not exist in the storage."""


class InvalidKeyError(StorageError, ValueError):
    """A key that is not a clean relative path (absolute, `..`, backslash, NUL...)."""


class HistoryError(ImgEditError):
    """No such output, no runs in it, or no such run."""


class SpecValueError(ValueError):
    """A parameter value the API would reject; the message is the reason, for a person."""


class EmulatorStartError(ImgEditError):
    """The emulator subprocess did not come up."""


class ConfigError(ImgEditError):
    """The run's configuration is unusable (bad output URI, missing API base...)."""


class PathNotAllowedError(ConfigError):
    """A manifest, output or source outside the worker's IMGEDIT_ALLOWED_ROOTS."""


# --- the edit API ---------------------------------------------------------------------------


class APIError(ImgEditError):
    retryable: bool = False
    run_fatal: bool = False
    may_have_charged: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        # Messages quote the API (error messages, exception text): never uncut.
        message = cut_text(message, MAX_API_TEXT_CHARS)
        super().__init__(message)
        self.message = message
        self.code = _opt_short(code)
        self.status = status
        self.request_id = _opt_short(request_id)

    @property
    def error_code(self) -> str:
        """A short, stable code for the results table."""
        return self.code or type(self).__name__


class APIConnectionError(APIError):
    """The request did not get an answer: refused, reset, dropped mid-response."""

    retryable = True

    def __init__(self, message: str, *, sent: bool = True, **kw: Any) -> None:
        super().__init__(message, **kw)
        # A connection refused before the request went out cannot have been charged.
        self.may_have_charged = sent


class APITimeoutError(APIConnectionError):
    """No complete answer within the client's timeout."""


class APIResponseError(APIError):
    """A 2xx answer we cannot use: not JSON, no `data`, bad base64, not an image.

    The server answered success, so it has most likely charged.
    """

    retryable = True
    may_have_charged = True


class ResponseTooLargeError(APIResponseError):
    """A result image (inline or at its URL) is larger than the configured cap.

    Not retried: the same request would most likely produce (and charge) the same again.
    """

    retryable = False


class UnsafeURLError(APIResponseError):
    """A result URL on a host we refuse to fetch from (not https, not the API's own host)."""

    retryable = False


class DownloadError(APIResponseError):
    """A result URL could not be downloaded (expired, dropped, truncated)."""


class APIStatusError(APIError):
    """The API answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code, status=status, request_id=request_id)
        self.retry_after = capped_wait(retry_after)
        self.body = capped_object(body) if body else {}

    def __str__(self) -> str:
        code = f" {self.code}" if self.code else ""
        return f"HTTP {self.status}{code}: {self.message}"


class BadRequestError(APIStatusError):
    """400: this row's request is invalid; retrying cannot help."""


class ContentPolicyError(BadRequestError):
    """400 CONTENT_POLICY_VIOLATION: the provider refused this prompt or image."""


class AuthenticationError(APIStatusError):
    """401: the API key is missing or wrong; every row would fail."""

    run_fatal = True


class InsufficientBalanceError(APIStatusError):
    """402: the account cannot pay; every row would fail until it is topped up."""

    run_fatal = True


class PermissionDeniedError(APIStatusError):
    """403: the key may not use this model or endpoint; every row would fail."""

    run_fatal = True


class NotFoundError(APIStatusError):
    """404: for the edit endpoint this is MODEL_NOT_FOUND / MODEL_DISABLED: fatal to the run."""

    run_fatal = True


class RequestTimeoutError(APIStatusError):
    """408."""

    retryable = True


class ConflictError(APIStatusError):
    """409."""

    retryable = True


class UnprocessableEntityError(APIStatusError):
    """422: the request is well-formed but refused; retrying cannot help."""


class RateLimitError(APIStatusError):
    """429 RATE_LIMITED; honour `retry_after`."""

    retryable = True


class ServerError(APIStatusError):
    """5xx: the gateway or the provider failed; try again later."""

    retryable = True


class ProvidersExhaustedError(ServerError):
    """502 ALL_PROVIDERS_EXHAUSTED (also what upstream timeouts become)."""


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: InsufficientBalanceError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    409: ConflictError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}
_CODE_CLASSES: dict[str, type[APIStatusError]] = {
    "CONTENT_POLICY_VIOLATION": ContentPolicyError,
    "AUTHENTICATION_FAILED": AuthenticationError,
    "INSUFFICIENT_BALANCE": InsufficientBalanceError,
    "RATE_LIMITED": RateLimitError,
    "ALL_PROVIDERS_EXHAUSTED": ProvidersExhaustedError,
}


def _seconds(text: str, scale: float = 1.0) -> float | None:
    try:
        return capped_wait(float(text) / scale)
    except ValueError:
        return None


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` (seconds or an HTTP date).

    Never more than MAX_RETRY_AFTER_S: an infinite, absurd or far-future wait is the cap, so
    every user of the value (tenacity's wait, the slot a fixed limit closes) gets a capped one.
    A negative or NaN number is garbage: ignored like any other unreadable value (None),
    and `retry-after-ms` garbage falls back to `Retry-After`. A date in the past is 0.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms:
        waited = _seconds(ms, MS_PER_S)
        if waited is not None:
            return waited
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return capped_wait(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
        delta = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, OverflowError, OSError, IndexError):
        return None
    return capped_wait(max(0.0, delta))


def error_for_status(
    status: int,
    body: Any,
    headers: Mapping[str, str],
    *,
    request_id: str | None = None,
) -> APIStatusError:
    """Map an error answer (status, decoded JSON body or raw text, headers) to its class."""
    message = f"HTTP {status}"
    code: str | None = None
    err_body: dict[str, Any] = {}
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping):
            # Cut here and again in APIStatusError: an uncut message, code or body never
            # reaches a results table or a log.
            err_body = capped_object(err)
            message = cut_text(str(err.get("message") or message), MAX_API_TEXT_CHARS)
            raw_code = err.get("code") or err.get("type")
            code = cut_text(str(raw_code), MAX_API_SHORT_TEXT_CHARS) if raw_code else None
        elif isinstance(body.get("message"), str):
            message = cut_text(str(body["message"]), MAX_API_TEXT_CHARS)
    elif isinstance(body, str) and body.strip():
        message = cut_text(body.strip(), MAX_TEXT_ERROR_BODY_CHARS)
    cls: type[APIStatusError] | None = _CODE_CLASSES.get(code or "")
    if cls is None:
        cls = _STATUS_CLASSES.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else BadRequestError
    # A code must not turn a status into something milder or harsher than the status says
    # for the two run-fatal statuses.
    if status in (401, 402) and not cls.run_fatal:
        cls = _STATUS_CLASSES[status]
    return cls(
        message,
        status=status,
        code=code,
        request_id=request_id,
        retry_after=parse_retry_after(headers),
        body=err_body,
    )
