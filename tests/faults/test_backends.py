"""The storage guarantees on every backend: S3 (``s3_bucket``) and ``file://`` through ``ObjectStoragePath``.

Each test runs the same scenario on both backends and in both response formats where that is cheap,
and compares the emulator's billing ledger with what the destination holds:

* a refused ``records.json`` write: the retry rebuilds the records from the journals, paying nothing;
* the task process killed after storing, before its records: the retry checks each image (S3's
  ``HEAD`` metadata; the ``file://`` store's sidecar) and sends nothing;
* a cleared successful run reuses everything, and no journal outlives a successful try;
* images that lost both their journal and their records vouch for their answer themselves.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.storage.keys import safe_key_part
from tests.faults.conftest import (
    FORMATS,
    RUN_AFTER,
    FileGate,
    FilePipeline,
    Pipeline,
    S3Pipeline,
    TaskProcesses,
    dag_for,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

RUN_ID = f"manual__{RUN_AFTER.isoformat()}"


def _prefix(dag_id: str) -> str:
    return f"jimeng/{safe_key_part(dag_id)}/{safe_key_part(RUN_ID)}/generate"


def _journals(pipeline: S3Pipeline | FilePipeline) -> list[str]:
    return [key for key in pipeline.objects() if "/_pending/" in key]


def _deny_records(pipeline: S3Pipeline | FilePipeline, request: pytest.FixtureRequest) -> Any:
    """Refuse writes of records.json from now on; returns what lets them through again."""
    if pipeline.backend == "s3":
        gate = request.getfixturevalue("gate")
    else:
        gate = FileGate(request.getfixturevalue("monkeypatch"))
    gate.mode = "deny_records"
    return gate


@pytest.mark.parametrize("fmt", FORMATS)
def test_records_refused_at_the_end_are_rebuilt_from_the_journals(
    any_pipeline: S3Pipeline | FilePipeline, emulator: JiMengEmulator, request: pytest.FixtureRequest, fmt: str
) -> None:
    pipeline = any_pipeline
    gate = _deny_records(pipeline, request)
    prompts = ["one", "two", "three"]
    after_try_1: dict[str, Any] = {}

    def repair() -> None:
        after_try_1.update(downloads=emulator.downloads, keys=pipeline.objects())
        gate.mode = "pass"

    pipeline.before_retry(repair)

    run = pipeline.run(dag_for(fmt), prompts=prompts)

    assert run.state == "success", run.errors
    assert run.try_number == 2
    (message,) = run.errors
    assert message.count("stored but not its record") == 3
    assert ("AccessDenied" if pipeline.backend == "s3" else "PermissionError") in message
    prefix = _prefix(pipeline.dag_id(dag_for(fmt)))
    assert [key for key in after_try_1["keys"] if key.startswith(f"{prefix}/_pending/")], "journals kept"
    accounting = pipeline.account()
    assert accounting.requests == 3
    assert accounting.billed == accounting.stored == 3, "nothing paid twice, everything stored"
    assert emulator.downloads == after_try_1["downloads"] == (3 if fmt == "url" else 0), "nor downloaded again"
    assert run.xcom["usage"]["reused_prompts"] == 3
    assert run.xcom["usage"]["this_try"]["requests"] == 0
    assert run.xcom["usage"]["requests"] == accounting.requests == 3  # try 1's, kept beside the refused records
    assert len(run.xcom["images"]) == 3
    assert not _journals(pipeline)
    assert f"{prefix}/records.json" in pipeline.objects()
    scheme = "s3://" if pipeline.backend == "s3" else "file:///"
    assert all(uri.startswith(scheme) for uri in run.xcom["return_value"])


@pytest.mark.parametrize("fmt", FORMATS)
def test_task_process_killed_after_storing_before_its_records(
    any_pipeline: S3Pipeline | FilePipeline,
    emulator: JiMengEmulator,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    task_processes: TaskProcesses,
    fmt: str,
) -> None:
    pipeline = any_pipeline
    prompts = ["one", "two", "three"]
    dag_id = pipeline.dag_id(dag_for(fmt))
    arguments: dict[str, Any] = {"dag_id": dag_id, "run_id": RUN_ID, "prompts": prompts, "size": "1K"}
    if pipeline.backend == "file":
        flag = tmp_path / "records-held"
        arguments.update(bucket="unused", output_path=pipeline.output_path, hold_records=str(flag))  # type: ignore[union-attr]
        held = flag.exists
    else:
        gate = request.getfixturevalue("gate")
        gate.hold = "records"  # records.json, the try's last write, never arrives: the process dies waiting
        arguments.update(bucket=pipeline.bucket)

        def held() -> bool:
            return bool(gate.held)

    task_processes.start(arguments, tmp_path / "task.log")
    assert wait_for(held, timeout=60), (tmp_path / "task.log").read_text()[-3000:]
    task_processes.signal(signal.SIGKILL)
    assert task_processes.wait(timeout=30) == -signal.SIGKILL
    if pipeline.backend == "s3":
        gate.hold = None
        gate.release()
    prefix = _prefix(dag_id)
    assert f"{prefix}/records.json" not in pipeline.objects()
    assert _journals(pipeline)
    downloads = emulator.downloads

    run = pipeline.run(dag_for(fmt), prompts=prompts)

    assert run.state == "success", run.errors
    assert run.try_number == 1
    assert run.xcom["usage"]["reused_prompts"] == 3
    assert run.xcom["usage"]["this_try"]["requests"] == 0
    accounting = pipeline.account()
    assert accounting.requests == 3  # all in the killed try
    assert run.xcom["usage"]["requests"] == 3  # counted from the killed try's last journal batch
    assert accounting.billed == accounting.stored == 3
    assert emulator.downloads == downloads
    assert f"{prefix}/records.json" in pipeline.objects()
    assert not _journals(pipeline)


def test_a_cleared_run_reuses_everything_and_no_journal_outlives_success(
    any_pipeline: S3Pipeline | FilePipeline, emulator: JiMengEmulator
) -> None:
    pipeline = any_pipeline
    prompts = ["one", "two"]
    first = pipeline.run(dag_for("url"), prompts=prompts)
    assert first.state == "success", first.errors
    assert not _journals(pipeline), "journals dropped once records.json is written"

    again = pipeline.run(dag_for("url"), prompts=prompts)

    assert again.state == "success", again.errors
    assert emulator.request_count == 2, "the cleared run paid for nothing"
    assert again.xcom["usage"]["reused_prompts"] == 2
    assert again.xcom["return_value"] == first.xcom["return_value"]
    assert not _journals(pipeline)
    storage = again.xcom["storage"]
    if pipeline.backend == "s3":
        assert (storage["prefix"].split("/")[:2], storage["conn_id"]) == (["s3:", ""], "aws_default")
    else:
        assert storage["prefix"] == f"{pipeline.output_path}/{_prefix('faults_pipeline_objstore')[len('jimeng/') :]}/"  # type: ignore[union-attr]
        assert storage["conn_id"] is None, "output_conn_id, not the unused aws_conn_id"


@pytest.mark.parametrize("fmt", FORMATS)
def test_images_without_journal_or_records_vouch_for_their_answer(
    any_pipeline: S3Pipeline | FilePipeline, emulator: JiMengEmulator, fmt: str
) -> None:
    """What a try killed between its uploads and its journal leaves: the images alone (and their metadata)."""
    pipeline = any_pipeline
    prompts = ["one", "two"]
    first = pipeline.run(dag_for(fmt), prompts=prompts)
    assert first.state == "success", first.errors
    pipeline.delete(f"{_prefix(pipeline.dag_id(dag_for(fmt)))}/records.json")

    again = pipeline.run(dag_for(fmt), prompts=prompts)

    assert again.state == "success", again.errors
    assert emulator.request_count == 2, "no new request: the images vouched for their answers"
    assert again.xcom["usage"]["reused_prompts"] == 2
    assert pipeline.account().stored == 2


def test_a_truncated_local_image_does_not_vouch_and_is_generated_again(
    any_pipeline: S3Pipeline | FilePipeline, emulator: JiMengEmulator, backend: str
) -> None:
    """An image cut short under its key (its length no longer the one its metadata names) is not trusted."""
    if backend == "s3":
        pytest.skip("S3 publishes an object whole or not at all")
    pipeline = any_pipeline
    first = pipeline.run(dag_for("b64_json"), prompts=["one"])
    assert first.state == "success", first.errors
    prefix = _prefix(pipeline.dag_id(dag_for("b64_json")))
    image = pipeline.root / f"{prefix}/p0000_i00.jpeg"  # type: ignore[union-attr]
    image.write_bytes(image.read_bytes()[:100])
    pipeline.delete(f"{prefix}/records.json")

    again = pipeline.run(dag_for("b64_json"), prompts=["one"])

    assert again.state == "success", again.errors
    assert emulator.request_count == 2, "the cut image could not vouch: generated again"
    assert len(image.read_bytes()) > 100


def test_an_s3_output_path_is_the_s3_store(pipeline: Pipeline, emulator: JiMengEmulator) -> None:
    """``output_path="s3://..."`` takes the fast S3 path: boto3, metadata on the objects, no sidecars."""
    run = pipeline.run("faults_pipeline_objstore", prompts=["one"], output_path=f"s3://{pipeline.bucket}/team")

    assert run.state == "success", run.errors
    prefix = f"team/{safe_key_part('faults_pipeline_objstore')}/{safe_key_part(RUN_ID)}/generate"
    assert sorted(pipeline.objects()) == [f"{prefix}/p0000_i00.jpeg", f"{prefix}/records.json"]
    head = pipeline.s3.head_object(Bucket=pipeline.bucket, Key=f"{prefix}/p0000_i00.jpeg")
    assert head["Metadata"]["jimeng-request-id"] == emulator.ledger[0].request_id
    assert run.xcom["return_value"] == [f"s3://{pipeline.bucket}/{prefix}/p0000_i00.jpeg"]


def test_a_scheme_without_its_provider_fails_before_any_request(
    any_pipeline: S3Pipeline | FilePipeline, emulator: JiMengEmulator, backend: str
) -> None:
    """``gs://`` without the google provider: a configuration error, no retry, nothing billed."""
    if backend == "s3":
        pytest.skip("a question for output_path only")
    run = any_pipeline.run(dag_for("url"), prompts=["one"], output_path="gs://my-images/jimeng")

    assert run.state == "failed"
    assert run.try_number == 1, "no retry: the next try would meet the same answer"
    assert run.error_types == ["JiMengConfigurationError"]
    assert "No filesystem registered for scheme gs" in run.errors[0]
    assert emulator.request_count == 0
