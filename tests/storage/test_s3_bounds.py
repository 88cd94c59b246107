"""The provider's S3 client: bounded timeouts and attempts under the connection's own config (issue 20 #11)."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_jimeng.exceptions import JiMengStorageError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.storage import s3
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from airflow_provider_jimeng.storage.s3 import S3ImageStore
from airflow_provider_jimeng.testing import AWS_REGION
from tests.security.conftest import silent_server


def s3_hook(monkeypatch: pytest.MonkeyPatch, endpoint_url: str, **extra: Any) -> Any:
    """The hook the operator builds for ``aws_bounds`` (a connection to ``endpoint_url``)."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_BOUNDS",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": endpoint_url, "region_name": AWS_REGION, **extra},
            }
        ),
    )
    operator = JiMengGenerateOperator(task_id="generate", prompt="a fox", s3_bucket="bounds", aws_conn_id="aws_bounds")
    _prompts, _generation, options = operator.checked_parameters()
    return operator._s3_hook(options)


def test_the_client_is_bounded_when_the_connection_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's defaults (60 s timeouts, 5 attempts) held execute() ~360 s after on_kill."""
    config = s3_hook(monkeypatch, "http://127.0.0.1:9").get_conn().meta.config
    assert config.connect_timeout == s3.S3_CONNECT_TIMEOUT
    assert config.read_timeout == s3.S3_READ_TIMEOUT
    assert config.retries == {"mode": "standard", "total_max_attempts": s3.S3_MAX_ATTEMPTS}
    # The documented bound of one call to an S3 that never answers (docs/faults.md): about 32 s.
    assert s3.S3_MAX_ATTEMPTS * (s3.S3_CONNECT_TIMEOUT + s3.S3_READ_TIMEOUT) <= 30


def test_the_connections_own_config_wins_option_by_option(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = s3_hook(
        monkeypatch,
        "http://127.0.0.1:9",
        config_kwargs={"read_timeout": 3, "retries": {"mode": "legacy", "max_attempts": 0}, "max_pool_connections": 7},
    )
    config = hook.get_conn().meta.config
    assert config.read_timeout == 3
    assert config.retries["mode"] == "legacy"  # botocore reads max_attempts 0 as one attempt in all
    assert config.retries.get("total_max_attempts", 1) == 1
    assert config.max_pool_connections == 7
    assert config.connect_timeout == s3.S3_CONNECT_TIMEOUT, "what the user did not set stays bounded"


def test_an_s3_that_never_answers_fails_the_call_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A real listener on loopback that accepts and never answers: the call fails, it does not hang."""
    monkeypatch.setattr(s3, "S3_CONNECT_TIMEOUT", 0.25)
    monkeypatch.setattr(s3, "S3_READ_TIMEOUT", 0.25)
    with silent_server() as url:
        store = S3ImageStore(
            s3_hook(monkeypatch, url), TaskKeyspace("bounds", "jimeng", "dag", "manual__1", "generate", -1)
        )
        started = time.monotonic()
        with pytest.raises(JiMengStorageError, match="writing s3://bounds/"):
            store.write_json("jimeng/x.json", {"a": 1})
        elapsed = time.monotonic() - started
    # Two attempts of 0.25 s and standard mode's backoff (at most 1 s): generous, still far from botocore's 360 s.
    assert elapsed < 6, elapsed


def test_after_on_kill_each_later_call_gets_one_short_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """After on_kill the try still writes a journal batch and records.json: against a silent S3 each
    took the whole bound in turn (about 22 s apiece), past Airflow's 60 s before SIGKILL."""
    monkeypatch.setattr(s3, "S3_STOPPING_TIMEOUT", 0.3)
    with silent_server() as url:
        store = S3ImageStore(
            s3_hook(monkeypatch, url), TaskKeyspace("bounds", "jimeng", "dag", "manual__1", "generate", -1)
        )
        operator = JiMengGenerateOperator(task_id="generate", prompt="a fox")
        stopped: list[str] = []
        operator._active_run = SimpleNamespace(stop=stopped.append, store=store)  # type: ignore[assignment]
        operator.on_kill()
        assert stopped == ["on_kill"]
        config = store._client.meta.config
        assert (config.read_timeout, config.connect_timeout) == (0.3, 0.3)
        assert config.retries["total_max_attempts"] == 1
        started = time.monotonic()
        with pytest.raises(JiMengStorageError, match="writing s3://bounds/"):
            store.write_json("jimeng/records.json", {"a": 1})
        assert time.monotonic() - started < 3
