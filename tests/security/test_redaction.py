"""One redaction for log lines and exception messages: any URL query, tokens, keys, signing material, image data."""

from __future__ import annotations

import base64
import logging
import pickle
import sys

import pytest

from airflow_provider_jimeng.exceptions import (
    JiMengAuthenticationError,
    JiMengConfigurationError,
    JiMengDownloadError,
    JiMengGenerationIncompleteError,
    JiMengInvalidRequestError,
)
from airflow_provider_jimeng.redaction import (
    RedactingLogFilter,
    install_log_redaction,
    redact_text,
    redact_url,
    redact_value,
    register_secret,
)

KEY = "sk-redaction-canary-0a1b2c3d4e5f"
B64 = base64.b64encode(bytes(range(256)) * 4).decode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "GET https://cdn.example.com/a.jpeg?X-Tos-Signature=abc&X-Tos-Expires=86400 failed",
            "GET https://cdn.example.com/a.jpeg?<redacted> failed",
            id="tos-signature",
        ),
        pytest.param("see https://h.example/i.png?sig=s3cr3t", "see https://h.example/i.png?<redacted>", id="sig"),
        pytest.param("https://h.example/i.png?token=s3cr3t.", "https://h.example/i.png?<redacted>", id="token"),
        pytest.param(
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F2025&X-Amz-Signature=ff",
            "https://b.s3.amazonaws.com/k?<redacted>",
            id="amz-presigned",
        ),
        pytest.param(
            'http://127.0.0.1:9 "GET /tos/x.jpeg?X-Tos-Date=1&sig=2 HTTP/1.1" 200 5',
            'http://127.0.0.1:9 "GET /tos/x.jpeg?<redacted> HTTP/1.1" 200 5',
            id="urllib3-request-line",
        ),
        pytest.param(
            "Max retries exceeded with url: /x.jpeg?token=abc (Caused by X)",
            "Max retries exceeded with url: /x.jpeg?<redacted> (Caused by X)",
            id="requests-error-path",
        ),
        pytest.param("https://user:pw@proxy.example:3128/", "https://<redacted>@proxy.example:3128/", id="userinfo"),
        pytest.param("Authorization: Bearer abc.DEF-123", "Authorization: Bearer <redacted>", id="bearer"),
        pytest.param("key sk-abcdefghijklmnop rejected", "key sk-<redacted> rejected", id="sk-token"),
        pytest.param(
            "'Authorization': b'AWS4-HMAC-SHA256 Credential=AKID/20250101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host, Signature=bf8e7d'",
            "'Authorization': b'AWS4-HMAC-SHA256 Credential=<redacted>, SignedHeaders=host, Signature=<redacted>'",
            id="sigv4-header",
        ),
        pytest.param(
            "'X-Amz-Security-Token': b'FwoGZXIvYXdzE'", "'X-Amz-Security-Token': b'<redacted>'", id="session-token"
        ),
        pytest.param(f"bad data:image/png;base64,{B64} end", "bad data:<redacted> end", id="data-uri"),
        pytest.param(f"body {B64}", f"body <{len(B64)} base64 chars>", id="bare-base64"),
        pytest.param("is Pillow installed? pip install x", "is Pillow installed? pip install x", id="prose-untouched"),
        pytest.param("https://gw.example.com/v1", "https://gw.example.com/v1", id="plain-url-untouched"),
        # Any scheme's credentials and query, not only http(s): proxies and the shared Redis (issue 20, 17c).
        pytest.param(
            "proxy socks5h://user:pw@proxy.example:1080 refused",
            "proxy socks5h://<redacted>@proxy.example:1080 refused",
            id="socks5h-userinfo",
        ),
        pytest.param("redis://:s3cr3t@redis.example:6379/0", "redis://<redacted>@redis.example:6379/0", id="redis"),
        pytest.param(
            "rediss://default:s3cr3t@r.example:6380/0?ssl_cert_reqs=none&password=x",
            "rediss://<redacted>@r.example:6380/0?<redacted>",
            id="rediss-query",
        ),
        pytest.param("amqp://guest:guest@mq.example//", "amqp://<redacted>@mq.example//", id="amqp"),
        pytest.param(
            "postgresql+psycopg2://u:p@db.example/airflow?sslmode=require",
            "postgresql+psycopg2://<redacted>@db.example/airflow?<redacted>",
            id="sqlalchemy",
        ),
        pytest.param("redis://:pa/ss@r.example:6379/0", "redis://<redacted>@r.example:6379/0", id="unencoded-slash"),
        pytest.param(
            "socks5h://user:p#w@proxy.example:1080", "socks5h://<redacted>@proxy.example:1080", id="unencoded-hash"
        ),
        pytest.param("redis://:p?w@r.example/0", "redis://<redacted>@r.example/0", id="unencoded-question-mark"),
        pytest.param("redis://:p@ss@r.example/0", "redis://<redacted>@r.example/0", id="unencoded-at"),
        pytest.param(
            "{'https': 'socks5://u:p@h.example:1'}", "{'https': 'socks5://<redacted>@h.example:1'}", id="dict"
        ),
        pytest.param("https://h.example:8080/@user/x", "https://h.example:8080/@user/x", id="at-in-path-untouched"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected
    assert redact_text(expected) == expected  # redacting twice changes nothing


def test_registered_secrets_are_masked_anywhere() -> None:
    register_secret(KEY)
    assert redact_text(f"Incorrect API key provided: {KEY}.") == "Incorrect API key provided: ***."
    register_secret("abc")  # too short to mask safely: ignored
    assert redact_text("abc") == "abc"


def test_redact_url_survives_urls_that_do_not_parse() -> None:
    assert redact_url("https://[bad/x.jpeg?sig=1") == "<unparseable URL>"


def test_every_error_message_is_redacted_whoever_builds_it() -> None:
    register_secret(KEY)
    url = "https://ref.example.com/r.png?X-Tos-Signature=s3cr3t"
    errors = [
        JiMengInvalidRequestError(f"The image URL {url} is invalid", status_code=400, code="InvalidImageURL"),
        JiMengAuthenticationError(f"The API key {KEY} is invalid", status_code=401, code="AuthenticationError"),
        JiMengDownloadError(f"download of {url} failed"),
        JiMengConfigurationError("image", f"{url} is not reachable"),
        JiMengGenerationIncompleteError([f"prompt 0: Bearer {KEY} refused at {url}"], stored=0),
    ]
    for error in errors:
        for shown in (str(error), repr(error), str(pickle.loads(pickle.dumps(error)))):
            assert "s3cr3t" not in shown
            assert KEY not in shown
    assert "https://ref.example.com/r.png?<redacted>" in str(errors[0])
    assert errors[0].api_message == "The image URL https://ref.example.com/r.png?<redacted> is invalid"


def _record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.DEBUG, __file__, 1, msg, args, None)


def test_the_filter_replaces_bodies_by_their_size_before_formatting() -> None:
    image = b"\xff\xd8" + bytes(150_000)
    params = {"url": "http://s3.local/b/k?uploadId=7&X-Amz-Signature=ff", "body": image, "headers": {"a": "b"}}
    record = _record("botocore.endpoint", "Making request for %s with params: %s", "PutObject", params)
    RedactingLogFilter().filter(record)
    message = record.getMessage()
    assert "<150002 bytes>" in message
    assert "\\x00" not in message
    assert "X-Amz-Signature" not in message
    assert "http://s3.local/b/k?<redacted>" in message
    assert len(message) < 500

    record = _record("botocore.parsers", "Response body:\n%r", b"<Error>" + B64.encode() + b"</Error>")
    RedactingLogFilter().filter(record)
    assert record.getMessage() == f"Response body:\n<{len(B64) + 15} bytes>"


def test_the_filter_withholds_signing_material_of_botocore_auth() -> None:
    record = _record("botocore.auth", "CanonicalRequest:\n%s", "PUT\n/b/k\nX-Amz-Date=1\nhost:s3\n\nhost\nUNSIGNED")
    RedactingLogFilter().filter(record)
    assert record.getMessage() == "CanonicalRequest: <redacted>"


def test_the_filter_redacts_tracebacks() -> None:
    try:
        raise ValueError("Invalid URL 'https://h.example/x?token=s3cr3t'")
    except ValueError:
        record = logging.LogRecord("urllib3.connectionpool", logging.DEBUG, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    RedactingLogFilter().filter(record)
    formatted = logging.Formatter().format(record)
    assert "s3cr3t" not in formatted
    assert "ValueError" in formatted


def test_install_puts_one_filter_on_each_logger_that_prints_requests_or_bodies() -> None:
    install_log_redaction()
    install_log_redaction()
    for name in (
        "urllib3.connectionpool",
        "botocore.endpoint",
        "botocore.parsers",
        "botocore.auth",
        "s3transfer.tasks",
    ):
        filters = [item for item in logging.getLogger(name).filters if isinstance(item, RedactingLogFilter)]
        assert len(filters) == 1, name


def test_redact_value_rebuilds_only_what_it_changes() -> None:
    """Rendered fields: an unchanged value comes back as the very object (the operator keeps it as is)."""
    clean = {"n": 2, "tags": ["a", "b"], "size": "2K"}
    assert redact_value(clean) is clean
    signed = "https://h.example/a.png?X-Tos-Signature=s3cr3t"
    value = {"refs": [signed, "https://h.example/b.png"], "raw": b"\x89PNG", "n": 2}
    assert redact_value(value) == {
        "refs": ["https://h.example/a.png?<redacted>", "https://h.example/b.png"],
        "raw": "<4 bytes>",
        "n": 2,
    }
    assert value["refs"][0] == signed, "the original is left untouched"
    assert redact_value(("redis://:pw@r.example/0",)) == ("redis://<redacted>@r.example/0",)
