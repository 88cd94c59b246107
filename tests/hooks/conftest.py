"""Helpers for the hook tests: connections, hooks that clean up after themselves, log capture, images."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import structlog
from PIL import Image
from structlog.testing import LogCapture

from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, JiMengEmulator
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.testing import jimeng_connection_json

#: Retry settings that keep retry tests fast while still exercising real waits.
FAST_RETRIES: dict[str, float] = {"retry_backoff": 0.01, "retry_max_wait": 0.2}

SetConnection = Callable[..., None]


@pytest.fixture
def set_connection(monkeypatch: pytest.MonkeyPatch) -> SetConnection:
    """``set_connection(value, conn_id="jimeng_default")``: a URI string or a dict of connection fields.

    A dict is written in Airflow's JSON form with ``conn_type`` ``jimeng``; a string is used as is.
    """

    def set_(value: str | dict[str, Any], conn_id: str = "jimeng_default") -> None:
        if isinstance(value, dict):
            value = json.dumps({"conn_type": "jimeng", **value})
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", value)

    return set_


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``connect(base_url, api_key=..., conn_id=..., **extra)``: a connection to an emulator (http allowed)."""

    def connect_(
        base_url: str, *, api_key: str = DEFAULT_API_KEY, conn_id: str = "jimeng_default", **extra: Any
    ) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", jimeng_connection_json(base_url, api_key, **extra))

    return connect_


@pytest.fixture
def make_hook() -> Iterator[Callable[..., JiMengHook]]:
    """A factory for hooks (``JiMengHook`` arguments, fast retries unless overridden); all closed after the test."""
    hooks: list[JiMengHook] = []

    def make(conn_id: str = "jimeng_default", **kwargs: Any) -> JiMengHook:
        hook = JiMengHook(conn_id, **{**FAST_RETRIES, **kwargs})
        hooks.append(hook)
        return hook

    yield make
    for hook in hooks:
        hook.close()


@pytest.fixture
def hook(jimeng_conn: JiMengEmulator, make_hook: Callable[..., JiMengHook]) -> JiMengHook:
    """A hook on ``jimeng_default`` (pointing at the test's emulator) with fast retries."""
    return make_hook()


@dataclass
class CapturedLogs:
    """Everything logged during a test: stdlib records (caplog) and the hook's structlog events."""

    caplog: pytest.LogCaptureFixture
    capture: LogCapture

    @property
    def hook_events(self) -> list[dict[str, Any]]:
        # Airflow 3.1+ hooks log through structlog; Airflow 3.0's BaseHook logs through stdlib logging.
        stdlib = [
            {"event": record.getMessage(), "log_level": record.levelname.lower()}
            for record in self.caplog.records
            if record.name.endswith(".JiMengHook")
        ]
        return list(self.capture.entries) + stdlib

    @property
    def messages(self) -> list[str]:
        stdlib = [f"{record.name} {record.levelname} {record.getMessage()}" for record in self.caplog.records]
        events = [" ".join(f"{key}={value}" for key, value in entry.items()) for entry in self.capture.entries]
        return stdlib + events

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[CapturedLogs]:
    """Capture every log line at DEBUG: the provider's, ``urllib3``'s, ``requests``' and the hook's own."""
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "requests", "airflow_provider_jimeng"):
        caplog.set_level(logging.DEBUG, logger=name)
    capture = LogCapture()
    saved = structlog.get_config()
    structlog.configure(processors=[capture])
    try:
        yield CapturedLogs(caplog, capture)
    finally:
        structlog.configure(processors=saved["processors"])


@pytest.fixture
def make_image() -> Callable[..., bytes]:
    """``make_image("JPEG", (32, 32))``: the bytes of a real image made with Pillow."""

    def make(image_format: str = "PNG", size: tuple[int, int] = (64, 48)) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", size, (30, 120, 200)).save(buffer, format=image_format)
        return buffer.getvalue()

    return make


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition``: the emulator may finish its bookkeeping just after the client gave up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., bool]:
    return wait_for


@dataclass(frozen=True)
class CannedResponse:
    """What :func:`canned_server` answers to every GET and POST."""

    body: bytes
    content_type: str = "image/jpeg"
    content_length: int | None = None  # None: no header, the body ends when the connection closes
    status: int = 200


class _CannedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    canned: CannedResponse

    def do_GET(self) -> None:
        self.send_response(self.canned.status)
        self.send_header("Content-Type", self.canned.content_type)
        if self.canned.content_length is not None:
            self.send_header("Content-Length", str(self.canned.content_length))
        self.end_headers()
        self.wfile.write(self.canned.body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def canned_server() -> Iterator[Callable[..., str]]:
    """``canned_server(body, content_type=..., content_length=..., status=...)``: a loopback server
    answering every request with that (see :class:`CannedResponse`); returns an image URL on it.

    For what the emulator cannot do: an image body cut short, or one without a Content-Length.
    """
    servers: list[ThreadingHTTPServer] = []

    def start(
        body: bytes, *, content_type: str = "image/jpeg", content_length: int | None = None, status: int = 200
    ) -> str:
        canned = CannedResponse(body, content_type, content_length, status)
        handler = type("Handler", (_CannedHandler,), {"canned": canned})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/image.jpeg?X-Tos-Signature=canned-signature"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------ scripted generation server
Answer = Callable[[BaseHTTPRequestHandler, threading.Event], None]


def json_answer(payload: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """An answer with a JSON body (``payload`` already bytes is sent as is)."""

    def answer(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("x-request-id", f"rid-{status}")
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(body)

    return answer


def sse_answer(*events: dict[str, Any] | str, complete: bool = True) -> Answer:
    """An event stream of ``events`` (a str is sent as a raw ``data:`` line), then the connection closes.

    With ``complete`` a ``[DONE]`` ends it; without, the stream just breaks off after the events.
    """

    def answer(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.send_header("x-request-id", "rid-stream")
        handler.end_headers()
        for event in events:
            if isinstance(event, str):
                handler.wfile.write(f"data: {event}\n\n".encode())
            else:
                frame = f"event: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n"
                handler.wfile.write(frame.encode())
        if complete:
            handler.wfile.write(b"data: [DONE]\n\n")
        handler.close_connection = True

    return answer


def trickle_answer(*, content_type: str = "application/json", content_length: int | None = 10_000_000) -> Answer:
    """A 200 whose body comes one byte every 50 ms (each byte well inside any read timeout), never ending."""

    def answer(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        if content_length is not None:
            handler.send_header("Content-Length", str(content_length))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        first = b":" if content_type == "text/event-stream" else b"{"
        handler.wfile.write(first)
        while not stop.wait(0.05):  # until the client gives up (the write fails) or the test ends
            handler.wfile.write(b" ")
            handler.wfile.flush()

    return answer


def flood_answer(size: int, *, content_length: bool) -> Answer:
    """A 200 JSON answer of ``size`` bytes (a JSON string of spaces), announced or close-delimited."""

    def answer(handler: BaseHTTPRequestHandler, stop: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        if content_length:
            handler.send_header("Content-Length", str(size))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        handler.wfile.write(b'"' + b" " * (size - 2) + b'"')

    return answer


@dataclass
class ScriptedServer:
    """A loopback generation endpoint answering POSTs with its script, in order (the last answer repeats)."""

    base_url: str
    answers: list[Answer]
    bodies: list[dict[str, Any]]
    #: Set once a POST arrived; the test can wait on it instead of sleeping.
    requested: threading.Event

    @property
    def request_count(self) -> int:
        return len(self.bodies)


@pytest.fixture
def scripted_server(connect: Callable[..., None]) -> Iterator[Callable[..., ScriptedServer]]:
    """``scripted_server(*answers, **extra)``: a server answering with the script; ``jimeng_default`` points at it."""
    servers: list[tuple[ThreadingHTTPServer, threading.Event]] = []

    def start(*answers: Answer, **extra: Any) -> ScriptedServer:
        stop = threading.Event()
        state = ScriptedServer("", list(answers), [], threading.Event())
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    state.bodies.append(json.loads(raw or b"{}"))
                    answer = state.answers[min(len(state.bodies), len(state.answers)) - 1]
                state.requested.set()
                try:
                    answer(self, stop)
                except OSError:  # the client gave up: what these tests are about
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append((server, stop))
        state.base_url = f"http://127.0.0.1:{server.server_address[1]}/api/v3"
        connect(state.base_url, **{"retry_backoff": 0.01, "retry_max_wait": 0.05, **extra})
        return state

    yield start
    for server, stop in servers:
        stop.set()
        server.shutdown()
        server.server_close()
