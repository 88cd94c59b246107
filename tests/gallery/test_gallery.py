"""The "Images" gallery of a task instance, through Airflow's real API server app and its auth manager."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from airflow_provider_jimeng.plugins.gallery_store import parse_failure
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS
from tests.dags import faults_pipeline, jimeng_test_generate, jimeng_test_mapping
from tests.gallery.conftest import Gallery, StoredRun
from tests.gallery.roots import register_root

pytestmark = pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="the gallery needs Airflow 3.1 or later")

#: A set of three images whose image 1 fails moderation (the emulator's FAIL_IMAGE_<k>).
SET_PROMPT = "a comic strip in 3 images: a cat finds a box FAIL_IMAGE_1"


@pytest.fixture(scope="module")
def set_run(store_run: Any) -> StoredRun:
    return store_run(jimeng_test_generate.set_continue_dag, prompts=[SET_PROMPT, "a red fox in the snow"])


@pytest.fixture(scope="module")
def refused_run(store_run: Any) -> StoredRun:
    return store_run(jimeng_test_generate.set_continue_dag, prompts=["a red fox", "a FORBIDDEN fox"])


@pytest.fixture(scope="module")
def mapped_run(store_run: Any) -> StoredRun:
    return store_run(jimeng_test_mapping.dag, prompts=["a red fox", "a blue whale", "a green parrot"])


@pytest.fixture(scope="module")
def file_run(store_run: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[StoredRun, str]:
    folder = tmp_path_factory.mktemp("gallery-output")
    register_root(f"file://{folder}/", None)  # a file:// root is read only when the deployment lists it
    run = store_run(
        faults_pipeline.faults_pipeline_objstore, prompts=["a red fox", "a blue whale"], output_path=f"file://{folder}"
    )
    return run, str(folder)


def _ti(run: StoredRun, task_id: str = "gen", map_index: int | str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"dag_id": run.dag_id, "run_id": run.run_id, "task_id": task_id}
    if map_index is not None:
        params["map_index"] = map_index
    return params


def _image_links(html: str) -> list[str]:
    return [link.replace("&amp;", "&") for link in re.findall(r'<a href="(image\?[^"]+)"', html)]


# ------------------------------------------------------------------------------------- what it shows
def test_a_permitted_user_sees_every_stored_image_with_its_details(gallery: Gallery, set_run: StoredRun) -> None:
    images = set_run.xcom("gen", "images")
    page = gallery.get("gallery", **_ti(set_run, map_index="{MAP_INDEX}"))  # unmapped: the UI leaves it as is

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # no script may run at all
    html = page.text
    assert len(_image_links(html)) == len(images) == 5  # prompt 0: images 0 and 2 (1 failed); prompt 1: three
    for image in images:
        assert f"prompt {image['prompt_index']}, image {image['image_index']}" in html
        assert image["request_id"] in html
        assert image["model"] in html
        assert image["size"] in html
    assert "a comic strip in 3 images" in html
    assert "a red fox in the snow" in html
    assert "generated images" in html  # usage, per prompt and for the task


def test_a_failed_image_is_shown_with_its_error_code(gallery: Gallery, set_run: StoredRun) -> None:
    html = gallery.get("gallery", **_ti(set_run)).text

    assert re.findall(r'<figure class="failed" data-error-code="([^"]+)"', html) == [
        "OutputImageSensitiveContentDetected"
    ]
    assert "prompt 0, image 1" in html


def test_a_whole_prompt_refused_is_shown_with_its_code(gallery: Gallery, refused_run: StoredRun) -> None:
    # The refused prompt has no record: records.json keeps its failure beside the prompts (lineage counts it).
    html = gallery.get("gallery", **_ti(refused_run)).text

    assert re.findall(r'<figure class="failed" data-error-code="([^"]+)"', html) == [
        "InputTextSensitiveContentDetected"
    ]
    assert "prompt 1" in html
    assert len(_image_links(html)) == 3  # prompt 0's set of three


def test_each_image_is_streamed_from_storage_with_its_content_type(gallery: Gallery, set_run: StoredRun) -> None:
    images = set_run.xcom("gen", "images")
    links = _image_links(gallery.get("gallery", **_ti(set_run)).text)

    for number, (link, image) in enumerate(zip(links, images, strict=True)):
        assert link.startswith("image?")
        assert f"n={number}" in link
        answer = gallery.client.get(f"/jimeng/{link}", headers={"Authorization": f"Bearer {gallery.tokens['reader']}"})
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/jpeg"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert hashlib.sha256(answer.content).hexdigest() == image["sha256"]
        assert len(answer.content) == image["bytes"]


def test_the_page_tells_nothing_about_the_bucket_or_its_credentials(gallery: Gallery, set_run: StoredRun) -> None:
    html = gallery.get("gallery", **_ti(set_run)).text

    assert set_run.bucket not in html
    assert "s3://" not in html
    assert "127.0.0.1" not in html
    assert "amazonaws" not in html
    assert "testing" not in html  # the AWS connection's key id and secret
    assert "X-Amz" not in html
    assert "Signature" not in html
    assert "records.json" not in html
    assert "p0000_i00" not in html


def test_every_map_index_of_a_mapped_task_or_the_one_asked_for(gallery: Gallery, mapped_run: StoredRun) -> None:
    everything = gallery.get("gallery", **_ti(mapped_run)).text
    one = gallery.get("gallery", **_ti(mapped_run, map_index=1)).text

    assert re.findall(r'data-map-index="(-?\d+)"', everything) == ["0", "1", "2"]
    for prompt in ("a red fox", "a blue whale", "a green parrot"):
        assert prompt in everything
    assert re.findall(r'data-map-index="(-?\d+)"', one) == ["1"]
    assert "a blue whale" in one
    assert "a red fox" not in one
    [link] = _image_links(one)
    answer = gallery.client.get(f"/jimeng/{link}", headers={"Authorization": f"Bearer {gallery.tokens['reader']}"})
    assert answer.status_code == 200
    assert hashlib.sha256(answer.content).hexdigest() == mapped_run.xcom("gen", "images", 1)[0]["sha256"]


def test_a_listed_file_root_is_read(gallery: Gallery, file_run: tuple[StoredRun, str]) -> None:
    # output_path="file://...": the deployment lists that folder as a file:// root, so the gallery reads
    # records.json and the images from it (the storage XCom's connection id plays no part).
    run, folder = file_run
    assert run.xcom("generate", "storage")["prefix"].startswith("file://")
    images = run.xcom("generate", "images")
    html = gallery.get("gallery", **_ti(run, task_id="generate")).text

    assert "a red fox" in html  # the prompt comes from records.json
    assert "a blue whale" in html
    assert folder not in html
    links = _image_links(html)
    assert len(links) == len(images) == 2
    for link, image in zip(links, images, strict=True):
        answer = gallery.client.get(f"/jimeng/{link}", headers={"Authorization": f"Bearer {gallery.tokens['reader']}"})
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/jpeg"
        assert hashlib.sha256(answer.content).hexdigest() == image["sha256"]
    assert gallery.get("image", **_ti(run, task_id="generate", map_index=-1), n=2).status_code == 404


def test_a_task_that_stored_nothing_shows_an_empty_gallery(gallery: Gallery, set_run: StoredRun) -> None:
    page = gallery.get("gallery", **_ti(set_run, task_id="prompts"))  # a plain @task of the same run

    assert page.status_code == 200
    assert "has no JiMeng images" in page.text
    assert "<img" not in page.text


# ------------------------------------------------------------------------------------- who may see it
def test_a_refused_user_gets_neither_the_page_nor_the_images(gallery: Gallery, set_run: StoredRun) -> None:
    gallery.manager.checks.clear()
    page = gallery.get("gallery", user="outsider", **_ti(set_run))
    image = gallery.get("image", user="outsider", **_ti(set_run, map_index=-1), n=0)

    assert page.status_code == image.status_code == 403
    assert "comic strip" not in page.text
    assert page.headers["content-type"].startswith("text/html")  # the tab shows a sentence, not JSON
    assert "not allowed to see this task" in page.text
    assert image.headers["content-type"] == "application/json"
    # The same checks as Airflow's own task instance and XCom routes, for the DAG the request names.
    assert {
        (user, method, getattr(entity, "name", entity), dag) for user, method, entity, dag in gallery.manager.checks
    } == {("outsider", "GET", "TASK_INSTANCE", set_run.dag_id)}


def test_reading_the_task_instance_is_not_enough_its_xcoms_too(gallery: Gallery, set_run: StoredRun) -> None:
    # noxcom may read the DAG's task instances but not their XComs: the page shows XCom contents.
    gallery.manager.checks.clear()
    page = gallery.get("gallery", user="noxcom", **_ti(set_run))
    image = gallery.get("image", user="noxcom", **_ti(set_run, map_index=-1), n=0)

    assert page.status_code == image.status_code == 403
    assert "comic strip" not in page.text
    assert ("noxcom", "GET", "XCOM", set_run.dag_id) in {
        (user, method, getattr(entity, "name", entity), dag) for user, method, entity, dag in gallery.manager.checks
    }


def test_without_credentials_nothing_is_served(gallery: Gallery, set_run: StoredRun) -> None:
    assert gallery.get("gallery", user=None, **_ti(set_run)).status_code == 401
    assert gallery.get("image", user=None, **_ti(set_run, map_index=-1), n=0).status_code == 401


def test_the_permitted_user_is_checked_against_the_dag_too(gallery: Gallery, set_run: StoredRun) -> None:
    gallery.manager.checks.clear()
    assert gallery.get("image", **_ti(set_run, map_index=-1), n=0).status_code == 200
    assert [(user, getattr(entity, "name", entity), dag) for user, _, entity, dag in gallery.manager.checks] == [
        ("reader", "TASK_INSTANCE", set_run.dag_id),
        ("reader", "XCOM", set_run.dag_id),
    ]


# ------------------------------------------------------------------------------- nothing else is served
@pytest.mark.parametrize(
    ("map_index", "number"),
    [
        (-1, 5),  # one past the last image
        (-1, 99),
        (-1, -1),
        (0, 0),  # the task is not mapped
        (-1, "../records.json"),
        (-1, "..%2F..%2Frecords.json"),
        (-1, "0/../../records.json"),
        ("../..", 0),
        (-1, "1e0"),
        (-1, ""),
        (-1, "s3://bucket/key"),
    ],
)
def test_an_unknown_image_or_a_path_is_a_404(gallery: Gallery, set_run: StoredRun, map_index: Any, number: Any) -> None:
    answer = gallery.get("image", **_ti(set_run, map_index=map_index), n=number)

    assert answer.status_code == 404
    assert set_run.bucket not in answer.text


def test_a_key_in_the_request_is_ignored(gallery: Gallery, set_run: StoredRun) -> None:
    # Only the task instance and a number count: extra parameters naming objects change nothing.
    plain = gallery.get("image", **_ti(set_run, map_index=-1), n=1)
    tampered = gallery.get(
        "image", **_ti(set_run, map_index=-1), n=1, key="records.json", uri=f"s3://{set_run.bucket}/x", bucket="b"
    )

    assert plain.status_code == tampered.status_code == 200
    assert plain.content == tampered.content


def test_another_task_or_run_has_no_images(gallery: Gallery, set_run: StoredRun) -> None:
    assert gallery.get("image", **{**_ti(set_run, map_index=-1), "task_id": "count"}, n=0).status_code == 404
    assert gallery.get("image", **{**_ti(set_run, map_index=-1), "run_id": "manual__other"}, n=0).status_code == 404


def test_a_path_outside_the_gallery_is_not_found(gallery: Gallery, set_run: StoredRun) -> None:
    assert gallery.get("records.json", **_ti(set_run)).status_code == 404
    assert gallery.get("image/0", **_ti(set_run, map_index=-1)).status_code == 404


# ------------------------------------------------------------------------------------------ the parser
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "prompt 0 image 1: OutputImageSensitiveContentDetected (request id r-1): blocked",
            (0, 1, "OutputImageSensitiveContentDetected"),
        ),
        ("prompt 2 image 0: ImageLost (request id r-2): timed out", (2, 0, "ImageLost")),
        (
            "prompt 3: InputTextSensitiveContentDetected (request id n/a): refused",
            (3, None, "InputTextSensitiveContentDetected"),
        ),
        ("prompt 4: not sent (the run stopped)", (4, None, None)),
        ("something else", (None, None, None)),
    ],
)
def test_failures_are_read_with_their_code(text: str, expected: tuple[Any, ...]) -> None:
    failure = parse_failure(text)

    assert (failure.prompt_index, failure.image_index, failure.code) == expected
