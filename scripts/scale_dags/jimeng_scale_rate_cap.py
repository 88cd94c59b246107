"""
### The rate-cap run of `make scale` (not an example: scripts/scale.py copies it into its DAGs folder)

Four mapped instances in the `jimeng` pool, each with `PROMPTS_PER_TASK` prompts and 4 requests in
flight: together they ask for far more images a minute than the emulator's account cap, so only the
pool and the hook's pacing keep the run under it. Retries are quick, so a worker killed mid-run
costs the heartbeat timeout plus a few seconds.

**Params:** `bucket`, `prefix`.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

TASKS = 4
PROMPTS_PER_TASK = 36
SUBJECTS = ("a paper boat", "a brass telescope", "a glass teapot", "a wooden rocking horse")


@dag(
    dag_id="jimeng_scale_rate_cap",
    schedule=None,
    catchup=False,
    tags=["jimeng", "scale"],
    doc_md=__doc__,
    params={
        "bucket": Param("jimeng-images", type="string"),
        "prefix": Param("rate-cap", type="string"),
    },
    default_args={"retries": 3, "retry_delay": timedelta(seconds=5)},
)
def jimeng_scale_rate_cap() -> None:
    JiMengGenerateOperator.partial(
        task_id="generate",
        size="1K",
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="{{ params.prefix }}",
        pool="jimeng",
        max_concurrency=4,
        max_images_per_task=PROMPTS_PER_TASK,
    ).expand(
        prompt=[
            [f"{subject}, study {index}, pencil sketch" for index in range(PROMPTS_PER_TASK)]
            for subject in SUBJECTS[:TASKS]
        ]
    )


dag = jimeng_scale_rate_cap()
