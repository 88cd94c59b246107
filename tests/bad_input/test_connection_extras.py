"""Connection extras of the wrong type: refused naming the extra, before any request.

Extras come from a JSON text field or an environment variable, so ``"nan"``, ``"inf"``, ``true``,
``[]`` and ``{}`` are all one typo away. Each case is a ``jimeng`` connection that is right but for
one extra; the hook must refuse it with the extra named, say what is allowed, and send nothing.

The hook branch hardens these checks in parallel: cases that fail today (NaN and infinite numbers
pass ``number < minimum``, ``true`` passes as 1, ``max_retries`` "2.5" is truncated and "inf"/"nan"
crash in ``int()``) are strict xfails, so they turn into failures the day the hardening lands and
the marks must go.

Counts: 48 cases, 19 of them strict xfail.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from tests.bad_input.conftest import assert_refused

HARDENING = pytest.mark.xfail(strict=True, reason="connection extras hardening lands with the hook branch")
NOT_A_NUMBER = "allowed: a number >="
NUMBERS = ("timeout", "connect_timeout", "retry_backoff", "retry_max_wait", "max_images_per_minute")
#: What each number extra must be at least; "-1" is below every one of them.
BELOW = "below the minimum of"


def number_cases() -> list[Any]:
    cases = []
    for name in NUMBERS:
        for label, value, allowed, today in [
            ("nan", "nan", "number", HARDENING),
            ("inf", "inf", "number", HARDENING),
            ("minus-1", "-1", BELOW, None),
            ("words", "abc", NOT_A_NUMBER, None),
            ("true", True, "number", HARDENING),
            ("list", [], NOT_A_NUMBER, None),
            ("dict", {}, NOT_A_NUMBER, None),
        ]:
            marks = [today] if today is not None else []
            cases.append(pytest.param(name, value, name, allowed, id=f"{name}-{label}", marks=marks))
    return cases


CASES = [
    *number_cases(),
    pytest.param("max_retries", "inf", "max_retries", "integer", id="max_retries-inf", marks=HARDENING),
    pytest.param("max_retries", "nan", "max_retries", "integer", id="max_retries-nan", marks=HARDENING),
    pytest.param("max_retries", "2.5", "max_retries", "integer", id="max_retries-2.5", marks=HARDENING),
    pytest.param("max_retries", -1, "max_retries", BELOW, id="max_retries-minus-1"),
    pytest.param("max_retries", True, "max_retries", "integer", id="max_retries-true", marks=HARDENING),
    pytest.param("max_retries", "many", "max_retries", NOT_A_NUMBER, id="max_retries-words"),
    pytest.param("watermark", "maybe", "watermark", "use true or false", id="watermark-maybe"),
    pytest.param("watermark", [], "watermark", "use true or false", id="watermark-list"),
    pytest.param("allow_http", "sometimes", "allow_http", "use true or false", id="allow_http-sometimes"),
    pytest.param("proxies", "not json", "proxies", "must be a JSON object", id="proxies-not-json"),
    pytest.param("proxies", [1], "proxies", "must be a JSON object", id="proxies-list"),
    pytest.param("proxies", "[1]", "proxies", "must be a JSON object", id="proxies-list-text"),
    pytest.param("verify", 42, "verify", "use true or false", id="verify-42"),
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
    xfails = [case for case in CASES if case.marks]
    assert len(CASES) >= 25
    assert f"Counts: {len(CASES)} cases, {len(xfails)} of them strict xfail." in (__doc__ or "")
