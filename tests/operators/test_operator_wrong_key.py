"""A key the service refuses fails the task at once, not after ``retries`` x ``retry_delay`` of waiting.

Before: a 401 kept the task's retries (``retries=2`` and Airflow's default ``retry_delay`` is about ten
minutes of a new user waiting for the same refusal), while docs/errors.md said it was not retried.
"""

from __future__ import annotations

import pytest
from airflow.exceptions import AirflowFailException

from airflow_provider_jimeng.exceptions import JiMengRunAbortedError
from airflow_provider_jimeng.hooks.connection_config import resolve_base_url
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.testing import jimeng_connection_json
from tests.operators.conftest import RecordingTaskInstance, TrackingEmulator


def test_a_refused_key_fails_the_task_without_retries_and_says_where_and_why(
    emulator: TrackingEmulator, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIMENG_DEFAULT", jimeng_connection_json(emulator.base_url, "sk-a-key-of-another-region")
    )
    operator = JiMengGenerateOperator(task_id="gen", prompt=["a fox", "a hare"], retries=2)

    with pytest.raises(JiMengRunAbortedError) as raised:
        operator.execute({"ti": RecordingTaskInstance()})  # type: ignore[typeddict-item]

    assert isinstance(raised.value, AirflowFailException), "Airflow fails the task without using its retries"
    assert emulator.billed_images == 0
    error = str(raised.value)
    assert f"rejected by {emulator.base_url}" in error, "the task's error names the host that refused the key"
    assert "Keys are regional" in error
    assert "sk-a-key-of-another-region" not in error + capsys.readouterr().out


def test_a_wrong_base_url_path_says_what_the_base_url_should_be(
    emulator: TrackingEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A base URL with a wrong path was a bare ``Not Found``; the hint lived only in ``connections test``."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_JIMENG_DEFAULT",
        jimeng_connection_json(emulator.base_url.replace("/api/v3", "/api/v9"), emulator.api_key, max_retries=0),
    )
    operator = JiMengGenerateOperator(task_id="gen", prompt="a fox")

    with pytest.raises(JiMengRunAbortedError) as raised:
        operator.execute({"ti": RecordingTaskInstance()})  # type: ignore[typeddict-item]

    assert "/api/v9/images/generations does not exist on that host (HTTP 404)" in str(raised.value)
    assert "the base URL should be everything before /images/generations" in str(raised.value)
    assert emulator.billed_images == 0


@pytest.mark.parametrize(
    ("host", "base_url"),
    [
        ("https://ark.cn-beijing.volces.com", "https://ark.cn-beijing.volces.com/api/v3"),
        ("https://ark.cn-beijing.volces.com/", "https://ark.cn-beijing.volces.com/api/v3"),
        ("ark.cn-beijing.volces.com", "https://ark.cn-beijing.volces.com/api/v3"),
        ("https://ark.ap-southeast.bytepluses.com", "https://ark.ap-southeast.bytepluses.com/api/v3"),
        ("https://ark.cn-beijing.volces.com/api/v3", "https://ark.cn-beijing.volces.com/api/v3"),
        ("https://gateway.example.com", "https://gateway.example.com"),
    ],
)
def test_an_official_host_with_a_scheme_and_no_path_gets_the_api_path(host: str, base_url: str) -> None:
    assert resolve_base_url(host) == base_url
