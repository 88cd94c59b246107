"""``test_connection()`` (the UI's Test button) checks reach, base URL and key without paying for an image."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable

import pytest

from airflow_provider_jimeng.emulator import DEFAULT_API_KEY, JiMengEmulator
from airflow_provider_jimeng.hooks.jimeng import JiMengHook

WRONG_KEY = "sk-not-the-right-key-31337"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _test(hook: JiMengHook, *secrets: str) -> tuple[bool, str]:
    ok, message = hook.test_connection()
    for secret in secrets:
        assert secret not in message
    return ok, message


@pytest.mark.parametrize("gateway_style", [False, True], ids=["official-path", "openai-compatible-path"])
def test_right_key_passes_without_billing(
    jimeng_conn: JiMengEmulator,
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    gateway_style: bool,
) -> None:
    connect(jimeng_conn.openai_base_url if gateway_style else jimeng_conn.base_url)
    ok, message = _test(make_hook(), DEFAULT_API_KEY)
    assert ok, message
    assert message.startswith("Connection OK")
    assert "accepted the API key" in message
    assert jimeng_conn.billed_images == 0
    assert jimeng_conn.request_count == 1


def test_wrong_key_fails_explaining_keys_are_regional(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    connect(jimeng_conn.base_url, api_key=WRONG_KEY)
    ok, message = _test(make_hook(), WRONG_KEY, DEFAULT_API_KEY)
    assert not ok
    assert "The API key was rejected" in message
    assert "HTTP 401 AuthenticationError" in message
    assert "Keys are regional" in message
    assert "ark.cn-beijing.volces.com" in message
    assert "ark.ap-southeast.bytepluses.com" in message


def test_unreachable_host_fails_with_cannot_reach(
    connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    port = _closed_port()
    connect(f"http://127.0.0.1:{port}/api/v3", api_key=WRONG_KEY, connect_timeout=1)
    ok, message = _test(make_hook(), WRONG_KEY)
    assert not ok
    assert message.startswith(f"Cannot reach 127.0.0.1:{port}")
    assert "ConnectionError" in message


def test_wrong_base_url_fails_naming_the_base_url(
    jimeng_conn: JiMengEmulator, connect: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    base_url = jimeng_conn.root_url + "/nope"
    connect(base_url)
    ok, message = _test(make_hook(), DEFAULT_API_KEY)
    assert not ok
    assert f"{base_url}/images/generations does not exist" in message
    assert "the base URL should be everything before /images/generations" in message
    assert jimeng_conn.billed_images == 0


@pytest.mark.parametrize("password", [None, ""], ids=["none", "empty"])
def test_missing_key_fails_naming_password(
    set_connection: Callable[..., None], make_hook: Callable[..., JiMengHook], password: str | None
) -> None:
    set_connection({"host": "https://gw.example.com/v1", "password": password})
    ok, message = make_hook().test_connection()
    assert not ok
    assert message.startswith("password:")
    assert "no API key" in message


def test_invalid_host_fails_naming_host(
    set_connection: Callable[..., None], make_hook: Callable[..., JiMengHook]
) -> None:
    set_connection({"host": "gw.example.com/v1", "password": WRONG_KEY})
    ok, message = _test(make_hook(), WRONG_KEY)
    assert not ok
    assert message.startswith("host:")


@pytest.mark.parametrize(
    ("error", "model_blamed"),
    [
        pytest.param({"param": "model", "message": "The model or endpoint x does not exist."}, True, id="param-model"),
        pytest.param({"message": "The model or endpoint {model} does not exist."}, True, id="message-names-model"),
        pytest.param({"message": "The requested endpoint /x/images/generations does not exist."}, False, id="path"),
    ],
)
def test_404_blames_the_model_only_when_the_error_names_it(
    canned_server: Callable[..., str],
    connect: Callable[..., None],
    make_hook: Callable[..., JiMengHook],
    error: dict[str, str],
    model_blamed: bool,
) -> None:
    model = "doubao-seedream-4-0-250828"
    envelope = {"error": {"code": "InvalidEndpointOrModel.NotFound", **error}}
    envelope["error"]["message"] = envelope["error"]["message"].format(model=model)
    url = canned_server(json.dumps(envelope).encode(), content_type="application/json", status=404)
    connect(url.split("/image.jpeg")[0] + "/api/v3", model=model)
    ok, message = _test(make_hook(), DEFAULT_API_KEY)
    assert not ok
    if model_blamed:
        assert f"accepted the key but model {model!r} is not available" in message
    else:
        assert "does not exist on that host" in message
        assert "the base URL should be everything before /images/generations" in message
