"""Exceptions raised by the JiMeng provider.

Every error derives from :class:`JiMengError` (an ``AirflowException``) so a DAG author can catch the
whole family at once, and each API error class says whether repeating the call could help
(``retryable``) and whether the failed attempt may still have been billed (``possibly_billed``).
Messages carry the API's error code and request id but never the API key, a bearer token, base64
image data or a URL's query: every message passes through
:func:`~airflow_provider_jimeng.redaction.redact_text` when the error is built, whoever builds it.
"""

from __future__ import annotations

from typing import Any

from airflow.exceptions import AirflowException

from airflow_provider_jimeng.redaction import redact_text
from airflow_provider_jimeng.version_compat import AirflowFailException


class JiMengError(AirflowException):
    """Base class for every error of this provider; its text is redacted (callbacks and logs show it)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*(redact_text(arg) if isinstance(arg, str) else arg for arg in args))


class JiMengConfigurationError(JiMengError, AirflowFailException, ValueError):
    """The connection or an argument is invalid; raised before any request is sent, never retried."""

    def __init__(self, parameter: str, message: str) -> None:
        self.parameter = parameter
        self.detail = redact_text(message)
        super().__init__(f"{parameter}: {self.detail}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Two-argument constructor: the default (cls, self.args) would rebuild with one argument.
        return (type(self), (self.parameter, self.detail))


class JiMengSpendingCapError(JiMengConfigurationError):
    """The next attempt could bill more than ``max_images_per_task`` allows: it is not sent, never retried."""

    def __init__(
        self,
        *,
        limit: int,
        billed: int = 0,
        possibly_billed: int = 0,
        in_flight: int = 0,
        requested: int = 0,
        earlier: int = 0,
    ) -> None:
        self.limit = limit
        self.billed = billed
        self.possibly_billed = possibly_billed
        self.in_flight = in_flight
        self.requested = requested
        self.earlier = earlier
        tries = f"{earlier} billed or possibly billed by earlier tries of this task instance, " if earlier else ""
        super().__init__(
            "max_images_per_task",
            f"an attempt that could bill {requested} more image(s) was not sent: {tries}{billed} billed, "
            f"{possibly_billed} possibly billed (timed out or broken answers) and {in_flight} in flight "
            f"already reach the limit of {limit}",
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_spending_cap_error,
            (self.limit, self.billed, self.possibly_billed, self.in_flight, self.requested, self.earlier),
        )


def _rebuild_spending_cap_error(
    limit: int, billed: int, possibly_billed: int, in_flight: int, requested: int, earlier: int = 0
) -> JiMengSpendingCapError:
    return JiMengSpendingCapError(
        limit=limit,
        billed=billed,
        possibly_billed=possibly_billed,
        in_flight=in_flight,
        requested=requested,
        earlier=earlier,
    )


class JiMengAPIError(JiMengError):
    """An error answered by the API (or a gateway in front of it), or an attempt whose answer never came.

    ``possibly_billed`` says whether the attempt may have generated (and billed) images all the same:
    a read timeout, a connection broken while the answer was read, a 200 answer that could not be
    read whole or parsed. An answer the service sent as an error (4xx, 5xx, 429) bills nothing.
    """

    retryable: bool = False
    #: The default of ``possibly_billed`` for the class; the constructor may say otherwise.
    possibly_billed_by_default: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        possibly_billed: bool | None = None,
    ) -> None:
        self.status_code = status_code  # type: ignore[assignment]  # AirflowException declares an HTTPStatus
        self.code = code
        self.api_message = redact_text(message)
        self.request_id = request_id
        self.param = param
        self.retry_after = retry_after
        self.possibly_billed = self.possibly_billed_by_default if possibly_billed is None else possibly_billed
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"HTTP {self.status_code}" if self.status_code else "JiMeng API error"]
        if self.code:
            parts.append(self.code)
        text = " ".join(parts) + f": {self.api_message}"
        if self.param:
            text += f" (param: {self.param})"
        if self.request_id and self.request_id not in self.api_message:
            text += f" [request id: {self.request_id}]"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor: teach pickle (used by Airflow's log shipping) how to rebuild us.
        return (
            _rebuild_api_error,
            (
                type(self),
                self.api_message,
                {
                    "status_code": self.status_code,
                    "code": self.code,
                    "request_id": self.request_id,
                    "param": self.param,
                    "retry_after": self.retry_after,
                    "possibly_billed": self.possibly_billed,
                },
            ),
        )


def _rebuild_api_error(cls: type[JiMengAPIError], message: str, kwargs: dict[str, Any]) -> JiMengAPIError:
    return cls(message, **kwargs)


class JiMengAuthenticationError(JiMengAPIError):
    """401/403: wrong key, key of another region, account overdue or service not enabled."""


class JiMengInvalidRequestError(JiMengAPIError):
    """400/404: the request was refused as invalid (bad parameter, unknown model, bad image URL)."""


class JiMengContentPolicyError(JiMengInvalidRequestError):
    """400: the prompt, a reference image or the output was blocked by content moderation."""


class JiMengRateLimitError(JiMengAPIError):
    """429: too many requests or images per minute; retried with backoff."""

    retryable = True


class JiMengQuotaExceededError(JiMengAPIError):
    """429 ``QuotaExceeded``/``SetLimitExceeded``: the spending cap is reached; retrying cannot help."""


class JiMengServerError(JiMengAPIError):
    """5xx: the service failed; retried with backoff."""

    retryable = True


class JiMengSubmitUncertainError(JiMengServerError):
    """A Visual API submit failed in a way that may have started (and billed) a task whose id never came
    (``50500``/``50501``): never re-sent blindly, since a second submit may pay a second time."""

    retryable = False
    possibly_billed_by_default = True


class JiMengTimeoutError(JiMengAPIError):
    """The connection failed or timed out; retried, but a timed-out request may still have been billed."""

    retryable = True


class JiMengResponseError(JiMengAPIError):
    """A 200 answer was not the documented shape (malformed, truncated, too large): possibly billed."""

    retryable = True
    possibly_billed_by_default = True


class JiMengDownloadError(JiMengError):
    """An image could not be downloaded (expired URL, too large, not an image)."""


class JiMengDownloadInterruptedError(JiMengDownloadError):
    """The download broke off or the image host kept failing; the URL may still work later.

    Unlike its parent (the image is gone for good), a retry of the task can fetch the image from
    the journaled URL without paying for a new generation.
    """


class JiMengStorageError(JiMengError):
    """An S3 call failed: bucket missing, access denied, S3 unreachable.

    Raised for the listing of the task's prefix, reads and writes of ``records.json`` and journals,
    and the upload or check (``HEAD``) of an image.
    """


class JiMengStorageConfigurationError(JiMengStorageError, AirflowFailException):
    """The bucket is missing or refuses these credentials before anything was paid for: not retried."""


class JiMengGenerationIncompleteError(JiMengError):
    """Some images of a run failed; those that succeeded were kept. The message lists every failure."""

    def __init__(self, failures: list[str], *, stored: int, hint: str | None = None) -> None:
        self.failures = [redact_text(failure) for failure in failures]
        self.stored = stored
        self.hint = redact_text(hint) if hint else None
        listing = "\n".join(f"  - {failure}" for failure in self.failures)
        advice = f"\n{self.hint}" if self.hint else ""
        super().__init__(f"{len(failures)} image(s) failed, {stored} stored:\n{listing}{advice}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_generation_incomplete, (type(self), self.failures, self.stored, self.hint))


class JiMengRunAbortedError(JiMengGenerationIncompleteError, AirflowFailException):
    """The run stopped on an error every try would meet (refused key, spending cap, invalid request): not retried.

    A refused key is fixed in the connection, then the task is cleared: retrying it unchanged only waits
    ``retry_delay`` to be refused again.
    """


class JiMengRunStoppedError(JiMengError):
    """The try was stopped from outside (``on_kill``, SIGTERM) before it finished.

    Nothing more was sent once it stopped; answers already paid for were journaled, so a retry
    finishes them without paying again.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"the run was stopped ({reason}): nothing more was sent; answers already paid for were journaled "
            "and a retry of the task stores them without a new request"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


def _rebuild_generation_incomplete(
    cls: type[JiMengGenerationIncompleteError], failures: list[str], stored: int, hint: str | None = None
) -> JiMengGenerationIncompleteError:
    return cls(failures, stored=stored, hint=hint)


_CONTENT_POLICY_CODES = frozenset(
    {
        "InputTextRiskDetection",
        "InputImageRiskDetection",
        "OutputImageRiskDetection",
        "ContentSecurityDetectionError",
    }
)
#: Any code naming sensitive content or a risk is a moderation refusal (``...SensitiveContentDetected``,
#: ``...RiskDetection``, and variants the fact sheet does not list yet).
_CONTENT_POLICY_WORDS = ("Sensitive", "Risk")
_QUOTA_CODES = frozenset({"QuotaExceeded", "SetLimitExceeded"})
_RATE_LIMIT_PREFIXES = (
    "ModelAccountIpmRateLimitExceeded",
    "ModelAccountRpmRateLimitExceeded",
    "ModelAccountTpmRateLimitExceeded",
    "APIAccountRpmRateLimitExceeded",
    "AccountRateLimitExceeded",
    "RateLimitExceeded",
    "RequestBurstTooFast",
    "ServerOverloaded",
    "InflightBatchsizeExceeded",
)


def error_class_for(status_code: int | None, code: str | None) -> type[JiMengAPIError]:
    """Map an HTTP status and API error code to the class that says what to do about it."""
    code = code or ""
    if status_code is None or status_code == 200:
        # Stream "error" events carry a code but no HTTP status, and a 200 answer may carry an error
        # envelope: infer the status the code implies.
        if code.startswith(_RATE_LIMIT_PREFIXES):
            status_code = 429
        elif code.startswith(("InternalServiceError", "ServiceUnavailable", "InternalError")):
            status_code = 500
    if code in _CONTENT_POLICY_CODES or any(word in code for word in _CONTENT_POLICY_WORDS):
        return JiMengContentPolicyError
    if code in _QUOTA_CODES:
        return JiMengQuotaExceededError
    if status_code == 429:
        return JiMengRateLimitError
    if status_code in (401, 403):
        return JiMengAuthenticationError
    if status_code is not None and status_code >= 500:
        return JiMengServerError
    if status_code in (400, 404, 405, 409, 413, 422):
        return JiMengInvalidRequestError
    return JiMengAPIError
