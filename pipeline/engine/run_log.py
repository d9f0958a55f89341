"""Every run's log, written beside its results as `runs/<run-id>/run.log`, without secrets.

While a run lasts, the INFO and higher records of imgedit's own loggers (`pipeline`, `flows`)
and of Prefect's flow and task runs go to a local file as well as wherever they went before;
when the run ends the file is stored under the output (a local folder or S3), whatever ended
it. Messages never contain credentials by design; as a second line of defence every value of
a credential variable in the environment is replaced by `***` before it is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.engine import layout
from pipeline.errors import StorageError
from pipeline.io.storage import Storage

log = logging.getLogger(__name__)

LOGGERS = ("pipeline", "flows", "prefect.flow_runs", "prefect.task_runs")
SECRET_VARIABLES = (
    "IMGEDIT_API_KEY",
    "LUMENFALL_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
# Shorter values would blank out ordinary words.
MIN_SECRET_CHARS = 8
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _Redact(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.secrets = [
            value
            for name in SECRET_VARIABLES
            if len(value := os.environ.get(name, "")) >= MIN_SECRET_CHARS
        ]

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            text = record.getMessage()
            for secret in self.secrets:
                text = text.replace(secret, "***")
            record.msg, record.args = text, None
        return True


class RunLog:
    """A run's log being captured: where it will be stored, and whether it will be."""

    def __init__(self, uri: str, kept: bool) -> None:
        self.uri = uri
        self.kept = kept

    def keep(self) -> None:
        """Store the log when the run ends (say so once the output may be written to)."""
        self.kept = True


@contextlib.contextmanager
def run_log(storage: Storage, run_id: str, *, kept: bool = True) -> Iterator[RunLog]:
    """Capture the run's log while the block runs; store it as `runs/<run_id>/run.log`.

    With `kept=False` the capture starts at once but the log is stored only if the block
    calls `keep()`: a run captures what its plan and the output read beside it log, and a
    run whose plan fails leaves its output untouched. A log that cannot be stored is a
    warning, never the reason a run fails.
    """
    fd, name = tempfile.mkstemp(prefix="imgedit-run-", suffix=".log")
    os.close(fd)
    path = Path(name)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_Redact())
    loggers = [logging.getLogger(n) for n in LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:
            lg.setLevel(logging.INFO)
    key = layout.run_log_key(run_id)
    captured = RunLog(storage.uri_for(key), kept)
    try:
        yield captured
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()
        try:
            if captured.kept:
                storage.put_file(key, path, "text/plain; charset=utf-8")
        except StorageError as exc:
            log.warning("the run's log could not be stored: %s", exc)
        finally:
            path.unlink(missing_ok=True)


__all__ = ["RunLog", "run_log"]
