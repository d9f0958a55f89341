"""The benchmark's S3 endpoint: `benchmarks.s3server` (moto) as a subprocess on loopback."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import boto3
import httpx

from .s3server import READY

STARTUP_TIMEOUT_S = 300.0  # pre-populating 100k sidecars takes a few seconds; be generous
STOP_TIMEOUT_S = 5.0
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class S3Server:
    """moto's S3 on 127.0.0.1 in its own process; `populate` pre-writes "done" sidecars."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        populate: Sequence[str] = (),
        sources: Path | None = None,
    ) -> None:
        self.env = dict(env)
        self.populate = list(populate)
        self.sources = sources
        self.port = 0
        self.populate_report = ""
        self._proc: subprocess.Popen[str] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "benchmarks.s3server", "--port", str(self.port)]
        for spec in self.populate:
            cmd += ["--populate", spec]
        if self.sources is not None:
            cmd += ["--sources", str(self.sources)]
        self._proc = subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the S3 server exited with code {self._proc.returncode}")
            ready, _, _ = select.select([self._proc.stdout], [], [], 0.5)
            if ready:
                line = self._proc.stdout.readline()
                if line.startswith(READY):
                    self.populate_report = line[len(READY) :].strip()
                    return
        self.stop()
        raise RuntimeError(f"the S3 server did not start within {STARTUP_TIMEOUT_S:g} s")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def client(self) -> object:
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def reset(self, buckets: Sequence[str]) -> None:
        """Forget every object (moto's reset), then create `buckets` empty."""
        httpx.post(f"{self.endpoint_url}/moto-api/reset", timeout=60).raise_for_status()
        client = self.client()
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)  # type: ignore[attr-defined]


def child_env(prefect_home: Path) -> dict[str, str]:
    """The environment of every benchmark process: loopback only, fake AWS, quiet Prefect."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "PREFECT_", "IMGEDIT_", "LUMENFALL_"))
    }
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_LOGGING_LEVEL="WARNING",
        NO_COLOR="1",
    )
    return env
