"""What keeps secrets out of logs and exception messages: one place, used by the hook, errors and storage.

Three kinds of secret pass through a run: the API key (a bearer token), signed URLs (whoever holds
one can fetch the image for 24 hours, whatever its query parameters are called: ``X-Tos-Signature``,
``X-Amz-Credential``, ``sig``, ``token``...) and image data (base64 in answers, bytes in S3 uploads).
:func:`redact_text` cuts all three out of a string; :func:`install_log_redaction` puts a filter doing
the same on the third-party loggers that print requests, responses and bodies at DEBUG level.

Kept free of Airflow imports: :mod:`airflow_provider_jimeng.exceptions` uses it.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any
from urllib.parse import urlsplit

#: Loggers whose DEBUG lines carry URLs, headers or bodies (checked against urllib3 2.x, botocore 1.4x,
#: s3transfer 0.1x): ``botocore.endpoint`` logs every request's params (an upload's whole body) and the
#: prepared request (URL and signed headers), ``botocore.parsers`` response bodies, ``botocore.auth``
#: canonical requests and signatures, ``botocore.hooks`` handler arguments, urllib3 request lines
#: (path and query) and retry/redirect URLs. Their children are covered by :func:`install_log_redaction`.
REDACTED_LOGGER_PREFIXES = ("urllib3", "requests", "botocore", "boto3", "s3transfer")
_KNOWN_LOGGERS = (
    "urllib3.connectionpool",
    "urllib3.connection",
    "urllib3.poolmanager",
    "urllib3.response",
    "urllib3.util.retry",
    "requests",
    "botocore",
    "botocore.auth",
    "botocore.awsrequest",
    "botocore.client",
    "botocore.endpoint",
    "botocore.handlers",
    "botocore.hooks",
    "botocore.httpchecksum",
    "botocore.httpsession",
    "botocore.parsers",
    "botocore.response",
    "botocore.retryhandler",
    "botocore.retries.standard",
    "botocore.utils",
    "boto3.resources.action",
    "boto3.s3.transfer",
    "s3transfer",
    "s3transfer.futures",
    "s3transfer.manager",
    "s3transfer.tasks",
    "s3transfer.upload",
    "s3transfer.utils",
)

_BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{120,}={0,2}")
_DATA_URI = re.compile(r"data:[\w/+.-]*;base64,[A-Za-z0-9+/=]*", re.IGNORECASE)
#: A URL; an already redacted one ("...?<redacted>") matches whole, so redacting twice changes nothing.
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>\\]+(?:<redacted>)?")
#: A path with a query, as urllib3 and requests print it without scheme and host ("/x.jpeg?sig=...").
_PATH_QUERY = re.compile(r"(?<![\w?])(/[^\s?#'\"<>\\]*)\?[^\s'\"<>\\]+")
#: What follows the ``:`` of ``host:8080/...``: a port, then a path, query or fragment (no password).
_PORT_THEN_PATH = re.compile(r"\d*(?:[/?#].*)?", re.DOTALL)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
_API_KEY_LIKE = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")
#: AWS and TOS signing material in headers and canonical requests.
_SIGNING = re.compile(
    r"(?i)\b(signature|credential|x-amz-security-token|x-amz-signature|x-amz-credential|x-tos-signature"
    r"|x-tos-credential|x-tos-security-token)(['\"]?\s*[=:]\s*(?:b?['\"])?)[^\s,;'\"&]+"
)
_SECRET_PLACEHOLDER = "***"
_MIN_SECRET_LENGTH = 6

_secrets: frozenset[str] = frozenset()
_secrets_lock = threading.Lock()


def register_secret(secret: str | None) -> None:
    """Mask this exact string (an API key) in every message :func:`redact_text` cleans from now on."""
    global _secrets
    if not secret or len(secret) < _MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        _secrets = _secrets | {secret}


def redact_url(url: str | None, *, shorten: bool = True) -> str:
    """Show where a URL points without its query or credentials: ``https://host/path?<redacted>``.

    ``shorten`` cuts paths longer than 80 characters (labels in messages); log lines keep them whole.
    """
    if not url:
        return ""
    url, credentials = _cut_userinfo(url)
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:  # e.g. an unbalanced "[" in the host: say nothing of it
        return "<unparseable URL>"
    if parts.scheme == "data":
        return "data:<redacted>"
    path = parts.path if len(parts.path) <= 80 or not shorten else parts.path[:77] + "..."
    shown = f"{parts.scheme}://{'<redacted>@' if credentials or '@' in parts.netloc else ''}{host}{path}"
    return shown + ("?<redacted>" if parts.query else "")


def _cut_userinfo(url: str) -> tuple[str, bool]:
    """``url`` without its user and password, and whether it had them, whatever the scheme.

    A password in a connection URL is often not percent-encoded (``redis://:pa/ss@host``,
    ``socks5h://user:p#w@proxy``): :func:`urlsplit` would end the netloc at its ``/``, ``?`` or ``#``
    and show the rest as path, query or fragment. The userinfo ends at the last ``@`` before the host
    when what precedes that ``@`` holds a ``:`` not followed by a port (digits up to the first ``/``).
    """
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url, False
    authority_end = len(rest)
    for delimiter in "/?#":
        position = rest.find(delimiter)
        if position != -1:
            authority_end = min(authority_end, position)
    if "@" in rest[:authority_end]:
        at = rest.rfind("@", 0, authority_end)  # an unencoded "@" in the password: the last one ends it
    else:
        at = rest.rfind("@")
        user, colon, after = rest[:at].partition(":")
        if not colon or "/" in user or _PORT_THEN_PATH.fullmatch(after):
            return url, False  # "https://host/@user" or "https://host:8080/@user": an "@" in the path
    return f"{scheme}://{rest[at + 1 :]}", True


def redact_text(text: str) -> str:
    """Cut registered secrets, bearer tokens, URL queries, signing material and image data out of ``text``."""
    if not text:
        return text
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _SECRET_PLACEHOLDER)
    text = _DATA_URI.sub("data:<redacted>", text)
    text = _BEARER.sub(r"\1<redacted>", text)
    text = _API_KEY_LIKE.sub("sk-<redacted>", text)
    text = _URL.sub(lambda match: redact_url(match.group(), shorten=False), text)
    text = _PATH_QUERY.sub(r"\1?<redacted>", text)
    text = _SIGNING.sub(r"\1\2<redacted>", text)
    return _BASE64_RUN.sub(lambda match: f"<{len(match.group())} base64 chars>", text)


def redact_value(value: Any, depth: int = 0) -> Any:
    """``value`` with :func:`redact_text` applied to every string inside it, and bytes shown by their size.

    For what Airflow stores and shows of a task (its rendered template fields): lists, tuples and dicts
    are rebuilt only where something changed, so an unchanged value comes back as the very same object.
    """
    if isinstance(value, str):
        shown = redact_text(value)
        return value if shown == value else shown
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if depth >= 20:
        return value
    if type(value) in (list, tuple):
        items = [redact_value(item, depth + 1) for item in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
    if isinstance(value, dict):
        pairs = {key: redact_value(item, depth + 1) for key, item in value.items()}
        return value if all(pairs[key] is item for key, item in value.items()) else pairs
    return value


def _scrub(value: Any, depth: int = 0) -> Any:
    """Replace binary bodies inside log arguments by their size, before they are formatted at all."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _Placeholder(f"<{len(value)} bytes>")
    if depth >= 6:
        return value
    if isinstance(value, dict):
        return {key: _scrub(item, depth + 1) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_scrub(item, depth + 1) for item in value)
    return value


class _Placeholder(str):
    """A string whose ``repr`` has no quotes, so ``%r`` shows ``<123 bytes>``."""

    def __repr__(self) -> str:
        return str(self)


class RedactingLogFilter(logging.Filter):
    """Format a record with bodies replaced by their size, then cut secrets out of the text (see module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = str(record.msg)
            if record.args:
                args = record.args
                scrubbed = _scrub(args) if isinstance(args, tuple) else _scrub(dict(args))
                message = message % scrubbed
            if record.name == "botocore.auth" and record.args:
                # Canonical requests, strings to sign and signatures: only the template is harmless.
                message = str(record.msg).split("%", 1)[0].rstrip(":\n ") + ": <redacted>"
            record.msg = redact_text(message)
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                trace = logging.Formatter().formatException(record.exc_info)
                record.exc_text = redact_text(trace)
                record.exc_info = None
        except Exception:  # a filter must never break logging
            record.msg = f"<{record.name} log record withheld: it could not be redacted>"
            record.args = None
            record.exc_info = None
        return True


_FILTER = RedactingLogFilter()
_install_lock = threading.Lock()


def install_log_redaction() -> None:
    """Put :class:`RedactingLogFilter` on the loggers of urllib3, requests, botocore, boto3 and s3transfer.

    Idempotent and cheap: call it from every module that makes those libraries log (the hook, S3
    storage). A logger's filters see only records logged on that very logger, so the filter goes on
    every known logger of those libraries (created now if their module is not imported yet) and on
    every existing logger under their names.
    """
    with _install_lock:
        names = set(_KNOWN_LOGGERS)
        names.update(
            name for name in list(logging.root.manager.loggerDict) if name.split(".", 1)[0] in REDACTED_LOGGER_PREFIXES
        )
        for name in sorted(names):
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
