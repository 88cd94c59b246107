"""Test DAG: one mapped ``JiMengGenerateOperator`` instance per prompt, and a consumer of all of them."""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

with DAG(
    "jimeng_test_mapping",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    params={
        "bucket": "bucket-set-by-the-test",
        "prompts": ["a red fox", "a blue whale", "a green parrot"],
    },
    tags=["jimeng-test"],
) as dag:

    @task
    def prompts(params: dict[str, Any] | None = None) -> list[str]:
        return list((params or {})["prompts"])

    generated = JiMengGenerateOperator.partial(
        task_id="gen", s3_bucket="{{ params.bucket }}", size="1K", max_concurrency=2
    ).expand(prompt=prompts())

    @task
    def collect(outputs: Iterable[list[str]]) -> list[str]:
        return [uri for per_prompt in outputs for uri in per_prompt]

    collect(generated.output)
