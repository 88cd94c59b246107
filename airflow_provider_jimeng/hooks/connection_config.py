"""Where a ``jimeng`` connection is read: its extras checked, its base URL resolved, its defaults.

:func:`ark_config` turns a connection into a :class:`JiMengConnectionConfig` for the Ark API; the Visual
API's :func:`~airflow_provider_jimeng.hooks.visual.visual_config` checks the extras the two share with the
same ``extra_*`` functions. Every bad value raises :class:`JiMengConfigurationError` naming the extra
and what it allows, before any request; an empty string, ``"None"`` or ``"null"`` (what a template
renders for nothing) means the default.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict
from urllib.parse import urlsplit

from airflow_provider_jimeng.api.capabilities import DEFAULT_BYTEPLUS_MODEL, DEFAULT_MODEL
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.hooks.connection_form import (
    BYTEPLUS_BASE_URL,
    CHINA_BASE_URL,
    GENERATIONS_PATH,
    OFFICIAL_HOST_SUFFIXES,
)
from airflow_provider_jimeng.options import as_text
from airflow_provider_jimeng.redaction import redact_url, register_secret
from airflow_provider_jimeng.version_compat import mask_secret

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

_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})
#: What a templated or hand-edited extra holds when it means "not set".
_UNSET_WORDS = frozenset({"", "none", "null"})


def is_unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _UNSET_WORDS)


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def extra_bool(parameter: str, value: Any, default: bool) -> bool:
    if is_unset(value):
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
    raise JiMengConfigurationError(parameter, f"{shown(value)} is not a boolean; allowed: true or false")


def extra_number(
    parameter: str, value: Any, default: float | None, *, minimum: float, whole: bool = False
) -> float | None:
    """A finite number >= ``minimum`` (whole if asked) from JSON or a URI string; unset means ``default``."""
    if is_unset(value):
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
        raise JiMengConfigurationError(parameter, f"{shown(value)} is not a number; {allowed}")
    if not math.isfinite(number):
        raise JiMengConfigurationError(parameter, f"{shown(value)} is not a finite number; {allowed}")
    if whole and not number.is_integer():
        raise JiMengConfigurationError(parameter, f"{shown(value)} is not a whole number; {allowed}")
    if number < minimum:
        raise JiMengConfigurationError(parameter, f"{shown(value)} is below the minimum of {minimum:g}")
    return number


def extra_int(parameter: str, value: Any, default: int, *, minimum: int) -> int:
    return int(extra_number(parameter, value, default, minimum=minimum, whole=True) or 0)


#: The most images a gateway's ``images_per_request`` may say: above, it is a typo, not a gateway.
MAX_IMAGES_PER_REQUEST_EXTRA = 100


def extra_images_per_request(value: Any) -> int | None:
    """The ``images_per_request`` extra: a whole number from 1 to 100, or unset."""
    if is_unset(value):
        return None
    number = extra_int("images_per_request", value, 1, minimum=1)
    if number > MAX_IMAGES_PER_REQUEST_EXTRA:
        raise JiMengConfigurationError(
            "images_per_request",
            f"{shown(value)} is above the maximum of {MAX_IMAGES_PER_REQUEST_EXTRA}; allowed: a whole number "
            f"from 1 to {MAX_IMAGES_PER_REQUEST_EXTRA}, the images the endpoint answers (and bills) per request",
        )
    return number


#: The characters Airflow allows in a connection id (``airflow.models.connection.RE_SANITIZE_CONN_ID``).
_CONN_ID = re.compile(r"^[\w#!()\-.:/\\]{1,250}$")


def extra_conn_id(parameter: str, value: Any) -> str | None:
    """A connection id; an unrendered template or a rendered list is refused here, not at first use."""
    if is_unset(value):
        return None
    conn_id = as_text(parameter, value, allowed="a connection id")
    if conn_id is None or not _CONN_ID.match(conn_id):
        raise JiMengConfigurationError(
            parameter, f"{shown(value)} is not a connection id; allowed: letters, digits and _#!()-.:/\\"
        )
    return conn_id


def extra_proxies(value: Any) -> dict[str, str] | None:
    allowed = 'must be a JSON object of scheme to proxy URL, like {"https": "http://proxy:3128"}'
    if is_unset(value):
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


def extra_verify(value: Any) -> bool | str:
    """``true``/``false`` (any spelling :func:`extra_bool` takes) or the path of a CA bundle."""
    if isinstance(value, str) and not is_unset(value) and value.strip().lower() not in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip()
    try:
        return extra_bool("verify", value, True)
    except JiMengConfigurationError:
        raise JiMengConfigurationError(
            "verify", f"{shown(value)} is not allowed; allowed: true, false, or the path of a CA bundle"
        ) from None


def check_api_key(api_key: str) -> None:
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


def first_given(override: Any, extra: Any) -> Any:
    """A hook argument wins over the connection's extra when it is given (``0`` included)."""
    return override if override is not None else extra


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


class RequestSettings(TypedDict):
    """The extras both APIs read alike (:func:`request_settings`): timeouts, retries, pace, proxies, TLS."""

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
    max_response_bytes: int


def connection_extras(conn: Any, example: str) -> Mapping[str, Any]:
    """A connection's extras, refused (showing ``example``) unless they are a JSON object."""
    extras = conn.extra_dejson if getattr(conn, "extra", None) else {}
    if not isinstance(extras, Mapping):
        raise JiMengConfigurationError("extra", f"must be a JSON object of extras, like {example}")
    return extras


def request_settings(
    extras: Mapping[str, Any],
    url: str,
    *,
    default_timeout: float,
    default_max_response_bytes: int,
    timeout: float | None = None,
    max_retries: int | None = None,
    retry_backoff: float | None = None,
    retry_max_wait: float | None = None,
    max_images_per_minute: float | None = None,
) -> RequestSettings:
    """The extras both APIs read alike, checked; plain http to ``url`` is refused unless ``allow_http``.

    The keyword arguments are a hook's overrides: given (``0`` included), they win over the extras.
    """
    allow_http = extra_bool("allow_http", extras.get("allow_http"), False)
    if url.startswith("http://") and not allow_http:
        raise JiMengConfigurationError(
            "host",
            f"base URL {url!r} uses plain http; use https, or set the extra allow_http=true "
            "(for the offline emulator on loopback)",
        )
    return RequestSettings(
        timeout=extra_number("timeout", first_given(timeout, extras.get("timeout")), default_timeout, minimum=1)
        or default_timeout,
        connect_timeout=extra_number(
            "connect_timeout", extras.get("connect_timeout"), DEFAULT_CONNECT_TIMEOUT, minimum=0.1
        )
        or DEFAULT_CONNECT_TIMEOUT,
        max_retries=extra_int(
            "max_retries", first_given(max_retries, extras.get("max_retries")), DEFAULT_MAX_RETRIES, minimum=0
        ),
        retry_backoff=extra_number(
            "retry_backoff", first_given(retry_backoff, extras.get("retry_backoff")), DEFAULT_RETRY_BACKOFF, minimum=0
        )
        or 0.0,
        retry_max_wait=extra_number(
            "retry_max_wait",
            first_given(retry_max_wait, extras.get("retry_max_wait")),
            DEFAULT_RETRY_MAX_WAIT,
            minimum=0,
        )
        or 0.0,
        watermark=extra_bool("watermark", extras.get("watermark"), True),
        max_images_per_minute=extra_number(
            "max_images_per_minute",
            first_given(max_images_per_minute, extras.get("max_images_per_minute")),
            None,
            minimum=1,
        ),
        proxies=extra_proxies(extras.get("proxies")),
        verify=extra_verify(extras.get("verify")),
        allow_http=allow_http,
        max_response_bytes=extra_int(
            "max_response_bytes", extras.get("max_response_bytes"), default_max_response_bytes, minimum=1024
        ),
    )


def ark_config(
    conn: Any,
    conn_id: str,
    *,
    timeout: float | None = None,
    max_retries: int | None = None,
    retry_backoff: float | None = None,
    retry_max_wait: float | None = None,
    max_images_per_minute: float | None = None,
) -> JiMengConnectionConfig:
    """Read a ``jimeng`` connection for the Ark API: the API key in ``password``, the base URL in ``host``.

    The keyword arguments are a hook's overrides: given (``0`` included), they win over the extras.
    The API key is registered with the secret maskers before it is checked.
    """
    api_key = (conn.password or "").strip()
    if not api_key:
        raise JiMengConfigurationError(
            "password",
            f"connection {conn_id!r} has no API key; put the key in the password field",
        )
    mask_secret(api_key)
    register_secret(api_key)
    check_api_key(api_key)
    extras = connection_extras(conn, '{"timeout": 300}')
    base_url = resolve_base_url(conn.host, conn.schema, conn.port)
    settings = request_settings(
        extras,
        base_url,
        default_timeout=DEFAULT_TIMEOUT,
        default_max_response_bytes=DEFAULT_MAX_RESPONSE_BYTES,
        timeout=timeout,
        max_retries=max_retries,
        retry_backoff=retry_backoff,
        retry_max_wait=retry_max_wait,
        max_images_per_minute=max_images_per_minute,
    )
    model_extra = extras.get("model")
    model = ("" if is_unset(model_extra) else str(model_extra).strip()) or (
        DEFAULT_BYTEPLUS_MODEL if "bytepluses.com" in base_url else DEFAULT_MODEL
    )
    read_timeout = settings["timeout"]
    redis_conn_id = extra_conn_id("redis_conn_id", extras.get("redis_conn_id"))
    account_images_per_minute = extra_number(
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
        max_billed_retries=extra_int(
            "max_billed_retries", extras.get("max_billed_retries"), DEFAULT_MAX_BILLED_RETRIES, minimum=0
        ),
        response_deadline=extra_number(
            "response_deadline",
            extras.get("response_deadline"),
            read_timeout * RESPONSE_DEADLINE_TIMEOUTS,
            minimum=1,
        )
        or read_timeout * RESPONSE_DEADLINE_TIMEOUTS,
        redis_conn_id=redis_conn_id,
        account_images_per_minute=account_images_per_minute,
        images_per_request=extra_images_per_request(extras.get("images_per_request")),
        **settings,
    )
