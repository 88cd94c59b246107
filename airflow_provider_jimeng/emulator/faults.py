"""Failures the emulator can be told to produce, so retry, timeout and billing paths can be tested offline.

Faults wait in a FIFO queue and are consumed by the requests they match: a :class:`Fault` with
``times=2`` answers the next two matching requests, then the next fault in line takes over.

Four families: error answers instead of generating (:data:`ERROR_FAULTS`), broken deliveries of a
billed answer (:data:`DELIVERY_FAULTS`), image URLs that fail at download (:data:`URL_FAULTS`), and
documented answer shapes a client must understand (:data:`SHAPE_FAULTS`, applied by
:func:`shape_answer`: each is one branch there).

The Visual API (:mod:`.visual`) takes ``visual_error`` (a body code of :data:`VISUAL_ERROR_FAULTS`) and
the connection and delivery faults, matched through its pseudo-paths (``/?Action=...``).
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass

from airflow_provider_jimeng.emulator.answers import Plan, Slot
from airflow_provider_jimeng.emulator.protocol import error_object

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
#: Faults that change what a generated answer says (documented shapes, see :func:`shape_answer`).
SHAPE_FAULTS = frozenset(
    {
        "stream_error",
        "error_envelope",
        "error_envelope_empty_data",
        "image_internal_error",
        "empty_item_errors",
        "gateway_usage",
    }
)
#: The Visual API's body error codes (``Fault("visual_error", code="50429", path=...)``): code -> (HTTP
#: status, message). ``50411``-``50430`` are refused before any work; ``50500``/``50501`` may have started
#: a task; ``50511``/``50512`` fail a task after it was made (see :mod:`.visual`).
VISUAL_ERROR_FAULTS: dict[str, tuple[int, str]] = {
    "50411": (400, "Pre Img Risk Not Pass"),
    "50412": (400, "Pre Text Risk Not Pass"),
    "50413": (400, "Post Text Risk Not Pass"),
    "50429": (429, "Request Has Reached API Limit, Please Try Later"),
    "50430": (429, "Request Has Reached API Concurrent Limit, Please Try Later"),
    "50500": (500, "Internal Error"),
    "50501": (500, "Internal RPC Error"),
    "50511": (400, "Post Process Failed"),
    "50512": (400, "Post Img Risk Not Pass"),
}
FAULT_KINDS = frozenset(ERROR_FAULTS) | DELIVERY_FAULTS | URL_FAULTS | SHAPE_FAULTS | {"slow", "reset", "visual_error"}


@dataclass(frozen=True)
class Fault:
    """One scripted failure.

    ``kind`` is one of :data:`FAULT_KINDS`; ``retry_after`` adds a ``Retry-After`` header to error
    faults; ``delay`` is how long ``slow`` waits before answering normally (and billing); ``times`` is
    how many consecutive matching requests it applies to; ``path`` restricts it to requests whose path
    matches this glob (``fnmatch``, e.g. ``"/v1/*"`` or ``"/tos/*"``); ``None`` means every generation
    request. ``code`` is the error code of ``stream_error``, ``error_envelope`` and
    ``error_envelope_empty_data`` (default ``InternalServiceError``) and the Visual API body code of
    ``visual_error`` (required, a key of :data:`VISUAL_ERROR_FAULTS`); ``after`` is how many images
    of the set come before ``stream_error`` or ``image_internal_error`` (default: half, at least one).
    """

    kind: str
    retry_after: float | None = None
    delay: float = 0.0
    times: int = 1
    path: str | None = None
    code: str | None = None
    after: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(sorted(FAULT_KINDS))}")
        if self.times < 1:
            raise ValueError(f"times must be >= 1, got {self.times}")
        if self.delay < 0 or (self.retry_after is not None and self.retry_after < 0):
            raise ValueError("delay and retry_after must not be negative")
        if self.kind == "visual_error" and self.code not in VISUAL_ERROR_FAULTS:
            raise ValueError(f"visual_error needs a code, one of: {', '.join(VISUAL_ERROR_FAULTS)}; got {self.code!r}")
        if self.after is not None and self.after < 0:
            raise ValueError(f"after must be >= 0, got {self.after}")

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


_INTERNAL_ERROR = "InternalServiceError"


def shape_answer(plan: Plan, fault: Fault | None) -> None:
    """Give the answer the documented shape ``fault`` asks for (nothing for other faults)."""
    if fault is None or fault.kind not in SHAPE_FAULTS:
        return
    kind, total = fault.kind, len(plan.slots)
    after = max(1, total // 2) if fault.after is None else fault.after
    code = fault.code or _INTERNAL_ERROR
    if kind in ("error_envelope", "error_envelope_empty_data"):
        # A 200 that says the request failed: nothing generated, nothing billed.
        plan.slots, plan.web_searches = [], None
        plan.envelope_error = error_object(code, "The request failed.", plan.request_id)
        plan.envelope_data = kind == "error_envelope_empty_data"
    elif kind == "stream_error":
        # Rendering failed mid-set: the images before it are delivered (and billed), the rest never made.
        after = min(after, total)
        error = error_object(code, "The service failed while generating the set.", plan.request_id)
        plan.slots = plan.slots[:after]
        if plan.stream:
            plan.stream_error = error
        else:  # a JSON answer can only say it in data: the documented internal-error item
            plan.slots.append(Slot(after, None, error))
    elif kind == "image_internal_error":
        # "若失败原因为内部服务异常（500）：不会继续请求下一个图片生成任务": the set stops at the failed image.
        after = min(after, total - 1)
        error = error_object(_INTERNAL_ERROR, f"The image {after} could not be generated.", plan.request_id)
        plan.slots = [*plan.slots[:after], Slot(after, None, error)]
    elif kind == "empty_item_errors":
        plan.empty_item_errors = True
    elif kind == "gateway_usage":
        plan.gateway_usage = True
