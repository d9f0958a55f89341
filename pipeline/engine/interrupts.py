"""Ctrl-C and SIGTERM during a run: the first stops it gracefully, a second exits at once.

The first SIGINT or SIGTERM (to the process or its group) trips the run's stop switch: no new
request starts, the requests in flight get `DRAIN_GRACE_S` to answer and be stored, the
results of every finished row and the run's results table and summary are written, and the
run returns with `stop_kind == "interrupted"`. A second one exits the process at once with
EXIT_SECOND_SIGNAL (what was flushed so far stays; the sidecars are the truth).

Handlers can only be installed from the main thread; elsewhere (a worker thread, a test
runner's thread) this does nothing, and the process's own handling applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from pipeline.engine.run_control import RunStop

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# 128 + SIGINT: what a shell reports for a process killed by Ctrl-C.
EXIT_SECOND_SIGNAL = 130


@contextlib.contextmanager
def stop_on_signals(stop: RunStop) -> Iterator[None]:
    """While the block runs, SIGINT/SIGTERM interrupt `stop` (then exit on a second one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    loop = _running_loop()
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        received.append(signum)
        if len(received) > 1:
            # Said once, plainly, then gone: no traceback, no waiting on anything.
            with contextlib.suppress(Exception):
                sys.stderr.write(f"\n{name} again: exiting now\n")
                sys.stderr.flush()
            os._exit(EXIT_SECOND_SIGNAL)
        if loop is not None:
            loop.call_soon_threadsafe(stop.interrupt, f"interrupted by {name}")
        else:
            stop.interrupt(f"interrupted by {name}")

    for sig in SIGNALS:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


__all__ = ["EXIT_SECOND_SIGNAL", "stop_on_signals"]
