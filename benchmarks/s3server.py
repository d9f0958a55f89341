"""An S3 endpoint on loopback for the benchmark: moto's server in this process, pre-populated.

`python -m benchmarks.s3server --port P [--populate BUCKET/PREFIX=ROWS]... --sources DIR`
serves until its stdin closes (the benchmark holds the other end), so it never outlives it.
Pre-populated "done" sidecars go straight into moto's in-memory backend: through HTTP,
100k PUTs would take minutes of moto's CPU before anything is measured.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer

from pipeline import layout

from .data import done_job_keys, sidecar_body

READY = "S3SERVER READY"
REGION = "us-east-1"


def populate(target: str, rows: int, sources: list[Path]) -> float:
    """Sidecars of the first `rows` benchmark jobs under s3://`target`; returns seconds taken."""
    started = time.perf_counter()
    bucket, _, prefix = target.partition("/")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    if bucket not in backend.buckets:
        backend.create_bucket(bucket, REGION)
    root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    for key in done_job_keys(sources, rows):
        backend.put_object(
            bucket, root + layout.sidecar_key(key), sidecar_body(key), disable_notification=True
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--populate", action="append", default=[], metavar="BUCKET/PREFIX=ROWS")
    parser.add_argument("--sources", type=Path)
    args = parser.parse_args()
    # One access-log line per request would cost more than some requests.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    timings = []
    if args.populate:
        sources = sorted(args.sources.glob("source-*.jpg"), key=lambda p: int(p.stem.split("-")[1]))
        for spec in args.populate:
            target, _, rows = spec.rpartition("=")
            timings.append(f"{target}:{populate(target, int(rows), sources):.1f}s")
    print(READY, " ".join(timings), flush=True)
    try:
        sys.stdin.read()  # until the benchmark closes our stdin (or dies)
    finally:
        os._exit(0)  # werkzeug threads would keep a normal exit waiting


if __name__ == "__main__":
    main()
