"""Where requests are sent: :class:`JiMengHook` holds the ``jimeng`` connection and talks HTTP."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.exceptions import HTTPError as Urllib3Error

from airflow_provider_jimeng.api.capabilities import DEFAULT_BYTEPLUS_MODEL, DEFAULT_MODEL
from airflow_provider_jimeng.api.request import max_images_billed
from airflow_provider_jimeng.api.response import (
    GenerationResult,
    api_error_from_payload,
    parse_event_stream,
    parse_generation,
)
from airflow_provider_jimeng.budget import Reservation, SpendingCap
from airflow_provider_jimeng.connections import missing_connection
from airflow_provider_jimeng.exceptions import (
    JiMengAPIError,
    JiMengConfigurationError,
    JiMengDownloadError,
    JiMengDownloadInterruptedError,
    JiMengResponseError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.connection_form import (
    BYTEPLUS_BASE_URL,
    CHINA_BASE_URL,
    CONNECTION_EXTRAS,
    GENERATIONS_PATH,
    OFFICIAL_HOST_SUFFIXES,
    UI_FIELD_BEHAVIOUR,
)
from airflow_provider_jimeng.hooks.retry import ImageRatePacer, RetryPolicy, parse_retry_after
from airflow_provider_jimeng.options import GenerationOptions, as_int, as_text
from airflow_provider_jimeng.redaction import install_log_redaction, redact_url, register_secret
from airflow_provider_jimeng.version_compat import AirflowNotFoundException, BaseHook, mask_secret

if TYPE_CHECKING:
    from airflow_provider_jimeng.coordination.ratelimit import AccountRateLimiter, Grant

DEFAULT_TIMEOUT = 300.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_RETRIES = 5
DEFAULT_MAX_BILLED_RETRIES = 1
DEFAULT_RETRY_BACKOFF = 2.0
DEFAULT_RETRY_MAX_WAIT = 120.0
#: A generation answer's body may take this many read timeouts in all (a stream of a 15-image 4K set
#: lasts minutes; a server trickling bytes would otherwise hold the task forever).
RESPONSE_DEADLINE_TIMEOUTS = 3
#: The most a generation answer may weigh: a set of 15 4K images as base64 is about 150 MiB.
DEFAULT_MAX_RESPONSE_BYTES = 512 * 1024 * 1024
#: Error bodies and connection tests are small: read at most this much of them.
ERROR_BODY_MAX_BYTES = 1024 * 1024
DEFAULT_DOWNLOAD_MAX_BYTES = 64 * 1024 * 1024
DOWNLOAD_CHUNK_BYTES = 1024 * 1024
SSE_CHUNK_BYTES = 64 * 1024

# Signed URLs, bodies and signatures in urllib3's and botocore's DEBUG lines: cut before any handler sees them.
install_log_redaction()

_T = TypeVar("_T")
_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})
#: What a templated or hand-edited extra holds when it means "not set".
_UNSET_WORDS = frozenset({"", "none", "null"})


def _is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _UNSET_WORDS)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_bool(parameter: str, value: Any, default: bool) -> bool:
    if _is_unset(value):
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE_WORDS:
            return True
        if text in _FALSE_WORDS:
            return False
    elif isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise JiMengConfigurationError(parameter, f"{_shown(value)} is not a boolean; allowed: true or false")


def _as_number(
    parameter: str, value: Any, default: float | None, *, minimum: float, whole: bool = False
) -> float | None:
    """A finite number >= ``minimum`` (whole if asked) from JSON or a URI string; unset means ``default``."""
    if _is_unset(value):
        return default
    kind = "a whole number" if whole else "a number"
    allowed = f"allowed: {kind} >= {minimum:g}"
    number: float | None = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):
            number = None
    if number is None:
        raise JiMengConfigurationError(parameter, f"{_shown(value)} is not a number; {allowed}")
    if not math.isfinite(number):
        raise JiMengConfigurationError(parameter, f"{_shown(value)} is not a finite number; {allowed}")
    if whole and not number.is_integer():
        raise JiMengConfigurationError(parameter, f"{_shown(value)} is not a whole number; {allowed}")
    if number < minimum:
        raise JiMengConfigurationError(parameter, f"{_shown(value)} is below the minimum of {minimum:g}")
    return number


def _as_int(parameter: str, value: Any, default: int, *, minimum: int) -> int:
    return int(_as_number(parameter, value, default, minimum=minimum, whole=True) or 0)


#: The most images a gateway's ``images_per_request`` may say: above, it is a typo, not a gateway.
MAX_IMAGES_PER_REQUEST_EXTRA = 100


def _as_images_per_request(value: Any) -> int | None:
    """The ``images_per_request`` extra: a whole number from 1 to 100, or unset."""
    if _is_unset(value):
        return None
    number = _as_int("images_per_request", value, 1, minimum=1)
    if number > MAX_IMAGES_PER_REQUEST_EXTRA:
        raise JiMengConfigurationError(
            "images_per_request",
            f"{_shown(value)} is above the maximum of {MAX_IMAGES_PER_REQUEST_EXTRA}; allowed: a whole number "
            f"from 1 to {MAX_IMAGES_PER_REQUEST_EXTRA}, the images the endpoint answers (and bills) per request",
        )
    return number


#: The characters Airflow allows in a connection id (``airflow.models.connection.RE_SANITIZE_CONN_ID``).
_CONN_ID = re.compile(r"^[\w#!()\-.:/\\]{1,250}$")


def _as_conn_id(parameter: str, value: Any) -> str | None:
    """A connection id; an unrendered template or a rendered list is refused here, not at first use."""
    if _is_unset(value):
        return None
    conn_id = as_text(parameter, value, allowed="a connection id")
    if conn_id is None or not _CONN_ID.match(conn_id):
        raise JiMengConfigurationError(
            parameter, f"{_shown(value)} is not a connection id; allowed: letters, digits and _#!()-.:/\\"
        )
    return conn_id


def _as_proxies(value: Any) -> dict[str, str] | None:
    allowed = 'must be a JSON object of scheme to proxy URL, like {"https": "http://proxy:3128"}'
    if _is_unset(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise JiMengConfigurationError("proxies", allowed) from None
        if value is None:
            return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise JiMengConfigurationError("proxies", allowed)  # the value may hold proxy credentials: not shown
    return value or None


def _as_verify(value: Any) -> bool | str:
    """``true``/``false`` (any spelling :func:`_as_bool` takes) or the path of a CA bundle."""
    if isinstance(value, str) and not _is_unset(value) and value.strip().lower() not in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip()
    try:
        return _as_bool("verify", value, True)
    except JiMengConfigurationError:
        raise JiMengConfigurationError(
            "verify", f"{_shown(value)} is not allowed; allowed: true, false, or the path of a CA bundle"
        ) from None


def _check_api_key(api_key: str) -> None:
    """Refuse a key that cannot go into an ``Authorization`` header, naming the problem, never the key.

    A key pasted with a zero-width space, a look-alike Cyrillic letter or a line break would fail in
    the HTTP client (or, a line break, be taken for a request that may have been billed and retried).
    """
    for position, char in enumerate(api_key):
        if " " < char < "\x7f":
            continue
        what = f"U+{ord(char):04X} ({unicodedata.name(char, 'a control character')})"
        raise JiMengConfigurationError(
            "password",
            f"the API key has {what} at position {position + 1} of {len(api_key)} (the key is not shown); "
            "allowed: printable ASCII without spaces, as the console shows the key (check for a pasted "
            "line break, zero-width space or look-alike letter)",
        )


def _first(override: Any, extra: Any) -> Any:
    """A hook argument wins over the connection's extra when it is given (``0`` included)."""
    return override if override is not None else extra


def _never_connected(exc: requests.ConnectionError) -> bool:
    """Whether a connection error came before the request left: refused, unresolvable, proxy refused."""
    if isinstance(exc, requests.exceptions.ProxyError):
        return True
    cause = exc.args[0] if exc.args else None
    cause = getattr(cause, "reason", cause)  # urllib3's MaxRetryError wraps the cause
    return isinstance(cause, (NewConnectionError, ConnectTimeoutError))


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class JiMengConnectionConfig:
    """Everything a hook needs from its connection, resolved and checked once."""

    base_url: str
    api_key: str = field(repr=False)
    model: str
    timeout: float
    connect_timeout: float
    max_retries: int
    retry_backoff: float
    retry_max_wait: float
    watermark: bool
    max_images_per_minute: float | None
    proxies: dict[str, str] | None
    verify: bool | str
    allow_http: bool
    #: Retries of a request whose previous attempt may have been billed (timed out, broke off).
    max_billed_retries: int = DEFAULT_MAX_BILLED_RETRIES
    #: The longest a generation answer's body (a whole event stream) may take once its headers are in.
    response_deadline: float = DEFAULT_TIMEOUT * RESPONSE_DEADLINE_TIMEOUTS
    #: The most bytes a generation answer may have.
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    #: A redis connection every worker reaches: shared rate limiter and journals (docs/scaling.md).
    redis_conn_id: str | None = None
    #: The account's images per minute, kept by the shared limiter across every task using the key.
    account_images_per_minute: float | None = None
    #: What every request bills at least, on a gateway that always answers with this many images.
    images_per_request: int | None = None

    @property
    def generations_url(self) -> str:
        return self.base_url + GENERATIONS_PATH


def refused_key_message(host: str, status: int | None, code: str | None) -> str:
    """What a refused key means, for the connection test and the task log alike."""
    return (
        f"The API key was rejected by {host} (HTTP {status} {code or ''}). Keys are regional: a China "
        f"key only works on {urlsplit(CHINA_BASE_URL).netloc}, a BytePlus key on "
        f"{urlsplit(BYTEPLUS_BASE_URL).netloc}, a gateway's key only on that gateway."
    ).replace("  ", " ")


def wrong_path_message(generations_url: str, status: int | None) -> str:
    """What a 404/405 from the generations URL means (the base URL's path is wrong), for the test and the task."""
    return (
        f"{redact_url(generations_url, shorten=False)} does not exist on that host (HTTP {status}): the base URL "
        f"should be everything before {GENERATIONS_PATH} (the connection's host), e.g. {CHINA_BASE_URL} or "
        "https://<gateway>/v1"
    )


def resolve_base_url(host: str | None, schema: str | None = None, port: int | None = None) -> str:
    """Turn the connection's host (and, from URI form, schema/port) into the API base URL."""
    host = (host or "").strip()
    if not host:
        return CHINA_BASE_URL
    if "://" not in host:
        if "/" in host:
            raise JiMengConfigurationError(
                "host",
                f"base URL {host[:100]!r} has no scheme; write it in full, e.g. https://{host[:60]}",
            )
        netloc = f"{host}:{port}" if port else host
        path = f"/{schema.strip('/')}" if schema and schema.strip("/") else ""
        if not path and host.endswith(OFFICIAL_HOST_SUFFIXES):
            path = "/api/v3"
        host = f"https://{netloc}{path}"
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise JiMengConfigurationError(
            "host", f"base URL {host[:100]!r} must be an http(s) URL such as {CHINA_BASE_URL}"
        )
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise JiMengConfigurationError(
            "host", "base URL may not carry a query, fragment or credentials; put the key in the password"
        )
    base = host.rstrip("/")
    if base.endswith(GENERATIONS_PATH):
        base = base[: -len(GENERATIONS_PATH)]
    if parts.path.strip("/") == "" and (parts.hostname or "").endswith(OFFICIAL_HOST_SUFFIXES):
        base += "/api/v3"  # "https://ark.cn-beijing.volces.com" means the API there, as the bare host does
    return base


class _BoundedBody:
    """A streamed response body read as it arrives, within a size cap and an overall deadline.

    Read timeouts bound each socket read; the deadline bounds the whole body (a host trickling bytes
    would otherwise keep a task busy forever) and the cap its size. Subclasses say which errors a
    broken, slow, oversized or short body raises.
    """

    def __init__(
        self,
        response: requests.Response,
        *,
        max_bytes: int,
        label: str,
        deadline_seconds: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._response = response
        # Raw reads skip requests' decoding: a gzip answer (gateways send them) must come out decoded.
        response.raw.decode_content = True
        self._max_bytes = max_bytes
        self._label = label
        self._stop = stop
        self._deadline_seconds = deadline_seconds
        self._deadline = time.monotonic() + deadline_seconds if deadline_seconds else None
        self.bytes_read = 0
        self.content_type = response.headers.get("Content-Type", "")
        length = response.headers.get("Content-Length")
        self.content_length = int(length) if length and length.isdigit() else None
        # A compressed body decodes to another length: only an identity body can be checked against it.
        self._length_checkable = response.headers.get("Content-Encoding", "").strip().lower() in ("", "identity")
        if self.content_length is not None and self.content_length > max_bytes:
            response.close()
            raise self._too_large(announced=True)

    # Errors; each message names the body by ``self._label`` (never a full URL).
    def _broken(self, exc: BaseException, received: int) -> Exception:
        raise NotImplementedError

    def _too_slow(self, received: int, *, stopped: bool = False) -> Exception:
        """The deadline passed, or (``stopped``) the hook was closed while the body came."""
        raise NotImplementedError

    def _too_large(self, *, announced: bool) -> Exception:
        raise NotImplementedError

    def _ended_early(self) -> Exception:
        raise NotImplementedError

    def read(self, size: int = -1) -> bytes:
        """File-like read of ``size`` bytes (fewer only at the end), so S3 uploads can consume the body.

        Reads whatever has arrived (``read1``) until ``size`` bytes are there, checking the deadline in
        between: a plain ``read(size)`` blocks until all of them arrive, however slowly they trickle.
        """
        want = DOWNLOAD_CHUNK_BYTES if size is None or size < 0 else size
        # urllib3 < 2 has no read1: a plain read then (the deadline is checked between chunks only).
        read_some = getattr(self._response.raw, "read1", self._response.raw.read)
        pieces: list[bytes] = []
        received = 0
        while received < want:
            try:
                piece = read_some(want - received)
            except (requests.RequestException, Urllib3Error, OSError) as exc:  # raw reads raise urllib3's errors
                self._response.close()
                raise self._broken(exc, self.bytes_read + received) from None
            if not piece:
                break
            pieces.append(piece)
            received += len(piece)
            if self._deadline is not None and time.monotonic() > self._deadline:
                self._response.close()
                raise self._too_slow(self.bytes_read + received)
            if self._stop is not None and self._stop.is_set():
                self._response.close()
                raise self._too_slow(self.bytes_read + received, stopped=True)
            if self.bytes_read + received > self._max_bytes:
                break
        chunk = b"".join(pieces)
        self.bytes_read += len(chunk)
        if self.bytes_read > self._max_bytes:
            self._response.close()
            raise self._too_large(announced=False)
        if (
            not chunk
            and self._length_checkable
            and self.content_length is not None
            and self.bytes_read < self.content_length
        ):
            raise self._ended_early()
        return chunk

    def close(self) -> None:
        self._response.close()


class ImageDownload(_BoundedBody):
    """A streamed image body: read it in chunks, with a size cap, counting bytes and a SHA-256."""

    def __init__(
        self,
        response: requests.Response,
        *,
        max_bytes: int,
        label: str,
        deadline_seconds: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self._digest = hashlib.sha256()
        super().__init__(response, max_bytes=max_bytes, label=label, deadline_seconds=deadline_seconds, stop=stop)

    def _broken(self, exc: BaseException, received: int) -> Exception:
        return JiMengDownloadInterruptedError(
            f"download of image {self._label} broke after {received} bytes: {type(exc).__name__}"
        )

    def _too_slow(self, received: int, *, stopped: bool = False) -> Exception:
        why = "was stopped" if stopped else "took too long"
        return JiMengDownloadInterruptedError(
            f"download of image {self._label} {why} ({received} bytes read); giving up"
        )

    def _too_large(self, *, announced: bool) -> Exception:
        if announced:
            return JiMengDownloadError(
                f"image {self._label} is {self.content_length} bytes, above the {self._max_bytes}-byte download cap"
            )
        return JiMengDownloadError(f"image {self._label} exceeds the {self._max_bytes}-byte download cap")

    def _ended_early(self) -> Exception:
        return JiMengDownloadInterruptedError(
            f"download of image {self._label} ended after {self.bytes_read} of {self.content_length} bytes"
        )

    def read(self, size: int = -1) -> bytes:
        chunk = super().read(size)
        self._digest.update(chunk)
        return chunk

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def __enter__(self) -> ImageDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AnswerBody(_BoundedBody):
    """The body of a generation answer (JSON or an event stream). Every way it fails is possibly billed:
    the service answered 200, so the images were generated."""

    def __init__(
        self,
        response: requests.Response,
        *,
        max_bytes: int,
        deadline_seconds: float,
        request_id: str,
        stop: threading.Event | None = None,
    ) -> None:
        self._request_id = request_id
        self._peeked = b""
        super().__init__(response, max_bytes=max_bytes, label="answer", deadline_seconds=deadline_seconds, stop=stop)

    def _broken(self, exc: BaseException, received: int) -> Exception:
        return JiMengTimeoutError(
            f"the connection broke while the answer was read ({type(exc).__name__}, {received} bytes read); "
            "the request may still be billed",
            code="ConnectionError",
            request_id=self._request_id,
            possibly_billed=True,
        )

    def _too_slow(self, received: int, *, stopped: bool = False) -> Exception:
        if stopped:
            return JiMengTimeoutError(
                f"the task was stopped while the answer was read ({received} bytes read); "
                "the request may still be billed",
                code="Stopped",
                request_id=self._request_id,
                possibly_billed=True,
            )
        return JiMengTimeoutError(
            f"the answer was not complete within {self._deadline_seconds:g}s (extra response_deadline; "
            f"{received} bytes read); the request may still be billed",
            code="ResponseDeadlineExceeded",
            request_id=self._request_id,
            possibly_billed=True,
        )

    def _too_large(self, *, announced: bool) -> Exception:
        size = f"{self.content_length} bytes" if announced else "larger"
        return JiMengResponseError(
            f"the answer is {size}, above the {self._max_bytes}-byte cap (extra max_response_bytes); "
            "the request may still be billed",
            status_code=200,
            code="ResponseTooLarge",
            request_id=self._request_id,
        )

    def _ended_early(self) -> Exception:
        return JiMengResponseError(
            f"the answer ended after {self.bytes_read} of {self.content_length} bytes",
            status_code=200,
            code="MalformedResponse",
            request_id=self._request_id,
        )

    def read(self, size: int = -1) -> bytes:
        if self._peeked:  # what is_event_stream() looked at comes first
            chunk, self._peeked = self._peeked, b""
            return chunk
        return super().read(size)

    def is_event_stream(self) -> bool:
        """Whether the body is server-sent events, told by its first bytes rather than its label.

        Some gateways label a stream ``application/json``: read as JSON, a paid answer would look
        malformed and be sent again. A JSON answer starts with ``{``; an event stream with a field
        (``data:``, ``event:``, ``id:``, ``retry:``) or a comment (``:``). The bytes looked at are kept.
        """
        head = b""
        while len(head) < 64:
            chunk = super().read(64 - len(head))
            if not chunk:
                break
            head += chunk
            if head.lstrip(b"\xef\xbb\xbf \t\r\n"):
                break
        self._peeked = head
        start = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        return start.startswith((b"data:", b"event:", b"id:", b"retry:", b":"))

    def read_all(self) -> bytes:
        return b"".join(iter(lambda: self.read(DOWNLOAD_CHUNK_BYTES), b""))

    def lines(self) -> Iterator[bytes]:
        """The body's lines as they arrive (an event stream); a line may span many reads."""
        pieces: list[bytes] = []
        while chunk := self.read(SSE_CHUNK_BYTES):
            start = 0
            while (newline := chunk.find(b"\n", start)) != -1:
                pieces.append(chunk[start:newline])
                yield b"".join(pieces)
                pieces = []
                start = newline + 1
            if start < len(chunk):
                pieces.append(chunk[start:])
        if pieces:
            yield b"".join(pieces)


class _Charge:
    """One attempt's images, reserved on the caller's spending cap and on the hook's own tally.

    Both reservations are settled together, once: whatever happens to the attempt, the hook's counters
    say the same as the run's cap.
    """

    def __init__(self, images: int, reservations: Sequence[Reservation]) -> None:
        self.images = images
        self._reservations = reservations

    def settle(self, billed: int, possibly_billed: int = 0) -> None:
        for reservation in self._reservations:
            reservation.settle(billed, possibly_billed)

    def release(self) -> None:
        for reservation in self._reservations:
            reservation.release()

    def keep_as_possible(self) -> None:
        for reservation in self._reservations:
            reservation.keep_as_possible()


class JiMengHook(BaseHook):
    """Generate images with JiMeng 4.0 / Seedream through a ``jimeng`` connection.

    One pooled :class:`requests.Session` serves every call of a hook, including calls from several
    threads at once. Retryable failures (rate limits, 5xx, timeouts) are repeated with backoff inside
    the hook; invalid input is refused before a request is sent.

    :param jimeng_conn_id: connection holding the base URL (host) and API key (password).
    :param timeout: read timeout in seconds; overrides the connection's ``timeout`` extra.
    :param max_retries: overrides the connection's ``max_retries`` extra.
    :param retry_backoff: first backoff wait in seconds (doubles each retry); overrides the
        connection's ``retry_backoff`` extra (default 2).
    :param retry_max_wait: longest single wait, also the cap on a server's ``Retry-After``; overrides
        the connection's ``retry_max_wait`` extra (default 120).
    :param max_images_per_minute: client-side pacing; overrides the connection's extra.
    :param pool_maxsize: HTTP connections kept per host; at least the number of concurrent calls.
    """

    conn_name_attr = "jimeng_conn_id"
    default_conn_name = "jimeng_default"
    conn_type = "jimeng"
    hook_name = "JiMeng (Seedream)"

    def __init__(
        self,
        jimeng_conn_id: str = default_conn_name,
        *,
        timeout: float | None = None,
        max_retries: int | None = None,
        retry_backoff: float | None = None,
        retry_max_wait: float | None = None,
        max_images_per_minute: float | None = None,
        pool_maxsize: int = 32,
        logger_name: str | None = None,
    ) -> None:
        super().__init__(logger_name=logger_name)
        self.jimeng_conn_id = jimeng_conn_id
        self._timeout_override = timeout
        self._max_retries_override = max_retries
        self._retry_backoff = retry_backoff
        self._retry_max_wait = retry_max_wait
        self._max_images_per_minute_override = max_images_per_minute
        self._pool_maxsize = pool_maxsize
        self._session: requests.Session | None = None
        self._downloads: requests.Session | None = None
        self._pacer: ImageRatePacer | None = None
        #: One shared bucket per model this hook sends to (the service limits each model apart).
        self._account_limiters: dict[str, AccountRateLimiter] = {}
        #: Whether the shared limiter's Redis is failing (said once in the log, and once when it is back).
        self._limiter_down = False
        self._session_lock = threading.Lock()
        #: Set by close(): reads in progress end too.
        self._stop = threading.Event()
        #: Set by stop() and close(): no new attempt, no retry, no more waiting.
        self._sending_stopped = threading.Event()
        self._counter_lock = threading.Lock()
        self._counts: dict[str, int] = {
            "attempts": 0,
            "rate_limited": 0,
            "retries": 0,
            "download_retries": 0,
            "rate_limit_wait_ms": 0,
        }
        #: Every attempt of this hook counted, whichever cap a caller passed to :meth:`send`: never refuses.
        self._tally = SpendingCap(None)

    @property
    def stats(self) -> dict[str, int]:
        """Counters for reports and benchmarks (a snapshot).

        ``attempts`` sent, ``rate_limited`` (429) answers, generation ``retries`` and
        ``download_retries`` made, images ``billed`` (as the answers said) and ``possibly_billed``
        (attempts that timed out or broke off: the service may have generated their images), and
        ``rate_limit_wait_ms``: how long attempts waited for the pace (the task's own and the account's).
        """
        with self._counter_lock:
            counts = dict(self._counts)
        counts["billed"] = self._tally.billed
        counts["possibly_billed"] = self._tally.possibly_billed
        return counts

    def _count(self, counter: str, amount: int = 1) -> None:
        with self._counter_lock:
            self._counts[counter] += amount

    # ----------------------------------------------------------------------------------- UI metadata
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Relabel and hide connection form fields (Airflow < 3.2 reads this; later, provider info)."""
        return UI_FIELD_BEHAVIOUR

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """Extra fields of the connection form for Airflow < 3.2 (later releases read provider info)."""
        from flask_appbuilder.fieldwidgets import BS3TextFieldWidget
        from flask_babel import lazy_gettext
        from wtforms import BooleanField, SelectField, StringField

        widgets: dict[str, Any] = {}
        for name, spec in CONNECTION_EXTRAS.items():
            schema = spec["schema"]
            types = schema["type"]
            if "enum" in schema:
                # A select whose untouched value says what it means ("true (default)"), never a bare "off".
                shown = schema.get("values_display", {})
                choices = [
                    ("" if value is None else value, shown.get("null" if value is None else value, value or ""))
                    for value in schema["enum"]
                ]
                widgets[name] = SelectField(
                    lazy_gettext(spec["label"]), choices=choices, default="", description=spec["description"]
                )
            elif types == ["boolean", "null"]:
                widgets[name] = BooleanField(lazy_gettext(spec["label"]), description=spec["description"])
            else:
                widgets[name] = StringField(
                    lazy_gettext(spec["label"]), widget=BS3TextFieldWidget(), description=spec["description"]
                )
        return widgets

    # -------------------------------------------------------------------------------- configuration
    @cached_property
    def config(self) -> JiMengConnectionConfig:
        """The connection, resolved and checked once; the API key is registered with the secret maskers.

        Every extra is checked here, before any request: a bad value raises
        :class:`JiMengConfigurationError` naming the extra and what it allows. An empty string,
        ``"None"`` or ``"null"`` (what a template renders for nothing) means the default.
        """
        try:
            conn = self.get_connection(self.jimeng_conn_id)
        except AirflowNotFoundException:  # Airflow would retry it: every try would look in vain
            raise missing_connection("jimeng_conn_id", self.jimeng_conn_id) from None
        api_key = (conn.password or "").strip()
        if not api_key:
            raise JiMengConfigurationError(
                "password",
                f"connection {self.jimeng_conn_id!r} has no API key; put the key in the password field",
            )
        mask_secret(api_key)
        register_secret(api_key)
        _check_api_key(api_key)
        extras = conn.extra_dejson if conn.extra else {}
        if not isinstance(extras, Mapping):
            raise JiMengConfigurationError("extra", 'must be a JSON object of extras, like {"timeout": 300}')
        base_url = resolve_base_url(conn.host, conn.schema, conn.port)
        allow_http = _as_bool("allow_http", extras.get("allow_http"), False)
        if base_url.startswith("http://") and not allow_http:
            raise JiMengConfigurationError(
                "host",
                f"base URL {base_url!r} uses plain http; use https, or set the extra allow_http=true "
                "(for the offline emulator on loopback)",
            )
        model_extra = extras.get("model")
        model = ("" if _is_unset(model_extra) else str(model_extra).strip()) or (
            DEFAULT_BYTEPLUS_MODEL if "bytepluses.com" in base_url else DEFAULT_MODEL
        )
        timeout = _as_number(
            "timeout", _first(self._timeout_override, extras.get("timeout")), DEFAULT_TIMEOUT, minimum=1
        )
        assert timeout is not None
        redis_conn_id = _as_conn_id("redis_conn_id", extras.get("redis_conn_id"))
        account_images_per_minute = _as_number(
            "account_images_per_minute", extras.get("account_images_per_minute"), None, minimum=1
        )
        if account_images_per_minute is not None and redis_conn_id is None:
            raise JiMengConfigurationError(
                "account_images_per_minute",
                "an account-wide limit needs a store every worker shares: set redis_conn_id too, "
                "or use max_images_per_minute for a per-task pace",
            )
        return JiMengConnectionConfig(
            base_url=base_url,
            api_key=api_key,
            model=model,
            timeout=timeout,
            connect_timeout=_as_number(
                "connect_timeout", extras.get("connect_timeout"), DEFAULT_CONNECT_TIMEOUT, minimum=0.1
            )
            or DEFAULT_CONNECT_TIMEOUT,
            max_retries=_as_int(
                "max_retries",
                _first(self._max_retries_override, extras.get("max_retries")),
                DEFAULT_MAX_RETRIES,
                minimum=0,
            ),
            retry_backoff=_as_number(
                "retry_backoff",
                _first(self._retry_backoff, extras.get("retry_backoff")),
                DEFAULT_RETRY_BACKOFF,
                minimum=0,
            )
            or 0.0,
            retry_max_wait=_as_number(
                "retry_max_wait",
                _first(self._retry_max_wait, extras.get("retry_max_wait")),
                DEFAULT_RETRY_MAX_WAIT,
                minimum=0,
            )
            or 0.0,
            watermark=_as_bool("watermark", extras.get("watermark"), True),
            max_images_per_minute=_as_number(
                "max_images_per_minute",
                _first(self._max_images_per_minute_override, extras.get("max_images_per_minute")),
                None,
                minimum=1,
            ),
            proxies=_as_proxies(extras.get("proxies")),
            verify=_as_verify(extras.get("verify")),
            allow_http=allow_http,
            max_billed_retries=_as_int(
                "max_billed_retries", extras.get("max_billed_retries"), DEFAULT_MAX_BILLED_RETRIES, minimum=0
            ),
            response_deadline=_as_number(
                "response_deadline", extras.get("response_deadline"), timeout * RESPONSE_DEADLINE_TIMEOUTS, minimum=1
            )
            or timeout * RESPONSE_DEADLINE_TIMEOUTS,
            max_response_bytes=_as_int(
                "max_response_bytes", extras.get("max_response_bytes"), DEFAULT_MAX_RESPONSE_BYTES, minimum=1024
            ),
            redis_conn_id=redis_conn_id,
            account_images_per_minute=account_images_per_minute,
            images_per_request=_as_images_per_request(extras.get("images_per_request")),
        )

    @cached_property
    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_retries=self.config.max_retries,
            backoff=self.config.retry_backoff,
            max_wait=self.config.retry_max_wait,
        )

    @property
    def pacer(self) -> ImageRatePacer | None:
        """One pacer per hook, created under a lock because every worker thread shares it."""
        with self._session_lock:
            if self._pacer is None and self.config.max_images_per_minute:
                self._pacer = ImageRatePacer(self.config.max_images_per_minute)
            return self._pacer

    def account_limiter(self, model: str) -> AccountRateLimiter | None:
        """The account-wide limiter of ``model`` when the connection names a shared Redis and the
        account's limit (``redis_conn_id`` and ``account_images_per_minute``); else ``None``.

        A ``redis_conn_id`` alone does not limit: the account's cap is a number only its owner knows
        (accounts may have raised limits, models differ), and the same Redis also serves journals.
        """
        config = self.config
        if config.redis_conn_id is None or config.account_images_per_minute is None:
            return None
        with self._session_lock:
            limiter = self._account_limiters.get(model)
            if limiter is None:
                from airflow_provider_jimeng.coordination.ratelimit import AccountRateLimiter, bucket_key
                from airflow_provider_jimeng.coordination.redis_client import shared_redis

                client = shared_redis(config.redis_conn_id)  # a missing connection: not retried
                limiter = self._account_limiters[model] = AccountRateLimiter(
                    client, bucket_key(config.api_key, model), config.account_images_per_minute
                )
            return limiter

    def _pace(self, body: Mapping[str, Any], images: int) -> Grant | None:
        """Wait for the task's own pace, then for the account's; the account's grant, if it has one.

        The task's pacer goes first so that the shared slots are taken as late as possible. When the
        shared limiter's Redis fails, a task with its own pace (``max_images_per_minute``) goes on at
        that pace; one without fails the attempt before sending (retried with backoff like a 429):
        sending unpaced would turn many tasks into a storm of 429s.
        """
        from airflow_provider_jimeng.coordination.ratelimit import RateLimiterUnavailableError

        pacer = self.pacer
        if pacer is not None:
            self._count("rate_limit_wait_ms", round(pacer.acquire(images, stop=self._sending_stopped) * 1000))
        limiter = self.account_limiter(str(body.get("model") or self.config.model))
        if limiter is None or self._sending_stopped.is_set():
            return None
        started = time.monotonic()
        try:
            grant = limiter.acquire(images, self._sending_stopped)
        except RateLimiterUnavailableError as exc:
            if self._limiter_state_changed(down=True):
                self.log.warning(
                    "The account-wide rate limiter is unavailable (%s, redis connection %s); %s",
                    exc,
                    self.config.redis_conn_id,
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
            self._count("rate_limit_wait_ms", round((time.monotonic() - started) * 1000))
        if self._limiter_state_changed(down=False):
            self.log.info("The account-wide rate limiter is available again")
        return grant

    def _limiter_state_changed(self, *, down: bool) -> bool:
        """Record whether the shared limiter's Redis is failing; true for the one thread that changed it
        (so that an outage is logged once, whichever of the task's threads meets it first)."""
        with self._counter_lock:
            changed = self._limiter_down != down
            self._limiter_down = down
            return changed

    def get_conn(self) -> requests.Session:
        """The hook's pooled session, created once even when threads race for it."""
        with self._session_lock:
            if self._session is None:
                config = self.config
                session = requests.Session()
                adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self._pool_maxsize, max_retries=0)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                session.headers.update(
                    {
                        "Authorization": f"Bearer {config.api_key}",
                        "Content-Type": "application/json",
                        "Accept": "application/json",
                        "User-Agent": "airflow-provider-jimeng",
                    }
                )
                if config.proxies:
                    session.proxies.update(config.proxies)
                session.verify = config.verify
                self._session = session
            return self._session

    def _download_session(self) -> requests.Session:
        """A pooled session for image downloads: no API key, no cookies, its own connections.

        Signed URLs carry their own authorisation, so this session never sends the key; reusing its
        connections saves a TCP (and TLS) handshake and a session set-up per image.
        """
        with self._session_lock:
            if self._downloads is None:
                session = requests.Session()
                adapter = HTTPAdapter(pool_connections=4, pool_maxsize=self._pool_maxsize, max_retries=0)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
                session.headers["User-Agent"] = "airflow-provider-jimeng"
                self._downloads = session
            return self._downloads

    def close(self) -> None:
        """Stop waiting and retrying, and close pooled connections (in-flight reads then fail)."""
        self._sending_stopped.set()
        self._stop.set()
        with self._session_lock:
            for session in (self._session, self._downloads):
                if session is not None:
                    session.close()
            self._session = None
            self._downloads = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # ----------------------------------------------------------------------------------- generation
    def build_body(self, prompt: str, options: GenerationOptions | None = None, **fields: Any) -> dict[str, Any]:
        """Validate arguments and return the request body, filling model/watermark from the connection.

        ``options`` is a checked :class:`~airflow_provider_jimeng.options.GenerationOptions`; keyword
        ``fields`` (``size="2K"``, ``seed=7``...) are checked into one when it is not given.
        """
        if options is None:
            options = GenerationOptions.parse(**fields)
        elif fields:
            raise TypeError("pass either options or keyword fields, not both")
        return options.body(prompt, default_model=self.config.model, default_watermark=self.config.watermark)

    def generate_images(
        self,
        prompt: str,
        options: GenerationOptions | None = None,
        *,
        max_images_per_task: int | None = None,
        **fields: Any,
    ) -> GenerationResult:
        """Generate one image, or a set with ``sequential_image_generation="auto"``.

        Takes the fields of :class:`~airflow_provider_jimeng.options.GenerationOptions` as keywords:
        ``image`` takes reference images as URLs, data URIs, bytes or local file paths (a list for
        several). Per-image failures inside a set are returned in the result, not raised.
        ``max_images_per_task`` caps what this call may bill, retries included.
        """
        body = self.build_body(prompt, options, **fields)
        limit = as_int("max_images_per_task", max_images_per_task, minimum=1, optional=True)
        return self.send(body, spending_cap=SpendingCap(limit) if limit is not None else None)

    def send(
        self,
        body: Mapping[str, Any],
        *,
        before_body: Callable[[int | None], None] | None = None,
        spending_cap: SpendingCap | None = None,
    ) -> GenerationResult:
        """Send a validated body, pacing and retrying; the single path every generation takes.

        ``before_body`` is called with the Content-Length (``None`` if unknown) of each successful
        non-streamed answer before its body is read; it may block, to bound the memory that large
        ``b64_json`` bodies take (the unread body waits in the socket), or raise to abandon the attempt.

        ``spending_cap`` (one per run, shared by its threads): every attempt, retries included, first
        reserves the most images it could bill; a refusal raises
        :class:`~airflow_provider_jimeng.exceptions.JiMengSpendingCapError` and nothing is sent. The
        hook counts on its own uncapped tally as well (``stats["billed"]``, ``stats["possibly_billed"]``).
        """
        images = self.images_billed(body)

        def attempt(number: int) -> GenerationResult:
            charge = self._reserve(images, spending_cap)
            grant: Grant | None = None
            try:
                grant = self._pace(body, images)
                if self._sending_stopped.is_set():
                    raise JiMengTimeoutError("the task was stopped before the request was sent", code="Stopped")
            except BaseException:
                charge.release()
                if grant is not None:
                    self._give_back(grant, images)  # never sent
                raise
            try:
                result = self._send_once(body, number, before_body, charge)
            except BaseException:
                if grant is not None:
                    grant.keep()  # sent: an error answer or a 429 may still have counted on the server
                raise
            finally:
                charge.keep_as_possible()  # a no-op once settled: only an unforeseen failure gets here unsettled
            if grant is not None:
                # A set that ended early billed fewer than it reserved; a broken answer may have billed all.
                self._give_back(grant, 0 if result.truncated else images - result.billed_images)
            return result

        # A set is never sent again blind: with no idempotency key, a set that timed out or broke off
        # may have billed every image, and a repeat pays for all of them again.
        return self._with_retries(
            attempt, subject="JiMeng", counter="retries", max_billed_retries=0 if images > 1 else None
        )

    def images_billed(self, body: Mapping[str, Any]) -> int:
        """The most images one request with ``body`` can bill on this connection: what reservations take.

        What the body asks (:func:`~airflow_provider_jimeng.api.request.max_images_billed`), or the
        connection's ``images_per_request`` when a gateway answers (and bills) more than asked.
        """
        return max(max_images_billed(body), self.config.images_per_request or 1)

    def _give_back(self, grant: Grant, images: int) -> None:
        """Return unused images to the shared bucket; if Redis fails, they stay spent (never overspent)."""
        from airflow_provider_jimeng.coordination.ratelimit import RateLimiterUnavailableError

        try:
            grant.refund(images)
        except RateLimiterUnavailableError as exc:
            self.log.debug("Could not give %d image(s) back to the account-wide rate limiter: %s", images, exc)

    def _reserve(self, images: int, spending_cap: SpendingCap | None) -> _Charge:
        reservations = [] if spending_cap is None else [spending_cap.reserve(images)]  # may refuse: nothing sent
        reservations.append(self._tally.reserve(images))
        return _Charge(images, reservations)

    def _with_retries(
        self, attempt: Callable[[int], _T], *, subject: str, counter: str, max_billed_retries: int | None = None
    ) -> _T:
        """The hook's one retry loop: ``attempt(n)`` until it succeeds or its error may not be retried.

        Rate limits and server errors are retried ``max_retries`` times with backoff. An attempt that
        may have been billed (timed out, broke off, malformed 200) is retried at most
        ``max_billed_retries`` times in all (the connection's extra unless given), each time with a
        warning: there is no idempotency key, so every such retry may pay again.
        """
        policy = self.retry_policy
        billed_limit = self.config.max_billed_retries if max_billed_retries is None else max_billed_retries
        billed_retries = 0
        number = 0
        while True:
            number += 1
            if self._sending_stopped.is_set():
                raise JiMengTimeoutError("the task was stopped before the request was sent", code="Stopped")
            try:
                return attempt(number)
            except JiMengAPIError as error:
                if not policy.should_retry(error, number) or self._sending_stopped.is_set():
                    raise
                reason = error.code or type(error).__name__
                request_id = error.request_id or "n/a"
                if error.possibly_billed:
                    if billed_retries >= billed_limit:
                        self.log.warning(
                            "%s attempt %d failed (%s, request id %s) and may have been billed; not retried: %s",
                            subject,
                            number,
                            reason,
                            request_id,
                            f"{billed_retries} retry(ies) of possibly billed attempts already made "
                            f"(extra max_billed_retries={billed_limit})"
                            if max_billed_retries is None
                            else "a set of images is never sent again blind (each image may be billed again)",
                        )
                        raise
                    billed_retries += 1
                wait = policy.wait_seconds(error, number)
                self._count(counter)
                if error.possibly_billed:
                    self.log.warning(
                        "%s attempt %d of %d failed (%s, request id %s) and may have been billed; retrying in "
                        "%.2fs (retry %d of at most %d after a possibly billed attempt: it may pay again)",
                        subject,
                        number,
                        policy.max_retries + 1,
                        reason,
                        request_id,
                        wait,
                        billed_retries,
                        billed_limit,
                    )
                else:
                    self.log.warning(
                        "%s attempt %d of %d failed (%s, request id %s); retrying in %.2fs",
                        subject,
                        number,
                        policy.max_retries + 1,
                        reason,
                        request_id,
                        wait,
                    )
                if self._sending_stopped.wait(wait):
                    raise

    def stop(self) -> None:
        """Send nothing more: retry and pacing waits end at once, while requests in flight still get
        their answer (it is paid for; the caller journals it). :meth:`close` also breaks those reads."""
        self._sending_stopped.set()

    def _send_once(
        self,
        body: Mapping[str, Any],
        attempt: int,
        before_body: Callable[[int | None], None] | None,
        charge: _Charge,
    ) -> GenerationResult:
        """One attempt; settles ``charge`` by what became of it (billed, nothing, or possibly billed)."""
        config = self.config
        client_request_id = uuid.uuid4().hex
        stream = bool(body.get("stream"))
        self._count("attempts")
        # A first attempt is said by the result line that follows; a retry is worth a line of its own.
        (self.log.info if attempt > 1 else self.log.debug)(
            "JiMeng request attempt %d: model=%s size=%s images<=%d stream=%s client request id %s",
            attempt,
            body.get("model"),
            body.get("size", "default"),
            charge.images,
            stream,
            client_request_id,
        )
        read_timeout = self._read_timeout(charge.images, stream)
        started = time.monotonic()
        try:
            response = self.get_conn().post(
                config.generations_url,
                data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                headers={"X-Client-Request-Id": client_request_id},
                timeout=(config.connect_timeout, read_timeout),
                # Headers first, body after: if the body breaks off, the server's request id is known.
                stream=True,
                # Per request, not only on the session: requests lets REQUESTS_CA_BUNDLE / HTTPS_PROXY
                # in the environment override a session's verify and proxies.
                verify=config.verify,
                proxies=config.proxies,
            )
        except OSError as exc:  # requests' exceptions are OSErrors, and so is a CA bundle that is not there
            failure = self._request_failure(exc, client_request_id, read_timeout)
            if isinstance(failure, JiMengAPIError) and failure.possibly_billed:
                charge.keep_as_possible()
            else:
                charge.release()
            raise failure from None
        request_id = response.headers.get("x-request-id") or client_request_id
        try:
            if response.status_code != 200:
                raise self._error_from_response(response, request_id)
            answer = _AnswerBody(
                response,
                max_bytes=config.max_response_bytes,
                deadline_seconds=config.response_deadline,
                request_id=request_id,
                stop=self._stop,
            )
            # The body says which it is, not its label: some gateways label a stream application/json.
            if answer.is_event_stream():
                result = parse_event_stream(answer.lines(), request_id, expected_images=charge.images)
            else:
                if before_body is not None:
                    before_body(answer.content_length)
                result = parse_generation(self._json(answer, request_id), request_id)
        except JiMengAPIError as error:
            # An error the service answered (any status, or an error envelope in a 200) billed nothing.
            (charge.keep_as_possible if error.possibly_billed else charge.release)()
            raise
        except BaseException:
            charge.keep_as_possible()  # a 200 came (its images were generated) and the attempt was abandoned
            raise
        finally:
            response.close()
        billed = result.billed_images
        charge.settle(billed, max(0, charge.images - billed) if result.truncated else 0)
        self._log_result(result, time.monotonic() - started)
        return result

    def _read_timeout(self, images: int, stream: bool) -> float:
        """How long to wait for an answer's first byte: the ``timeout`` per image for a set not streamed.

        A non-streamed set answers only once every image is made (tens of seconds per 2K image): a
        15-image set would outlast one read timeout after it was billed. A stream sends each image as
        it is ready, so one ``timeout`` bounds each wait.
        """
        return self.config.timeout * (1 if stream else max(1, images))

    def _log_result(self, result: GenerationResult, seconds: float) -> None:
        self.log.info(
            "JiMeng request %s: %d image(s) ok, %d failed, billed %d, %.1fs",
            result.request_id,
            len(result.succeeded),
            len(result.failed),
            result.billed_images,
            seconds,
        )
        if result.truncated:
            self.log.warning(
                "JiMeng request %s broke off after %d image(s) (%s): they are kept and the request is not sent "
                "again; the image(s) not delivered may still have been billed",
                result.request_id,
                len(result.succeeded),
                result.interrupted_by,
            )
        elif result.interrupted_by:
            self.log.warning(
                "JiMeng request %s: the service stopped the set with %s after %d image(s); they are kept and "
                "the request is not sent again",
                result.request_id,
                result.interrupted_by,
                len(result.succeeded),
            )

    def _request_failure(self, exc: OSError, request_id: str, read_timeout: float) -> Exception:
        """What a request that got no answer raises; ``possibly_billed`` when it may have reached the service."""
        config = self.config
        host = urlsplit(config.base_url).netloc
        name = type(exc).__name__
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return JiMengTimeoutError(
                f"could not connect to {host} within {config.connect_timeout:g}s ({name}); nothing was sent",
                code="ConnectTimeout",
                request_id=request_id,
            )
        if isinstance(exc, requests.Timeout):
            return JiMengTimeoutError(
                f"no answer within {read_timeout:g}s ({name}); the request may still be billed",
                code="Timeout",
                request_id=request_id,
                possibly_billed=True,
            )
        if isinstance(exc, requests.exceptions.SSLError):
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                # A certificate that does not verify will not verify on a retry either: say what to fix.
                return JiMengConfigurationError(
                    "verify",
                    f"the TLS certificate of {host} does not verify (nothing was sent); allowed: a host whose "
                    "certificate chains to a trusted CA, or the connection extra verify=<path to a CA bundle> "
                    "for a private CA",
                )
            return JiMengTimeoutError(
                f"TLS connection to {host} failed ({name})", code="ConnectionError", request_id=request_id
            )
        if isinstance(
            exc, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema)
        ):
            return JiMengConfigurationError(
                "host", f"the request URL is not valid ({name}): {redact_url(config.generations_url)}"
            )
        if isinstance(exc, requests.ConnectionError):
            if _never_connected(exc):
                return JiMengTimeoutError(
                    f"could not connect to {host} ({name}); nothing was sent",
                    code="ConnectionError",
                    request_id=request_id,
                )
            return JiMengTimeoutError(
                f"the connection to {host} broke before the answer came ({name}); the request may still be billed",
                code="ConnectionError",
                request_id=request_id,
                possibly_billed=True,
            )
        if not isinstance(exc, requests.RequestException) and "CA certificate bundle" in str(exc):
            return JiMengConfigurationError(
                "verify",
                "the CA bundle is not there (nothing was sent); allowed: true, false, or the path of a CA bundle",
            )
        return JiMengTimeoutError(
            f"the request to {host} failed ({name}); the request may still be billed",
            code="ConnectionError",
            request_id=request_id,
            possibly_billed=True,
        )

    def _json(self, answer: _AnswerBody, request_id: str) -> Any:
        content = answer.read_all()
        try:
            return json.loads(content)
        except ValueError as exc:
            raise JiMengResponseError(
                f"the response body is not valid JSON ({type(exc).__name__}); the request may still be billed",
                status_code=200,
                code="MalformedResponse",
                request_id=request_id,
            ) from None

    def _error_from_response(self, response: requests.Response, request_id: str) -> JiMengAPIError:
        payload: Any = None
        try:
            body = _AnswerBody(
                response,
                max_bytes=ERROR_BODY_MAX_BYTES,
                deadline_seconds=self.config.timeout,
                request_id=request_id,
            )
            payload = json.loads(body.read_all())
        except (ValueError, JiMengAPIError):
            pass
        error = api_error_from_payload(
            response.status_code,
            payload,
            request_id=request_id,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            fallback_message=response.reason or "",
        )
        if response.status_code == 429:
            self._count("rate_limited")
        return error

    # ------------------------------------------------------------------------------------ downloads
    def check_download_url(self, url: str) -> None:
        """Refuse image URLs that are not https (plain http only with ``allow_http`` or on loopback)."""
        try:
            parts = urlsplit(url)
            host = parts.hostname
        except ValueError:
            raise JiMengDownloadError(f"refusing to download {redact_url(url)}: not a valid URL") from None
        if parts.scheme == "https":
            return
        if parts.scheme == "http" and (self.config.allow_http or _is_loopback(host)):
            return
        raise JiMengDownloadError(
            f"refusing to download {redact_url(url)}: only https URLs are fetched "
            "(set the connection extra allow_http=true to permit http)"
        )

    def open_image(self, url: str, *, max_bytes: int = DEFAULT_DOWNLOAD_MAX_BYTES) -> ImageDownload:
        """Start streaming an image URL; transient failures are retried, expiry and 404 are not."""
        self.check_download_url(url)
        label = redact_url(url)
        try:
            return self._with_retries(
                lambda attempt: self._open_image_once(url, label, max_bytes),
                subject=f"Download of {label}",
                counter="download_retries",
            )
        except JiMengAPIError as error:
            raise JiMengDownloadInterruptedError(f"download of image {label} failed: {error}") from None

    def _open_image_once(self, url: str, label: str, max_bytes: int) -> ImageDownload:
        config = self.config
        try:
            # Signed URLs carry their own authorisation: never send the API key to the storage host.
            response = self._download_session().get(
                url,
                stream=True,
                timeout=(config.connect_timeout, config.timeout),
                proxies=config.proxies,
                verify=config.verify,
                headers={"Accept": "image/*"},
            )
        except requests.Timeout:
            raise JiMengTimeoutError(f"download of {label} timed out", code="Timeout") from None
        except requests.exceptions.SSLError as exc:
            if "CERTIFICATE_VERIFY_FAILED" not in str(exc):
                raise JiMengTimeoutError(f"download of {label} failed (SSLError)", code="ConnectionError") from None
            # Not retried: it would fail the same way. The URL stays valid for a retry once 'verify' is fixed.
            raise JiMengDownloadInterruptedError(
                f"download of image {label} refused: the host's TLS certificate does not verify; "
                "set the connection extra verify=<path to a CA bundle> for a private CA"
            ) from None
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema,
        ) as exc:
            # Their messages quote the whole URL, signature included.
            raise JiMengDownloadError(
                f"download of image {label} refused: not a valid URL ({type(exc).__name__})"
            ) from None
        except requests.RequestException as exc:
            raise JiMengTimeoutError(
                f"download of {label} failed to connect ({type(exc).__name__})", code="ConnectionError"
            ) from None
        if response.status_code != 200:
            response.close()
            status = response.status_code
            if status in (403, 404, 410):
                hint = "the signed URL has expired (24 h lifetime)" if status == 403 else "the image is gone"
                raise JiMengDownloadError(f"download of image {label} failed: HTTP {status}, {hint}")
            error_class = JiMengTimeoutError if status >= 500 or status == 429 else JiMengDownloadError
            if error_class is JiMengDownloadError:
                raise JiMengDownloadError(f"download of image {label} failed: HTTP {status}")
            raise JiMengTimeoutError(
                f"download of {label} answered HTTP {status}",
                status_code=status,
                code="DownloadFailed",
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not content_type.startswith("image/"):
            response.close()
            raise JiMengDownloadError(
                f"download of image {label} returned Content-Type {content_type or 'none'!r}, not an image"
            )
        return ImageDownload(
            response, max_bytes=max_bytes, label=label, deadline_seconds=config.timeout, stop=self._stop
        )

    # ------------------------------------------------------------------------------ test connection
    def test_connection(self) -> tuple[bool, str]:
        """Check reachability, base URL and key without generating (or paying for) an image.

        Sends a generation request with no prompt: a valid key gets a free 400 asking for the prompt,
        a bad key 401/403, a wrong base URL 404.
        """
        try:
            config = self.config
        except JiMengConfigurationError as exc:
            return False, str(exc)
        host = urlsplit(config.base_url).netloc
        timeout = min(config.timeout, 30.0)
        try:
            response = self.get_conn().post(
                config.generations_url,
                data=json.dumps({"model": config.model}).encode("utf-8"),
                timeout=(config.connect_timeout, timeout),
                stream=True,
                verify=config.verify,
                proxies=config.proxies,
            )
        except requests.exceptions.SSLError as exc:
            return (
                False,
                f"TLS handshake with {host} failed ({type(exc).__name__}); check the base URL and 'verify'",
            )
        except OSError as exc:
            return False, f"Cannot reach {host} ({type(exc).__name__}); check the base URL and network/proxy"
        try:
            reader = _AnswerBody(
                response, max_bytes=ERROR_BODY_MAX_BYTES, deadline_seconds=timeout, request_id="test_connection"
            )
            payload = json.loads(reader.read_all())
        except (ValueError, JiMengAPIError):
            payload = None
        finally:
            response.close()
        error = payload.get("error") if isinstance(payload, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        status = response.status_code
        if status == 400 and code:
            return True, f"Connection OK: {host} accepted the API key (model {config.model})"
        if status in (401, 403):
            return False, refused_key_message(host, status, code)
        # "InvalidEndpointOrModel.NotFound" also answers a wrong path: blame the model only when the error names it.
        names_model = isinstance(error, dict) and (
            error.get("param") == "model" or config.model in str(error.get("message") or "")
        )
        if status == 404 and code and "Model" in code and names_model:
            return False, f"{host} accepted the key but model {config.model!r} is not available ({code})"
        if status in (404, 405):
            return False, wrong_path_message(config.generations_url, status)
        if status == 200:
            return True, f"Connection OK: {host} answered"
        return False, f"Unexpected answer from {host}: HTTP {status} {code or ''}".rstrip()
