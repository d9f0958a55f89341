"""The emulator's result-file store: expiring, byte-bounded, served at /v1/files/<name>."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

TOKEN_BYTES = 18


@dataclass
class StoredFile:
    data: bytes
    content_type: str
    expires: float  # on the store's clock
    # Fraction of the body the next download lets through before the connection drops.
    truncate_at: float | None = None
    downloads: int = 0


class FileStore:
    """Files by name. Over budget, downloaded files go first, then the oldest others.

    Used from the event loop only, so it needs no lock.
    """

    def __init__(
        self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._fresh: OrderedDict[str, StoredFile] = OrderedDict()
        self._downloaded: OrderedDict[str, StoredFile] = OrderedDict()
        self.bytes = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._fresh) + len(self._downloaded)

    def put(
        self, data: bytes, ext: str, content_type: str, *, truncate_at: float | None = None
    ) -> str:
        """Store `data` and return its name (`<token>.<ext>`)."""
        self._drop_expired()
        while self.bytes + len(data) > self.max_bytes and len(self):
            queue = self._downloaded or self._fresh
            _, old = queue.popitem(last=False)
            self.bytes -= len(old.data)
            self.evicted += 1
        name = f"{secrets.token_urlsafe(TOKEN_BYTES)}.{ext}"
        entry = StoredFile(data, content_type, self._clock() + self.ttl, truncate_at)
        self._fresh[name] = entry
        self.bytes += len(data)
        return name

    def get(self, name: str) -> StoredFile | None:
        """The file, counted as downloaded; None when unknown, evicted or expired."""
        entry = self._fresh.pop(name, None)
        if entry is None:
            entry = self._downloaded.pop(name, None)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            self.bytes -= len(entry.data)
            self.expired += 1
            return None
        entry.downloads += 1
        self._downloaded[name] = entry
        return entry

    def clear(self) -> None:
        self._fresh.clear()
        self._downloaded.clear()
        self.bytes = 0

    def _drop_expired(self) -> None:
        # Front-first: cheap, and exact for `_fresh` while the TTL stays put. A file expired
        # deeper in a queue still answers 404 in get() and goes when the budget needs room.
        now = self._clock()
        for queue in (self._fresh, self._downloaded):
            while queue:
                name, entry = next(iter(queue.items()))
                if entry.expires > now:
                    break
                del queue[name]
                self.bytes -= len(entry.data)
                self.expired += 1
