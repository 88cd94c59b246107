"""The typed durable state and the one decision a retry makes per prompt, without Airflow or S3.

``resume_plan`` is pure: every path (reuse, finish storing, generate) is checked here in both
response formats. The regression of issue 11 item 1 lives here too: an entry of a ``b64_json``
answer has neither URL nor data in S3, and its images must count as stored, not as failed.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from airflow_provider_jimeng.api.response import GeneratedImage, GenerationResult, Usage
from airflow_provider_jimeng.storage.records import (
    JOURNAL_MAX_AGE_SECONDS,
    SCHEMA_VERSION,
    FailedImage,
    FinishStoring,
    Generate,
    JournaledImage,
    JournalEntry,
    PromptRecord,
    Reuse,
    StoredImage,
    TopUp,
    answer_from_stored_objects,
    answer_metadata,
    images_to_retry,
    newer,
    resume_plan,
)

NOW = 1_800_000_000.0


def key(image: int) -> str:
    return f"prefix/p0000_i{image:02d}.jpeg"


def entry(
    *, url: bool, data: bool = False, images: int = 2, written_at: float = NOW - 60, **kwargs: object
) -> JournalEntry:
    fields: dict[str, object] = {
        "prompt_index": 0,
        "fingerprint": "fp",
        "written_at": written_at,
        "request_id": "req-1",
        "model": "doubao-seedream-4-0-250828",
        "created": 1,
        "usage": {"generated_images": images},
        "images": tuple(
            JournaledImage(
                index=index,
                size="1024x1024",
                url=f"https://tos.example/{index}.jpeg?X-Tos-Signature=s" if url else None,
                b64_json="/9j/AAAA" if data else None,
            )
            for index in range(images)
        ),
    }
    fields.update(kwargs)
    return JournalEntry(**fields)  # type: ignore[arg-type]


def stored_image(index: int) -> StoredImage:
    return StoredImage(0, index, "1024x1024", "req-1", "m", "bucket", key(index), f"s3://bucket/{key(index)}", 10, None)


def record(*, images: int = 1, failures: tuple[str, ...] = (), fingerprint: str = "fp") -> PromptRecord:
    return PromptRecord(
        prompt_index=0,
        fingerprint=fingerprint,
        prompt="a fox",
        parameters={"size": "1K"},
        reference_images=0,
        model="m",
        created=1,
        request_id="req-1",
        usage={},
        images=tuple(stored_image(index) for index in range(images)),
        failures=failures,
    )


def plan(**kwargs: object) -> object:
    defaults: dict[str, object] = {
        "fingerprint": "fp",
        "record": None,
        "journal": None,
        "stored_keys": set(),
        "image_key": key,
        "now": NOW,
    }
    defaults.update(kwargs)
    return resume_plan(**defaults)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- the plan
def test_nothing_left_behind_generates() -> None:
    assert isinstance(plan(), Generate)


def test_a_record_of_the_same_request_is_reused() -> None:
    decided = plan(record=record(images=2))
    assert isinstance(decided, Reuse)
    assert [image.key for image in decided.record.images] == [key(0), key(1)]


def test_a_record_with_images_lost_to_a_transient_failure_is_topped_up() -> None:
    """Issue 20, break 10: such a record is not final; a record without kept images is generated again."""
    lost = dataclasses.replace(record(images=2), retry_images=(2, 3))
    assert isinstance(plan(record=lost), TopUp)
    assert PromptRecord.from_json(json.loads(json.dumps(lost.to_json()))) == lost
    assert isinstance(plan(record=dataclasses.replace(lost, images=(), failures=("lost",))), Generate)


@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        pytest.param([FailedImage(2, "InternalServiceError")], (2, 3), id="a-set-stopped-by-a-500"),
        pytest.param([FailedImage(2, "StreamInterrupted"), FailedImage(3, "StreamInterrupted")], (2, 3), id="broken"),
        pytest.param([FailedImage(2, "OutputImageSensitiveContentDetected")], (), id="moderation-is-final"),
    ],
)
def test_images_to_retry(failed: list[FailedImage], expected: tuple[int, ...]) -> None:
    answer = entry(url=True, images=2, failed=tuple(failed))
    assert images_to_retry(answer, 4) == expected


def test_a_record_of_another_request_is_not_reused() -> None:
    assert isinstance(plan(record=record(fingerprint="other")), Generate)


def test_a_record_that_kept_nothing_is_generated_again() -> None:
    decided = plan(record=record(images=0, failures=("prompt 0 image 0: OutputImageSensitiveContentDetected",)))
    assert isinstance(decided, Generate)
    assert "stored none" in decided.reason


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_a_journal_whose_images_are_all_stored_finishes_without_fetching(response_format: str) -> None:
    """Issue 11 item 1: in b64_json mode the S3 journal has no URL and no data; stored images are kept."""
    journal = entry(url=response_format == "url")
    decided = plan(journal=journal, stored_keys={key(0), key(1)})
    assert isinstance(decided, FinishStoring)
    assert [image.index for image in decided.stored] == [0, 1]
    assert decided.missing == ()


def test_a_url_journal_fetches_what_is_missing_while_its_urls_live() -> None:
    decided = plan(journal=entry(url=True), stored_keys={key(0)})
    assert isinstance(decided, FinishStoring)
    assert [image.index for image in decided.missing] == [1]


def test_an_expired_url_journal_with_missing_images_generates() -> None:
    journal = entry(url=True, written_at=NOW - JOURNAL_MAX_AGE_SECONDS - 1)
    decided = plan(journal=journal, stored_keys={key(0)})
    assert isinstance(decided, Generate)
    assert "no longer be fetched" in decided.reason


def test_an_expired_journal_still_vouches_for_what_it_stored() -> None:
    journal = entry(url=True, written_at=NOW - JOURNAL_MAX_AGE_SECONDS - 1)
    assert isinstance(plan(journal=journal, stored_keys={key(0), key(1)}), FinishStoring)


def test_a_b64_journal_without_data_and_a_missing_image_generates() -> None:
    assert isinstance(plan(journal=entry(url=False), stored_keys={key(0)}), Generate)


def test_a_local_b64_journal_with_data_finishes_the_missing_image() -> None:
    decided = plan(journal=entry(url=False, data=True), stored_keys={key(0)})
    assert isinstance(decided, FinishStoring)
    assert [image.index for image in decided.missing] == [1]
    assert decided.missing[0].b64_json


def test_a_journal_of_another_request_generates() -> None:
    assert isinstance(plan(journal=entry(url=True, fingerprint="other")), Generate)


def test_a_journal_of_a_set_keeps_its_failed_images() -> None:
    journal = entry(url=True, images=1, failed=(FailedImage(1, "OutputImageSensitiveContentDetected", "refused"),))
    decided = plan(journal=journal, stored_keys={key(0)})
    assert isinstance(decided, FinishStoring)
    assert decided.entry.failed[0].error_code == "OutputImageSensitiveContentDetected"


# --------------------------------------------------------------------------------- typed records
@pytest.mark.parametrize("with_data", [False, True])
def test_journal_entries_round_trip_and_keep_data_only_when_asked(with_data: bool) -> None:
    original = entry(url=False, data=True, failed=(FailedImage(2, "InternalServiceError", "boom"),))
    text = json.dumps(original.to_json(with_data=with_data))
    back = JournalEntry.from_json(json.loads(text), prompt_index=0)
    assert back is not None
    assert back.failed == original.failed
    assert back.holds_data is with_data
    assert ("/9j/" in text) is with_data


def test_a_journal_entry_from_a_result_holds_only_delivered_images() -> None:
    result = GenerationResult(
        model="m",
        created=1,
        images=[
            GeneratedImage(index=0, url="https://x/0.jpeg?sig=1", size="1024x1024"),
            GeneratedImage(index=1, error_code="OutputImageSensitiveContentDetected", error_message="no"),
        ],
        usage=Usage(generated_images=1),
        request_id="req",
    )
    made = JournalEntry.from_result(3, "fp", result, now=NOW)
    assert [image.index for image in made.images] == [0]
    assert [image.index for image in made.failed] == [1]
    assert "sig=1" not in repr(made), "signed URLs stay out of reprs"


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        {"schema": 99, "prompt_index": 0, "fingerprint": "fp", "images": []},
        {"schema": SCHEMA_VERSION, "prompt_index": "0", "fingerprint": "fp", "images": []},
        {"schema": SCHEMA_VERSION, "prompt_index": 0, "fingerprint": "fp", "images": [{"index": "0"}]},
        {"schema": SCHEMA_VERSION, "prompt_index": 0, "fingerprint": None, "images": []},
        {"schema": SCHEMA_VERSION, "prompt_index": 1, "fingerprint": "fp", "images": []},
    ],
)
def test_malformed_or_unknown_journal_entries_read_as_absent(data: object) -> None:
    assert JournalEntry.from_json(data, prompt_index=0) is None


def test_records_round_trip_and_malformed_ones_read_as_absent() -> None:
    original = record(images=2, failures=("prompt 0 image 2: ImageLost",))
    assert PromptRecord.from_json(json.loads(json.dumps(original.to_json()))) == original
    broken = original.to_json()
    broken["images"][0]["key"] = 5
    assert PromptRecord.from_json(broken) is None
    assert PromptRecord.from_json({**original.to_json(), "schema": 1}) is None


def test_the_newest_entry_wins_and_a_data_copy_beats_its_twin() -> None:
    older = entry(url=True, written_at=NOW - 100)
    newest = entry(url=True, written_at=NOW - 10, request_id="req-2")
    assert newer([older, newest]) is newest
    twin_without_data = entry(url=False, written_at=NOW)
    twin_with_data = entry(url=False, data=True, written_at=NOW - 5)
    assert newer([twin_without_data, twin_with_data]) is twin_with_data
    assert newer([twin_with_data, twin_without_data]) is twin_with_data


# ------------------------------------------------------------ images that outlived their journal
def _head(request_id: str, fingerprint: str, delivered: str, failed: str = "") -> dict[str, object]:
    return {
        "ContentLength": 10,
        "Metadata": {
            "jimeng-request-id": request_id,
            "jimeng-model": "m",
            "jimeng-size": "1024x1024",
            "jimeng-fingerprint": fingerprint,
            "jimeng-delivered": delivered,
            "jimeng-failed": failed,
        },
    }


def test_a_complete_answer_is_recognised_from_its_images_metadata() -> None:
    made = answer_metadata(
        "fp", entry(url=False, images=2, failed=(FailedImage(2, "OutputImageSensitiveContentDetected"),))
    )
    assert made == {
        "jimeng-fingerprint": "fp",
        "jimeng-delivered": "0,1",
        "jimeng-failed": "2:OutputImageSensitiveContentDetected",
    }
    heads = {index: _head("req-1", "fp", "0,1", "2:OutputImageSensitiveContentDetected") for index in (0, 1)}
    answer = answer_from_stored_objects("fp", heads)
    assert answer is not None
    assert answer.request_id == "req-1"
    assert [image.index for image in answer.images] == [0, 1]
    assert answer.failed[0].error_code == "OutputImageSensitiveContentDetected"


@pytest.mark.parametrize(
    "heads",
    [
        {0: _head("req-1", "fp", "0,1")},  # image 1 was never uploaded
        {0: _head("req-1", "other", "0"), 1: _head("req-1", "other", "0,1")},  # another request's images
        {0: {"ContentLength": 10, "Metadata": {"jimeng-request-id": "req-1"}}},  # an older provider's image
        {0: _head("req-1", "fp", "zero")},  # unreadable metadata
        {0: _head("req-1", "fp", "0,1"), 1: _head("req-2", "fp", "0,1")},  # two answers, neither complete
    ],
)
def test_anything_short_of_a_complete_answer_is_not_recognised(heads: dict[int, dict[str, object]]) -> None:
    assert answer_from_stored_objects("fp", heads) is None
