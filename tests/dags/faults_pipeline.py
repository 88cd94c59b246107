"""DAGs for ``tests/faults`` and ``tests/security``: one JiMeng task each, driven by ``run_conf``.

Every DAG retries its task once at once (``retries=1, retry_delay=0``): ``dag.test()`` in Airflow 3.3
runs that retry itself. The callbacks record each failed try's exception (``dag.test()`` does not
return it) and run the test's ``BEFORE_RETRY`` hooks between the tries, so a test can repair what
it broke (restart S3, create the bucket) the way an operator would before the retry.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from airflow.sdk import DAG, Param

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

#: ``(callback kind, exception)`` for every failed try, in order.
CALLBACKS: list[tuple[str, BaseException | None]] = []
#: Called (in order) after a failed try and before its retry.
BEFORE_RETRY: list[Callable[[], None]] = []


def _on_retry(context: Any) -> None:
    CALLBACKS.append(("retry", context.get("exception")))
    for hook in BEFORE_RETRY:
        hook()


def _on_failure(context: Any) -> None:
    CALLBACKS.append(("failure", context.get("exception")))


def _pipeline(dag_id: str, *, objstore: bool = False, **operator_kwargs: Any) -> DAG:
    with DAG(
        dag_id,
        schedule=None,
        start_date=datetime.datetime(2024, 1, 1),
        catchup=False,
        render_template_as_native_obj=True,
        params={
            "bucket": Param("bucket", type="string"),
            "prompts": Param(["a red fox in the snow"], type="array"),
            "size": Param("1K", type="string"),
            "output_path": Param("file:///tmp/unused", type="string"),
        },
        default_args={
            "retries": 1,
            "retry_delay": datetime.timedelta(0),
            "on_retry_callback": _on_retry,
            "on_failure_callback": _on_failure,
        },
        tags=["tests", "faults"],
    ) as dag:
        JiMengGenerateOperator(
            task_id="generate",
            prompt="{{ params.prompts }}",
            **({"output_path": "{{ params.output_path }}"} if objstore else {"s3_bucket": "{{ params.bucket }}"}),
            size="{{ params.size }}",
            **operator_kwargs,
        )
    return dag


#: Up to two prompts in flight at once.
faults_pipeline = _pipeline("faults_pipeline", max_concurrency=2)
#: One prompt at a time, so a test can break S3 between two prompts.
faults_pipeline_serial = _pipeline("faults_pipeline_serial", max_concurrency=1)
#: Sets of up to three related images per prompt.
faults_pipeline_set = _pipeline("faults_pipeline_set", sequential_image_generation="auto", max_images=3)
#: Images delivered inline as base64 (no signed URL, so the S3 journal holds no image data), one at a time.
faults_pipeline_b64 = _pipeline("faults_pipeline_b64", response_format="b64_json", max_concurrency=1)
#: ``faults_pipeline`` in ``b64_json``: up to two prompts in flight.
faults_pipeline_concurrent_b64 = _pipeline(
    "faults_pipeline_concurrent_b64", response_format="b64_json", max_concurrency=2
)
#: ``faults_pipeline_set`` in ``b64_json``.
faults_pipeline_set_b64 = _pipeline(
    "faults_pipeline_set_b64", response_format="b64_json", sequential_image_generation="auto", max_images=3
)
#: Four prompts in flight (the kill loop's runs of 20 prompts), in both response formats.
faults_pipeline_wide = _pipeline("faults_pipeline_wide", max_concurrency=4)
faults_pipeline_wide_b64 = _pipeline("faults_pipeline_wide_b64", response_format="b64_json", max_concurrency=4)
#: Four in flight and a 3 s ``execution_timeout`` (Airflow raises AirflowTaskTimeout in the task's main thread).
faults_pipeline_timeout = _pipeline(
    "faults_pipeline_timeout", max_concurrency=4, execution_timeout=datetime.timedelta(seconds=3)
)
faults_pipeline_timeout_b64 = _pipeline(
    "faults_pipeline_timeout_b64",
    response_format="b64_json",
    max_concurrency=4,
    execution_timeout=datetime.timedelta(seconds=3),
)

#: The DAG of each variant in each response format, so that a test runs the same path in both.
VARIANTS: dict[str, dict[str, str]] = {
    "default": {"url": "faults_pipeline", "b64_json": "faults_pipeline_concurrent_b64"},
    "serial": {"url": "faults_pipeline_serial", "b64_json": "faults_pipeline_b64"},
    "set": {"url": "faults_pipeline_set", "b64_json": "faults_pipeline_set_b64"},
    "wide": {"url": "faults_pipeline_wide", "b64_json": "faults_pipeline_wide_b64"},
    "timeout": {"url": "faults_pipeline_timeout", "b64_json": "faults_pipeline_timeout_b64"},
}

#: The same DAGs storing through ``output_path`` (``ObjectStoragePath``: ``file://`` in the tests), by the S3 DAG's id.
OBJSTORE: dict[str, str] = {
    "faults_pipeline": "faults_pipeline_objstore",
    "faults_pipeline_concurrent_b64": "faults_pipeline_concurrent_b64_objstore",
    "faults_pipeline_serial": "faults_pipeline_serial_objstore",
    "faults_pipeline_b64": "faults_pipeline_b64_objstore",
    "faults_pipeline_wide": "faults_pipeline_wide_objstore",
    "faults_pipeline_wide_b64": "faults_pipeline_wide_b64_objstore",
}
faults_pipeline_objstore = _pipeline("faults_pipeline_objstore", objstore=True, max_concurrency=2)
faults_pipeline_concurrent_b64_objstore = _pipeline(
    "faults_pipeline_concurrent_b64_objstore", objstore=True, response_format="b64_json", max_concurrency=2
)
faults_pipeline_serial_objstore = _pipeline("faults_pipeline_serial_objstore", objstore=True, max_concurrency=1)
faults_pipeline_b64_objstore = _pipeline(
    "faults_pipeline_b64_objstore", objstore=True, response_format="b64_json", max_concurrency=1
)
faults_pipeline_wide_objstore = _pipeline("faults_pipeline_wide_objstore", objstore=True, max_concurrency=4)
faults_pipeline_wide_b64_objstore = _pipeline(
    "faults_pipeline_wide_b64_objstore", objstore=True, response_format="b64_json", max_concurrency=4
)
