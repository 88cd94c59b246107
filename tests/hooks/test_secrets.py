"""The API key, signed URL queries and base64 image data never reach logs, exceptions or reprs."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengAuthenticationError, JiMengError
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from tests.hooks.conftest import ScriptedServer, json_answer

CANARY_KEY = "sk-SECRET-CANARY-1234"
PROMPT = "a quiet harbour at dawn"


@pytest.fixture
def canary_emulator(jimeng_emulator: JiMengEmulator, connect: Callable[..., None]) -> JiMengEmulator:
    """The emulator accepting only the canary key, and ``jimeng_default`` sending it."""
    jimeng_emulator.api_key = CANARY_KEY
    connect(jimeng_emulator.base_url, api_key=CANARY_KEY, max_retries=1)
    return jimeng_emulator


def _failure(call: Callable[[], object]) -> JiMengError:
    with pytest.raises(JiMengError) as caught:
        call()
    return caught.value


def _signature(url: str | None) -> str:
    assert url is not None
    [signature] = parse_qs(urlsplit(url).query)["X-Tos-Signature"]
    return signature


def _assert_nothing_secret(texts: list[str], secrets: list[str]) -> None:
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"secret {secret[:12]}... leaked into: {text[:300]}"


def test_generation_and_failures_leak_no_key_signature_or_base64(
    canary_emulator: JiMengEmulator,
    make_hook: Callable[..., JiMengHook],
    make_image: Callable[..., bytes],
    logs: Any,
) -> None:
    hook = make_hook()
    reference = make_image("PNG", (64, 64))
    reference_b64 = base64.b64encode(reference).decode()

    with_url = hook.generate_images(PROMPT, size="1K", image=reference)
    inline = hook.generate_images(PROMPT, size="1K", response_format="b64_json")
    streamed = hook.generate_images(
        PROMPT, size="1K", stream=True, sequential_image_generation="auto", max_images=2, image=reference
    )
    results = [with_url, inline, streamed]

    canary_emulator.inject(Fault("rate_limit", times=2))
    failures = [_failure(lambda: hook.generate_images(PROMPT, image=reference))]
    canary_emulator.inject(Fault("reset", times=2))
    failures.append(_failure(lambda: hook.generate_images(PROMPT)))
    failures.append(_failure(lambda: hook.generate_images(f"{PROMPT} FORBIDDEN", image=reference)))
    canary_emulator.api_key = "another-key-entirely"  # the canary is now sent and refused with 401
    failures.append(_failure(lambda: hook.generate_images(PROMPT, image=reference)))

    assert [type(error).__name__ for error in failures] == [
        "JiMengRateLimitError",
        "JiMengTimeoutError",
        "JiMengContentPolicyError",
        "JiMengAuthenticationError",
    ]
    signatures = [_signature(image.url) for result in (with_url, streamed) for image in result.succeeded]
    b64_data = [image.b64_json[:48] for image in inline.images if image.b64_json]
    assert len(signatures) == 3
    assert b64_data
    secrets = [CANARY_KEY, *signatures, *b64_data, reference_b64[:48]]
    texts = [
        logs.text,
        *(str(error) for error in failures),
        *(repr(error) for error in failures),
        *(repr(result) for result in results),
        repr(hook.config),
        repr(hook.stats),
    ]
    _assert_nothing_secret(texts, secrets)
    # The capture did see the traffic: these checks are not vacuous.
    assert "/api/v3/images/generations" in logs.text
    assert "image(s) ok" in logs.text
    assert any("urllib3" in message for message in logs.messages)


def test_downloads_leak_no_signature_into_hook_logs_or_errors(
    canary_emulator: JiMengEmulator, make_hook: Callable[..., JiMengHook], logs: Any
) -> None:
    hook = make_hook()
    url = hook.generate_images(PROMPT, size="1K").images[0].url
    assert url is not None
    canary_emulator.inject(Fault("unavailable", path="/tos/*"))
    with hook.open_image(url) as download:
        assert download.read()
    canary_emulator.inject(Fault("expired_url", path="/tos/*"))
    failures = [_failure(lambda: hook.open_image(url)), _failure(lambda: hook.open_image(url, max_bytes=10))]
    # urllib3's own DEBUG request lines are checked by the next test.
    own_logs = [
        *(f"{entry}" for entry in logs.hook_events),
        *(record.getMessage() for record in logs.caplog.records if not record.name.startswith("urllib3")),
    ]
    texts = [*own_logs, *(str(error) for error in failures), *(repr(error) for error in failures)]
    assert any("Download of" in line for line in own_logs)  # the retry was logged...
    _assert_nothing_secret(texts, [CANARY_KEY, _signature(url)])  # ...without the signature


def test_urllib3_debug_line_of_a_download_does_not_leak_the_signature(
    canary_emulator: JiMengEmulator, make_hook: Callable[..., JiMengHook], logs: Any
) -> None:
    hook = make_hook()
    url = hook.generate_images(PROMPT, size="1K").images[0].url
    with hook.open_image(url or "") as download:
        assert download.read()
    _assert_nothing_secret([logs.text], [_signature(url)])


# ------------------------------------------------------------------ what the service echoes back
def test_a_401_echoing_the_key_does_not_put_it_in_the_exception(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook], logs: Any
) -> None:
    echo = {
        "error": {
            "code": "AuthenticationError",
            "message": f"Incorrect API key provided: {CANARY_KEY}. Sent: Authorization: Bearer {CANARY_KEY}x",
            "type": "Unauthorized",
        }
    }
    scripted_server(json_answer(echo, status=401), api_key=CANARY_KEY)
    error = _failure(lambda: make_hook().generate_images(PROMPT))
    assert isinstance(error, JiMengAuthenticationError)
    texts = [str(error), repr(error), error.api_message, str(error.args), logs.text]
    _assert_nothing_secret(texts, [CANARY_KEY, CANARY_KEY.removeprefix("sk-")])
    assert "Incorrect API key provided: ***" in str(error)


def test_a_signed_reference_url_echoed_in_a_400_is_redacted(
    scripted_server: Callable[..., ScriptedServer], make_hook: Callable[..., JiMengHook]
) -> None:
    reference = "https://refs.example.com/in/ref.png?sig=REFSIG123&token=REFTOKEN456&X-Amz-Credential=AKIAREF"
    echo = {"error": {"code": "InvalidImageURL.Download", "message": f"cannot download {reference}", "param": "image"}}
    scripted_server(json_answer(echo, status=400))
    error = _failure(lambda: make_hook().generate_images(PROMPT, image=reference))
    _assert_nothing_secret([str(error), repr(error)], ["REFSIG123", "REFTOKEN456", "AKIAREF"])
    assert "https://refs.example.com/in/ref.png?<redacted>" in str(error)


@pytest.mark.parametrize(
    "url",
    [
        "https://:443/img.jpeg?sig=URLSECRET",  # requests: InvalidURL, quoting the whole URL
        "https://[::1/img.jpeg?sig=URLSECRET",  # urllib: ValueError, quoting the host
        "http://cdn.example.com/img.jpeg?sig=URLSECRET",  # plain http refused
    ],
)
def test_invalid_image_urls_are_refused_without_quoting_them(
    jimeng_conn: JiMengEmulator, make_hook: Callable[..., JiMengHook], logs: Any, url: str
) -> None:
    error = _failure(lambda: make_hook().open_image(url))
    _assert_nothing_secret([str(error), repr(error), logs.text], ["URLSECRET"])
