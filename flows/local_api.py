"""The Prefect API an `imgedit run` talks to when no PREFECT_API_URL is set, started by the run.

Why: left alone, Prefect starts an ephemeral API server itself, and that server sits in the
CLI's process group (a terminal's Ctrl-C kills it while the run still needs it), can outlive a
SIGKILLed CLI, migrates a new SQLite database concurrently with a second run starting at the
same moment (`table ... already exists`), and times out after a short wait on a busy machine.
Here the same server (`prefect.server.api.server:create_app`, with the environment Prefect's
SubprocessASGIServer gives it) runs in its own session, dies with the CLI however the CLI dies
(PR_SET_PDEATHSIG plus a watch on its parent pid), starts under an exclusive lock in
PREFECT_HOME and gets a generous startup timeout. The in-process Prefect client is pointed at it
with `temporary_settings`, so Prefect never starts its own.

`python -m flows.local_api PORT PARENT_PID` is the server child.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["DEFAULT_STARTUP_TIMEOUT_S", "LocalApiError", "local_prefect_api", "main"]

DEFAULT_STARTUP_TIMEOUT_S = 180.0
LOOPBACK = "127.0.0.1"
LOCK_FILE = "imgedit-local-api.lock"
HEALTH_POLL_S = 0.1
QUIET_S = 1.0
PORT_ATTEMPTS = 3
STOP_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 5.0
PARENT_POLL_S = 0.2
GRACEFUL_SHUTDOWN_S = 3
STDERR_TAIL_LINES = 20
STDERR_TAIL_BYTES = 64 * 1024
PR_SET_PDEATHSIG = 1
EXIT_PARENT_GONE = 70
_PROJECT_ROOT = Path(__file__).resolve().parent.parent

# What Prefect's SubprocessASGIServer sets for its ephemeral server (no UI, ephemeral services).
_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}


class LocalApiError(RuntimeError):
    """Prefect's local API did not come up."""


@contextlib.contextmanager
def local_prefect_api(
    say: Callable[[str], None] | None = None,
    *,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> Iterator[str | None]:
    """Serve Prefect's API on a loopback port for the `with` block; yield its URL.

    With PREFECT_API_URL set (environment or Prefect settings) nothing is started and None is
    yielded: that server is used. `say` gets one line if the start takes more than a second.
    Raises LocalApiError if the server does not answer within `startup_timeout` seconds.
    Enter it from a thread that lives as long as the run (the main thread): the child's
    parent-death signal follows the thread that started it.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        yield None
        return
    server = _ServerProcess(say, startup_timeout)
    try:
        server.start()
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                # Logs and events still queued go out now, while their server is up.
                drain_prefect_workers()
    finally:
        server.stop()


class _ServerProcess:
    """The `python -m flows.local_api` child: spawned, awaited, stopped with its group."""

    def __init__(self, say: Callable[[str], None] | None, startup_timeout: float) -> None:
        self._say = say
        self._startup_timeout = startup_timeout
        self._said = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._healthy = False
        self.port = 0

    @property
    def api_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/api"

    def start(self) -> None:
        from prefect.settings import PREFECT_HOME

        began = time.monotonic()
        deadline = began + self._startup_timeout
        home = Path(PREFECT_HOME.value()).expanduser()
        home.mkdir(parents=True, exist_ok=True)
        # Held from spawn to health: the first start migrates the database, and two at once
        # on a new PREFECT_HOME collide ("table ... already exists").
        with open(home / LOCK_FILE, "ab") as lock:
            self._lock(lock, began, deadline)
            try:
                for attempt in range(1, PORT_ATTEMPTS + 1):
                    self.port = _free_port()
                    self._spawn()
                    if self._wait_healthy(began, deadline):
                        self._healthy = True
                        return
                    tail = self._stderr_tail()
                    code = self.stop()
                    if "address already in use" not in tail.lower() or attempt == PORT_ATTEMPTS:
                        raise LocalApiError(
                            f"Prefect's local API exited with code {code} during startup; "
                            f"its last output:\n{tail or '(none)'}"
                        )
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _lock(self, lock: IO[bytes], began: float, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            self._announce(began)
            if time.monotonic() >= deadline:
                raise LocalApiError(
                    f"another process kept Prefect's start lock {lock.name} for "
                    f"{self._startup_timeout:g} s"
                )
            time.sleep(HEALTH_POLL_S)

    def _announce(self, began: float) -> None:
        if self._say is None or self._said or time.monotonic() - began < QUIET_S:
            return
        self._said = True
        self._say(
            "starting Prefect's local API (the first start sets up its database; "
            f"up to {self._startup_timeout:g} s)"
        )

    def _spawn(self) -> None:
        from prefect.settings import get_current_settings

        env = {
            **os.environ,
            **_SERVER_ENV,
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        # A file, not a pipe: nobody reads it while the run goes on, and a pipe could fill.
        self._log = tempfile.TemporaryFile(prefix="imgedit-prefect-api-")  # noqa: SIM115 (stop)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "flows.local_api", str(self.port), str(os.getpid())],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env=env,
            # Its own session: a terminal's Ctrl-C goes to the CLI only; we stop it in order.
            start_new_session=True,
        )

    def _wait_healthy(self, began: float, deadline: float) -> bool:
        """True once /api/health answers 200; False if the child exits first."""
        import httpx

        assert self._proc is not None
        with httpx.Client(timeout=2.0, trust_env=False) as probe:
            while True:
                if _exited(self._proc):
                    return False
                try:
                    if probe.get(f"{self.api_url}/health").status_code == 200:
                        return True
                except httpx.HTTPError:
                    pass
                self._announce(began)
                if time.monotonic() >= deadline:
                    raise LocalApiError(
                        f"Prefect's local API did not answer on {self.api_url} within "
                        f"{self._startup_timeout:g} s; its last output:\n"
                        f"{self._stderr_tail() or '(none)'}"
                    )
                time.sleep(HEALTH_POLL_S)

    def _stderr_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        size = self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, size - STDERR_TAIL_BYTES))
        text = self._log.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])

    def stop(self) -> int | None:
        """SIGTERM the child's group, SIGKILL it after STOP_TIMEOUT_S, reap; its exit code."""
        proc, self._proc = self._proc, None
        healthy, self._healthy = self._healthy, False
        try:
            if proc is None:
                return None
            if healthy and _exited(proc) and self._say is not None:
                self._say(f"Prefect's local API stopped during the run:\n{self._stderr_tail()}")
            return _stop_group(proc)
        finally:
            log, self._log = self._log, None
            if log is not None:
                log.close()


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    """Whether the child has exited, without reaping it (its pid then still names its group)."""
    if proc.returncode is not None:
        return True
    if not hasattr(os, "waitid"):
        return proc.poll() is not None
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return proc.poll() is not None


def _stop_group(proc: subprocess.Popen[bytes]) -> int:
    # The child leads its own session, so its pid is its process group id; unreaped (a zombie
    # at worst), that id cannot be reused, so the group is signalled before the child is reaped.
    try:
        if not _exited(proc):
            _killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while not _exited(proc) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        # Also on a second Ctrl-C while waiting: nothing of the group may be left.
        if proc.returncode is None:
            _killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


def _killpg(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def drain_prefect_workers() -> None:
    """Send the logs and events Prefect's background workers still hold (as its test harness)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=DRAIN_TIMEOUT_S)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


# --- the child ------------------------------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Leave no server behind: follow the parent's death, however it dies (SIGKILL too)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    def watch() -> None:
        # Covers a parent gone before prctl took effect, and systems without prctl.
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not all(a.isdigit() for a in args):
        sys.exit("usage: python -m flows.local_api PORT PARENT_PID")
    port, parent = int(args[0]), int(args[1])
    _die_with_parent(parent)
    import uvicorn

    uvicorn.run(
        "prefect.server.api.server:create_app",
        factory=True,
        host=LOOPBACK,
        port=port,
        log_level="error",
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


if __name__ == "__main__":
    main()
