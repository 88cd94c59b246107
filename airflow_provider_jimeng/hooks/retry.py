"""Where requests are retried and paced.

:class:`RetryPolicy` decides whether and how long to wait after a failed attempt (exponential backoff
with jitter, ``Retry-After`` honoured). :class:`ImageRatePacer` spaces requests so that a burst of
concurrent prompts stays under an images-per-minute budget instead of turning into a storm of 429s.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from dataclasses import dataclass

from airflow_provider_jimeng.exceptions import JiMengAPIError


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); ``None`` if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, parsed.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """How many times and how patiently a retryable failure is repeated.

    ``max_retries`` counts repeats after the first attempt. Waits grow as ``backoff * 2**n`` with
    "equal jitter" (half fixed, half random) so that concurrent workers do not retry in lockstep,
    capped at ``max_wait``; a server's ``Retry-After`` replaces the computed wait (also capped).
    """

    max_retries: int = 5
    backoff: float = 2.0
    max_wait: float = 120.0

    def should_retry(self, error: Exception, attempt: int) -> bool:
        return attempt <= self.max_retries and isinstance(error, JiMengAPIError) and error.retryable

    def wait_seconds(self, error: Exception, attempt: int) -> float:
        retry_after = error.retry_after if isinstance(error, JiMengAPIError) else None
        if retry_after is not None:
            return min(retry_after, self.max_wait)
        ceiling: float = min(self.max_wait, self.backoff * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)


class ImageRatePacer:
    """A token bucket in images: ``acquire(n)`` blocks until ``n`` images fit in the per-minute budget.

    The bucket holds at most one second's worth of images (and never less than one request's
    worth), so throughput approaches the budget smoothly instead of bursting past a server-side
    limit and being answered with 429s. Thread-safe; shared by every request of one hook.
    """

    def __init__(self, images_per_minute: float) -> None:
        if images_per_minute <= 0:
            raise ValueError("images_per_minute must be positive")
        self.rate = images_per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._lock = threading.Lock()
        self.waited_seconds = 0.0

    def acquire(self, images: int = 1, stop: threading.Event | None = None) -> float:
        """Take ``images`` tokens, waiting as needed; returns the seconds waited."""
        need = float(images)
        waited = 0.0
        with self._lock:
            # Reserve now, even into debt, so concurrent callers queue in arrival order.
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            self._tokens -= need
            debt = -self._tokens
        if debt > 0:
            waited = debt / self.rate
            if stop is not None:
                stop.wait(waited)
            else:
                time.sleep(waited)
            with self._lock:
                self.waited_seconds += waited
        return waited
