"""The emulator's seeded decisions: which fault (if any) and how much latency a request gets.

Each decision is a pure function of (fault seed, the request's content fingerprint, how many
times that fingerprint was seen before), never of arrival order, so concurrent runs replay
identically and a retry of the same request gets a fresh draw.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.emulator.config import EmulatorConfig

RATE_LIMITED = "rate_limited"
INTERNAL_ERROR = "internal_error"
PROVIDERS_EXHAUSTED = "providers_exhausted"
DROPPED = "dropped"
SLOW = "slow"
MALFORMED_PREFIX = "malformed_"
TRUNCATED = "truncated_download"

# Where a dropped answer or a truncated download is cut, as a fraction of its body.
MIN_CUT = 0.2
MAX_CUT = 0.8

# Flourishes for a plausible provider-side prompt rewrite.
_REWRITES: tuple[str, ...] = (
    "{p}, with natural lighting and consistent perspective",
    "{p}, preserving the original composition and colour palette",
    "{p}, rendered in high detail with realistic textures",
    "{p}, keeping the main subject's identity and pose unchanged",
    "Photorealistic edit: {p}, seamlessly blended with the surrounding scene",
    "{p}, with soft shadows and a balanced, cinematic colour grade",
)


@dataclass(frozen=True)
class Draw:
    fault: str | None
    latency: float
    cut: float  # fraction of a body a drop or truncation lets through
    attempt: int = 0
    step: int | None = None  # the gateway weather's step (pipeline.emulator.weather), if any


def fingerprint(
    fields: Iterable[tuple[str, str]],
    files: Iterable[tuple[str, str]],
    query: Iterable[tuple[str, str]],
) -> str:
    """A digest of a request's content: text fields and query (order-free), files in order."""
    doc = {
        "fields": sorted(fields),
        "files": list(files),
        "query": sorted(query),
    }
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def draw(config: EmulatorConfig, fp: str, attempt: int, *, response_format: str) -> Draw:
    """The fault and latency for attempt number `attempt` (0-based) of request `fp`."""
    rng = _rng(config.fault_seed, fp, attempt)
    # Always consume the same numbers in the same order so replays line up.
    u_fault, u_kind, u_cut = rng.random(), rng.random(), rng.random()
    latency = _latency(config, rng)
    cut = MIN_CUT + (MAX_CUT - MIN_CUT) * u_cut

    malformed = [
        kind
        for kind in config.malformed_kinds
        if not (response_format == "url" and kind == "bad_base64")
    ]
    bands: list[tuple[float, str | None]] = [
        (config.rate_limited_rate, RATE_LIMITED),
        (config.internal_error_rate, INTERNAL_ERROR),
        (config.exhausted_rate, PROVIDERS_EXHAUSTED),
        (config.drop_rate, DROPPED),
        (config.slow_rate, SLOW),
        (
            config.malformed_rate,
            MALFORMED_PREFIX + malformed[int(u_kind * len(malformed))] if malformed else None,
        ),
        # A b64_json answer has nothing to download: that band means "no fault" there.
        (config.truncate_rate, TRUNCATED if response_format == "url" else None),
    ]
    edge = 0.0
    for rate, kind in bands:
        edge += rate
        if u_fault < edge:
            return Draw(kind, latency, cut, attempt)
    return Draw(None, latency, cut, attempt)


def _latency(config: EmulatorConfig, rng: random.Random) -> float:
    mean, spread = config.latency, config.latency_jitter
    u = rng.random()
    g = rng.gauss(0.0, 1.0)
    if mean <= 0.0 or spread <= 0.0 or config.latency_distribution == "fixed":
        return mean
    if config.latency_distribution == "uniform":
        half = spread * math.sqrt(3.0)  # same standard deviation as `spread`
        low = max(0.0, mean - half)
        return low + (mean + half - low) * u
    # lognormal with this mean and standard deviation
    sigma2 = math.log(1.0 + (spread / mean) ** 2)
    return math.exp(math.log(mean) - sigma2 / 2.0 + math.sqrt(sigma2) * g)


def revised_prompt(prompt: str, fp: str, rate: float) -> str | None:
    """The provider's rewrite of `prompt` for this request, present for about `rate` of them."""
    rng = _rng("revised", fp)
    if rng.random() >= rate:
        return None
    core = " ".join(prompt.split()).rstrip(" .")
    if not core:
        return None
    template = _REWRITES[rng.randrange(len(_REWRITES))]
    text = template.format(p=core)
    return text[0].upper() + text[1:] + "."
