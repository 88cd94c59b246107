"""Failures the emulator can be told to produce, so retry, timeout and billing paths can be tested offline.

Faults wait in a FIFO queue and are consumed by the requests they match: a :class:`Fault` with
``times=2`` answers the next two matching requests, then the next fault in line takes over.
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass

#: Faults answered with an error envelope instead of generating: kind -> (HTTP status, code, type, message).
ERROR_FAULTS: dict[str, tuple[int, str, str, str]] = {
    "rate_limit": (
        429,
        "ModelAccountIpmRateLimitExceeded",
        "TooManyRequests",
        "The request has exceeded the images per minute (IPM) rate limit of the model for your account. "
        "Please retry later.",
    ),
    "quota": (
        429,
        "QuotaExceeded",
        "TooManyRequests",
        "The request has exceeded the quota (spending limit) set for your account.",
    ),
    "server_error": (
        500,
        "InternalServiceError",
        "InternalServerError",
        "The service encountered an unexpected internal error.",
    ),
    "unavailable": (
        503,
        "ServiceUnavailable",
        "ServiceUnavailable",
        "The service is temporarily unavailable. Please retry later.",
    ),
}

#: Faults that change how a generated (and billed) answer is delivered.
DELIVERY_FAULTS = frozenset({"reset_mid_body", "malformed", "truncated"})
#: Faults that change what the image URLs of an answer do at download time.
URL_FAULTS = frozenset({"expired_url", "missing_url"})
FAULT_KINDS = frozenset(ERROR_FAULTS) | DELIVERY_FAULTS | URL_FAULTS | {"slow", "reset"}


@dataclass(frozen=True)
class Fault:
    """One scripted failure.

    ``kind`` is one of :data:`FAULT_KINDS`; ``retry_after`` adds a ``Retry-After`` header to error
    faults; ``delay`` is how long ``slow`` waits before answering normally (and billing); ``times`` is
    how many consecutive matching requests it applies to; ``path`` restricts it to requests whose path
    matches this glob (``fnmatch``, e.g. ``"/v1/*"`` or ``"/tos/*"``); ``None`` means every generation
    request.
    """

    kind: str
    retry_after: float | None = None
    delay: float = 0.0
    times: int = 1
    path: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(sorted(FAULT_KINDS))}")
        if self.times < 1:
            raise ValueError(f"times must be >= 1, got {self.times}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delay and retry_after must not be negative")

    def matches(self, path: str, *, generation: bool) -> bool:
        if self.path is None:
            return generation
        return fnmatch.fnmatchcase(path, self.path)


class _Pending:
    __slots__ = ("fault", "left")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.left = fault.times


class FaultQueue:
    """Thread-safe FIFO of faults; each matching request takes one use of the first matching fault."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []

    def push(self, *faults: Fault) -> None:
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"expected Fault, got {type(fault).__name__}")
        with self._lock:
            self._pending.extend(_Pending(fault) for fault in faults)

    def take(self, path: str, *, generation: bool) -> Fault | None:
        with self._lock:
            for position, pending in enumerate(self._pending):
                if pending.fault.matches(path, generation=generation):
                    pending.left -= 1
                    if pending.left <= 0:
                        del self._pending[position]
                    return pending.fault
        return None

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)
