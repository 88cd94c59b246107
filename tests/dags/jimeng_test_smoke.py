from __future__ import annotations

import datetime

from airflow.sdk import DAG, Param, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

with DAG(
    "jimeng_test_smoke",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1),
    params={"bucket": Param(None, type=["null", "string"]), "prompts": Param(["a"], type="array")},
) as dag:

    @task
    def prompts(params=None):
        return params["prompts"]

    gen = JiMengGenerateOperator(
        task_id="gen", prompt=prompts(), s3_bucket="{{ params.bucket }}", size="1K", max_concurrency=3,
        retries=1, retry_delay=datetime.timedelta(seconds=0),
    )
