"""The same model behind every front end: ``@task.jimeng``, the hook, and whole DAG runs.

``test_rendered_types.py`` drives the operator in-process; here the same rules are shown through
the other ways in: a ``@task.jimeng`` function returning a dict of bad values, keyword fields of
``JiMengHook.generate_images``, and whole DAGs run with ``dag.test()`` (the DagRun fails, each task
fails on its first try although it has retries, and nothing is sent). A retried run with
``replace="False"`` (text) proves, against S3, that "False" is false: the second run pays nothing.

Counts: refused through @task.jimeng 12, through the hook 16, whole-DAG tasks 11 (text 6, native 5
in 2 DAG runs); accepted: @task.jimeng 2, hook 3, replace with storage 4.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from airflow_provider_jimeng.decorators.jimeng import jimeng_task
from airflow_provider_jimeng.emulator import JiMengEmulator
from airflow_provider_jimeng.exceptions import JiMengConfigurationError
from airflow_provider_jimeng.hooks.jimeng import JiMengHook
from tests.bad_input.conftest import assert_refused
from tests.bad_input.test_rendered_types import BOOL, EXTRA, PROMPT, SEED, UTF8, N, RecordingIdentity, build
from tests.dags import jimeng_test_rendered_types as dags

NAN = float("nan")
MODEL_3_0 = "doubao-seedream-3-0-t2i-250415"

# ------------------------------------------------------------------------------------- @task.jimeng
DECORATOR_CASES = [
    pytest.param({"prompt": "a fox", "seed": 3.7}, "seed", SEED, id="seed-3.7"),
    pytest.param({"prompt": "a fox", "seed": NAN}, "seed", SEED, id="seed-nan"),
    pytest.param({"prompt": "a fox", "replace": "maybe"}, "replace", BOOL, id="replace-maybe"),
    pytest.param({"prompt": "a fox", "dry_run": "None"}, "dry_run", BOOL, id="dry-run-None-text"),
    pytest.param({"prompt": ["a fox", None]}, "prompt[1]", PROMPT, id="prompt-None-in-list"),
    pytest.param({"prompt": "['a', 'b']"}, "prompt", PROMPT, id="prompt-list-as-text"),
    pytest.param({"prompt": "a \ud800 fox"}, "prompt", UTF8, id="prompt-surrogate"),
    pytest.param({"prompt": "a fox", "extra_body": [("n", 2)]}, "extra_body", EXTRA, id="extra-body-pairs"),
    pytest.param({"prompt": "a fox", "extra_body": {"n": 1.5}}, "extra_body.n", N, id="extra-body-n-1.5"),
    pytest.param({"prompt": "a fox", "max_concurrency": "nan"}, "max_concurrency", "[1, 64]", id="concurrency-nan"),
    pytest.param({"prompt": "a fox", "s3_bucket": None}, "s3_bucket", "allowed: ", id="bucket-None-returned"),
    pytest.param(
        {"prompt": "a fox", "max_images_per_minute": "inf"}, "max_images_per_minute", "finite", id="per-minute-inf"
    ),
]


def decorated(returned: Any) -> Any:
    from airflow.sdk import DAG

    with DAG("rendered_types_decorated", schedule=None, start_date=datetime.datetime(2024, 1, 1)):

        @jimeng_task(task_id="generate")
        def build_prompt() -> Any:
            return returned

        return build_prompt().operator


@pytest.mark.parametrize(("returned", "parameter", "allowed"), DECORATOR_CASES)
def test_decorator_refuses_returned_values(
    jimeng_conn: JiMengEmulator, context: dict[str, Any], returned: Any, parameter: str, allowed: str
) -> None:
    with pytest.raises(JiMengConfigurationError) as raised:
        decorated(returned).execute(context)
    assert_refused(raised.value, parameter, allowed, jimeng_conn)


@pytest.mark.parametrize(
    ("returned", "requests"),
    [
        pytest.param({"prompt": "a fox", "dry_run": "true"}, 0, id="dry-run-true-text"),
        pytest.param(
            {"prompt": "a fox", "dry_run": "False", "seed": "7", "model": MODEL_3_0}, 1, id="dry-run-False-text"
        ),
    ],
)
def test_decorator_coerces_returned_text(
    jimeng_conn: JiMengEmulator, context: dict[str, Any], returned: dict[str, Any], requests: int
) -> None:
    context["ti"] = RecordingIdentity()
    decorated(returned).execute(context)
    assert jimeng_conn.request_count == requests
    if requests:
        assert jimeng_conn.requests[0]["body"]["seed"] == 7


# ------------------------------------------------------------------------------------------ the hook
HOOK_CASES = [
    pytest.param({"prompt": "a \ud800 fox"}, "prompt", UTF8, id="prompt-surrogate"),
    pytest.param({"prompt": "None"}, "prompt", "allowed: a non-empty string", id="prompt-None-text"),
    pytest.param({"prompt": "['a', 'b']"}, "prompt", "allowed: a non-empty string", id="prompt-list-as-text"),
    pytest.param({"prompt": 42}, "prompt", "allowed: a non-empty string", id="prompt-int"),
    pytest.param({"prompt": True}, "prompt", "allowed: a non-empty string", id="prompt-bool"),
    pytest.param({"seed": NAN}, "seed", SEED, id="seed-nan"),
    pytest.param({"seed": "3.7"}, "seed", SEED, id="seed-3.7-text"),
    pytest.param({"watermark": "maybe"}, "watermark", BOOL, id="watermark-maybe"),
    pytest.param({"stream": "None"}, "stream", BOOL, id="stream-None-text"),
    pytest.param({"extra_body": "abc"}, "extra_body", EXTRA, id="extra-body-words"),
    pytest.param({"extra_body": {"n", "seed"}}, "extra_body", EXTRA, id="extra-body-set"),
    pytest.param({"extra_body": [("model", "x")]}, "extra_body", EXTRA, id="extra-body-pairs-clash"),
    pytest.param({"extra_body": {"n": "many"}}, "extra_body.n", N, id="extra-body-n-words"),
    pytest.param({"guidance_scale": "nan"}, "guidance_scale", "allowed: a finite number", id="guidance-nan"),
    pytest.param({"max_images_per_task": "inf"}, "max_images_per_task", "allowed: an integer >= 1", id="cap-inf"),
    pytest.param({"model": "['doubao-seedream-4-0-250828']"}, "model", "allowed: a model id", id="model-list-text"),
]


@pytest.mark.parametrize(("arguments", "parameter", "allowed"), HOOK_CASES)
def test_hook_refuses_keyword_fields(
    jimeng_conn: JiMengEmulator, arguments: dict[str, Any], parameter: str, allowed: str
) -> None:
    with pytest.raises(JiMengConfigurationError) as raised:
        JiMengHook().generate_images(**{"prompt": "a red fox", **arguments})
    assert_refused(raised.value, parameter, allowed, jimeng_conn)


@pytest.mark.parametrize(
    ("arguments", "field", "value"),
    [
        pytest.param({"seed": "7", "model": MODEL_3_0}, "seed", 7, id="seed-text"),
        pytest.param({"watermark": "False"}, "watermark", False, id="watermark-False-text"),
        pytest.param({"extra_body": '{"n": 2}'}, "n", 2, id="extra-body-json"),
    ],
)
def test_hook_coerces_keyword_text(
    jimeng_conn: JiMengEmulator, arguments: dict[str, Any], field: str, value: Any
) -> None:
    JiMengHook().generate_images("a red fox", **arguments)
    assert jimeng_conn.requests[0]["body"][field] == value


# -------------------------------------------------------------------- replace="False" against storage
@pytest.mark.parametrize(
    ("replace", "mode", "second_run_requests"),
    [
        pytest.param(False, "text", 0, id="False-rendered-as-text"),
        pytest.param("False", "native", 0, id="False-text-rendered-natively"),
        pytest.param(" off ", "text", 0, id="off-text"),
        pytest.param("True", "text", 1, id="True-text-pays-again"),
    ],
)
def test_replace_false_text_reuses_what_a_retry_finds(
    jimeng_conn: JiMengEmulator, s3_bucket: str, replace: Any, mode: str, second_run_requests: int
) -> None:
    """The issue: replace="False" was truthy, so every try paid again for what S3 already had."""
    outputs = []
    for _ in range(2):
        operator, context = build({"replace": replace}, {"s3_bucket": s3_bucket}, mode)
        context["ti"] = RecordingIdentity()
        outputs.append(operator.execute(context))  # type: ignore[arg-type]
    assert jimeng_conn.request_count == 1 + second_run_requests
    assert outputs[0] == outputs[1], "the same keys either way"


# --------------------------------------------------------------------------------------- whole DAGs
@pytest.mark.integration
@pytest.mark.parametrize(
    ("dag", "tasks"),
    [
        pytest.param(dags.text_dag, dags.TEXT_TASKS, id="rendered-as-text"),
        pytest.param(dags.native_dag, dags.NATIVE_TASKS, id="rendered-natively"),
    ],
)
def test_a_dag_of_bad_types_fails_on_the_first_try_without_a_request(
    emulator: JiMengEmulator, run_dag: Any, dag: Any, tasks: dict[str, str], subtests: pytest.Subtests
) -> None:
    run = run_dag(dag)

    assert run.state == "failed"
    for task_id, message in tasks.items():
        with subtests.test(task_id=task_id):
            assert run.task_state(task_id) == "failed"
            assert run.try_number(task_id) == 1, "a configuration error must not use the task's retries"
            assert message in run.log(task_id)
    if dag is dags.native_dag:
        for map_index in (0, 1):
            with subtests.test(task_id=dags.MAPPED_TASK, map_index=map_index):
                assert run.task_state(dags.MAPPED_TASK, map_index) == "failed"
                assert run.try_number(dags.MAPPED_TASK, map_index) == 1
                assert dags.MAPPED_MESSAGE in run.log(dags.MAPPED_TASK, map_index)
    assert emulator.request_count == 0, "no bad input reached the API"
