"""Routing and auth: which path gets which answer, and who may ask.

``POST .../images/generations`` goes to :mod:`.generation`, ``POST /?Action=...`` (the Visual API)
to :mod:`.visual`, ``GET /tos/...`` to :mod:`.tos`, ``GET .../models`` and ``/healthz`` are answered
here, ``/_emulator/...`` (ledger, counters, reset) by :mod:`.inspection`. Path-matched faults
(``Fault(path=...)``) on routes other than generation are applied here too; never on
``/_emulator/...``, which must tell the truth while faults play.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow_provider_jimeng.emulator.generation import MALFORMED_BODY, error_fault, fail, generate
from airflow_provider_jimeng.emulator.inspection import (
    INSPECTION_PREFIX,
    LEDGER_PATH,
    RESET_PATH,
    STATS_PATH,
    ledger_payload,
    stats_payload,
)
from airflow_provider_jimeng.emulator.protocol import KNOWN_MODELS, new_request_id
from airflow_provider_jimeng.emulator.runtime import TOS_PREFIX
from airflow_provider_jimeng.emulator.tos import serve_download, tos_error
from airflow_provider_jimeng.emulator.visual import VISUAL_PATH, answer_visual
from airflow_provider_jimeng.emulator.wire import BadRequestBody, Exchange

if TYPE_CHECKING:
    from airflow_provider_jimeng.emulator.server import JiMengEmulator

log = logging.getLogger(__name__)

GENERATION_PATHS = frozenset({"/api/v3/images/generations", "/v1/images/generations"})
MODELS_PATHS = frozenset({"/api/v3/models", "/v1/models"})
_MODELS_CREATED = 1_757_000_000


class EmulatorServerLike:
    """What the handler needs of its server (the emulator it serves)."""

    emulator: JiMengEmulator


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "JiMengEmulator"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    timeout = 300.0  # idle keep-alive connections are closed after this
    server: EmulatorServerLike  # type: ignore[assignment]

    @property
    def emulator(self) -> JiMengEmulator:
        return self.server.emulator

    def version_string(self) -> str:
        return self.server_version

    def setup(self) -> None:
        super().setup()
        self.emulator.runtime.stats.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.emulator.runtime.stats.track(self.connection, False)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Never the query string: it carries URL signatures.
        log.debug("%s %s %s -> %s", self.client_address[0], self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("JiMeng emulator: %s", format % args)

    def _exchange(self) -> Exchange:
        return Exchange(self, new_request_id(), self.emulator.root_url)

    def authorized(self) -> bool:
        key = self.emulator.api_key
        if key is None:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    # -- routing ---------------------------------------------------------------------------------

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        exchange = self._exchange()
        if path.startswith(INSPECTION_PREFIX):
            self._inspect(exchange, path)
        elif path in GENERATION_PATHS:
            exchange.send_error(
                405, "MethodNotAllowed", "Use POST.", error_type="MethodNotAllowed", headers={"Allow": "POST"}
            )
        elif path not in MODELS_PATHS and path != "/healthz" and not path.startswith(TOS_PREFIX):
            self._not_found(exchange, path)
        elif self._path_fault(exchange, path):
            pass
        elif path == "/healthz":
            exchange.send(200, b'{"status": "ok"}')
        elif path in MODELS_PATHS:
            self._models(exchange)
        else:
            serve_download(exchange, self.emulator, self.path)

    def _method_not_allowed(self) -> None:
        exchange = self._exchange()
        exchange.read_body_quietly()
        exchange.send_error(
            405, "MethodNotAllowed", f"{self.command} is not allowed here.", error_type="MethodNotAllowed"
        )

    do_PUT = do_DELETE = do_PATCH = _method_not_allowed

    def do_POST(self) -> None:
        # The request line and headers are in: the moment the emulator has the request (bench P1).
        received_at = time.monotonic()
        path = urlsplit(self.path).path
        exchange = self._exchange()
        generation = path in GENERATION_PATHS
        stats = self.emulator.runtime.stats
        if generation:
            stats.count("request_count")
        try:
            raw = exchange.read_body()
        except BadRequestBody as exc:
            if generation:
                stats.add_record(self._new_record(path, exchange, received_at) | {"status": exc.status})
            code = "InvalidParameter" if exc.status == 400 else "RequestEntityTooLarge"
            exchange.send_error(exc.status, code, str(exc), error_type="BadRequest", close=True)
            return
        if path == RESET_PATH:
            self.emulator.reset()
            exchange.send_json(200, {"status": "reset"})
            return
        if path == VISUAL_PATH:
            answer_visual(exchange, self.emulator, self.headers, self.path, raw, received_at)
            return
        if not generation:
            self._not_found(exchange, path)
            return
        record = self._new_record(path, exchange, received_at)
        stats.enter()
        try:
            if not self.authorized():
                message = "The API key in the request is missing or invalid."
                fail(exchange, record, self.emulator, 401, "AuthenticationError", message, error_type="Unauthorized")
                return
            generate(exchange, self.emulator, path, raw, record)
        finally:
            # The answer's last byte is written (or the write failed): the moment it left the emulator.
            record["answered_at"] = time.monotonic()
            stats.leave()

    # -- routes ----------------------------------------------------------------------------------

    def _not_found(self, exchange: Exchange, path: str) -> None:
        if "image" in path or "generation" in path:
            code, message = "InvalidEndpointOrModel.NotFound", f"The requested endpoint {path} does not exist."
        else:
            code, message = "NotFound", f"The requested resource {path} does not exist."
        exchange.send_error(404, code, message, error_type="NotFound")

    def _inspect(self, exchange: Exchange, path: str) -> None:
        """``GET /_emulator/ledger`` and ``/_emulator/stats``; no key needed (a loopback dev tool)."""
        if path == LEDGER_PATH:
            exchange.send_json(200, ledger_payload(self.emulator))
        elif path == STATS_PATH:
            exchange.send_json(200, stats_payload(self.emulator))
        elif path == RESET_PATH:
            exchange.send_error(
                405, "MethodNotAllowed", "Use POST.", error_type="MethodNotAllowed", headers={"Allow": "POST"}
            )
        else:
            self._not_found(exchange, path)

    def _models(self, exchange: Exchange) -> None:
        if not self.authorized():
            exchange.send_error(
                401,
                "AuthenticationError",
                "The API key in the request is missing or invalid.",
                error_type="Unauthorized",
            )
            return
        data = [
            {"id": model, "object": "model", "created": _MODELS_CREATED, "owned_by": "bytedance"}
            for model in KNOWN_MODELS
        ]
        exchange.send_json(200, {"object": "list", "data": data})

    def _new_record(self, path: str, exchange: Exchange, received_at: float) -> dict[str, Any]:
        """A generation request's record; ``received_at``/``answered_at`` are this host's monotonic clock."""
        return {
            "path": path,
            "status": None,
            "request_id": exchange.request_id,
            "client_request_id": self.headers.get("X-Client-Request-Id"),
            "body": None,
            "fault": None,
            "images": 0,
            "received_at": received_at,
            "answered_at": None,
        }

    def _path_fault(self, exchange: Exchange, path: str) -> bool:
        """Apply a path-matched fault to a request other than generation; ``True`` when it answered."""
        fault = self.emulator.runtime.faults.take(path, generation=False)
        if fault is None:
            return False
        if error_fault(exchange, None, self.emulator, fault):
            return True
        if fault.kind == "malformed":
            exchange.send(200, MALFORMED_BODY)
        elif fault.kind in ("truncated", "reset_mid_body"):
            body = json.dumps({"status": "ok", "data": [{"id": "truncated"}]}).encode()
            if fault.kind == "truncated":
                exchange.send(200, body[: len(body) // 2])
            else:
                exchange.send(200, body[: len(body) // 2], content_length=len(body))
                exchange.reset()
        elif fault.kind == "expired_url":
            tos_error(exchange, 403, "AccessDenied", "Request has expired")
        elif fault.kind == "missing_url":
            tos_error(exchange, 404, "NoSuchKey", "The specified key does not exist.")
        else:
            return False  # slow (already waited) and answer-shape faults: answer normally
        return True
