"""Test DAGs: ``JiMengGenerateOperator`` on the Visual API connection ``jimeng_visual``, one task retry.

One DAG per non-templated choice (``deferrable``, ``max_images_per_task``); ``params.bucket`` is where
the images (and the task-id journal) go. ``tests/operators/test_operator_visual_dag.py`` runs them.
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a teapot on a table"]


def _visual_dag(dag_id: str, **operator_kwargs: Any) -> DAG:
    with DAG(
        dag_id,
        schedule=None,
        start_date=START,
        params={"bucket": None},
        default_args={"retries": 1, "retry_delay": datetime.timedelta(0)},
        tags=["jimeng-test"],
    ) as dag:
        JiMengGenerateOperator(
            task_id="gen",
            jimeng_conn_id="jimeng_visual",
            prompt=PROMPTS,
            size="1024x1024",
            s3_bucket="{{ params.bucket }}",
            poll_interval=0.05,
            **operator_kwargs,
        )
    return dag


deferrable_dag = _visual_dag("jimeng_test_visual_deferrable", deferrable=True)
polled_dag = _visual_dag("jimeng_test_visual_polled", deferrable=False)
capped_dag = _visual_dag("jimeng_test_visual_capped", deferrable=True, max_images_per_task=3)
