"""Fixtures of the security suite: a recognisable API key, a leak scanner, and misbehaving servers.

Airflow's secrets masker would hide a leaked key in task logs as ``***``; the hygiene tests switch
masking off (``unmasked`` records what would have been masked instead) so a leak in the provider's
own code shows up raw, and then separately check that the hook did ask for the key to be masked.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.testing import jimeng_connection_json
from tests.visual_fixtures import no_resume_hold_off  # noqa: F401  (autouse: no worker supervisor here)

#: The API key every hygiene test uses: it must never appear anywhere but the connection itself.
CANARY = "sk-CANARY-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e"
#: Query parameters that make a signed URL usable; a redacted URL keeps none of them.
SIGNED_URL_MARKERS = ("X-Tos-Signature", "X-Tos-Credential")
#: Base64 image data: any long run of the base64 alphabet (hex ids and hashes are far shorter).
BASE64_RUN = re.compile(r"[A-Za-z0-9+/]{160,}={0,2}")


def find_leaks(text: str, *, allow_signed_urls: bool = False) -> list[str]:
    """What in ``text`` should never be there: the key, a signed URL's credentials, base64 image data."""
    leaks = []
    if CANARY in text or CANARY.removeprefix("sk-") in text:
        leaks.append("the API key")
    if not allow_signed_urls:
        leaks += [f"a signed URL ({marker})" for marker in SIGNED_URL_MARKERS if marker in text]
    leaks += [f"base64 data ({match.group()[:24]}...)" for match in BASE64_RUN.finditer(text)]
    return leaks


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=repr, ensure_ascii=False)


@pytest.fixture
def unmasked(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Switch Airflow's secrets masker off for the test; returns what was handed to it to mask."""
    handed: list[Any] = []

    def record(self: Any, secret: Any, name: str | None = None) -> None:
        handed.append(secret)

    for module in (
        "airflow.sdk._shared.secrets_masker.secrets_masker",
        "airflow._shared.secrets_masker.secrets_masker",
        "airflow.sdk.execution_time.secrets_masker",  # Airflow 3.0 (later releases re-export the class above)
    ):
        with contextlib.suppress(ImportError, AttributeError):
            masker_class = __import__(module, fromlist=["SecretsMasker"]).SecretsMasker
            monkeypatch.setattr(masker_class, "add_mask", record)
    return handed


@pytest.fixture
def canary_emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[JiMengEmulator]:
    """An emulator that only accepts the canary key; ``jimeng_default`` uses it (quick retries), and
    ``jimeng_visual`` (the Visual API) the canary as its secret access key."""
    from tests.visual_fixtures import ACCESS_KEY_ID, visual_connection_json

    with JiMengEmulator(api_key=CANARY, access_key_id=ACCESS_KEY_ID, secret_access_key=CANARY) as emulator:
        monkeypatch.setenv(
            "AIRFLOW_CONN_JIMENG_DEFAULT",
            jimeng_connection_json(emulator.base_url, api_key=CANARY, max_retries=1, retry_backoff=0.01, timeout=2),
        )
        monkeypatch.setenv("AIRFLOW_CONN_JIMENG_VISUAL", visual_connection_json(emulator.root_url, secret=CANARY))
        yield emulator


# ---------------------------------------------------------------------------------- stub servers
@dataclass
class StubServer:
    """A loopback HTTP(S) server whose every answer comes from ``respond(handler)``."""

    respond: Callable[[BaseHTTPRequestHandler], None]
    tls: ssl.SSLContext | None = None
    requests: list[str] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StubServer:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                stub.requests.append(f"{self.command} {self.path}")
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with contextlib.suppress(OSError):
                    stub.respond(self)

            do_POST = do_GET

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """Accepts connections and reads requests, but never answers: ``http://127.0.0.1:<port>``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                connection, _ = listener.accept()
                held.append(connection)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=2)
        for connection in held:
            connection.close()
        listener.close()


@dataclass(frozen=True)
class SelfSignedCertificate:
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> SelfSignedCertificate:
    """A certificate for 127.0.0.1 that no system CA bundle trusts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jimeng-test-ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return SelfSignedCertificate(cert_path, key_path)


def elapsed(action: Callable[[], Any]) -> tuple[float, BaseException | None]:
    """Run ``action``; return how long it took and what it raised (``None`` if nothing)."""
    started = time.monotonic()
    try:
        action()
    except BaseException as error:
        return time.monotonic() - started, error
    return time.monotonic() - started, None
