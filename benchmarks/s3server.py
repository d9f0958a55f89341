"""An S3 endpoint on loopback for the benchmark: moto's server in this process, pre-populated.

`python -m benchmarks.s3server --port P [--populate BUCKET/PREFIX=ROWS[:noindex]]... --sources DIR`
serves until its stdin closes (the benchmark holds the other end), so it never outlives it.
Pre-populated "done" jobs go straight into moto's in-memory backend: through HTTP, 100k PUTs
would take minutes of moto's CPU before anything is measured. Each gets its sidecar and, as a
finished run leaves them, a done-index segment per 1000 jobs; `:noindex` leaves out the index
(an output written before it existed).
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

from pipeline.constants import DEFAULT_CHUNK_SIZE
from pipeline.engine import done_index, layout

from .data import done_job_keys, sidecar_body

READY = "S3SERVER READY"
REGION = "us-east-1"


def populate(target: str, rows: int, sources: list[Path], *, index: bool = True) -> float:
    """The first `rows` benchmark jobs, done, under s3://`target`; returns seconds taken."""
    started = time.perf_counter()
    bucket, _, prefix = target.partition("/")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    if bucket not in backend.buckets:
        backend.create_bucket(bucket, REGION)
    root = f"{prefix.strip('/')}/" if prefix.strip("/") else ""

    def put(key: str, data: bytes) -> None:
        backend.put_object(bucket, root + key, data, disable_notification=True)

    keys = list(done_job_keys(sources, rows))
    for key in keys:
        put(layout.sidecar_key(key), sidecar_body(key))
    if index:
        for chunk, first in enumerate(range(0, len(keys), DEFAULT_CHUNK_SIZE)):
            segment = done_index.segment_bytes(keys[first : first + DEFAULT_CHUNK_SIZE])
            put(done_index.chunk_segment_key("populate", chunk), segment)
        put(done_index.ROOT_KEY, b'{"version": 1, "from": "benchmark"}')
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--populate", action="append", default=[], metavar="BUCKET/PREFIX=ROWS[:noindex]"
    )
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
            target, _, count = spec.rpartition("=")
            rows, _, flag = count.partition(":")
            took = populate(target, int(rows), sources, index=flag != "noindex")
            timings.append(f"{target}:{took:.1f}s")
    print(READY, " ".join(timings), flush=True)
    try:
        sys.stdin.read()  # until the benchmark closes our stdin (or dies)
    finally:
        os._exit(0)  # werkzeug threads would keep a normal exit waiting


if __name__ == "__main__":
    main()
