"""Fault soak: a generated manifest through the engine against a faulty emulator, then every
invariant of a run checked (no row lost or doubled, no partial result, ledger == cost).

    python -m benchmarks.soak --rows 5000 --fault-rate 0.35 --response-format both

Prints a summary per response format and exits 1 if any invariant fails. tests/test_soak.py
calls `soak()` with a few hundred rows against the test session's emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if __package__ in (None, ""):  # `python benchmarks/soak.py`: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from PIL import Image

from pipeline.emulator.config import FAULT_RATE_FIELDS
from pipeline.emulator.process import EmulatorConfig, EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.retry import RetryPolicy
from pipeline.engine.run import RunParts, run_manifest
from pipeline.engine.summary import RunSummary

ResponseFormat = Literal["url", "b64_json"]

DEFAULT_ROWS = 250
# Shares of edit requests that get each fault; 30% in all (26% with b64_json, where there
# is nothing to download and so nothing to truncate).
DEFAULT_FAULTS: Mapping[str, float] = {
    "rate_limited_rate": 0.06,
    "internal_error_rate": 0.05,
    "exhausted_rate": 0.04,
    "drop_rate": 0.04,
    "slow_rate": 0.03,
    "malformed_rate": 0.04,
    "truncate_rate": 0.04,
}
# What the issue asks of a soak: at least this share of requests faulted.
MIN_TOTAL_FAULT_RATE = 0.20
DEFAULT_FAULT_SEED = 20240601
# Small Retry-After, so 429s cost little time but still close their slot for the wait.
DEFAULT_RETRY_AFTER_S = 0.05
# A slow answer arrives after the client has given up: that is the fault being tested.
DEFAULT_REQUEST_TIMEOUT_S = 1.5
DEFAULT_SLOW_S = 2.5
DEFAULT_CONCURRENCY = 16
# With 30% faults, 12 attempts leave a row about 0.3**12 (5e-7) odds of failing.
DEFAULT_MAX_ATTEMPTS = 12
# Production backs off from 0.5 s; the soak proves invariants, not patience.
DEFAULT_INITIAL_BACKOFF_S = 0.05
DEFAULT_MAX_BACKOFF_S = 1.0
# Fault kinds expected this many times or more (rate x rows) must have happened at least once.
MIN_EXPECTED_TO_REQUIRE = 5.0
LEDGER_TOLERANCE_USD = 1e-9
IDLE_GRACE_S = 2.0
IDLE_POLL_S = 0.05
TEMP_PREFIX = ".tmp-"
# Listed in a report at most; the count says how many more.
MAX_LISTED_PROBLEMS = 20

# Source images: (name, size, PIL format); different shapes give different output sizes.
SOURCE_IMAGES: tuple[tuple[str, tuple[int, int], str], ...] = (
    ("square.png", (64, 64), "PNG"),
    ("wide.jpg", (96, 54), "JPEG"),
    ("tall.png", (48, 64), "PNG"),
    ("ref.webp", (40, 40), "WEBP"),
    ("photo.jpg", (120, 80), "JPEG"),
)
SIZES: tuple[str, ...] = ("", "1024x1024", "16:9", "auto", "1200x900")
OUTPUT_FORMATS: tuple[str, ...] = ("jpeg", "jpeg", "jpeg", "webp", "png")
MULTI_IMAGE_EVERY = 11  # rows with a second (reference) image
TWO_OUTPUTS_EVERY = 17  # rows asking for n=2


@dataclass(frozen=True)
class SoakConfig:
    rows: int = DEFAULT_ROWS
    response_format: ResponseFormat = "url"
    faults: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_FAULTS))
    fault_seed: int = DEFAULT_FAULT_SEED
    retry_after: float = DEFAULT_RETRY_AFTER_S
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S
    slow_seconds: float = DEFAULT_SLOW_S
    concurrency: int = DEFAULT_CONCURRENCY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    initial_backoff_s: float = DEFAULT_INITIAL_BACKOFF_S
    max_backoff_s: float = DEFAULT_MAX_BACKOFF_S
    chunk_size: int = 100

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_RATE_FIELDS)
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}")
        if self.rows < 1:
            raise ValueError("rows must be at least 1")
        if self.slow_seconds <= self.request_timeout:
            raise ValueError("slow_seconds must exceed request_timeout, or slow is no fault")

    def effective_faults(self) -> dict[str, float]:
        """The fault rates that can happen with this response format."""
        rates = {k: v for k, v in self.faults.items() if v > 0}
        if self.response_format == "b64_json":
            rates.pop("truncate_rate", None)  # nothing is downloaded, so nothing is truncated
        return rates

    @property
    def total_fault_rate(self) -> float:
        return sum(self.effective_faults().values())


@dataclass
class SoakReport:
    config: SoakConfig
    summary: RunSummary
    stats: dict[str, Any]
    failures: list[str]
    elapsed_s: float
    results: pd.DataFrame = field(repr=False)

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self) -> str:
        s, st = self.summary, self.stats
        faults = st.get("faults", {})
        faulted = sum(faults.values())
        requests = st.get("requests", 0)
        lines = [
            f"soak {self.config.response_format}: {s.rows} rows in {self.elapsed_s:.1f} s, "
            f"fault rate configured {self.config.total_fault_rate:.0%}, "
            f"seen {faulted}/{requests} requests ({faulted / max(requests, 1):.0%})",
            "  faults: " + ", ".join(f"{k} {v}" for k, v in sorted(faults.items())),
            "  status: " + ", ".join(f"{k} {v}" for k, v in s.by_status.items() if v),
            f"  attempts: {int(self.results['attempts'].sum())} "
            f"(max {int(self.results['attempts'].max())} for one row), "
            f"truncated downloads {st.get('downloads_truncated', 0)}",
            f"  ledger USD {st.get('charged_usd', 0.0):.2f} = cost {s.cost_usd:.2f} + possible "
            f"double charges {s.possible_double_charge_usd:.2f} ({s.possible_double_charges})",
            "  invariants: " + ("all hold" if self.ok else f"{len(self.failures)} FAILED"),
        ]
        lines += [f"    - {f}" for f in self.failures[:MAX_LISTED_PROBLEMS]]
        if len(self.failures) > MAX_LISTED_PROBLEMS:
            lines.append(f"    ... and {len(self.failures) - MAX_LISTED_PROBLEMS} more")
        return "\n".join(lines)


def _image_bytes(size: tuple[int, int], fmt: str, shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (shade, 255 - shade, (shade * 7) % 256)).save(buf, fmt)
    return buf.getvalue()


def write_sources(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (name, size, fmt) in enumerate(SOURCE_IMAGES):
        path = folder / name
        path.write_bytes(_image_bytes(size, fmt, 40 + 40 * i))
        paths.append(path)
    return paths


def manifest_rows(rows: int, sources: Sequence[Path]) -> list[dict[str, Any]]:
    """`rows` distinct valid edits (no two share a job) with varied sizes, formats and n."""
    out = []
    for i in range(rows):
        images = [str(sources[i % len(sources)])]
        if i % MULTI_IMAGE_EVERY == 0:
            images.append(str(sources[(i + 1) % len(sources)]))
        out.append(
            {
                "id": f"soak-{i:06d}",
                "images": json.dumps(images),
                "prompt": f"soak edit {i}: make the sky a deeper blue",
                "seed": i,
                "n": 2 if i % TWO_OUTPUTS_EVERY == 0 else "",
                "size": SIZES[i % len(SIZES)],
                "output_format": OUTPUT_FORMATS[i % len(OUTPUT_FORMATS)],
            }
        )
    return out


def write_manifest(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    columns = ["id", "images", "prompt", "seed", "n", "size", "output_format"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def configure_emulator(emulator: EmulatorProcess, config: SoakConfig) -> None:
    emulator.reset()
    rates = {name: float(config.faults.get(name, 0.0)) for name in FAULT_RATE_FIELDS}
    emulator.configure(
        **rates,
        fault_seed=config.fault_seed,
        retry_after=config.retry_after,
        slow_seconds=config.slow_seconds,
        latency=0.0,
        latency_jitter=0.0,
        api_key=None,
        balance_usd=None,
    )


async def soak(emulator: EmulatorProcess, workdir: Path, config: SoakConfig) -> SoakReport:
    """Run `config.rows` rows through the engine against `emulator` and check every invariant.

    Resets the emulator's ledger and sets its faults; writes sources, manifest and output
    under `workdir` (which should be empty).
    """
    sources = write_sources(workdir / "src")
    rows = manifest_rows(config.rows, sources)
    manifest = write_manifest(workdir / "manifest.csv", rows)
    output = workdir / "out"
    configure_emulator(emulator, config)
    opts = RunOptions(
        manifest=str(manifest),
        output=str(output),
        api_base=emulator.base_url,
        concurrency=config.concurrency,
        max_attempts=config.max_attempts,
        request_timeout=config.request_timeout,
        response_format=config.response_format,
        chunk_size=config.chunk_size,
    )
    # A shorter backoff than a real run's, so a soak of hundreds of faults ends in seconds.
    retry = RetryPolicy(
        max_attempts=config.max_attempts,
        max_seconds=opts.max_retry_seconds,
        initial_backoff_s=config.initial_backoff_s,
        max_backoff_s=config.max_backoff_s,
    )
    started = time.perf_counter()
    summary = await run_manifest(opts, RunParts(retry=retry))
    elapsed = time.perf_counter() - started
    stats = await wait_idle(emulator, config.slow_seconds + IDLE_GRACE_S)
    results = pd.read_parquet(summary.results_uri)
    failures = check_invariants(config, rows, summary, results, stats, output)
    return SoakReport(config, summary, stats, failures, elapsed, results)


async def wait_idle(emulator: EmulatorProcess, timeout: float) -> dict[str, Any]:
    """The emulator's stats once no request is in flight.

    A slow answer outlives the client's timeout: its handler still sleeps (already charged)
    after the run ends, and would otherwise finish in whatever comes next.
    """
    deadline = time.monotonic() + timeout
    while True:
        stats = emulator.stats()
        if stats["in_flight"] == 0 or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(IDLE_POLL_S)


def check_invariants(
    config: SoakConfig,
    rows: Sequence[Mapping[str, Any]],
    summary: RunSummary,
    results: pd.DataFrame,
    stats: Mapping[str, Any],
    output: Path,
) -> list[str]:
    """Every way the run could have lost, doubled, half-written or mis-billed a row."""
    failures: list[str] = []
    expected_ids = [str(r["id"]) for r in rows]

    # One result per manifest row: none lost, none doubled.
    if len(results) != len(rows):
        failures.append(f"results have {len(results)} rows for a manifest of {len(rows)}")
    if sorted(results["row"]) != list(range(1, len(rows) + 1)):
        failures.append("result row numbers are not exactly 1..N")
    if results["id"].duplicated().any():
        dupes = sorted(results.loc[results["id"].duplicated(), "id"])[:5]
        failures.append(f"ids appear more than once in the results: {dupes}")
    if sorted(results["id"]) != sorted(expected_ids):
        failures.append("result ids differ from the manifest's ids")

    not_ok = results[results["status"] != "succeeded"]
    for _, r in not_ok.head(MAX_LISTED_PROBLEMS).iterrows():
        failures.append(
            f"row {r['row']} ({r['id']}) ended {r['status']}: {r['error_code']}: "
            f"{r['error_message']}"
        )
    if len(not_ok) > MAX_LISTED_PROBLEMS:
        failures.append(f"... {len(not_ok) - MAX_LISTED_PROBLEMS} more rows did not succeed")
    if results["job_key"].dropna().duplicated().any():
        failures.append("two distinct manifest rows share a job key")

    failures += _check_outputs(results[results["status"] == "succeeded"], rows)

    temp = [str(p) for p in output.rglob(f"{TEMP_PREFIX}*")]
    if temp:
        failures.append(f"temporary files left in the output: {temp[:5]}")

    if stats.get("in_flight"):
        failures.append(f"{stats['in_flight']} requests still in flight at the emulator")

    # The ledger: every USD the API charged is a recorded cost or a reported possible double.
    charged = float(stats["charged_usd"])
    accounted = summary.cost_usd + summary.possible_double_charge_usd
    if abs(charged - accounted) > LEDGER_TOLERANCE_USD:
        failures.append(
            f"emulator charged USD {charged:.6f}, results account for {accounted:.6f} "
            f"(cost {summary.cost_usd:.6f} + possible double "
            f"{summary.possible_double_charge_usd:.6f})"
        )
    table_cost = float(results["cost"].fillna(0).sum())
    if abs(table_cost - summary.cost_usd) > 1e-6:
        failures.append(f"results cost {table_cost:.6f} != summary cost {summary.cost_usd:.6f}")
    if int(results["attempts"].sum()) != int(stats["requests"]):
        failures.append(
            f"results count {int(results['attempts'].sum())} attempts, the emulator saw "
            f"{stats['requests']} edit requests"
        )
    faults = stats.get("faults", {})
    lost_faults = sum(
        v for k, v in faults.items() if k in ("dropped", "slow") or k.startswith("malformed_")
    )
    if summary.possible_double_charges < lost_faults:
        failures.append(
            f"{lost_faults} answers were lost after a charge, only "
            f"{summary.possible_double_charges} reported as possible double charges"
        )

    # The soak must actually have exercised what it claims to.
    expected_kind = {
        "rate_limited_rate": "rate_limited",
        "internal_error_rate": "internal_error",
        "exhausted_rate": "providers_exhausted",
        "drop_rate": "dropped",
        "slow_rate": "slow",
        "truncate_rate": "truncated_download",
    }
    for name, rate in config.effective_faults().items():
        if rate * len(rows) < MIN_EXPECTED_TO_REQUIRE:
            continue
        if name == "malformed_rate":
            seen = sum(v for k, v in faults.items() if k.startswith("malformed_"))
        else:
            seen = faults.get(expected_kind[name], 0)
        if not seen:
            failures.append(f"{name}={rate} but no such fault happened")
    truncate = config.effective_faults().get("truncate_rate", 0.0)
    if truncate * len(rows) >= MIN_EXPECTED_TO_REQUIRE and not stats.get("downloads_truncated"):
        failures.append("no download was truncated")
    return failures


def _check_outputs(done: pd.DataFrame, rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each succeeded row: its sidecar names its job and outputs; each output is whole."""
    failures: list[str] = []
    by_id = {str(r["id"]): r for r in rows}
    for _, r in done.iterrows():
        where = f"row {r['row']} ({r['id']})"
        sidecar_path = Path(str(r["sidecar_uri"]))
        try:
            sidecar = json.loads(sidecar_path.read_bytes())
        except (OSError, ValueError) as exc:
            failures.append(f"{where}: sidecar unreadable: {exc}")
            continue
        if sidecar.get("job_key") != r["job_key"]:
            failures.append(f"{where}: sidecar is of job {sidecar.get('job_key')}")
        asked = int(by_id[str(r["id"])]["n"] or 1)
        uris = list(r["output_uris"])
        if len(uris) != asked or r["n_outputs"] != asked or len(sidecar["outputs"]) != asked:
            failures.append(f"{where}: asked {asked} outputs, results list {len(uris)}")
        for uri in uris:
            problem = _decode_problem(Path(uri), str(r["actual_size"]), str(r["output_format"]))
            if problem:
                failures.append(f"{where}: {problem}")
    return failures


def _decode_problem(path: Path, size: str, fmt: str) -> str | None:
    try:
        with Image.open(path) as im:
            im.load()  # a full decode: a truncated file fails here
            if f"{im.width}x{im.height}" != size:
                return f"{path.name} is {im.width}x{im.height}, results say {size}"
            if (im.format or "").lower() != fmt:
                return f"{path.name} is {im.format}, results say {fmt}"
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        return f"{path.name} does not decode: {exc}"
    return None


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak",
        description="Fault soak of the imgedit engine against the bundled emulator.",
    )
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS, help="manifest rows")
    p.add_argument(
        "--response-format",
        choices=["url", "b64_json", "both"],
        default="both",
        help="how results travel",
    )
    p.add_argument(
        "--fault-rate",
        type=float,
        default=None,
        help="total fault rate, spread over the kinds in the default proportions "
        f"(default {sum(DEFAULT_FAULTS.values()):.2f})",
    )
    for name in FAULT_RATE_FIELDS:
        flag = "--" + name.removesuffix("_rate").replace("_", "-") + "-rate"
        p.add_argument(flag, dest=name, type=float, default=None, help=f"override {name}")
    p.add_argument("--fault-seed", type=int, default=DEFAULT_FAULT_SEED)
    p.add_argument("--retry-after", type=float, default=DEFAULT_RETRY_AFTER_S)
    p.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S)
    p.add_argument("--slow-seconds", type=float, default=DEFAULT_SLOW_S)
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    p.add_argument("--max-attempts", type=int, default=DEFAULT_MAX_ATTEMPTS)
    p.add_argument("--initial-backoff", type=float, default=DEFAULT_INITIAL_BACKOFF_S)
    p.add_argument("--chunk-size", type=int, default=1000)
    p.add_argument("--workdir", type=Path, default=None, help="keep files here (default: temp)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace, response_format: ResponseFormat) -> SoakConfig:
    faults = dict(DEFAULT_FAULTS)
    if args.fault_rate is not None:
        scale = args.fault_rate / sum(DEFAULT_FAULTS.values())
        faults = {k: v * scale for k, v in faults.items()}
    for name in FAULT_RATE_FIELDS:
        value = getattr(args, name)
        if value is not None:
            faults[name] = value
    return SoakConfig(
        rows=args.rows,
        response_format=response_format,
        faults=faults,
        fault_seed=args.fault_seed,
        retry_after=args.retry_after,
        request_timeout=args.request_timeout,
        slow_seconds=args.slow_seconds,
        concurrency=args.concurrency,
        max_attempts=args.max_attempts,
        initial_backoff_s=args.initial_backoff,
        chunk_size=args.chunk_size,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    formats: list[ResponseFormat] = (
        ["url", "b64_json"] if args.response_format == "both" else [args.response_format]
    )
    try:
        configs = [config_from_args(args, f) for f in formats]
    except ValueError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    if args.workdir is not None and any(args.workdir.glob("*/out")):
        # Jobs done by an earlier soak would be skipped, and the invariants fail.
        print(
            f"soak: {args.workdir} holds an earlier soak's output; use an empty folder",
            file=sys.stderr,
        )
        return 2
    ok = True
    with EmulatorProcess(EmulatorConfig()) as emulator:
        for config in configs:
            with tempfile.TemporaryDirectory(prefix="imgedit-soak-") as tmp:
                workdir = (args.workdir or Path(tmp)) / config.response_format
                workdir.mkdir(parents=True, exist_ok=True)
                report = asyncio.run(soak(emulator, workdir, config))
                print(report.text(), flush=True)
                ok = ok and report.ok
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    sys.exit(main())
