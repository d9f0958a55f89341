"""The emulator's API weather: steady by default, the gateway's latency and bursts, overload."""

from __future__ import annotations

import asyncio
import io
import math
import statistics
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from pipeline import spec
from pipeline.emulator import command, weather
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.faults import draw, fingerprint
from pipeline.emulator.process import emulator_command
from pipeline.errors import ConfigError, parse_retry_after
from tests.inprocess_emulator import InProcessEmulator

FAST = 100.0  # the gateway's clock a hundred times faster: same shape, runs in a second
FAILURES = {429, 500, 502}


def _image() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 60, 40)).save(out, "PNG")
    return out.getvalue()


IMG = _image()


@pytest.fixture
def emulators() -> Iterator[list[InProcessEmulator]]:
    """Emulators a test makes (append to the list); closed after it."""
    made: list[InProcessEmulator] = []
    yield made
    for emu in made:
        emu.close()


def _emulator(made: list[InProcessEmulator], **config: Any) -> InProcessEmulator:
    emu = InProcessEmulator(**config)
    made.append(emu)
    return emu


async def _edits(emu: InProcessEmulator, count: int, concurrency: int) -> list[httpx.Response]:
    """`count` distinct edit requests, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(transport=emu.transport, base_url=emu.base_url) as client:

        async def one(i: int) -> httpx.Response:
            async with gate:
                return await client.post(
                    "/images/edits",
                    data={
                        "model": spec.DEFAULT_MODEL,
                        "prompt": f"Add a starry night sky, take {i}",
                        "response_format": "b64_json",
                        "output_format": "jpeg",
                    },
                    files=[("image", ("i.png", IMG, "image/png"))],
                )

        return await asyncio.gather(*(one(i) for i in range(count)))


def _runs(failed: list[bool]) -> int:
    """How many runs of consecutive failures `failed` holds."""
    return sum(1 for i, f in enumerate(failed) if f and (i == 0 or not failed[i - 1]))


def _independent_runs(failed: list[bool]) -> float:
    """The runs expected were the same number of failures independent draws."""
    p = sum(failed) / len(failed)
    return len(failed) * p * (1 - p) + p * p


def _quantile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


# --- steady, the default -----------------------------------------------------------------------


def test_default_weather_is_steady_and_changes_nothing() -> None:
    config = EmulatorConfig()
    assert (config.weather, config.weather_capacity, config.weather_time_scale) == (
        "steady",
        8,
        1.0,
    )
    assert EmulatorConfig.from_env({}).weather == "steady"
    faulty = EmulatorConfig(latency=1.0, latency_jitter=0.5, latency_distribution="lognormal")
    chain = weather.GatewayChain(0)
    for i in range(50):
        fp = fingerprint([("prompt", str(i))], [], [])
        base = draw(faulty, fp, 0, response_format="url")
        assert weather.weathered(faulty, chain, fp, base) is base
    assert chain.step == 0
    assert weather.retry_after(EmulatorConfig(retry_after=2.5, weather_time_scale=10)) == 2.5
    assert weather.admits(EmulatorConfig(weather_capacity=1), 1000)


def test_weather_settings_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "IMGEDIT_EMULATOR_WEATHER": "overloaded",
        "IMGEDIT_EMULATOR_WEATHER_CAPACITY": "3",
        "IMGEDIT_EMULATOR_WEATHER_TIME_SCALE": "100",
    }
    config = EmulatorConfig.from_env(env)
    assert (config.weather, config.weather_capacity, config.weather_time_scale) == (
        "overloaded",
        3,
        100.0,
    )
    assert EmulatorConfig.from_env(config.to_env()) == config
    for bad in ({"weather": "stormy"}, {"weather_capacity": 0}, {"weather_time_scale": 0}):
        with pytest.raises(ConfigError):
            EmulatorConfig().updated(bad)

    served: list[EmulatorConfig] = []
    monkeypatch.setattr(command, "serve", lambda config, log_level: served.append(config))
    for name in EmulatorConfig.model_fields:
        monkeypatch.delenv(command.env_name(name), raising=False)
    app = typer.Typer(add_completion=False)
    app.command()(emulator_command)
    result = CliRunner().invoke(app, ["--weather", "gateway", "--weather-time-scale", "100"])
    assert result.exit_code == 0, result.output
    assert (served[0].weather, served[0].weather_time_scale) == ("gateway", 100.0)


# --- gateway -------------------------------------------------------------------------------------


def test_gateway_latency_profile_parameters() -> None:
    sigma, mu = weather.GATEWAY_SIGMA, weather.GATEWAY_MU
    assert sigma == pytest.approx(math.log(6 / 2.5) / 1.645, rel=1e-3)
    assert mu == pytest.approx(math.log(2.5))
    values = [weather.gateway_latency(3, f"fp{i}", 0, 1.0) for i in range(4000)]
    assert statistics.median(values) == pytest.approx(2.5, rel=0.06)
    assert _quantile(values, 0.95) == pytest.approx(6.0, rel=0.1)
    scaled = [weather.gateway_latency(3, f"fp{i}", 0, FAST) for i in range(4000)]
    assert scaled == pytest.approx([v / FAST for v in values])


def test_gateway_faults_come_in_bursts_and_replay() -> None:
    faults = weather.gateway_faults(11, 20_000)
    failed = [f is not None for f in faults]
    assert 0.04 < sum(failed) / len(failed) < 0.15
    # A storm fails most of its requests: far fewer runs than independent draws would give.
    assert _runs(failed) < 0.5 * _independent_runs(failed)
    assert set(faults) == {None, "rate_limited", "providers_exhausted", "internal_error"}
    assert weather.gateway_faults(11, 20_000) == faults
    assert weather.gateway_faults(12, 20_000) != faults


def test_gateway_through_the_emulator(emulators: list[InProcessEmulator]) -> None:
    emu = _emulator(emulators, weather="gateway", weather_time_scale=FAST, fault_seed=3)
    responses = asyncio.run(_edits(emu, 300, concurrency=16))
    log = sorted(emu.requests(), key=lambda r: r["weather_step"])
    assert [r["weather_step"] for r in log] == list(range(300))

    # The recorded latencies have the profile's shape, on the scaled clock.
    latencies = [r["latency_s"] * FAST for r in log]
    p50, p95 = statistics.median(latencies), _quantile(latencies, 0.95)
    assert p50 == pytest.approx(weather.GATEWAY_P50_S, rel=0.15)
    assert p95 / p50 == pytest.approx(weather.GATEWAY_P95_S / weather.GATEWAY_P50_S, rel=0.25)

    # Failures arrive in bursts along the requests' order.
    failed = [r["status"] in FAILURES for r in log]
    assert sum(failed) >= 10
    assert _runs(failed) < 0.6 * _independent_runs(failed)
    assert [r["fault"] for r in log] == weather.gateway_faults(3, 300)

    # Failures are not charged; everything admitted was served, and the ledger adds up.
    stats = emu.stats()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200} | FAILURES
    assert stats["charged_requests"] == statuses.count(200) == 300 - sum(failed)
    assert stats["rate_limited_overload"] == 0
    assert all(r["service_s"] > 0 for r in log)
    assert stats["service_seconds_total"] == pytest.approx(
        sum(r["service_s"] for r in log), abs=1e-3
    )
    for r in log:
        if r["status"] != 429:  # a 429 answers at once; the rest take their latency at least
            assert r["service_s"] >= r["latency_s"] - 1e-3
    limited = [r for r in responses if r.status_code == 429]
    assert limited and all(r.headers["retry-after-ms"] == "10" for r in limited)


def test_gateway_same_seed_same_sequence(emulators: list[InProcessEmulator]) -> None:
    def run(seed: int) -> list[tuple[str, str | None, float]]:
        emu = _emulator(emulators, weather="gateway", weather_time_scale=FAST, fault_seed=seed)
        asyncio.run(_edits(emu, 120, concurrency=8))
        log = sorted(emu.requests(), key=lambda r: r["weather_step"])
        return [(r["fields"]["prompt"], r["fault"], r["latency_s"]) for r in log]

    first = run(5)
    again = run(5)
    # Concurrency may change which request takes which step, not the weather at each step.
    assert [fault for _, fault, _ in again] == [fault for _, fault, _ in first]
    # A request's latency follows its content, whatever its step.
    assert sorted((p, lat) for p, _, lat in again) == sorted((p, lat) for p, _, lat in first)
    other = run(6)
    assert [fault for _, fault, _ in other] != [fault for _, fault, _ in first]


def test_changing_weather_or_seed_restarts_the_storms(
    emulators: list[InProcessEmulator],
) -> None:
    emu = _emulator(emulators, weather="gateway", weather_time_scale=FAST)
    asyncio.run(_edits(emu, 5, concurrency=1))
    assert emu.state.gateway.step == 5
    emu.configure(fault_seed=9)
    assert (emu.state.gateway.seed, emu.state.gateway.step) == (9, 0)
    asyncio.run(_edits(emu, 3, concurrency=1))
    emu.reset()
    assert emu.state.gateway.step == 0
    assert emu.stats()["service_seconds_total"] == 0


# --- overloaded ----------------------------------------------------------------------------------


def test_overloaded_admits_capacity_and_refuses_the_rest(
    emulators: list[InProcessEmulator],
) -> None:
    k = 4
    # Admitted requests take 2 s, so all 3K arrive while the first K are still in flight.
    emu = _emulator(
        emulators, weather="overloaded", weather_capacity=k, weather_time_scale=FAST, latency=2.0
    )
    responses = asyncio.run(_edits(emu, 3 * k, concurrency=3 * k))
    stats = emu.stats()
    assert stats["max_in_flight"] <= k
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert (len(ok), len(refused)) == (k, 2 * k)
    for r in refused:
        assert r.json()["error"]["code"] == "RATE_LIMITED"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert r.headers["retry-after"] == "1"
        assert parse_retry_after(r.headers) == pytest.approx(1.0 / FAST)

    # The refused are counted, logged and not charged; only the admitted were served.
    assert stats["requests"] == 3 * k
    assert stats["rate_limited_overload"] == 2 * k
    assert stats["by_status"] == {"200": k, "429": 2 * k}
    assert stats["charged_requests"] == k
    assert stats["charged_micros"] == k * 10_000
    log = emu.requests()
    turned_away = [r for r in log if r["status"] == 429]
    assert len(turned_away) == 2 * k
    assert all(r["fault"] == "overloaded" and not r["charged"] for r in turned_away)
    assert all(r["service_s"] == 0 for r in turned_away)
    served = [r["service_s"] for r in log if r["status"] == 200]
    assert all(s >= 2.0 - 1e-3 for s in served)  # the configured latency, unscaled
    assert stats["service_seconds_total"] == pytest.approx(sum(served), abs=1e-3)

    # A request without a valid key is told so, not asked to wait, even when there is no room.
    keyed = _emulator(
        emulators,
        weather="overloaded",
        weather_capacity=1,
        weather_time_scale=FAST,
        latency=2.0,
        api_key="sk-right",
    )

    async def full_then_wrong_key() -> tuple[int, int, int]:
        async with httpx.AsyncClient(transport=keyed.transport, base_url=keyed.base_url) as c:

            async def post(key: str) -> int:
                form = {"model": spec.DEFAULT_MODEL, "prompt": "p", "output_format": "jpeg"}
                r = await c.post(
                    "/images/edits",
                    data=form,
                    files=[("image", ("i.png", IMG, "image/png"))],
                    headers={"Authorization": f"Bearer {key}"},
                )
                return r.status_code

            first = asyncio.create_task(post("sk-right"))
            while keyed.stats()["max_in_flight"] < 1:
                await asyncio.sleep(0.001)
            refused, wrong = await post("sk-right"), await post("sk-wrong")
            return await first, refused, wrong

    assert asyncio.run(full_then_wrong_key()) == (200, 429, 401)

    # Once the admitted are done, there is room again.
    emu.configure(latency=0.0)
    assert [r.status_code for r in asyncio.run(_edits(emu, 1, concurrency=1))] == [200]
