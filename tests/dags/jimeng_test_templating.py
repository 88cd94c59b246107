"""Test DAG: prompts from Jinja ``xcom_pull``, from XComArgs (a string, a list) and from a ``.j2`` file."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

# Resolve the symlink the test DAGs folder holds, so the prompt file is found next to the real file.
HERE = Path(__file__).resolve().parent
PROMPT_FILE = "jimeng_test_prompt.j2"

with DAG(
    "jimeng_test_templating",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    params={
        "bucket": "bucket-set-by-the-test",
        "subject": "lighthouse",
        "style": "woodcut",
    },
    template_searchpath=[str(HERE)],
    tags=["jimeng-test"],
) as dag:

    @task
    def subject(params: dict[str, Any] | None = None) -> str:
        return f"a {(params or {})['subject']} at dusk"

    @task
    def subjects(params: dict[str, Any] | None = None) -> list[str]:
        name = (params or {})["subject"]
        return [f"a {name} at dawn", f"a {name} in a storm"]

    one = subject()
    common: dict[str, Any] = {"s3_bucket": "{{ params.bucket }}", "size": "1K"}
    one >> JiMengGenerateOperator(
        task_id="from_jinja", prompt="{{ ti.xcom_pull(task_ids='subject') }}, oil painting", **common
    )
    JiMengGenerateOperator(task_id="from_xcomarg_str", prompt=one, **common)
    JiMengGenerateOperator(task_id="from_xcomarg_list", prompt=subjects(), **common)
    JiMengGenerateOperator(task_id="from_file", prompt=PROMPT_FILE, **common)
