"""The `imgedit` command: run a manifest through the flow, validate one, serve the emulator.

`--help` of every command imports neither Prefect nor the emulator's app: what they need is
imported inside the command that runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.cli_options import choices_of, with_parameters
from flows.export_cli import register as register_export_command
from flows.history_cli import register as register_history_commands
from flows.models_cli import register as register_models_command
from pipeline import __version__
from pipeline.constants import (
    DEFAULT_CONCURRENCY,
    DEFAULT_LIMIT_NAME,
)
from pipeline.emulator.process import emulator_command
from pipeline.errors import ImgEditError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_CANNOT_RUN = 2
EXIT_INCOMPLETE = 3
EXIT_CODES = (
    "Exit status: 0 every row done (succeeded or skipped); 1 rows failed or invalid (the "
    "results table says which and why); 2 the run could not start, or a run-fatal error "
    "stopped it (bad manifest, no key, 401/402, storage that cannot take results); 3 "
    "incomplete: interrupted (Ctrl-C, SIGTERM) or cut short by --max-cost: the same command "
    "continues it."
)
# Failure reasons listed at the end of a run, most frequent first.
TOP_FAILURE_REASONS = 5
EXAMPLE_MESSAGE_CHARS = 160

app = typer.Typer(
    name="imgedit",
    help="Apply one image edit to thousands of images: manifest -> edit API -> storage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's panels cut option names and help at 80 columns.
    rich_markup_mode=None,
)
console = Console(stderr=True)
out = Console()


def _version(value: bool) -> None:
    if value:
        out.print(f"imgedit {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Apply one image edit to thousands of images: manifest -> edit API -> storage."""


@contextlib.contextmanager
def _maybe_emulator(enabled: bool) -> Iterator[str | None]:
    if not enabled:
        yield None
        return
    from pipeline.emulator.process import EmulatorProcess

    with EmulatorProcess() as emulator:
        console.print(f"[dim]emulator serving {emulator.base_url}[/dim]")
        yield emulator.base_url


def _summary_table(summary: dict[str, Any]) -> Table:
    from pipeline.engine.summary import RunSummary

    table = Table(title=f"run {summary['run_id']}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right", overflow="fold")
    for row in RunSummary(**summary).table():
        table.add_row(str(row["metric"]), escape(str(row["value"])))
    return table


def _cannot(what: str, exc: BaseException | str) -> typer.Exit:
    console.print(f"[red bold]{what}:[/] {escape(str(exc))}", highlight=False)
    return typer.Exit(EXIT_CANNOT_RUN)


def _rows(spec_text: str) -> tuple[int, int]:
    """`A:B` (1-based, inclusive) as the range start and end (exclusive)."""
    first, sep, last = spec_text.partition(":")
    try:
        start = int(first) if first.strip() else 1
        end = int(last) + 1 if sep and last.strip() else None
    except ValueError:
        raise typer.BadParameter(f"--rows {spec_text!r}: expected A:B, e.g. 1:100") from None
    if not sep:
        end = start + 1
    if start < 1 or (end is not None and end <= start):
        raise typer.BadParameter(f"--rows {spec_text!r}: rows are 1-based and A <= B")
    return start, end if end is not None else 0


def run(**given: Any) -> None:
    """Run the edit-manifest flow on MANIFEST, writing to --output."""
    manifest, output = given.pop("manifest"), given.pop("output")
    emulator, ids, rows = given.pop("emulator"), given.pop("ids"), given.pop("rows")
    progress_bar = given.pop("progress_bar")
    api_base, where = given["api_base"], given["select_where"]
    formats = choices_of("response_format") or []
    if given["response_format"] not in formats:
        raise _cannot("--response-format", f"must be one of {', '.join(formats)}")
    row_start, row_end = _rows(rows) if rows else (1, 0)
    id_list = [i.strip() for i in ids.split(",") if i.strip()] if ids is not None else []
    if ids is not None and not id_list:
        raise _cannot("--ids", "no id given")
    # Refused here, before Prefect starts: a hostile or mistyped filter, or a missing key,
    # costs nothing and says so at once.
    from pydantic import ValidationError

    from pipeline.engine.client import check_credentials
    from pipeline.engine.options import RunOptions

    try:
        if where is not None:
            from pipeline.manifest.where import parse_where

            parse_where(where)
        if not emulator:
            check_credentials(api_base)
    except ImgEditError as exc:
        raise _cannot("cannot run", exc) from None
    output = _absolute_local(output)
    manifest = _absolute_local(manifest)
    params: dict[str, Any] = {
        **given,
        "manifest": manifest,
        "output": output,
        "select_ids": id_list or None,
        "row_start": row_start,
        "row_end": row_end or None,
    }
    try:
        RunOptions.model_validate(params)
    except ValidationError as exc:
        first = exc.errors()[0]
        where_ = ".".join(str(x) for x in first["loc"])
        raise _cannot("cannot run", f"{where_}: {first['msg']}") from None
    show_progress = sys.stderr.isatty() if progress_bar is None else progress_bar
    state = _run(params, emulator=emulator, api_base=api_base, show_progress=show_progress)
    retry = _retry_command(manifest, output, params, api_base=api_base, emulator=emulator)
    raise typer.Exit(_report(state, retry, given["s3_endpoint_url"]))


_RUN_LEADING = [
    inspect.Parameter(
        "manifest",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=Annotated[
            str, typer.Argument(help="Manifest: local path or s3://, CSV or Parquet")
        ],
    ),
    inspect.Parameter(
        "output",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=Annotated[
            str,
            typer.Option(
                "--output", "-o", help="Output root: a local folder or s3://bucket/prefix"
            ),
        ],
    ),
]
_RUN_TRAILING = [
    inspect.Parameter(
        "ids",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None, typer.Option(help="Only the rows with these ids, comma-separated")
        ],
    ),
    inspect.Parameter(
        "rows",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option(help="Only rows A to B (1-based, inclusive), e.g. 1:100"),
        ],
    ),
    inspect.Parameter(
        "emulator",
        inspect.Parameter.KEYWORD_ONLY,
        default=False,
        annotation=Annotated[
            bool,
            typer.Option(
                help="Start the bundled API emulator on a free loopback port for this run"
            ),
        ],
    ),
    inspect.Parameter(
        "progress_bar",
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            bool | None,
            typer.Option(
                "--progress/--no-progress",
                help="Progress bar  [default: on at a terminal]",
                show_default=False,
            ),
        ],
    ),
]
app.command(epilog=EXIT_CODES)(with_parameters(run, _RUN_LEADING, _RUN_TRAILING))


def _run(
    params: dict[str, Any], *, emulator: bool, api_base: str | None, show_progress: bool
) -> State[Any]:
    from flows.edit_manifest import edit_manifest
    from flows.local_api import LocalApiError, local_prefect_api
    from flows.progress_bar import RunProgressBar

    _RAN["flow"] = True

    # Until the engine takes over Ctrl-C for the run (see pipeline.engine.interrupts), a SIGTERM
    # means what a Ctrl-C means: stop, without a traceback.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with _maybe_emulator(emulator) as emulator_base:
            params["api_base"] = emulator_base or api_base
            with local_prefect_api(lambda m: console.print(f"[dim]{escape(m)}[/dim]")):
                _share_console()
                bar = RunProgressBar(console) if show_progress else contextlib.nullcontext()
                with bar:
                    return asyncio.run(_run_flow(edit_manifest, params))
    except LocalApiError as exc:
        raise _cannot("cannot run", exc) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted before any edit was sent[/]; nothing was paid")
        raise typer.Exit(EXIT_INCOMPLETE) from None


def _share_console() -> None:
    """Prefect's console log lines go through our console, so they print above the progress
    bar instead of breaking it."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler):
                handler.console = console


def _report(state: State[Any], retry: str, endpoint_url: str | None) -> int:
    """Print what the run did and say what to do next; its exit status."""
    if state.is_cancelled():
        data = state.result(raise_on_failure=False)
        if isinstance(data, dict):
            _print_summary(data, retry, endpoint_url)
        console.print(f"[yellow bold]{escape(state.message or 'interrupted')}[/]")
        return EXIT_INCOMPLETE
    if state.is_failed() or state.is_crashed():
        result = state.result(raise_on_failure=False)
        message = str(result) if isinstance(result, BaseException) else state.message
        console.print(f"[red bold]run failed:[/] {escape(str(message))}", highlight=False)
        return EXIT_CANNOT_RUN
    summary: dict[str, Any] = state.result()
    _print_summary(summary, retry, endpoint_url)
    budget = summary["skipped_by_reason"].get("budget", 0)
    if budget:
        console.print(
            f"[yellow]incomplete: {budget} rows were left for the budget[/]; raise --max-cost "
            "and run the same command again to continue"
        )
        return EXIT_INCOMPLETE
    failed = summary["by_status"].get("failed", 0) + summary["by_status"].get("invalid", 0)
    return EXIT_ROWS_FAILED if failed else EXIT_OK


def _print_summary(summary: dict[str, Any], retry: str, endpoint_url: str | None) -> None:
    out.print(_summary_table(summary))
    output = str(summary["output"])
    run_dir = f"{output.rstrip('/')}/runs/{summary['run_id']}"
    failures = _failure_reasons(str(summary["results_uri"]), endpoint_url)
    if failures:
        out.print("[bold]why rows failed[/] (reason: rows, e.g.)")
        for code, count, row, message in failures:
            out.print(
                f"  {escape(code)}: {count}, e.g. row {row}: "
                f"{escape(message[:EXAMPLE_MESSAGE_CHARS])}",
                highlight=False,
            )
    out.print(f"results table: {summary['results_uri']}", highlight=False)
    out.print(f"contact sheet: {run_dir}/contact-sheet.png", highlight=False)
    out.print(f"run log:       {run_dir}/run.log", highlight=False)
    out.print(f"images and sidecars: {output}/images/, {output}/jobs/", highlight=False)
    failed = summary["by_status"].get("failed", 0)
    if failed:
        out.print(f"retry the {failed} failed rows: {retry} --retry-failed-of {summary['run_id']}")


def _failure_reasons(results_uri: str, endpoint_url: str | None) -> list[tuple[str, int, int, str]]:
    """(error code, rows, an example row, its message) of the failed and invalid rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from pipeline.engine.results import read_parquet_bytes
    from pipeline.io.uri import UriReader

    try:
        with UriReader(endpoint_url=endpoint_url) as read:
            table = read_parquet_bytes(read(results_uri))
    except ImgEditError:
        return []
    bad = table.filter(pc.is_in(table.column("status"), pa.array(["failed", "invalid"])))
    reasons: dict[str, tuple[int, int, str]] = {}
    for code, row, message in zip(
        bad.column("error_code").to_pylist(),
        bad.column("row").to_pylist(),
        bad.column("error_message").to_pylist(),
        strict=True,
    ):
        key = str(code or "unknown")
        count, first, text = reasons.get(key, (0, int(row), str(message or "")))
        reasons[key] = (count + 1, first, text)
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1][0])[:TOP_FAILURE_REASONS]
    return [(code, count, row, text) for code, (count, row, text) in ranked]


def _retry_command(
    manifest: str,
    output: str,
    params: dict[str, Any],
    *,
    api_base: str | None,
    emulator: bool,
) -> str:
    """The command line that re-runs the same edit (the caller appends what to select)."""
    parts = ["imgedit", "run", manifest, "--output", output]
    if emulator:
        parts.append("--emulator")
    elif api_base:
        parts += ["--api-base", api_base]
    for option, key in (("--model", "model"), ("--s3-endpoint-url", "s3_endpoint_url")):
        if params.get(key):
            parts += [option, str(params[key])]
    if params.get("concurrency") != DEFAULT_CONCURRENCY:
        parts += ["--concurrency", str(params["concurrency"])]
    if params.get("response_format") != "b64_json":
        parts += ["--response-format", str(params["response_format"])]
    if params.get("allow_private_sources"):
        parts.append("--allow-private-sources")
    if params.get("fixed_concurrency"):
        parts.append("--fixed-concurrency")
    return shlex.join(parts)


async def _run_flow(flow: Any, params: dict[str, Any]) -> State[Any]:
    state: State[Any] = await flow(**params, return_state=True)
    return state


def _absolute_local(uri: str) -> str:
    """Local paths are made absolute so a flow run elsewhere (a worker) means the same place."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


@app.command(epilog="Exit status: 0 every row valid; 1 some rows invalid; 2 unreadable manifest.")
def validate(
    manifest: Annotated[str, typer.Argument(help="Manifest: local path or s3://, CSV or Parquet")],
    sources: Annotated[
        bool,
        typer.Option(
            "--sources/--no-sources",
            help="Also read every source image and mask as a run would (no API call); "
            "--no-sources for a huge remote manifest",
        ),
    ] = True,
    concurrency: Annotated[int, typer.Option(min=1, help="Source reads at once")] = 16,
    allow_private_sources: Annotated[
        bool, typer.Option(help="Also fetch http(s) sources from loopback and private networks")
    ] = False,
    output: Annotated[
        str | None,
        typer.Option(
            "--output", "-o", help="Also say how many rows earlier runs into OUTPUT finished"
        ),
    ] = None,
    s3_endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint URL")] = None,
    progress_bar: Annotated[
        bool | None,
        typer.Option(
            "--progress/--no-progress",
            help="Progress bar  [default: on at a terminal]",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Check against this model's limits; default IMGEDIT_MODEL, else "
            "p-image-edit (a model without a built-in profile is read from --api-base)"
        ),
    ] = None,
    api_base: Annotated[
        str | None,
        typer.Option(help="API base to read a model's schema from; default IMGEDIT_API_BASE"),
    ] = None,
) -> None:
    """Check every row of MANIFEST, and its sources, without calling the API.

    Exit 1 if any row is invalid: a bad cell, or a source or mask that is missing, not an
    image, too large, refused (allowed roots, internal address) or of the wrong size.
    """
    from pipeline.engine.profiles import load_profile
    from pipeline.manifest.open import format_report, validate_manifest

    try:
        profile = load_profile(model, base_url=api_base)
        left = _left_of(_absolute_local(manifest), output, s3_endpoint_url) if output else None
        if sources:
            from pipeline.engine.source_check import validate_with_sources
            from pipeline.io.netguard import source_policy

            show = sys.stderr.isatty() if progress_bar is None else progress_bar
            with _check_progress(show) as on_progress:
                report = validate_with_sources(
                    manifest,
                    endpoint_url=s3_endpoint_url,
                    concurrency=concurrency,
                    policy=source_policy(allow_private_sources),
                    on_progress=on_progress,
                    left=left,
                    profile=profile,
                )
        else:
            report = validate_manifest(
                manifest, endpoint_url=s3_endpoint_url, left=left, profile=profile
            )
    except ImgEditError as exc:
        raise _cannot("manifest error", exc) from None
    out.print(format_report(report), markup=False, highlight=False)
    if report.invalid:
        raise typer.Exit(EXIT_ROWS_FAILED)


def _left_of(manifest: str, output: str, endpoint_url: str | None) -> Callable[[int], bool]:
    """Whether a row is left to edit, judged by earlier runs of MANIFEST into OUTPUT."""
    from pipeline.engine.results import rows_done_before
    from pipeline.io.storage import open_storage
    from pipeline.manifest.row_sets import RowsLeft

    storage = open_storage(_absolute_local(output), endpoint_url=endpoint_url)
    return RowsLeft(None, rows_done_before(storage, manifest))


@contextlib.contextmanager
def _check_progress(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("checking sources"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("sources", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


@app.command()
def reindex(
    output: Annotated[
        str, typer.Argument(help="Output root: a local folder or s3://bucket/prefix")
    ],
    s3_endpoint_url: Annotated[str | None, typer.Option(help="S3 endpoint URL")] = None,
) -> None:
    """Rebuild OUTPUT's done index from its sidecars and clear killed runs' markers and claims.

    Only while no run writes to OUTPUT: a running chunk's marker and claims would go too.
    """
    from pipeline.engine.done_index import rebuild_index
    from pipeline.io.storage import open_storage

    try:
        done = rebuild_index(open_storage(output, endpoint_url=s3_endpoint_url))
    except ImgEditError as exc:
        raise _cannot("cannot reindex", exc) from None
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
    heartbeat: Annotated[
        int,
        typer.Option(
            min=30,
            help="Seconds between flow run heartbeats, as the workers' "
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY: a run silent for 3 of them is marked Crashed",
        ),
    ] = 180,
) -> None:
    """Create or update what every run and worker shares: the API limits, and the automation
    that marks the flow runs of a dead worker host Crashed (so a sharded run restarts them)."""
    from flows.limits import rate_limit_name, setup_limit
    from flows.zombies import ZOMBIE_HEARTBEATS, setup_zombie_automation

    asyncio.run(setup_limit(name, limit, requests_per_minute))
    out.print(f"global concurrency limit {name!r}: {limit} requests in flight")
    if requests_per_minute:
        out.print(f"rate limit {rate_limit_name(name)!r}: {requests_per_minute:g} requests/minute")
    done = asyncio.run(setup_zombie_automation(heartbeat))
    out.print(
        f"zombie automation {done}: a flow run silent for {ZOMBIE_HEARTBEATS * heartbeat} s "
        f"is marked Crashed (workers: PREFECT_FLOWS_HEARTBEAT_FREQUENCY={heartbeat})"
    )


app.command("emulator", help="Serve the bundled edit-API emulator (for tests, demos, benchmarks).")(
    emulator_command
)
register_history_commands(app)
register_models_command(app)
register_export_command(app)


_RAN = {"flow": False}


def main() -> None:
    # Prefect's client reports nothing anywhere unless asked; this keeps offline runs quiet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        app()
    except SystemExit as exc:
        if not _RAN["flow"]:
            raise
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        # After a run, the process ends here without the interpreter's teardown: with the
        # flow's machinery (Prefect's workers, pyarrow's and boto3's threads) loaded, that
        # teardown now and then aborts in C++ ("terminate called without an active
        # exception"), turning a finished run's status into 134. Everything the run
        # promised is stored by now; its logs and events are sent first.
        from flows.local_api import drain_prefect_workers

        drain_prefect_workers()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
