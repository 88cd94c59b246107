"""A whole run with every library at DEBUG level: urllib3, requests, botocore, s3transfer and the provider.

botocore logs each request's params at DEBUG (an upload's whole body: the image bytes), response
bodies and signing material; urllib3 logs each request line with its query (a signed URL's
signature). The provider installs a filter on those loggers; this run proves that nothing of the
key, the signatures or the image data gets through, while the lines themselves still do.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from tests.faults.conftest import Pipeline
from tests.security.conftest import find_leaks

pytestmark = pytest.mark.timeout(120)

DEBUG_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "requests", "airflow_provider_jimeng", "airflow.task")


@pytest.mark.parametrize("dag_id", ["faults_pipeline", "faults_pipeline_b64"])
def test_a_run_logged_at_debug_level_leaks_nothing(
    airflow_db: None,
    unmasked: list[Any],
    canary_emulator: JiMengEmulator,
    s3_bucket: str,
    s3_client: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    dag_id: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in DEBUG_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    # A retried download and a retried request: their error paths log URLs too.
    canary_emulator.inject(Fault("unavailable", path="/tos/*"), Fault("rate_limit", retry_after=0.01))
    capfd.readouterr()

    run = Pipeline(canary_emulator, s3_bucket, s3_client).run(dag_id, prompts=["a red fox", "a grey owl"])
    out, err = capfd.readouterr()
    text = "\n".join((out, err, caplog.text))

    assert run.state == "success", text[-3000:]
    uploads = [
        r.getMessage() for r in caplog.records if r.name == "botocore.endpoint" and "PutObject" in r.getMessage()
    ]
    assert uploads, "botocore's request log was not captured: the check would be vacuous"
    if dag_id == "faults_pipeline":
        # Downloaded images go up with put_object(Body=<bytes>): botocore logged them whole (~100 KB a line).
        assert any("'body': <" in message and " bytes>" in message for message in uploads)
    longest = max(caplog.records, key=lambda record: len(record.getMessage()))
    assert len(longest.getMessage()) < 10_000, f"{longest.name} logged {len(longest.getMessage())} characters"
    assert any(r.name == "urllib3.connectionpool" and "?<redacted>" in r.getMessage() for r in caplog.records)
    assert not find_leaks(text)
    unredacted = text.replace("Signature=<redacted>", "").replace("Credential=<redacted>", "")
    for marker in ("X-Amz-Signature", "Signature=", "X-Amz-Credential", "Credential="):
        assert marker not in unredacted
