"""What an answer of the edit API is believed to say: every text cut to the caps in `spec`
and `constants`, a reported cost trusted only when it is a plausible price.

Nothing an answer says can switch the budget off: a cost that is not a finite number >= 0
and at most MAX_TRUSTED_COST_FACTOR times the list price of the images asked is not
trusted (kept as text in `cost_raw`, with a warning), and a dry run's estimate that is not
such a price is refused.
"""

from __future__ import annotations

import contextlib
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from pipeline import constants, spec
from pipeline.engine.client_usage import read_usage
from pipeline.errors import (
    JSON_SEPARATOR_CHARS,
    APIResponseError,
    cut_text,
    json_chars,
    short_scalars,
)
from pipeline.imageinfo import ImageInfo
from pipeline.models.prices import TokenPrices

__all__ = [
    "MAX_COST_RAW_CHARS",
    "REQUEST_ID_HEADERS",
    "CostEstimate",
    "EditResponse",
    "OutputImage",
    "capped",
    "cost_ceiling_usd",
    "read_answer",
    "read_estimate",
    "request_id_of",
    "trusted_cost",
]

# A reported cost we do not trust is kept as text for a person, this long at most.
MAX_COST_RAW_CHARS = 64

REQUEST_ID_HEADERS = ("x-lumenfall-request-id", "x-request-id")


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
    # Where `cost` came from: "metadata" (metadata.cost) or "usage" (tokens x prices).
    cost_source: str | None = None
    usage: dict[str, int] | None = None


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


def cost_ceiling_usd(price_per_image_usd: float, n_asked: int) -> float:
    """The most a reported cost of `n_asked` images may be and still be believed."""
    return constants.MAX_TRUSTED_COST_FACTOR * price_per_image_usd * n_asked


def request_id_of(response: httpx.Response, body: Any = None) -> str | None:
    """The answer's request id, uncut: an error cuts it (APIError does), `read_answer` cuts
    it with a warning."""
    for name in REQUEST_ID_HEADERS:
        value = response.headers.get(name)
        if value:
            return str(value)
    if isinstance(body, Mapping) and isinstance(body.get("id"), str):
        return str(body["id"])
    return None


def read_answer(
    body: Mapping[str, Any],
    headers: httpx.Headers,
    *,
    images: list[OutputImage],
    n_asked: int,
    request_id: str | None,
    ceiling_usd: float,
    latency_s: float,
    warnings: list[str],
    token_prices: TokenPrices | None = None,
) -> EditResponse:
    """An edit's answer (its images already fetched and checked) as an EditResponse: every
    text cut with a warning, the reported cost trusted only under `ceiling_usd`.

    With `token_prices` (a model billed by tokens), the cost is the answer's `usage` times
    those prices when `usage` is readable, else `metadata.cost`."""
    meta = body.get("metadata")
    reported: Mapping[str, Any] = meta if isinstance(meta, Mapping) else {}
    answer_id = capped(body.get("id"), "id", warnings)
    size = capped(body.get("size"), "size", warnings)
    output_format = capped(body.get("output_format"), "output_format", warnings)
    currency = capped(
        reported.get("cost_currency") or reported.get("currency"), "currency", warnings
    )
    provider = capped(
        reported.get("provider") or headers.get("x-lumenfall-provider"), "provider", warnings
    )
    executed_model = capped(reported.get("executed_model"), "executed_model", warnings)
    model = capped(reported.get("model") or headers.get("x-lumenfall-model"), "model", warnings)
    usage = read_usage(body.get("usage"), warnings) if token_prices is not None else None
    cost_source: str | None = None
    if usage is not None and token_prices is not None:
        cost_source = "usage"
        computed = round(usage.cost_usd(token_prices), 9)
        cost, cost_raw, distrust = trusted_cost(computed, ceiling_usd, n_asked)
    else:
        cost, cost_raw, distrust = trusted_cost(reported.get("cost"), ceiling_usd, n_asked)
        if reported.get("cost") is not None:
            cost_source = "metadata"
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
        latency_s=latency_s,
        n_asked=n_asked,
        cost_raw=cost_raw,
        warnings=tuple(warnings),
        cost_source=cost_source,
        usage=usage.as_dict() if usage is not None else None,
    )


def read_estimate(body: Mapping[str, Any], *, n_asked: int, ceiling_usd: float) -> CostEstimate:
    """A dry run's answer as a CostEstimate; APIResponseError (not retried, not charged) when
    its price is not one a budget can be planned with."""
    micros = _estimate_micros(body.get("total_cost_micros"), n_asked, ceiling_usd)
    components = body.get("components")
    short = constants.MAX_API_SHORT_TEXT_CHARS
    return CostEstimate(
        total_cost_micros=micros,
        currency=cut_text(_opt_str(body.get("currency")) or spec.CURRENCY, short),
        model=_opt_short(body.get("model")),
        provider=_opt_short(body.get("provider")),
        components=_capped_components(components) if isinstance(components, list) else [],
    )


def _estimate_micros(micros: Any, n_asked: int, ceiling_usd: float) -> int:
    """A dry run's `total_cost_micros`, when it is a price we can plan a budget with.

    Anything else is a 2xx we cannot use: not retried (the same question gets the same
    answer) and not charged (a dry run charges nothing).
    """
    ceiling = ceiling_usd * spec.MICROS_PER_USD
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
    err = APIResponseError(f"dry-run answer {problem}: a 2xx answer we cannot use (not retried)")
    err.retryable = False
    err.may_have_charged = False
    raise err


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


def capped(
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
