"""A key the service refuses fails the task at once, not after ``retries`` x ``retry_delay`` of waiting.

Before: a 401 kept the task's retries (``retries=2`` and Airflow's default ``retry_delay`` is about ten
minutes of a new user waiting for the same refusal), while docs/errors.md said it was not retried.
"""

from __future__ import annotations

import pytest
from airflow.exceptions import AirflowFailException

from airflow_provider_jimeng.exceptions import JiMengRunAbortedError
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
    logged = capsys.readouterr().out
    assert f"The JiMeng API at {emulator.base_url} refused" in logged, "the log names the host that refused the key"
    assert "Keys are regional" in logged
    assert "sk-a-key-of-another-region" not in logged
