"""Adaptive concurrency: the AIMD limit alone, the resizable gate, and a run against an API that
admits K requests at once and answers 429 to any above K."""

from __future__ import annotations

import asyncio
import base64
import csv
import heapq
import io
import itertools
import os
import re
import signal
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from flows.progress_bar import RunProgressBar
from pipeline.emulator.faults import RATE_LIMITED
from pipeline.emulator.weather import GatewayChain, gateway_latency
from pipeline.engine import progress
from pipeline.engine.adaptive import RECENT_ANSWERS, AimdLimit, Ticket, downsample
from pipeline.engine.options import RunOptions, cli_name
from pipeline.engine.results import ResultRow
from pipeline.engine.run import RunParts, run_config, run_manifest
from pipeline.engine.run_control import RequestSlots, ResizableGate, is_overload
from pipeline.engine.summary import RunSummary, describe_concurrency
from pipeline.errors import error_for_status
from tests.conftest import image_bytes


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def burst(aimd: AimdLimit, n: int) -> list[Ticket]:
    """`n` requests started at once, every slot taken."""
    return [aimd.started(in_flight=aimd.limit) for _ in range(n)]


def rate_limited() -> Exception:
    return error_for_status(429, {"error": {"code": "RATE_LIMITED"}}, {"Retry-After": "0"})


# --- the AIMD limit ------------------------------------------------------------------------


def test_it_starts_low_or_at_a_given_start_within_the_ceiling() -> None:
    assert AimdLimit(16).limit == 4
    assert AimdLimit(2).limit == 2
    assert AimdLimit(16, start=12).limit == 12
    assert AimdLimit(16, start=40).limit == 16
    assert AimdLimit(16, start=0).limit == 1


def test_a_429_takes_one_slot_away() -> None:
    aimd = AimdLimit(32, start=20)
    (ticket,) = burst(aimd, 1)
    assert aimd.overloaded(ticket)
    assert aimd.limit == 19
    assert aimd.cuts == 1


def test_a_waves_429s_take_one_slot_each_down_to_half_and_count_as_one_cut() -> None:
    aimd = AimdLimit(32, start=20)
    over_by_six = burst(aimd, 6)
    assert [aimd.overloaded(t) for t in over_by_six] == [True] + [False] * 5
    assert aimd.limit == 14 and aimd.cuts == 1
    aimd = AimdLimit(32, start=20)
    wave = burst(aimd, 20)
    cuts = [aimd.overloaded(t) for t in wave]
    assert cuts.count(True) == 1
    assert aimd.limit == 10  # everything refused: half, as a multiplicative cut would
    # A request sent after the cut that is refused too: the limit was still too high.
    (later,) = burst(aimd, 1)
    assert aimd.overloaded(later)
    assert aimd.limit == 9 and aimd.cuts == 2
    # A whole wave sent after that cut refused again: half once more.
    for t in burst(aimd, 9):
        aimd.overloaded(t)
    assert aimd.limit == 4 and aimd.cuts == 3


def test_a_lone_5xx_is_a_hiccup_two_in_a_window_are_overload() -> None:
    aimd = AimdLimit(32, start=20)
    first, second, third = burst(aimd, 3)
    assert not aimd.overloaded(first, rate_limited=False)
    assert aimd.limit == 20
    assert aimd.overloaded(second, rate_limited=False)
    assert aimd.limit == 14  # multiplicative: a 5xx says nothing of by how much
    assert not aimd.overloaded(third, rate_limited=False)  # same wave
    assert aimd.limit == 14


def test_which_errors_are_overload() -> None:
    assert is_overload(rate_limited()) is True
    assert is_overload(error_for_status(503, "busy", {})) is False
    exhausted = {"error": {"code": "ALL_PROVIDERS_EXHAUSTED"}}
    assert is_overload(error_for_status(502, exhausted, {})) is False
    assert is_overload(error_for_status(500, "oops", {})) is None
    assert is_overload(error_for_status(400, "bad", {})) is None


def test_it_climbs_fast_until_the_first_cut() -> None:
    aimd = AimdLimit(64)
    assert aimd.slow_start and aimd.limit == 4
    for ticket in burst(aimd, 4):
        aimd.succeeded(ticket)
    assert aimd.limit == 8  # one round trip at the limit: doubled
    for ticket in burst(aimd, 8):
        aimd.succeeded(ticket)
    assert aimd.limit == 16
    assert aimd.overloaded(burst(aimd, 1)[0])
    assert not aimd.slow_start and aimd.limit == 15


def test_it_climbs_by_one_per_limit_answers_while_clear() -> None:
    aimd = AimdLimit(32, start=5)
    aimd.slow_start = False  # as after a first cut
    for ticket in burst(aimd, 4):
        aimd.succeeded(ticket)
    assert aimd.limit == 5
    aimd.succeeded(burst(aimd, 1)[0])
    assert aimd.limit == 6
    for ticket in burst(aimd, 6):
        aimd.succeeded(ticket)
    assert aimd.limit == 7


def test_answers_while_slots_stand_idle_prove_nothing() -> None:
    aimd = AimdLimit(32, start=5)
    for _ in range(100):
        aimd.succeeded(aimd.started(in_flight=0))
    assert aimd.limit == 5


def test_never_above_the_ceiling_nor_the_slots_leased_nor_below_one() -> None:
    aimd = AimdLimit(8)
    for _ in range(1000):
        aimd.succeeded(burst(aimd, 1)[0])
    assert aimd.limit == 8
    aimd.set_ceiling(3)  # the global slots this run could lease
    assert aimd.limit == 3
    for _ in range(100):
        aimd.succeeded(burst(aimd, 1)[0])
    assert aimd.limit == 3
    # Refused at levels that went through: counted once most recent answers are refusals.
    for _ in range(RECENT_ANSWERS // 2):
        aimd.overloaded(burst(aimd, 1)[0])
    assert aimd.limit == 1
    assert max(limit for _, limit in aimd.curve) <= 8


def test_a_storm_at_levels_that_go_through_is_weather_not_load() -> None:
    aimd = AimdLimit(64, start=64)
    for _ in range(60):
        aimd.succeeded(aimd.started(in_flight=63))
    storm = [aimd.started(in_flight=63) for _ in range(10)]
    assert not any(aimd.overloaded(t) for t in storm[:7])
    assert not any(aimd.overloaded(t, rate_limited=False) for t in storm[7:])
    assert aimd.limit == 64 and aimd.cuts == 0 and aimd.storms == 10
    # At a level few recent answers reached: the API's capacity, counted.
    assert aimd.overloaded(aimd.started(in_flight=64))
    assert aimd.limit == 63


def test_after_a_cut_it_climbs_fast_to_the_refused_level_then_slowly() -> None:
    aimd = AimdLimit(64, start=20)
    aimd.slow_start = False
    for _ in range(5):
        aimd.succeeded(aimd.started(in_flight=15))
    wave = [aimd.started(in_flight=16) for _ in range(8)]
    for t in wave:
        aimd.overloaded(t)
    assert aimd.limit == 12 and aimd.cuts == 1
    # Back to the refused level (16: a limit of 16 sends at levels up to 15) at once, one
    # slot an answer.
    for _ in range(4):
        aimd.succeeded(aimd.started(in_flight=aimd.limit - 1))
    assert aimd.limit == 16
    # Then one slot per `limit` answers.
    for _ in range(15):
        aimd.succeeded(aimd.started(in_flight=15))
    assert aimd.limit == 16
    aimd.succeeded(aimd.started(in_flight=15))
    assert aimd.limit == 17


def test_an_answer_well_above_the_refused_level_shows_it_was_weather() -> None:
    aimd = AimdLimit(64, start=20)
    aimd.slow_start = False
    aimd.succeeded(aimd.started(in_flight=10))
    assert aimd.overloaded(aimd.started(in_flight=12))
    assert not aimd.slow_start
    for _ in range(11):
        aimd.succeeded(aimd.started(in_flight=13))
    assert not aimd.slow_start  # not yet a round trip's worth (12) above the refusal
    aimd.succeeded(aimd.started(in_flight=13))
    assert aimd.slow_start  # climbs fast again


def test_refusals_a_quarter_of_the_answers_at_their_level_are_counted() -> None:
    aimd = AimdLimit(64, start=40)
    for _ in range(10):
        aimd.succeeded(aimd.started(in_flight=20))
    before = aimd.limit
    refused = [aimd.overloaded(aimd.started(in_flight=20)) for _ in range(4)]
    # Ten answers at level 20, then refusals there: the fourth makes them a quarter (4/14).
    assert refused == [False] * 3 + [True]
    assert aimd.cuts == 1 and aimd.limit == before - 1


def saturated_run_under_gateway_storms(seed: int, ceiling: int = 64, answers: int = 6000) -> float:
    """The mean limit over the second half of a run that always has a request to send, against
    the emulator's gateway weather (its storm chain and latencies; a 429 answered at once):
    an event-driven replay with a fake clock, no I/O."""
    now = 0.0
    aimd = AimdLimit(ceiling, clock=lambda: now)
    chain = GatewayChain(seed)
    pending: list[tuple[float, int, str | None, Ticket]] = []
    in_flight = sent = 0
    area = 0.0
    half_at: float | None = None
    for n in range(answers):
        while in_flight < aimd.limit:
            ticket = aimd.started(in_flight)
            fault = chain.next_fault()
            latency = 0.05 if fault == RATE_LIMITED else gateway_latency(seed, str(sent), 1, 1.0)
            heapq.heappush(pending, (now + latency, sent, fault, ticket))
            in_flight, sent = in_flight + 1, sent + 1
        at, _, fault, ticket = heapq.heappop(pending)
        if n >= answers // 2:
            half_at = now if half_at is None else half_at
            area += aimd.limit * (at - now)
        now, in_flight = at, in_flight - 1
        if fault is None:
            aimd.succeeded(ticket)
        else:
            aimd.overloaded(ticket, rate_limited=fault == RATE_LIMITED)
    assert half_at is not None
    return area / (now - half_at)


def test_the_gateways_storms_leave_the_limit_at_the_ceiling() -> None:
    # Its storms refuse ~9% of requests, several storms now and then within 64 answers: a
    # window that short read two storms at once as the run's load (cut to 0.7x for 502s) and
    # left the limit at ~62 of 64 on average once the first climb was over.
    means = [saturated_run_under_gateway_storms(seed) for seed in range(10)]
    assert statistics.fmean(means) >= 0.99 * 64, means
    assert min(means) >= 0.97 * 64, means


def test_the_curve_records_changes_in_seconds_and_stays_capped() -> None:
    clock = FakeClock()
    aimd = AimdLimit(64, start=10, clock=clock, max_points=50)
    aimd.begin()
    clock.now += 2.5
    aimd.overloaded(burst(aimd, 1)[0])
    assert aimd.curve == [(0.0, 10), (2.5, 9)]
    # A long run: 200,000 answers, a cut every few hundred.
    for i in range(200_000):
        clock.now += 0.001
        ticket = burst(aimd, 1)[0]
        if i % 300 == 299:
            aimd.overloaded(ticket)
        else:
            aimd.succeeded(ticket)
    assert len(aimd.curve) <= 50
    assert aimd.curve[0] == (0.0, 10)
    assert aimd.curve[-1][1] == aimd.limit
    times = [t for t, _ in aimd.curve]
    assert times == sorted(times)


def test_downsample_keeps_the_ends() -> None:
    points = [(float(i), i) for i in range(101)]
    kept = downsample(points, 11)
    assert len(kept) == 11
    assert kept[0] == points[0] and kept[-1] == points[-1]


# --- the gate --------------------------------------------------------------------------------


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_the_gate_lets_waiters_in_when_it_grows_and_cancels_no_one_when_it_shrinks() -> None:
    gate = ResizableGate(2)
    await gate.acquire()
    await gate.acquire()
    waiters = [asyncio.ensure_future(gate.acquire()) for _ in range(3)]
    await settle()
    assert gate.in_flight == 2 and not any(w.done() for w in waiters)
    gate.resize(4)
    await settle()
    assert gate.in_flight == 4
    assert [w.done() for w in waiters] == [True, True, False]
    gate.resize(1)  # those inside stay inside
    assert gate.in_flight == 4
    for _ in range(3):
        gate.release()
    await settle()
    assert gate.in_flight == 1 and not waiters[2].done()
    gate.release()
    await settle()
    assert waiters[2].done() and gate.in_flight == 1
    # A waiter cancelled while it waits leaves no place taken.
    late = asyncio.ensure_future(gate.acquire())
    await settle()
    late.cancel()
    await asyncio.gather(late, return_exceptions=True)
    gate.release()
    assert gate.in_flight == 0
    assert gate.max_in_flight == 4


async def test_the_gate_lets_in_by_rank_then_by_arrival() -> None:
    gate = ResizableGate(1)
    await gate.acquire()
    order: list[str] = []

    async def enter(name: str, rank: tuple[int, ...]) -> None:
        await gate.acquire(rank)
        order.append(name)

    ranks = {"row 7": (1, 7), "row 3": (1, 3), "retry of row 9": (0, 9), "row 3 again": (1, 3)}
    waiters = [asyncio.ensure_future(enter(name, rank)) for name, rank in ranks.items()]
    gone = asyncio.ensure_future(enter("cancelled", (0, 0)))
    await settle()
    assert gate.waiting == 5
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert gate.waiting == 4
    for _ in ranks:
        gate.release()
        await settle()
    await asyncio.gather(*waiters)
    # Retries first, then the lowest row; the same rank in arrival order; the cancelled
    # waiter took no place.
    assert order == ["retry of row 9", "row 3", "row 3 again", "row 7"]
    assert gate.waiting == 0 and gate.in_flight == 1


async def test_slots_go_to_retries_then_to_the_oldest_rows() -> None:
    slots = RequestSlots(1, adaptive=False)
    order: list[str] = []

    async def send(name: str, *, retry: bool, row: int) -> None:
        async with slots.slot(retry=retry, row=row):
            order.append(name)
            await asyncio.sleep(0)

    async with slots.slot():
        tasks = [
            asyncio.ensure_future(send("row 2000", retry=False, row=2000)),
            asyncio.ensure_future(send("row 5", retry=False, row=5)),
            asyncio.ensure_future(send("retry of row 1500", retry=True, row=1500)),
        ]
        await settle()
    await asyncio.gather(*tasks)
    assert order == ["retry of row 1500", "row 5", "row 2000"]


async def test_fixed_slots_do_not_adapt() -> None:
    slots = RequestSlots(16, adaptive=False)
    async with slots.slot() as ticket:
        slots.failed(ticket, rate_limited())
    assert slots.limit == 16
    assert slots.report() == {"mode": "fixed", "ceiling": 16, "final": 16, "curve": []}


async def test_adaptive_slots_back_off_and_report() -> None:
    slots = RequestSlots(16)
    seen: list[int] = []
    slots.on_change = seen.append
    slots.begin()
    async with slots.slot() as ticket:
        slots.failed(ticket, rate_limited())
    assert slots.limit == 3
    assert seen == [4, 3]
    report = slots.report()
    assert (report["mode"], report["ceiling"], report["final"]) == ("adaptive", 16, 3)
    assert (report["cuts"], report["storms"]) == (1, 0)
    assert describe_concurrency(report) == (
        "adaptive: ended at 3 of 16, 1 cuts, 0 refusals judged weather"
    )
    assert [n for _, n in report["curve"]] == [4, 3]
    slots.set_ceiling(1)
    assert slots.limit == 1 and slots.gate.capacity == 1


def test_fixed_concurrency_is_a_run_option_off_by_default(tmp_path: Path) -> None:
    opts = RunOptions(manifest="m.csv", output=str(tmp_path))
    assert opts.fixed_concurrency is False
    assert cli_name("fixed_concurrency") == "--fixed-concurrency"
    assert run_config(opts).fixed_concurrency is False
    assert run_config(opts.replace(fixed_concurrency=True)).fixed_concurrency is True


def test_the_progress_bar_shows_the_limit() -> None:
    out = io.StringIO()
    bar = RunProgressBar(Console(file=out, width=200))
    with bar:
        bar.on_concurrency("r1", 4, 16, "adaptive")  # before the plan: kept for it
        bar.on_plan("r1", 10, 0.1)
        bar.on_concurrency("r1", 7, 16, "adaptive")
    assert "limit 7/16" in out.getvalue()
    out = io.StringIO()
    bar = RunProgressBar(Console(file=out, width=200))
    with bar:
        bar.on_concurrency("r2", 16, 16, "fixed")
        bar.on_plan("r2", 10, 0.1)
    assert "limit 16 fixed" in out.getvalue()


# --- a run against an overloaded API ---------------------------------------------------------

K = 10
ROWS = 300
PRICE = 0.01
LATENCY_S = 0.02
API = "http://127.0.0.1:9/v1"  # loopback: no key needed; never dialled (the transport answers)


def png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 99, 199)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG_B64 = png()
PROMPT = re.compile(rb'name="prompt"\r\n\r\n([^\r]*)\r\n')


class OverloadedAPI:
    """Admits K requests at once; any request above K is answered 429 at once (Retry-After 0).
    Counts what it charged, by prompt."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.in_flight = 0
        self.max_in_flight = 0
        self.arriving = 0
        self.max_arriving = 0
        self.rejected = 0
        self.charged: Counter[str] = Counter()

    async def handler(self, request: httpx.Request) -> httpx.Response:
        assert request.url.path.endswith("/images/edits"), request.url
        self.arriving += 1
        self.max_arriving = max(self.max_arriving, self.arriving)
        try:
            if self.in_flight >= self.k:
                self.rejected += 1
                return httpx.Response(
                    429,
                    headers={"Retry-After": "0"},
                    json={"error": {"code": "RATE_LIMITED", "message": "slow down"}},
                )
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(LATENCY_S)
            finally:
                self.in_flight -= 1
            found = PROMPT.search(request.content)
            assert found is not None
            self.charged[found.group(1).decode()] += 1
            return httpx.Response(200, json=answer())
        finally:
            self.arriving -= 1


def answer() -> dict[str, Any]:
    return {
        "id": "req-1",
        "created": 1,
        "size": "32x32",
        "output_format": "png",
        "data": [{"b64_json": PNG_B64}],
        "metadata": {"cost": PRICE, "cost_currency": "USD", "provider": "overloaded"},
    }


def write_manifest(tmp_path: Path, rows: int, tag: str = "") -> Path:
    """Rows r0.. with prompts `<tag>edit <i>` (another tag: other jobs)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "src.png"
    src.write_bytes(image_bytes((40, 40), (1, 2, 3)))
    path = tmp_path / "m.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "image", "prompt"])
        for i in range(rows):
            w.writerow([f"r{i}", src, f"{tag}edit {i}"])
    return path


class Limits:
    """Progress events of the limit of requests in flight."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, str]] = []

    def on_plan(self, run_id: str, total_rows: int, estimated_cost_usd: float) -> None:
        pass

    def on_row(self, run_id: str, result: ResultRow) -> None:
        pass

    def on_concurrency(self, run_id: str, limit: int, ceiling: int, mode: str) -> None:
        self.seen.append((limit, ceiling, mode))


async def overloaded_run(
    tmp_path: Path, *, fixed: bool, rows: int = ROWS, output: Path | None = None, tag: str = ""
) -> tuple[OverloadedAPI, RunSummary]:
    api = OverloadedAPI(K)
    opts = RunOptions(
        manifest=str(write_manifest(tmp_path, rows, tag)),
        output=str(output or tmp_path / "out"),
        api_base=API,
        concurrency=2 * K,
        fixed_concurrency=fixed,
        # Every row gets through however often it is refused: the counts compare 429s only.
        max_attempts=50,
        max_retry_seconds=240,
    )
    summary = await run_manifest(opts, RunParts(api_transport=httpx.MockTransport(api.handler)))
    return api, summary


def assert_each_row_once_and_paid_once(api: OverloadedAPI, summary: RunSummary) -> None:
    table = pd.read_parquet(summary.results_uri)
    assert len(table) == ROWS and table["id"].is_unique
    assert summary.by_status["succeeded"] == ROWS
    assert sorted(api.charged) == sorted(f"edit {i}" for i in range(ROWS))
    assert set(api.charged.values()) == {1}
    assert summary.possible_double_charges == 0
    assert summary.cost_usd == pytest.approx(ROWS * PRICE)


@pytest.mark.integration
async def test_adaptive_concurrency_finds_what_an_overloaded_api_admits(tmp_path: Path) -> None:
    limits = Limits()
    unsubscribe = progress.subscribe(limits)
    try:
        adaptive_api, adaptive = await overloaded_run(tmp_path / "adaptive", fixed=False)
    finally:
        unsubscribe()
    fixed_api, fixed = await overloaded_run(tmp_path / "fixed", fixed=True)

    assert_each_row_once_and_paid_once(adaptive_api, adaptive)
    assert_each_row_once_and_paid_once(fixed_api, fixed)

    conc = adaptive.concurrency
    assert conc is not None
    assert (conc["mode"], conc["ceiling"]) == ("adaptive", 2 * K)
    curve = conc["curve"]
    limits_seen = [limit for _, limit in curve]
    assert curve[0] == [0.0, 4]
    assert conc["final"] == limits_seen[-1]
    # It found K: the limits of the second half of its curve centre within 20% of it.
    second_half = limits_seen[len(limits_seen) // 2 :]
    assert abs(statistics.median(second_half) - K) <= 0.2 * K, curve
    # Never past its ceiling, at the API or in the curve.
    assert max(limits_seen) <= 2 * K
    assert adaptive_api.max_arriving <= 2 * K
    # Far fewer refusals than a fixed 2K in flight.
    assert adaptive_api.rejected < fixed_api.rejected, (adaptive_api.rejected, fixed_api.rejected)

    # The progress events said each limit the run moved to, of its ceiling.
    assert limits.seen[0] == (4, 2 * K, "adaptive")
    assert limits.seen[-1][0] == conc["final"]
    assert {ceiling for _, ceiling, _ in limits.seen} == {2 * K}
    assert fixed.concurrency == {"mode": "fixed", "ceiling": 2 * K, "final": 2 * K, "curve": []}
    # The summary's table and JSON say so too.
    assert any(r["metric"] == "concurrency" for r in adaptive.table())
    assert adaptive.to_dict()["concurrency"] == conc


# --- a stormy API ------------------------------------------------------------------------------

STORM_EVERY = 40
STORM_LENGTH = 6
# Long enough for the limit to show where it settles: after a storm that lands while the
# limit is still climbing (a cut to ~12 of 20), it can hover there for a few hundred rows
# before a round trip above the refused level proves weather; at 300 rows the second half of
# the curve sometimes ended before that (about one run in ten).
STORM_ROWS = 600


class StormyAPI:
    """Answers every request at once, but the last STORM_LENGTH of every STORM_EVERY requests
    are refused (429, Retry-After 0) whatever the load: the gateway's weather."""

    def __init__(self) -> None:
        self.requests = 0
        self.refused = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.requests % STORM_EVERY >= STORM_EVERY - STORM_LENGTH:
            self.refused += 1
            return httpx.Response(
                429,
                headers={"Retry-After": "0"},
                json={"error": {"code": "RATE_LIMITED", "message": "storm"}},
            )
        await asyncio.sleep(LATENCY_S)
        return httpx.Response(200, json=answer())


@pytest.mark.integration
async def test_adaptive_concurrency_rides_out_storms_the_load_does_not_cause(
    tmp_path: Path,
) -> None:
    api = StormyAPI()
    opts = RunOptions(
        manifest=str(write_manifest(tmp_path, STORM_ROWS)),
        output=str(tmp_path / "out"),
        api_base=API,
        concurrency=2 * K,
        max_attempts=10,
    )
    summary = await run_manifest(opts, RunParts(api_transport=httpx.MockTransport(api.handler)))
    assert summary.by_status["succeeded"] == STORM_ROWS
    assert api.refused >= STORM_ROWS // STORM_EVERY
    conc = summary.concurrency
    assert conc is not None
    limits = [limit for _, limit in conc["curve"]]
    # A storm that hits a level few requests have been answered at yet (while the limit is
    # still climbing) looks like a capacity and cuts; one at levels that go through does
    # not. Before, every refusal took a slot away and the limit fell to a few.
    cuts = sum(1 for a, b in itertools.pairwise(limits) if b < a)
    assert cuts <= 0.75 * api.refused, (cuts, api.refused, limits)
    assert max(limits[len(limits) // 2 :]) >= 0.75 * 2 * K, limits


# --- a 429 with Retry-After -------------------------------------------------------------------

RETRY_AFTER_S = 1
REFUSAL_ROWS = 200


class OneRefusal:
    """Answers every request after 20 ms, but the first one of "edit 0" at once with a 429 and
    a Retry-After of RETRY_AFTER_S; keeps each arrival's time, prompt and how many requests
    were then in flight (itself included)."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str, int]] = []
        self.in_flight = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        found = PROMPT.search(request.content)
        assert found is not None
        prompt = found.group(1).decode()
        refused = prompt == "edit 0" and all(p != prompt for _, p, _ in self.arrivals)
        self.in_flight += 1
        self.arrivals.append((asyncio.get_running_loop().time(), prompt, self.in_flight))
        try:
            if refused:
                return httpx.Response(
                    429,
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                    json={"error": {"code": "RATE_LIMITED", "message": "slow down"}},
                )
            await asyncio.sleep(0.02)
            return httpx.Response(200, json=answer())
        finally:
            self.in_flight -= 1

    def split(self) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """The arrivals (prompt, in flight) during the Retry-After, and those after it."""
        refused_at = next(t for t, p, _ in self.arrivals if p == "edit 0")
        during = [
            (p, n) for t, p, n in self.arrivals if refused_at < t < refused_at + RETRY_AFTER_S
        ]
        after = [(p, n) for t, p, n in self.arrivals if t > refused_at + RETRY_AFTER_S + 0.1]
        return during, after


async def run_with_one_refusal(tmp_path: Path, *, fixed: bool) -> OneRefusal:
    api = OneRefusal()
    opts = RunOptions(
        manifest=str(write_manifest(tmp_path, REFUSAL_ROWS)),
        output=str(tmp_path / "out"),
        api_base=API,
        concurrency=2,
        fixed_concurrency=fixed,
    )
    summary = await run_manifest(opts, RunParts(api_transport=httpx.MockTransport(api.handler)))
    assert summary.by_status["succeeded"] == REFUSAL_ROWS
    prompts = [p for _, p, _ in api.arrivals]
    assert prompts.count("edit 0") == 2 and len(prompts) == REFUSAL_ROWS + 1
    return api


async def test_fixed_slots_keep_a_429s_slot_closed_for_its_retry_after() -> None:
    slots = RequestSlots(2, adaptive=False)
    waited = error_for_status(429, {"error": {"code": "RATE_LIMITED"}}, {"Retry-After": "0.2"})
    async with slots.slot() as slot:
        slots.failed(slot, waited)
    assert slots.in_flight == 1  # closed for the wait, though the request is over
    async with slots.slot() as slot:
        slots.failed(slot, rate_limited())  # no wait asked: nothing to keep closed
    assert slots.in_flight == 1
    await asyncio.sleep(0.4)
    assert slots.in_flight == 0
    # A stopped run opens them at once: rows waiting for a place must see the stop.
    long_wait = error_for_status(429, {"error": {"code": "RATE_LIMITED"}}, {"Retry-After": "99"})
    async with slots.slot() as slot:
        slots.failed(slot, long_wait)
    assert slots.in_flight == 1
    slots.reopen()
    assert slots.in_flight == 0
    async with slots.slot() as slot:  # and none closes after it
        slots.failed(slot, long_wait)
    assert slots.in_flight == 0
    # An adaptive limit cuts itself instead and closes nothing.
    adaptive = RequestSlots(2)
    async with adaptive.slot() as slot:
        adaptive.failed(slot, waited)
    assert adaptive.in_flight == 0


@pytest.mark.integration
async def test_a_429_closes_its_slot_for_the_wait_when_fixed_and_cuts_the_limit_when_adaptive(
    tmp_path: Path,
) -> None:
    fixed = await run_with_one_refusal(tmp_path / "fixed", fixed=True)
    during, after = fixed.split()
    # The other rows went on during the wait (a pause of the whole run let none start), one
    # at a time: the refused request's slot stayed closed (without that, two at a time).
    assert len(during) > 4 and "edit 0" not in dict(during), during
    assert max(n for _, n in during) == 1, during
    # When the wait was over the slot opened again: two at a time once more.
    assert after and max(n for _, n in after) == 2, after

    adaptive = await run_with_one_refusal(tmp_path / "adaptive", fixed=False)
    during, _ = adaptive.split()
    # The refused row waited; the others went on meanwhile, the limit cut instead.
    assert len(during) > 4 and "edit 0" not in dict(during), during


class RefusedThenInterrupted(OneRefusal):
    """OneRefusal with a Retry-After of 100 s; the run is interrupted (SIGINT to this process,
    as a terminal's Ctrl-C) when the fifth request arrives."""

    async def handler(self, request: httpx.Request) -> httpx.Response:
        if len(self.arrivals) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        response = await super().handler(request)
        if response.status_code == 429:
            response.headers["Retry-After"] = "100"
        return response


@pytest.mark.integration
@pytest.mark.parametrize("fixed", [True, False])
async def test_an_interrupt_does_not_wait_out_a_retry_after(tmp_path: Path, fixed: bool) -> None:
    api = RefusedThenInterrupted()
    opts = RunOptions(
        manifest=str(write_manifest(tmp_path, 40)),
        output=str(tmp_path / "out"),
        api_base=API,
        concurrency=2,
        fixed_concurrency=fixed,
    )
    parts = RunParts(api_transport=httpx.MockTransport(api.handler))
    # The refused row would sleep 100 s, and with a fixed limit its slot would stay closed
    # as long: the stop cuts both short (the requests in flight finish within their 20 ms).
    summary = await asyncio.wait_for(run_manifest(opts, parts), timeout=60)
    assert summary.stop_kind == "interrupted"
    results = pd.read_parquet(summary.results_uri)
    assert len(results) == 40
    refused = results[results["id"] == "r0"].iloc[0]
    assert refused["status"] == "skipped" and refused["reason"] == "interrupted"
    assert [p for _, p, _ in api.arrivals].count("edit 0") == 1
