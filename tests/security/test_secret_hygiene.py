"""Secret hygiene: the API key, signed URLs and base64 image data stay out of everything people read.

The example DAGs (every ``dags_examples/*.py``) and the faults DAGs run with the key ``sk-CANARY-...``
and with Airflow's secrets masker switched off, so a leak in the provider's own code would show up
raw. Scanned: the task logs (``dag.test()`` writes them to stdout; captured at the file-descriptor
level, plus stdlib logging), every XCom, the rendered template fields (RTIF table), the exceptions of
failed tries, the S3 records, and the ``repr``/``str`` of hooks, results and errors.

One exposure is by design and allowed explicitly: without ``s3_bucket`` the task's *output* is the
list of signed URLs (``jimeng_hello``), so they are in that XCom, in its "JiMeng images" link (also an
XCom) and in the rendered arguments of the task that consumes it. They are never logged.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
from airflow.exceptions import AirflowOptionalProviderFeatureException

from airflow_provider_jimeng.emulator import Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengError
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from airflow_provider_jimeng.testing import jimeng_connection_json
from tests.faults.conftest import RUN_AFTER, Pipeline, object_keys, run_dag_test, xcoms_of
from tests.hitl_runs import (
    AWAITS_INPUT_REASON,
    answer_as_the_api_does,
    dag_test_awaits_input,
    latest_run_id,
    run_with_reviewer,
)
from tests.security.conftest import CANARY, as_text, find_leaks

pytestmark = pytest.mark.timeout(120)

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "dags_examples").glob("*.py"))
#: Example DAGs without storage: their output *is* the signed URLs (see the module docstring).
URL_OUTPUT_DAGS = {"jimeng_hello"}


def _load_dags(path: Path) -> list[Any]:
    from airflow.sdk import DAG

    spec = importlib.util.spec_from_file_location(f"jimeng_example_{path.stem}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return [value for value in vars(module).values() if isinstance(value, DAG)]


def _rendered_fields(dag_run: Any) -> list[tuple[str, Any]]:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.query(RenderedTaskInstanceFields).filter(
            RenderedTaskInstanceFields.dag_id == dag_run.dag_id,
            RenderedTaskInstanceFields.run_id == dag_run.run_id,
        )
        return [(row.task_id, row.rendered_fields) for row in rows]


def _captured(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> str:
    out, err = capfd.readouterr()
    return "\n".join((out, err, caplog.text))


def _assert_clean(where: str, value: Any, *, allow_signed_urls: bool = False) -> None:
    leaks = find_leaks(as_text(value), allow_signed_urls=allow_signed_urls)
    assert not leaks, f"{where} leaks {leaks}"


def _run_answering_reviews(dag: Any, conf: dict[str, Any]) -> Any:
    """``dag.test()``; a review step in the DAG is answered (its first two images) as a reviewer would."""
    reviews = [task.task_id for task in dag.tasks if type(task).__name__ == "JiMengReviewOperator"]
    if not reviews:
        return run_dag_test(dag, conf)
    if not dag_test_awaits_input():
        pytest.skip(AWAITS_INPUT_REASON)

    def reviewer(waiting: Any) -> None:
        for task_id in reviews:
            waiting.wait_for({task_id})
            answer_as_the_api_does(dag.dag_id, latest_run_id(dag.dag_id), task_id, lambda options: options[:2])

    return run_with_reviewer(dag, reviewer, run_conf=conf, logical_date=RUN_AFTER, run_after=RUN_AFTER)


@pytest.mark.parametrize("example", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_dags_leak_nothing(
    airflow_db: None,
    unmasked: list[Any],
    canary_emulator: JiMengEmulator,
    s3_bucket: str,
    s3_client: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    example: Path,
) -> None:
    try:
        dags = _load_dags(example)
    except AirflowOptionalProviderFeatureException as needs_newer_airflow:  # the review example on Airflow 3.0
        pytest.skip(str(needs_newer_airflow))
    assert dags, f"{example.name} defines no DAG"
    for dag in dags:
        conf = {"bucket": s3_bucket} if "bucket" in dag.params else {}
        capfd.readouterr()
        dag_run = _run_answering_reviews(dag, conf)
        logs = _captured(capfd, caplog)

        states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
        assert str(dag_run.state) == "success", (states, logs[-3000:])
        if dag.dag_id != "jimeng_check_connection":  # the one example that generates nothing
            assert canary_emulator.billed_images > 0  # the example really generated (and paid for) images
        by_design = dag.dag_id in URL_OUTPUT_DAGS
        _assert_clean(f"{dag.dag_id}: task logs", logs)
        for task_id, map_index, key, value in xcoms_of(dag_run):
            output = by_design and task_id == "generate" and key in ("return_value", "_link_JiMengImagesLink")
            _assert_clean(f"{dag.dag_id}: XCom {task_id}[{map_index}].{key}", value, allow_signed_urls=output)
        for task_id, fields in _rendered_fields(dag_run):
            _assert_clean(f"{dag.dag_id}: rendered fields of {task_id}", fields, allow_signed_urls=by_design)
        for key in object_keys(s3_client, s3_bucket):
            if key.endswith(".json"):
                body = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode()
                _assert_clean(f"{dag.dag_id}: s3://{s3_bucket}/{key}", body)
        assert not [key for key in object_keys(s3_client, s3_bucket) if "/_pending/" in key]
    assert CANARY in unmasked  # the hook asked Airflow to mask the key in logs


@pytest.mark.parametrize("dag_id", ["faults_pipeline", "faults_pipeline_b64"])
def test_failed_tries_leak_nothing(
    airflow_db: None,
    unmasked: list[Any],
    canary_emulator: JiMengEmulator,
    s3_bucket: str,
    s3_client: Any,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    dag_id: str,
) -> None:
    # One of each failure the hook, the downloads and the task can report, spread over four prompts.
    canary_emulator.inject(
        Fault("rate_limit", retry_after=0.01, times=2),
        Fault("malformed", times=2),
        Fault("truncated", times=2),
        Fault("reset_mid_body"),
        Fault("expired_url"),
        Fault("missing_url"),
        Fault("quota"),
    )
    pipeline = Pipeline(canary_emulator, s3_bucket, s3_client)
    capfd.readouterr()

    run = pipeline.run(dag_id, prompts=["a red fox", "a grey owl", "a blue whale", "a green frog"])
    logs = _captured(capfd, caplog)

    assert run.errors, "the faults were meant to fail at least one try"
    for error in run.errors:
        _assert_clean("a failed try's exception", error)
    _assert_clean("task logs", logs)
    _assert_clean("XComs", run.xcom)


def test_wrong_key_is_reported_without_the_key(
    unmasked: list[Any], canary_emulator: JiMengEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    with JiMengEmulator(api_key="sk-the-right-one") as other:
        monkeypatch.setenv("AIRFLOW_CONN_JIMENG_OTHER", jimeng_connection_json(other.base_url, api_key=CANARY))
        with pytest.raises(JiMengError) as raised:
            JiMengHook("jimeng_other").generate_images("a red fox")
    assert "AuthenticationError" in str(raised.value)
    _assert_clean("401 error", [str(raised.value), repr(raised.value), raised.value.args])


def test_reprs_and_messages_leak_nothing(unmasked: list[Any], canary_emulator: JiMengEmulator) -> None:
    hook = JiMengHook()
    url_result = hook.generate_images("a red fox", sequential_image_generation="auto", max_images=2)
    b64_result = hook.generate_images("a grey owl", response_format="b64_json")
    assert url_result.images[0].url
    assert "X-Tos-Signature" in url_result.images[0].url
    assert b64_result.images[0].b64_json

    canary_emulator.inject(Fault("expired_url"))
    expired = hook.generate_images("a blue whale").images[0]
    with pytest.raises(JiMengError) as download_error:
        hook.open_image(expired.url or "")

    shown = {
        "hook": repr(hook),
        "config": [repr(hook.config), str(hook.config)],
        "session": repr(hook.get_conn()),
        "url result": [repr(url_result), str(url_result), [repr(image) for image in url_result.images]],
        "b64 result": [repr(b64_result), str(b64_result), repr(b64_result.images[0])],
        "usage": repr(url_result.usage),
        "download error": [str(download_error.value), repr(download_error.value)],
    }
    for where, text in shown.items():
        _assert_clean(where, text)
    assert CANARY in unmasked
