"""Issue 20 breaks 1, 2 and 9: custom keys are publications of canonical images, and replace=True is once per run.

Each test calls ``execute()`` of real operators (the emulator, moto's S3) with a recorded task
instance, as several task instances of one run would: what is proved is what the billing ledger and
the bucket hold afterwards.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG

from airflow_provider_jimeng.emulator import Fault
from airflow_provider_jimeng.exceptions import JiMengConfigurationError, JiMengError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.storage.keys import safe_key_part
from tests.operators.conftest import Bucket, RecordingTaskInstance, TrackingEmulator

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a paper boat on a pond"]


def _operator(task_id: str, bucket: Bucket, **kwargs: Any) -> JiMengGenerateOperator:
    with DAG("jimeng_publications", schedule=None, start_date=datetime(2025, 1, 1)):
        return JiMengGenerateOperator(task_id=task_id, s3_bucket=bucket.name, max_concurrency=1, **kwargs)


def _prefix(ti: RecordingTaskInstance) -> str:
    mapped = f"/map_{ti.map_index}" if ti.map_index >= 0 else ""
    return f"jimeng/{safe_key_part(ti.dag_id)}/{safe_key_part(ti.run_id)}/{ti.task_id}{mapped}"


def _request_id(bucket: Bucket, key: str) -> str:
    return str(bucket.head(key)["Metadata"]["jimeng-request-id"])


TAIL = "{dag_id}/{run_id}/{prompt_index}-{image_index}.{ext}"


@pytest.mark.parametrize(
    ("task_ids", "map_indexes", "templates"),
    [
        # Two tasks of one DAG: both templates name {task_id}, yet "x" + "_y" is "x_y".
        (("x", "x_y"), (-1, -1), ("pub/{task_id}_y/" + TAIL, "pub/{task_id}/" + TAIL)),
        # expand_kwargs entries with different templates: map index 0 + "1" is "0" + map index 1.
        (("gen", "gen"), (0, 1), ("pub/{task_id}/{map_index}1/" + TAIL, "pub/{task_id}/0{map_index}/" + TAIL)),
    ],
    ids=["two-tasks", "expand_kwargs"],
)
def test_two_task_instances_publishing_to_one_key_keep_both_canonical_images(
    emulator: TrackingEmulator,
    bucket: Bucket,
    task_ids: tuple[str, str],
    map_indexes: tuple[int, int],
    templates: tuple[str, str],
) -> None:
    """Break 1: two task instances whose templates pass the proof and still render one key.

    Before: the second's images overwrote the first's, its ``images`` XCom named objects whose sha256
    no longer matched, and both runs were green. Now each canonical copy is its own task instance's,
    the first publication stays, and the second is refused and reported (nothing lost, nothing paid again).
    """
    first_ti, second_ti = RecordingTaskInstance(task_id=task_ids[0]), RecordingTaskInstance(task_id=task_ids[1])
    first_ti.map_index, second_ti.map_index = map_indexes
    first = _operator(task_ids[0], bucket, prompt=PROMPTS[:2], s3_key=templates[0])
    second = _operator(task_ids[1], bucket, prompt=PROMPTS[1:], s3_key=templates[1])

    first.execute({"ti": first_ti})  # type: ignore[typeddict-item]
    with pytest.raises(JiMengError, match=r"not published to .* another task instance's image"):
        second.execute({"ti": second_ti})  # type: ignore[typeddict-item]

    assert emulator.billed_images == 4
    for ti in (first_ti, second_ti):
        images = ti.pushed["images"]
        assert len(images) == 2
        for image in images:
            assert image["key"].startswith(_prefix(ti) + "/"), "the canonical copy is in the task's keyspace"
            assert hashlib.sha256(bucket.read(image["key"])).hexdigest() == image["sha256"]
    published = [image["published_key"] for image in first_ti.pushed["images"]]
    assert [_request_id(bucket, key) for key in published] == [
        image["request_id"] for image in first_ti.pushed["images"]
    ], "the first task's publications were not overwritten"
    assert [image["published_key"] for image in second_ti.pushed["images"]] == [None, None]

    # A retry of the refused task pays for nothing and leaves the first task's publications alone.
    with pytest.raises(JiMengError, match="not published"):
        second.execute({"ti": second_ti})  # type: ignore[typeddict-item]
    assert emulator.billed_images == 4
    assert [_request_id(bucket, key) for key in published] == [
        image["request_id"] for image in first_ti.pushed["images"]
    ]


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_a_custom_key_is_recovered_after_a_kill_before_the_journal(
    emulator: TrackingEmulator, bucket: Bucket, response_format: str
) -> None:
    """Break 2: a try killed after uploading its images, before its journal or records reached S3.

    Simulated by deleting them after a try (and the publications it had made). Before: the retry
    found no custom key a journal named and paid for every prompt again. Now the canonical images
    vouch for their answers (their metadata) and the retry copies them to their custom keys.
    """
    ti = RecordingTaskInstance()
    template = "pub/{dag_id}/{task_id}/{run_id}/{prompt_index}-{image_index}.{ext}"
    operator = _operator("gen", bucket, prompt=PROMPTS, s3_key=template, response_format=response_format)
    operator.execute({"ti": ti})  # type: ignore[typeddict-item]
    published = [image["published_key"] for image in ti.pushed["images"]]
    request_ids = [_request_id(bucket, key) for key in published]
    prefix = _prefix(ti)
    bucket.client.delete_objects(
        Bucket=bucket.name,
        Delete={"Objects": [{"Key": key} for key in [f"{prefix}/records.json", *published]]},
    )
    assert emulator.billed_images == 3

    retry = RecordingTaskInstance()
    operator.execute({"ti": retry})  # type: ignore[typeddict-item]

    assert emulator.billed_images == 3, "nothing paid twice"
    assert [_request_id(bucket, key) for key in published] == request_ids, "publications re-made from the canonical"
    assert [image["published_key"] for image in retry.pushed["images"]] == published


def test_replace_is_once_per_run_not_once_per_try(emulator: TrackingEmulator, bucket: Bucket) -> None:
    """Break 9: try 1 (replace=True) stores prompts 0 and 2 and fails on prompt 1; Airflow retries it.

    Before: the retry replaced everything again (4 of 4 paid twice in the issue). Now the retry
    reuses what its own run of tries paid for and generates prompt 1 only; a cleared task (a new run
    of tries) replaces again.
    """
    operator = _operator("gen", bucket, prompt=PROMPTS, replace=True, retries=2)
    ti = RecordingTaskInstance()
    ti.try_number, ti.max_tries = 1, 2  # type: ignore[attr-defined]
    operator.execute({"ti": ti})  # type: ignore[typeddict-item]  # an earlier run of the task, replaced below
    assert emulator.billed_images == 3

    # Cleared: try 2 begins a new run of tries (max_tries = 1 + retries) and replaces; its prompt 1 fails.
    emulator.inject(Fault("slow", delay=0), Fault("server_error"))
    ti.try_number, ti.max_tries = 2, 3  # type: ignore[attr-defined]
    with pytest.raises(JiMengError):
        operator.execute({"ti": ti})  # type: ignore[typeddict-item]
    assert emulator.billed_images == 5, "the clear replaced prompts 0 and 2"
    replaced = [_request_id(bucket, f"{_prefix(ti)}/p{index:04d}_i00.jpeg") for index in (0, 2)]

    ti.try_number = 3  # type: ignore[attr-defined]  # Airflow's automatic retry of try 2
    operator.execute({"ti": ti})  # type: ignore[typeddict-item]

    assert emulator.billed_images == 6, "the retry generated prompt 1 only"
    assert emulator.prompts_billed()[-1] == PROMPTS[1]
    assert [_request_id(bucket, f"{_prefix(ti)}/p{index:04d}_i00.jpeg") for index in (0, 2)] == replaced
    assert ti.pushed["usage"]["reused_prompts"] == 2


def test_a_250_character_run_id_with_colons_is_stored_on_a_local_filesystem(
    emulator: TrackingEmulator, tmp_path: Path
) -> None:
    """Break 3: Airflow allows run ids of 250 characters; the default layout made a 261-byte directory
    name, so every try paid and then failed to store. Long ids are now cut with a digest."""
    ti = RecordingTaskInstance(run_id="manual__" + "2025-01-01T00:00:00+00:00:" * 9 + "x" * 8)
    with DAG("jimeng_publications", schedule=None, start_date=datetime(2025, 1, 1)):
        operator = JiMengGenerateOperator(task_id="gen", prompt=PROMPTS[:1], output_path=f"file://{tmp_path}")

    (uri,) = operator.execute({"ti": ti})  # type: ignore[typeddict-item]

    assert emulator.billed_images == 1
    path = Path(uri.removeprefix("file://"))
    assert path.is_file()
    assert max(len(part) for part in path.relative_to(tmp_path).parts) <= 200


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{dag_id}/{task_id}/{run_id}/" + "n" * 231 + "-{prompt_index}-{image_index}.{ext}", "at most 236 bytes"),
        ("{dag_id}/{task_id}/{run_id}/a\x00b/{prompt_index}-{image_index}.{ext}", "NUL"),
    ],
)
def test_a_local_publication_the_filesystem_would_refuse_is_refused_before_any_request(
    emulator: TrackingEmulator, tmp_path: Path, template: str, fragment: str
) -> None:
    """Break 3: a 240-byte name (255 with its temporary name's 19 more fails) or a NUL failed after payment."""
    with DAG("jimeng_publications", schedule=None, start_date=datetime(2025, 1, 1)):
        operator = JiMengGenerateOperator(
            task_id="gen", prompt=PROMPTS[:1], output_path=f"file://{tmp_path}", s3_key=template
        )

    with pytest.raises(JiMengConfigurationError) as raised:
        operator.execute({"ti": RecordingTaskInstance()})  # type: ignore[typeddict-item]

    assert raised.value.parameter == "s3_key"
    assert fragment in str(raised.value)
    assert emulator.request_count == 0
