"""Test helpers: a real `prefect server` (PostgreSQL when it answers, else SQLite) and workers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_answers() -> bool:
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=1):
            return True
    except OSError:
        return False


async def _pg(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database="postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def database_url(tmp: Path) -> Iterator[str]:
    """A fresh PostgreSQL database when the server answers (as production), else SQLite.

    IMGEDIT_TEST_DB=sqlite forces SQLite, to check that backend on a machine with PostgreSQL.
    """
    if os.environ.get("IMGEDIT_TEST_DB") == "sqlite" or not postgres_answers():
        yield f"sqlite+aiosqlite:///{tmp / 'prefect.db'}"
        return
    name = f"imgedit_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with contextlib.suppress(Exception):
            asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@dataclass
class PrefectStack:
    api_url: str
    env: dict[str, str]
    tmp: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)

    def prefect(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def setup(self, api_limit: int) -> str:
        """What infra/setup.sh does for a team: work pool, API limit, deployments; its output."""
        proc = subprocess.run(
            ["sh", str(ROOT / "infra" / "setup.sh")],
            env={**self.env, "IMGEDIT_API_LIMIT": str(api_limit)},
            capture_output=True,
            text=True,
            timeout=180,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"infra/setup.sh failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def start_worker(
        self,
        name: str,
        pool: str,
        limit: int | None = None,
        prefix: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """A process worker; `prefix` runs it elsewhere (`ip netns exec HOST`)."""
        log = self.tmp / f"worker-{name}.log"
        self.logs[name] = log
        self.procs.append(
            subprocess.Popen(
                [
                    *prefix,
                    sys.executable,
                    "-m",
                    "prefect",
                    "worker",
                    "start",
                    "--pool",
                    pool,
                    "--type",
                    "process",
                    "--name",
                    name,
                    *(["--limit", str(limit)] if limit else []),
                ],
                env={**self.env, **(env or {})},
                cwd=ROOT,
                stdout=log.open("wb"),
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        )

    def log_text(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")


STOP_GRACE_S = 5.0


@contextlib.contextmanager
def prefect_stack(
    tmp: Path, extra_env: dict[str, str] | None = None, host: str = "127.0.0.1"
) -> Iterator[PrefectStack]:
    """`prefect server start` on a free port of `host` (loopback unless another host's
    workers must reach it); yields once its API answers."""
    port = free_port()
    api_url = f"http://{host}:{port}/api"
    with database_url(tmp) as db_url:
        env = {
            **os.environ,
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": api_url,
            "PREFECT_API_DATABASE_CONNECTION_URL": db_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_LOGGING_LEVEL": "INFO",
            # Workers poll every 10 s by default; tests should not wait that long.
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "IMGEDIT_HOME": str(ROOT),
            # `prefect` and `imgedit` of this environment, for scripts such as infra/setup.sh.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            **(extra_env or {}),
        }
        server_log = tmp / "server.log"
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                host,
                "--port",
                str(port),
            ],
            env=env,
            cwd=tmp,
            stdout=server_log.open("wb"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        stack = PrefectStack(api_url=api_url, env=env, tmp=tmp, procs=[server])
        stack.logs["server"] = server_log
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("prefect server did not start:\n" + stack.log_text("server"))
                time.sleep(0.5)
            yield stack
        finally:
            for proc in reversed(stack.procs):
                proc.terminate()
            # One grace period for all: a worker or server still up after it is killed (CI saw
            # 20 s waited out per process, 40 s a stack, with nothing left to finish).
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in reversed(stack.procs):
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def collecting_leaks() -> Iterator[None]:
    """Collect garbage before leaving: Prefect 3.8's client leaves a socket and a transport
    unclosed, and collected later (at the end of the session, say) they would fail whichever
    test is running, outside the filterwarnings marks that excuse them here."""
    try:
        yield
    finally:
        gc.collect()
