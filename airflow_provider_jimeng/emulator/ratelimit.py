"""The images-per-minute limiter, like the account/model IPM limit of the real service.

Two models of the limit:

* a sliding 60 s window (the default): at most ``limit`` images reserved in any 60 s;
* with ``burst``, a token bucket refilled at ``limit / 60`` images a second and holding at most
  ``burst`` images. The budget is then spread over the minute, so a client cannot spend it in the
  first second: it has to pace itself. Benchmarks use it, because a 60 s window never refuses a
  run smaller than one minute's budget, so it cannot show whether a client keeps to the rate.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class Reservation:
    """Images counted against the limit for one request; settled to what was really billed."""

    __slots__ = ("at", "bucketed", "images")

    def __init__(self, at: float, images: int, bucketed: bool = False) -> None:
        self.at = at
        self.images = images
        self.bucketed = bucketed


class ImageRateLimiter:
    """Admit a request only if its worst-case image count still fits the limit.

    A request reserves ``max_images_billed(body)`` up front (a set may produce that many), then
    :meth:`settle` lowers the reservation to the images actually billed (a token bucket gets the
    difference back).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._window: deque[Reservation] = deque()
        self._clock = clock
        self._tokens = 0.0
        self._updated = 0.0
        self._bucket: tuple[int, int] | None = None  # (limit, burst) the bucket was filled for

    def reserve(self, images: int, limit: int | None, burst: int | None = None) -> Reservation | None:
        """Return a reservation, or ``None`` when ``limit`` images per minute would be exceeded.

        With ``burst`` the limit is a token bucket; a request larger than ``burst`` is admitted when
        the bucket is full and leaves it in debt, so it is slow but never refused forever.
        """
        now = self._clock()
        with self._lock:
            if limit is not None and burst is not None:
                return self._take_tokens(now, images, limit, max(1, burst))
            while self._window and now - self._window[0].at >= WINDOW_SECONDS:
                self._window.popleft()
            if limit is not None and sum(r.images for r in self._window) + images > limit:
                return None
            reservation = Reservation(now, images)
            self._window.append(reservation)
            return reservation

    def _take_tokens(self, now: float, images: int, limit: int, burst: int) -> Reservation | None:
        if self._bucket != (limit, burst):
            self._bucket, self._tokens, self._updated = (limit, burst), float(burst), now
        self._tokens = min(float(burst), self._tokens + (now - self._updated) * limit / WINDOW_SECONDS)
        self._updated = now
        if self._tokens + 1e-9 < min(images, burst):
            return None
        self._tokens -= images
        return Reservation(now, images, bucketed=True)

    def settle(self, reservation: Reservation, billed: int) -> None:
        with self._lock:
            if reservation.bucketed and self._bucket is not None:
                self._tokens = min(float(self._bucket[1]), self._tokens + reservation.images - billed)
            reservation.images = billed

    def clear(self) -> None:
        with self._lock:
            self._window.clear()
            self._bucket = None
