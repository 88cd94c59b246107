"""A sliding-window images-per-minute limiter, like the account/model IPM limit of the real service."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0


class Reservation:
    """Images counted against the window for one request; settled to what was really billed."""

    __slots__ = ("at", "images")

    def __init__(self, at: float, images: int) -> None:
        self.at = at
        self.images = images


class ImageRateLimiter:
    """Admit a request only if its worst-case image count still fits in the last 60 s.

    A request reserves ``max_images_billed(body)`` up front (a set may produce that many), then
    :meth:`settle` lowers the reservation to the images actually billed.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._window: deque[Reservation] = deque()
        self._clock = clock

    def reserve(self, images: int, limit: int | None) -> Reservation | None:
        """Return a reservation, or ``None`` when ``limit`` images per minute would be exceeded."""
        now = self._clock()
        with self._lock:
            while self._window and now - self._window[0].at >= WINDOW_SECONDS:
                self._window.popleft()
            if limit is not None and sum(r.images for r in self._window) + images > limit:
                return None
            reservation = Reservation(now, images)
            self._window.append(reservation)
            return reservation

    def settle(self, reservation: Reservation, billed: int) -> None:
        with self._lock:
            reservation.images = billed

    def clear(self) -> None:
        with self._lock:
            self._window.clear()
