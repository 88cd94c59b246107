"""Counts across tries (issue 15, part 3): the ``usage`` XCom sums every try of the task instance.

Regression: ``usage`` reported the last try only, e.g. 0 rate-limit answers where the emulator had
counted 79 over the tries. Each try now leaves its counters where the next one reads them before its
first request (``records.json``, journal snapshots, fallbacks), and ``usage`` adds them up; its
``this_try`` holds the last try's own. The emulator's counters are the reference.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.storage.keys import TaskKeyspace
from tests.faults.conftest import FORMATS, RUN_AFTER, Pipeline, dag_for

pytestmark = pytest.mark.timeout(60)

RUN_ID = f"manual__{RUN_AFTER.isoformat()}"


def _tries(pipeline: Pipeline, dag_id: str) -> list[dict[str, Any]]:
    space = TaskKeyspace(pipeline.bucket, "jimeng", dag_id, RUN_ID, "generate", -1)
    records = json.loads(pipeline.s3.get_object(Bucket=pipeline.bucket, Key=space.records_key)["Body"].read())
    return list(records["tries"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_try_failed_on_429s_is_counted_by_its_retry(pipeline: Pipeline, emulator: JiMengEmulator, fmt: str) -> None:
    # One image a minute: one prompt of try 1 is answered, the two others get 429 on each of their
    # two attempts (max_retries=1) and fail the try. The retry runs with the limit lifted.
    emulator.images_per_minute = 1
    pipeline.before_retry(lambda: setattr(emulator, "images_per_minute", None))
    dag_id = dag_for(fmt)

    run = pipeline.run(dag_id, prompts=["a red fox", "a grey owl", "a brown bear"])

    assert run.state == "success", run.errors
    assert run.try_number == 2
    usage = run.xcom["usage"]
    assert emulator.rate_limited_count == 4
    assert usage["tries"] == 2
    assert usage["rate_limited"] == emulator.rate_limited_count
    assert usage["attempts"] == emulator.request_count == 7
    assert usage["generated_images"] == emulator.billed_images == 3
    assert usage["possibly_billed_images"] == 0
    assert usage["requests"] == 5  # three in try 1, the two failed prompts again in try 2
    assert usage["retries"] == 2
    assert usage["output_tokens"] == sum(entry.images for entry in emulator.ledger) * 1024 * 1024 // 256
    # The retry's own numbers: no 429, two requests, one prompt reused.
    this_try = usage["this_try"]
    assert (this_try["rate_limited"], this_try["requests"], this_try["generated_images"]) == (0, 2, 2)
    assert this_try["reused_prompts"] == usage["reused_prompts"] == 1
    # records.json keeps each try's counters, for an audit.
    tries = _tries(pipeline, dag_id)
    assert [doc["try_number"] for doc in tries] == [1, 2]
    assert all(doc["final"] for doc in tries)
    assert [doc["rate_limited"] for doc in tries] == [4, 0]


def test_a_try_that_finished_nothing_still_leaves_its_counts(pipeline: Pipeline, emulator: JiMengEmulator) -> None:
    """Try 1 gets only 429s (no answer, no journal, no record): its counts reach the retry all the same."""
    emulator.inject(Fault("rate_limit", times=4))

    run = pipeline.run(prompts=["a red fox", "a grey owl"])

    assert run.state == "success", run.errors
    assert run.try_number == 2
    usage = run.xcom["usage"]
    assert usage["tries"] == 2
    assert usage["rate_limited"] == 4
    assert usage["attempts"] == emulator.request_count == 6
    assert usage["generated_images"] == emulator.billed_images == 2
    assert usage["this_try"]["rate_limited"] == 0
    assert [doc["rate_limited"] for doc in _tries(pipeline, "faults_pipeline")] == [4, 0]
