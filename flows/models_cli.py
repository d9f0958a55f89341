"""`imgedit models`: the models an API serves, each with the limits its profile gives.

Registered on the main app by `register(app)`; the engine is imported inside the command, so
`--help` stays fast.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

EXIT_CANNOT = 2

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def models(
    api_base: Annotated[
        str | None,
        typer.Option(help="API base URL; default IMGEDIT_API_BASE, else the Lumenfall gateway"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """List the models the API serves and what each accepts (GET /models?schema=true).

    A model with a built-in profile shows it; any other shows what its schema says, or a
    permissive guess when the schema cannot be read (the profile column says which).
    """
    from pipeline.engine.profiles import list_profiles
    from pipeline.errors import ImgEditError

    try:
        profiles = list_profiles(base_url=api_base)
    except (ImgEditError, ValueError) as exc:
        err.print(f"[red bold]cannot list models:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_CANNOT) from None
    if as_json:
        typer.echo(json.dumps({p.model: p.limits() for p in profiles}, indent=2))
        return
    if not profiles:
        out.print("the API lists no models")
        return
    for profile in profiles:
        table = Table(title=escape(profile.model), show_header=False, title_justify="left")
        table.add_column("limit", no_wrap=True)
        table.add_column("value", overflow="fold")
        for name, value in profile.limits().items():
            table.add_row(name, escape(value))
        out.print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
