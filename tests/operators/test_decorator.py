"""``@task.jimeng``: the function builds the prompt(s) or parameters; the task then runs as the operator."""

from __future__ import annotations

import io

from airflow.sdk import task
from PIL import Image

from airflow_provider_jimeng.decorators.jimeng import jimeng_task
from tests.dags import jimeng_test_decorator
from tests.operators.conftest import Bucket, RunDag, TrackingEmulator, task_prefix


def test_task_jimeng_is_registered_through_the_provider() -> None:
    assert task.jimeng is jimeng_task


def test_decorated_tasks_run_as_the_operator_and_refuse_unknown_parameters(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_decorator.dag, {"bucket": bucket.name, "subject": "windmill"})

    assert run.task_state("subject") == "success"
    sent = {str(request["body"]["prompt"]): request["body"] for request in emulator.requests}

    # A string: one prompt.
    assert run.task_state("as_str") == "success"
    prefix = task_prefix(run, "as_str")
    assert run.xcom("as_str") == [f"s3://{bucket.name}/{prefix}/p0000_i00.jpeg"]
    assert bucket.record(prefix, 0)["prompt"] == "a windmill at sunrise"
    assert run.xcom("as_str", "usage")["generated_images"] == 1

    # A list: one image per prompt, in order, same keys and XComs as the operator.
    assert run.task_state("as_list") == "success"
    prefix = task_prefix(run, "as_list")
    assert run.xcom("as_list") == [f"s3://{bucket.name}/{prefix}/p{index:04d}_i00.jpeg" for index in range(2)]
    assert [item["prompt_index"] for item in run.xcom("as_list", "images")] == [0, 1]
    assert [bucket.record(prefix, index)["prompt"] for index in range(2)] == [
        "a windmill in spring",
        "a windmill in winter",
    ]

    # A dict: operator parameters; the prompt's braces are data, not Jinja.
    assert run.task_state("as_dict") == "success"
    prompt = "a windmill {{ not a template }}"
    assert sent[prompt]["size"] == "1280x720"
    assert sent[prompt]["seed"] == 7
    key = f"{task_prefix(run, 'as_dict')}/p0000_i00.jpeg"
    assert run.xcom("as_dict") == [f"s3://{bucket.name}/{key}"]
    with Image.open(io.BytesIO(bucket.read(key))) as image:
        assert image.size == (1280, 720)

    assert emulator.billed_images == 4

    # A dict naming parameters the operator does not have: refused before any request.
    assert run.task_state("unknown_keys") == "failed"
    log = run.log("unknown_keys")
    assert "return value: the dict sets unknown parameter(s) ['colour', 'n']" in log
    assert "allowed: " in log
    # Every request the run sent came from the other decorated tasks.
    assert all("colour" not in str(request["body"]) for request in emulator.requests)
    assert emulator.request_count == 4
    assert bucket.keys(task_prefix(run, "unknown_keys")) == []
