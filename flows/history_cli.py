"""`imgedit runs`, `show`, `status` and `serve`: what happened in an output, read from `runs/`.

Registered on the main app by `register(app)`. Nothing here imports Prefect, and the engine
modules are imported only inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from pipeline.io.storage import Storage
    from pipeline.uses.run_history import FailureGroup, RunDetail, RunInfo

EXIT_CANNOT = 2
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

OutputArg = Annotated[
    str,
    typer.Argument(help="Output root: a local folder or s3://bucket/prefix", show_default=False),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option(help="S3 endpoint URL (MinIO, R2...); default AWS_ENDPOINT_URL_S3"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables")]


def _fail(message: str) -> typer.Exit:
    """One red line on stderr; the caller raises the returned Exit (status 2)."""
    line = " ".join(message.split())
    err.print(f"[red bold]error:[/] {escape(line)}", soft_wrap=True)
    return typer.Exit(EXIT_CANNOT)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """imgedit's own errors (no such output, no runs, unreadable table...) as one red line."""
    from pipeline.errors import ImgEditError

    try:
        yield
    except ImgEditError as exc:
        raise _fail(str(exc)) from None
    except ValueError as exc:  # a run id that is not one, and the like
        raise _fail(str(exc)) from None


def _open(output: str, endpoint_url: str | None) -> Storage:
    from pipeline.uses.run_history import open_output

    return open_output(output, endpoint_url=endpoint_url)


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _took(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _state_style(state: str) -> str:
    from pipeline.uses import run_history as rh

    return {
        rh.STATE_COMPLETE: "green",
        rh.STATE_ROWS_FAILED: "yellow",
        rh.STATE_STOPPED: "red",
        rh.STATE_INTERRUPTED: "yellow",
        rh.STATE_INCOMPLETE: "magenta",
    }.get(state, "")


def _skipped_text(run: RunInfo) -> str:
    total = run.by_status.get("skipped", 0)
    if not run.skipped_by_reason:
        return str(total)
    detail = ", ".join(f"{r} {n}" for r, n in sorted(run.skipped_by_reason.items()))
    return f"{total} ({detail})"


def runs(
    output: OutputArg,
    s3_endpoint_url: EndpointOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List OUTPUT's runs, newest first: state, counts by status, cost, time."""
    from pipeline.errors import HistoryError
    from pipeline.uses.run_history import list_runs

    with _errors():
        storage = _open(output, s3_endpoint_url)
        found = list_runs(storage)
        if not found:
            raise HistoryError(f"no runs under {storage.root_uri}")
    if json_out:
        _echo_json([r.to_dict() for r in found])
        return
    table = Table(title=f"{len(found)} runs of {escape(storage.root_uri)}", title_justify="left")
    for name in ("run", "state", "started (UTC)"):
        table.add_column(name)
    for name in ("took", "rows", "succeeded", "failed", "invalid"):
        table.add_column(name, justify="right")
    table.add_column("skipped")
    table.add_column("cost", justify="right")
    for r in found:
        style = _state_style(r.state)
        table.add_row(
            escape(r.run_id),
            f"[{style}]{escape(r.state)}[/]" if style else escape(r.state),
            _when(r.started_at),
            _took(r.duration_s),
            str(r.rows),
            str(r.by_status.get("succeeded", 0)),
            str(r.failed),
            str(r.by_status.get("invalid", 0)),
            escape(_skipped_text(r)),
            f"{r.cost_usd:.4f} {escape(r.currency)}",
        )
    out.print(table)
    manifests = sorted({r.manifest for r in found if r.manifest})
    for m in manifests:
        out.print(f"manifest: {escape(m)}", soft_wrap=True)


def _detail_table(detail: RunDetail) -> Table:
    run, summary = detail.run, detail.summary or {}
    table = Table(title=f"run {escape(run.run_id)}", show_header=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    style = _state_style(run.state)
    rows: list[tuple[str, str]] = [
        ("state", f"[{style}]{escape(run.state)}[/]" if style else escape(run.state)),
    ]
    if run.stopped_by:
        rows.append(("stopped by", escape(run.stopped_by)))
    rows += [
        ("started (UTC)", _when(run.started_at)),
        ("finished (UTC)", _when(run.finished_at)),
        ("took", _took(run.duration_s)),
        ("manifest", escape(run.manifest or "-")),
        ("rows", str(run.rows)),
    ]
    rows += [(s, str(n)) for s, n in run.by_status.items()]
    rows += [(f"skipped: {escape(r)}", str(n)) for r, n in sorted(run.skipped_by_reason.items())]
    if "images" in summary:
        rows.append(("images", str(summary["images"])))
    rows.append((f"cost ({escape(run.currency)})", f"{run.cost_usd:.4f}"))
    for key, label in (
        ("possible_double_charges", "possible double charges"),
        ("cost_assumed_usd", "cost assumed, not reported"),
        ("distrusted_costs", "costs not trusted"),
        ("claims_waited", "rows that waited on another run"),
        ("abandoned", "requests abandoned unanswered"),
        ("storage_failures", "storage failures"),
    ):
        if summary.get(key):
            rows.append((label, escape(str(summary[key]))))
    for key, label in (("latency_p50_s", "latency p50 (s)"), ("latency_p95_s", "latency p95 (s)")):
        value = summary.get(key)
        if isinstance(value, int | float):
            rows.append((label, f"{value:.3f}"))
    for metric, value in rows:
        table.add_row(metric, value)
    return table


def example_text(group: FailureGroup) -> str:
    """`row 7 (r7): column image: file not found: ...`, without saying the row twice."""
    where = f"row {group.example_row}" + (f" ({group.example_id})" if group.example_id else "")
    message = group.example_message or "-"
    message = message.removeprefix(f"row {group.example_row}: ")
    if group.example_column and f"column {group.example_column}" not in message:
        message = f"column {group.example_column}: {message}"
    return f"{where}: {message}"


def _failures_table(detail: RunDetail) -> Table:
    shown = len(detail.failures)
    more = detail.failure_groups - shown
    title = "failures by error code" + (
        f" (largest {shown} of {detail.failure_groups})" if more else ""
    )
    table = Table(title=title, title_justify="left")
    table.add_column("status")
    table.add_column("error code")
    table.add_column("rows", justify="right")
    table.add_column("example", overflow="fold")
    for g in detail.failures:
        table.add_row(
            escape(g.status), escape(g.error_code or "-"), str(g.count), escape(example_text(g))
        )
    return table


def show(
    output: OutputArg,
    run_id: Annotated[
        str | None, typer.Argument(help="Run id (default: the newest run)", show_default=False)
    ] = None,
    s3_endpoint_url: EndpointOpt = None,
    top: Annotated[int, typer.Option(min=1, help="Failure groups to list")] = 10,
    json_out: JsonOpt = False,
) -> None:
    """One run of OUTPUT: summary, failures by error code with an example, files, retry command."""
    from pipeline.uses.run_history import run_detail

    with _errors():
        detail = run_detail(_open(output, s3_endpoint_url), run_id, top=top)
    if json_out:
        _echo_json(detail.to_dict())
        return
    out.print(_detail_table(detail))
    run = detail.run
    if not run.has_summary:
        source = "its results table" if run.has_results else f"its {run.parts} results parts"
        out.print(
            f"[magenta]no summary: the run was killed, or is still running; counts are from "
            f"{source}[/]"
        )
    if detail.failures:
        out.print(_failures_table(detail))
    files = [
        ("results table", detail.results_uri),
        ("summary", detail.summary_uri),
        ("contact sheet", detail.contact_sheet_uri),
        ("run log", detail.log_uri),
        ("results parts", detail.parts_uri if not run.has_results else None),
    ]
    for label, uri in files:
        if uri:
            out.print(f"{label}: {escape(uri)}", soft_wrap=True)
    if detail.retry_command:
        out.print(f"retry the {run.failed} failed rows:")
        out.print(detail.retry_command, markup=False, soft_wrap=True)


def status(
    output: OutputArg,
    manifest: Annotated[
        str | None,
        typer.Argument(
            help="The manifest: its rows in no run count as never_run", show_default=False
        ),
    ] = None,
    write: Annotated[
        str | None,
        typer.Option("--write", help="Also write the row states as Parquet to this path"),
    ] = None,
    write_default: Annotated[
        bool, typer.Option("--write-default", help="Also write them to OUTPUT/status.parquet")
    ] = False,
    s3_endpoint_url: EndpointOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Rows of OUTPUT by their latest state across every run (succeeded if any run did it)."""
    from pipeline.errors import HistoryError
    from pipeline.uses import run_history as rh

    if write and write_default:
        raise _fail("give --write PATH or --write-default, not both")
    with _errors():
        storage = _open(output, s3_endpoint_url)
        found = rh.list_runs(storage)
        if not found and manifest is None:
            raise HistoryError(f"no runs under {storage.root_uri}")
        if manifest is not None and "://" not in manifest:
            manifest = str(Path(manifest).expanduser().resolve())
        table = rh.row_status(storage, manifest, endpoint_url=s3_endpoint_url)
        written = None
        if write or write_default:
            written = rh.write_status(storage, table, write, endpoint_url=s3_endpoint_url)
    counts = rh.state_counts(table)
    manifests = sorted({r.manifest for r in found if r.manifest})
    others = [m for m in manifests if manifest is not None and m != manifest]
    if json_out:
        _echo_json(
            {
                "output": storage.root_uri,
                "manifest": manifest,
                "rows": table.num_rows,
                "runs": len(found),
                "states": counts,
                "manifests": manifests,
                "written": written,
            }
        )
        return
    out.print(
        f"{table.num_rows} rows of {escape(storage.root_uri)} by latest state:", soft_wrap=True
    )
    view = Table()
    view.add_column("state")
    view.add_column("rows", justify="right")
    for name, n in counts.items():
        view.add_row(escape(name), str(n))
    out.print(view)
    out.print(f"from {len(found)} runs")
    if others or (manifest is None and len(manifests) > 1):
        err.print(
            "[yellow]runs of more than one manifest write here; rows are matched by number: "
            + escape(", ".join(manifests))
            + "[/]"
        )
    if written:
        out.print(f"written: {escape(written)}", soft_wrap=True)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    name = host.strip("[]")
    family = socket.AF_INET6 if ":" in name else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((name, port))
    except OSError:
        sock.close()
        raise
    return sock


def serve(
    output: OutputArg,
    host: Annotated[
        str, typer.Option(help="Address to listen on (loopback only, unless --public)")
    ] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on")] = DEFAULT_PORT,
    public: Annotated[
        bool,
        typer.Option(help="Allow a non-loopback --host: anyone who can reach it sees the output"),
    ] = False,
    s3_endpoint_url: EndpointOpt = None,
) -> None:
    """Serve a read-only web page of OUTPUT's runs with before/after galleries (Ctrl-C stops)."""
    if not _is_loopback(host) and not public:
        raise _fail(
            f"refusing to listen on {host}: the page has no login, so anyone who can reach "
            f"{host}:{port} could browse this output's images, prompts and errors. Keep the "
            "default 127.0.0.1 (e.g. behind an SSH tunnel), or add --public if that is what "
            "you want"
        )
    with _errors():
        storage = _open(output, s3_endpoint_url)
    from flows.serve import create_app, run_server

    try:
        sock = _bind(host, port)
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    bound = sock.getsockname()[1]
    app = create_app(storage, endpoint_url=s3_endpoint_url, host=host, public=public)
    shown = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    err.print(
        f"serving {escape(storage.root_uri)} read-only at http://{shown}:{bound}/ (Ctrl-C stops)",
        soft_wrap=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        run_server(app, sock)


READ_EXIT_CODES = "Exit status: 0 done; 2 no such output, no runs in it, or no such run."
SERVE_EXIT_CODES = (
    "Exit status: 0 stopped with Ctrl-C; 2 no such output, a non-loopback --host without "
    "--public, or the port is taken."
)


def register(app: typer.Typer) -> None:
    """Add `runs`, `show`, `status` and `serve` to the `imgedit` app."""
    app.command("runs", epilog=READ_EXIT_CODES)(runs)
    app.command("show", epilog=READ_EXIT_CODES)(show)
    app.command("status", epilog=READ_EXIT_CODES)(status)
    app.command("serve", epilog=SERVE_EXIT_CODES)(serve)


__all__ = ["register", "runs", "serve", "show", "status"]
