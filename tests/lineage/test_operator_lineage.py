"""The operator's OpenLineage methods, read the way the OpenLineage provider reads them.

Each test runs the operator for real (the emulator, moto's S3) and then asks the provider's own
``ExtractorManager`` for the task's lineage, as its listener does when the task instance finishes;
facets are compared in their serialised form (the provider's ``Serde``), which is what a lineage
backend receives.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.providers.openlineage.extractors.base import OperatorLineage
from airflow.providers.openlineage.extractors.manager import ExtractorManager
from airflow.sdk import DAG
from airflow.utils.state import TaskInstanceState
from openlineage.client.serde import Serde

from airflow_provider_jimeng.emulator import Fault
from airflow_provider_jimeng.exceptions import JiMengGenerationIncompleteError
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.storage.keys import safe_key_part
from tests.operators.conftest import Bucket, RecordingTaskInstance, TrackingEmulator

DAG_ID = "jimeng_lineage"
SCHEMA = "https://raw.githubusercontent.com/airflow-provider-jimeng/airflow-provider-jimeng/main/airflow_provider_jimeng/lineage/facets.json#/$defs/"


def _dag(**kwargs: Any) -> DAG:
    return DAG(DAG_ID, schedule=None, start_date=datetime(2025, 1, 1), **kwargs)


def _extract(operator: JiMengGenerateOperator, ti: RecordingTaskInstance, state: TaskInstanceState) -> OperatorLineage:
    """What the OpenLineage listener gets for this task instance in ``state``."""
    return ExtractorManager().extract_metadata(
        dagrun=SimpleNamespace(run_id=ti.run_id), task=operator, task_instance_state=state, task_instance=ti
    )


def _facet(facet: Any) -> dict[str, Any]:
    """A facet as emitted, minus ``_producer`` (the OpenLineage provider's own URI)."""
    data: dict[str, Any] = Serde.to_dict(facet)
    data.pop("_producer")
    return data


def _prefix(ti: RecordingTaskInstance) -> str:
    return f"jimeng/{safe_key_part(ti.dag_id)}/{safe_key_part(ti.run_id)}/{ti.task_id}"


def test_a_stored_run_emits_its_prefix_as_one_output_dataset_with_model_size_and_count(
    emulator: TrackingEmulator, bucket: Bucket
) -> None:
    with _dag():
        operator = JiMengGenerateOperator(
            task_id="gen", prompt=["a fox in snow", "a cat on a box"], s3_bucket=bucket.name
        )
    ti = RecordingTaskInstance(dag_id=DAG_ID)
    operator.execute({"ti": ti})  # type: ignore[typeddict-item]

    lineage = _extract(operator, ti, TaskInstanceState.SUCCESS)

    prefix = _prefix(ti)
    assert ti.pushed["storage"]["prefix"] == f"s3://{bucket.name}/{prefix}/", "the dataset is the storage XCom's prefix"
    assert lineage.inputs == [], "inline prompts are not datasets"
    (output,) = lineage.outputs
    assert (output.namespace, output.name) == (f"s3://{bucket.name}", prefix)
    images = bucket.images(prefix + "/")
    assert len(images) == 2
    image_bytes = sum(len(bucket.read(key)) for key in images)
    model = {record["model"] for record in ti.pushed["images"]}.pop()
    size = {record["size"] for record in ti.pushed["images"]}.pop()
    assert model
    assert size
    assert _facet(output.outputFacets["outputStatistics"]) == {
        "_schemaURL": "https://openlineage.io/spec/facets/1-0-2/OutputStatisticsOutputDatasetFacet.json#/$defs/OutputStatisticsOutputDatasetFacet",
        "fileCount": 2,
        "size": image_bytes,
    }
    assert _facet(output.outputFacets["jimeng_images"]) == {
        "_schemaURL": SCHEMA + "JiMengImagesOutputDatasetFacet",
        "imageCount": 2,
        "models": [model],
        "sizes": [size],
        "format": "jpeg",
        "records": f"s3://{bucket.name}/{prefix}/records.json",
    }
    assert _facet(lineage.run_facets["jimeng_generation"]) == {
        "_schemaURL": SCHEMA + "JiMengGenerationRunFacet",
        "models": [model],
        "sizes": [size],
        "promptSource": "text",
        "promptCount": 2,
        "imageCount": 2,
        "failedImageCount": 0,
        "billedImages": 2,
        "requests": 2,
        "storage": f"s3://{bucket.name}/{prefix}/",
    }
    # Per-run facts are output facets (what this run wrote), as OpenLineage's OutputDataset carries them.
    assert set(Serde.to_dict(output)["outputFacets"]) == {"outputStatistics", "jimeng_images"}


def test_without_storage_there_is_no_output_dataset_only_the_run_facet(emulator: TrackingEmulator) -> None:
    with _dag():
        operator = JiMengGenerateOperator(task_id="gen", prompt="a fox in snow")
    ti = RecordingTaskInstance(dag_id=DAG_ID)
    urls = operator.execute({"ti": ti})  # type: ignore[typeddict-item]
    assert len(urls) == 1
    assert urls[0].startswith("http")

    lineage = _extract(operator, ti, TaskInstanceState.SUCCESS)

    assert lineage.inputs == []
    assert lineage.outputs == [], "signed URLs that expire in 24 hours are not datasets"
    facet = _facet(lineage.run_facets["jimeng_generation"])
    assert "storage" not in facet, "no storage prefix (None is left out of the event)"
    assert (facet["imageCount"], facet["billedImages"]) == (1, 1)


def test_a_prompt_file_is_the_input_from_the_start_and_on_completion(
    emulator: TrackingEmulator, bucket: Bucket, tmp_path: Path
) -> None:
    (tmp_path / "fox.txt").write_text("a fox in {{ 'snow' }}")
    with _dag(template_searchpath=str(tmp_path)):
        operator = JiMengGenerateOperator(task_id="gen", prompt="fox.txt", s3_bucket=bucket.name)
    ti = RecordingTaskInstance(dag_id=DAG_ID)

    started = _extract(operator, ti, TaskInstanceState.RUNNING)
    operator.render_template_fields({"ti": ti})  # type: ignore[typeddict-item]
    assert operator.prompt == "a fox in snow", "Airflow read and rendered the file"
    operator.execute({"ti": ti})  # type: ignore[typeddict-item]
    completed = _extract(operator, ti, TaskInstanceState.SUCCESS)

    prompt_file = str((tmp_path / "fox.txt").resolve())
    for lineage in (started, completed):
        assert [(dataset.namespace, dataset.name) for dataset in lineage.inputs] == [("file", prompt_file)]
    assert started.outputs == [], "outputs are known once the images are stored"
    assert [dataset.name for dataset in completed.outputs] == [_prefix(ti)]
    assert _facet(completed.run_facets["jimeng_generation"])["promptSource"] == "file"


def test_an_upstream_xcom_prompt_is_recorded_as_the_source_not_as_a_dataset() -> None:
    from airflow.providers.standard.operators.empty import EmptyOperator

    with _dag():
        upstream = EmptyOperator(task_id="write_prompt")
        operator = JiMengGenerateOperator(task_id="gen", prompt=upstream.output)
    assert operator.prompt_source == "xcom"
    assert operator.get_openlineage_facets_on_start().inputs == []


def test_a_failed_try_still_reports_the_images_it_stored(emulator: TrackingEmulator, bucket: Bucket) -> None:
    """Stored images stay stored when the task fails: the FAIL event names them."""
    emulator.inject(Fault("image_internal_error", after=2))
    with _dag():
        operator = JiMengGenerateOperator(
            task_id="gen",
            prompt="a storyboard of a fox in four panels",
            sequential_image_generation="auto",
            max_images=4,
            s3_bucket=bucket.name,
        )
    ti = RecordingTaskInstance(dag_id=DAG_ID)
    with pytest.raises(JiMengGenerationIncompleteError):
        operator.execute({"ti": ti})  # type: ignore[typeddict-item]

    lineage = _extract(operator, ti, TaskInstanceState.FAILED)

    (output,) = lineage.outputs
    assert output.outputFacets["jimeng_images"].imageCount == 2
    facet = lineage.run_facets["jimeng_generation"]
    assert (facet.imageCount, facet.failedImageCount, facet.billedImages) == (2, 1, 2)


def test_a_key_template_outside_the_task_prefix_names_the_folder_it_wrote(
    emulator: TrackingEmulator, bucket: Bucket
) -> None:
    with _dag():
        operator = JiMengGenerateOperator(
            task_id="gen",
            prompt=["a fox", "a cat"],
            s3_bucket=bucket.name,
            s3_key="gallery/{dag_id}/{task_id}/{run_id}/{prompt_index}.{ext}",
        )
    ti = RecordingTaskInstance(dag_id=DAG_ID)
    operator.execute({"ti": ti})  # type: ignore[typeddict-item]

    lineage = _extract(operator, ti, TaskInstanceState.SUCCESS)

    counts = {dataset.name: dataset.outputFacets["jimeng_images"].imageCount for dataset in lineage.outputs}
    assert counts == {_prefix(ti): 0, f"gallery/{DAG_ID}/gen/{ti.run_id}": 2}, "published where s3_key says"


def test_a_file_destination_is_named_by_its_path(emulator: TrackingEmulator, tmp_path: Path) -> None:
    """``output_path`` backends are named from their URI like S3: ``file`` namespace, absolute path."""
    with _dag():
        operator = JiMengGenerateOperator(task_id="gen", prompt="a fox in snow", output_path=f"file://{tmp_path}")
    ti = RecordingTaskInstance(dag_id=DAG_ID)
    operator.execute({"ti": ti})  # type: ignore[typeddict-item]

    lineage = _extract(operator, ti, TaskInstanceState.SUCCESS)

    (output,) = lineage.outputs
    assert output.namespace == "file"
    assert output.name.startswith(str(tmp_path) + "/")
    assert output.name.endswith(f"/{safe_key_part(ti.run_id)}/{ti.task_id}")
    assert _facet(output.outputFacets["jimeng_images"])["imageCount"] == 1
