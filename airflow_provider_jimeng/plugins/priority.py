"""Airflow's own API first: the gallery's storage reads wait while an Airflow request is being served.

The gallery runs inside the API server, on the same process, GIL and cores as Airflow's REST API and
UI. Taking turns (:class:`~.thumbnails.TileAdmission`) keeps the gallery to one tile or sheet at a
time, but a ``GET /api/v2/dags`` that arrives during one still shares the process with it: P8 measured
its p95 at 2.5-3x idle while a grid loaded. So the gallery defers to Airflow: a root middleware
(:class:`AirflowFirst`, registered by the plugin) counts Airflow's requests in flight, and the gallery
waits for none to be before each turn and before each storage read. An Airflow request then overlaps
at most one read already under way.

Bounded both ways, so that neither side can starve the other: a request in flight for longer than
:data:`LONG_REQUEST_S` (a log stream, a long poll) no longer counts, and one wait lasts at most
:data:`MAX_YIELD_S`. Only the standard library here: the plugin module imports this in every process
that loads plugins, task processes included.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from airflow_provider_jimeng.links.jimeng import GALLERY_URL_PREFIX

#: An Airflow request older than this no longer holds the gallery back (streams, long polls).
LONG_REQUEST_S = 2.0
#: The longest the gallery waits at once for Airflow's requests to finish.
MAX_YIELD_S = 0.25
#: How often an awaiting coroutine looks again (it never blocks the event loop).
POLL_S = 0.003


class AirflowRequestsInFlight:
    """Airflow's requests being served by this API server process, by when each started."""

    def __init__(self) -> None:
        self._started: dict[int, float] = {}
        self._tokens = itertools.count()
        self._changed = threading.Condition()
        self.enabled = True
        #: Waits that ran out (:data:`MAX_YIELD_S`) with an Airflow request still in flight.
        self.outwaited = 0

    def begin(self) -> int:
        token = next(self._tokens)
        with self._changed:
            self._started[token] = time.monotonic()
        return token

    def end(self, token: int) -> None:
        with self._changed:
            self._started.pop(token, None)
            self._changed.notify_all()

    def busy_for(self) -> float:
        """0 when no recent Airflow request is in flight; else how long until the oldest recent one stops counting."""
        now = time.monotonic()
        recent = [started for started in list(self._started.values()) if now - started < LONG_REQUEST_S]
        return LONG_REQUEST_S - (now - min(recent)) if recent else 0.0

    def wait_quiet(self, max_wait_s: float | None = None) -> None:
        """Block (a gallery I/O thread, never the event loop) until no Airflow request is in flight."""
        if not self.enabled:
            return
        deadline = time.monotonic() + (MAX_YIELD_S if max_wait_s is None else max_wait_s)
        with self._changed:
            while (busy := self.busy_for()) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.outwaited += 1
                    return
                self._changed.wait(min(busy, left))

    async def await_quiet(self, max_wait_s: float | None = None) -> None:
        """As :meth:`wait_quiet`, for a coroutine: looks again every :data:`POLL_S`, holding no thread."""
        if not self.enabled or not self.busy_for():
            return
        import anyio

        with anyio.move_on_after(MAX_YIELD_S if max_wait_s is None else max_wait_s) as scope:
            while self.busy_for():
                await anyio.sleep(POLL_S)
        if scope.cancelled_caught:
            self.outwaited += 1


#: This API server process's account (one per process, as the GIL it protects).
AIRFLOW_REQUESTS = AirflowRequestsInFlight()


class AirflowFirst:
    """Root ASGI middleware: counts the requests that are not the gallery's while they are served."""

    def __init__(self, app: Any, *, requests: AirflowRequestsInFlight = AIRFLOW_REQUESTS) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or str(scope.get("path", "")).startswith(f"{GALLERY_URL_PREFIX}/"):
            await self.app(scope, receive, send)
            return
        token = self.requests.begin()
        try:
            await self.app(scope, receive, send)
        finally:
            self.requests.end(token)
