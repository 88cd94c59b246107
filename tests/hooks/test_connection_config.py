"""The ``jimeng`` connection, in JSON and URI form, resolves to one checked configuration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import redact  # redact moved between Airflow 3.0, 3.1 and 3.2

from airflow_provider_jimeng.api.capabilities import DEFAULT_BYTEPLUS_MODEL, DEFAULT_MODEL
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.hooks.connection_config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_BILLED_RETRIES,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    JiMengConnectionConfig,
)
from airflow_provider_jimeng.hooks.connection_form import BYTEPLUS_BASE_URL, CHINA_BASE_URL
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_2_PLUS

KEY = "sk-config-test-key-0042"
GATEWAY = "https://gw.example.com/v1"


def _config(
    set_connection: Callable[..., None], value: str | dict[str, Any], **hook_kwargs: Any
) -> JiMengConnectionConfig:
    if isinstance(value, dict):
        value = {"password": KEY, **value}
    set_connection(value)
    return JiMengHook(**hook_kwargs).config


def _refused(set_connection: Callable[..., None], value: str | dict[str, Any]) -> JiMengConfigurationError:
    with pytest.raises(JiMengConfigurationError) as caught:
        _config(set_connection, value)
    return caught.value


def test_json_connection_to_china_gets_documented_defaults(set_connection: Callable[..., None]) -> None:
    config = _config(set_connection, {"host": CHINA_BASE_URL})
    assert (config.base_url, config.api_key, config.model) == (CHINA_BASE_URL, KEY, DEFAULT_MODEL)
    assert (config.timeout, config.connect_timeout, config.max_retries) == (
        DEFAULT_TIMEOUT,
        DEFAULT_CONNECT_TIMEOUT,
        DEFAULT_MAX_RETRIES,
    )
    assert (config.watermark, config.max_images_per_minute, config.proxies) == (True, None, None)
    assert (config.verify, config.allow_http) == (True, False)
    assert config.generations_url == "https://ark.cn-beijing.volces.com/api/v3/images/generations"


@pytest.mark.parametrize(
    ("host", "base_url", "model"),
    [
        pytest.param(BYTEPLUS_BASE_URL, BYTEPLUS_BASE_URL, DEFAULT_BYTEPLUS_MODEL, id="byteplus"),
        pytest.param("ark.ap-southeast.bytepluses.com", BYTEPLUS_BASE_URL, DEFAULT_BYTEPLUS_MODEL, id="byteplus-bare"),
        pytest.param("ark.cn-beijing.volces.com", CHINA_BASE_URL, DEFAULT_MODEL, id="china-bare-host"),
        pytest.param(GATEWAY, GATEWAY, DEFAULT_MODEL, id="openai-gateway"),
        pytest.param(GATEWAY + "/", GATEWAY, DEFAULT_MODEL, id="trailing-slash"),
        pytest.param(f"{CHINA_BASE_URL}/images/generations", CHINA_BASE_URL, DEFAULT_MODEL, id="pasted-full-url"),
        pytest.param(f"{GATEWAY}/images/generations/", GATEWAY, DEFAULT_MODEL, id="pasted-gateway-url"),
        pytest.param("", CHINA_BASE_URL, DEFAULT_MODEL, id="empty-host"),
        pytest.param("   ", CHINA_BASE_URL, DEFAULT_MODEL, id="blank-host"),
        pytest.param(None, CHINA_BASE_URL, DEFAULT_MODEL, id="no-host"),
    ],
)
def test_host_resolves_to_base_url_and_regional_default_model(
    set_connection: Callable[..., None], host: str | None, base_url: str, model: str
) -> None:
    config = _config(set_connection, {"host": host})
    assert config.base_url == base_url
    assert config.model == model


@pytest.mark.parametrize(
    ("uri", "base_url"),
    [
        pytest.param(
            f"jimeng://:{KEY}@ark.cn-beijing.volces.com/api%2Fv3?model=doubao-seedream-4-5-251128&timeout=30",
            CHINA_BASE_URL,
            id="china-with-encoded-path",
        ),
        pytest.param(f"jimeng://:{KEY}@ark.cn-beijing.volces.com/api/v3", CHINA_BASE_URL, id="china-plain-path"),
        pytest.param(f"jimeng://:{KEY}@ark.cn-beijing.volces.com", CHINA_BASE_URL, id="official-host-no-path"),
        pytest.param(f"jimeng://:{KEY}@ark.ap-southeast.bytepluses.com", BYTEPLUS_BASE_URL, id="byteplus-no-path"),
        pytest.param(f"jimeng://:{KEY}@gw.example.com/v1", GATEWAY, id="gateway"),
        pytest.param(f"jimeng://:{KEY}@gw.example.com:8443/v1", "https://gw.example.com:8443/v1", id="gateway-port"),
        pytest.param(f"jimeng://:{KEY}@https%3A%2F%2Fgw.example.com%2Fv1", GATEWAY, id="url-encoded-full-url"),
    ],
)
def test_uri_form_connection_resolves_host_schema_and_port(
    set_connection: Callable[..., None], uri: str, base_url: str
) -> None:
    config = _config(set_connection, uri)
    assert config.base_url == base_url
    assert config.api_key == KEY


def test_uri_form_extras_arrive_as_strings_and_are_parsed(set_connection: Callable[..., None]) -> None:
    uri = (
        f"jimeng://:{KEY}@ark.cn-beijing.volces.com/api%2Fv3?model=doubao-seedream-4-5-251128&timeout=30"
        "&connect_timeout=2.5&max_retries=0&watermark=false&max_images_per_minute=120&verify=false"
    )
    config = _config(set_connection, uri)
    assert config.model == "doubao-seedream-4-5-251128"
    assert (config.timeout, config.connect_timeout, config.max_retries) == (30.0, 2.5, 0)
    assert config.watermark is False
    assert config.max_images_per_minute == 120.0
    assert config.verify is False


def test_json_extras_are_parsed(set_connection: Callable[..., None]) -> None:
    extra = {
        "model": " ep-20250101-abc ",
        "timeout": 600,
        "connect_timeout": 3,
        "max_retries": 2,
        "watermark": False,
        "proxies": {"https": "http://proxy.internal:3128"},
        "verify": "/etc/ssl/corp-ca.pem",
        "max_images_per_minute": 250,
        "retry_backoff": "0.5",
        "retry_max_wait": 30,
    }
    config = _config(set_connection, {"host": GATEWAY, "extra": extra})
    assert config.model == "ep-20250101-abc"
    assert (config.timeout, config.connect_timeout, config.max_retries) == (600.0, 3.0, 2)
    assert config.watermark is False
    assert config.proxies == {"https": "http://proxy.internal:3128"}
    assert config.verify == "/etc/ssl/corp-ca.pem"
    assert config.max_images_per_minute == 250.0
    assert (config.retry_backoff, config.retry_max_wait) == (0.5, 30.0)


def test_proxies_may_be_given_as_a_json_string(set_connection: Callable[..., None]) -> None:
    config = _config(set_connection, {"host": GATEWAY, "extra": {"proxies": '{"https": "http://p:1"}'}})
    assert config.proxies == {"https": "http://p:1"}


def test_hook_arguments_override_connection_extras(set_connection: Callable[..., None]) -> None:
    extra = {"timeout": 600, "max_retries": 4, "max_images_per_minute": 100}
    config = _config(
        set_connection, {"host": GATEWAY, "extra": extra}, timeout=20, max_retries=0, max_images_per_minute=30
    )
    assert (config.timeout, config.max_retries, config.max_images_per_minute) == (20.0, 0, 30.0)


@pytest.mark.parametrize("password", [None, "", "   "], ids=["none", "empty", "blank"])
def test_missing_api_key_is_refused_naming_password(set_connection: Callable[..., None], password: str | None) -> None:
    error = _refused(set_connection, {"host": CHINA_BASE_URL, "password": password})
    assert error.parameter == "password"
    assert "'jimeng_default' has no API key" in str(error)


@pytest.mark.parametrize(
    ("host", "fragments"),
    [
        pytest.param("gw.example.com/v1", ("has no scheme", "https://gw.example.com/v1"), id="path-without-scheme"),
        pytest.param("ftp://gw.example.com/v1", ("must be an http(s) URL",), id="ftp"),
        pytest.param("https://", ("must be an http(s) URL",), id="no-netloc"),
        pytest.param(f"{GATEWAY}?key=1", ("query",), id="query"),
        pytest.param("https://user:pw@gw.example.com/v1", ("credentials", "password"), id="credentials-in-url"),
        pytest.param("http://gw.example.com/v1", ("plain http", "allow_http=true"), id="http-without-allow-http"),
    ],
)
def test_bad_host_is_refused_naming_host(
    set_connection: Callable[..., None], host: str, fragments: tuple[str, ...]
) -> None:
    error = _refused(set_connection, {"host": host})
    assert error.parameter == "host"
    for fragment in fragments:
        assert fragment in str(error)


def test_plain_http_is_allowed_with_allow_http(set_connection: Callable[..., None]) -> None:
    config = _config(set_connection, {"host": "http://127.0.0.1:9/api/v3", "extra": {"allow_http": "true"}})
    assert config.base_url == "http://127.0.0.1:9/api/v3"
    assert config.allow_http is True


@pytest.mark.parametrize(
    ("extra", "parameter", "fragment"),
    [
        pytest.param({"timeout": "soon"}, "timeout", "'soon' is not a number", id="timeout-word"),
        pytest.param({"timeout": 0.5}, "timeout", "below the minimum of 1", id="timeout-too-small"),
        pytest.param({"connect_timeout": "x"}, "connect_timeout", "'x' is not a number", id="connect-timeout-word"),
        pytest.param({"connect_timeout": 0}, "connect_timeout", "below the minimum of 0.1", id="connect-timeout-0"),
        pytest.param({"max_retries": -1}, "max_retries", "below the minimum of 0", id="max-retries-negative"),
        pytest.param({"max_retries": "many"}, "max_retries", "'many' is not a number", id="max-retries-word"),
        pytest.param({"watermark": "maybe"}, "watermark", "'maybe' is not a boolean", id="watermark-word"),
        pytest.param({"allow_http": "perhaps"}, "allow_http", "'perhaps' is not a boolean", id="allow-http-word"),
        pytest.param({"proxies": "not json"}, "proxies", "JSON object", id="proxies-not-json"),
        pytest.param({"proxies": ["http://p:1"]}, "proxies", "JSON object", id="proxies-list"),
        pytest.param({"proxies": '["http://p:1"]'}, "proxies", "JSON object", id="proxies-json-list"),
        pytest.param({"retry_backoff": "later"}, "retry_backoff", "'later' is not a number", id="backoff-word"),
        pytest.param({"retry_max_wait": -1}, "retry_max_wait", "below the minimum of 0", id="max-wait-negative"),
        pytest.param({"max_images_per_minute": 0}, "max_images_per_minute", "below the minimum of 1", id="pacing-zero"),
        pytest.param(
            {"max_images_per_minute": "fast"}, "max_images_per_minute", "'fast' is not a number", id="pacing-word"
        ),
    ],
)
def test_bad_extra_is_refused_naming_the_extra(
    set_connection: Callable[..., None], extra: dict[str, Any], parameter: str, fragment: str
) -> None:
    error = _refused(set_connection, {"host": GATEWAY, "extra": extra})
    assert error.parameter == parameter
    assert fragment in str(error)


NUMBER_EXTRAS = {
    # extra: (what it allows, whether it must be whole)
    "timeout": ("a number >= 1", False),
    "connect_timeout": ("a number >= 0.1", False),
    "max_retries": ("a whole number >= 0", True),
    "max_billed_retries": ("a whole number >= 0", True),
    "retry_backoff": ("a number >= 0", False),
    "retry_max_wait": ("a number >= 0", False),
    "max_images_per_minute": ("a number >= 1", False),
    "response_deadline": ("a number >= 1", False),
    "max_response_bytes": ("a whole number >= 1024", True),
}
ODD_NUMBERS = [
    pytest.param("nan", "is not a finite number", id="nan-string"),
    pytest.param("inf", "is not a finite number", id="inf-string"),
    pytest.param("-Infinity", "is not a finite number", id="minus-infinity"),
    pytest.param(float("nan"), "is not a finite number", id="nan-json"),
    pytest.param(float("inf"), "is not a finite number", id="inf-json"),
    pytest.param(True, "is not a number", id="bool"),
    pytest.param(False, "is not a number", id="false"),
    pytest.param([30], "is not a number", id="list"),
    pytest.param({"s": 30}, "is not a number", id="object"),
    pytest.param("thirty", "is not a number", id="word"),
    pytest.param("1e999", "is not a finite number", id="overflow"),
    pytest.param(-5, "is below the minimum", id="negative"),
]


@pytest.mark.parametrize("extra", sorted(NUMBER_EXTRAS))
@pytest.mark.parametrize(("value", "fragment"), ODD_NUMBERS)
def test_odd_numbers_are_refused_naming_the_extra_and_what_it_allows(
    set_connection: Callable[..., None], extra: str, value: Any, fragment: str
) -> None:
    error = _refused(set_connection, {"host": GATEWAY, "extra": {extra: value}})
    assert type(error) is JiMengConfigurationError
    assert error.parameter == extra
    assert fragment in str(error)
    if fragment != "is below the minimum":
        assert NUMBER_EXTRAS[extra][0] in str(error)


@pytest.mark.parametrize("extra", sorted(name for name, (_, whole) in NUMBER_EXTRAS.items() if whole))
@pytest.mark.parametrize("value", ["2.5", 2.5, "1e-3"])
def test_counts_must_be_whole_numbers(set_connection: Callable[..., None], extra: str, value: Any) -> None:
    error = _refused(set_connection, {"host": GATEWAY, "extra": {extra: value}})
    assert error.parameter == extra
    assert "is not a whole number" in str(error)


def test_hook_arguments_are_checked_like_extras(set_connection: Callable[..., None]) -> None:
    set_connection({"host": GATEWAY, "password": KEY})
    for kwargs, parameter in [
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": 0}, "timeout"),
        ({"max_retries": float("inf")}, "max_retries"),
        ({"retry_backoff": -1}, "retry_backoff"),
        ({"max_images_per_minute": float("inf")}, "max_images_per_minute"),
    ]:
        with pytest.raises(JiMengConfigurationError) as caught:
            JiMengHook(**kwargs).config  # noqa: B018
        assert caught.value.parameter == parameter


@pytest.mark.parametrize(
    ("extra", "value"),
    [
        pytest.param("watermark", "maybe", id="watermark-word"),
        pytest.param("watermark", 2, id="watermark-2"),
        pytest.param("watermark", [True], id="watermark-list"),
        pytest.param("allow_http", "perhaps", id="allow-http-word"),
        pytest.param("allow_http", 2, id="allow-http-2"),
        pytest.param("allow_http", 1.5, id="allow-http-float"),
        pytest.param("allow_http", {"yes": True}, id="allow-http-object"),
    ],
)
def test_odd_booleans_are_refused(set_connection: Callable[..., None], extra: str, value: Any) -> None:
    error = _refused(set_connection, {"host": GATEWAY, "extra": {extra: value}})
    assert error.parameter == extra
    assert "is not a boolean; allowed: true or false" in str(error)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(5, id="number"),
        pytest.param(True, id="bool"),
        pytest.param('"http://p:1"', id="json-string"),
        pytest.param({"https": 3128}, id="value-not-a-string"),
        pytest.param({"https": {"url": "http://p:1"}}, id="nested"),
    ],
)
def test_proxies_that_are_not_an_object_of_urls_are_refused(set_connection: Callable[..., None], value: Any) -> None:
    error = _refused(set_connection, {"host": GATEWAY, "extra": {"proxies": value}})
    assert error.parameter == "proxies"
    assert "JSON object" in str(error)


@pytest.mark.parametrize("value", [5, 0.5, ["/etc/ca.pem"], {"path": "/etc/ca.pem"}], ids=repr)
def test_verify_of_an_odd_type_is_refused(set_connection: Callable[..., None], value: Any) -> None:
    error = _refused(set_connection, {"host": GATEWAY, "extra": {"verify": value}})
    assert error.parameter == "verify"
    assert "allowed: true, false, or the path of a CA bundle" in str(error)


def test_a_ca_bundle_that_is_not_there_is_refused_naming_verify_before_anything_is_sent(
    set_connection: Callable[..., None], tmp_path: Any
) -> None:
    missing = tmp_path / "missing-ca.pem"
    set_connection({"host": "https://127.0.0.1:9/api/v3", "password": KEY, "extra": {"verify": str(missing)}})
    hook = JiMengHook()
    try:
        with pytest.raises(JiMengConfigurationError) as caught:
            hook.generate_images("a red fox")
    finally:
        hook.close()
    assert caught.value.parameter == "verify"
    assert hook.stats["possibly_billed"] == 0


def test_an_extra_that_is_not_an_object_is_refused(set_connection: Callable[..., None]) -> None:
    error = _refused(set_connection, {"host": GATEWAY, "extra": "[1, 2]"})
    # Airflow 3.0 and 3.1 do not load such a connection at all: the error then names the connection id
    # as undefined (docs/compatibility.md). Either way nothing is sent.
    assert error.parameter == ("extra" if AIRFLOW_V_3_2_PLUS else "jimeng_conn_id")


@pytest.mark.parametrize("unset", ["", "None", "null", " none ", None], ids=repr)
def test_templated_nothing_means_the_default(set_connection: Callable[..., None], unset: str | None) -> None:
    names = [*NUMBER_EXTRAS, "watermark", "allow_http", "proxies", "verify", "model"]
    config = _config(set_connection, {"host": GATEWAY, "extra": dict.fromkeys(names, unset)})
    assert (config.timeout, config.connect_timeout, config.max_retries) == (
        DEFAULT_TIMEOUT,
        DEFAULT_CONNECT_TIMEOUT,
        DEFAULT_MAX_RETRIES,
    )
    assert (config.max_billed_retries, config.response_deadline, config.max_response_bytes) == (
        DEFAULT_MAX_BILLED_RETRIES,
        3 * DEFAULT_TIMEOUT,
        DEFAULT_MAX_RESPONSE_BYTES,
    )
    assert (config.watermark, config.allow_http, config.proxies, config.verify) == (True, False, None, True)
    assert config.max_images_per_minute is None
    assert config.model == DEFAULT_MODEL


def test_numbers_with_whitespace_and_new_extras_are_parsed(set_connection: Callable[..., None]) -> None:
    extra = {
        "timeout": " 30 ",
        "max_retries": " 2 ",
        "max_billed_retries": "0",
        "response_deadline": "45.5",
        "max_response_bytes": 1048576,
        "watermark": " False ",
        "verify": " /etc/ssl/corp-ca.pem ",
    }
    config = _config(set_connection, {"host": GATEWAY, "extra": extra})
    assert (config.timeout, config.max_retries, config.max_billed_retries) == (30.0, 2, 0)
    assert (config.response_deadline, config.max_response_bytes) == (45.5, 1048576)
    assert config.watermark is False
    assert config.verify == "/etc/ssl/corp-ca.pem"
    # Without response_deadline, an answer may take three read timeouts.
    assert _config(set_connection, {"host": GATEWAY, "extra": {"timeout": 20}}).response_deadline == 60.0


def test_api_key_is_registered_with_the_secret_masker(set_connection: Callable[..., None]) -> None:
    key = "sk-masker-canary-7f3a9c"
    assert key in str(redact(f"Authorization: Bearer {key}"))  # not known before the connection is read
    set_connection({"host": GATEWAY, "password": key})
    JiMengHook().config  # noqa: B018 - reading the config registers the key
    redacted = str(redact(f"Authorization: Bearer {key} and again {key}"))
    assert key not in redacted
    assert "***" in redacted


def test_config_repr_never_shows_the_api_key(set_connection: Callable[..., None]) -> None:
    config = _config(set_connection, {"host": GATEWAY})
    assert KEY not in repr(config)
    assert KEY not in str(config)
    assert "gw.example.com" in repr(config)


def test_session_sends_the_key_as_bearer_and_is_created_once(set_connection: Callable[..., None]) -> None:
    set_connection({"host": GATEWAY, "password": KEY, "extra": {"proxies": {"https": "http://p:1"}, "verify": False}})
    hook = JiMengHook()
    try:
        session = hook.get_conn()
        assert session is hook.get_conn()
        assert session.headers["Authorization"] == f"Bearer {KEY}"
        assert session.proxies == {"https": "http://p:1"}
        assert session.verify is False
    finally:
        hook.close()
    assert hook.stopped
