"""Where a Visual API request is signed: Volcengine's HMAC-SHA256 ("V4") scheme, stdlib only.

The Visual API (JiMeng 4.0 through ``visual.volcengineapi.com``) authenticates every request with an
access key pair instead of a bearer key: the request's method, path, sorted query, a few headers and the
body's SHA-256 are hashed into a canonical request, which a key derived from the secret, the date, the
region and the service signs. :func:`sign_request` gives the headers to send; the emulator verifies with
the same :func:`canonical_request` and :func:`signature`, so both ends share one definition (and
``tests/hooks/test_signing.py`` checks it against the official ``volcengine`` SDK's ``SignerV4``).

The secret never leaves :class:`VisualCredentials`: its repr hides it, and constructing one hands it to
Airflow's secrets masker and the provider's redaction, so no log line or exception message can carry it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import parse_qsl, quote, urlsplit

from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.redaction import register_secret
from airflow_provider_jimeng.version_compat import mask_secret

__all__ = [
    "ALGORITHM",
    "DEFAULT_REGION",
    "DEFAULT_SERVICE",
    "VisualCredentials",
    "canonical_query",
    "canonical_request",
    "credential_scope",
    "sha256_hex",
    "sign_request",
    "signature",
    "signed_header_names",
]

ALGORITHM = "HMAC-SHA256"
DEFAULT_REGION = "cn-north-1"
DEFAULT_SERVICE = "cv"
#: ``X-Date``'s format (UTC, basic ISO 8601); its first 8 characters are the scope's date.
DATE_FORMAT = "%Y%m%dT%H%M%SZ"
#: Headers signed besides every ``x-*`` one (``content-md5`` as the SDK does, when present).
_SIGNED_PLAIN_HEADERS = frozenset({"content-type", "content-md5", "host"})


@dataclass(frozen=True)
class VisualCredentials:
    """An access key pair and where it is valid; the secret is masked from the moment it exists."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str = DEFAULT_REGION
    service: str = DEFAULT_SERVICE

    def __post_init__(self) -> None:
        for name in ("access_key_id", "secret_access_key", "region", "service"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                # Never the value: for the secret it is what must not be shown.
                raise JiMengConfigurationError(name, "must be a non-empty string")
        # Both maskers, as the hook does with the API key: Airflow's (task logs) and the provider's own
        # (messages of its exceptions, third-party loggers).
        mask_secret(self.secret_access_key)
        register_secret(self.secret_access_key)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def _quote(text: str) -> str:
    return quote(text, safe="-_.~")


def canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    """The query sorted by name (then value) and RFC 3986-encoded, ``%20`` for spaces."""
    return "&".join(f"{_quote(name)}={_quote(value)}" for name, value in sorted(pairs))


def signed_header_names(headers: Mapping[str, str]) -> list[str]:
    """Lower-cased, sorted names of the headers that are signed: content-type, host and every ``x-*``."""
    names = {name.lower() for name in headers}
    return sorted(name for name in names if name in _SIGNED_PLAIN_HEADERS or name.startswith("x-"))


def _header_value(name: str, value: str) -> str:
    value = value.strip()
    if name == "host":
        host, _, port = value.rpartition(":")
        if host and port in ("80", "443"):
            return host
    return value


def canonical_request(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    signed_names: list[str],
    body_sha256: str,
) -> str:
    """Method, path, query, ``name:value`` per signed header, the signed-header list and the body hash."""
    lowered = {name.lower(): value for name, value in headers.items()}
    header_lines = "".join(f"{name}:{_header_value(name, lowered.get(name, ''))}\n" for name in signed_names)
    return "\n".join(
        [
            method.upper(),
            quote(path or "/", safe="/-_.~"),
            canonical_query(query),
            header_lines,
            ";".join(signed_names),
            body_sha256,
        ]
    )


def credential_scope(x_date: str, region: str, service: str) -> str:
    return f"{x_date[:8]}/{region}/{service}/request"


def signature(secret_access_key: str, x_date: str, region: str, service: str, canonical: str) -> str:
    """Hex HMAC of the string to sign under the key derived from the secret, date, region and service."""
    key = _hmac(secret_access_key.encode("utf-8"), x_date[:8])
    for part in (region, service, "request"):
        key = _hmac(key, part)
    string_to_sign = "\n".join(
        [ALGORITHM, x_date, credential_scope(x_date, region, service), sha256_hex(canonical.encode("utf-8"))]
    )
    return hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def sign_request(
    credentials: VisualCredentials,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    now: datetime | None = None,
) -> dict[str, str]:
    """The headers to send ``body`` to ``url`` with: ``headers`` plus Host, X-Date, X-Content-Sha256, Authorization.

    ``now`` (an aware or UTC-naive datetime) fixes the signing time; the default is the current time.
    Pass ``Content-Type`` in ``headers`` (the API takes ``application/json``) so that it is signed.
    """
    parts = urlsplit(url)
    if not parts.netloc:
        raise JiMengConfigurationError("url", f"must be an absolute URL with a host, got {parts.path!r}")
    moment = now or datetime.now(timezone.utc)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc)
    x_date = moment.strftime(DATE_FORMAT)
    body_sha256 = sha256_hex(body)
    signed: dict[str, str] = {name: value for name, value in (headers or {}).items() if name.lower() != "authorization"}
    if not any(name.lower() == "host" for name in signed):
        signed["Host"] = _header_value("host", parts.netloc.rpartition("@")[2])
    signed["X-Date"] = x_date
    signed["X-Content-Sha256"] = body_sha256
    names = signed_header_names(signed)
    query = parse_qsl(parts.query, keep_blank_values=True)
    canonical = canonical_request(method, parts.path, query, signed, names, body_sha256)
    hex_signature = signature(credentials.secret_access_key, x_date, credentials.region, credentials.service, canonical)
    scope = credential_scope(x_date, credentials.region, credentials.service)
    signed["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(names)}, Signature={hex_signature}"
    )
    return signed
