"""Where requests are paced: each attempt waits for its images to fit the per-minute budgets before it is sent.

:class:`ImageRatePacer` is a task's own pace (the ``max_images_per_minute`` extra), in-process.
:class:`Pacing` is what an attempt waits for: that pace first, then the account's, kept across every
task by the shared limiter (:mod:`airflow_provider_jimeng.coordination.ratelimit`) when the connection
names a Redis and the account's limit. A burst of concurrent prompts then stays under the budget instead
of turning into a storm of 429s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from airflow_provider_jimeng.exceptions import JiMengTimeoutError
from airflow_provider_jimeng.hooks.retry import Log

if TYPE_CHECKING:
    from airflow_provider_jimeng.coordination.ratelimit import AccountRateLimiter, Grant


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


class Pacing:
    """The waits before an attempt: the task's own pace, then the account's; thread-safe, one per hook.

    :param images_per_minute: the task's own pace (``max_images_per_minute``), or ``None``.
    :param redis_conn_id: a Redis every worker reaches, holding the account-wide bucket.
    :param account_images_per_minute: the account's limit; with ``redis_conn_id``, every task using the
        key shares it (one bucket per model: the service limits each model apart).
    :param stop: ends every wait at once.
    :param on_wait: called with the milliseconds each wait took (for the caller's counters).
    """

    def __init__(
        self,
        *,
        images_per_minute: float | None,
        stop: threading.Event,
        log: Log,
        redis_conn_id: str | None = None,
        account_images_per_minute: float | None = None,
        api_key: str = "",
        on_wait: Callable[[int], None] | None = None,
    ) -> None:
        self.pacer = ImageRatePacer(images_per_minute) if images_per_minute else None
        self._stop = stop
        self._log = log
        self._redis_conn_id = redis_conn_id
        self._account_images_per_minute = account_images_per_minute
        self._api_key = api_key
        self._on_wait = on_wait
        self._lock = threading.Lock()
        self._account_limiters: dict[str, AccountRateLimiter] = {}
        #: Whether the shared limiter's Redis is failing (said once in the log, and once when it is back).
        self._limiter_down = False

    def _waited(self, seconds: float) -> None:
        if self._on_wait is not None:
            self._on_wait(round(seconds * 1000))

    def account_limiter(self, model: str) -> AccountRateLimiter | None:
        """The account-wide limiter of ``model`` when the connection names a shared Redis and the
        account's limit (``redis_conn_id`` and ``account_images_per_minute``); else ``None``.

        A ``redis_conn_id`` alone does not limit: the account's cap is a number only its owner knows
        (accounts may have raised limits, models differ), and the same Redis also serves journals.
        """
        if self._redis_conn_id is None or self._account_images_per_minute is None:
            return None
        with self._lock:
            limiter = self._account_limiters.get(model)
            if limiter is None:
                from airflow_provider_jimeng.coordination.ratelimit import AccountRateLimiter, bucket_key
                from airflow_provider_jimeng.coordination.redis_client import shared_redis

                client = shared_redis(self._redis_conn_id)  # a missing connection: not retried
                limiter = self._account_limiters[model] = AccountRateLimiter(
                    client, bucket_key(self._api_key, model), self._account_images_per_minute
                )
            return limiter

    def wait(self, model: str, images: int) -> Grant | None:
        """Wait for the task's own pace, then for the account's; the account's grant, if it has one.

        The task's pacer goes first so that the shared slots are taken as late as possible. When the
        shared limiter's Redis fails, a task with its own pace (``max_images_per_minute``) goes on at
        that pace; one without fails the attempt before sending (retried with backoff like a 429):
        sending unpaced would turn many tasks into a storm of 429s.
        """
        from airflow_provider_jimeng.coordination.ratelimit import RateLimiterUnavailableError

        pacer = self.pacer
        if pacer is not None:
            self._waited(pacer.acquire(images, stop=self._stop))
        limiter = self.account_limiter(model)
        if limiter is None or self._stop.is_set():
            return None
        started = time.monotonic()
        try:
            grant = limiter.acquire(images, self._stop)
        except RateLimiterUnavailableError as exc:
            if self._limiter_state_changed(down=True):
                self._log.warning(
                    "The account-wide rate limiter is unavailable (%s, redis connection %s); %s",
                    exc,
                    self._redis_conn_id,
                    "going on at the task's own pace (max_images_per_minute)"
                    if pacer is not None
                    else "nothing is sent until it is back (attempts are retried with backoff)",
                )
            if pacer is not None:
                return None
            raise JiMengTimeoutError(
                f"the account-wide rate limiter is unavailable ({exc}); nothing was sent",
                code="RateLimiterUnavailable",
            ) from None
        finally:
            self._waited(time.monotonic() - started)
        if self._limiter_state_changed(down=False):
            self._log.info("The account-wide rate limiter is available again")
        return grant

    def give_back(self, grant: Grant, images: int) -> None:
        """Return unused images to the shared bucket; if Redis fails, they stay spent (never overspent)."""
        from airflow_provider_jimeng.coordination.ratelimit import RateLimiterUnavailableError

        try:
            grant.refund(images)
        except RateLimiterUnavailableError as exc:
            self._log.debug("Could not give %d image(s) back to the account-wide rate limiter: %s", images, exc)

    def _limiter_state_changed(self, *, down: bool) -> bool:
        """Record whether the shared limiter's Redis is failing; true for the one thread that changed it
        (so that an outage is logged once, whichever of the task's threads meets it first)."""
        with self._lock:
            changed = self._limiter_down != down
            self._limiter_down = down
            return changed
