"""The "JiMeng images" extra link and the asset events a run emits."""

from __future__ import annotations

from urllib.parse import quote

from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS
from tests.dags import jimeng_test_assets, jimeng_test_generate
from tests.operators.conftest import Bucket, RunDag, TrackingEmulator, task_prefix

#: Airflow 3 evaluates extra links when the task finishes and stores them as XComs under this key.
LINK_KEY = "_link_JiMengImagesLink"


def test_stored_images_link_the_gallery_or_nothing_on_a_custom_s3_endpoint(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    # Airflow 3.1+: the task instance's gallery, which reads the images through the task's connection.
    # Airflow 3.0: the local S3 server is an endpoint_url in the aws connection: it has no console, and a
    # bare object URL of a private bucket answers 403, so no link beats a dead one (AWS cases: tests/links/).
    run = run_dag(jimeng_test_generate.dag, {"prompts": ["a red fox", "a blue whale"], "bucket": bucket.name})

    assert run.state == "success"
    assert run.xcom("gen")[0] == f"s3://{bucket.name}/{task_prefix(run)}/p0000_i00.jpeg"
    link = run.xcom("gen", LINK_KEY)
    if not AIRFLOW_V_3_1_PLUS:
        assert not link
        return
    # The task instance's Images tab in the UI (the plugin's external view), not the raw gallery app.
    assert link == f"/dags/{run.dag_id}/runs/{quote(run.run_id, safe='')}/tasks/gen/plugin/jimeng-images"


def test_link_points_at_the_first_image_url_without_storage(emulator: TrackingEmulator, run_dag: RunDag) -> None:
    run = run_dag(jimeng_test_generate.url_dag, {"prompts": ["a red fox", "a blue whale"]})

    assert run.state == "success"
    link = run.xcom("gen", LINK_KEY)
    assert link == run.xcom("gen")[0]
    assert link.startswith(f"{emulator.root_url}/tos/")


def test_asset_outlet_gets_an_event_with_the_prefix_and_image_count(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_assets.dag, {"bucket": bucket.name})

    assert run.state == "success"
    events = [event for event in run.asset_events() if event["task_id"] == "gen_asset"]
    assert len(events) == 1
    assert events[0]["name"] == jimeng_test_assets.IMAGES.name
    assert events[0]["uri"] == jimeng_test_assets.IMAGES.uri
    assert events[0]["extra"] == {"prefix": f"s3://{bucket.name}/{task_prefix(run, 'gen_asset')}/", "images": 1}


def test_asset_alias_outlet_resolves_to_an_asset_of_the_task_prefix(
    emulator: TrackingEmulator, bucket: Bucket, run_dag: RunDag
) -> None:
    run = run_dag(jimeng_test_assets.dag, {"bucket": bucket.name})

    events = [event for event in run.asset_events() if event["task_id"] == "gen_alias"]
    assert len(events) == 1
    prefix_uri = f"s3://{bucket.name}/{task_prefix(run, 'gen_alias')}/"
    assert events[0]["name"] == prefix_uri
    assert events[0]["uri"] == prefix_uri.rstrip("/"), "Airflow normalises s3:// URIs without the trailing slash"
    assert events[0]["aliases"] == [jimeng_test_assets.ALIAS.name]
    assert events[0]["extra"] == {"prefix": prefix_uri, "images": 1}
