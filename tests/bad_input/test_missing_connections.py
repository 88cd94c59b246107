"""A named connection that does not exist is a configuration error before any request (issue 20 #14).

Before: a typo in ``aws_conn_id`` or ``output_conn_id`` made the amazon provider fall back to the
worker's ambient credentials (images stored in another account, or paid for and then refused), and a
typo in ``jimeng_conn_id`` was a raw ``AirflowNotFoundException``, which Airflow retries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.version_compat import AirflowFailException
from tests.bad_input.conftest import assert_refused

ALLOWED = "is not defined; nothing was sent"


@pytest.fixture(autouse=True)
def _no_ambient_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ambient credentials and an S3 that refuses at once: a fallback to them must not be what happens."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ambient")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ambient")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")


@pytest.mark.parametrize(
    ("arguments", "parameter"),
    [
        pytest.param({"jimeng_conn_id": "jimeng_typo"}, "jimeng_conn_id", id="jimeng_conn_id"),
        pytest.param({"s3_bucket": "images", "aws_conn_id": "aws_typo"}, "aws_conn_id", id="aws_conn_id"),
        pytest.param(
            {"output_path": "s3://images/p", "output_conn_id": "aws_typo"}, "output_conn_id", id="output_conn_id-s3"
        ),
        pytest.param(
            {"output_path": "file:///{tmp}/out", "output_conn_id": "fs_typo"},
            "output_conn_id",
            id="output_conn_id-file",
        ),
    ],
)
def test_a_connection_that_does_not_exist_is_refused_before_any_request(
    jimeng_conn: JiMengEmulator, context: dict[str, Any], tmp_path: Path, arguments: dict[str, Any], parameter: str
) -> None:
    arguments = {name: value.replace("/{tmp}", str(tmp_path)) for name, value in arguments.items()}
    operator = JiMengGenerateOperator(task_id="generate", prompt="a red fox", **arguments)
    with pytest.raises(JiMengConfigurationError) as raised:
        operator.execute(context)  # type: ignore[arg-type]
    assert_refused(raised.value, parameter, ALLOWED, jimeng_conn)
    assert isinstance(raised.value, AirflowFailException), "not retried: every try would look in vain"
    assert f"connection {arguments[parameter]!r}" in str(raised.value)


def test_the_hook_refuses_a_jimeng_conn_id_that_does_not_exist() -> None:
    from airflow_provider_jimeng.hooks.jimeng import JiMengHook

    with pytest.raises(JiMengConfigurationError, match=f"jimeng_conn_id: connection 'jimeng_typo' {ALLOWED}"):
        _ = JiMengHook("jimeng_typo").config
