"""Claims: each job is edited by one run at a time, across runs, shards and hosts.

Before a run pays for a job it creates the job's claim, `claims/<k[:2]>/<job-key>.json`, with
a conditional write (S3 `If-None-Match: *`, which AWS, MinIO, R2 and moto honour; a local
folder creates it atomically under a lock). Creating it is the right to edit the job. Then:

- the holder checks the job's sidecar once (another run may have finished it after this run
  read the done index) and edits only if it is missing;
- the holder renews its claims every `lease_s / 3` (a conditional overwrite on the claim's
  ETag) while it works, and deletes a claim once the job's sidecar is indexed (see
  `pipeline.engine.done_index`) or the edit failed;
- another run that finds a live claim waits: it polls the sidecar (`done`: no edit) and the
  claim (gone: it tries again; dead: it takes it over with a conditional overwrite, so two
  waiters cannot both win);
- a claim is dead when its holder stopped renewing it: `renewed_at + lease_s` is more than
  MAX_CLOCK_SKEW_S in the past, or this process has seen it unchanged for `lease_s`.

A claim costs the job one conditional PUT, one HEAD of the sidecar and one DELETE; a renewal
is one more PUT per `lease_s / 3` for the few claims held that long. A store that ignores
conditional writes (`probe` finds out once per run) cannot give these guarantees: the run then
refuses to start unless told it is the output's only writer (see `pipeline.engine.run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from pipeline.constants import DEFAULT_LEASE_S
from pipeline.engine import layout
from pipeline.engine.results import utcnow
from pipeline.errors import StorageError, StorageNotFound
from pipeline.io.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")
IO = Callable[..., Awaitable[Any]]

CLAIMS_PREFIX = "claims/"
PROBE_PREFIX = f"{CLAIMS_PREFIX}probe/"
# A live run renews its claims (and open markers) this many times per lease; a killed run's
# jobs wait at most the lease (constants.DEFAULT_LEASE_S) before another run takes them over.
RENEWALS_PER_LEASE = 3
# How often a waiter looks at a claim it waits on, and at the job's sidecar.
CLAIM_POLL_S = 2.0
# Clocks of different hosts may disagree by this much; a claim is not called dead by its
# timestamp alone before its lease plus this has passed.
MAX_CLOCK_SKEW_S = 30.0
# Renewals (and releases) in flight at once.
RENEW_BATCH = 16


def claim_key(job_key: str) -> str:
    return f"{CLAIMS_PREFIX}{layout.sidecar_key(job_key)[len(layout.JOBS_PREFIX) :]}"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """When process `pid` started (clock ticks since boot), or "" when unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces: count fields after its ')'.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


_HOST = socket.gethostname()
_BOOT = _boot_id()
_PID = os.getpid()
_START = _process_start(_PID)


@dataclass(frozen=True)
class LeaseBody:
    """What a claim or an open marker says: who holds it, and until when it lives.

    `host`, `boot`, `pid` and `started` name the holder's process, so a holder that died on
    this very host is known dead at once instead of at the end of its lease.
    """

    run_id: str
    token: str
    renewed_at: str
    lease_s: float
    host: str = ""
    pid: int = 0
    chunk: int | None = None
    boot: str = ""
    started: str = ""

    def encode(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseBody | None:
        """The body, or None when it is not one (written by hand, or an older version)."""
        try:
            raw = json.loads(data)
            return cls(
                run_id=str(raw["run_id"]),
                token=str(raw.get("token", "")),
                renewed_at=str(raw["renewed_at"]),
                lease_s=float(raw["lease_s"]),
                host=str(raw.get("host", "")),
                pid=int(raw.get("pid", 0)),
                chunk=None if raw.get("chunk") is None else int(raw["chunk"]),
                boot=str(raw.get("boot", "")),
                started=str(raw.get("started", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def expired(self, now: datetime | None = None) -> bool:
        """Past its lease (and the clock skew allowed between hosts) by the wall clock."""
        try:
            renewed = datetime.fromisoformat(self.renewed_at)
        except ValueError:
            return True
        age = ((now or utcnow()) - renewed).total_seconds()
        return age > self.lease_s + MAX_CLOCK_SKEW_S

    def holder_gone(self) -> bool:
        """The holder ran on this host (same name, same boot) and its process is gone."""
        if not (self.host == _HOST and self.boot and self.boot == _BOOT and self.pid > 0):
            return False
        return _process_start(self.pid) != self.started

    def dead(self) -> bool:
        return self.holder_gone() or self.expired()


def lease_body(run_id: str, token: str, lease_s: float, chunk: int | None = None) -> bytes:
    return LeaseBody(
        run_id=run_id,
        token=token,
        renewed_at=utcnow().isoformat(),
        lease_s=lease_s,
        host=_HOST,
        pid=_PID,
        chunk=chunk,
        boot=_BOOT,
        started=_START,
    ).encode()


def probe(storage: Storage) -> bool:
    """Whether `storage` honours conditional writes (a second create-if-absent must fail)."""
    key = f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    first = storage.put_if_absent(key, b"1")
    try:
        if first is None:
            return False  # a fresh random key "exists": nothing about this store adds up
        second = storage.put_if_absent(key, b"2")
        replaced = storage.put_if_match(key, b"3", '"not-the-etag"')
        return second is None and replaced is None
    finally:
        try:
            storage.delete(key)
        except StorageError as exc:  # only litter is at stake
            log.warning("cannot remove the conditional-write probe %s: %s", key, exc)


@dataclass
class Acquired:
    """The outcome of `Claims.acquire` for a job."""

    # "acquired": edit it; "done": its sidecar exists (no edit); "stopped": the run stopped.
    state: str
    waited_s: float = 0.0
    taken_over: bool = False


@dataclass
class _Held:
    etag: str
    chunk: int | None
    lost: bool = False
    renewed: float = field(default_factory=time.monotonic)  # when it was written, monotonic


@dataclass
class _Seen:
    etag: str
    since: float = field(default_factory=time.monotonic)


class Claims:
    """The claims one run holds on one output, and the open markers it renews with them."""

    def __init__(
        self,
        storage: Storage,
        run_id: str,
        io: IO,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        poll_s: float = CLAIM_POLL_S,
        enabled: bool = True,
    ) -> None:
        # Not enabled: the store cannot do conditional writes and the user said this run is
        # the output's only writer; only the open markers are renewed.
        self.enabled = enabled
        self.storage = storage
        self.run_id = run_id
        self.io = io
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.token = secrets.token_hex(8)
        self.held: dict[str, _Held] = {}
        # Open markers of this run's chunks (see done_index): key -> chunk.
        self.markers: dict[str, int] = {}
        self._seen: dict[str, _Seen] = {}
        self._renewer: asyncio.Task[None] | None = None
        self.lost = 0

    def body(self, chunk: int | None) -> bytes:
        return lease_body(self.run_id, self.token, self.lease_s, chunk)

    # --- acquiring -----------------------------------------------------------------------

    async def acquire(
        self,
        job_key: str,
        chunk: int | None,
        should_stop: Callable[[], bool],
        *,
        check_done: bool = True,
    ) -> Acquired:
        """The right to edit `job_key`; "done" when its sidecar exists (unless not
        `check_done`: an overwrite), "stopped" when the run stopped while waiting."""
        key = claim_key(job_key)
        started = time.monotonic()
        waited = False
        taken_over = False

        def elapsed() -> float:
            return time.monotonic() - started if waited or taken_over else 0.0

        while True:
            if should_stop():
                return Acquired("stopped", elapsed())
            if not self.enabled:
                return Acquired("acquired")
            etag = await self.io(self.storage.put_if_absent, key, self.body(chunk))
            if etag is None:
                etag = await self._take_over_if_dead(key, chunk)
                taken_over = etag is not None
            if etag is not None:
                self.held[job_key] = _Held(etag, chunk)
                self._seen.pop(key, None)
                if check_done and await self.io(self.storage.exists, layout.sidecar_key(job_key)):
                    await self.release([job_key])
                    return Acquired("done", elapsed(), taken_over)
                return Acquired("acquired", elapsed(), taken_over)
            # A live claim: its holder is editing the job. Wait for its sidecar.
            waited = True
            if await self._sleep(should_stop):
                return Acquired("stopped", elapsed())
            if check_done and await self.io(self.storage.exists, layout.sidecar_key(job_key)):
                self._seen.pop(key, None)
                return Acquired("done", elapsed())

    async def _sleep(self, should_stop: Callable[[], bool]) -> bool:
        """Sleep one poll interval in small steps; True when the run stopped meanwhile."""
        deadline = time.monotonic() + self.poll_s
        while (left := deadline - time.monotonic()) > 0:
            if should_stop():
                return True
            await asyncio.sleep(min(left, 0.25))
        return should_stop()

    async def _take_over_if_dead(self, key: str, chunk: int | None) -> str | None:
        """The new ETag after taking over a dead claim at `key`, else None (live, or gone)."""
        try:
            data, etag = await self.io(self.storage.get_with_etag, key)
        except StorageNotFound:
            return None  # released meanwhile: the caller tries to create it again
        if not self._dead(key, data, etag):
            return None
        taken: str | None = await self.io(self.storage.put_if_match, key, self.body(chunk), etag)
        if taken is not None:
            holder = LeaseBody.decode(data)
            log.info("took over the dead claim %s of run %s", key, holder.run_id if holder else "?")
        return taken

    def _dead(self, key: str, data: bytes, etag: str) -> bool:
        seen = self._seen.get(key)
        if seen is None or seen.etag != etag:
            seen = self._seen[key] = _Seen(etag)
        if time.monotonic() - seen.since > self.lease_s:
            return True  # nobody renewed it for a whole lease, by this host's own clock
        body = LeaseBody.decode(data)
        return body is not None and body.dead()

    # --- holding -------------------------------------------------------------------------

    async def release(self, job_keys: Iterable[str]) -> None:
        """Give up the claims of `job_keys` (indexed, or failed); errors only logged.

        Claims renewed within half a lease are surely still ours: they go in one batched
        delete (one request per 1000 on S3). An older one could have been taken over by a
        waiter if this run stalled: it is deleted only if its ETag is still ours.
        """
        held = [(k, self.held.pop(k)) for k in job_keys if k in self.held]
        fresh_before = time.monotonic() - self.lease_s / 2
        fresh = [claim_key(k) for k, h in held if not h.lost and h.renewed > fresh_before]
        stale = [(k, h) for k, h in held if not h.lost and h.renewed <= fresh_before]
        try:
            if fresh:
                await self.io(self.storage.delete_many, fresh)
        except StorageError as exc:
            # A claim left behind dies at its lease; the job is indexed either way.
            log.warning("cannot release %d claims: %s", len(fresh), exc)
        results = await asyncio.gather(
            *(self.io(self.storage.delete_if_match, claim_key(k), h.etag) for k, h in stale),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                log.warning("cannot release a claim: %s", result)

    async def renew(self) -> None:
        """Renew every claim and open marker this run holds (once)."""
        items = list(self.held.items())
        for start in range(0, len(items), RENEW_BATCH):
            batch = items[start : start + RENEW_BATCH]
            etags = await asyncio.gather(
                *(
                    self.io(self.storage.put_if_match, claim_key(k), self.body(h.chunk), h.etag)
                    for k, h in batch
                ),
                return_exceptions=True,
            )
            for (job, held), etag in zip(batch, etags, strict=True):
                if isinstance(etag, BaseException):
                    log.warning("cannot renew the claim of job %s: %s", job, etag)
                elif etag is None:
                    if not held.lost:
                        held.lost = True
                        self.lost += 1
                        log.warning(
                            "the claim of job %s was taken over (this run was too slow to renew "
                            "it): another run may edit it too",
                            job,
                        )
                else:
                    held.etag = etag
                    held.renewed = time.monotonic()
        for key, chunk in list(self.markers.items()):
            try:
                await self.io(self.storage.put_bytes, key, self.body(chunk), "application/json")
            except StorageError as exc:
                log.warning("cannot renew the open marker %s: %s", key, exc)

    def start(self) -> None:
        """Renew in the background every `lease_s / 3` until `stop`."""
        if self._renewer is None:
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / RENEWALS_PER_LEASE)
            try:
                await self.renew()
            except Exception:  # a failed renewal round must not end the renewals
                log.exception("renewing claims failed")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None


def dead_claims(storage: Storage) -> list[tuple[str, str | None, str]]:
    """`(claim key, job key, etag)` of every claim whose holder stopped renewing it."""
    dead = []
    for key in storage.list_keys(CLAIMS_PREFIX):
        if key.startswith(PROBE_PREFIX) or not key.endswith(layout.SIDECAR_SUFFIX):
            continue
        try:
            data, etag = storage.get_with_etag(key)
        except StorageNotFound:
            continue
        body = LeaseBody.decode(data)
        if body is not None and body.dead():
            name = key.rsplit("/", 1)[-1][: -len(layout.SIDECAR_SUFFIX)]
            dead.append((key, name if layout.is_job_key(name) else None, etag))
    return dead


__all__ = [
    "CLAIMS_PREFIX",
    "DEFAULT_LEASE_S",
    "Acquired",
    "Claims",
    "LeaseBody",
    "claim_key",
    "dead_claims",
    "lease_body",
    "probe",
]
