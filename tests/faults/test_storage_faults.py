"""S3 failing before or during a run: stopped, bucket missing, access denied.

Retries run as in ``test_api_faults`` (``dag.test()`` retries the task once); the test repairs S3 in
the DAG's ``on_retry_callback`` (``pipeline.before_retry``), between try 1 and try 2, the way an
operator would before a retry. What must hold:

* S3 failing before anything is paid (the first listing fails): the task fails at once, nothing billed;
* S3 failing after images were paid for: no further prompt is sent, the paid images are journaled
  (in S3 when it still takes writes, else in a local file on the worker), the task fails naming the
  S3 error code and the JiMeng request id, and the retry stores them without a new request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.storage.s3 import LocalJournal, TaskKeyspace
from tests.faults.conftest import (
    FORMATS,
    Pipeline,
    S3Gate,
    assert_names_code_and_request_id,
    dag_for,
    stop_s3_while_prompt_1_is_generated,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

RUN_ID = "manual__2025-01-01T00:00:00+00:00"
#: Every recovery path that exists in both response formats runs in both.
both_formats = pytest.mark.parametrize("fmt", FORMATS)


def keyspace(bucket: str, dag_id: str) -> TaskKeyspace:
    return TaskKeyspace(bucket, "jimeng", dag_id, RUN_ID, "generate", -1)


def local_journal(bucket: str, dag_id: str) -> LocalJournal:
    return LocalJournal(keyspace(bucket, dag_id))


def when(condition: Callable[[], bool], action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` as soon as ``condition`` holds (polled in the background)."""

    def watch() -> None:
        if wait_for(condition, timeout=30):
            action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@both_formats
def test_s3_unreachable_before_the_run_costs_nothing_and_the_retry_generates(
    pipeline: Pipeline, emulator: JiMengEmulator, gate: S3Gate, fmt: str
) -> None:
    gate.stop()
    pipeline.before_retry(gate.start)

    run = pipeline.run(dag_for(fmt), prompts=["a red fox", "a grey owl"])

    assert run.state == "success"
    assert run.try_number == 2
    (message,) = run.errors
    assert "EndpointConnectionError" in message
    assert "listing s3://" in message
    accounting = pipeline.account()
    assert accounting.requests == 2  # all in try 2: try 1 failed before sending anything
    assert accounting.billed == accounting.stored == 2


@both_formats
@pytest.mark.parametrize("failure", ["no_bucket", "denied"])
def test_a_missing_or_refusing_bucket_fails_at_once_without_spending_retries(
    pipeline: Pipeline, emulator: JiMengEmulator, gate: S3Gate, failure: str, fmt: str
) -> None:
    """Issue 11 item 11: a configuration error on the first listing is not retried like a transient fault."""
    gate.mode = "no_bucket" if failure == "no_bucket" else "deny_all"
    pipeline.before_retry(lambda: setattr(gate, "mode", "pass"))

    run = pipeline.run(dag_for(fmt), prompts=["a red fox", "a grey owl"])

    assert run.state == "failed"
    assert run.try_number == 1, "no task retry is spent on a bucket that does not exist or refuses us"
    (message,) = run.errors
    assert {"no_bucket": "NoSuchBucket", "denied": "AccessDenied"}[failure] in message
    assert "before any image was generated" in message
    assert "S3 request id GATE" in message
    assert run.error_types == ["JiMengStorageConfigurationError"]
    assert pipeline.account().requests == 0


@both_formats
def test_s3_stopped_mid_run(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    s3_client: Any,
    bucket: str,
    fmt: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dag_id = dag_for(fmt, "serial")
    image_0 = keyspace(bucket, dag_id).image_key(0, 0)
    outage = stop_s3_while_prompt_1_is_generated(pipeline, emulator, gate, image_0, monkeypatch)
    after_try_1: dict[str, Any] = {}

    def repair() -> None:
        after_try_1.update(billed=emulator.billed_images, keys=pipeline.objects())
        after_try_1["local"] = local_journal(bucket, dag_id).read(1)
        outage.repair()

    pipeline.before_retry(repair)

    run = pipeline.run(dag_id, prompts=["a red fox", "a grey owl"])

    assert run.state == "success"
    assert run.try_number == 2
    (message,) = run.errors
    assert_names_code_and_request_id(message, "EndpointConnectionError", emulator)
    assert "prompt 1 image 0: not stored" in message
    assert "kept for a retry" in message
    # After try 1: both paid, prompt 0 stored, prompt 1 kept on this machine (S3 was down): its signed
    # URL (url) or its image data (b64_json, whose S3 journal never holds data).
    assert after_try_1["billed"] == 2
    stored_after_try_1 = [key for key in after_try_1["keys"] if key.endswith(".jpeg")]
    assert stored_after_try_1 == [keyspace(bucket, dag_id).image_key(0, 0)]
    assert after_try_1["local"] is not None
    if fmt == "url":
        assert after_try_1["local"].images[0].url
    else:
        assert after_try_1["local"].images[0].b64_json
    accounting = pipeline.account()
    assert accounting.requests == 2  # try 2 sent nothing: prompt 0 was stored, prompt 1 had its journal
    assert accounting.billed == accounting.stored == 2
    assert local_journal(bucket, dag_id).read(1) is None  # cleaned up once stored


@both_formats
def test_bucket_deleted_mid_run(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    s3_client: Any,
    bucket: str,
    fmt: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bucket (still empty) disappears while the only prompt is being generated: the answer waits
    # for that event.
    deleted = threading.Event()
    latency = emulator.pause

    def pause(seconds: float) -> None:
        deleted.wait(30)
        latency(seconds)

    monkeypatch.setattr(emulator, "pause", pause)

    def delete_bucket() -> None:
        s3_client.delete_bucket(Bucket=bucket)
        deleted.set()

    watcher = when(lambda: emulator.request_count >= 1, delete_bucket)

    def repair() -> None:
        s3_client.create_bucket(Bucket=bucket)

    pipeline.before_retry(repair)

    run = pipeline.run(dag_for(fmt))
    watcher.join(timeout=5)

    assert run.state == "success"
    assert run.try_number == 2
    (message,) = run.errors
    assert_names_code_and_request_id(message, "NoSuchBucket", emulator)
    assert "S3 request id" in message
    accounting = pipeline.account()
    assert accounting.requests == 1  # the recreated bucket was empty: the local journal saved the payment
    assert accounting.billed == accounting.stored == 1
    assert local_journal(bucket, dag_for(fmt)).read(0) is None


@both_formats
def test_access_denied_mid_run(
    pipeline: Pipeline, emulator: JiMengEmulator, gate: S3Gate, bucket: str, fmt: str
) -> None:
    # Listing is allowed, writing is not (a role without s3:PutObject): found out only after paying once.
    gate.mode = "deny_writes"
    after_try_1: dict[str, int] = {}

    def repair() -> None:
        after_try_1.update(billed=emulator.billed_images, requests=emulator.request_count)
        gate.mode = "pass"

    pipeline.before_retry(repair)

    run = pipeline.run(dag_for(fmt, "serial"), prompts=["one", "two", "three"])

    assert run.state == "success"
    assert run.try_number == 2
    (message,) = run.errors
    assert_names_code_and_request_id(message, "AccessDenied", emulator)
    # The refusal is seen when the first journal (url) or upload (b64_json) write comes back; prompts
    # already sent by then are paid. The emulator answers at once, so that can be all three: the
    # journal is written beside the generation thread, not in its way. Every one of them is kept
    # (in the local journal) and none is paid again; those not yet sent are not sent at all.
    paid_in_try_1 = after_try_1["requests"]
    assert after_try_1["billed"] == paid_in_try_1 >= 1
    assert message.count("kept for a retry") == paid_in_try_1
    assert message.count("not sent (the run stopped)") == 3 - paid_in_try_1
    accounting = pipeline.account()
    assert accounting.requests == 3  # the prompts paid in try 1 were finished from their journals
    assert accounting.billed == accounting.stored == 3


@both_formats
def test_records_refused_at_the_end_are_rebuilt_from_the_journals(
    pipeline: Pipeline,
    emulator: JiMengEmulator,
    gate: S3Gate,
    bucket: str,
    fmt: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Every image is stored, but records.json (written once, at the end) is refused: the journals stay.
    gate.mode = "deny_records"
    prompts = ["one", "two", "three"]
    after_try_1: dict[str, Any] = {}

    def repair() -> None:
        after_try_1.update(downloads=emulator.downloads, keys=pipeline.objects())
        gate.mode = "pass"

    pipeline.before_retry(repair)

    run = pipeline.run(dag_for(fmt), prompts=prompts)

    # Regression (b64_json): try 2 counted the resumed images as failed ("None") although all were in S3.
    assert run.state == "success", run.errors
    assert run.try_number == 2
    (message,) = run.errors
    assert message.count("stored but not its record") == 3
    assert "AccessDenied" in message
    space = keyspace(bucket, dag_for(fmt))
    assert [key for key in after_try_1["keys"] if key.startswith(space.journal_prefix)], "journals kept"
    # Try 2 found each image stored by the answer its journal names: no request, no download.
    accounting = pipeline.account()
    assert accounting.requests == 3
    assert accounting.billed == accounting.stored == 3
    assert emulator.downloads == after_try_1["downloads"] == (3 if fmt == "url" else 0)
    assert run.xcom["usage"]["reused_prompts"] == 3
    assert run.xcom["usage"]["this_try"]["requests"] == 0
    # Regression (issue 20, break 8): try 1 counted its 3 kept images, whose records S3 refused, as failures.
    assert capsys.readouterr().out.count("JiMeng: 3 image(s) kept, 0 failure(s)") == 2, "both tries"
    # Try 1's counts survived its refused records.json (kept on this worker's disk): both tries are summed.
    assert run.xcom["usage"]["tries"] == 2
    assert run.xcom["usage"]["requests"] == run.xcom["usage"]["generated_images"] == accounting.billed == 3
    assert len(run.xcom["images"]) == 3
    assert not [key for key in pipeline.objects() if key.startswith(space.journal_prefix)]
    assert space.records_key in pipeline.objects()


# b64_json only: in url mode the S3 journal's signed URL already lets the retry fetch the image.
def test_b64_images_refused_after_their_journal_are_stored_from_the_local_copy(
    pipeline: Pipeline, emulator: JiMengEmulator, gate: S3Gate, bucket: str
) -> None:
    # S3 takes the journal (which never holds image data) but refuses the image: only the local copy
    # of the answer holds the data, and the retry must prefer it to paying again.
    gate.mode = "deny_images"
    gate.requests.clear()

    def repair() -> None:
        gate.mode = "pass"

    pipeline.before_retry(repair)

    run = pipeline.run("faults_pipeline_b64", prompts=["one"])

    assert run.state == "success"
    assert run.try_number == 2
    (message,) = run.errors
    assert "AccessDenied" in message
    space = keyspace(bucket, "faults_pipeline_b64")
    assert [path for method, path, _ in gate.requests if method == "PUT" and "/_pending/" in path], "S3 journal"
    accounting = pipeline.account()
    assert accounting.requests == 1  # stored from the local journal's data by try 2
    assert accounting.billed == accounting.stored == 1
    assert local_journal(bucket, "faults_pipeline_b64").read(0) is None
    assert space.records_key in pipeline.objects()
