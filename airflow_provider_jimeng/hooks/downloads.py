"""Where images are downloaded: a URL checked, fetched once, and streamed within a cap and a deadline.

The hook's :meth:`~airflow_provider_jimeng.hooks.jimeng.JiMengHook.open_image` retries
:func:`open_image_once` with the shared retry loop (:mod:`.retry`). Signed URLs carry their own
authorisation: the download session never sends an API key, keeps no cookies, and pools its own
connections.
"""

from __future__ import annotations

import hashlib
import ipaddress
import threading
from http.cookiejar import DefaultCookiePolicy
from urllib.parse import urlsplit

import requests

from airflow_provider_jimeng.exceptions import (
    JiMengDownloadError,
    JiMengDownloadInterruptedError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.answer_body import BoundedBody
from airflow_provider_jimeng.hooks.retry import parse_retry_after
from airflow_provider_jimeng.hooks.sending import TransportSettings, pooled_session
from airflow_provider_jimeng.redaction import redact_url

DEFAULT_DOWNLOAD_MAX_BYTES = 64 * 1024 * 1024


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine (plain http is allowed there: the offline emulator)."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ImageDownload(BoundedBody):
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


def download_session(pool_maxsize: int) -> requests.Session:
    """A pooled session for image downloads: no API key, no cookies, its own connections.

    Signed URLs carry their own authorisation, so this session never sends the key; reusing its
    connections saves a TCP (and TLS) handshake and a session set-up per image.
    """
    session = pooled_session(pool_maxsize=pool_maxsize)
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    return session


def check_download_url(url: str, *, allow_http: bool) -> None:
    """Refuse image URLs that are not https (plain http only with ``allow_http`` or on loopback)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise JiMengDownloadError(f"refusing to download {redact_url(url)}: not a valid URL") from None
    if parts.scheme == "https":
        return
    if parts.scheme == "http" and (allow_http or is_loopback(host)):
        return
    raise JiMengDownloadError(
        f"refusing to download {redact_url(url)}: only https URLs are fetched "
        "(set the connection extra allow_http=true to permit http)"
    )


def open_image_once(
    session: requests.Session,
    url: str,
    *,
    label: str,
    max_bytes: int,
    settings: TransportSettings,
    timeout: float,
    stop: threading.Event | None = None,
) -> ImageDownload:
    """One attempt at an image URL: its streamed body, or the error saying whether to try again.

    Transient failures (timeouts, 429, 5xx) raise a retryable :class:`JiMengTimeoutError`; expiry, 404,
    a certificate that does not verify or a body that is not an image raise a download error.
    ``timeout`` bounds each read and the whole body; ``label`` names the URL in messages (never in full).
    """
    try:
        # Signed URLs carry their own authorisation: never send the API key to the storage host.
        response = session.get(
            url,
            stream=True,
            timeout=(settings.connect_timeout, timeout),
            proxies=settings.proxies,
            verify=settings.verify,
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
    return ImageDownload(response, max_bytes=max_bytes, label=label, deadline_seconds=timeout, stop=stop)
