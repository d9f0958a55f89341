"""`imgedit serve`: a read-only local web page of an output's runs and before/after galleries.

Plain HTML and CSS from this process alone (no JavaScript, no CDN: nothing leaves the
machine). Every user string (ids, prompts, errors, URIs) is escaped, and a Content Security
Policy forbids scripts anyway. Images come through the app only:

- `/image?key=images/ab/<job-key>-0.png`: a result image of the output (a JPEG thumbnail of
  at most 256 px, or `full=1` for the stored bytes). Only keys of that exact shape under
  `images/` are served; anything else (`..`, absolute paths, `jobs/...`) is a 404.
- `/source?run=<id>&row=<n>`: a thumbnail of the row's first source, as its run's results
  table names it, when it is a local file or an object in the output's own S3 bucket. An
  http(s) source is never fetched by the server: the page links to it instead.

Thumbnails are made with Pillow and kept in a small in-memory LRU cache. Requests whose Host
is not the address served (DNS rebinding) are refused unless the server is `--public`.
"""

from __future__ import annotations

import html
import io
import os
import re
import socket
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import urlencode, urlsplit
from urllib.request import url2pathname

import pyarrow as pa
import pyarrow.compute as pc
import uvicorn
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from PIL import Image, ImageOps

from flows.history_cli import example_text
from pipeline.engine import layout
from pipeline.engine.results import STATUSES
from pipeline.errors import HistoryError, ImgEditError, StorageError
from pipeline.io.storage import S3Storage, Storage, check_key
from pipeline.io.uri import UriReader
from pipeline.uses import run_history as rh

__all__ = ["PAGE_SIZE", "THUMB_PX", "OutputSite", "create_app", "make_server", "run_server"]

PAGE_SIZE: Final = 50
THUMB_PX: Final = 256
THUMB_CACHE_ENTRIES: Final = 1024
TABLE_CACHE_RUNS: Final = 4
# Larger images are not thumbnailed (result images are capped at 50 MiB anyway).
MAX_IMAGE_BYTES: Final = 64 * 2**20
MAX_THUMB_SOURCE_PIXELS: Final = 64_000_000
JPEG_QUALITY: Final = 82
# A longer run log is shown from its end.
MAX_LOG_BYTES: Final = 4 * 2**20
PROMPT_CHARS: Final = 400
ERROR_CHARS: Final = 300

GALLERY_COLUMNS: Final = (
    "row",
    "id",
    "status",
    "reason",
    "prompt",
    "seed",
    "source_uris",
    "output_uris",
    "error_code",
    "error_message",
    "error_column",
)
IMAGE_TYPES: Final = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "avif": "image/avif",
}
_IMAGE_KEY_RE = re.compile(r"images/[0-9a-f]{2}/[0-9a-f]{8,64}-[0-9]+\.([a-z0-9]{1,5})")
LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}
THUMB_HEADERS: Final = {"Cache-Control": "private, max-age=3600"}

CSS: Final = """
:root { color-scheme: light; --ink: #1d1d1f; --muted: #6b6b70; --line: #e3e3e6;
  --ok: #1a7f37; --bad: #b42318; --warn: #9a6700; --skip: #57606a; --bg: #fafafa; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
  background: var(--bg); margin: 0; padding: 24px 32px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 28px 0 8px; }
a { color: #0b57d0; text-decoration: none; } a:hover { text-decoration: underline; }
.muted { color: var(--muted); }
table { border-collapse: collapse; background: #fff; border: 1px solid var(--line); }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; }
th { background: #f3f3f5; font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.state, .status { font-weight: 600; white-space: nowrap; }
.s-complete, .s-succeeded { color: var(--ok); } .s-failed, .s-stopped { color: var(--bad); }
.s-rows-failed, .s-invalid, .s-interrupted { color: var(--warn); }
.s-skipped, .s-incomplete { color: var(--skip); }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 4px 16px;
  margin: 12px 0; } dl.summary dt { color: var(--muted); } dl.summary dd { margin: 0; }
.filters a, .filters span { display: inline-block; padding: 3px 10px; margin-right: 6px;
  border: 1px solid var(--line); border-radius: 12px; background: #fff; }
.filters .current { background: var(--ink); color: #fff; border-color: var(--ink); }
.pager { margin: 12px 0; } .pager a, .pager span { margin-right: 12px; }
table.gallery td.img { width: 180px; text-align: center; }
table.gallery img { max-width: 170px; max-height: 170px; border: 1px solid var(--line);
  background: #eee; }
td.prompt { max-width: 420px; } td.error { max-width: 360px; color: var(--bad); }
pre { background: #fff; border: 1px solid var(--line); padding: 8px 12px; overflow-x: auto; }
.note { color: var(--muted); font-size: 12px; }
table.runs td { white-space: nowrap; } table.runs td.manifest { white-space: normal; }
"""


def e(value: object) -> str:
    """`value` as HTML text (quotes too, so it is safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _cut(text: str | None, limit: int) -> str:
    return rh.cut(text, limit) or ""


class _LRU:
    """A small thread-safe least-recently-used cache."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any | None:
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)


def thumbnail(data: bytes, px: int = THUMB_PX) -> bytes:
    """A JPEG of at most `px` x `px` of an image's bytes; ValueError when they are not one."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_THUMB_SOURCE_PIXELS:
                raise ValueError(f"image too large to thumbnail: {im.width}x{im.height}")
            im.draft("RGB", (px, px))
            shown = ImageOps.exif_transpose(im)
            shown.thumbnail((px, px))
            if shown.mode in ("RGBA", "LA", "PA") or "transparency" in shown.info:
                rgba = shown.convert("RGBA")
                backdrop = Image.new("RGBA", rgba.size, (238, 238, 238, 255))
                shown = Image.alpha_composite(backdrop, rgba)
            buf = io.BytesIO()
            shown.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
            return buf.getvalue()
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not an image: {exc}") from exc


def image_key(key: str) -> tuple[str, str] | None:
    """`(key, media type)` when `key` is a result image key of this output's layout, else None."""
    try:
        check_key(key)
    except (StorageError, ValueError):
        return None
    m = _IMAGE_KEY_RE.fullmatch(key)
    if m is None or m.group(1) not in IMAGE_TYPES:
        return None
    return key, IMAGE_TYPES[m.group(1)]


class OutputSite:
    """What the pages read: an output's runs, run tables (cached when final), thumbnails."""

    def __init__(
        self,
        storage: Storage,
        *,
        endpoint_url: str | None = None,
        page_size: int = PAGE_SIZE,
        thumb_px: int = THUMB_PX,
    ) -> None:
        self.storage = storage
        self.page_size = page_size
        self.thumb_px = thumb_px
        self._tables = _LRU(TABLE_CACHE_RUNS)
        self._thumbs = _LRU(THUMB_CACHE_ENTRIES)
        self._reader = UriReader(endpoint_url=endpoint_url, max_bytes=MAX_IMAGE_BYTES)
        self._bucket = storage.bucket if isinstance(storage, S3Storage) else None

    def run_table(self, run_id: str) -> pa.Table:
        """The run's rows (GALLERY_COLUMNS); kept once its results table exists (final)."""
        cached = self._tables.get(run_id)
        if isinstance(cached, pa.Table):
            return cached
        final = self.storage.exists(layout.results_key(run_id))  # before reading: no race
        table = rh.run_rows(self.storage, run_id, GALLERY_COLUMNS)
        if final:
            self._tables.put(run_id, table)
        return table

    def _thumb(self, cache_key: tuple[str, str], read: Callable[[], bytes]) -> bytes:
        cached = self._thumbs.get(cache_key)
        if isinstance(cached, bytes):
            return cached
        data = thumbnail(read(), self.thumb_px)
        self._thumbs.put(cache_key, data)
        return data

    def result_thumbnail(self, key: str) -> bytes:
        return self._thumb(("image", key), lambda: self.storage.get_bytes(key))

    def source_allowed(self, uri: str | None) -> bool:
        """A source the server may read: a local file, or an object in the output's bucket."""
        if not uri:
            return False
        if uri.startswith("s3://"):
            bucket = uri[len("s3://") :].split("/", 1)[0]
            return self._bucket is not None and bucket == self._bucket
        if uri.startswith("file:"):
            return True
        return "://" not in uri and uri.startswith("/")

    def source_present(self, uri: str) -> bool:
        """Whether an allowed source is there to show (local files are checked; S3 is not)."""
        if not self.source_allowed(uri):
            return False
        if uri.startswith("s3://"):
            return True
        path = url2pathname(urlsplit(uri).path) if uri.startswith("file:") else uri
        return os.path.isfile(path)

    def source_thumbnail(self, uri: str) -> bytes:
        # Only regular files: a device or FIFO (`/dev/zero`) named in a manifest must not
        # make the server read forever.
        if not self.source_present(uri):
            raise ValueError("not a source this server reads")
        return self._thumb(("source", uri), lambda: self._reader.read(uri))


# --- pages -------------------------------------------------------------------------------------


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{e(title)}</title><style>{CSS}</style></head>"
        f"<body>{body}</body></html>"
    )


def _state_class(state: str) -> str:
    return "s-" + re.sub(r"[^a-z]+", "-", state.lower()).strip("-").split("-no-")[0]


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _took(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _url(path: str, **params: object) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{path}?{query}" if query else path


def _index(site: OutputSite) -> HTMLResponse:
    runs = rh.list_runs(site.storage)
    head = (
        f"<h1>imgedit runs</h1><p class=muted>{e(site.storage.root_uri)} &middot; "
        f"{len(runs)} runs &middot; read-only</p>"
    )
    if not runs:
        return _page("imgedit runs", head + "<p>No runs under this output yet.</p>")
    cells = []
    for r in runs:
        skipped = ", ".join(f"{e(k)} {n}" for k, n in sorted(r.skipped_by_reason.items()))
        cells.append(
            f'<tr class=run data-run="{e(r.run_id)}">'
            f'<td><a href="{e("/runs/" + r.run_id)}">{e(r.run_id)}</a></td>'
            f'<td class="state {_state_class(r.state)}">{e(r.state)}</td>'
            f"<td>{_when(r.started_at)}</td><td class=num>{_took(r.duration_s)}</td>"
            f"<td class=num>{r.rows}</td>"
            f"<td class=num>{r.by_status.get('succeeded', 0)}</td>"
            f"<td class=num>{r.failed}</td>"
            f"<td class=num>{r.by_status.get('invalid', 0)}</td>"
            f"<td class=num>{r.by_status.get('skipped', 0)}"
            f"{f' <span class=muted>({skipped})</span>' if skipped else ''}</td>"
            f"<td class=num>{r.cost_usd:.4f} {e(r.currency)}</td>"
            f"<td class='manifest muted'>{e(r.manifest or '-')}</td></tr>"
        )
    table = (
        "<table class=runs><thead><tr><th>run</th><th>state</th><th>started (UTC)</th>"
        "<th class=num>took</th><th class=num>rows</th><th class=num>succeeded</th>"
        "<th class=num>failed</th><th class=num>invalid</th><th class=num>skipped</th>"
        "<th class=num>cost</th><th>manifest</th></tr></thead><tbody>"
        + "".join(cells)
        + "</tbody></table>"
    )
    return _page("imgedit runs", head + table)


def _summary_block(detail: rh.RunDetail) -> str:
    run, summary = detail.run, detail.summary or {}
    items: list[tuple[str, str]] = [
        ("state", f'<span class="state {_state_class(run.state)}">{e(run.state)}</span>'),
    ]
    if run.stopped_by:
        items.append(("stopped by", e(run.stopped_by)))
    items += [
        ("started (UTC)", _when(run.started_at)),
        ("took", _took(run.duration_s)),
        ("manifest", e(run.manifest or "-")),
        ("rows", str(run.rows)),
        (
            "by status",
            ", ".join(f"{e(s)} {n}" for s, n in run.by_status.items()),
        ),
    ]
    if run.skipped_by_reason:
        items.append(
            (
                "skipped",
                ", ".join(f"{e(k)} {n}" for k, n in sorted(run.skipped_by_reason.items())),
            )
        )
    if "images" in summary:
        items.append(("images", e(summary["images"])))
    items.append(("cost", f"{run.cost_usd:.4f} {e(run.currency)}"))
    if summary.get("possible_double_charges"):
        items.append(("possible double charges", e(summary["possible_double_charges"])))
    files = [("results table", detail.results_uri), ("summary", detail.summary_uri)]
    items += [(label, f"<code>{e(uri)}</code>") for label, uri in files if uri]
    if detail.log_uri:
        link = e(f"/runs/{run.run_id}/run.log")
        items.append(("run log", f'<a href="{link}">run.log</a> <code>{e(detail.log_uri)}</code>'))
    if detail.contact_sheet_uri:
        link = e(f"/runs/{run.run_id}/contact-sheet.png")
        items.append(("contact sheet", f'<a href="{link}">contact-sheet.png</a>'))
    body = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in items)
    note = ""
    if not run.has_summary:
        note = (
            "<p class=note>No summary: the run was killed, or is still running; "
            "counts are from what it wrote so far.</p>"
        )
    return f"<dl class=summary>{body}</dl>{note}"


def _failures_block(detail: rh.RunDetail) -> str:
    if not detail.failures:
        return ""
    rows = "".join(
        f"<tr><td class='status s-{e(g.status)}'>{e(g.status)}</td>"
        f"<td><code>{e(g.error_code or '-')}</code></td><td class=num>{g.count}</td>"
        f"<td>{e(example_text(g))}</td></tr>"
        for g in detail.failures
    )
    more = detail.failure_groups - len(detail.failures)
    extra = f"<p class=note>{more} more groups not shown.</p>" if more > 0 else ""
    retry = ""
    if detail.retry_command:
        retry = f"<p>Retry the failed rows:</p><pre class=retry>{e(detail.retry_command)}</pre>"
    return (
        "<h2>Failures by error code</h2><table class=failures><thead><tr><th>status</th>"
        "<th>error code</th><th class=num>rows</th><th>example</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{extra}{retry}"
    )


def _source_cell(site: OutputSite, run_id: str, row: dict[str, Any]) -> str:
    sources: Sequence[str] = row.get("source_uris") or ()
    if not sources:
        return "<td class=img><span class=muted>-</span></td>"
    uri = sources[0]
    if uri.startswith(("http://", "https://")):
        return (
            f'<td class=img><a class=remote href="{e(uri)}" rel="noreferrer noopener" '
            f'target=_blank title="{e(uri)}">remote source</a></td>'
        )
    if site.source_allowed(uri):
        if not site.source_present(uri):
            return f'<td class=img><span class=muted title="{e(uri)}">missing</span></td>'
        src = _url("/source", run=run_id, row=row["row"])
        return (
            f'<td class=img><img class=source src="{e(src)}" alt="source of row {row["row"]}" '
            f'title="{e(uri)}"></td>'
        )
    return f'<td class=img><span class=muted title="{e(uri)}">not shown</span></td>'


def _result_cell(row: dict[str, Any]) -> str:
    outputs: Sequence[str] = row.get("output_uris") or ()
    key = rh.image_key_of_uri(outputs[0]) if outputs else None
    if key is None or image_key(key) is None:
        return "<td class=img><span class=muted>-</span></td>"
    more = f"<br><span class=note>+{len(outputs) - 1} more</span>" if len(outputs) > 1 else ""
    return (
        f'<td class=img><a href="{e(_url("/image", key=key, full=1))}">'
        f'<img class=result src="{e(_url("/image", key=key))}" '
        f'alt="result of row {row["row"]}"></a>{more}</td>'
    )


def _gallery_row(site: OutputSite, run_id: str, row: dict[str, Any]) -> str:
    status = str(row["status"])
    reason = f"<br><span class=muted>{e(row['reason'])}</span>" if row.get("reason") else ""
    error = ""
    if row.get("error_code") or row.get("error_message"):
        column = f" [{e(row['error_column'])}]" if row.get("error_column") else ""
        error = (
            f"<code>{e(row.get('error_code') or '')}</code>{column} "
            f"{e(_cut(row.get('error_message'), ERROR_CHARS))}"
        )
    return (
        f'<tr class="row status-{e(status)}" data-row="{row["row"]}">'
        f"<td class=num>{row['row']}</td><td>{e(row.get('id') or '-')}</td>"
        f'<td class="status s-{e(status)}">{e(status)}{reason}</td>'
        f"{_source_cell(site, run_id, row)}{_result_cell(row)}"
        f"<td class=prompt>{e(_cut(row.get('prompt'), PROMPT_CHARS))}</td>"
        f"<td class=num>{e(row.get('seed') if row.get('seed') is not None else '-')}</td>"
        f"<td class=error>{error}</td></tr>"
    )


def _run_page(site: OutputSite, run_id: str, status: str | None, page: int) -> HTMLResponse:
    table = site.run_table(run_id)
    detail = rh.run_detail(site.storage, run_id, table=table)
    counts = {
        str(r["values"]): int(r["counts"])
        for r in pc.value_counts(table.column("status")).to_pylist()
    }
    chosen = table if status is None else table.filter(pc.equal(table.column("status"), status))
    total = chosen.num_rows
    pages = max(1, -(-total // site.page_size))
    page = min(page, pages)
    rows = chosen.slice((page - 1) * site.page_size, site.page_size).to_pylist()
    base = f"/runs/{run_id}"

    def link(label: str, value: str | None, n: int) -> str:
        text = f"{e(label)} ({n})"
        if value == status:
            return f"<span class=current>{text}</span>"
        return f'<a href="{e(_url(base, status=value))}">{text}</a>'

    filters = link("all", None, table.num_rows) + "".join(
        link(s, s, counts.get(s, 0)) for s in STATUSES if counts.get(s, 0) or s == status
    )
    pager = [f"<span>page {page} of {pages} &middot; {total} rows</span>"]
    if page > 1:
        pager.append(
            f'<a rel=prev href="{e(_url(base, status=status, page=page - 1))}">previous</a>'
        )
    if page < pages:
        pager.append(f'<a rel=next href="{e(_url(base, status=status, page=page + 1))}">next</a>')
    gallery = (
        "<table class=gallery><thead><tr><th class=num>row</th><th>id</th><th>status</th>"
        "<th>source</th><th>result</th><th>prompt</th><th class=num>seed</th><th>error</th>"
        "</tr></thead><tbody>"
        + "".join(_gallery_row(site, run_id, r) for r in rows)
        + "</tbody></table>"
    )
    body = (
        f'<p><a href="/">&larr; all runs</a></p><h1>run {e(run_id)}</h1>'
        f"<p class=muted>{e(site.storage.root_uri)}</p>"
        f"{_summary_block(detail)}{_failures_block(detail)}"
        f"<h2>Rows</h2><p class=filters>{filters}</p>"
        f"<p class=pager>{' '.join(pager)}</p>{gallery}"
        f"<p class=pager>{' '.join(pager)}</p>"
    )
    return _page(f"run {run_id}", body)


# --- the app -----------------------------------------------------------------------------------


def _checked_run_id(run_id: str) -> str:
    try:
        return layout.check_run_id(run_id)
    except ValueError:
        raise HTTPException(404, "no such run") from None


def create_app(
    storage: Storage,
    *,
    endpoint_url: str | None = None,
    host: str = "127.0.0.1",
    public: bool = False,
    page_size: int = PAGE_SIZE,
) -> FastAPI:
    """The read-only app over `storage`. Unless `public`, only Host headers naming `host` or
    a loopback name are answered (a page elsewhere cannot reach it through DNS rebinding)."""
    site = OutputSite(storage, endpoint_url=endpoint_url, page_size=page_size)
    allowed = None if public else {*LOOPBACK_NAMES, host.strip("[]").lower()}
    app = FastAPI(title="imgedit output", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.site = site

    @app.middleware("http")
    async def guard(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if allowed is not None:
            name = urlsplit("//" + request.headers.get("host", "")).hostname
            if name is None or name.lower() not in allowed:
                return PlainTextResponse("unknown host", status_code=400)
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return _index(site)

    @app.get("/runs/{run_id}", response_class=HTMLResponse)
    def run_page(
        run_id: str,
        status: str | None = None,
        page: int = Query(1, ge=1),
    ) -> HTMLResponse:
        _checked_run_id(run_id)
        if status in ("", "all"):
            status = None
        if status is not None and status not in STATUSES:
            raise HTTPException(400, "status must be one of " + ", ".join(STATUSES))
        try:
            return _run_page(site, run_id, status, page)
        except HistoryError:
            raise HTTPException(404, "no such run") from None

    @app.get("/runs/{run_id}/contact-sheet.png")
    def contact_sheet(run_id: str) -> Response:
        key = layout.contact_sheet_key(_checked_run_id(run_id))
        try:
            data = storage.get_bytes(key)
        except ImgEditError:
            raise HTTPException(404, "no contact sheet") from None
        return Response(data, media_type="image/png", headers=THUMB_HEADERS)

    @app.get("/runs/{run_id}/run.log")
    def run_log(run_id: str) -> Response:
        key = layout.run_prefix(_checked_run_id(run_id)) + rh.LOG_NAME
        try:
            data = storage.get_bytes(key)
        except ImgEditError:
            raise HTTPException(404, "no run log") from None
        if len(data) > MAX_LOG_BYTES:
            data = b"[... cut: the log's last part only ...]\n" + data[-MAX_LOG_BYTES:]
        return PlainTextResponse(data.decode("utf-8", errors="replace"))

    @app.get("/image")
    def image(key: str = "", full: bool = False) -> Response:
        checked = image_key(key)
        if checked is None:
            raise HTTPException(404, "not a result image")
        try:
            if full:
                return Response(
                    storage.get_bytes(checked[0]), media_type=checked[1], headers=THUMB_HEADERS
                )
            data = site.result_thumbnail(checked[0])
        except (ImgEditError, ValueError):
            raise HTTPException(404, "no such image") from None
        return Response(data, media_type="image/jpeg", headers=THUMB_HEADERS)

    @app.get("/source")
    def source(run: str = "", row: int = 0) -> Response:
        run_id = _checked_run_id(run)
        try:
            table = site.run_table(run_id)
        except HistoryError:
            raise HTTPException(404, "no such run") from None
        match = table.filter(pc.equal(table.column("row"), row)).column("source_uris")
        uris = match.to_pylist()[0] if len(match) else None
        if not uris or not site.source_allowed(uris[0]):
            raise HTTPException(404, "no source shown for this row")
        try:
            data = site.source_thumbnail(uris[0])
        except (ImgEditError, ValueError):
            raise HTTPException(404, "source not readable") from None
        return Response(data, media_type="image/jpeg", headers=THUMB_HEADERS)

    return app


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> uvicorn.Server:
    """A quiet uvicorn server for `app` (no access log, no websockets, no lifespan)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        ws="none",
        server_header=False,
        proxy_headers=False,
    )
    return uvicorn.Server(config)


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on an already bound socket until Ctrl-C / SIGTERM."""
    host, port = sock.getsockname()[:2]
    server = make_server(app, host, port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
