"""`imgedit emulator`: the emulator's command line, generated from EmulatorConfig's fields.

Each field of EmulatorConfig is one `--<field>` option: its type, default, bounds and help
(the field's description) come from the config, and its value may also come from
`IMGEDIT_EMULATOR_<FIELD>`. Nothing about a setting is written here, so the command cannot
drift from the config. `--log-level` is the one option of the server rather than the emulator.

Light on purpose: `imgedit --help` imports this module, but neither FastAPI nor numpy.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import signal
import sys
import threading
import time
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo

from pipeline.emulator.config import ENV_PREFIX, EmulatorConfig
from pipeline.errors import ConfigError

__all__ = ["PARENT_PID_ENV", "emulator_command", "env_name", "missing_extra", "serve"]

PARENT_PID_ENV = "IMGEDIT_EMULATOR_PARENT_PID"
PARENT_POLL_S = 0.5
GRACEFUL_SHUTDOWN_S = 2
DEFAULT_LOG_LEVEL = "warning"
LOG_LEVEL_HELP = "uvicorn log level."


def env_name(field: str) -> str:
    """The environment variable a config field is read from."""
    return ENV_PREFIX + field.upper()


def emulator_command(log_level: str = DEFAULT_LOG_LEVEL, **values: Any) -> None:
    """Serve the edit-API emulator (OpenAI-compatible /v1/images/edits) until interrupted."""
    if problem := missing_extra():
        raise typer.BadParameter(problem)
    try:
        config = EmulatorConfig().updated(values)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc
    serve(config, log_level)


def serve(config: EmulatorConfig, log_level: str = DEFAULT_LOG_LEVEL) -> None:
    """Run the emulator's app under uvicorn until interrupted."""
    import uvicorn

    # Imported here: the app pulls in FastAPI and numpy, which `imgedit --help` need not pay.
    from pipeline.emulator.app import create_app

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


def missing_extra() -> str | None:
    """What to install when the emulator's optional dependencies are missing, else None."""
    if importlib.util.find_spec("multipart") is None:
        return (
            "the bundled emulator is an optional extra: pip install 'imgedit[emulator]' "
            "(or scripts/bootstrap emulator)"
        )
    return None


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


# --- the options, from the config's fields ---------------------------------------------------


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    """`--<name>`: the field's type, default, bounds and description; read from the env too."""
    annotation, optional = _without_none(field.annotation)
    default = field.get_default(call_default_factory=True)
    if get_origin(annotation) is list:
        # Given comma-separated, as in the environment; EmulatorConfig splits it.
        annotation = str
        default = ",".join(str(item) for item in default)
    elif annotation not in (str, int, float) and get_origin(annotation) is not Literal:
        raise TypeError(f"EmulatorConfig.{name}: no command-line form for {field.annotation!r}")
    low, high = _bounds(field, annotation)
    option = typer.Option(envvar=env_name(name), help=field.description, min=low, max=high)
    if optional:
        annotation = annotation | None
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, option],
    )


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(`X`, True) for `X | None`, else (annotation, False)."""
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) < len(get_args(annotation))
    return annotation, False


def _bounds(field: FieldInfo, annotation: Any) -> tuple[Any, Any]:
    """The field's inclusive bounds, as the option checks and shows them (None: unbounded).

    A strict bound of an int becomes the next int; one of a float has no inclusive form, so
    only the config checks it (an out-of-range value still fails before the server starts).
    """
    low = high = None
    for rule in field.metadata:
        if getattr(rule, "ge", None) is not None:
            low = rule.ge
        elif getattr(rule, "gt", None) is not None and annotation is int:
            low = rule.gt + 1
        if getattr(rule, "le", None) is not None:
            high = rule.le
        elif getattr(rule, "lt", None) is not None and annotation is int:
            high = rule.lt - 1
    return low, high


def _signature() -> inspect.Signature:
    options = [_option(name, field) for name, field in EmulatorConfig.model_fields.items()]
    log_level = inspect.Parameter(
        "log_level",
        inspect.Parameter.KEYWORD_ONLY,
        default=DEFAULT_LOG_LEVEL,
        annotation=Annotated[str, typer.Option(help=LOG_LEVEL_HELP)],
    )
    return inspect.Signature([*options, log_level], return_annotation=None)


# typer (like inspect) reads a function's parameters from `__signature__` when it is set: the
# command registers with `app.command(...)(emulator_command)` as a hand-written one would.
emulator_command.__signature__ = _signature()  # type: ignore[attr-defined]
