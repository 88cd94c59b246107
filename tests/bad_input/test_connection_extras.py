"""Connection extras of the wrong type: refused naming the extra, before any request.

Extras come from a JSON text field or an environment variable, so ``"nan"``, ``"inf"``, ``true``,
``[]`` and ``{}`` are all one typo away. Each case is a ``jimeng`` connection that is right but for
one extra; the hook must refuse it with the extra named, say what is allowed, and send nothing.

The hook branch hardened these checks (merged from main): the cases it fixed (NaN and infinite
numbers passed ``number < minimum``, ``true`` passed as 1, ``max_retries`` "2.5" was truncated and
"inf"/"nan" crashed in ``int()``) were strict xfails here until then, and are plain cases now.

Counts: 53 cases, 0 of them strict xfail.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from tests.bad_input.conftest import assert_refused

NOT_A_NUMBER = "allowed: a number >="
BOOL = "allowed: true or false"
WHOLE = "allowed: a whole number >= 0"
NUMBERS = ("timeout", "connect_timeout", "retry_backoff", "retry_max_wait", "max_images_per_minute")
#: What each number extra must be at least; "-1" is below every one of them.
BELOW = "below the minimum of"


def number_cases() -> list[Any]:
    cases = []
    for name in NUMBERS:
        for label, value, allowed in [
            ("nan", "nan", NOT_A_NUMBER),
            ("inf", "inf", NOT_A_NUMBER),
            ("minus-1", "-1", BELOW),
            ("words", "abc", NOT_A_NUMBER),
            ("true", True, NOT_A_NUMBER),
            ("list", [], NOT_A_NUMBER),
            ("dict", {}, NOT_A_NUMBER),
        ]:
            cases.append(pytest.param(name, value, name, allowed, id=f"{name}-{label}"))
    return cases


CASES = [
    *number_cases(),
    pytest.param("max_retries", "inf", "max_retries", WHOLE, id="max_retries-inf"),
    pytest.param("max_retries", "nan", "max_retries", WHOLE, id="max_retries-nan"),
    pytest.param("max_retries", "2.5", "max_retries", WHOLE, id="max_retries-2.5"),
    pytest.param("max_retries", -1, "max_retries", BELOW, id="max_retries-minus-1"),
    pytest.param("max_retries", True, "max_retries", WHOLE, id="max_retries-true"),
    pytest.param("max_retries", "many", "max_retries", WHOLE, id="max_retries-words"),
    pytest.param("watermark", "maybe", "watermark", BOOL, id="watermark-maybe"),
    pytest.param("watermark", [], "watermark", BOOL, id="watermark-list"),
    pytest.param("allow_http", "sometimes", "allow_http", BOOL, id="allow_http-sometimes"),
    pytest.param("proxies", "not json", "proxies", "must be a JSON object", id="proxies-not-json"),
    pytest.param("proxies", [1], "proxies", "must be a JSON object", id="proxies-list"),
    pytest.param("proxies", "[1]", "proxies", "must be a JSON object", id="proxies-list-text"),
    pytest.param("verify", 42, "verify", "allowed: true, false, or the path of a CA bundle", id="verify-42"),
    pytest.param("images_per_request", "0", "images_per_request", BELOW, id="images_per_request-0"),
    pytest.param(
        "images_per_request", "2.5", "images_per_request", "allowed: a whole number", id="images_per_request-2.5"
    ),
    pytest.param(
        "images_per_request", True, "images_per_request", "allowed: a whole number", id="images_per_request-true"
    ),
    pytest.param("images_per_request", "101", "images_per_request", "from 1 to 100", id="images_per_request-101"),
    pytest.param(
        "images_per_request", "four", "images_per_request", "allowed: a whole number", id="images_per_request-words"
    ),
]


@pytest.fixture
def connection_with(jimeng_conn: JiMengEmulator, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point ``jimeng_bad_extra`` at the emulator, with one extra set to ``value``."""

    def make(name: str, value: Any) -> str:
        extra = {"allow_http": True, name: value}
        fields = {"conn_type": "jimeng", "host": jimeng_conn.base_url, "password": "sk-valid-looking", "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_JIMENG_BAD_EXTRA", json.dumps(fields))
        return "jimeng_bad_extra"

    return make


@pytest.mark.parametrize(("extra", "value", "parameter", "allowed"), CASES)
def test_connection_extra_refused(
    jimeng_conn: JiMengEmulator, connection_with: Any, extra: str, value: Any, parameter: str, allowed: str
) -> None:
    with pytest.raises(JiMengConfigurationError) as raised:
        JiMengHook(connection_with(extra, value)).generate_images("a red fox")
    assert_refused(raised.value, parameter, allowed, jimeng_conn)
    assert "sk-valid-looking" not in str(raised.value)


def test_the_table_is_as_large_as_documented() -> None:
    xfails = [case for case in CASES if any(mark.name == "xfail" for mark in case.marks)]
    assert len(CASES) >= 25
    assert f"Counts: {len(CASES)} cases, {len(xfails)} of them strict xfail." in (__doc__ or "")
