"""e2e DAG: a review nobody answers; at its 20 s deadline the default outcome (approve all) publishes.

Loaded by the e2e stack next to the examples (tests/e2e/conftest.py), so that the deadline path runs
under a real scheduler: the images are generated, the review waits, the scheduler times it out, and
the publish task copies what the default approved.
"""

from __future__ import annotations

import datetime
import posixpath

from airflow.sdk import DAG, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.operators.review import JiMengReviewOperator

with DAG(
    "jimeng_e2e_review_deadline",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    params={"bucket": "jimeng-gallery-e2e"},
    tags=["jimeng-test"],
) as dag:
    generate = JiMengGenerateOperator(
        task_id="generate_images",
        prompt=["a brass compass on a map", "a paper boat on a pond"],
        size="1K",
        watermark=False,
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="deadline",
    )
    review = JiMengReviewOperator(
        task_id="review_images",
        images_from=generate,
        subject="Nobody answers this one",
        response_timeout=datetime.timedelta(seconds=20),
        on_timeout="approve_all",
    )

    @task
    def publish_image(uri: str, run_id: str | None = None) -> str:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        target = f"published/{run_id}/{posixpath.basename(key)}"
        S3Hook(aws_conn_id="aws_default").copy_object(
            source_bucket_key=key, dest_bucket_key=target, source_bucket_name=bucket, dest_bucket_name=bucket
        )
        return target

    publish_image.expand(uri=review.output)
