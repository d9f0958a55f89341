"""`imgedit run`'s options, generated from the run's options model (pipeline.engine.options).

Each field of `RunOptions` that the CLI offers becomes an option with the field's type,
default, bounds and description; fields the CLI spells its own way (`--rows A:B`, `--ids a,b`)
or does not offer (a shard's rows) are left to the command. Nothing here imports Prefect.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import annotated_types as at
import typer
from pydantic.fields import FieldInfo

from pipeline.engine.options import RunOptions, cli_name


def _bounds(field: FieldInfo) -> dict[str, Any]:
    """Typer's range options for the field's closed bounds. Open ones (gt, lt) typer cannot
    say: the command validates the options with the model before anything starts."""
    out: dict[str, Any] = {}
    for item in field.metadata:
        if isinstance(item, at.Ge):
            out["min"] = item.ge
        elif isinstance(item, at.Le):
            out["max"] = item.le
    return out


def _cli_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """The annotation typer understands, and the choices of a Literal."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    inner = [a for a in args if a is not type(None)] if optional else None
    base = inner[0] if inner and len(inner) == 1 else annotation
    if typing.get_origin(base) is typing.Literal:
        return (str | None) if optional else str, [str(c) for c in typing.get_args(base)]
    if isinstance(annotation, types.UnionType) or optional:
        return base | None, None
    return annotation, None


def option_parameters() -> list[inspect.Parameter]:
    """One keyword parameter a `RunOptions` field the CLI offers, in the model's order."""
    params = []
    for name, field in RunOptions.model_fields.items():
        option = cli_name(name)
        if option is None:
            continue
        annotation, choices = _cli_type(field.annotation)
        help_text = field.description or ""
        if choices:
            help_text += f" ({' or '.join(choices)})"
        is_flag = annotation is bool
        declaration = f"{option}/--no-{option[2:]}" if is_flag else option
        info = typer.Option(declaration, help=help_text, show_default=True, **_bounds(field))
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=field.default,
                annotation=Annotated[annotation, info],
            )
        )
    return params


def choices_of(name: str) -> list[str] | None:
    """The allowed values of a Literal field, checked by the command (typer shows them)."""
    return _cli_type(RunOptions.model_fields[name].annotation)[1]


def with_parameters(
    fn: Callable[..., Any], leading: list[inspect.Parameter], trailing: list[inspect.Parameter]
) -> Callable[..., Any]:
    """`fn` with the signature typer reads: `leading`, the generated options, `trailing`."""
    fn.__signature__ = inspect.Signature([*leading, *option_parameters(), *trailing])  # type: ignore[attr-defined]
    return fn


__all__ = ["choices_of", "option_parameters", "with_parameters"]
