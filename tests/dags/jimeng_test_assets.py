"""Test DAG: asset outlets on the operator, a plain ``Asset`` and an ``AssetAlias``."""

from __future__ import annotations

import datetime

from airflow.sdk import DAG, Asset, AssetAlias

from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator

IMAGES = Asset(name="jimeng_test_images", uri="s3://jimeng-test-assets/images/")
ALIAS = AssetAlias("jimeng_test_images_alias")

with DAG(
    "jimeng_test_assets",
    schedule=None,
    start_date=datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    params={
        "bucket": "bucket-set-by-the-test",
        "prompt": "a paper boat",
    },
    tags=["jimeng-test"],
) as dag:
    JiMengGenerateOperator(
        task_id="gen_asset", prompt="{{ params.prompt }}", s3_bucket="{{ params.bucket }}", size="1K", outlets=[IMAGES]
    )
    JiMengGenerateOperator(
        task_id="gen_alias", prompt="{{ params.prompt }}", s3_bucket="{{ params.bucket }}", size="1K", outlets=[ALIAS]
    )
