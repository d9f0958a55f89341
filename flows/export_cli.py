"""`imgedit export`: a run's results as a training-ready dataset (WebDataset or Parquet).

Registered on the main app by `register(app)`. Nothing here imports Prefect, and the export
package is imported only inside the command, so `--help` stays fast.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_CANNOT = 2
EXPORT_EXIT_CODES = (
    "Exit status: 0 every succeeded row exported; 1 some succeeded rows could not be "
    "(missing or unreadable images: counted, the rest exported); 2 nothing exported (no such "
    "output or run, a bad option, a destination that cannot be written)."
)

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class Format(StrEnum):
    """The choices of --format (the values of pipeline.uses.export.ExportFormat)."""

    webdataset = "webdataset"
    parquet = "parquet"


def export(
    output: Annotated[
        str,
        typer.Argument(
            help="Output root of the run: a local folder or s3://bucket/prefix",
            show_default=False,
        ),
    ],
    to: Annotated[
        str,
        typer.Option("--to", help="Where the dataset goes: a local folder or s3://bucket/prefix"),
    ],
    fmt: Annotated[
        Format, typer.Option("--format", help="webdataset (tar shards) or parquet")
    ] = Format.webdataset,
    run_id: Annotated[
        str | None, typer.Option("--run", help="Run id (default: the newest run)")
    ] = None,
    shard_size: Annotated[
        str,
        typer.Option(
            help="Largest shard (tar) or Parquet file, in bytes: 268435456, 256MiB, 1GB..."
        ),
    ] = "256MiB",
    with_sources: Annotated[
        bool,
        typer.Option(
            help="Also the source image(s): <key>.src.<ext> in shards, source_image in Parquet"
        ),
    ] = False,
    allow_private_sources: Annotated[
        bool,
        typer.Option(help="With --with-sources: also fetch http(s) sources from private networks"),
    ] = False,
    s3_endpoint_url: Annotated[
        str | None,
        typer.Option(help="S3 endpoint URL (MinIO, R2...); default AWS_ENDPOINT_URL_S3"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
) -> None:
    """Export one run of OUTPUT's succeeded rows as a dataset: one sample per result image.

    webdataset: tar shards (shard-000000.tar...) of <key>.<ext> (the stored bytes) and
    <key>.json (the row's metadata). parquet: part-000000.parquet... with an `image` column
    that Hugging Face datasets reads as an Image. Both write index.json (files, samples, bytes,
    sha256) last; re-running replaces the export whole.
    """
    from pipeline.errors import ImgEditError
    from pipeline.uses.export import ExportFormat, ExportOptions, export_run, parse_size

    try:
        options = ExportOptions(
            format=ExportFormat(fmt.value),
            to=to,
            shard_bytes=parse_size(shard_size),
            with_sources=with_sources,
            allow_private_sources=allow_private_sources,
        )
        report = export_run(output, run_id, options, endpoint_url=s3_endpoint_url)
    except (ImgEditError, ValueError) as exc:
        line = " ".join(str(exc).split())
        err.print(f"[red bold]cannot export:[/] {escape(line)}", soft_wrap=True)
        raise typer.Exit(EXIT_CANNOT) from None
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for text in report.lines():
            out.print(escape(text), soft_wrap=True)
    raise typer.Exit(EXIT_ROWS_FAILED if report.errors else EXIT_OK)


def register(app: typer.Typer) -> None:
    """Add `export` to the `imgedit` app."""
    app.command("export", epilog=EXPORT_EXIT_CODES)(export)


__all__ = ["Format", "export", "register"]
