"""Every example DAG runs end to end with ``dag.test()`` against the emulator and an S3 server on loopback.

These are the tests a DAG author would write: run the DAG, then check what landed in S3 (objects,
pixel sizes, manifest, gallery) and what the emulator billed, which must equal what was stored.
"""

from __future__ import annotations

import hashlib
import html
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.emulator.pytest_plugin import make_jimeng_emulator  # noqa: F401  (a fixture)
from airflow_provider_jimeng.version_compat import AIRFLOW_V_3_1_PLUS
from tests.dag_runs import read_xcom, run_dag_test
from tests.hitl_runs import (
    AWAITS_INPUT_REASON,
    answer_as_the_api_does,
    dag_test_awaits_input,
    latest_run_id,
    run_with_reviewer,
)
from tests.visual_fixtures import no_resume_hold_off  # noqa: F401  (autouse: no worker supervisor here)

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "dags_examples"
EXAMPLE_FILES = sorted(path for path in EXAMPLES.glob("*.py") if not path.name.startswith("_"))
PRODUCTS = json.loads((EXAMPLES / "data" / "products.json").read_text(encoding="utf-8"))
ONE_K = (1024, 1024)


def dag_test(function: Any) -> Any:
    """Mark a whole-DAG test. One xdist worker runs them all: Airflow's start-up is paid once per worker."""
    for mark in (
        pytest.mark.integration,
        pytest.mark.xdist_group("example_dags"),
        pytest.mark.usefixtures("airflow_db"),
    ):
        function = mark(function)
    return function


# ------------------------------------------------------------------------------------------- helpers
def load_example(name: str) -> ModuleType:
    """Import an example from the DAGs folder (where dag.test() finds it), not from the repo path."""
    path = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name: str, **conf: Any) -> Any:
    dag = load_example(name).dag
    dag_run = run_dag_test(dag, run_conf=conf)
    failed = {f"{ti.task_id}[{ti.map_index}]": ti.state for ti in dag_run.get_task_instances() if ti.state != "success"}
    assert dag_run.state == "success", f"{name} ended {dag_run.state}; tasks not successful: {failed}"
    return dag_run


def xcom(dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    value = read_xcom(dag_run.dag_id, dag_run.run_id, task_id, key, map_index)
    assert value is not None, f"no XCom {key!r} for {task_id}[{map_index}]"
    return value


def gallery_asset_events(dag_run: Any) -> list[dict[str, Any]]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.name == "jimeng_product_gallery", AssetEvent.source_run_id == dag_run.run_id)
        ).all()
        return [dict(event.extra) for event in events]


def objects(s3_client: Any, bucket: str, suffix: str = "") -> dict[str, bytes]:
    keys = [item["Key"] for item in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys if key.endswith(suffix)}


def pixel_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


# ------------------------------------------------------------------------------------------ parsing
def test_every_example_parses_with_tags_and_docs() -> None:
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow < 3.1
        from airflow.models.dagbag import DagBag  # type: ignore[attr-defined,no-redef]

    bag = DagBag(dag_folder=str(EXAMPLES))
    expected = {
        "jimeng_hello",
        "jimeng_check_connection",
        "jimeng_content_pipeline",
        "jimeng_mapped_generation",
        "jimeng_reference_edit_and_sets",
        "jimeng_visual_deferrable",
        "jimeng_review_before_publishing",
    }
    if AIRFLOW_V_3_1_PLUS:
        assert bag.import_errors == {}
        assert {Path(dag.fileloc).name for dag in bag.dags.values()} == {path.name for path in EXAMPLE_FILES}
    else:  # the review needs human-in-the-loop: on 3.0 its DAG fails to parse, saying so
        ((path, error),) = bag.import_errors.items()
        assert Path(path).name == "jimeng_review_before_publishing.py"
        assert "needs Airflow 3.1 or later" in error
        expected.discard("jimeng_review_before_publishing")
    assert set(bag.dag_ids) == expected
    for dag in bag.dags.values():
        assert dag.tags, f"{dag.dag_id} has no tags"
        assert "jimeng" in dag.tags
        assert len((dag.doc_md or "").strip()) > 100, f"{dag.dag_id} has no doc_md"
        assert type(dag.timetable).__name__ == "NullTimetable", f"{dag.dag_id}: examples use schedule=None"
        if any(getattr(task, "s3_bucket", None) for task in dag.tasks):
            assert dag.params["bucket"], f"{dag.dag_id} stores images but has no bucket param"


def test_reference_image_is_small() -> None:
    reference = EXAMPLES / "data" / "reference_mug.png"
    assert reference.stat().st_size < 50 * 1024
    with Image.open(reference) as image:
        assert min(image.size) > 14


# ------------------------------------------------------------------------------------------ the DAGs
@dag_test
def test_check_connection_passes_for_a_good_key_and_fails_with_the_reason_for_a_refused_one(
    jimeng_conn: JiMengEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_jimeng.testing import jimeng_connection_json

    assert "accepted the API key" in xcom(run_example("jimeng_check_connection"), "check_connection")

    monkeypatch.setenv("AIRFLOW_CONN_JIMENG_OTHER", jimeng_connection_json(jimeng_conn.base_url, "sk-another-region"))
    dag_run = run_dag_test(load_example("jimeng_check_connection").dag, run_conf={"conn_id": "jimeng_other"})
    assert dag_run.state == "failed"
    (ti,) = dag_run.get_task_instances()
    assert ti.state == "failed"
    assert ti.try_number == 1, "a refused key is not retried"
    assert jimeng_conn.billed_images == 0


@dag_test
def test_hello(jimeng_conn: JiMengEmulator) -> None:
    dag_run = run_example("jimeng_hello", subject="a lighthouse keeper's cat")

    assert xcom(dag_run, "report") == 1
    assert jimeng_conn.billed_images == 1
    (request,) = [record for record in jimeng_conn.requests if record["body"]]
    # The prompt came from prompts/hello.j2, rendered with the run's params and date.
    prompt = request["body"]["prompt"]
    assert "a lighthouse keeper's cat" in prompt
    assert dag_run.run_after.strftime("%Y-%m-%d") in prompt
    assert "{{" not in prompt
    assert request["body"]["size"] == "1K"


@dag_test
def test_content_pipeline(jimeng_conn: JiMengEmulator, s3_bucket: str, s3_client: Any) -> None:
    dag_run = run_example("jimeng_content_pipeline", bucket=s3_bucket, prefix="shop", size="1K")

    stored = objects(s3_client, s3_bucket)
    images = {key: data for key, data in stored.items() if key.endswith(".jpeg")}
    assert len(images) == len(PRODUCTS) == 8
    assert jimeng_conn.billed_images == len(images)
    assert all(key.startswith("shop/jimeng_content_pipeline/") for key in stored)
    assert all(pixel_size(data) == ONE_K for data in images.values())

    (manifest_key,) = [key for key in stored if key.endswith("/manifest.json")]
    folder = manifest_key.rsplit("/", 1)[0]
    manifest = json.loads(stored[manifest_key])
    assert manifest["count"] == 8
    assert [entry["product"] for entry in manifest["images"]] == [product["name"] for product in PRODUCTS]
    for entry in manifest["images"]:
        data = images[f"{folder}/{entry['file']}"]
        assert entry["uri"] == f"s3://{s3_bucket}/{folder}/{entry['file']}"
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["size"] == "1024x1024"
        assert entry["request_id"]

    assert manifest["run_id"] == dag_run.run_id
    head = s3_client.head_object(Bucket=s3_bucket, Key=f"{folder}/index.html")
    assert head["ContentType"].startswith("text/html")

    gallery = stored[f"{folder}/index.html"].decode()
    for entry in manifest["images"]:
        assert f'src="{entry["file"]}"' in gallery  # relative: the folder works wherever it is copied
        assert html.escape(entry["product"]) in gallery
    assert "X-Tos" not in gallery
    assert "http://" not in gallery

    assert xcom(dag_run, "publish_gallery") == f"s3://{s3_bucket}/{folder}/index.html"
    usage = xcom(dag_run, "generate_images", key="usage")
    assert usage["generated_images"] == 8
    # Other DAGs can be scheduled on the gallery asset; its event says where this run's gallery is.
    assert gallery_asset_events(dag_run) == [
        {
            "gallery": f"s3://{s3_bucket}/{folder}/index.html",
            "manifest": f"s3://{s3_bucket}/{manifest_key}",
            "images": 8,
        }
    ]


@dag_test
def test_mapped_generation(jimeng_conn: JiMengEmulator, s3_bucket: str, s3_client: Any) -> None:
    dag_run = run_example("jimeng_mapped_generation", bucket=s3_bucket, size="1K")

    mapped = [ti for ti in dag_run.get_task_instances() if ti.task_id == "generate_scene"]
    assert sorted(ti.map_index for ti in mapped) == list(range(6))
    images = objects(s3_client, s3_bucket, ".jpeg")
    scenes = {key: data for key, data in images.items() if "/generate_scene/" in key}
    banners = {key: data for key, data in images.items() if "/generate_banners/" in key}
    # One output per prompt, each under its own map_<i>/ prefix.
    assert sorted(key.split("/generate_scene/")[1].split("/")[0] for key in scenes) == [f"map_{i}" for i in range(6)]
    for index in range(6):
        (uri,) = xcom(dag_run, "generate_scene", map_index=index)
        assert uri.startswith(f"s3://{s3_bucket}/mapped/")
        assert f"/map_{index}/" in uri
    assert all(pixel_size(data) == ONE_K for data in scenes.values())
    # @task.jimeng: the function's dict set prompts and size (no seed: Seedream 4.0 takes none).
    assert len(banners) == 3
    assert all(pixel_size(data) == (1280, 720) for data in banners.values())
    banners = [record["body"] for record in jimeng_conn.requests if "banner" in record["body"]["prompt"]]
    assert {body["size"] for body in banners} == {"1280x720"}
    assert not any("seed" in body for body in banners)

    assert xcom(dag_run, "summarize") == {"scenes": 6, "banners": 3}
    assert jimeng_conn.billed_images == len(images) == 9


@dag_test
def test_visual_deferrable_defers_and_stores_each_image_once(
    make_jimeng_emulator: Any,  # noqa: F811  (the fixture imported above)
    s3_bucket: str,
    s3_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.visual_fixtures import ACCESS_KEY_ID, SECRET, submits, visual_connection_json

    emulator = make_jimeng_emulator(access_key_id=ACCESS_KEY_ID, secret_access_key=SECRET)
    monkeypatch.setenv("AIRFLOW_CONN_JIMENG_VISUAL", visual_connection_json(emulator.root_url))
    dag_run = run_example("jimeng_visual_deferrable", bucket=s3_bucket, topics=["a paper boat", "a teapot"])

    uris = xcom(dag_run, "generate")
    assert len(uris) == 2
    images = objects(s3_client, s3_bucket, ".jpeg")
    assert sorted(f"s3://{s3_bucket}/{key}" for key in images) == sorted(uris)
    assert all(pixel_size(data) == (2048, 2048) for data in images.values())
    journals = objects(s3_client, s3_bucket, "_visual/tasks.json")
    (journal,) = journals.values()
    assert len(json.loads(journal)["tasks"]) == 2, "every task id was journaled before deferring"
    assert submits(emulator) == 2
    assert emulator.billed_images == 2
    assert xcom(dag_run, "report") == 2


@dag_test
def test_reference_edit_and_sets(jimeng_conn: JiMengEmulator, s3_bucket: str, s3_client: Any) -> None:
    dag_run = run_example("jimeng_reference_edit_and_sets", bucket=s3_bucket, size="1K")

    images = objects(s3_client, s3_bucket, ".jpeg")
    edited = [key for key in images if "/edit_reference/" in key]
    frames = [key for key in images if "/storyboard_set/" in key]
    assert len(edited) == 1
    assert 1 <= len(frames) <= 4  # the model picks the set's size, capped by max_images
    assert all(pixel_size(data) == ONE_K for data in images.values())
    assert jimeng_conn.billed_images == len(images)

    bodies = [record["body"] for record in jimeng_conn.requests if record["body"]]
    (edit_body,) = [body for body in bodies if body["prompt"].startswith("Turn this")]
    (set_body,) = [body for body in bodies if body["prompt"].startswith("A storyboard")]
    assert "image" in edit_body  # the reference image went inline (shown redacted by the emulator)
    assert set_body["sequential_image_generation"] == "auto"
    assert set_body["sequential_image_generation_options"] == {"max_images": 4}
    report = xcom(dag_run, "report")
    assert report == {"edited": 1, "frames": len(frames), "set_billed": len(frames)}


# ---------------------------------------------------------------------------------------- make demo
def _run_demo(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``scripts/demo.py`` as ``make demo`` runs it, in a shell with no Airflow or JiMeng settings; it must succeed."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AIRFLOW", "JIMENG_"))}
    finished = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "demo.py"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_demo_script_writes_a_gallery(tmp_path: Path) -> None:
    output = tmp_path / "out"
    finished = _run_demo(tmp_path, "--output", str(output))
    assert "offline emulator" in finished.stdout
    assert "[info" not in finished.stdout + finished.stderr  # Airflow's logs went to the log file
    assert (output / "index.html").is_file()
    manifest = json.loads((output / "manifest.json").read_text())
    assert len(list(output.glob("*.jpeg"))) == manifest["count"] == len(PRODUCTS)
    gallery = (output / "index.html").read_text()
    assert all((output / entry["file"]).is_file() and entry["file"] in gallery for entry in manifest["images"])


@dag_test
@pytest.mark.skipif(not AIRFLOW_V_3_1_PLUS, reason="human-in-the-loop operators need Airflow 3.1 or later")
@pytest.mark.skipif(AIRFLOW_V_3_1_PLUS and not dag_test_awaits_input(), reason=AWAITS_INPUT_REASON)
def test_review_before_publishing_publishes_exactly_what_the_reviewer_chose(
    jimeng_conn: JiMengEmulator, s3_bucket: str, s3_client: Any
) -> None:
    dag_id = "jimeng_review_before_publishing"

    def reviewer(waiting: Any) -> None:
        waiting.wait_for({"review_images"})
        # The editor ticks images #2 and #4 (as PATCH .../hitlDetails records it).
        answer_as_the_api_does(dag_id, latest_run_id(dag_id), "review_images", lambda o: [o[1], o[3]])

    dag = load_example(dag_id).dag
    dag_run = run_with_reviewer(dag, reviewer, run_conf={"bucket": s3_bucket, "prefix": "shop", "products": 4})
    assert dag_run.state == "success"
    assert jimeng_conn.billed_images == 4  # no take was asked for: nothing more was paid

    generated = xcom(dag_run, "generate_images")
    assert xcom(dag_run, "review_images") == [generated[1], generated[3]]
    stored = objects(s3_client, s3_bucket)
    published = sorted(key for key in stored if key.startswith(f"published/{dag_run.run_id}/"))
    assert published == sorted(
        [f"published/{dag_run.run_id}/{uri.rsplit('/', 1)[-1]}" for uri in (generated[1], generated[3])]
        + [f"published/{dag_run.run_id}/decision.json"]
    )
    decision = json.loads(stored[f"published/{dag_run.run_id}/decision.json"])
    assert decision["decided_by"] == {"id": "editor", "name": "editor"}
    assert [choice["uri"] for choice in decision["approved"]] == [generated[1], generated[3]]
    assert len(decision["rejected"]) == 2
    assert len(decision["published"]) == 2
    assert all(key in stored for key in (uri.split("/", 3)[3] for uri in generated))  # rejected: kept


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_demo_script_runs_the_visual_api_example_offline(tmp_path: Path) -> None:
    """``make demo API=visual``: the deferrable Visual API example on the offline emulator, images copied out."""
    output = tmp_path / "out"
    finished = _run_demo(tmp_path, "--api", "visual", "--output", str(output))
    assert "jimeng_visual_deferrable against the offline emulator" in finished.stdout
    assert "Visual API, deferrable" in finished.stdout
    assert "[info" not in finished.stdout + finished.stderr  # Airflow's logs went to the log file
    images = sorted(output.glob("*.jpeg"))
    assert len(images) == 2  # one per topic of the example's default params, billed once each
    assert "billed 2" in finished.stdout
    assert all(image.read_bytes()[:3] == b"\xff\xd8\xff" for image in images)
