"""The emulator: a threaded HTTP/1.1 server on loopback that answers like the JiMeng / Seedream API.

It exists so the provider can be developed, tested, demonstrated and benchmarked without a key, a
network or a bill, while still exercising everything that matters on the wire: auth and validation
errors with request ids, real JPEGs of the requested size, signed URLs that expire, server-sent
events, rate limits, and scripted faults (:class:`~airflow_provider_jimeng.emulator.faults.Fault`)
for the retry and billing paths. A ledger records what the real service would have billed.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import logging
import math
import re
import secrets
import select
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from hashlib import sha256
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from airflow_provider_jimeng.api.capabilities import MAX_IMAGES_PER_REQUEST, rendered_dimensions
from airflow_provider_jimeng.api.request import max_images_billed, validate_body
from airflow_provider_jimeng.emulator.faults import ERROR_FAULTS, Fault, FaultQueue
from airflow_provider_jimeng.emulator.images import ImageKey, ImageStore, RenderCache
from airflow_provider_jimeng.emulator.ledger import Ledger, LedgerEntry
from airflow_provider_jimeng.emulator.protocol import (
    FAIL_IMAGE_MARKER,
    KNOWN_MODELS,
    error_body,
    images_for,
    new_request_id,
    redact_body,
)
from airflow_provider_jimeng.emulator.ratelimit import ImageRateLimiter
from airflow_provider_jimeng.exceptions import JiMengConfigurationError

log = logging.getLogger(__name__)

#: The key the emulator accepts unless told otherwise (``Authorization: Bearer emulator-key``).
DEFAULT_API_KEY = "emulator-key"

GENERATION_PATHS = frozenset({"/api/v3/images/generations", "/v1/images/generations"})
MODELS_PATHS = frozenset({"/api/v3/models", "/v1/models"})
TOS_PREFIX = "/tos/"
TOS_BUCKET = "ark-content-generation-emulator"
MAX_BODY_BYTES = 256 * 1024 * 1024
#: How many per-request records :attr:`JiMengEmulator.requests` keeps (the oldest are dropped).
MAX_REQUEST_RECORDS = 10_000
_WRITE_CHUNK = 256 * 1024
_MODELS_CREATED = 1_757_000_000
_MALFORMED_BODY = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
_HOST_HEADER = re.compile(r"^(?:[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$")


class _BadRequestBody(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], emulator: JiMengEmulator) -> None:
        self.emulator = emulator
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN, which can stall for seconds without DNS.
        TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called by socketserver while it handles the exception: clients hanging up are routine,
        # anything else is a bug worth a traceback.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("JiMeng emulator: connection from %s failed: %r", client_address, error)
        else:
            log.error("JiMeng emulator: error serving %s:\n%s", client_address, traceback.format_exc())


class JiMengEmulator:
    """An offline JiMeng API on ``http://host:port``; use as a context manager or start()/stop().

    ``latency`` (seconds per generated image), ``images_per_minute`` (``None`` = unlimited),
    ``rate_limit_burst`` (``None``: the limit is a sliding 60 s window; a number: a token bucket of
    that many images, refilled evenly over the minute), ``url_ttl`` and ``moderation_marker`` may be
    changed while it runs. A prompt containing
    ``moderation_marker`` is refused as sensitive (400); ``FAIL_IMAGE_<k>`` in a prompt makes image
    ``k`` (0-based) of the answer fail moderation while the others succeed (and are billed).

    ``GET {base_url}/models`` lists the known models and requires the key, so a connection test can
    check the key without paying for an image. That route is an emulator convenience: the real
    Ark endpoint is not guaranteed to offer it, so the hook must probe the real service differently.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = DEFAULT_API_KEY,
        latency: float = 0.0,
        images_per_minute: int | None = None,
        url_ttl: float = 86400.0,
        moderation_marker: str = "FORBIDDEN",
        rate_limit_burst: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.api_key = api_key
        self.latency = latency
        self.images_per_minute = images_per_minute
        self.rate_limit_burst = rate_limit_burst
        self.url_ttl = url_ttl
        self.moderation_marker = moderation_marker
        self._faults = FaultQueue()
        self._ledger = Ledger()
        self._limiter = ImageRateLimiter()
        self._cache = RenderCache()
        self._store = ImageStore()
        self._signing_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._request_count = 0
        self._rate_limited = 0
        self._downloads = 0
        self._records: deque[dict[str, Any]] = deque(maxlen=MAX_REQUEST_RECORDS)
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> JiMengEmulator:
        """Bind and serve in a daemon thread; a second call does nothing."""
        if self._server is not None:
            return self
        self._stopping.clear()
        server = _Server((self.host, self.port), self)
        self._server = server
        self._bound_port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"jimeng-emulator-{self._bound_port}",
            daemon=True,
        )
        self._thread.start()
        log.info("JiMeng emulator serving %s (and %s)", self.base_url, self.openai_base_url)
        return self

    def stop(self) -> None:
        """Stop serving, break open keep-alive connections and wake requests sleeping on latency."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        # shutdown() waits for the serve loop to wake up; a throwaway connection wakes it at once.
        stopper = threading.Thread(target=server.shutdown, name="jimeng-emulator-stop", daemon=True)
        stopper.start()
        with contextlib.suppress(OSError):
            socket.create_connection(self._connect_address(), timeout=0.5).close()
        stopper.join()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None
        log.info("JiMeng emulator on port %s stopped", self._bound_port)

    def __enter__(self) -> JiMengEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- addresses -------------------------------------------------------------------------------

    def _connect_address(self) -> tuple[str, int]:
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return host, self._bound_port or 0

    @property
    def root_url(self) -> str:
        if self._bound_port is None:
            raise RuntimeError("the emulator is not started: call start() or use it as a context manager")
        host = self._connect_address()[0]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._bound_port}"

    @property
    def base_url(self) -> str:
        """Base URL in the official style (``.../api/v3``)."""
        return f"{self.root_url}/api/v3"

    @property
    def openai_base_url(self) -> str:
        """Base URL in the OpenAI-compatible gateway style (``.../v1``)."""
        return f"{self.root_url}/v1"

    # -- scripting and inspection ----------------------------------------------------------------

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each matching request consumes one use of the first matching fault (FIFO).

        Generation faults are consumed only by authenticated requests whose body is valid (those the
        service would have started to process).
        """
        self._faults.push(*faults)

    def clear_faults(self) -> None:
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        return len(self._faults)

    @property
    def ledger(self) -> list[LedgerEntry]:
        return self._ledger.entries()

    @property
    def billed_images(self) -> int:
        return self._ledger.billed_images()

    @property
    def request_count(self) -> int:
        with self._lock:
            return self._request_count

    @property
    def requests(self) -> list[dict[str, Any]]:
        """One record per generation POST (newest last, at most 10,000), bodies with images redacted."""
        with self._lock:
            return [dict(record) for record in self._records]

    @property
    def rate_limited_count(self) -> int:
        with self._lock:
            return self._rate_limited

    @property
    def downloads(self) -> int:
        with self._lock:
            return self._downloads

    def reset(self) -> None:
        """Forget ledger, counters, request records, faults and the rate-limit window."""
        self._faults.clear()
        self._ledger.clear()
        self._limiter.clear()
        with self._lock:
            self._request_count = 0
            self._rate_limited = 0
            self._downloads = 0
            self._records.clear()

    # -- used by the handler ---------------------------------------------------------------------

    def _track(self, connection: socket.socket, active: bool) -> None:
        with self._lock:
            if active:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def _add_record(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._records.append(record)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def _signature(self, image_id: str, date: str, expires: str) -> str:
        message = f"{image_id}\n{date}\n{expires}".encode()
        return hmac.new(self._signing_key, message, sha256).hexdigest()

    def _issue_url(self, key: ImageKey, root: str, fault_kind: str | None) -> str:
        now = time.time()
        if fault_kind == "missing_url":
            image_id = secrets.token_hex(16)  # never stored: downloads answer 404
        else:
            expires_at = now if fault_kind == "expired_url" else now + self.url_ttl
            image_id = self._store.put(key, expires_at)
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        expires = str(max(1, math.ceil(self.url_ttl)))
        query = urlencode(
            [
                ("X-Tos-Algorithm", "TOS4-HMAC-SHA256"),
                ("X-Tos-Credential", f"AKLTemulator/{date[:8]}/cn-beijing/tos/request"),
                ("X-Tos-Date", date),
                ("X-Tos-Expires", expires),
                ("X-Tos-SignedHeaders", "host"),
                ("X-Tos-Signature", self._signature(image_id, date, expires)),
            ]
        )
        return f"{root}{TOS_PREFIX}{TOS_BUCKET}/{image_id}.jpeg?{query}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "JiMengEmulator"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    timeout = 300.0  # idle keep-alive connections are closed after this
    server: _Server
    _chunked = True
    #: When the current generation request arrived and its record (for the time its answer left), by
    #: this host's monotonic clock.
    _received_at = 0.0
    _record: dict[str, Any] | None = None

    @property
    def emulator(self) -> JiMengEmulator:
        return self.server.emulator

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.emulator._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.emulator._track(self.connection, False)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Never the query string: it carries URL signatures.
        log.debug("%s %s %s -> %s", self.client_address[0], self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("JiMeng emulator: %s", format % args)

    # -- routing ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            if not self._generic_fault(path, new_request_id()):
                self._send(200, b'{"status": "ok"}', request_id=new_request_id())
        elif path in MODELS_PATHS:
            self._models(path)
        elif path.startswith(TOS_PREFIX):
            self._download(path)
        elif path in GENERATION_PATHS:
            request_id = new_request_id()
            self._send(
                405,
                error_body("MethodNotAllowed", "Use POST.", request_id, error_type="MethodNotAllowed"),
                request_id=request_id,
                headers={"Allow": "POST"},
            )
        else:
            self._not_found(path)

    def _method_not_allowed(self) -> None:
        request_id = new_request_id()
        self._read_body_quietly()
        self._send(
            405,
            error_body(
                "MethodNotAllowed", f"{self.command} is not allowed here.", request_id, error_type="MethodNotAllowed"
            ),
            request_id=request_id,
        )

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def _read_body_quietly(self) -> None:
        try:
            self._read_body()
        except _BadRequestBody:
            self.close_connection = True

    def do_POST(self) -> None:
        # The request line and headers are in: the moment the emulator has the request.
        self._received_at = time.monotonic()
        self._record = None
        path = urlsplit(self.path).path
        generation = path in GENERATION_PATHS
        if generation:
            self.emulator._count("_request_count")
        try:
            raw = self._read_body()
        except _BadRequestBody as exc:
            request_id = new_request_id()
            if generation:
                record = self._new_record(path, request_id)
                record["status"] = exc.status
                self.emulator._add_record(record)
            code = "InvalidParameter" if exc.status == 400 else "RequestEntityTooLarge"
            self._send(
                exc.status,
                error_body(code, str(exc), request_id, error_type="BadRequest"),
                request_id=request_id,
                close=True,
            )
        else:
            if not generation:
                self._not_found(path)
                return
            self._generate(path, raw)
        if self._record is not None:
            # The answer's last byte is written (or the write failed): the moment it left the emulator.
            self._record["answered_at"] = time.monotonic()

    def _not_found(self, path: str) -> None:
        request_id = new_request_id()
        if "image" in path or "generation" in path:
            code, message = "InvalidEndpointOrModel.NotFound", f"The requested endpoint {path} does not exist."
        else:
            code, message = "NotFound", f"The requested resource {path} does not exist."
        self._send(404, error_body(code, message, request_id, error_type="NotFound"), request_id=request_id)

    # -- plumbing --------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
        except ValueError:
            raise _BadRequestBody(400, "The Content-Length header is invalid.") from None
        if length < 0:
            raise _BadRequestBody(400, "The Content-Length header is invalid.")
        if length > MAX_BODY_BYTES:
            raise _BadRequestBody(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
        data = self.rfile.read(length)
        if len(data) < length:
            raise _BadRequestBody(400, "The request body ended before Content-Length bytes.")
        return data

    def _read_chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(65537)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequestBody(400, "The chunked request body is malformed.") from None
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                raise _BadRequestBody(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
            parts.append(self.rfile.read(size))
            self.rfile.readline(65537)

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        request_id: str,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        close: bool = False,
        content_length: int | None = None,
    ) -> bool:
        """Write a whole response; ``False`` when the connection broke while writing."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
            self.send_header("x-request-id", request_id)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            view = memoryview(body)
            for start in range(0, len(view), _WRITE_CHUNK):
                self.wfile.write(view[start : start + _WRITE_CHUNK])
            return True
        except OSError as exc:
            log.debug("JiMeng emulator: could not write response %s: %s", request_id, exc)
            self.close_connection = True
            return False

    def _send_error(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str,
        *,
        error_type: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        if record is not None:
            record["status"] = status
            record["error"] = code
            self.emulator._add_record(record)
        body = error_body(code, message, request_id, error_type=error_type, param=param)
        self._send(status, body, request_id=request_id, headers=headers)

    def _reset(self) -> None:
        """Drop the connection without (finishing) an answer: RST instead of an orderly close."""
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True

    def _peer_gone(self) -> bool:
        """Whether the client already hung up (e.g. its read timeout fired while we generated)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _authorized(self) -> bool:
        key = self.emulator.api_key
        if key is None:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _url_root(self) -> str:
        # Image URLs point back at the address the client used (works through Docker port mappings).
        host = self.headers.get("Host")
        if host and _HOST_HEADER.match(host):
            return f"http://{host}"
        return self.emulator.root_url

    def _new_record(self, path: str, request_id: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "path": path,
            "status": None,
            "request_id": request_id,
            "client_request_id": self.headers.get("X-Client-Request-Id"),
            "body": None,
            "fault": None,
            "images": 0,
            "received_at": self._received_at,
            "answered_at": None,
        }
        self._record = record
        return record

    def _generic_fault(self, path: str, request_id: str) -> bool:
        """Apply a path-matched fault to a non-generation request; ``True`` when it answered."""
        fault = self.emulator._faults.take(path, generation=False)
        if fault is None:
            return False
        return self._preflight_fault(fault, request_id, None) or self._late_fault(fault, request_id)

    def _preflight_fault(self, fault: Fault, request_id: str, record: dict[str, Any] | None) -> bool:
        """Faults that act before any work: error answers, resets and delays (``False`` = go on)."""
        if fault.kind in ERROR_FAULTS:
            status, code, error_type, message = ERROR_FAULTS[fault.kind]
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            self._send_error(status, code, message, request_id, error_type=error_type, headers=headers, record=record)
            return True
        if fault.kind == "reset":
            if record is not None:
                self.emulator._add_record(record)
            self._reset()
            return True
        if fault.kind == "slow":
            self.emulator._sleep(fault.delay)
        return False

    def _late_fault(self, fault: Fault, request_id: str) -> bool:
        """Delivery and URL faults applied to a non-generation request."""
        if fault.kind == "malformed":
            self._send(200, _MALFORMED_BODY, request_id=request_id)
            return True
        if fault.kind in ("truncated", "reset_mid_body"):
            body = b'{"status": "ok", "data": [{"id": "truncated"}]}'
            if fault.kind == "truncated":
                self._send(200, body[: len(body) // 2], request_id=request_id)
            else:
                self._send(200, body[: len(body) // 2], request_id=request_id, content_length=len(body))
                self._reset()
            return True
        if fault.kind == "expired_url":
            self._tos_error(403, "AccessDenied", "Request has expired", request_id)
            return True
        if fault.kind == "missing_url":
            self._tos_error(404, "NoSuchKey", "The specified key does not exist.", request_id)
            return True
        return False

    # -- routes ----------------------------------------------------------------------------------

    def _models(self, path: str) -> None:
        request_id = new_request_id()
        if self._generic_fault(path, request_id):
            return
        if not self._authorized():
            self._send_error(
                401,
                "AuthenticationError",
                "The API key in the request is missing or invalid.",
                request_id,
                error_type="Unauthorized",
            )
            return
        data = [
            {"id": model, "object": "model", "created": _MODELS_CREATED, "owned_by": "bytedance"}
            for model in KNOWN_MODELS
        ]
        self._send(200, json.dumps({"object": "list", "data": data}).encode(), request_id=request_id)

    def _tos_error(self, status: int, code: str, message: str, request_id: str) -> None:
        body = {"Code": code, "Message": message, "RequestId": request_id, "HostId": "tos-emulator"}
        self._send(status, json.dumps(body).encode(), request_id=request_id, headers={"x-tos-request-id": request_id})

    def _download(self, path: str) -> None:
        emulator = self.emulator
        request_id = new_request_id()
        if self._generic_fault(path, request_id):
            return
        name = path.rsplit("/", 1)[-1]
        image_id = name[: -len(".jpeg")] if name.endswith(".jpeg") else name
        query = parse_qs(urlsplit(self.path).query)

        def param(key: str) -> str:
            return query.get(key, [""])[0]

        expected = emulator._signature(image_id, param("X-Tos-Date"), param("X-Tos-Expires"))
        if not hmac.compare_digest(param("X-Tos-Signature"), expected):
            self._tos_error(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
                request_id,
            )
            return
        stored = emulator._store.get(image_id)
        if stored is None:
            self._tos_error(404, "NoSuchKey", "The specified key does not exist.", request_id)
            return
        if time.time() >= stored.expires_at:
            self._tos_error(403, "AccessDenied", "Request has expired", request_id)
            return
        try:
            data = emulator._cache.get(stored.key)
        except Exception:
            log.exception("JiMeng emulator: rendering image %s failed", image_id)
            self._tos_error(500, "InternalError", "We encountered an internal error.", request_id)
            return
        emulator._count("_downloads")
        self._send(
            200,
            data,
            request_id=request_id,
            content_type="image/jpeg",
            headers={"x-tos-request-id": request_id, "Cache-Control": "no-cache"},
        )

    def _generate(self, path: str, raw: bytes) -> None:
        emulator = self.emulator
        request_id = new_request_id()
        record = self._new_record(path, request_id)
        if not self._authorized():
            self._send_error(
                401,
                "AuthenticationError",
                "The API key in the request is missing or invalid.",
                request_id,
                error_type="Unauthorized",
                record=record,
            )
            return
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            self._send_error(
                400,
                "InvalidParameter",
                "The request body must be a JSON object.",
                request_id,
                error_type="BadRequest",
                record=record,
            )
            return
        record["body"] = redact_body(body)
        try:
            validate_body(body)
        except JiMengConfigurationError as exc:
            self._send_error(
                400,
                "InvalidParameter",
                str(exc),
                request_id,
                error_type="BadRequest",
                param=exc.parameter,
                record=record,
            )
            return
        model = body["model"]
        if model not in KNOWN_MODELS and not model.startswith("ep-"):
            self._send_error(
                404,
                "InvalidEndpointOrModel.NotFound",
                f"The model or endpoint {model} does not exist or you do not have access to it.",
                request_id,
                error_type="NotFound",
                param="model",
                record=record,
            )
            return
        fault = emulator._faults.take(path, generation=True)
        if fault is not None:
            record["fault"] = fault.kind
            log.info("JiMeng emulator: request %s gets injected fault %r", request_id, fault.kind)
            if self._preflight_fault(fault, request_id, record):
                return
        if emulator.moderation_marker and emulator.moderation_marker in body["prompt"]:
            self._send_error(
                400,
                "InputTextSensitiveContentDetected",
                "The request failed because the input text may contain sensitive information.",
                request_id,
                error_type="BadRequest",
                record=record,
            )
            return
        try:
            reservation_size = max_images_billed(body)
        except (TypeError, ValueError):
            reservation_size = MAX_IMAGES_PER_REQUEST
        reservation = emulator._limiter.reserve(reservation_size, emulator.images_per_minute, emulator.rate_limit_burst)
        if reservation is None:
            emulator._count("_rate_limited")
            _, code, error_type, message = ERROR_FAULTS["rate_limit"]
            self._send_error(429, code, message, request_id, error_type=error_type, record=record)
            return
        billed = 0
        try:
            if body.get("stream"):
                billed = self._answer_stream(body, request_id, record, fault)
            else:
                billed = self._answer_json(body, request_id, record, fault)
        finally:
            emulator._limiter.settle(reservation, billed)

    # -- generation ------------------------------------------------------------------------------

    def _plan(self, body: dict[str, Any]) -> tuple[list[ImageKey | None], int, int]:
        """The keys of the images to generate (``None`` for those that fail moderation), and W, H."""
        width, height = rendered_dimensions(body.get("size"))
        seed = body.get("seed")
        prompt = body["prompt"]
        keys: list[ImageKey | None] = []
        for index in range(images_for(body)):
            if FAIL_IMAGE_MARKER.format(index=index) in prompt:
                keys.append(None)
            else:
                keys.append(
                    ImageKey(
                        prompt, -1 if seed is None else seed, index, width, height, body.get("watermark") is not False
                    )
                )
        return keys, width, height

    def _image_item(self, key: ImageKey, body: dict[str, Any], root: str, fault: Fault | None) -> dict[str, Any]:
        data = self.emulator._cache.get(key)
        size = f"{key.width}x{key.height}"
        if body.get("response_format") == "b64_json":
            return {"b64_json": base64.b64encode(data).decode("ascii"), "size": size}
        return {"url": self.emulator._issue_url(key, root, fault.kind if fault else None), "size": size}

    @staticmethod
    def _failed_item(index: int, request_id: str) -> dict[str, Any]:
        return {
            "error": {
                "code": "OutputImageSensitiveContentDetected",
                "message": f"The output image {index} may contain sensitive information. Request id: {request_id}",
            }
        }

    def _bill(
        self, body: dict[str, Any], request_id: str, images: int, pixels: int, created: int, *, delivered: bool = True
    ) -> None:
        if images:
            entry = LedgerEntry(
                request_id, body["model"], body["prompt"], images, images * pixels // 256, delivered, created
            )
            self.emulator._ledger.record(entry)
        log.debug(
            "JiMeng emulator: request %s generated with %s, %d image(s) billed", request_id, body["model"], images
        )

    def _render_failed(self, request_id: str, record: dict[str, Any]) -> int:
        self._send_error(
            500,
            "InternalServiceError",
            "The emulator could not render the image (is Pillow installed? "
            "pip install 'airflow-provider-jimeng[emulator]').",
            request_id,
            error_type="InternalServerError",
            record=record,
        )
        return 0

    def _answer_json(self, body: dict[str, Any], request_id: str, record: dict[str, Any], fault: Fault | None) -> int:
        emulator = self.emulator
        keys, width, height = self._plan(body)
        emulator._sleep(emulator.latency * len(keys))
        root = self._url_root()
        try:
            items = [
                self._failed_item(index, request_id) if key is None else self._image_item(key, body, root, fault)
                for index, key in enumerate(keys)
            ]
        except Exception:
            log.exception("JiMeng emulator: generating request %s failed", request_id)
            return self._render_failed(request_id, record)
        billed = sum(key is not None for key in keys)
        created = int(time.time())
        tokens = billed * width * height // 256
        payload = {
            "model": body["model"],
            "created": created,
            "data": items,
            "usage": {"generated_images": billed, "output_tokens": tokens, "total_tokens": tokens},
        }
        # A client that gave up (timed out, hung up) is billed as undelivered in the same step, so that
        # nobody reading the ledger sees the answer delivered in between.
        gone = self._peer_gone()
        self._bill(body, request_id, billed, width * height, created, delivered=not gone)
        data = json.dumps(payload).encode()
        record["status"] = 200
        record["images"] = billed
        emulator._add_record(record)
        kind = fault.kind if fault else None
        if gone:
            delivered = False
            self.close_connection = True
        elif kind == "malformed":
            delivered = self._send(200, _MALFORMED_BODY, request_id=request_id)
        elif kind == "truncated":
            delivered = self._send(200, data[: len(data) // 2], request_id=request_id)
        elif kind == "reset_mid_body":
            self._send(200, data[: len(data) // 2], request_id=request_id, content_length=len(data))
            self._reset()
            delivered = False
        else:
            delivered = self._send(200, data, request_id=request_id)
        if not delivered and not gone:
            emulator._ledger.mark_undelivered(request_id)
        return billed

    def _write_chunk(self, data: bytes) -> bool:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)
            return True
        except OSError:
            self.close_connection = True
            return False

    def _answer_stream(self, body: dict[str, Any], request_id: str, record: dict[str, Any], fault: Fault | None) -> int:
        """Server-sent events, one per image as it is ready, then ``completed`` and ``[DONE]``."""
        emulator = self.emulator
        keys, width, height = self._plan(body)
        kind = fault.kind if fault else None
        model = body["model"]
        created = int(time.time())
        root = self._url_root()
        record["status"] = 200
        emulator._add_record(record)
        # HTTP/1.1 clients get chunked encoding (the connection stays usable); HTTP/1.0 ones an
        # unframed body ended by closing the connection.
        self._chunked = self.request_version == "HTTP/1.1"
        try:
            if self._peer_gone():
                raise ConnectionAbortedError("the client hung up before the stream started")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            if self._chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.send_header("x-request-id", request_id)
            self.end_headers()
            alive = True
        except OSError:
            alive = False
        # Faults that cut the stream stop writing after half of the images (at least one).
        cut_after = max(1, len(keys) // 2) if kind in ("truncated", "reset_mid_body") else len(keys)
        billed = 0
        errored = False
        # Like the service, generation goes on (and bills) even if the client has hung up.
        for index, key in enumerate(keys):
            emulator._sleep(emulator.latency)
            base = {"model": model, "created": created, "image_index": index}
            if key is None:
                event = {"type": "image_generation.partial_failed", **base, **self._failed_item(index, request_id)}
            else:
                try:
                    item = self._image_item(key, body, root, fault)
                except Exception:
                    log.exception("JiMeng emulator: generating request %s failed", request_id)
                    error = {"code": "InternalServiceError", "message": f"Rendering failed. Request id: {request_id}"}
                    alive = alive and self._write_chunk(_sse({"type": "error", "error": error}))
                    errored = True
                    break
                billed += 1
                event = {"type": "image_generation.partial_succeeded", **base, **item}
            if kind == "malformed":
                frame = b"data: {not json\n\n" if index == 0 else b""
            else:
                frame = _sse(event) if index < cut_after else b""
            if frame and alive:
                alive = self._write_chunk(frame)
        record["images"] = billed
        tokens = billed * width * height // 256
        self._bill(body, request_id, billed, width * height, created)
        if alive and not errored and kind not in ("malformed", "truncated", "reset_mid_body"):
            usage = {"generated_images": billed, "output_tokens": tokens, "total_tokens": tokens}
            completed = {"type": "image_generation.completed", "model": model, "created": created, "usage": usage}
            alive = self._write_chunk(_sse(completed)) and self._write_chunk(b"data: [DONE]\n\n")
        if kind == "reset_mid_body":
            self._reset()
            alive = False
        elif alive and self._chunked:
            try:
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                alive = False
                self.close_connection = True
        if not alive and billed:
            emulator._ledger.mark_undelivered(request_id)
        return billed


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
