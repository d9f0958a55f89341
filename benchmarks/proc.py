"""Process accounting from /proc and wait4: CPU seconds and peak RSS per measured process."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Fields of /proc/<pid>/stat after the command name: state is index 0.
_PPID, _UTIME, _STIME = 1, 11, 12


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its last ')'.
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (all its threads), 0.0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[_UTIME]) + int(fields[_STIME])) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    """Live direct children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and int(fields[_PPID]) == pid:
                found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU of `pid` and every live descendant (a Prefect ephemeral server, say)."""
    return cpu_seconds(pid) + sum(cpu_seconds(k) for k in descendants(pid))


def find_child(pid: int, needle: str) -> int | None:
    """A live descendant of `pid` whose command line contains `needle`."""
    for kid in descendants(pid):
        try:
            cmdline = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            return kid
    return None


@dataclass
class Measured:
    """One finished child process: wall time, its own (and reaped children's) CPU, peak RSS."""

    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float
    started_at: float  # time.time() just before the spawn
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    timeout: float,
) -> Measured:
    """Run `cmd` to completion and account for it alone (wait4 on its pid, not RUSAGE_CHILDREN).

    wait4 reports the child plus the descendants it reaped itself, so a Prefect server
    subprocess stopped by the flow process is included; peak RSS is the largest of them.
    Linux starts a child's peak RSS at its parent's RSS when it forks (and keeps it across
    exec): measure from a small process, or a small command reports the parent's size.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started_at = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), env=dict(env), cwd=cwd, stdout=out, stderr=err, start_new_session=True
        )
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            watchdog.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(
            returncode=proc.returncode,
            wall_s=wall,
            user_s=usage.ru_utime,
            sys_s=usage.ru_stime,
            max_rss_mb=usage.ru_maxrss / 1024,  # Linux reports KiB
            started_at=started_at,
            stdout=out.read(),
            stderr=err.read(),
            timed_out=timed_out.is_set(),
        )
