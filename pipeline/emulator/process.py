"""The bundled emulator of the edit API as a subprocess, for tests and runs.

`imgedit emulator` (or `python -m pipeline.emulator.process`) serves it; `EmulatorProcess` starts it
on a free loopback port and talks to its /_emulator controls. The command is in
pipeline.emulator.command, the app in pipeline.emulator.app, its settings in
pipeline.emulator.config, its seeded faults in pipeline.emulator.faults.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import typer

from pipeline.emulator.command import PARENT_PID_ENV, emulator_command, env_name, missing_extra
from pipeline.emulator.config import ENV_PREFIX, EmulatorConfig
from pipeline.errors import ConfigError, EmulatorStartError

__all__ = [
    "EmulatorConfig",
    "EmulatorProcess",
    "emulator_command",
    "missing_extra",
]

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
STARTUP_POLL_S = 0.05
STOP_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3
STDERR_TAIL_LINES = 200
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


class EmulatorProcess:
    """`python -m pipeline.emulator.process` as a subprocess on a loopback port, for a `with` block.

    With `config`, every setting is passed explicitly (the parent's IMGEDIT_EMULATOR_*
    variables are ignored); without, the child reads them as the CLI would. `extra_env` is
    applied last. The child's stderr (warnings and errors only) is copied to ours.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        *,
        startup_timeout: float = STARTUP_TIMEOUT_S,
    ) -> None:
        self.config = config
        self._fixed_port = port
        self.port = port or 0
        self.extra_env = dict(extra_env or {})
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._client: httpx.Client | None = None

    @property
    def root_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def __enter__(self) -> EmulatorProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stderr_lines(self) -> list[str]:
        """The last lines the child wrote to stderr."""
        return list(self._tail)

    def start(self) -> None:
        if self._proc is not None:
            raise EmulatorStartError("emulator already started")
        missing = missing_extra()
        if missing:
            raise EmulatorStartError(missing)
        last_error = "not started"
        for _ in range(1 if self._fixed_port else PORT_ATTEMPTS):
            self.port = self._fixed_port or _free_port()
            self._spawn()
            try:
                self._wait_ready()
                self._client = httpx.Client(
                    base_url=self.root_url, timeout=CONTROL_TIMEOUT_S, trust_env=False
                )
                return
            except EmulatorStartError as exc:
                last_error = str(exc)
                self.stop()
                if "address already in use" not in last_error.lower():
                    break
        raise EmulatorStartError(last_error)

    def _spawn(self) -> None:
        env = dict(os.environ)
        if self.config is not None:
            for key in [k for k in env if k.startswith(ENV_PREFIX)]:
                del env[key]
            env.update(self.config.to_env())
        env[env_name("host")] = LOOPBACK
        env[env_name("port")] = str(self.port)
        env[PARENT_PID_ENV] = str(os.getpid())
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        env["NO_COLOR"] = "1"
        env.update(self.extra_env)
        self._tail.clear()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.emulator.process"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            cwd=_PROJECT_ROOT,
            # Its own session: a terminal's Ctrl-C reaches us, and we stop it in order.
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._copy_stderr, args=(self._proc,), name="emulator-stderr", daemon=True
        )
        self._reader.start()

    def _copy_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace")
            self._tail.append(line.rstrip("\n"))
            # Our stderr may be gone (interpreter shutdown): the tail still has the line.
            with contextlib.suppress(ValueError, OSError):
                sys.stderr.write(line)

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=1.0, trust_env=False) as probe:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    if self._reader is not None:
                        self._reader.join(timeout=2.0)
                    tail = "\n".join(self._tail) or "(no output)"
                    raise EmulatorStartError(
                        f"emulator exited with code {self._proc.returncode} during startup:\n{tail}"
                    )
                try:
                    probe.get(f"{self.base_url}/models")
                    return
                except httpx.TransportError:
                    time.sleep(STARTUP_POLL_S)
        raise EmulatorStartError(
            f"emulator did not answer on {self.root_url} within {self.startup_timeout:g} s"
        )

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT_S)
            self._reader = None
        if proc.stderr is not None:
            proc.stderr.close()

    # --- controls ---------------------------------------------------------------------------

    def _control(self, method: str, path: str, json: Any = None) -> Any:
        if self._client is None:
            raise EmulatorStartError("emulator is not running")
        response = self._client.request(method, path, json=json)
        if response.status_code >= 400:
            message = response.json().get("error", {}).get("message", response.text)
            raise ConfigError(f"emulator control {path} failed: {message}")
        return response.json()

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._control("GET", "/_emulator/stats")
        return result

    def reset(self) -> dict[str, Any]:
        result: dict[str, Any] = self._control("POST", "/_emulator/reset")
        return result

    def configure(self, **fields: Any) -> dict[str, Any]:
        """Change settings at run time; returns the effective config (API key masked)."""
        result: dict[str, Any] = self._control("POST", "/_emulator/config", json=fields)
        return result

    def requests(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._control("GET", "/_emulator/requests")["requests"]
        return result


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(emulator_command)
    app()


if __name__ == "__main__":
    main()
