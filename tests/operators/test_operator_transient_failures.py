"""Images a set lost to a transient failure are asked for again by the retry (issue 20, break 10).

Regression: an ``InternalServiceError`` inside a set, or a stream that broke off, was written into the
prompt's record as final with the images that arrived; every retry reused that record and failed the
same way. The record now names the images to ask for again (``retry_images``): the retry reuses the
kept images (not paid again) and sends a request for the lost ones only, whose images fill the gaps.
"""

from __future__ import annotations

from typing import Any

import pytest

from airflow_provider_jimeng.emulator import Fault
from airflow_provider_jimeng.exceptions import JiMengGenerationIncompleteError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from tests.operators.conftest import Bucket, RecordingTaskInstance, TrackingEmulator

pytestmark = pytest.mark.timeout(60)

PROMPT = "a comic in 4 images"


def _two_tries(bucket: Bucket, **parameters: Any) -> tuple[RecordingTaskInstance, RecordingTaskInstance]:
    operator = JiMengGenerateOperator(
        task_id="gen",
        prompt=PROMPT,
        s3_bucket=bucket.name,
        sequential_image_generation="auto",
        max_images=4,
        **parameters,
    )
    first, second = RecordingTaskInstance(), RecordingTaskInstance()
    with pytest.raises(JiMengGenerationIncompleteError):
        operator.execute({"ti": first})  # type: ignore[typeddict-item]
    operator.execute({"ti": second})  # type: ignore[typeddict-item]
    return first, second


def _stored(bucket: Bucket, prompt: int) -> list[str]:
    return [key.rsplit("/", 1)[1] for key in bucket.images() if f"/p{prompt:04d}_" in key]


@pytest.mark.parametrize(
    ("fault", "stream"),
    [
        pytest.param(Fault("image_internal_error", after=2), False, id="internal-error-in-a-set"),
        pytest.param(Fault("stream_error", after=2), True, id="error-event-mid-stream"),
    ],
)
def test_a_set_that_stopped_on_a_service_error_is_completed_by_the_retry(
    emulator: TrackingEmulator, bucket: Bucket, fault: Fault, stream: bool
) -> None:
    emulator.inject(fault)
    first, second = _two_tries(bucket, stream=stream)

    assert len(first.pushed["images"]) == 2, "try 1 kept 2 images of the broken set"
    assert _stored(bucket, 0) == [f"p0000_i{index:02d}.jpeg" for index in range(4)]
    # Try 1 billed the 2 images delivered (the service stopped there), try 2 the 2 it asked for again.
    assert emulator.billed_images == 2 + 2
    assert [entry.images for entry in emulator.ledger if entry.prompt == PROMPT] == [2, 2]
    assert second.pushed["usage"]["this_try"]["generated_images"] == 2
    prefix = bucket.images()[0].rsplit("/", 1)[0]
    record = bucket.record(prefix, 0)
    assert [image["image_index"] for image in record["images"]] == [0, 1, 2, 3]
    assert (record["failures"], record["retry_images"]) == ([], [])


def test_a_broken_stream_is_completed_by_the_retry_without_paying_for_the_kept_images(
    emulator: TrackingEmulator, bucket: Bucket
) -> None:
    emulator.inject(Fault("truncated"))  # half the set streamed, then the stream ends early
    _first, second = _two_tries(bucket, stream=True)

    assert _stored(bucket, 0) == [f"p0000_i{index:02d}.jpeg" for index in range(4)]
    # The service finished (and billed) the broken set: its 2 undelivered images were paid for and lost.
    # The retry pays for those 2 again, never for the 2 kept.
    assert [entry.images for entry in emulator.ledger if entry.prompt == PROMPT] == [4, 2]
    assert second.pushed["usage"]["reused_prompts"] == 1


def test_moderation_inside_a_set_stays_final(emulator: TrackingEmulator, bucket: Bucket) -> None:
    """A refused image is no transient failure: the retry reuses the record, nothing is sent again."""
    operator = JiMengGenerateOperator(
        task_id="gen",
        prompt="a comic in 4 images FAIL_IMAGE_1",
        s3_bucket=bucket.name,
        sequential_image_generation="auto",
        max_images=4,
    )
    for _ in range(2):
        with pytest.raises(JiMengGenerationIncompleteError, match="OutputImageSensitiveContentDetected"):
            operator.execute({"ti": RecordingTaskInstance()})  # type: ignore[typeddict-item]
    assert emulator.request_count == 1
