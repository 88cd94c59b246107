"""Where the "JiMeng images" link lands: the gallery on Airflow 3.1+; on 3.0 the S3 console folder on AWS
and nothing on other endpoints; the signed URL without storage.

The whole-DAG cases are in tests/operators/test_operator_links_and_assets.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from airflow_provider_jimeng.links import jimeng as links
from airflow_provider_jimeng.links.jimeng import (
    JiMengImagesLink,
    gallery_url,
    images_link,
    is_aws_endpoint,
    is_stored,
    s3_console_url,
)
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS

FIRST = "s3://my-images/jimeng/jimeng_hello/manual__2025-01-01T00_00_00_00_00/generate/p0000_i00.jpeg"
FOLDER = "jimeng/jimeng_hello/manual__2025-01-01T00_00_00_00_00/generate/"


def test_aws_storage_links_the_console_view_of_the_task_folder() -> None:
    link = images_link(FIRST, endpoint_url="https://s3.eu-west-1.amazonaws.com", region="eu-west-1")

    assert link == f"https://eu-west-1.console.aws.amazon.com/s3/buckets/my-images?prefix={FOLDER}"


def test_china_regions_link_the_china_console() -> None:
    link = images_link(
        FIRST, endpoint_url="https://s3.cn-north-1.amazonaws.com.cn", region="cn-north-1", partition="aws-cn"
    )

    assert link.startswith("https://cn-north-1.console.amazonaws.cn/s3/buckets/my-images?prefix=jimeng/")


@pytest.mark.parametrize(
    "endpoint_url", ["http://127.0.0.1:9000", "https://minio.example.com", "http://localhost:5000"]
)
def test_a_custom_endpoint_gets_no_link_rather_than_a_dead_one(endpoint_url: str) -> None:
    assert not is_aws_endpoint(endpoint_url)
    assert images_link(FIRST, endpoint_url=endpoint_url, region="us-east-1") == ""


def test_without_storage_the_link_is_the_first_signed_url() -> None:
    url = "https://ark-content.example.com/image.jpeg?X-Tos-Signature=abc"

    assert images_link(url, endpoint_url=None, region=None) == url


@pytest.mark.parametrize("first", [None, "", 42])
def test_no_output_no_link(first: Any) -> None:
    assert images_link(first, endpoint_url=None, region="eu-west-1") == ""


def test_a_top_level_key_links_the_bucket_and_prefixes_are_url_quoted() -> None:
    assert s3_console_url("s3://b/p0000_i00.jpeg", region="us-east-1") == (
        "https://us-east-1.console.aws.amazon.com/s3/buckets/b"
    )
    assert s3_console_url("s3://b/my images/x.jpeg", region=None) == (
        "https://console.aws.amazon.com/s3/buckets/b?prefix=my%20images/"
    )


def _operator(first: str | None, aws_conn_id: str) -> Any:
    return SimpleNamespace(images_link_target=first, aws_conn_id=aws_conn_id)


def test_the_link_reads_region_and_endpoint_from_the_aws_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_AWS_LINK_TEST", '{"conn_type": "aws", "extra": {"region_name": "eu-west-1"}}')
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    link = JiMengImagesLink().get_link(_operator(FIRST, "aws_link_test"), ti_key=None)  # type: ignore[arg-type]

    assert link == f"https://eu-west-1.console.aws.amazon.com/s3/buckets/my-images?prefix={FOLDER}"


def test_an_endpoint_url_in_the_aws_connection_means_no_link(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_LINK_TEST",
        '{"conn_type": "aws", "extra": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"}}',
    )

    assert JiMengImagesLink().get_link(_operator(FIRST, "aws_link_test"), ti_key=None) == ""  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ the gallery (3.1 and later)
TI_KEY = SimpleNamespace(
    dag_id="jimeng_hello", run_id="manual__2025-01-01T00:00:00+00:00", task_id="generate", map_index=2
)
#: The task instance's Images tab in the UI (mapped: its map index's page).
GALLERY = (
    "/dags/jimeng_hello/runs/manual__2025-01-01T00%3A00%3A00%2B00%3A00/tasks/generate/mapped/2/plugin/jimeng-images"
)


@pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="Airflow 3.0 has no plugin views: the link stays as it was")
@pytest.mark.parametrize("first", [FIRST, "gs://bucket/jimeng/x/p0000_i00.jpeg", "file:///data/jimeng/p0000_i00.jpeg"])
def test_stored_images_link_the_task_instances_gallery(first: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Whatever the storage (AWS, a custom endpoint, another backend): the gallery reads it server side.
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_LINK_TEST", '{"conn_type": "aws", "extra": {"endpoint_url": "http://127.0.0.1:9"}}'
    )
    monkeypatch.delenv("AIRFLOW__API__BASE_URL", raising=False)

    link = JiMengImagesLink().get_link(_operator(first, "aws_link_test"), ti_key=TI_KEY)  # type: ignore[arg-type]

    assert link == GALLERY


@pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="Airflow 3.0 has no plugin views: the link stays as it was")
def test_the_gallery_link_is_under_the_api_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/team-a/")

    link = JiMengImagesLink().get_link(_operator(FIRST, "aws_default"), ti_key=TI_KEY)  # type: ignore[arg-type]

    assert link == f"https://airflow.example.com/team-a{GALLERY}"


def test_without_storage_the_link_stays_the_signed_url_on_every_version() -> None:
    url = "https://ark-content.example.com/image.jpeg?X-Tos-Signature=abc"

    assert not is_stored(url)
    assert JiMengImagesLink().get_link(_operator(url, "aws_default"), ti_key=TI_KEY) == url  # type: ignore[arg-type]


def test_on_airflow_3_0_stored_images_keep_the_console_link(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(links, "AIRFLOW_V_3_1_PLUS", False)
    monkeypatch.setenv("AIRFLOW_CONN_AWS_LINK_TEST", '{"conn_type": "aws", "extra": {"region_name": "eu-west-1"}}')
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)

    link = JiMengImagesLink().get_link(_operator(FIRST, "aws_link_test"), ti_key=TI_KEY)  # type: ignore[arg-type]

    assert link == f"https://eu-west-1.console.aws.amazon.com/s3/buckets/my-images?prefix={FOLDER}"


def test_gallery_url_quotes_every_part() -> None:
    url = gallery_url("d&x=1", "r/../../x", "t#", -1)

    assert url == "/dags/d%26x%3D1/runs/r%2F..%2F..%2Fx/tasks/t%23/plugin/jimeng-images"  # not mapped: no /mapped/


def test_an_output_path_links_to_the_gcs_console_or_nowhere() -> None:
    """gs:// images open in the Cloud console; file:// and abfs:// paths are not browser URLs."""
    from airflow_provider_jimeng.links.jimeng import images_link

    assert images_link("gs://my-images/jimeng/d/r/t/p0000_i00.jpeg", endpoint_url=None, region=None) == (
        "https://console.cloud.google.com/storage/browser/my-images/jimeng/d/r/t"
    )
    assert images_link("file:///data/images/d/r/t/p0000_i00.jpeg", endpoint_url=None, region=None) == ""
    assert images_link("abfs://c/p/p0000_i00.jpeg", endpoint_url=None, region=None) == ""
