"""Test DAG: one ``JiMengGenerateOperator`` task per kind of bad input; each must fail before any request.

``BAD_INPUT`` maps each task to a phrase its failure must contain, so the test reads as a table.
Rendering is native, so an upstream ``None`` reaches the operator as ``None`` (not ``"None"``).
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

BAD_INPUT: dict[str, str] = {
    "none_from_xcom": "prompt: rendered to None",
    "dict_prompt": "prompt: got a dict",
    "non_string_in_list": "prompt[1]: must be a string, got int",
    "whitespace_prompt": "prompt: must be a non-empty string",
    "empty_list": "prompt: is an empty list",
    "invalid_bucket": "s3_bucket: 'Not_A_Bucket' is not a valid bucket name",
    "bad_on_partial_failure": "on_partial_failure: 'sometimes' is not allowed",
    "zero_concurrency": "max_concurrency: 0 is not allowed",
    "template_error": "No filter named 'no_such_filter'",
}

with DAG(
    "jimeng_test_bad_input",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    params={
        "bucket": "bucket-set-by-the-test",
        "blank": "   ",
        "subject": "a cat",
    },
    render_template_as_native_obj=True,
    tags=["jimeng-test"],
) as dag:

    @task
    def nothing() -> None:
        return None

    @task
    def as_dict() -> dict[str, Any]:
        return {"prompt": "a cat", "size": "1K"}

    @task
    def mixed() -> list[Any]:
        return ["a cat", 42]

    common: dict[str, Any] = {"s3_bucket": "{{ params.bucket }}", "size": "1K"}
    nothing() >> JiMengGenerateOperator(
        task_id="none_from_xcom", prompt="{{ ti.xcom_pull(task_ids='nothing') }}", **common
    )
    JiMengGenerateOperator(task_id="dict_prompt", prompt=as_dict(), **common)
    JiMengGenerateOperator(task_id="non_string_in_list", prompt=mixed(), **common)
    JiMengGenerateOperator(task_id="whitespace_prompt", prompt="{{ params.blank }}", **common)
    JiMengGenerateOperator(task_id="empty_list", prompt=[], **common)
    JiMengGenerateOperator(task_id="invalid_bucket", prompt="a cat", s3_bucket="Not_A_Bucket", size="1K")
    JiMengGenerateOperator(task_id="bad_on_partial_failure", prompt="a cat", on_partial_failure="sometimes", **common)
    JiMengGenerateOperator(task_id="zero_concurrency", prompt="a cat", max_concurrency=0, **common)
    JiMengGenerateOperator(task_id="template_error", prompt="{{ params.subject | no_such_filter }}", **common)
