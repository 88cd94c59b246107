"""HTTP plumbing of one request: reading the body, writing whole answers, error envelopes and SSE.

Everything that writes bytes goes through :class:`Exchange`, so the request ids (``x-request-id``,
and the client's ``X-Client-Request-Id`` echoed back as the official SDK reads it), keep-alive and
broken-connection handling are the same for every route.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import select
import socket
import struct
from http.server import BaseHTTPRequestHandler
from typing import Any

from airflow_provider_jimeng.emulator.protocol import error_body

log = logging.getLogger(__name__)

CLIENT_REQUEST_ID_HEADER = "X-Client-Request-Id"
MAX_BODY_BYTES = 256 * 1024 * 1024
_WRITE_CHUNK = 256 * 1024
#: How the service labels an event stream (some gateways say ``application/json``).
EVENT_STREAM_CONTENT_TYPE = "text/event-stream; charset=utf-8"
_HOST_HEADER = re.compile(r"^(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")
_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


class BadRequestBody(Exception):
    """The request body could not be read (bad framing or too large)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Exchange:
    """One request and its answer, over the handler's connection."""

    def __init__(self, handler: BaseHTTPRequestHandler, request_id: str, fallback_root: str) -> None:
        self.handler = handler
        self.request_id = request_id
        self._fallback_root = fallback_root
        self._chunked = True
        client_id = handler.headers.get(CLIENT_REQUEST_ID_HEADER)
        #: The client's own request id, echoed back when it looks like one (printable, bounded).
        self.client_request_id = client_id if client_id and _CLIENT_ID.match(client_id) else None

    # -- reading ---------------------------------------------------------------------------------

    def read_body(self) -> bytes:
        """The request body, de-chunked; :class:`BadRequestBody` when it cannot be read."""
        headers, rfile = self.handler.headers, self.handler.rfile
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise BadRequestBody(400, "The Content-Length header is invalid.") from None
        if length < 0:
            raise BadRequestBody(400, "The Content-Length header is invalid.")
        if length > MAX_BODY_BYTES:
            raise BadRequestBody(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        data = rfile.read(length)
        if len(data) < length:
            raise BadRequestBody(400, "The request body ended before Content-Length bytes.")
        return data

    def _read_chunked(self) -> bytes:
        rfile = self.handler.rfile
        parts: list[bytes] = []
        total = 0
        while True:
            line = rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequestBody(400, "The chunked request body is malformed.") from None
            if size == 0:
                while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise BadRequestBody(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
            parts.append(rfile.read(size))
            rfile.readline(65537)

    def read_body_quietly(self) -> None:
        """Drain a body nobody needs, so the connection can serve the next request."""
        try:
            self.read_body()
        except BadRequestBody:
            self.handler.close_connection = True

    # -- whole answers ---------------------------------------------------------------------------

    def _ids(self) -> None:
        self.handler.send_header("x-request-id", self.request_id)
        if self.client_request_id is not None:
            self.handler.send_header(CLIENT_REQUEST_ID_HEADER, self.client_request_id)

    def send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        close: bool = False,
        content_length: int | None = None,
    ) -> bool:
        """Write a whole response; ``False`` when the connection broke while writing."""
        handler = self.handler
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(body) if content_length is None else content_length))
            self._ids()
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            if close:
                handler.send_header("Connection", "close")
                handler.close_connection = True
            handler.end_headers()
            view = memoryview(body)
            for start in range(0, len(view), _WRITE_CHUNK):
                handler.wfile.write(view[start : start + _WRITE_CHUNK])
            return True
        except OSError as exc:
            log.debug("JiMeng emulator: could not write response %s: %s", self.request_id, exc)
            handler.close_connection = True
            return False

    def send_json(self, status: int, payload: Any) -> bool:
        return self.send(status, json.dumps(payload).encode())

    def send_error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        error_type: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
    ) -> bool:
        """The documented error envelope, the request id at the end of its message."""
        body = error_body(code, message, self.request_id, error_type=error_type, param=param)
        return self.send(status, body, headers=headers, close=close)

    # -- server-sent events ----------------------------------------------------------------------

    def start_events(self, content_type: str = EVENT_STREAM_CONTENT_TYPE) -> bool:
        """Send the headers of an event stream (labelled ``content_type``); ``False`` when the client is gone.

        HTTP/1.1 clients get chunked encoding (the connection stays usable); HTTP/1.0 ones an
        unframed body ended by closing the connection.
        """
        handler = self.handler
        self._chunked = handler.request_version == "HTTP/1.1"
        try:
            if self.peer_gone():
                raise ConnectionAbortedError("the client hung up before the stream started")
            handler.send_response(200)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Cache-Control", "no-cache")
            if self._chunked:
                handler.send_header("Transfer-Encoding", "chunked")
            else:
                handler.send_header("Connection", "close")
                handler.close_connection = True
            self._ids()
            handler.end_headers()
            return True
        except OSError:
            handler.close_connection = True
            return False

    def write_event(self, event: dict[str, Any]) -> bool:
        """One SSE frame whose ``event:`` is the JSON ``type``, as the service sends them."""
        return self.write_raw(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())

    def write_raw(self, data: bytes) -> bool:
        try:
            self.handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
            return True
        except OSError:
            self.handler.close_connection = True
            return False

    def end_events(self) -> bool:
        """Close the chunked body (an HTTP/1.0 stream ends when the connection closes)."""
        if not self._chunked:
            return True
        try:
            self.handler.wfile.write(b"0\r\n\r\n")
            return True
        except OSError:
            self.handler.close_connection = True
            return False

    # -- connection ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop the connection without (finishing) an answer: RST instead of an orderly close."""
        with contextlib.suppress(OSError):
            self.handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.handler.close_connection = True

    def hang_up(self) -> None:
        self.handler.close_connection = True

    def peer_gone(self) -> bool:
        """Whether the client already hung up (e.g. its read timeout fired while we generated)."""
        connection = self.handler.connection
        try:
            readable, _, _ = select.select([connection], [], [], 0)
            return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def url_root(self) -> str:
        """Image URLs point back at the address the client used (works through Docker port mappings)."""
        host = self.handler.headers.get("Host")
        if host and _HOST_HEADER.match(host):
            return f"http://{host}"
        return self._fallback_root
