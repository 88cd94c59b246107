"""Where a Visual API request is made and answered: JiMeng 4.0 as an asynchronous submit and poll.

The Visual API (``visual.volcengineapi.com``, ``req_key: jimeng_t2i_v40``) answers a submit with a task
id and makes the images meanwhile; a poll answers the task's state and, once ``done``, its images. Requests
are signed with an access key pair (:mod:`.signing`). :class:`VisualClient` speaks it through the modules
the Ark hook (:mod:`.jimeng`) uses: connection checks (:mod:`.connection_config`), sending
(:mod:`.sending`), bounded answer reads (:mod:`.answer_body`), the retry loop (:mod:`.retry`) and pacing
(:mod:`.pacing`); only how a request is made and answered is its own. A finished task becomes the same
:class:`~airflow_provider_jimeng.api.response.GenerationResult`, so downloads and storage are shared.

Money rules: a submit starts paid work, a poll is free. A submit is retried only when it certainly started
nothing (rate limits ``50429``/``50430``, ``50511``, a connection refused before sending); one that timed
out, broke off or answered ``50500``/``50501`` may have started a billed task whose id never came, so it
is counted as possibly billed and raised, never re-sent. Polls are retried freely.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload
from urllib.parse import urlsplit

import requests

from airflow_provider_jimeng.api.response import GeneratedImage, GenerationResult, Usage
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengAuthenticationError,
    JiMengConfigurationError,
    JiMengContentPolicyError,
    JiMengInvalidRequestError,
    JiMengRateLimitError,
    JiMengResponseError,
    JiMengServerError,
    JiMengSubmitUncertainError,
    JiMengTimeoutError,
    error_class_for,
)
from airflow_provider_jimeng.hooks.answer_body import ERROR_BODY_MAX_BYTES, AnswerBody
from airflow_provider_jimeng.hooks.connection_config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETRY_BACKOFF,
    DEFAULT_RETRY_MAX_WAIT,
    connection_extras,
    is_unset,
    request_settings,
    resolve_base_url,
)
from airflow_provider_jimeng.hooks.pacing import Pacing
from airflow_provider_jimeng.hooks.retry import RetryPolicy, call_with_retries, parse_retry_after
from airflow_provider_jimeng.hooks.sending import pooled_session, send_attempt
from airflow_provider_jimeng.hooks.signing import DEFAULT_REGION, VisualCredentials, sign_request
from airflow_provider_jimeng.version_compat import BaseHook

__all__ = [
    "API_EXTRA",
    "ARK_API",
    "DONE",
    "EXPIRED",
    "FAILED",
    "FINISHED_STATES",
    "GENERATING",
    "IN_QUEUE",
    "NOT_FOUND",
    "REQ_KEY",
    "TASK_TTL_SECONDS",
    "VISUAL_API",
    "VISUAL_BASE_URL",
    "VisualClient",
    "VisualConnectionConfig",
    "VisualTaskResult",
    "build_req_json",
    "connection_api",
    "max_images_billed_visual",
    "validate_submit_body",
    "visual_config",
]

log = logging.getLogger(__name__)

VISUAL_BASE_URL = "https://visual.volcengineapi.com"
VERSION = "2022-08-31"
SUBMIT_ACTION = "CVSync2AsyncSubmitTask"
POLL_ACTION = "CVSync2AsyncGetResult"
REQ_KEY = "jimeng_t2i_v40"
#: The connection extra naming the API a ``jimeng`` connection speaks, and its two values.
API_EXTRA = "api"
ARK_API = "ark"
VISUAL_API = "visual"
#: Tasks answer ``expired`` this long after their submit.
TASK_TTL_SECONDS = 12 * 3600.0
#: Submits and polls answer quickly (a poll carries at most 15 JPEGs): a shorter default than the Ark call.
DEFAULT_VISUAL_TIMEOUT = 60.0
#: A poll answer with 15 4K JPEGs as base64 is about 100 MiB.
DEFAULT_VISUAL_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
SUCCESS = "10000"

IN_QUEUE, GENERATING, DONE, NOT_FOUND, EXPIRED = "in_queue", "generating", "done", "not_found", "expired"
#: A task ``done`` with an error code (moderation, post-processing): it made no images.
FAILED = "failed"
FINISHED_STATES = frozenset({DONE, FAILED, NOT_FOUND, EXPIRED})
_KNOWN_STATES = frozenset({IN_QUEUE, GENERATING, DONE, NOT_FOUND, EXPIRED})

_RATE_LIMIT_CODES = frozenset({"50429", "50430"})
_CONTENT_POLICY_CODES = frozenset({"50411", "50412", "50413", "50512"})
_RETRYABLE_CODES = frozenset({"50511"})
_INTERNAL_CODES = frozenset({"50500", "50501"})
_AUTH_GATEWAY_CODES = frozenset(
    {"SignatureDoesNotMatch", "InvalidAccessKey", "MissingAuthenticationToken", "InvalidCredential", "AccessDenied"}
)

# -- the submit body ------------------------------------------------------------------------------------

MAX_IMAGES = 15
MAX_REFERENCES = 10
MIN_AREA, MAX_AREA = 1024 * 1024, 4096 * 4096
MIN_RATIO, MAX_RATIO = 1 / 16, 16.0
_SUBMIT_FIELDS = (
    "req_key",
    "prompt",
    "image_urls",
    "size",
    "width",
    "height",
    "scale",
    "force_single",
    "min_ratio",
    "max_ratio",
    "seed",
)


def _number(body: Mapping[str, Any], name: str, *, integer: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "a whole number" if integer else "a number"
        raise JiMengConfigurationError(name, f"{value!r:.60} is not {kind}")
    return float(value)  # type: ignore[arg-type]  # an int or float, checked above


def _in_range(name: str, value: float | None, low: float, high: float, *, high_open: bool = False) -> None:
    if value is None:
        return
    above = value >= high if high_open else value > high
    if value < low or above:
        bracket = ")" if high_open else "]"
        raise JiMengConfigurationError(name, f"{value:g} is out of range; allowed: [{low:g}, {high:g}{bracket}")


def validate_submit_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The submit body, checked as the API documents it, before anything is sent (and paid for).

    ``req_key`` defaults to ``jimeng_t2i_v40``; a field the API does not document is refused (a misspelt
    ``force_single`` would silently let the model bill up to 15 images).
    """
    if not isinstance(body, Mapping):
        raise JiMengConfigurationError("body", "must be a JSON object (a dict) of submit fields")
    unknown = sorted(str(name) for name in body if name not in _SUBMIT_FIELDS)
    if unknown:
        raise JiMengConfigurationError(
            unknown[0], f"is not a Visual API submit field; allowed: {', '.join(_SUBMIT_FIELDS)}"
        )
    checked = {name: value for name, value in body.items() if value is not None}
    req_key = checked.setdefault("req_key", REQ_KEY)
    if req_key != REQ_KEY:
        raise JiMengConfigurationError("req_key", f"{req_key!r:.60} is not supported; allowed: {REQ_KEY!r}")
    prompt = checked.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise JiMengConfigurationError("prompt", "is required: a non-empty string")
    references = checked.get("image_urls", [])
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise JiMengConfigurationError("image_urls", "must be a list of image URLs")
    if len(references) > MAX_REFERENCES:
        raise JiMengConfigurationError(
            "image_urls", f"{len(references)} images given; allowed: at most {MAX_REFERENCES}"
        )
    for url in references:
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise JiMengConfigurationError("image_urls", "each reference must be an http(s) URL of a JPEG or PNG")
    if references:
        checked["image_urls"] = list(references)
    width, height = _number(checked, "width", integer=True), _number(checked, "height", integer=True)
    if (width is None) != (height is None):
        raise JiMengConfigurationError(
            "height" if height is None else "width", "is missing: width and height go together, give both or neither"
        )
    if width is not None and height is not None:
        if width <= 0 or height <= 0:
            raise JiMengConfigurationError("width", "width and height must be positive")
        area = width * height
        if not MIN_AREA <= area <= MAX_AREA:
            raise JiMengConfigurationError(
                "width", f"width*height is {area:g} pixels; allowed: [{MIN_AREA} (1024x1024), {MAX_AREA} (4096x4096)]"
            )
        _in_range("width", width / height, MIN_RATIO, MAX_RATIO, high_open=True)
    _in_range("size", _number(checked, "size", integer=True), MIN_AREA, MAX_AREA)
    _in_range("scale", _number(checked, "scale"), 0, 1)
    ratios = [_number(checked, name) for name in ("min_ratio", "max_ratio")]
    for name, ratio in zip(("min_ratio", "max_ratio"), ratios, strict=True):
        _in_range(name, ratio, MIN_RATIO, MAX_RATIO, high_open=True)
    if ratios[0] is not None and ratios[1] is not None and ratios[0] > ratios[1]:
        raise JiMengConfigurationError("min_ratio", f"{ratios[0]:g} is above max_ratio {ratios[1]:g}")
    if "force_single" in checked and not isinstance(checked["force_single"], bool):
        raise JiMengConfigurationError("force_single", f"{checked['force_single']!r:.60} is not a boolean")
    _in_range("seed", _number(checked, "seed", integer=True), -1, 2**32 - 1)
    return checked


def max_images_billed_visual(body: Mapping[str, Any]) -> int:
    """The most images one submit can bill: one with ``force_single``, else up to 15 minus the references."""
    if body.get("force_single") is True:
        return 1
    return max(1, MAX_IMAGES - len(body.get("image_urls") or []))


def build_req_json(
    *,
    return_url: bool = False,
    add_logo: bool = False,
    logo_info: Mapping[str, Any] | None = None,
    aigc_meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The poll's ``req_json`` choice (sent as a JSON string): URLs or base64, and the watermark."""
    choice: dict[str, Any] = {"return_url": return_url, "logo_info": {**(logo_info or {}), "add_logo": add_logo}}
    if aigc_meta:
        choice["aigc_meta"] = dict(aigc_meta)
    return choice


def _req_json_text(req_json: Mapping[str, Any] | str | None) -> str | None:
    if req_json is None:
        return None
    if isinstance(req_json, str):
        try:
            decoded = json.loads(req_json)
        except ValueError:
            raise JiMengConfigurationError("req_json", "is not valid JSON; allowed: a JSON object") from None
        req_json = decoded
    if not isinstance(req_json, Mapping):
        raise JiMengConfigurationError("req_json", 'must be a JSON object such as {"return_url": true}')
    logo = req_json.get("logo_info", {})
    if not isinstance(logo, Mapping) or not isinstance(logo.get("add_logo", False), bool):
        raise JiMengConfigurationError("req_json", "logo_info must be an object whose add_logo is a boolean")
    if not isinstance(req_json.get("return_url", False), bool):
        raise JiMengConfigurationError("req_json", "return_url must be a boolean")
    return json.dumps(dict(req_json), ensure_ascii=False, separators=(",", ":"))


# -- the connection -------------------------------------------------------------------------------------


def connection_api(extras: Mapping[str, Any]) -> str:
    """Which API a ``jimeng`` connection speaks: its ``api`` extra, ``ark`` (the default) or ``visual``."""
    value = extras.get(API_EXTRA)
    if is_unset(value):
        return ARK_API
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text not in (ARK_API, VISUAL_API):
        raise JiMengConfigurationError(
            API_EXTRA, f"{value!r:.60} is not an API; allowed: {ARK_API!r} or {VISUAL_API!r}"
        )
    return text


@dataclass(frozen=True)
class VisualConnectionConfig:
    """Everything the Visual API client needs from a connection, resolved and checked once."""

    endpoint: str
    credentials: VisualCredentials
    timeout: float = DEFAULT_VISUAL_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    retry_backoff: float = DEFAULT_RETRY_BACKOFF
    retry_max_wait: float = DEFAULT_RETRY_MAX_WAIT
    #: The ``watermark`` extra: whether a poll without its own ``req_json`` asks for the logo.
    watermark: bool = True
    max_images_per_minute: float | None = None
    proxies: dict[str, str] | None = field(default=None, repr=False)
    verify: bool | str = True
    allow_http: bool = False
    max_response_bytes: int = DEFAULT_VISUAL_MAX_RESPONSE_BYTES

    def action_url(self, action: str) -> str:
        return f"{self.endpoint}/?Action={action}&Version={VERSION}"

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint).netloc


def _visual_endpoint(host: str | None, schema: str | None, port: int | None) -> str:
    if not (host or "").strip():
        return VISUAL_BASE_URL
    base = resolve_base_url(host, schema, port)
    parts = urlsplit(base)
    if parts.path not in ("", "/"):
        raise JiMengConfigurationError(
            "host",
            f"the Visual API is served at the host's root; allowed: {VISUAL_BASE_URL} (default) or "
            f"{parts.scheme}://{parts.netloc}, without the path {parts.path!r:.60}",
        )
    return f"{parts.scheme}://{parts.netloc}"


def visual_config(
    conn: Any,
    *,
    timeout: float | None = None,
    max_retries: int | None = None,
    retry_backoff: float | None = None,
    retry_max_wait: float | None = None,
) -> VisualConnectionConfig:
    """Read a ``jimeng`` connection for the Visual API (extra ``api: visual``): access key id in ``login``,
    secret in ``password``.

    ``host`` defaults to :data:`VISUAL_BASE_URL`; the ``region`` extra to ``cn-north-1``. Plain http is
    refused unless the ``allow_http`` extra is set. The extras shared with the Ark API (timeouts, retries,
    proxies, verify, ``watermark``, ``max_images_per_minute``) are checked by the same functions.
    """
    conn_id = getattr(conn, "conn_id", None) or "jimeng"
    extras = connection_extras(conn, '{"api": "visual"}')
    if connection_api(extras) != VISUAL_API:
        raise JiMengConfigurationError(
            API_EXTRA,
            f"connection {conn_id!r} speaks the Ark API; allowed here: {VISUAL_API!r} "
            '(set the extra {"api": "visual"} on a connection holding an access key pair)',
        )
    access_key_id = (conn.login or "").strip()
    secret = (conn.password or "").strip()
    if not access_key_id:
        raise JiMengConfigurationError(
            "login", f"connection {conn_id!r} has no access key id; put it in the login field"
        )
    if not secret:
        raise JiMengConfigurationError(
            "password", f"connection {conn_id!r} has no secret access key; put it in the password field"
        )
    region_extra = extras.get("region")
    region = DEFAULT_REGION if is_unset(region_extra) else str(region_extra).strip()
    credentials = VisualCredentials(access_key_id, secret, region=region)  # masks the secret
    endpoint = _visual_endpoint(conn.host, conn.schema, conn.port)
    return VisualConnectionConfig(
        endpoint=endpoint,
        credentials=credentials,
        **request_settings(
            extras,
            endpoint,
            default_timeout=DEFAULT_VISUAL_TIMEOUT,
            default_max_response_bytes=DEFAULT_VISUAL_MAX_RESPONSE_BYTES,
            timeout=timeout,
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            retry_max_wait=retry_max_wait,
        ),
    )


# -- outcomes -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisualTaskResult:
    """What one poll said about a task: its state and, once ``done``, its images as a GenerationResult.

    ``status`` is one of ``in_queue``, ``generating``, ``done``, ``failed`` (done with an error code, no
    images), ``not_found`` and ``expired``. A ``failed`` task's ``error_code`` says why; ``retryable``
    whether a new submit could succeed (``50511``, post-processing) or would meet the same refusal.
    """

    task_id: str
    status: str
    result: GenerationResult | None = None
    error_code: str | None = None
    error_message: str | None = None
    retryable: bool = False
    request_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATES

    def summary(self) -> dict[str, Any]:
        """A JSON-safe summary without images or URLs (for trigger events, journals and logs)."""
        return {
            "status": self.status,
            "images": len(self.result.succeeded) if self.result is not None else 0,
            "error_code": self.error_code,
            "error_message": self.error_message,
            "retryable": self.retryable,
            "request_id": self.request_id,
        }


def _result_from_data(task_id: str, data: Mapping[str, Any], request_id: str | None) -> GenerationResult:
    urls = data.get("image_urls") or []
    blobs = data.get("binary_data_base64") or []
    images: list[GeneratedImage] = []
    if isinstance(urls, list) and urls:
        images = [
            GeneratedImage(index=index, url=url)
            if isinstance(url, str) and url
            else GeneratedImage(index=index, error_code="MissingImage", error_message="empty image URL")
            for index, url in enumerate(urls)
        ]
    elif isinstance(blobs, list) and blobs:
        images = [
            GeneratedImage(index=index, b64_json=blob)
            if isinstance(blob, str) and blob
            else GeneratedImage(index=index, error_code="MissingImage", error_message="empty image data")
            for index, blob in enumerate(blobs)
        ]
    if not images:
        raise JiMengResponseError(
            f"task {task_id} is done but the answer carries no image_urls or binary_data_base64",
            status_code=200,
            code="MalformedResponse",
            request_id=request_id,
        )
    delivered = sum(1 for image in images if image.ok)
    return GenerationResult(
        model=REQ_KEY, created=None, images=images, usage=Usage(generated_images=delivered), request_id=request_id
    )


# -- the client -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """One answered request: its ``data`` object, request id and the typed error its codes say, if any."""

    data: Mapping[str, Any]
    request_id: str
    error: JiMengAPIError | None


class VisualClient:
    """Submit and poll JiMeng 4.0 tasks through the Visual API; thread-safe, one pooled session.

    Build it from a connection (:meth:`from_conn_id` on a worker, :meth:`from_connection` with a
    connection read asynchronously in the triggerer) or from a :class:`VisualConnectionConfig`.
    """

    def __init__(self, config: VisualConnectionConfig, *, pool_maxsize: int = 16) -> None:
        self.config = config
        self.retry_policy = RetryPolicy(
            max_retries=config.max_retries, backoff=config.retry_backoff, max_wait=config.retry_max_wait
        )
        self._pool_maxsize = pool_maxsize
        self._session: requests.Session | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pacing = Pacing(images_per_minute=config.max_images_per_minute, stop=self._stop, log=log)
        self._counts: dict[str, int] = {
            "submits": 0,
            "submit_attempts": 0,
            "possibly_billed_submits": 0,
            "polls": 0,
            "poll_attempts": 0,
            "rate_limited": 0,
            "retries": 0,
        }

    @classmethod
    def from_connection(cls, conn: Any, **overrides: Any) -> VisualClient:
        return cls(visual_config(conn, **overrides))

    @classmethod
    def from_conn_id(cls, conn_id: str = "jimeng_default", **overrides: Any) -> VisualClient:
        return cls.from_connection(BaseHook.get_connection(conn_id), **overrides)

    @property
    def stats(self) -> dict[str, int]:
        """Counters (a snapshot): ``submits`` answered with a task id, ``possibly_billed_submits`` (timed out,
        broke off, ``50500``/``50501``: a task may run, billed, its id unknown), ``polls``, attempts of each,
        ``rate_limited`` answers and ``retries`` made."""
        with self._lock:
            return dict(self._counts)

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _session_for_requests(self) -> requests.Session:
        with self._lock:
            if self._session is None:
                self._session = pooled_session(
                    pool_maxsize=self._pool_maxsize,
                    pool_connections=2,
                    headers={"Accept": "application/json"},
                    proxies=self.config.proxies,
                    verify=self.config.verify,
                )
            return self._session

    def close(self) -> None:
        """Stop retry waits and close pooled connections."""
        self._stop.set()
        with self._lock:
            if self._session is not None:
                self._session.close()
            self._session = None

    def __enter__(self) -> VisualClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request ------------------------------------------------------------------------------------
    def _call(self, action: str, body: Mapping[str, Any]) -> _Answer:
        """Sign and send one request; its answer, with the typed error it carries (not raised).

        Raises :class:`JiMengTimeoutError` when no answer came (``possibly_billed`` once the request may
        have left) and :class:`JiMengResponseError` for a 200 that could not be read whole or parsed.
        """
        config = self.config
        url = config.action_url(action)
        raw = json.dumps(dict(body), ensure_ascii=False).encode("utf-8")
        client_request_id = uuid.uuid4().hex
        # Every x-* header is signed: the request id goes in before signing, not after.
        unsigned = {"Content-Type": "application/json", "X-Client-Request-Id": client_request_id}
        headers = sign_request(config.credentials, "POST", url, headers=unsigned, body=raw)
        response = send_attempt(
            self._session_for_requests(),
            url,
            data=raw,
            settings=config,
            read_timeout=config.timeout,
            request_id=client_request_id,
            headers=headers,
        )
        request_id = response.headers.get("x-request-id") or client_request_id
        try:
            limit = config.max_response_bytes if response.status_code == 200 else ERROR_BODY_MAX_BYTES
            content = AnswerBody(
                response, max_bytes=limit, deadline_seconds=config.timeout * 3, request_id=request_id, stop=self._stop
            ).read_all()
        finally:
            response.close()
        try:
            payload = json.loads(content)
        except ValueError:
            if response.status_code == 200:
                raise JiMengResponseError(
                    "the answer is not valid JSON", status_code=200, code="MalformedResponse", request_id=request_id
                ) from None
            payload = None
        if isinstance(payload, Mapping) and isinstance(payload.get("request_id"), str):
            request_id = payload["request_id"]
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        error = self._error_from_answer(response.status_code, payload, request_id, retry_after, response.reason)
        if isinstance(error, JiMengRateLimitError):
            self._count("rate_limited")
        data = payload.get("data") if isinstance(payload, Mapping) else None
        return _Answer(data if isinstance(data, Mapping) else {}, request_id, error)

    @staticmethod
    def _error_from_answer(
        status: int, payload: Any, request_id: str, retry_after: float | None, reason: str | None
    ) -> JiMengAPIError | None:
        """The typed error of an answer, or ``None`` for a success (the gateway's and the body's codes)."""
        metadata = payload.get("ResponseMetadata") if isinstance(payload, Mapping) else None
        gateway = metadata.get("Error") if isinstance(metadata, Mapping) else None
        if isinstance(gateway, Mapping) and gateway.get("Code"):
            code = str(gateway["Code"])
            message = str(gateway.get("Message") or code)[:300]
            cls: type[JiMengAPIError] = (
                JiMengAuthenticationError if code in _AUTH_GATEWAY_CODES else error_class_for(status, code)
            )
            return cls(message, status_code=status, code=code, request_id=request_id, retry_after=retry_after)
        if not isinstance(payload, Mapping) or "code" not in payload:
            if status == 200:
                return JiMengResponseError(
                    "the answer has no 'code'", status_code=200, code="MalformedResponse", request_id=request_id
                )
            return error_class_for(status, None)(
                (reason or "no error message")[:300], status_code=status, request_id=request_id, retry_after=retry_after
            )
        code = str(payload.get("code"))
        if code == SUCCESS:
            return None
        message = str(payload.get("message") or code)[:300]
        kwargs: dict[str, Any] = {"status_code": status, "code": code, "request_id": request_id}
        if code in _RATE_LIMIT_CODES:
            return JiMengRateLimitError(message, retry_after=retry_after, **kwargs)
        if code in _CONTENT_POLICY_CODES:
            return JiMengContentPolicyError(message, **kwargs)
        if code in _RETRYABLE_CODES or code in _INTERNAL_CODES:
            return JiMengServerError(message, retry_after=retry_after, **kwargs)
        if status and 400 <= status < 500:
            return JiMengInvalidRequestError(message, **kwargs)
        return error_class_for(status, code)(message, retry_after=retry_after, **kwargs)

    # -- submit -----------------------------------------------------------------------------------------
    def submit(self, body: Mapping[str, Any]) -> str:
        """Validate ``body``, submit it once and return the task id.

        Retried (with backoff) only when nothing was started: ``50429``/``50430``, ``50511``, a connection
        that never opened. A submit that may have started a billed task whose id never came is counted in
        ``stats["possibly_billed_submits"]`` and raised (:class:`JiMengSubmitUncertainError` for
        ``50500``/``50501``, :class:`JiMengTimeoutError` or :class:`JiMengResponseError` with
        ``possibly_billed``): re-sending it blindly may pay twice.
        """
        checked = validate_submit_body(body)
        images = max_images_billed_visual(checked)

        def attempt(number: int) -> str:
            self._pacing.wait(REQ_KEY, images)
            self._count("submit_attempts")
            try:
                answer = self._call(SUBMIT_ACTION, checked)
                if answer.error is not None:
                    raise answer.error
                task_id = answer.data.get("task_id")
                if not isinstance(task_id, str) or not task_id:
                    raise JiMengResponseError(
                        "the submit was accepted but its answer carries no task_id",
                        status_code=200,
                        code="MalformedResponse",
                        request_id=answer.request_id,
                    )
            except JiMengAPIError as error:
                if error.code in _INTERNAL_CODES or (error.status_code or 0) >= 500:
                    # A server error on a submit may have come after the task was started.
                    error = JiMengSubmitUncertainError(
                        f"{error.api_message}; a task may have started (and be billed) though its id never came: "
                        "not re-sent",
                        status_code=error.status_code,
                        code=error.code,
                        request_id=error.request_id,
                    )
                if error.possibly_billed:
                    self._count("possibly_billed_submits")
                    if not self.retry_policy.should_retry(error, number):  # else the retry loop says it
                        log.warning(
                            "JiMeng Visual API submit failed (%s, request id %s) and may have started a billed "
                            "task whose id is unknown; it is not re-sent",
                            error.code or type(error).__name__,
                            error.request_id or "n/a",
                        )
                raise error from None
            self._count("submits")
            log.info(
                "JiMeng Visual API task %s submitted (request id %s, images<=%d)", task_id, answer.request_id, images
            )
            return task_id

        return call_with_retries(
            attempt,
            policy=self.retry_policy,
            stop=self._stop,
            log=log,
            subject="JiMeng Visual API submit",
            on_retry=lambda: self._count("retries"),
            max_billed_retries=0,
            billed_refusal="a submit that may have started a billed task whose id is unknown is never re-sent",
            stopped_message="the client was closed before the submit was sent",
        )

    # -- poll -------------------------------------------------------------------------------------------
    def default_req_json(self) -> dict[str, Any]:
        """The poll choice when the caller gives none: base64 images, the logo as the ``watermark`` extra says."""
        return build_req_json(return_url=False, add_logo=self.config.watermark)

    def poll_once(self, task_id: str, req_json: Mapping[str, Any] | str | None = None) -> VisualTaskResult:
        """One poll request, no retry: the task's state, or the typed error of the answer.

        A content-policy code (``50411``-``50413``, ``50512``) or ``50511`` on a ``done`` task is the
        task's outcome (``failed``), not an exception; gateway, rate-limit and server errors raise.
        """
        if not isinstance(task_id, str) or not task_id.strip():
            raise JiMengConfigurationError("task_id", "must be a non-empty string")
        body: dict[str, Any] = {"req_key": REQ_KEY, "task_id": task_id}
        text = _req_json_text(self.default_req_json() if req_json is None else req_json)
        if text is not None:
            body["req_json"] = text
        self._count("poll_attempts")
        answer = self._call(POLL_ACTION, body)
        error, data, request_id = answer.error, answer.data, answer.request_id
        if error is not None:
            refused = isinstance(error, JiMengContentPolicyError)
            if refused or (error.code in _RETRYABLE_CODES and data.get("status") == DONE):
                # Refused by moderation, or done with its post-processing failed: the task made no images.
                self._count("polls")
                return VisualTaskResult(
                    task_id,
                    FAILED,
                    error_code=error.code,
                    error_message=error.api_message,
                    retryable=not refused,
                    request_id=request_id,
                )
            raise error
        status = data.get("status")
        if status not in _KNOWN_STATES:
            raise JiMengResponseError(
                f"task {task_id}: unknown status {str(status)[:40]!r}",
                status_code=200,
                code="MalformedResponse",
                request_id=request_id,
            )
        self._count("polls")
        if status != DONE:
            return VisualTaskResult(task_id, status, request_id=request_id)
        return VisualTaskResult(
            task_id, DONE, result=_result_from_data(task_id, data, request_id), request_id=request_id
        )

    @overload
    def poll(  # type: ignore[overload-overlap]  # a str is a Sequence[str]: the str overload is matched first
        self, task_ids: str, req_json: Mapping[str, Any] | str | None = None
    ) -> VisualTaskResult: ...

    @overload
    def poll(
        self, task_ids: Sequence[str], req_json: Mapping[str, Any] | str | None = None
    ) -> dict[str, VisualTaskResult]: ...

    def poll(
        self, task_ids: str | Sequence[str], req_json: Mapping[str, Any] | str | None = None
    ) -> VisualTaskResult | dict[str, VisualTaskResult]:
        """Poll one task (a result) or several (a dict by task id), retrying rate limits, server errors and
        broken answers with backoff: polls are free. Authentication and invalid-request errors raise."""
        if isinstance(task_ids, str):
            return self._poll_with_retries(task_ids, req_json)
        return {task_id: self._poll_with_retries(task_id, req_json) for task_id in task_ids}

    def _poll_with_retries(self, task_id: str, req_json: Mapping[str, Any] | str | None) -> VisualTaskResult:
        # Polls are free: one that timed out or broke off is retried like any other.
        return call_with_retries(
            lambda number: self.poll_once(task_id, req_json),
            policy=self.retry_policy,
            stop=self._stop,
            log=log,
            subject=f"JiMeng Visual API poll of task {task_id}",
            on_retry=lambda: self._count("retries"),
            max_billed_retries=None,
        )

    # -- test connection --------------------------------------------------------------------------------
    def test_connection(self) -> tuple[bool, str]:
        """Prove the key pair without paying: poll a task id that cannot exist and expect ``not_found``."""
        host = self.config.host
        probe = f"airflow-jimeng-connection-test-{uuid.uuid4().hex[:12]}"
        try:
            outcome = self.poll_once(probe, build_req_json())
        except JiMengAuthenticationError as error:
            return False, (
                f"The access key pair was rejected by {host} ({error.code}); check the access key id (login), "
                f"the secret access key (password) and the region ({self.config.credentials.region})"
            )
        except JiMengTimeoutError as error:
            return False, f"Cannot reach {host} ({error.code}); check the host and network/proxy"
        except JiMengAPIError as error:
            return False, f"Unexpected answer from {host}: {error}"
        if outcome.status == NOT_FOUND:
            return (
                True,
                f"Connection OK: {host} accepted the signature (Visual API, region {self.config.credentials.region})",
            )
        return False, f"Unexpected answer from {host}: a probe task answered {outcome.status!r}"
