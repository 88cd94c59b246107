"""
### JiMeng: a person reviews the images before they are published (Airflow 3.1+)

Generated images for a catalogue are rarely published unseen. Here an editor chooses them inside
Airflow, in **Required actions** (or through the REST API), and only what they chose goes out.

1. **`build_prompts`** reads the first `products` entries of the catalogue (`data/products.json`).
2. **`generate_images`** (`JiMengGenerateOperator`) generates one image per product into
   `s3://<bucket>/<prefix>/...` (a retry never pays twice).
3. **`review_images`** (`JiMengReviewOperator`, on Airflow's human-in-the-loop operator) waits,
   without holding a worker slot, for a reviewer: each image is shown as a thumbnail (served by the
   provider's gallery, under the deployment's `[jimeng] gallery_storage` and Airflow's permissions)
   with its prompt and size; the reviewer ticks the ones to publish and may leave a note. Nobody
   within `REVIEW_DEADLINE`: nothing is approved. "Regenerate the chosen images" asks for another take
   of the ticked prompts instead.
4. **`publish_image`** is mapped over the approved images: each is copied to
   `s3://<bucket>/published/<run>/<file>`.
5. **`take_again`** generates another take of each prompt sent back, under
   `<prefix>/takes/take_2/...` (cleared and answered again, even differently, it reuses each take it stored).
6. **`record_decision`** writes `published/<run>/decision.json`: who decided, when, the note, what
   was published and what was not. The review is also shown in the generation task's **Images** tab.

**Params:** `bucket`, `prefix`, `size`, `products` (how many). **Reviewers:** the Airflow user ids in
`JIMENG_REVIEWERS` (comma-separated, where DAGs are parsed); unset, anyone allowed to act on the DAG.
**Connections:** `jimeng_default` (the API) and `aws_default` (S3).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.s3 import S3Hook
from airflow.sdk import Param, XComArg, dag, task

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.operators.review import JiMengReviewOperator

log = logging.getLogger(__name__)

CATALOGUE = Path(__file__).resolve().parent / "data" / "products.json"
#: Who may answer: Airflow user ids, here from ``JIMENG_REVIEWERS`` (comma-separated) where the DAG is
#: parsed; none: anyone Airflow lets act on the DAG's required actions.
REVIEWERS = [name.strip() for name in os.environ.get("JIMENG_REVIEWERS", "").split(",") if name.strip()] or None
#: After this, nobody's answer approves nothing (``on_timeout="approve_none"``): nothing goes out unseen.
REVIEW_DEADLINE = timedelta(hours=24)


def product_prompt(product: dict[str, str]) -> str:
    return (
        f"Studio product photograph of the {product['name']}, a {product['colour']} piece in "
        f"{product['material']}, {product['style']} style, seamless light background, no text"
    )


@dag(
    dag_id="jimeng_review_before_publishing",
    schedule=None,
    catchup=False,
    tags=["jimeng", "example", "s3", "review"],
    doc_md=__doc__,
    params={
        "bucket": Param("jimeng-images", type="string", description="S3 bucket for images and publications"),
        "prefix": Param("catalogue", type="string", description="key prefix of the generated images"),
        "size": Param("1K", type="string", description="1K, 2K, 4K or WxH"),
        "products": Param(4, type="integer", minimum=1, maximum=8, description="how many products to generate"),
    },
)
def jimeng_review_before_publishing() -> None:
    @task
    def build_prompts(params: dict[str, Any] | None = None) -> list[str]:
        products: list[dict[str, str]] = json.loads(CATALOGUE.read_text(encoding="utf-8"))
        return [product_prompt(product) for product in products[: int((params or {})["products"])]]

    generate = JiMengGenerateOperator(
        task_id="generate_images",
        prompt=build_prompts(),
        size="{{ params.size }}",
        watermark=False,
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="{{ params.prefix }}",
        max_images_per_task=8,
        retries=2,
    )

    review = JiMengReviewOperator(
        task_id="review_images",
        images_from=generate,
        subject="Catalogue images: choose the ones to publish",
        body="Each image is one product of the catalogue. Tick what may go to the shop.",
        respondents=REVIEWERS,
        response_timeout=REVIEW_DEADLINE,
        on_timeout="approve_none",
        rejected="keep",
        takes_prefix="{{ params.prefix }}/takes",
    )

    @task
    def publish_image(uri: str, run_id: str | None = None) -> str:
        """Copy one approved image to ``published/<run>/``; a retry copies it again (same key, same bytes)."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        target = f"published/{run_id}/{posixpath.basename(key)}"
        S3Hook(aws_conn_id="aws_default").copy_object(
            source_bucket_key=key, dest_bucket_key=target, source_bucket_name=bucket, dest_bucket_name=bucket
        )
        return f"s3://{bucket}/{target}"

    published = publish_image.expand(uri=review.output)

    @task
    def takes(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The review's requests for another take, as a return value Airflow can map over."""
        return requests

    JiMengGenerateOperator.partial(
        task_id="take_again", s3_bucket="{{ params.bucket }}", watermark=False, max_images_per_task=1
    ).expand_kwargs(takes(XComArg(review, key="regenerate")))

    @task(trigger_rule="none_failed")
    def record_decision(decision: dict[str, Any], run_id: str | None = None) -> str | None:
        """``published/<run>/decision.json``: who decided, when, the note, what was published and what was not."""
        reviewed = decision["approved"] + decision["rejected"]
        if not reviewed:
            return None
        bucket = reviewed[0]["uri"].removeprefix("s3://").partition("/")[0]
        key = f"published/{run_id}/decision.json"
        document = {
            **decision,
            "published": [
                f"s3://{bucket}/published/{run_id}/{posixpath.basename(c['key'])}" for c in decision["approved"]
            ],
        }
        S3Hook(aws_conn_id="aws_default").get_conn().put_object(
            Bucket=bucket, Key=key, Body=json.dumps(document, indent=2).encode(), ContentType="application/json"
        )
        log.info("Decision recorded at s3://%s/%s", bucket, key)
        return f"s3://{bucket}/{key}"

    record_decision(XComArg(review, key="review")).set_upstream(published)


dag = jimeng_review_before_publishing()
