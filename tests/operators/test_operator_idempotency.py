"""A retried or cleared task never pays twice for what an earlier try stored (proved by the billing ledger).

How the re-runs are produced, most faithful first:

* task retries: ``dag.test()`` in Airflow 3.3 performs them itself. A failed try with retries left
  goes ``up_for_retry``; with ``retry_delay=0`` the next loop of ``dag.test()`` schedules it again as
  try 2 of the same task instance (same run id, same keys), just as the scheduler would.
* clearing a finished run: calling ``dag.test()`` again with the same logical date and ``run_after``
  targets the same run id; ``dag.test()`` clears that run's task instances first and runs them again,
  as "Clear" in the UI does.

The hook's own retries are off (``max_retries=0`` on the test connection), so an injected fault
decides exactly which request of which try fails.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from airflow_provider_jimeng.emulator import Fault
from airflow_provider_jimeng.storage.records import JournaledImage, JournalEntry
from airflow_provider_jimeng.testing import S3Server
from tests.dags import jimeng_test_generate
from tests.operators.conftest import (
    Bucket,
    DagRunResult,
    RunDag,
    TrackingEmulator,
    task_prefix,
    use_s3_server,
    when,
)

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a paper boat on a pond"]


def test_retry_generates_only_the_prompt_the_failed_try_did_not_store(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    """Try 1 stores prompts 0 and 2 and fails on prompt 1 (HTTP 500); try 2 generates prompt 1 only."""
    # One prompt at a time (max_concurrency=1), so request 0 consumes the no-op fault, request 1 the 500.
    emulator.inject(Fault("slow", delay=0), Fault("server_error"))

    run = run_dag(jimeng_test_generate.retry_dag, {"prompts": PROMPTS, "bucket": bucket.name})

    assert run.state == "success"
    assert run.try_number("gen") == 2
    assert "InternalServiceError" in run.log("gen")
    prefix = task_prefix(run)
    stored = bucket.images(prefix)
    assert stored == [f"{prefix}/p{index:04d}_i00.jpeg" for index in range(3)]
    assert emulator.billed_images == len(stored) == 3, "nothing was paid for twice"
    assert emulator.request_count == 4, "3 prompts + the one failed request"
    assert emulator.prompts_billed() == [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    assert run.xcom("gen") == [f"s3://{bucket.name}/{key}" for key in stored]
    usage = run.xcom("gen", "usage")
    this_try = usage["this_try"]
    assert (this_try["generated_images"], this_try["requests"], this_try["reused_prompts"]) == (1, 1, 2)
    # Over both tries: what the emulator billed, and every request (the failed one included).
    assert (usage["tries"], usage["generated_images"], usage["requests"]) == (2, 3, 4)
    assert run.log("gen").count("stored by an earlier try") == 2


def test_clearing_a_successful_run_reuses_every_stored_image(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    conf = {"prompts": PROMPTS, "bucket": bucket.name}
    first = run_dag(jimeng_test_generate.dag, conf)
    assert first.state == "success"
    assert emulator.billed_images == 3

    again = run_dag(jimeng_test_generate.dag, conf, again=first)

    assert again.run_id == first.run_id
    assert again.state == "success"
    assert emulator.billed_images == 3, "the cleared run paid for nothing"
    assert emulator.request_count == 3
    assert again.xcom("gen") == first.xcom("gen")
    assert again.xcom("gen", "images") == first.xcom("gen", "images")
    usage = again.xcom("gen", "usage")
    this_try = usage["this_try"]
    assert (this_try["generated_images"], this_try["requests"], this_try["reused_prompts"]) == (0, 0, 3)
    # A cleared task instance re-runs in the same keyspace: its earlier try still counts (docs/xcom-patterns.md).
    assert (usage["tries"], usage["generated_images"], usage["requests"]) == (2, 3, 3)


def test_a_changed_prompt_is_regenerated_and_the_others_reused(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    """A stored result is reused only for the same request: the record's fingerprint must match."""
    first = run_dag(jimeng_test_generate.dag, {"prompts": PROMPTS, "bucket": bucket.name})
    changed = [PROMPTS[0], "a lighthouse at dawn", PROMPTS[2]]

    again = run_dag(jimeng_test_generate.dag, {"prompts": changed, "bucket": bucket.name}, again=first)

    assert again.state == "success"
    billed = emulator.prompts_billed()
    assert sorted(billed[:3]) == sorted(PROMPTS), "the first run, in any order"
    assert billed[3:] == ["a lighthouse at dawn"], "the re-run paid for the changed prompt only"
    assert bucket.record(task_prefix(again), 1)["prompt"] == "a lighthouse at dawn"
    usage = again.xcom("gen", "usage")
    assert (usage["this_try"]["generated_images"], usage["reused_prompts"]) == (1, 2)
    assert usage["generated_images"] == emulator.billed_images == 4


def test_replace_regenerates_and_overwrites(emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag) -> None:
    conf = {"prompts": PROMPTS[:2], "bucket": bucket.name}
    first = run_dag(jimeng_test_generate.replace_dag, conf)
    prefix = task_prefix(first)
    first_ids = [bucket.record(prefix, index)["request_id"] for index in range(2)]
    # A journal an earlier try left behind (it died before records.json): replace=True must not use it, only drop it.
    stale_journal = f"{prefix}/_pending/earlier-try-1.json"
    entry = {**bucket.record(prefix, 0), "written_at": time.time(), "images": []}
    bucket.client.put_object(Bucket=bucket.name, Key=stale_journal, Body=json.dumps({"prompts": {"0": entry}}))

    again = run_dag(jimeng_test_generate.replace_dag, conf, again=first)

    assert again.state == "success"
    assert emulator.billed_images == 4, "replace=True pays again on purpose"
    assert bucket.images(prefix) == [f"{prefix}/p0000_i00.jpeg", f"{prefix}/p0001_i00.jpeg"]
    second_ids = [bucket.record(prefix, index)["request_id"] for index in range(2)]
    assert set(first_ids).isdisjoint(second_ids)
    assert [bucket.head(key)["Metadata"]["jimeng-request-id"] for key in bucket.images(prefix)] == second_ids
    assert again.xcom("gen", "usage")["reused_prompts"] == 0
    assert not bucket.keys(f"{prefix}/_pending/"), "earlier and own journals dropped once records.json is written"


def test_journals_of_prompts_dropped_from_a_shorter_list_do_not_outlive_a_successful_try(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    """Issue 11 item 12: an earlier try with a longer prompt list left a journal for prompt 5.

    The list shrank to two prompts (the upstream task returned fewer): no record will ever cover
    prompt 5, so its journal was kept for good. It must go once this try's records.json is written.
    """
    conf = {"prompts": PROMPTS[:2], "bucket": bucket.name}
    first = run_dag(jimeng_test_generate.dag, conf)
    prefix = task_prefix(first)
    orphan = JournalEntry(
        prompt_index=5,
        fingerprint="an-earlier-prompt",
        written_at=time.time(),
        request_id="req-earlier",
        model="doubao-seedream-4-0-250828",
        created=1,
        usage={"generated_images": 1},
        images=(JournaledImage(index=0, size="1024x1024", url=None),),
    )
    stale_journal = f"{prefix}/_pending/earlier-try-00000.json"
    body = json.dumps({"written_at": time.time(), "prompts": {"5": orphan.to_json()}})
    bucket.client.put_object(Bucket=bucket.name, Key=stale_journal, Body=body)

    again = run_dag(jimeng_test_generate.dag, conf, again=first)

    assert again.state == "success"
    assert emulator.request_count == 2, "the retry reused both prompts"
    assert bucket.keys(f"{prefix}/_pending/") == [], "the orphaned journal is dropped with the try's own"


@pytest.mark.parametrize("dag_name", ["dag", "b64_dag"], ids=["url", "b64_json"])
def test_images_stored_by_a_try_that_died_before_its_journal_and_records_are_not_paid_again(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag, dag_name: str
) -> None:
    """A try killed after uploading, before its journal batch or records.json reached S3, left only images.

    Each image carries its request's fingerprint and the list of its answer's images: the retry
    recognises complete answers from that metadata and reuses them. Before, a b64_json answer was
    generated (and paid for) again, and a url one too.
    """
    dag = getattr(jimeng_test_generate, dag_name)
    conf = {"prompts": PROMPTS[:2], "bucket": bucket.name}
    first = run_dag(dag, conf)
    assert first.state == "success"
    prefix = task_prefix(first)
    bucket.client.delete_object(Bucket=bucket.name, Key=f"{prefix}/records.json")

    again = run_dag(dag, conf, again=first)

    assert again.state == "success"
    assert emulator.request_count == 2, "no new request: the images vouched for their answers"
    assert again.log("gen").count("reusing them (no new request)") == 2
    recorded = sorted(bucket.record(prefix, index)["request_id"] for index in range(2))
    assert recorded == sorted(entry.request_id for entry in emulator.ledger)


def test_retry_stores_from_the_journal_without_a_new_generation_request(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    """Generation succeeded but the download for storage failed (HTTP 500 from the image host).

    The images are paid for and their signed URLs are still valid: try 1 must keep the journal and
    fail; try 2 must download from the journal's URLs and store, sending no generation request.
    """
    emulator.inject(Fault("server_error", path="/tos/*"))

    run = run_dag(jimeng_test_generate.retry_dag, {"prompts": PROMPTS[:1], "bucket": bucket.name})

    assert run.state == "success"
    assert run.try_number("gen") == 2
    log = run.log("gen")
    assert "not stored" in log
    assert "finishing the storage of an earlier try's images (no new request)" in log
    assert emulator.request_count == 1, "no second generation request"
    assert emulator.billed_images == 1
    prefix = task_prefix(run)
    assert bucket.images(prefix) == [f"{prefix}/p0000_i00.jpeg"]
    record = bucket.record(prefix, 0)
    assert record["request_id"] == emulator.ledger[0].request_id
    assert record["failures"] == []
    assert bucket.keys(f"{prefix}/_pending/") == [], "the journal is removed once its images are stored"
    assert bucket.head(f"{prefix}/p0000_i00.jpeg")["Metadata"]["jimeng-request-id"] == emulator.ledger[0].request_id
    assert run.xcom("gen") == [f"s3://{bucket.name}/{prefix}/p0000_i00.jpeg"]
    assert run.xcom("gen", "usage")["this_try"]["generated_images"] == 0
    assert run.xcom("gen", "usage")["generated_images"] == emulator.billed_images == 1


def test_a_lost_image_is_generated_again_by_the_retry(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    """A signed URL answering 404 will never work again: try 1 records the loss, try 2 generates anew.

    Paying again is the only way to get the image, and nothing this task kept is paid for twice.
    """
    emulator.inject(Fault("missing_url"))

    run = run_dag(jimeng_test_generate.retry_dag, {"prompts": PROMPTS[:1], "bucket": bucket.name})

    assert run.state == "success"
    assert run.try_number("gen") == 2
    lost_request = emulator.ledger[0].request_id
    assert f"ImageLost (request id {lost_request})" in run.log("gen")
    assert emulator.request_count == 2
    prefix = task_prefix(run)
    assert bucket.images(prefix) == [f"{prefix}/p0000_i00.jpeg"]
    assert emulator.billed_images == 2, "the lost image and its replacement"
    record = bucket.record(prefix, 0)
    assert record["request_id"] == emulator.ledger[1].request_id
    assert record["failures"] == []


def test_an_s3_outage_keeps_paid_images_in_a_local_journal_for_the_rerun(
    emulator: TrackingEmulator, run_dag: RunDag, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 dies while the prompts are being generated; the images are paid for but cannot be stored.

    Try 1 journals them on the worker's disk and fails. Once S3 is back (a new, empty server with the
    same bucket), clearing the run stores every image from those journals: no new generation request.
    """
    bucket_name = f"jimeng-outage-{uuid.uuid4().hex[:12]}"
    prompts = ["a red fox in the snow", "a lighthouse at dusk", "a paper boat on a pond"]
    release = threading.Event()
    emulator.hold = release  # answers leave only once S3 is down: no race with a busy machine
    first_server = S3Server().start()

    def stop_s3_then_answer() -> None:
        first_server.stop()
        release.set()

    try:
        use_s3_server(first_server, bucket_name, monkeypatch)
        # Generation starts only after the task listed its prefix: S3 is stopped mid-generation.
        watcher = when(lambda: emulator.in_flight == len(prompts), stop_s3_then_answer)
        first: DagRunResult = run_dag(jimeng_test_generate.dag, {"prompts": prompts, "bucket": bucket_name})
        watcher.join()
    finally:
        release.set()
        first_server.stop()
    emulator.hold = None

    assert first.state == "failed"
    assert emulator.billed_images == 3, "all three prompts were already being generated"
    local = [record.getMessage() for record in caplog.records if "journaled on this machine" in record.getMessage()]
    assert {message.split(":")[0] for message in local} == {"Prompt 0", "Prompt 1", "Prompt 2"}

    with S3Server() as second_server:
        bucket = use_s3_server(second_server, bucket_name, monkeypatch)
        again = run_dag(jimeng_test_generate.dag, {"prompts": prompts, "bucket": bucket_name}, again=first)

        assert again.state == "success"
        assert emulator.request_count == 3, "no new generation request"
        assert emulator.billed_images == 3
        prefix = task_prefix(again)
        assert bucket.images(prefix) == [f"{prefix}/p{index:04d}_i00.jpeg" for index in range(3)]
        assert [bucket.record(prefix, index)["prompt"] for index in range(3)] == prompts
        assert bucket.keys(f"{prefix}/_pending/") == []
        assert again.log("gen").count("no new request") == 3


def test_invalid_input_fails_at_once_without_spending_the_task_retries(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    """A bad size fails every try alike: the task fails on try 1 (AirflowFailException), nothing is sent."""
    run = run_dag(jimeng_test_generate.retry_dag, {"prompts": PROMPTS, "bucket": bucket.name, "size": "3K"})

    assert run.state == "failed"
    assert run.try_number("gen") == 1, "configuration errors are not retried"
    assert "size" in run.log("gen")
    assert emulator.request_count == 0
