"""Where an answer's body is read: streamed, within a size cap and an overall deadline.

:class:`BoundedBody` reads a streamed :class:`requests.Response` as it arrives; :class:`AnswerBody` is
an API's answer (JSON or an event stream; every way it fails is possibly billed), shared by the Ark hook
and the Visual API client. Image downloads subclass it in :mod:`.downloads`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import requests
from urllib3.exceptions import HTTPError as Urllib3Error

from airflow_provider_jimeng.exceptions import JiMengResponseError, JiMengTimeoutError

#: Error bodies and connection tests are small: read at most this much of them.
ERROR_BODY_MAX_BYTES = 1024 * 1024
#: What a file-like ``read()`` without a size reads at once.
READ_CHUNK_BYTES = 1024 * 1024
SSE_CHUNK_BYTES = 64 * 1024


class BoundedBody:
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
        want = READ_CHUNK_BYTES if size is None or size < 0 else size
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


class AnswerBody(BoundedBody):
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
        return b"".join(iter(lambda: self.read(READ_CHUNK_BYTES), b""))

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
