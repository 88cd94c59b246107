"""Image sets and partial failures; and the guards that stop a run before anything is paid for."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from airflow_provider_jimeng.emulator import Fault
from airflow_provider_jimeng.exceptions import JiMengGenerationIncompleteError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from tests.dags import jimeng_test_bad_input, jimeng_test_generate
from tests.operators.conftest import Bucket, RecordingTaskInstance, RunDag, TrackingEmulator, task_prefix

SET_PROMPT = "a comic strip in 3 images: a cat finds a box"


def test_a_set_stores_every_image_of_the_prompt(emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag) -> None:
    run = run_dag(jimeng_test_generate.set_fail_dag, {"prompts": [SET_PROMPT], "bucket": bucket.name})

    assert run.state == "success"
    body = emulator.requests[0]["body"]
    assert body["sequential_image_generation"] == "auto"
    assert body["sequential_image_generation_options"] == {"max_images": 3}
    prefix = task_prefix(run)
    keys = [f"{prefix}/p0000_i{index:02d}.jpeg" for index in range(3)]
    assert bucket.images(prefix) == keys
    assert run.xcom("gen") == [f"s3://{bucket.name}/{key}" for key in keys]
    assert [item["image_index"] for item in run.xcom("gen", "images")] == [0, 1, 2]
    record = bucket.record(prefix, 0)
    assert [image["key"] for image in record["images"]] == keys
    assert record["usage"]["generated_images"] == 3
    assert emulator.billed_images == 3


def test_a_partial_set_failure_stores_the_rest_then_fails_naming_code_and_request_id(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_generate.set_fail_dag, {"prompts": [f"{SET_PROMPT} FAIL_IMAGE_1"], "bucket": bucket.name})

    assert run.state == "failed"
    assert run.task_state("gen") == "failed"
    request_id = emulator.ledger[0].request_id
    log = run.log("gen")
    assert "1 image(s) failed, 2 stored" in log
    assert f"prompt 0 image 1: OutputImageSensitiveContentDetected (request id {request_id})" in log
    prefix = task_prefix(run)
    assert bucket.images(prefix) == [f"{prefix}/p0000_i00.jpeg", f"{prefix}/p0000_i02.jpeg"]
    assert emulator.billed_images == 2, "a refused image is not billed"
    record = bucket.record(prefix, 0)
    assert len(record["failures"]) == 1
    assert "OutputImageSensitiveContentDetected" in record["failures"][0]


def test_a_partial_set_failure_with_continue_succeeds_with_a_warning(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(
        jimeng_test_generate.set_continue_dag, {"prompts": [f"{SET_PROMPT} FAIL_IMAGE_1"], "bucket": bucket.name}
    )

    assert run.state == "success"
    prefix = task_prefix(run)
    assert run.xcom("gen") == [
        f"s3://{bucket.name}/{prefix}/p0000_i00.jpeg",
        f"s3://{bucket.name}/{prefix}/p0000_i02.jpeg",
    ]
    warnings = [line for line in run.log("gen").splitlines() if "warn" in line.lower()]
    request_id = emulator.ledger[0].request_id
    assert any(
        f"prompt 0 image 1: OutputImageSensitiveContentDetected (request id {request_id})" in line for line in warnings
    )


def _png_data_uri(side: int = 32) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_dry_run_sends_nothing_and_logs_the_bodies_without_image_data(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    reference = _png_data_uri()
    run = run_dag(
        jimeng_test_generate.dry_run_dag,
        {"prompts": ["a red fox", "a blue whale"], "bucket": bucket.name, "image": reference},
    )

    assert run.state == "success"
    assert emulator.request_count == 0
    assert emulator.billed_images == 0
    assert bucket.keys() == []
    log = run.log("gen")
    for index, prompt in enumerate(["a red fox", "a blue whale"]):
        line = next(line for line in log.splitlines() if f"Dry run, prompt {index} would send" in line)
        assert f"'prompt': '{prompt}'" in line
        assert "'size': '1K'" in line
        assert "'image': ['data:<redacted>']" in line
        assert f"would store under s3://{bucket.name}/{task_prefix(run)}/p{index:04d}_i00.jpeg" in log
    dry_run_lines = [line for line in run.output.splitlines() if "Dry run" in line]
    assert len(dry_run_lines) == 5
    assert not any(reference.split(",", 1)[1][:40] in line for line in dry_run_lines)
    assert "nothing was sent and nothing was billed" in log
    assert run.xcom("gen") == []


def test_budget_guard_refuses_a_run_that_could_bill_too_many_images(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_generate.budget_dag, {"prompts": ["a", "b", "c"], "bucket": bucket.name})

    assert run.task_state("gen") == "failed"
    log = run.log("gen")
    assert "max_images_per_task: this run could bill up to 12 images (3 prompt(s) x up to 4 each)" in log
    assert "above the limit of 10" in log
    assert emulator.request_count == 0
    assert bucket.keys() == []


def test_budget_guard_lets_a_run_within_the_limit_through(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(
        jimeng_test_generate.budget_dag, {"prompts": ["2 images of a cat", "2 images of a dog"], "bucket": bucket.name}
    )

    assert run.state == "success"
    assert emulator.billed_images == 4


def test_bad_input_fails_each_task_before_any_request(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag, subtests: pytest.Subtests
) -> None:
    run = run_dag(jimeng_test_bad_input.dag, {"bucket": bucket.name})

    for task_id, message in jimeng_test_bad_input.BAD_INPUT.items():
        with subtests.test(task_id=task_id):
            assert run.task_state(task_id) == "failed"
            assert message in run.log(task_id)
    assert emulator.request_count == 0, "no bad input reached the API"
    assert bucket.keys() == [], "and nothing was written to S3"


@pytest.mark.parametrize(
    ("stream", "fault"),
    [(True, "stream_error"), (False, "stream_error"), (False, "image_internal_error")],
    ids=["stream-error-event", "json-internal-error-item", "json-set-stopped-by-internal-error"],
)
def test_a_set_that_broke_after_some_images_keeps_them_and_a_retry_pays_only_for_the_rest(
    emulator: TrackingEmulator, bucket: Bucket, stream: bool, fault: str
) -> None:
    """Issue 12: images delivered before the set broke are billed; they are stored, the rest recorded.

    The hook does not send the request again (3 attempts and 0 images kept before). Issue 20 (break
    10): the failure is the service's, not final, so a retry of the task reuses the kept images and
    asks for the 2 lost ones in a request of their own (before, it reused the record and failed again).
    """
    emulator.inject(Fault(fault, after=2))

    def the_task() -> JiMengGenerateOperator:
        return JiMengGenerateOperator(
            task_id="gen",
            prompt="a storyboard of a fox in four panels",
            sequential_image_generation="auto",
            max_images=4,
            stream=stream,
            s3_bucket=bucket.name,
        )

    operator = the_task()
    ti = RecordingTaskInstance()
    with pytest.raises(JiMengGenerationIncompleteError) as raised:
        operator.execute({"ti": ti})  # type: ignore[typeddict-item]

    assert emulator.request_count == 1, "a request that delivered billed images is not sent again"
    stored = [record["key"] for record in ti.pushed["images"]]
    assert len(stored) == 2
    assert set(stored) <= set(bucket.keys("jimeng/"))
    assert "InternalServiceError" in str(raised.value)
    assert ti.pushed["usage"]["generated_images"] == emulator.billed_images == 2

    retry = the_task()
    again = RecordingTaskInstance()
    retry.execute({"ti": again})  # type: ignore[typeddict-item]
    assert emulator.request_count == 2, "the retry asked for the 2 lost images only"
    assert emulator.billed_images == 4
    assert [record["key"] for record in again.pushed["images"]][:2] == stored
    assert len(again.pushed["images"]) == 4
