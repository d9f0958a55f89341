"""The emulator in this process behind httpx.ASGITransport: EmulatorProcess's controls, no
subprocess and no socket, for engine tests where a real connection adds nothing."""

from __future__ import annotations

from typing import Any

import httpx

from pipeline.emulator.app import create_app
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.state import EmulatorState
from pipeline.engine.run import RunParts


class InProcessEmulator:
    """One emulator app; runs reach it through `parts()` (its transport serves the API and the
    result downloads), tests read and steer it as they would the subprocess."""

    # Loopback (no API key needed) and never dialled: the transport answers every request.
    base_url = "http://127.0.0.1:9/v1"

    def __init__(self, **config: Any) -> None:
        self.app = create_app(EmulatorConfig(**config))
        self.state: EmulatorState = self.app.state.emulator
        self.transport = httpx.ASGITransport(app=self.app)

    def parts(self, **kw: Any) -> RunParts:
        return RunParts(api_transport=self.transport, **kw)

    def stats(self) -> dict[str, Any]:
        return self.state.stats()

    def reset(self) -> dict[str, Any]:
        self.state.reset()
        return self.stats()

    def configure(self, **fields: Any) -> dict[str, Any]:
        self.state.apply_config(fields)
        return self.state.config.public_dict()

    def requests(self) -> list[dict[str, Any]]:
        return list(self.state.log)

    def close(self) -> None:
        # What the app's lifespan would do; ASGITransport does not run lifespans.
        self.state.executor.shutdown(wait=True, cancel_futures=True)
