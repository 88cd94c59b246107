"""Where requests are retried: one loop for every request of both APIs and for image downloads.

:class:`RetryPolicy` decides whether and how long to wait after a failed attempt (exponential backoff
with jitter, ``Retry-After`` honoured); :func:`call_with_retries` repeats an attempt by it, and refuses
to repeat blind an attempt that may have been billed beyond what the caller allows. Pacing (waiting
*before* an attempt) is in :mod:`.pacing`.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from airflow_provider_jimeng.exceptions import JiMengAPIError, JiMengTimeoutError

_T = TypeVar("_T")


class Log(Protocol):
    """What the loops log to: a :class:`logging.Logger`, or a hook's own (Airflow's structured) logger."""

    def debug(self, msg: str, /, *args: Any) -> Any: ...

    def info(self, msg: str, /, *args: Any) -> Any: ...

    def warning(self, msg: str, /, *args: Any) -> Any: ...


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


def call_with_retries(
    attempt: Callable[[int], _T],
    *,
    policy: RetryPolicy,
    stop: threading.Event,
    log: Log,
    subject: str,
    on_retry: Callable[[], None],
    max_billed_retries: int | None,
    billed_refusal: str | None = None,
    stopped_message: str | None = None,
) -> _T:
    """The one retry loop: ``attempt(n)`` until it succeeds or its error may not be retried.

    Rate limits and server errors are retried ``policy.max_retries`` times with backoff; ``stop`` ends
    the waits (and, with ``stopped_message``, refuses a new attempt). An attempt that may have been billed
    (timed out, broke off, malformed 200) is retried at most ``max_billed_retries`` times in all, each
    time with a warning: there is no idempotency key, so every such retry may pay again. ``None`` means
    the attempts cost nothing (polls): whether one may have been billed does not matter.
    ``billed_refusal`` says why one is not retried once the limit is reached (default: the extra
    ``max_billed_retries``). ``on_retry`` is called before each wait, to count the retries.
    """
    billed_retries = 0
    number = 0
    while True:
        number += 1
        if stopped_message is not None and stop.is_set():
            raise JiMengTimeoutError(stopped_message, code="Stopped")
        try:
            return attempt(number)
        except JiMengAPIError as error:
            if not policy.should_retry(error, number) or stop.is_set():
                raise
            reason = error.code or type(error).__name__
            request_id = error.request_id or "n/a"
            billed = error.possibly_billed and max_billed_retries is not None
            if billed:
                assert max_billed_retries is not None
                if billed_retries >= max_billed_retries:
                    log.warning(
                        "%s attempt %d failed (%s, request id %s) and may have been billed; not retried: %s",
                        subject,
                        number,
                        reason,
                        request_id,
                        billed_refusal
                        or f"{billed_retries} retry(ies) of possibly billed attempts already made "
                        f"(extra max_billed_retries={max_billed_retries})",
                    )
                    raise
                billed_retries += 1
            wait = policy.wait_seconds(error, number)
            on_retry()
            if billed:
                log.warning(
                    "%s attempt %d of %d failed (%s, request id %s) and may have been billed; retrying in "
                    "%.2fs (retry %d of at most %d after a possibly billed attempt: it may pay again)",
                    subject,
                    number,
                    policy.max_retries + 1,
                    reason,
                    request_id,
                    wait,
                    billed_retries,
                    max_billed_retries,
                )
            else:
                log.warning(
                    "%s attempt %d of %d failed (%s, request id %s); retrying in %.2fs",
                    subject,
                    number,
                    policy.max_retries + 1,
                    reason,
                    request_id,
                    wait,
                )
            if stop.wait(wait):
                raise
