"""What every request of one emulator shares: faults, ledger, rate limiter, images, URL signing, counters.

:class:`~airflow_provider_jimeng.emulator.server.JiMengEmulator` owns one :class:`Runtime`; the
request modules use it through these public methods instead of reaching into the server.
"""

from __future__ import annotations

import hmac
import math
import secrets
import socket
import threading
import time
from collections import deque
from hashlib import sha256
from typing import Any
from urllib.parse import urlencode

from airflow_provider_jimeng.emulator.faults import FaultQueue
from airflow_provider_jimeng.emulator.images import ImageKey, ImageStore, RenderCache
from airflow_provider_jimeng.emulator.ledger import Ledger
from airflow_provider_jimeng.emulator.ratelimit import ImageRateLimiter
from airflow_provider_jimeng.emulator.tasks import VisualTaskTable

TOS_PREFIX = "/tos/"
TOS_BUCKET = "ark-content-generation-emulator"
#: How many per-request records are kept (the oldest are dropped).
MAX_REQUEST_RECORDS = 10_000


class Stats:
    """Counters, per-request records and open connections, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.request_count = 0
        self.rate_limited = 0
        self.downloads = 0
        #: Generation requests being handled now, and the most at once since the start (or a reset).
        self.in_flight = 0
        self.peak_in_flight = 0
        self._records: deque[dict[str, Any]] = deque(maxlen=MAX_REQUEST_RECORDS)
        self._connections: set[socket.socket] = set()

    def count(self, counter: str) -> None:
        """Add one to ``request_count``, ``rate_limited`` or ``downloads``."""
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def enter(self) -> None:
        """A generation request started: count it in flight (its peak shows the clients' concurrency)."""
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def add_record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.append(record)

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(record) for record in self._records]

    def track(self, connection: socket.socket, active: bool) -> None:
        with self._lock:
            if active:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def connections(self) -> list[socket.socket]:
        with self._lock:
            return list(self._connections)

    def reset(self) -> None:
        with self._lock:
            self.request_count = self.rate_limited = self.downloads = 0
            self.peak_in_flight = self.in_flight
            self._records.clear()


class UrlSigner:
    """Signed, expiring image URLs in the TOS style of the real service (``X-Tos-Signature``...)."""

    def __init__(self, store: ImageStore) -> None:
        self._store = store
        self._key = secrets.token_bytes(32)

    def signature(self, image_id: str, date: str, expires: str) -> str:
        return hmac.new(self._key, f"{image_id}\n{date}\n{expires}".encode(), sha256).hexdigest()

    def verify(self, image_id: str, date: str, expires: str, signature: str) -> bool:
        return hmac.compare_digest(signature, self.signature(image_id, date, expires))

    def issue(self, key: ImageKey, root: str, ttl: float, fault_kind: str | None) -> str:
        """A URL for ``key``; ``expired_url``/``missing_url`` faults issue one that fails at download."""
        now = time.time()
        if fault_kind == "missing_url":
            image_id = secrets.token_hex(16)  # never stored: downloads answer 404
        else:
            image_id = self._store.put(key, now if fault_kind == "expired_url" else now + ttl)
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        expires = str(max(1, math.ceil(ttl)))
        query = urlencode(
            [
                ("X-Tos-Algorithm", "TOS4-HMAC-SHA256"),
                ("X-Tos-Credential", f"AKLTemulator/{date[:8]}/cn-beijing/tos/request"),
                ("X-Tos-Date", date),
                ("X-Tos-Expires", expires),
                ("X-Tos-SignedHeaders", "host"),
                ("X-Tos-Signature", self.signature(image_id, date, expires)),
            ]
        )
        return f"{root}{TOS_PREFIX}{TOS_BUCKET}/{image_id}.{key.image_format}?{query}"


class Runtime:
    """The shared parts; knobs that change at run time (latency, limits...) stay on the emulator."""

    def __init__(self) -> None:
        self.faults = FaultQueue()
        self.ledger = Ledger()
        self.limiter = ImageRateLimiter()
        self.cache = RenderCache()
        self.store = ImageStore()
        self.signer = UrlSigner(self.store)
        self.stats = Stats()
        self.visual_tasks = VisualTaskTable()
        self.stopping = threading.Event()

    def reset(self) -> None:
        self.faults.clear()
        self.ledger.clear()
        self.limiter.clear()
        self.stats.reset()
        self.visual_tasks.clear()
