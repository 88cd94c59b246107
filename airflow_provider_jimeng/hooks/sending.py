"""Where a request is sent: the pooled HTTP session, one attempt's POST, and what a failed one means.

Shared by the Ark hook and the Visual API client (which signs its request first, :mod:`.signing`):
:func:`send_attempt` posts once, headers first and body after, and turns a request that got no answer
into a typed error saying whether it may have reached the service (and be billed). Retrying is
:mod:`.retry`'s, pacing :mod:`.pacing`'s, reading the answer :mod:`.answer_body`'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from airflow_provider_jimeng.exceptions import JiMengConfigurationError, JiMengTimeoutError
from airflow_provider_jimeng.redaction import install_log_redaction, redact_url

#: What every request of the provider says it is.
USER_AGENT = "airflow-provider-jimeng"

# Signed URLs, bodies and signatures in urllib3's and botocore's DEBUG lines: cut before any handler sees them.
install_log_redaction()


class TransportSettings(Protocol):
    """The connection settings a request is sent with (both APIs' connection configs have them)."""

    @property
    def connect_timeout(self) -> float: ...

    @property
    def verify(self) -> bool | str: ...

    @property
    def proxies(self) -> dict[str, str] | None: ...


def pooled_session(
    *,
    pool_maxsize: int,
    pool_connections: int = 4,
    headers: Mapping[str, str] | None = None,
    proxies: dict[str, str] | None = None,
    verify: bool | str = True,
) -> requests.Session:
    """A session keeping up to ``pool_maxsize`` connections per host, never retrying on its own."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=pool_connections, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers.update({"User-Agent": USER_AGENT, **(headers or {})})
    if proxies:
        session.proxies.update(proxies)
    session.verify = verify
    return session


def post_streamed(
    session: requests.Session,
    url: str,
    *,
    data: bytes,
    settings: TransportSettings,
    read_timeout: float,
    headers: Mapping[str, str] | None = None,
) -> requests.Response:
    """POST ``data`` and return once the answer's headers are in; its body is read by the caller."""
    return session.post(
        url,
        data=data,
        headers=headers,
        timeout=(settings.connect_timeout, read_timeout),
        # Headers first, body after: if the body breaks off, the server's request id is known.
        stream=True,
        # Per request, not only on the session: requests lets REQUESTS_CA_BUNDLE / HTTPS_PROXY
        # in the environment override a session's verify and proxies.
        verify=settings.verify,
        proxies=settings.proxies,
    )


def send_attempt(
    session: requests.Session,
    url: str,
    *,
    data: bytes,
    settings: TransportSettings,
    read_timeout: float,
    request_id: str,
    headers: Mapping[str, str] | None = None,
) -> requests.Response:
    """One attempt's POST (:func:`post_streamed`); no answer raises :func:`transport_failure`'s error."""
    try:
        return post_streamed(session, url, data=data, settings=settings, read_timeout=read_timeout, headers=headers)
    except OSError as exc:  # requests' exceptions are OSErrors, and so is a CA bundle that is not there
        raise transport_failure(
            exc, url, connect_timeout=settings.connect_timeout, read_timeout=read_timeout, request_id=request_id
        ) from None


def never_connected(exc: requests.ConnectionError) -> bool:
    """Whether a connection error came before the request left: refused, unresolvable, proxy refused."""
    if isinstance(exc, requests.exceptions.ProxyError):
        return True
    cause = exc.args[0] if exc.args else None
    cause = getattr(cause, "reason", cause)  # urllib3's MaxRetryError wraps the cause
    return isinstance(cause, (NewConnectionError, ConnectTimeoutError))


def transport_failure(
    exc: OSError, url: str, *, connect_timeout: float, read_timeout: float, request_id: str
) -> JiMengTimeoutError | JiMengConfigurationError:
    """What a request that got no answer raises; ``possibly_billed`` when it may have reached the service.

    A setting that cannot work (a certificate that does not verify, a CA bundle that is not there, an
    invalid URL) is a :class:`JiMengConfigurationError`: a retry would fail the same way.
    """
    host = urlsplit(url).netloc
    name = type(exc).__name__
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return JiMengTimeoutError(
            f"could not connect to {host} within {connect_timeout:g}s ({name}); nothing was sent",
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
        return JiMengConfigurationError("host", f"the request URL is not valid ({name}): {redact_url(url)}")
    if isinstance(exc, requests.ConnectionError):
        if never_connected(exc):
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
