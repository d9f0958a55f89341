"""`imgedit run`'s own Prefect API (flows.local_api), with real processes on loopback.

Each run gets a fresh PREFECT_HOME; every process of a run carries it in its environment, so
"nothing left behind" means no live process with that PREFECT_HOME, whoever else runs here.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "example.csv"
RUN_TIMEOUT_S = 200.0
GONE_WITHIN_S = 6.0
CLI_RUN = [sys.executable, "-m", "flows.cli", "run"]


@dataclass
class Proc:
    pid: int
    ppid: int
    sid: int
    cmdline: str


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def _start(home: Path, out: Path, **extra: str) -> subprocess.Popen[bytes]:
    with (out.parent / f"{out.name}.stderr").open("wb") as stderr:
        return subprocess.Popen(
            [*CLI_RUN, str(EXAMPLE), "--emulator", "--output", str(out), "--no-progress"],
            cwd=ROOT,
            env=_env(home, **extra),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            # Its own process group, as a terminal's foreground job: signals go to the group.
            start_new_session=True,
        )


def _procs() -> Iterator[Proc]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] == "Z" or not cmdline:  # a zombie, or one exiting right now
            continue
        yield Proc(
            int(entry.name),
            int(fields[1]),
            int(fields[3]),
            cmdline.replace(b"\0", b" ").decode(errors="replace"),
        )


def _of_run(home: Path) -> list[Proc]:
    """Live processes whose environment has this run's PREFECT_HOME."""
    marker = f"PREFECT_HOME={home}\0".encode()
    found = []
    for proc in _procs():
        try:
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        except OSError:
            continue
        if marker in environ:
            found.append(proc)
    return found


def _children(pid: int) -> list[Proc]:
    return [p for p in _procs() if p.ppid == pid]


def _assert_all_gone(home: Path, within: float = GONE_WITHIN_S) -> float:
    began = time.monotonic()
    while (left := _of_run(home)) and time.monotonic() - began < within:
        time.sleep(0.1)
    assert not left, [p.cmdline for p in left]
    return time.monotonic() - began


def _kill_leftovers(home: Path) -> None:
    for proc in _of_run(home):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)


def _wait_in_flight(cli: subprocess.Popen[bytes]) -> Proc:
    """Until the run has edit requests in flight at its emulator; then the CLI's API child."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    with httpx.Client(timeout=5, trust_env=False) as client:
        while True:
            assert cli.poll() is None, f"CLI exited early ({cli.returncode})"
            assert time.monotonic() < deadline, "the run did not start"
            kids = _children(cli.pid)
            for kid in kids:
                if "pipeline.emulator.process" not in kid.cmdline:
                    continue
                with contextlib.suppress(OSError, StopIteration, httpx.HTTPError):
                    environ = Path(f"/proc/{kid.pid}/environ").read_bytes().split(b"\0")
                    port = next(e for e in environ if e.startswith(b"IMGEDIT_EMULATOR_PORT="))
                    url = f"http://127.0.0.1:{port.split(b'=')[1].decode()}/_emulator/stats"
                    if client.get(url).json()["in_flight"] > 0:
                        [server] = [k for k in kids if "flows.local_api" in k.cmdline]
                        return server
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    return any(p.pid == pid for p in _procs())


def _healthy(server: Proc) -> bool:
    port = server.cmdline.split()[-2]
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5, trust_env=False)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def test_two_runs_at_once_on_a_new_prefect_home_both_finish_and_leave_nothing(
    tmp_path: Path,
) -> None:
    home = tmp_path / "prefect-home"
    outs = [tmp_path / "out1", tmp_path / "out2"]
    clis = [_start(home, out) for out in outs]
    seen: dict[int, set[str]] = {cli.pid: set() for cli in clis}
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while any(cli.poll() is None for cli in clis) and time.monotonic() < deadline:
            for proc in _procs():
                # (A child between fork and exec still shows the CLI's command line.)
                if proc.ppid in seen and "flows.cli" not in proc.cmdline:
                    seen[proc.ppid].add(proc.cmdline)
                    if "flows.local_api" in proc.cmdline:
                        assert proc.sid == proc.pid, "the local API is not in its own session"
            time.sleep(0.2)
        codes = [cli.poll() for cli in clis]
        errors = [(out.parent / f"{out.name}.stderr").read_text() for out in outs]
        assert codes == [0, 0], errors
        assert not any("already exists" in text for text in errors), errors
        for out in outs:
            assert list((out / "runs").glob("*/results.parquet"))
        for cli in clis:
            kids = seen[cli.pid]
            # Our server, the emulator, and no Prefect ephemeral server (`-m uvicorn`).
            assert any("-m flows.local_api" in c for c in kids), kids
            assert not any("uvicorn" in c for c in kids), kids
            assert all("flows.local_api" in c or "pipeline.emulator.process" in c for c in kids), (
                kids
            )
        # Two runs that ended normally leave no process behind.
        _assert_all_gone(home, within=1.0)
    finally:
        for cli in clis:
            if cli.poll() is None:
                os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        _kill_leftovers(home)


def test_a_plain_run_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    out = tmp_path / "out"
    cli = _start(home, out)
    try:
        assert cli.wait(RUN_TIMEOUT_S) == 0, (tmp_path / "out.stderr").read_text()
        _assert_all_gone(home, within=1.0)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        _kill_leftovers(home)


def test_sigkill_of_the_cli_group_takes_server_and_emulator_along(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    out = tmp_path / "out"
    cli = _start(home, out, IMGEDIT_EMULATOR_LATENCY="30")
    try:
        server = _wait_in_flight(cli)
        assert _healthy(server)
        assert any("pipeline.emulator.process" in p.cmdline for p in _of_run(home))
        os.killpg(cli.pid, signal.SIGKILL)
        cli.wait()
        _assert_all_gone(home)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        _kill_leftovers(home)


def test_sigint_to_the_cli_group_does_not_reach_the_local_api(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    out = tmp_path / "out"
    cli = _start(home, out, IMGEDIT_EMULATOR_LATENCY="6")
    try:
        server = _wait_in_flight(cli)
        os.killpg(cli.pid, signal.SIGINT)  # a terminal's Ctrl-C
        time.sleep(0.5)
        assert _alive(server.pid)
        assert _healthy(server)
        try:
            cli.wait(60)  # however it exits today
        except subprocess.TimeoutExpired:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        _assert_all_gone(home)
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, signal.SIGKILL)
            cli.wait()
        _kill_leftovers(home)
