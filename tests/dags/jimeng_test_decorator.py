"""Test DAG: ``@task.jimeng`` functions returning a prompt, a list of prompts and a dict of parameters."""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG, task

with DAG(
    "jimeng_test_decorator",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    params={"bucket": "bucket-set-by-the-test", "subject": "windmill"},
    tags=["jimeng-test"],
) as dag:

    @task
    def subject(params: dict[str, Any] | None = None) -> str:
        return f"a {(params or {})['subject']}"

    @task.jimeng(s3_bucket="{{ params.bucket }}", size="1K")
    def as_str(subject: str) -> str:
        return f"{subject} at sunrise"

    @task.jimeng(s3_bucket="{{ params.bucket }}", size="1K", max_concurrency=2)
    def as_list(subject: str) -> list[str]:
        return [f"{subject} in spring", f"{subject} in winter"]

    @task.jimeng(s3_bucket="{{ params.bucket }}")
    def as_dict(subject: str) -> dict[str, Any]:
        # Braces in returned prompts are data, never Jinja: they must reach the API unchanged.
        return {
            "prompt": f"{subject} {{{{ not a template }}}}",
            "size": "1280x720",
            "seed": 7,
            "model": "doubao-seedream-3-0-t2i-250415",
        }

    @task.jimeng(s3_bucket="{{ params.bucket }}", size="1K")
    def unknown_keys(subject: str) -> dict[str, Any]:
        return {"prompt": subject, "colour": "red", "n": 2}

    name = subject()
    as_str(name)
    as_list(name)
    as_dict(name)
    unknown_keys(name)
