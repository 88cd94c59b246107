"""Test DAGs: ``prompts`` (an upstream task returning ``params.prompts``) feeds one ``JiMengGenerateOperator``.

Every DAG here shares the same ``params`` so one file serves many tests; what ``params`` cannot
change (non-templated operator arguments such as ``replace`` or ``dry_run``) gets its own DAG.
Rendering is native. A DAG either asks for storage (``s3_bucket="{{ params.bucket }}"``: a bucket
that renders to ``None`` is then an error, never URLs in XCom) or does not (the ``url_*`` DAGs).
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
# Plain defaults rather than typed ``Param``s: every ``dag.test()`` serializes every DAG of the folder,
# and JSON-schema checks of typed params would make that several times slower for the whole suite.
PARAMS: dict[str, Any] = {
    "prompts": ["a red fox in the snow"],  # a prompt or a list of prompts
    "bucket": None,  # the DAGs that store need one
    "size": "1K",
    "s3_key": None,
    "s3_key_prefix": "jimeng",
    "image": None,  # reference image(s)
    "seed": None,
}


def _generate_dag(dag_id: str, *, storage: bool = True, **operator_kwargs: Any) -> DAG:
    with DAG(
        dag_id,
        schedule=None,
        start_date=START,
        params=PARAMS,
        render_template_as_native_obj=True,
        tags=["jimeng-test"],
    ) as dag:

        @task
        def prompts(params: dict[str, Any] | None = None) -> Any:
            return (params or {})["prompts"]

        generated = JiMengGenerateOperator(
            task_id="gen",
            prompt=prompts(),
            **({"s3_bucket": "{{ params.bucket }}"} if storage else {}),
            size="{{ params.size }}",
            s3_key="{{ params.s3_key }}",
            s3_key_prefix="{{ params.s3_key_prefix }}",
            image="{{ params.image }}",
            seed="{{ params.seed }}",
            **{"max_concurrency": 4, **operator_kwargs},
        )

        @task
        def count(outputs: list[str]) -> int:
            """A consumer: downstream tasks get small things only (URIs or URLs)."""
            return len(outputs)

        count(generated.output)
    return dag


dag = _generate_dag("jimeng_test_generate")
url_dag = _generate_dag("jimeng_test_generate_urls", storage=False)
url_retry_dag = _generate_dag(
    "jimeng_test_generate_urls_retry", storage=False, max_concurrency=1, retries=1, retry_delay=datetime.timedelta(0)
)
b64_url_dag = _generate_dag("jimeng_test_generate_b64_urls", storage=False, response_format="b64_json")
retry_dag = _generate_dag("jimeng_test_generate_retry", max_concurrency=1, retries=1, retry_delay=datetime.timedelta(0))
replace_dag = _generate_dag("jimeng_test_generate_replace", replace=True)
b64_dag = _generate_dag("jimeng_test_generate_b64", response_format="b64_json")
dry_run_dag = _generate_dag("jimeng_test_generate_dry_run", dry_run=True)
set_fail_dag = _generate_dag(
    "jimeng_test_generate_set_fail", sequential_image_generation="auto", max_images=3, on_partial_failure="fail"
)
set_continue_dag = _generate_dag(
    "jimeng_test_generate_set_continue",
    sequential_image_generation="auto",
    max_images=3,
    on_partial_failure="continue",
)
budget_dag = _generate_dag(
    "jimeng_test_generate_budget", sequential_image_generation="auto", max_images=4, max_images_per_task=10
)
