"""``JiMengGenerateOperator`` on a Visual API connection: submit, journal, defer (or poll on the worker), collect
and store through the Ark path's run; never a second submit for a journaled prompt.

Driven at the operator's level (``execute``, the trigger run with asyncio, ``execute_complete``) against the
emulator on loopback and moto S3: what a worker and a triggerer do, without a scheduler.
"""

# ruff: noqa: F811  (fixtures imported from tests.visual_fixtures are parameters here)

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import TaskDeferred  # airflow.exceptions on Airflow 3.0 and 3.1
from airflow.triggers.base import TriggerEvent

from airflow_provider_jimeng.emulator import SUBMIT_FAULT_PATH, Fault, JiMengEmulator
from airflow_provider_jimeng.exceptions import (
    JiMengConfigurationError,
    JiMengGenerationIncompleteError,
)
from airflow_provider_jimeng.operators.jimeng import JiMengGenerateOperator
from airflow_provider_jimeng.run.visual import JOURNAL_NAME
from airflow_provider_jimeng.triggers.visual import JiMengVisualTrigger
from tests.operators.conftest import Bucket
from tests.visual_fixtures import (  # noqa: F401  (fixtures)
    CONN_ID,
    SECRET,
    Clock,
    clock,
    connect_visual,
    emulator,
    make_jimeng_emulator,
    make_visual_emulator,
    submits,
)

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk", "a teapot on a table"]


@dataclass
class FakeTI:
    """What the operator reads of a task instance, and the XComs it pushes."""

    dag_id: str = "visual_dag"
    run_id: str = "manual__1"
    task_id: str = "gen"
    map_index: int = -1
    try_number: int = 1
    max_tries: int = 0
    xcoms: dict[str, Any] = field(default_factory=dict)

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


def context(ti: FakeTI) -> Any:
    """The task's context, as far as the operator reads it."""
    return {"ti": ti}


def operator(**kwargs: Any) -> JiMengGenerateOperator:
    kwargs.setdefault("prompt", PROMPTS)
    kwargs.setdefault("size", "1024x1024")
    return JiMengGenerateOperator(task_id="gen", jimeng_conn_id=CONN_ID, poll_interval=0.01, **kwargs)


def fire(trigger: JiMengVisualTrigger, timeout: float = 20.0) -> dict[str, Any]:
    """Run the trigger as the triggerer would (rebuilt from its serialized kwargs): its one event's payload."""
    classpath, kwargs = trigger.serialize()
    assert classpath.endswith("JiMengVisualTrigger")
    rebuilt = JiMengVisualTrigger(**kwargs)

    async def run() -> TriggerEvent:
        async for event in rebuilt.run():
            return event
        raise AssertionError("the trigger ended without an event")

    payload: dict[str, Any] = asyncio.run(asyncio.wait_for(run(), timeout)).payload
    return payload


def defer(op: JiMengGenerateOperator, ti: FakeTI) -> TaskDeferred:
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(context(ti))
    return deferred.value


def resume(op: JiMengGenerateOperator, ti: FakeTI, deferred: TaskDeferred) -> list[str]:
    """What Airflow does with a fired trigger: ``resume_execution`` with the event and the deferral's kwargs."""
    event = fire(deferred.trigger)
    uris: list[str] = op.resume_execution(
        deferred.method_name, {**(deferred.kwargs or {}), "event": event}, context(ti)
    )
    return uris


@pytest.fixture
def visual(emulator: JiMengEmulator, connect_visual: Callable[..., None]) -> JiMengEmulator:
    connect_visual(emulator)
    return emulator


def prefix(ti: FakeTI) -> str:
    return f"jimeng/{ti.dag_id}/{ti.run_id}/{ti.task_id}"


def test_deferrable_submits_journals_defers_then_stores_every_image(visual: JiMengEmulator, bucket: Bucket) -> None:
    ti = FakeTI()
    op = operator(deferrable=True, s3_bucket=bucket.name)
    deferred = defer(op, ti)

    # Submitted once each, journaled before deferring: the journal holds every task id the trigger waits on.
    assert submits(visual) == 3
    task_prefix = bucket.keys()[0].rsplit("/_visual/", 1)[0]
    journal = bucket.json(f"{task_prefix}/{JOURNAL_NAME}")["tasks"]
    trigger = deferred.trigger
    assert isinstance(trigger, JiMengVisualTrigger)
    assert sorted(trigger.task_ids) == sorted(entry["task_id"] for entry in journal.values())
    assert SECRET not in json.dumps(trigger.serialize()[1])

    uris = resume(op, ti, deferred)

    assert len(uris) == 3
    assert all(uri.startswith(f"s3://{bucket.name}/{task_prefix}/p000") for uri in uris)
    assert submits(visual) == 3, "collecting never submits"
    assert visual.billed_images == 3
    records = bucket.json(f"{task_prefix}/records.json")
    assert [record["prompt"] for record in records["prompts"]] == PROMPTS
    assert ti.xcoms["usage"]["generated_images"] == 3
    assert ti.xcoms["usage"]["attempts"] == 3, "the submits made before deferring are counted"
    assert ti.xcoms["storage"]["records"] == f"s3://{bucket.name}/{task_prefix}/records.json"
    assert [image["uri"] for image in ti.xcoms["images"]] == uris


@pytest.mark.parametrize("deferrable", [False, True], ids=["on-the-worker", "deferred"])
@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_both_answer_kinds_are_stored_deferred_or_not(
    visual: JiMengEmulator, bucket: Bucket, response_format: str, deferrable: bool
) -> None:
    ti = FakeTI()
    op = operator(deferrable=deferrable, s3_bucket=bucket.name, response_format=response_format)
    uris = resume(op, ti, defer(op, ti)) if deferrable else op.execute(context(ti))

    assert len(uris) == 3
    assert submits(visual) == 3
    assert visual.billed_images == 3
    for uri in uris:
        assert bucket.read(uri.split("/", 3)[3])[:3] == b"\xff\xd8\xff", "a JPEG"


def test_without_storage_the_worker_polls_and_hands_urls_downstream(visual: JiMengEmulator) -> None:
    urls = operator(prompt="a red fox", deferrable=False, s3_bucket=None).execute(context(FakeTI()))

    assert len(urls) == 1
    assert urls[0].startswith("http://127.0.0.1")
    assert visual.billed_images == 1


def test_a_retry_after_the_worker_died_between_submit_and_defer_submits_nothing_again(
    visual: JiMengEmulator, bucket: Bucket
) -> None:
    ti = FakeTI()
    defer(operator(deferrable=True, s3_bucket=bucket.name), ti)  # the try "dies" here: the deferral is lost
    assert submits(visual) == 3

    retry = FakeTI(try_number=2, max_tries=2)
    op = operator(deferrable=True, s3_bucket=bucket.name, retries=1)
    deferred = defer(op, retry)
    assert submits(visual) == 3, "the retry read the journal and waits on the same task ids"
    uris = resume(op, retry, deferred)

    assert len(uris) == 3
    assert submits(visual) == 3
    assert visual.billed_images == 3
    assert len({entry.prompt for entry in visual.ledger}) == 3


def test_a_task_that_never_finishes_fails_at_its_deadline_and_a_retry_polls_it_again(
    make_visual_emulator: Callable[..., JiMengEmulator], connect_visual: Callable[..., None], bucket: Bucket
) -> None:
    slow = make_visual_emulator(latency=10_000)  # the clock is never moved: generating forever
    connect_visual(slow)
    op = operator(prompt="a red fox", deferrable=False, s3_bucket=bucket.name, poll_timeout=0.2)
    with pytest.raises(JiMengGenerationIncompleteError, match="TaskDeadline"):
        op.execute(context(FakeTI()))

    with pytest.raises(JiMengGenerationIncompleteError, match="TaskDeadline"):
        operator(prompt="a red fox", deferrable=False, s3_bucket=bucket.name, poll_timeout=0.2).execute(
            context(FakeTI(try_number=2))
        )
    assert submits(slow) == 1, "never submitted twice"


def test_an_expired_task_fails_its_prompt_and_is_not_submitted_again(
    visual: JiMengEmulator, clock: Clock, bucket: Bucket
) -> None:
    ti = FakeTI()
    op = operator(prompt="a red fox", deferrable=True, s3_bucket=bucket.name)
    deferred = defer(op, ti)
    clock.advance(12 * 3600 + 1)  # the triggerer was down for half a day

    with pytest.raises(JiMengGenerationIncompleteError, match="TaskExpired"):
        resume(op, ti, deferred)
    assert ti.xcoms["usage"]["possibly_billed_images"] == 1
    with pytest.raises(JiMengGenerationIncompleteError, match="TaskExpired"):
        operator(prompt="a red fox", deferrable=False, s3_bucket=bucket.name).execute(context(FakeTI(try_number=2)))
    assert submits(visual) == 1


def test_a_burst_of_50429_on_submit_is_absorbed(visual: JiMengEmulator, bucket: Bucket) -> None:
    visual.inject(Fault("visual_error", code="50429", path=SUBMIT_FAULT_PATH, times=3))
    ti = FakeTI()
    uris = operator(deferrable=False, s3_bucket=bucket.name).execute(context(ti))

    assert len(uris) == 3
    assert visual.billed_images == 3
    assert ti.xcoms["usage"]["rate_limited"] == 3


def test_a_wrong_secret_is_not_retried(
    emulator: JiMengEmulator, connect_visual: Callable[..., None], bucket: Bucket
) -> None:
    connect_visual(emulator, secret="not-the-secret-at-all")
    with pytest.raises(Exception, match="SignatureDoesNotMatch") as raised:
        operator(deferrable=True, s3_bucket=bucket.name).execute(context(FakeTI()))
    assert not isinstance(raised.value, TaskDeferred)
    assert submits(emulator) == 1, "a refused key pair is not retried, and no other prompt is sent"
    assert emulator.billed_images == 0


def test_deferrable_on_an_ark_connection_is_refused_before_any_request(
    jimeng_conn: JiMengEmulator, bucket: Bucket
) -> None:
    op = JiMengGenerateOperator(task_id="gen", prompt="a red fox", deferrable=True, s3_bucket=bucket.name)
    with pytest.raises(JiMengConfigurationError, match=r"deferrable.*Ark API.*idempotency"):
        op.execute(context(FakeTI()))
    assert jimeng_conn.requests == []


def test_deferrable_without_storage_is_refused_before_any_request(visual: JiMengEmulator) -> None:
    with pytest.raises(JiMengConfigurationError, match=r"deferrable.*s3_bucket or output_path"):
        operator(deferrable=True).execute(context(FakeTI()))
    assert visual.requests == []


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"guidance_scale": 5}, "guidance_scale"),
        ({"image": "data:image/png;base64,AAAA"}, "image"),
        ({"sequential_image_generation": "auto", "max_images": 4}, "max_images"),
        ({"model": "doubao-seedream-4-0-250828"}, "model"),
        ({"size": "512x512"}, "size"),
    ],
)
def test_what_the_visual_api_does_not_take_is_refused_by_name(
    visual: JiMengEmulator, kwargs: dict[str, Any], parameter: str
) -> None:
    with pytest.raises(JiMengConfigurationError) as raised:
        operator(deferrable=False, **kwargs).execute(context(FakeTI()))
    assert raised.value.parameter == parameter
    assert visual.requests == []


def test_max_images_per_task_reserves_a_set_per_submit(visual: JiMengEmulator, bucket: Bucket) -> None:
    op = operator(sequential_image_generation="auto", s3_bucket=bucket.name, max_images_per_task=20, deferrable=False)
    with pytest.raises(JiMengConfigurationError, match="max_images_per_task"):
        op.execute(context(FakeTI()))
    assert visual.requests == []


def test_the_watermark_choice_goes_in_the_poll(visual: JiMengEmulator, bucket: Bucket, caplog: Any) -> None:
    caplog.set_level(logging.INFO)
    op = operator(prompt="a red fox", deferrable=True, s3_bucket=bucket.name, watermark=False)
    deferred = defer(op, FakeTI())
    trigger = deferred.trigger
    assert isinstance(trigger, JiMengVisualTrigger)
    assert trigger.req_json == {"return_url": True, "logo_info": {"add_logo": False}}
    assert SECRET not in caplog.text


def test_the_decorated_function_runs_once_and_its_prompts_survive_the_deferral(
    visual: JiMengEmulator, bucket: Bucket
) -> None:
    from airflow_provider_jimeng.decorators.jimeng import _JiMengDecoratedOperator

    calls: list[int] = []

    def prompts() -> dict[str, Any]:
        calls.append(1)
        return {"prompt": [f"a fox, take {len(calls)}", "a lighthouse"], "s3_bucket": bucket.name}

    op = _JiMengDecoratedOperator(
        task_id="gen", python_callable=prompts, jimeng_conn_id=CONN_ID, deferrable=True, poll_interval=0.01
    )
    ti = FakeTI()
    deferred = defer(op, ti)
    assert deferred.kwargs is not None
    assert deferred.kwargs["fields"]["prompt"] == ["a fox, take 1", "a lighthouse"]

    op.prompt, op.s3_bucket = None, None  # a resumed task is a fresh operator: only the kwargs carry them
    uris = resume(op, ti, deferred)

    assert len(uris) == 2
    assert calls == [1], "the function is not called again on resume"
    assert sorted(entry.prompt for entry in visual.ledger) == ["a fox, take 1", "a lighthouse"]


def test_a_triggerer_restarted_mid_poll_waits_on_the_same_tasks(
    make_visual_emulator: Callable[..., JiMengEmulator],
    connect_visual: Callable[..., None],
    clock: Clock,
    bucket: Bucket,
) -> None:
    slow = make_visual_emulator(latency=30)
    connect_visual(slow)
    ti = FakeTI()
    op = operator(deferrable=True, s3_bucket=bucket.name)
    deferred = defer(op, ti)
    with pytest.raises(TimeoutError):
        fire(deferred.trigger, timeout=0.3)  # the triggerer dies while the tasks are generating
    clock.advance(31)  # one image each, 30 s per image

    uris = resume(op, ti, deferred)  # a new triggerer, rebuilt from the same kwargs

    assert len(uris) == 3
    assert submits(slow) == 3
    assert slow.billed_images == 3


def test_a_submit_whose_answer_was_lost_is_counted_and_the_others_are_collected(
    visual: JiMengEmulator, bucket: Bucket
) -> None:
    visual.inject(Fault("reset_mid_body", path=SUBMIT_FAULT_PATH))
    ti = FakeTI()
    op = operator(deferrable=True, s3_bucket=bucket.name)
    deferred = defer(op, ti)
    trigger = deferred.trigger
    assert isinstance(trigger, JiMengVisualTrigger)
    assert len(trigger.task_ids) == 2, "the lost submit has no task id to wait on"

    with pytest.raises(JiMengGenerationIncompleteError, match="SubmitFailed"):
        resume(op, ti, deferred)
    usage = ti.xcoms["usage"]
    assert usage["generated_images"] == 2
    assert usage["possibly_billed_images"] == 1
    assert visual.billed_images == 3, "the emulator billed the task whose id never came"
    assert len(ti.xcoms["images"]) == 2


def test_a_cleared_task_after_success_submits_nothing(visual: JiMengEmulator, bucket: Bucket) -> None:
    first = operator(deferrable=False, s3_bucket=bucket.name).execute(context(FakeTI()))
    again = operator(deferrable=False, s3_bucket=bucket.name).execute(context(FakeTI(try_number=2, max_tries=2)))

    assert again == first
    assert submits(visual) == 3
    assert visual.billed_images == 3


def test_the_secret_stays_out_of_the_journal_xcoms_and_trigger(visual: JiMengEmulator, bucket: Bucket) -> None:
    ti = FakeTI()
    op = operator(deferrable=True, s3_bucket=bucket.name)
    deferred = defer(op, ti)
    resume(op, ti, deferred)

    names = bucket.keys(prefix="jimeng/")
    stored = [bucket.read(name) for name in names if name.endswith(".json")]
    assert stored
    assert not any(SECRET.encode() in data for data in stored)
    assert SECRET not in json.dumps(ti.xcoms, default=str)
    assert SECRET not in json.dumps(deferred.trigger.serialize()[1])


@pytest.mark.parametrize(("limit", "resubmitted"), [(3, False), (4, True)])
def test_a_retry_resubmits_a_lost_submit_only_within_max_images_per_task(
    visual: JiMengEmulator, bucket: Bucket, limit: int, resubmitted: bool
) -> None:
    visual.inject(Fault("reset_mid_body", path=SUBMIT_FAULT_PATH))
    with pytest.raises(JiMengGenerationIncompleteError, match="SubmitFailed"):
        operator(deferrable=False, s3_bucket=bucket.name, max_images_per_task=limit, retries=1).execute(
            context(FakeTI())
        )
    assert submits(visual) == 3

    retry = operator(deferrable=False, s3_bucket=bucket.name, max_images_per_task=limit, retries=1)
    if resubmitted:
        assert len(retry.execute(context(FakeTI(try_number=2, max_tries=1)))) == 3
    else:
        with pytest.raises(JiMengConfigurationError, match="max_images_per_task"):
            retry.execute(context(FakeTI(try_number=2, max_tries=1)))
    assert submits(visual) == 3 + resubmitted, "only the lost prompt, and only within the cap"


def test_default_deferrable_defers_visual_tasks_and_leaves_ark_ones_synchronous(
    visual: JiMengEmulator, jimeng_conn: JiMengEmulator, bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
    defer(operator(prompt="a red fox", s3_bucket=bucket.name), FakeTI())
    ark = JiMengGenerateOperator(task_id="ark", prompt="a red fox", s3_bucket=bucket.name)

    assert len(ark.execute(context(FakeTI(task_id="ark")))) == 1
    assert jimeng_conn.billed_images == 1


def test_the_trigger_holds_its_event_past_the_workers_exit_detection(
    visual: JiMengEmulator, bucket: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_jimeng.triggers import visual as trigger_module

    monkeypatch.setattr("airflow_provider_jimeng.operators.jimeng.resume_hold_off", trigger_module.resume_hold_off)
    monkeypatch.setenv("AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL", "5")
    before = time.time()
    deferred = defer(operator(deferrable=True, s3_bucket=bucket.name), FakeTI())
    trigger = deferred.trigger
    assert isinstance(trigger, JiMengVisualTrigger)
    assert trigger.fire_after is not None
    assert before + 6.0 <= trigger.fire_after <= time.time() + 6.0
    assert trigger.poll_anchor is not None
    assert before <= trigger.poll_anchor <= time.time()


def test_a_dry_run_sends_nothing(visual: JiMengEmulator, bucket: Bucket) -> None:
    assert operator(deferrable=True, s3_bucket=bucket.name, dry_run=True).execute(context(FakeTI())) == []
    assert visual.requests == []
    assert bucket.keys(prefix="jimeng/") == []


def test_a_worker_sigkilled_after_journaling_leaves_its_tasks_to_the_retry(
    make_visual_emulator: Callable[..., JiMengEmulator],
    connect_visual: Callable[..., None],
    clock: Clock,
    bucket: Bucket,
    tmp_path: Any,
) -> None:
    """A real task process, killed with SIGKILL once its task ids are journaled (before it could defer or
    finish polling): the retry waits on the same tasks, and the ledger shows each prompt submitted once."""
    import signal
    import subprocess
    import sys

    from tests.faults.conftest import wait_for

    slow = make_visual_emulator(latency=60)  # generating until the test moves the clock
    connect_visual(slow)
    prompts = PROMPTS[:2]
    script = (
        "from tests.operators.test_operator_visual import FakeTI, context, operator\n"
        f"operator(prompt={prompts!r}, deferrable=False, s3_bucket={bucket.name!r}).execute(context(FakeTI()))\n"
    )
    log = (tmp_path / "task.log").open("w")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=subprocess.STDOUT)
    try:

        def journaled() -> bool:
            keys = [key for key in bucket.keys(prefix="jimeng/") if key.endswith(JOURNAL_NAME)]
            return bool(keys) and sum(1 for e in bucket.json(keys[0])["tasks"].values() if e["task_id"]) == 2

        assert wait_for(journaled, timeout=60), (tmp_path / "task.log").read_text()[-2000:]
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        log.close()
    assert submits(slow) == 2

    clock.advance(61)
    retry = FakeTI(try_number=2, max_tries=1)
    op = operator(prompt=prompts, deferrable=True, s3_bucket=bucket.name, retries=1)
    uris = resume(op, retry, defer(op, retry))

    assert len(uris) == 2
    assert submits(slow) == 2, "nothing submitted twice"
    assert slow.billed_images == 2
