"""Test DAG: a signed reference-image URL through a template, and through ``@task.jimeng``'s returned dict."""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

SIGNED = (
    "https://ark-content.tos-cn-beijing.volces.com/ref/fox.png"
    "?X-Tos-Algorithm=TOS4-HMAC-SHA256&X-Tos-Credential=AKLT-canary%2F20250101&X-Tos-Signature=canary0123456789"
)

with DAG(
    "jimeng_test_rendered_secrets",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    params={"reference": SIGNED},
    tags=["jimeng-test"],
) as dag:
    JiMengGenerateOperator(
        task_id="templated",
        prompt="a fox like the one in {{ params.reference }}",
        image="{{ params.reference }}",
        extra_body={"callback": "socks5h://user:canary-password@proxy.example:1080"},
    )

    @task.jimeng()
    def returned(params: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"prompt": "a fox", "image": [(params or {})["reference"]]}

    returned()
