"""Download and transport safety: size cap, content type, https only, TLS verified, nothing hangs, thread safety."""

from __future__ import annotations

import ast
import base64
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import (
    JiMengConfigurationError,
    JiMengDownloadError,
    JiMengDownloadInterruptedError,
    JiMengResponseError,
    JiMengTimeoutError,
)
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.testing import jimeng_connection_json
from tests.security.conftest import SelfSignedCertificate, StubServer, elapsed, silent_server

pytestmark = pytest.mark.timeout(60)

PACKAGE = Path(__file__).resolve().parents[2] / "airflow_provider_jimeng"
TINY_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="
)


def connect(monkeypatch: pytest.MonkeyPatch, conn_id: str, host: str, **extra: Any) -> JiMengHook:
    connection = {"conn_type": "jimeng", "host": host, "password": "sk-transport-test", "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(connection))
    return JiMengHook(conn_id)


def drain(hook: JiMengHook, url: str, **kwargs: Any) -> int:
    """Download ``url`` to the end, as an S3 upload would; returns the bytes read."""
    with hook.open_image(url, **kwargs) as download:
        while download.read(8192):
            pass
        return download.bytes_read


def answer(handler: BaseHTTPRequestHandler, body: bytes, content_type: str, *, length: bool = True) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", content_type)
    if length:
        handler.send_header("Content-Length", str(len(body)))
    else:
        handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(body)


# ------------------------------------------------------------------------------------ downloads
def test_download_size_cap(jimeng_conn: JiMengEmulator) -> None:
    hook = JiMengHook()
    url = hook.generate_images("a red fox").images[0].url or ""
    with pytest.raises(JiMengDownloadError, match="above the 1000-byte download cap"):
        hook.open_image(url, max_bytes=1000)  # refused from Content-Length, before reading the body

    def unannounced(handler: BaseHTTPRequestHandler) -> None:  # no Content-Length: counted while streaming
        answer(handler, b"\xff\xd8" + b"\0" * 50_000, "image/jpeg", length=False)

    with StubServer(unannounced) as stub, pytest.raises(JiMengDownloadError, match="exceeds the 20000-byte"):
        drain(hook, f"{stub.url}/big.jpeg", max_bytes=20_000)


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json", ""])
def test_download_must_be_an_image(jimeng_conn: JiMengEmulator, content_type: str) -> None:
    def page(handler: BaseHTTPRequestHandler) -> None:
        answer(handler, b"<html>login required</html>", content_type)

    with StubServer(page) as stub, pytest.raises(JiMengDownloadError, match="not an image"):
        JiMengHook().open_image(f"{stub.url}/image.jpeg")


def test_https_only_unless_allow_http(monkeypatch: pytest.MonkeyPatch) -> None:
    strict = connect(monkeypatch, "jimeng_strict", "https://ark.example.com/api/v3")
    relaxed = connect(monkeypatch, "jimeng_relaxed", "https://ark.example.com/api/v3", allow_http=True)
    assert strict.config.allow_http is False  # the default

    strict.check_download_url("https://cdn.example.com/i.jpeg?X-Tos-Signature=abc")
    with pytest.raises(JiMengDownloadError, match="only https URLs are fetched") as refused:
        strict.check_download_url("http://cdn.example.com/i.jpeg?X-Tos-Signature=abc")
    assert "X-Tos-Signature" not in str(refused.value)
    relaxed.check_download_url("http://cdn.example.com/i.jpeg")
    for url in ("file:///etc/passwd", "ftp://cdn.example.com/i.jpeg", "gopher://x/", "data:image/png;base64,AAAA"):
        for hook in (strict, relaxed):
            with pytest.raises(JiMengDownloadError):
                hook.check_download_url(url)
    with pytest.raises(JiMengConfigurationError, match="allow_http=true"):
        connect(monkeypatch, "jimeng_plain", "http://ark.example.com/api/v3").config  # noqa: B018


# ------------------------------------------------------------------------------------------ TLS
def _generation(handler: BaseHTTPRequestHandler) -> None:
    if handler.command == "GET":
        answer(handler, TINY_PNG, "image/png")
        return
    body = {
        "model": "doubao-seedream-4-0-250828",
        "created": 1,
        "data": [{"b64_json": base64.b64encode(TINY_PNG).decode(), "size": "1x1"}],
        "usage": {"generated_images": 1},
    }
    answer(handler, json.dumps(body).encode(), "application/json")


def test_tls_is_verified_by_default(monkeypatch: pytest.MonkeyPatch, self_signed: SelfSignedCertificate) -> None:
    with StubServer(_generation, tls=self_signed.server_context()) as stub:
        hook = connect(monkeypatch, "jimeng_tls", f"{stub.url}/api/v3", max_retries=3)
        assert hook.config.verify is True
        assert hook.get_conn().verify is True

        took, error = elapsed(lambda: hook.generate_images("a red fox"))
        assert isinstance(error, JiMengConfigurationError)
        assert error.parameter == "verify"
        assert "does not verify" in str(error)
        assert took < 5  # a certificate that does not verify is not retried
        took, error = elapsed(lambda: hook.open_image(f"{stub.url}/image.png"))
        assert isinstance(error, JiMengDownloadInterruptedError)
        assert "does not verify" in str(error)
        assert took < 5
        assert stub.requests == []  # no HTTP request ever left the client

        trusting = connect(monkeypatch, "jimeng_ca", f"{stub.url}/api/v3", verify=str(self_signed.cert_path))
        assert trusting.generate_images("a red fox").images[0].b64_json
        with trusting.open_image(f"{stub.url}/image.png") as download:
            assert download.read() == TINY_PNG
        assert len(stub.requests) == 2


# ------------------------------------------------------------------------------------- timeouts
HTTP_METHODS = {"get", "post", "put", "patch", "delete", "head", "request"}


def _http_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls of requests' HTTP methods: ``requests.<m>(...)``, ``<session or get_conn()>.<m>(...)``."""
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in HTTP_METHODS:
            receiver = ast.unparse(node.func.value)
            if receiver == "requests" or "get_conn()" in receiver or "session" in receiver.lower():
                calls.append(node)
    return calls


def test_every_http_call_has_a_timeout() -> None:
    calls = {
        f"{path.relative_to(PACKAGE.parent)}:{call.lineno}": call
        for path in sorted(PACKAGE.rglob("*.py"))
        if "emulator" not in path.parts
        for call in _http_calls(ast.parse(path.read_text(encoding="utf-8")))
    }
    assert len(calls) >= 2, calls  # every POST (hooks/sending.py), the image download (hooks/downloads.py)
    missing = [where for where, call in calls.items() if not any(k.arg == "timeout" for k in call.keywords)]
    assert not missing, f"HTTP calls without a timeout: {missing}"


def test_a_server_that_never_answers_cannot_hang_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    with silent_server() as url:
        hook = connect(monkeypatch, "jimeng_silent", f"{url}/api/v3", allow_http=True, timeout=1, max_retries=1)
        monkeypatch.setattr(hook, "_retry_backoff", 0.01)

        took, error = elapsed(lambda: hook.generate_images("a red fox"))
        assert isinstance(error, JiMengTimeoutError)
        assert error.code == "Timeout"
        assert "may still be billed" in str(error)
        assert took < 2 * 1 + 2  # two attempts of 1 s each, plus slack

        took, error = elapsed(lambda: hook.open_image(f"{url}/image.jpeg"))
        assert isinstance(error, JiMengDownloadInterruptedError)
        assert took < 4

        started = time.monotonic()
        ok, message = hook.test_connection()
        assert time.monotonic() - started < 3
        assert ok is False
        assert "Cannot reach" in message


def test_a_trickling_download_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    def trickle(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/jpeg")
        handler.send_header("Content-Length", str(10_000_000))
        handler.end_headers()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # each byte well inside the read timeout, never finishing
            handler.wfile.write(b"\xff")
            handler.wfile.flush()
            time.sleep(0.1)

    with StubServer(trickle) as stub:
        hook = connect(monkeypatch, "jimeng_trickle", "https://ark.example.com/api/v3", allow_http=True, timeout=1)

        took, error = elapsed(lambda: drain(hook, f"{stub.url}/slow.jpeg"))
        assert isinstance(error, JiMengDownloadInterruptedError)
        assert "took too long" in str(error)
        assert took < 4


def _trickle(content_type: str, stop: threading.Event) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(10_000_000))
        handler.end_headers()
        handler.wfile.write(b"{" if content_type == "application/json" else b": ")
        while not stop.wait(0.1):  # a byte every 0.1 s: well inside the read timeout, never finishing
            handler.wfile.write(b" ")
            handler.wfile.flush()

    return respond


@pytest.mark.parametrize("content_type", ["application/json", "text/event-stream"])
def test_a_trickling_generation_answer_is_cut_off(monkeypatch: pytest.MonkeyPatch, content_type: str) -> None:
    stop = threading.Event()
    with StubServer(_trickle(content_type, stop)) as stub:
        # No response_deadline: the default, three read timeouts, bounds the answer.
        streamed = content_type != "application/json"
        hook = connect(
            monkeypatch,
            "jimeng_trickle",
            f"{stub.url}/api/v3",
            allow_http=True,
            timeout=1,
            max_billed_retries=0 if streamed else None,  # None: the default, one retry
        )
        monkeypatch.setattr(hook, "_retry_backoff", 0.01)
        try:
            took, error = elapsed(lambda: hook.generate_images("a red fox", stream=streamed))
        finally:
            stop.set()
    assert isinstance(error, JiMengTimeoutError), error
    assert error.code == "ResponseDeadlineExceeded"
    assert error.possibly_billed
    assert "response_deadline" in str(error)
    attempts = 1 if streamed else 2  # retried once by default (max_billed_retries=1), not max_retries times
    assert len(stub.requests) == attempts
    assert took < attempts * 3 + 3  # a 3 s deadline an attempt, plus slack
    assert hook.stats["possibly_billed"] == attempts


def test_a_huge_generation_answer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def announced(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(600 * 1024 * 1024))
        handler.end_headers()

    def unannounced(handler: BaseHTTPRequestHandler) -> None:
        answer(handler, b'"' + b" " * 300_000 + b'"', "application/json", length=False)

    for respond, fragment in ((announced, "is 629145600 bytes, above"), (unannounced, "is larger, above")):
        with StubServer(respond) as stub:
            hook = connect(
                monkeypatch,
                "jimeng_huge",
                f"{stub.url}/api/v3",
                allow_http=True,
                max_billed_retries=0,
                max_response_bytes=200_000 if respond is unannounced else None,
            )
            took, error = elapsed(lambda hook=hook: hook.generate_images("a red fox"))
        assert isinstance(error, JiMengResponseError), error
        assert error.code == "ResponseTooLarge"
        assert fragment in str(error)
        assert error.possibly_billed
        assert len(stub.requests) == 1
        assert took < 5


# ---------------------------------------------------------------------------------- concurrency
def test_one_hook_is_safe_under_concurrent_use(
    jimeng_emulator: JiMengEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    jimeng_emulator.latency = 0.05
    jimeng_emulator.inject(Fault("rate_limit", retry_after=0.05, times=4), Fault("server_error", times=2))
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(jimeng_emulator.base_url, retry_backoff=0.01)
    )
    hook = JiMengHook(pool_maxsize=16)
    sessions: set[int] = set()
    lock = threading.Lock()

    def generate_and_fetch(index: int) -> tuple[str, int]:
        with lock:
            sessions.add(id(hook.get_conn()))
        result = hook.generate_images(f"prompt number {index}")
        with hook.open_image(result.images[0].url or "") as download:
            while download.read(65536):
                pass
            return download.sha256, download.bytes_read

    with ThreadPoolExecutor(12) as pool:
        downloads = list(pool.map(generate_and_fetch, range(24)))

    assert len(sessions) == 1  # one pooled session, created once despite the race
    assert len({sha for sha, _ in downloads}) == 24  # every thread got its own image, whole
    assert all(size > 0 for _, size in downloads)
    assert jimeng_emulator.billed_images == 24
    assert hook.stats["attempts"] == jimeng_emulator.request_count == 24 + 6
    assert hook.stats["retries"] == 6
    assert hook.stats["rate_limited"] == 4
