"""The `imgedit` command: run a manifest through the flow, validate one, serve the emulator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from prefect.client.schemas.objects import State
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.limits import DEFAULT_LIMIT_NAME, rate_limit_name, setup_limit
from pipeline import spec
from pipeline.emulator import EmulatorProcess, emulator_command
from pipeline.errors import ImgEditError
from pipeline.manifest import format_report, validate_manifest
from pipeline.runner import DEFAULT_CHUNK_SIZE, DEFAULT_CONCURRENCY

app = typer.Typer(
    name="imgedit",
    help="Apply one image edit to thousands of images: manifest -> edit API -> storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_CANNOT_RUN = 2
EXIT_INCOMPLETE = 3


@contextlib.contextmanager
def _maybe_emulator(enabled: bool) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    with EmulatorProcess() as emulator:
        console.print(f"[dim]emulator serving {emulator.base_url}[/dim]")
        yield emulator.base_url


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"run {summary['run_id']}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    from pipeline.engine import RunSummary

    for row in RunSummary(**summary).table():
        table.add_row(str(row["metric"]), str(row["value"]))
    return table


@app.command()
def run(
    manifest: Annotated[str, typer.Argument(help="Manifest: local path or s3://, CSV or Parquet")],
    output: Annotated[
        str,
        typer.Option("--output", "-o", help="Output root: a local folder or s3://bucket/prefix"),
    ],
    api_base: Annotated[
        str | None,
        typer.Option(help="API base URL (default: IMGEDIT_API_BASE, else the Lumenfall gateway)"),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model (default: IMGEDIT_MODEL)")] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Edit requests in flight at once")
    ] = DEFAULT_CONCURRENCY,
    strict: Annotated[
        bool, typer.Option(help="Fail before any API call if any row is invalid")
    ] = False,
    emulator: Annotated[
        bool,
        typer.Option(help="Start the bundled API emulator on a free loopback port for this run"),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Redo rows whose results already exist")] = False,
    max_attempts: Annotated[int | None, typer.Option(min=1, help="Attempts per row")] = None,
    request_timeout: Annotated[
        float | None, typer.Option(help="Seconds before an attempt counts as lost")
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Rows per Prefect task")
    ] = DEFAULT_CHUNK_SIZE,
    response_format: Annotated[
        str, typer.Option(help="b64_json (inline) or url (downloaded at once)")
    ] = "b64_json",
    s3_endpoint_url: Annotated[
        str | None, typer.Option(help="S3 endpoint URL (MinIO, R2...); default AWS_ENDPOINT_URL_S3")
    ] = None,
    run_id: Annotated[str | None, typer.Option(help="Name of the run (default: a new id)")] = None,
    max_cost: Annotated[
        float | None,
        typer.Option(min=0, help="Budget in USD: no request starts once it could be passed"),
    ] = None,
    dry_run_estimate: Annotated[
        bool, typer.Option(help="Price the run with the API's dry run of its first row")
    ] = False,
    retry_failed_of: Annotated[
        str | None, typer.Option(help="Only redo the rows that failed in this earlier run id")
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="Only rows where this expression holds, e.g. 'seed > 10 and size == \"1:1\"' "
            "(comparisons, and/or/not, in [...], contains/startswith/isnull...; not Python)"
        ),
    ] = None,
    allow_private_sources: Annotated[
        bool,
        typer.Option(
            help="Also fetch http(s) sources from loopback and private networks "
            "(default: refused; env IMGEDIT_ALLOW_PRIVATE_SOURCES=1)"
        ),
    ] = False,
    exclusive_output: Annotated[
        bool,
        typer.Option(
            help="No other run writes to the output: lets a run start on a store that ignores "
            "conditional writes (no claims there)"
        ),
    ] = False,
    progress_bar: Annotated[
        bool, typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)")
    ] = sys.stderr.isatty(),
) -> None:
    """Run the edit-manifest flow on MANIFEST, writing to --output."""
    if response_format not in spec.RESPONSE_FORMATS:
        console.print(f"[red]--response-format must be one of {', '.join(spec.RESPONSE_FORMATS)}")
        raise typer.Exit(EXIT_CANNOT_RUN)
    if where is not None:
        # Refused here, before Prefect starts: a hostile or mistyped filter costs nothing.
        from pipeline.where import parse_where

        try:
            parse_where(where)
        except ImgEditError as exc:
            console.print(f"[red bold]cannot run:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(EXIT_CANNOT_RUN) from None
    output = _absolute_local(output)
    manifest = _absolute_local(manifest)
    from flows.edit_manifest import edit_manifest
    from flows.local_api import LocalApiError, local_prefect_api
    from flows.progress_bar import RunProgressBar

    params: dict[str, Any] = {
        "manifest": manifest,
        "output": output,
        "concurrency": concurrency,
        "strict": strict,
        "overwrite": overwrite,
        "chunk_size": chunk_size,
        "response_format": response_format,
        "s3_endpoint_url": s3_endpoint_url,
        "run_id": run_id,
        "max_cost_usd": max_cost,
        "dry_run_estimate": dry_run_estimate,
        "retry_failed_of": retry_failed_of,
        "select_where": where,
        "allow_private_sources": allow_private_sources,
        "exclusive_output": exclusive_output,
    }
    if model:
        params["model"] = model
    if max_attempts:
        params["max_attempts"] = max_attempts
    if request_timeout:
        params["request_timeout"] = request_timeout
    # Until the engine takes over Ctrl-C for the run (see pipeline.interrupts), a SIGTERM
    # means what a Ctrl-C means: stop, without a traceback.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _maybe_emulator(emulator) as emulator_base:
            params["api_base"] = emulator_base or api_base
            with local_prefect_api(lambda m: console.print(f"[dim]{escape(m)}[/dim]")):
                bar = RunProgressBar(console) if progress_bar else contextlib.nullcontext()
                with bar:
                    state: State[Any] = asyncio.run(_run_flow(edit_manifest, params))
    except LocalApiError as exc:
        console.print(f"[red bold]cannot run:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted before any edit was sent[/]; nothing was paid")
        raise typer.Exit(EXIT_INCOMPLETE) from None
    raise typer.Exit(_report(state))


def _report(state: State[Any]) -> int:
    """Print what the run did and say what to do next; its exit status."""
    if state.is_cancelled():
        data = state.result(raise_on_failure=False)
        if isinstance(data, dict):
            _print_summary(data)
        console.print(f"[yellow bold]{escape(state.message or 'interrupted')}[/]")
        return EXIT_INCOMPLETE
    if state.is_failed() or state.is_crashed():
        result = state.result(raise_on_failure=False)
        message = str(result) if isinstance(result, BaseException) else state.message
        console.print(f"[red bold]run failed:[/] {escape(str(message))}", highlight=False)
        return EXIT_CANNOT_RUN
    summary: dict[str, Any] = state.result()
    _print_summary(summary)
    budget = summary["skipped_by_reason"].get("budget", 0)
    if budget:
        console.print(
            f"[yellow]incomplete: {budget} rows were left for the budget[/]; raise --max-cost "
            "and run the same command again to continue"
        )
        return EXIT_INCOMPLETE
    failed = summary["by_status"].get("failed", 0) + summary["by_status"].get("invalid", 0)
    if failed:
        console.print(f"[yellow]{failed} rows failed or were invalid: see the results table")
        return EXIT_ROWS_FAILED
    return EXIT_OK


def _print_summary(summary: dict[str, Any]) -> None:
    out.print(_summary_table(summary))
    out.print(f"results table: {summary['results_uri']}")
    out.print(f"images and sidecars: {summary['output']}/images/, {summary['output']}/jobs/")


async def _run_flow(flow: Any, params: dict[str, Any]) -> State[Any]:
    state: State[Any] = await flow(**params, return_state=True)
    return state


def _absolute_local(uri: str) -> str:
    """Local paths are made absolute so a flow run elsewhere (a worker) means the same place."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


@app.command()
def validate(
    manifest: Annotated[str, typer.Argument(help="Manifest: local path or s3://, CSV or Parquet")],
    s3_endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint URL")] = None,
) -> None:
    """Check every row of MANIFEST without calling the API; exit 1 if any row is invalid."""
    try:
        report = validate_manifest(manifest, endpoint_url=s3_endpoint_url)
    except ImgEditError as exc:
        console.print(f"[red bold]manifest error:[/] {exc}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    out.print(format_report(report), markup=False, highlight=False)
    if report.invalid:
        raise typer.Exit(EXIT_ROWS_FAILED)


@app.command()
def reindex(
    output: Annotated[
        str, typer.Argument(help="Output root: a local folder or s3://bucket/prefix")
    ],
    s3_endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint URL")] = None,
) -> None:
    """Rebuild OUTPUT's done index from its sidecars and clear killed runs' open chunks.

    Only while no run writes to OUTPUT: a running chunk's open marker would be cleared too.
    """
    from pipeline.done_index import rebuild_index
    from pipeline.storage import open_storage

    try:
        done = rebuild_index(open_storage(output, endpoint_url=s3_endpoint_url))
    except ImgEditError as exc:
        console.print(f"[red bold]cannot reindex:[/] {exc}")
        raise typer.Exit(EXIT_CANNOT_RUN) from None
    out.print(f"{output}: {len(done.keys)} jobs done; index rebuilt, no open chunks left")


@app.command()
def setup(
    limit: Annotated[
        int, typer.Option(min=1, help="Edit requests in flight across all runs and workers")
    ],
    name: Annotated[
        str, typer.Option(help="Name of the global concurrency limit")
    ] = DEFAULT_LIMIT_NAME,
    requests_per_minute: Annotated[
        float | None, typer.Option(min=0, help="Also limit requests per minute (rate limit)")
    ] = None,
) -> None:
    """Create or update the Prefect limits that every run and worker shares."""

    asyncio.run(setup_limit(name, limit, requests_per_minute))
    out.print(f"global concurrency limit {name!r}: {limit} requests in flight")
    if requests_per_minute:
        out.print(f"rate limit {rate_limit_name(name)!r}: {requests_per_minute:g} requests/minute")


app.command("emulator", help="Serve the bundled edit-API emulator (for tests, demos, benchmarks).")(
    emulator_command
)


def main() -> None:
    # Prefect's client reports nothing anywhere unless asked; this keeps offline runs quiet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    app()


if __name__ == "__main__":
    main()
