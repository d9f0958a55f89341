"""API weather: the gateway's latency, bursts of failures and overload, seeded and scalable."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from statistics import NormalDist

from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.faults import INTERNAL_ERROR, PROVIDERS_EXHAUSTED, RATE_LIMITED, Draw

STEADY = "steady"
GATEWAY = "gateway"
OVERLOADED = "overloaded"
# The fault a request refused by the overloaded weather is logged with.
OVERLOAD = "overloaded"

# The gateway's latency as measured: lognormal with median 2.5 s and 95th percentile 6 s.
GATEWAY_P50_S = 2.5
GATEWAY_P95_S = 6.0
Z95 = NormalDist().inv_cdf(0.95)
GATEWAY_MU = math.log(GATEWAY_P50_S)
GATEWAY_SIGMA = math.log(GATEWAY_P95_S / GATEWAY_P50_S) / Z95

# The gateway's failures come in storms, not as independent draws: a two-state (Gilbert-
# Elliott) chain over requests, calm or stormy, each state failing at its own rate.
P_STORM_STARTS = 0.015  # per request while calm
P_STORM_ENDS = 0.15  # per request while stormy: a storm lasts about 7 requests
CALM_FAILURE = 0.01
STORM_FAILURE = 0.9
# A storm is a rate-limit storm (429s) or a provider outage (502s, some 500s).
RATE_LIMIT_STORMS = 0.4
EXHAUSTED_SHARE = 0.8
OUTAGE = "outage"


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


@dataclasses.dataclass
class GatewayChain:
    """The gateway's storm chain: step k's state and fault depend on the seed and k only."""

    seed: int
    step: int = 0
    storm: str | None = None  # None: calm; else RATE_LIMITED or OUTAGE

    def next_fault(self) -> str | None:
        """The fault of the next request in arrival order (None: it goes through)."""
        rng = _rng("gateway", self.seed, self.step)
        self.step += 1
        # Always consume the same numbers in the same order so replays line up.
        u_move, u_kind, u_fail, u_which = rng.random(), rng.random(), rng.random(), rng.random()
        if self.storm is None:
            if u_move < P_STORM_STARTS:
                self.storm = RATE_LIMITED if u_kind < RATE_LIMIT_STORMS else OUTAGE
        elif u_move < P_STORM_ENDS:
            self.storm = None
        if u_fail >= (CALM_FAILURE if self.storm is None else STORM_FAILURE):
            return None
        if self.storm == RATE_LIMITED:
            return RATE_LIMITED
        return PROVIDERS_EXHAUSTED if u_which < EXHAUSTED_SHARE else INTERNAL_ERROR


def gateway_faults(seed: int, count: int) -> list[str | None]:
    """The first `count` faults of the gateway weather under `seed`."""
    chain = GatewayChain(seed)
    return [chain.next_fault() for _ in range(count)]


def gateway_latency(seed: int, fp: str, attempt: int, time_scale: float) -> float:
    """The gateway's latency for this attempt of request `fp`, in scaled seconds."""
    g = _rng("gateway-latency", seed, fp, attempt).gauss(0.0, 1.0)
    return math.exp(GATEWAY_MU + GATEWAY_SIGMA * g) / time_scale


def weathered(config: EmulatorConfig, chain: GatewayChain, fp: str, base: Draw) -> Draw:
    """`base` (the configured draw) as the weather changes it; unchanged unless gateway.

    The gateway's latency replaces the configured one; its storm's fault, when it has one,
    replaces the configured fault. The chain advances once per call, in arrival order.
    """
    if config.weather != GATEWAY:
        return base
    step = chain.step
    fault = chain.next_fault() or base.fault
    latency = gateway_latency(config.fault_seed, fp, base.attempt, config.weather_time_scale)
    return dataclasses.replace(base, fault=fault, latency=latency, step=step)


def retry_after(config: EmulatorConfig) -> float:
    """The Retry-After of a 429, seconds: the configured one, on the weather's clock."""
    if config.weather == STEADY:
        return config.retry_after
    return config.retry_after / config.weather_time_scale


def admits(config: EmulatorConfig, in_flight: int) -> bool:
    """Whether a request arriving with `in_flight` others in flight may start."""
    return config.weather != OVERLOADED or in_flight < config.weather_capacity
