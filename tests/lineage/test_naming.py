"""Dataset names from URIs, per OpenLineage's naming conventions, for every backend alike."""

from __future__ import annotations

import pytest

from airflow_provider_jimeng.lineage import dataset_name, find_prompt_file, group_images
from airflow_provider_jimeng.storage.records import StoredImage


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/jimeng/dag/run/gen/", ("s3://bucket", "jimeng/dag/run/gen")),
        ("s3://bucket/jimeng/dag/run/gen/p0000_i00.jpeg", ("s3://bucket", "jimeng/dag/run/gen/p0000_i00.jpeg")),
        ("s3a://bucket/a/b/", ("s3://bucket", "a/b")),
        ("s3://aws_prod@bucket/a/b/", ("s3://bucket", "a/b")),  # ObjectStoragePath's connection id
        ("gs://bucket/images/run/", ("gs://bucket", "images/run")),
        ("gcs://bucket/images/run/", ("gs://bucket", "images/run")),
        (
            "abfss://images@account.dfs.core.windows.net/jimeng/run/",
            ("abfss://images@account.dfs.core.windows.net", "jimeng/run"),
        ),
        ("abfs://azure_default@images/jimeng/run/", ("abfs://images", "jimeng/run")),
        ("file:///data/jimeng/run/", ("file", "/data/jimeng/run")),
        ("file://host/data/jimeng/run/", ("file://host", "/data/jimeng/run")),
        ("/opt/airflow/dags/prompts/fox.txt", ("file", "/opt/airflow/dags/prompts/fox.txt")),
        ("s3://bucket/", ("s3://bucket", "/")),
    ],
)
def test_dataset_name_is_scheme_and_authority_then_path(uri: str, expected: tuple[str, str]) -> None:
    assert dataset_name(uri) == expected


def _image(uri: str, size: int | None = 10) -> StoredImage:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return StoredImage(0, 0, "2048x2048", "req", "seedream", bucket, key, uri, size, None)


def test_images_under_the_task_prefix_are_one_location_and_a_key_template_adds_its_folders() -> None:
    prefix = "s3://b/jimeng/d/r/gen/"
    locations = group_images(
        prefix,
        [_image(prefix + "p0000_i00.jpeg"), _image(prefix + "p0001_i00.jpeg"), _image("s3://b/custom/d/x.jpeg", None)],
    )
    assert [(location.uri, location.images, location.bytes) for location in locations] == [
        (prefix, 2, 20),
        ("s3://b/custom/d/", 1, None),  # a size not known is not summed as zero
    ]


def test_a_prompt_file_is_found_where_airflow_s_template_loader_looks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "fox.txt").write_text("a fox")
    assert find_prompt_file("fox.txt", [tmp_path, tmp_path / "templates"]) == str(tmp_path / "templates" / "fox.txt")
    assert find_prompt_file("missing.txt", [tmp_path]) is None
