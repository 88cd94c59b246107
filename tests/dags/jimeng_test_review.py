"""Test DAG: reviews of generated images, each answered (or not) through Airflow's HITL REST API by the test.

``gen`` (four prompts) and ``gen_mapped`` (two map indexes) generate; each ``review_*`` task asks about
them in its own way; ``publish`` copies what ``review_multi`` approved, and ``regenerate`` takes again
what ``review_regen`` sent back.
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.sdk import DAG, XComArg, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.operators.review import JiMengReviewOperator

PROMPTS = ["a red sneaker", "a blue teapot", "a green lamp", "a yellow chair"]
MAPPED_PROMPTS = [["a small fox"], ["a tall giraffe", "a round owl"]]

with DAG(
    "jimeng_test_review",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    params={"bucket": "bucket-set-by-the-test"},
    tags=["jimeng-test"],
) as dag:
    gen = JiMengGenerateOperator(task_id="gen", prompt=PROMPTS, s3_bucket="{{ params.bucket }}", size="1K")
    gen_mapped = JiMengGenerateOperator.partial(
        task_id="gen_mapped", s3_bucket="{{ params.bucket }}", size="1K", max_concurrency=2
    ).expand(prompt=MAPPED_PROMPTS)

    review_multi = JiMengReviewOperator(
        task_id="review_multi",
        images_from=gen,
        respondents=["editor"],
        rejected="move",
        subject="Pick for the shop",
        on_timeout="approve_none",
    )
    review_empty = JiMengReviewOperator(task_id="review_empty", images_from="gen_mapped", rejected="tag")
    review_mind = JiMengReviewOperator(task_id="review_mind", images_from=gen, allow_regenerate=False)
    review_mapped = JiMengReviewOperator(task_id="review_mapped", images_from=gen_mapped)
    review_deadline = JiMengReviewOperator(
        task_id="review_deadline",
        images_from=gen,
        response_timeout=datetime.timedelta(milliseconds=1),
        on_timeout="approve_all",
        rejected="move",
    )
    review_regen = JiMengReviewOperator(task_id="review_regen", images_from=gen)
    review_empty.set_upstream(gen_mapped)

    @task
    def publish(uri: str, params: dict[str, Any] | None = None) -> str:
        """Copy one approved image under ``published/`` in its bucket."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        bucket, _, key = uri.removeprefix("s3://").partition("/")
        target = f"published/{key.rsplit('/', 3)[-3]}/{key.rsplit('/', 1)[-1]}"
        S3Hook().copy_object(
            source_bucket_key=key, dest_bucket_key=target, source_bucket_name=bucket, dest_bucket_name=bucket
        )
        return f"s3://{bucket}/{target}"

    publish.expand(uri=review_multi.output)

    @task
    def takes(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The review's requests for another take, as a return value Airflow can map over."""
        return requests

    JiMengGenerateOperator.partial(task_id="regenerate", s3_bucket="{{ params.bucket }}").expand_kwargs(
        takes(XComArg(review_regen, key="regenerate"))
    )
