"""The bundled emulator of the edit API: CLI command, and a subprocess handle for tests and runs.

`imgedit emulator` (or `python -m pipeline.emulator.process`) serves it; `EmulatorProcess` starts it
on a free loopback port and talks to its /_emulator controls. The app itself is in
emulator_app, its settings in emulator_config, its seeded faults in emulator_faults.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Annotated, Any

import httpx
import typer

from pipeline.emulator.config import (
    DEFAULT_BASE_CACHE_ENTRIES,
    DEFAULT_FILE_STORE_BYTES,
    DEFAULT_FILE_TTL_S,
    DEFAULT_HOST,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_PORT,
    DEFAULT_REQUEST_LOG_SIZE,
    DEFAULT_RETRY_AFTER_S,
    DEFAULT_REVISED_PROMPT_RATE,
    DEFAULT_SLOW_S,
    ENV_PREFIX,
    MALFORMED_KINDS,
    EmulatorConfig,
)
from pipeline.errors import ConfigError, EmulatorStartError
from pipeline.spec import DEFAULT_MODEL

__all__ = [
    "EmulatorConfig",
    "EmulatorProcess",
    "emulator_command",
]

LOOPBACK = "127.0.0.1"
PARENT_PID_ENV = "IMGEDIT_EMULATOR_PARENT_PID"
PARENT_POLL_S = 0.5
STARTUP_TIMEOUT_S = 30.0
STARTUP_POLL_S = 0.05
STOP_TIMEOUT_S = 5.0
GRACEFUL_SHUTDOWN_S = 2
CONTROL_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 3
STDERR_TAIL_LINES = 200
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _opt(name: str, help_text: str) -> Any:
    return typer.Option(envvar=_env(name), help=help_text)


def emulator_command(
    host: Annotated[str, _opt("host", "Interface to listen on.")] = DEFAULT_HOST,
    port: Annotated[int, _opt("port", "Port to listen on (0: any free port).")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None, _opt("api_key", "Require this Bearer key (default: accept any).")
    ] = None,
    balance_usd: Annotated[
        float | None, _opt("balance_usd", "Account balance; overdrawing answers 402.")
    ] = None,
    models: Annotated[str, _opt("models", "Comma-separated model ids served.")] = DEFAULT_MODEL,
    disabled_models: Annotated[
        str, _opt("disabled_models", "Comma-separated model ids answering MODEL_DISABLED.")
    ] = "",
    latency: Annotated[
        float, _opt("latency", "Mean time to answer an edit, rendering included, seconds.")
    ] = 0.0,
    latency_jitter: Annotated[
        float, _opt("latency_jitter", "Standard deviation of the latency, seconds.")
    ] = 0.0,
    latency_distribution: Annotated[
        str, _opt("latency_distribution", "fixed, uniform or lognormal.")
    ] = "fixed",
    fault_seed: Annotated[int, _opt("fault_seed", "Seed of every fault and latency draw.")] = 0,
    rate_limited_rate: Annotated[
        float, _opt("rate_limited_rate", "Share of edits answered 429 RATE_LIMITED.")
    ] = 0.0,
    retry_after: Annotated[
        float, _opt("retry_after", "Retry-After of a 429, seconds.")
    ] = DEFAULT_RETRY_AFTER_S,
    internal_error_rate: Annotated[
        float, _opt("internal_error_rate", "Share answered 500 INTERNAL_ERROR.")
    ] = 0.0,
    exhausted_rate: Annotated[
        float, _opt("exhausted_rate", "Share answered 502 ALL_PROVIDERS_EXHAUSTED.")
    ] = 0.0,
    drop_rate: Annotated[
        float, _opt("drop_rate", "Share charged, then the connection dropped mid-answer.")
    ] = 0.0,
    slow_rate: Annotated[
        float, _opt("slow_rate", "Share charged, then answered after --slow-seconds.")
    ] = 0.0,
    slow_seconds: Annotated[
        float, _opt("slow_seconds", "Delay of a slow answer, seconds.")
    ] = DEFAULT_SLOW_S,
    malformed_rate: Annotated[
        float, _opt("malformed_rate", "Share charged, then answered 200 with a broken body.")
    ] = 0.0,
    malformed_kinds: Annotated[
        str, _opt("malformed_kinds", "Comma-separated: " + ", ".join(MALFORMED_KINDS) + ".")
    ] = ",".join(MALFORMED_KINDS),
    truncate_rate: Annotated[
        float, _opt("truncate_rate", "Share of url answers whose first download is cut short.")
    ] = 0.0,
    revised_prompt_rate: Annotated[
        float, _opt("revised_prompt_rate", "Share of answers carrying a revised_prompt.")
    ] = DEFAULT_REVISED_PROMPT_RATE,
    file_ttl: Annotated[
        float, _opt("file_ttl", "Lifetime of result URLs, seconds.")
    ] = DEFAULT_FILE_TTL_S,
    file_store_bytes: Annotated[
        int, _opt("file_store_bytes", "Memory budget of stored result files, bytes.")
    ] = DEFAULT_FILE_STORE_BYTES,
    public_base_url: Annotated[
        str | None, _opt("public_base_url", "Base of result URLs (default: the request's host).")
    ] = None,
    max_image_bytes: Annotated[
        int, _opt("max_image_bytes", "Largest accepted upload, bytes.")
    ] = DEFAULT_MAX_IMAGE_BYTES,
    base_cache_size: Annotated[
        int, _opt("base_cache_size", "Decoded source compositions kept in memory.")
    ] = DEFAULT_BASE_CACHE_ENTRIES,
    render_threads: Annotated[int, _opt("render_threads", "Render threads (0: one per CPU).")] = 0,
    request_log_size: Annotated[
        int, _opt("request_log_size", "Edit requests kept in the request log.")
    ] = DEFAULT_REQUEST_LOG_SIZE,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve the edit-API emulator (OpenAI-compatible /v1/images/edits) until interrupted."""
    values = {k: v for k, v in locals().items() if k != "log_level"}
    import uvicorn

    if problem := missing_extra():
        raise typer.BadParameter(problem)
    # Imported here: the app pulls in FastAPI and numpy, which `imgedit --help` need not pay.
    from pipeline.emulator.app import create_app

    try:
        config = EmulatorConfig().updated(values)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    _watch_parent()
    if sys.stderr.isatty():
        # For a person at a terminal only; a parent process reading our stderr gets no chatter.
        typer.echo(
            f"imgedit emulator: http://{config.host}:{config.port}/v1 (Ctrl-C to stop)", err=True
        )
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,
        use_colors=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def _watch_parent() -> None:
    """When started by EmulatorProcess, exit once that parent is gone (no orphan servers)."""
    raw = os.environ.get(PARENT_PID_ENV)
    if not raw or not raw.isdigit():
        return
    parent = int(raw)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def missing_extra() -> str | None:
    """What to install when the emulator's optional dependencies are missing, else None."""
    if importlib.util.find_spec("multipart") is None:
        return (
            "the bundled emulator is an optional extra: pip install 'imgedit[emulator]' "
            "(or scripts/bootstrap emulator)"
        )
    return None


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
        env[_env("host")] = LOOPBACK
        env[_env("port")] = str(self.port)
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
