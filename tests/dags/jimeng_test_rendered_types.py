"""Test DAGs: values of the wrong type after rendering, as text and natively; each task must fail at once.

``jimeng_test_rendered_text`` renders templates to text (Airflow's default): ``None`` becomes
``"None"``, a list ``"['a', 'b']"``, ``3.7`` ``"3.7"``. ``jimeng_test_rendered_native`` renders
natively, so upstream values arrive as objects. Every task has retries: a
``JiMengConfigurationError`` must fail it on the first try anyway, before any request.
``TEXT_TASKS``/``NATIVE_TASKS`` map each task to a phrase its log must contain.
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)
RETRIES: dict[str, Any] = {"retries": 2, "retry_delay": datetime.timedelta(0)}

TEXT_TASKS: dict[str, str] = {
    "prompt_list_as_text": "prompt: \"['a fox', 'a cat']\" is not a prompt",
    "seed_as_text": "seed: '3.7' is not an integer",
    "replace_none": "replace: 'None' is not allowed",
    "dry_run_none": "dry_run: 'None' is not allowed",
    "bucket_none": "s3_bucket: 'None' is not allowed",
    "extra_body_pairs": "extra_body: \"[['n', 2]]\" is not a JSON object",
}
NATIVE_TASKS: dict[str, str] = {
    "prompt_from_an_int": "prompt: got int 42",
    "extra_body_n_words": "extra_body.n: 'many' is not an integer",
    "seed_nan_text": "seed: 'nan' is not allowed",
}
#: The issue's repro: a mapped task whose key has neither {run_id} nor {map_index}.
MAPPED_TASK = "mapped_key"
MAPPED_MESSAGE = "s3_key: would give the same key"

with DAG(
    "jimeng_test_rendered_text",
    schedule=None,
    start_date=START,
    params={"nothing": None, "prompts": ["a fox", "a cat"], "seed": 3.7, "pairs": [["n", 2]]},
    render_template_as_native_obj=False,
    default_args=RETRIES,
    tags=["jimeng-test"],
) as text_dag:
    JiMengGenerateOperator(task_id="prompt_list_as_text", prompt="{{ params.prompts }}")
    JiMengGenerateOperator(task_id="seed_as_text", prompt="a fox", seed="{{ params.seed }}")
    JiMengGenerateOperator(task_id="replace_none", prompt="a fox", replace="{{ params.nothing }}")
    JiMengGenerateOperator(task_id="dry_run_none", prompt="a fox", dry_run="{{ params.nothing }}")
    JiMengGenerateOperator(task_id="bucket_none", prompt="a fox", s3_bucket="{{ params.nothing }}")
    JiMengGenerateOperator(task_id="extra_body_pairs", prompt="a fox", extra_body="{{ params.pairs }}")

with DAG(
    "jimeng_test_rendered_native",
    schedule=None,
    start_date=START,
    params={"bucket": "bucket-set-by-the-test", "seed": "nan"},
    render_template_as_native_obj=True,
    default_args=RETRIES,
    tags=["jimeng-test"],
) as native_dag:

    @task
    def an_int() -> int:
        return 42

    @task
    def words() -> dict[str, Any]:
        return {"n": "many"}

    JiMengGenerateOperator(task_id="prompt_from_an_int", prompt=an_int())
    JiMengGenerateOperator(task_id="extra_body_n_words", prompt="a fox", extra_body=words())
    JiMengGenerateOperator(task_id="seed_nan_text", prompt="a fox", seed="{{ params.seed }}")
    JiMengGenerateOperator.partial(
        task_id=MAPPED_TASK,
        s3_bucket="{{ params.bucket }}",
        s3_key="products/{{ ds }}/{prompt_index:03d}-{image_index}.{ext}",
    ).expand(prompt=["a fox", "a cat"])
